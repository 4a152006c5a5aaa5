"""The build (setup.py): what a user sees when torch is missing from the build environment."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_build_without_torch_says_what_to_run(tmp_path):
    """pip's default isolated build has no torch: one clear message, not a traceback."""
    (tmp_path / "torch.py").write_text("raise ImportError('no torch in this environment')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    p = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    assert "pip install -e . --no-build-isolation" in p.stderr and "Install torch first" in p.stderr, p.stderr
