"""Loads the compiled extension (srnn_fast._C), which registers the ``srnn_fast::`` ops
with TORCH_LIBRARY, and gives those ops their fake (meta) implementations for
torch.compile. Importing this never fails: a missing extension is recorded in
EXTENSION_ERROR and reported by the backends that need it."""
from __future__ import annotations

try:
    from . import _C  # noqa: F401  (importing registers torch.ops.srnn_fast.*)
except ImportError as e:  # not built, or built against another torch
    EXTENSION_ERROR = f"{type(e).__name__}: {e}"
else:
    EXTENSION_ERROR = None
