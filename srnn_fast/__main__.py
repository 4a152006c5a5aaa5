"""python -m srnn_fast: prints this installation's versions, backends, CPU kernels and data
folder (srnn_fast.show_config()), the text to include in a bug report.

python -m srnn_fast check: every backend available here against the reference on small cases
(srnn_fast.check()); exits non-zero if any fails."""
import argparse
import sys

from . import check, show_config  # check: srnn_fast/selfcheck.py

parser = argparse.ArgumentParser(prog="python -m srnn_fast", description=__doc__.split("\n\n")[0])
parser.add_argument("command", nargs="?", choices=["config", "check"], default="config",
                    help="config (default): the installation report; check: backends against the reference")
args = parser.parse_args()
if args.command == "check":
    sys.exit(0 if check() else 1)
show_config()
