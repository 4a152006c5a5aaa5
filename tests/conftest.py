import os
import sys

# Triton runs on CPU tensors only through its interpreter, which must be switched on before
# triton is first imported; on a machine with a GPU the real compiler is used.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(__file__))  # tests/scan_cases.py

import pytest  # noqa: E402


@pytest.fixture
def cpp_extension():
    """For the cpp suites: a visible skip without the compiled extension, a failure with
    SRNN_FAST_REQUIRE_CPP=1 (CI), never a suite that passes by comparing nothing."""
    from scan_cases import require_cpp

    require_cpp()


try:  # the GPU machine has no wfdb: QTDB/ECG tests skip there instead of failing
    import wfdb  # noqa: F401
    HAVE_WFDB = True
except ImportError:
    HAVE_WFDB = False

_NEEDS_WFDB = ("ecg", "qtdb", "wfdb", "label_rule", "split_by_record", "resume_is_bit_exact")


def pytest_collection_modifyitems(config, items):
    if HAVE_WFDB:
        return
    import pytest

    skip = pytest.mark.skip(reason="needs wfdb (pip install wfdb) for QTDB records")
    for item in items:
        if any(k in item.nodeid.lower() for k in _NEEDS_WFDB):
            item.add_marker(skip)
