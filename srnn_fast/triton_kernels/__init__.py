"""The "triton" backend of srnn_fast: fused forward and backward scan kernels in Triton.

Importing this needs triton (an optional dependency; it comes with CUDA builds of torch).
The kernels run on CUDA tensors, or on CPU tensors through Triton's interpreter when
TRITON_INTERPRET=1 is set before triton is first imported (for tests).
"""
from .ops import scan_bwd, scan_fwd

__all__ = ["scan_fwd", "scan_bwd"]
