"""python -m srnn_fast: prints this installation's versions, backends, CPU kernels and data
folder (srnn_fast.show_config()), the text to include in a bug report."""
from . import show_config

show_config()
