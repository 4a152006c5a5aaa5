"""One-off edit of a run folder: a run trained with init_state="uniform" continues as
"uniform_always" (training is identical; only evaluation changes from u = 0 to seeded U(0, 1)
draws). Usage: python results/mnist/migrate_init_state.py RUN_DIR"""
import json, sys, torch, os
run = sys.argv[1]
for name in ("last.pt", "best.pt"):
    p = os.path.join(run, name)
    ck = torch.load(p, map_location="cpu", weights_only=False)
    assert ck["config"]["init_state"] == "uniform", ck["config"]["init_state"]
    ck["config"]["init_state"] = "uniform_always"
    torch.save(ck, p + ".tmp"); os.replace(p + ".tmp", p)
p = os.path.join(run, "config.json")
c = json.load(open(p)); c["init_state"] = "uniform_always"
open(p, "w").write(json.dumps(c, indent=2) + "\n")
print("migrated", run)
