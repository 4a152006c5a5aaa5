import os
import sys

# Triton runs on CPU tensors only through its interpreter, which must be switched on before
# triton is first imported; on a machine with a GPU the real compiler is used.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(__file__))  # tests/scan_cases.py
