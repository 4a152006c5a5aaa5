import os
import sys

import pytest

# Triton runs on CPU tensors only through its interpreter, which must be switched on before
# triton is first imported; on a machine with a GPU the real compiler is used.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(__file__))  # tests/scan_cases.py


try:  # the GPU machine has no wfdb: the tests marked wfdb skip there instead of failing
    import wfdb  # noqa: F401
    HAVE_WFDB = True
except ImportError:
    HAVE_WFDB = False


def pytest_collection_modifyitems(config, items):
    """Skips the tests marked ``wfdb`` (they read or write WFDB records: QTDB, the ECG task)
    where wfdb is not installed; a test's name plays no part."""
    if HAVE_WFDB:
        return
    skip = pytest.mark.skip(reason="needs wfdb (pip install wfdb) for QTDB records")
    for item in items:
        if item.get_closest_marker("wfdb") is not None:
            item.add_marker(skip)


@pytest.fixture
def cpp_extension():
    """For the cpp suites: a visible skip without the compiled extension, a failure with
    SRNN_FAST_REQUIRE_CPP=1 (CI), never a suite that passes by comparing nothing."""
    from scan_cases import require_cpp

    require_cpp()
