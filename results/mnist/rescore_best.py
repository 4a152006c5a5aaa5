"""One-off, after migrate_init_state.py: the best epoch so far, re-scored under the new evaluation
(python -m srnn_fast.train --evaluate RUN/best.pt > EVAL.json), becomes the score later epochs
must beat; metrics.json says so in "notes". Usage: python results/mnist/rescore_best.py RUN_DIR EVAL.json"""
import json, os, sys, torch
run, eval_json = sys.argv[1], sys.argv[2]
ev = json.load(open(eval_json))
for name in ("last.pt", "best.pt"):
    p = os.path.join(run, name)
    ck = torch.load(p, map_location="cpu", weights_only=False)
    ck["best_score"] = ev["val_acc"]
    torch.save(ck, p + ".tmp"); os.replace(p + ".tmp", p)
last = torch.load(os.path.join(run, "last.pt"), map_location="cpu", weights_only=False)["epoch"]
p = os.path.join(run, "metrics.json")
m = json.load(open(p))
assert m["best_epoch"] == ev["epoch"] and len(m["epochs"]) == last
m["best_val_acc"], m["best_test_acc"] = ev["val_acc"], ev["test_acc"]
m.setdefault("notes", []).append(
    f"Epochs 1-{last} were evaluated from u = 0 (init_state 'uniform'); from epoch {last + 1} on, from seeded "
    f"U(0, 1) draws ('uniform_always', the method's evaluation). The best epoch so far ({ev['epoch']}) was re-scored "
    f"that way (val {ev['val_acc']:.4f}, test {ev['test_acc']:.4f}; its row keeps the u = 0 figures) and is the "
    f"score later epochs must beat.")
open(p + ".tmp", "w").write(json.dumps(m, indent=2) + "\n"); os.replace(p + ".tmp", p)
print(m["notes"][-1])
