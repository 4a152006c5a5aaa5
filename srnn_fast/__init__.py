"""srnn_fast: adaptive spiking recurrent neural networks with fused whole-sequence kernels."""
from ._checks import SRNNState
from ._config import show_config
from .selfcheck import check
from .modules import AdaptiveSRNN, SRNNLayer
from .scan import BackendUnavailableError, available_backends, cpu_capability, srnn_scan

__all__ = ["SRNNState", "SRNNLayer", "AdaptiveSRNN", "srnn_scan", "available_backends",
           "BackendUnavailableError", "cpu_capability", "show_config", "check"]
__version__ = "0.1.0"
