"""Low-bit weights and attention for kino's transformers (issue 6): formats, QuantLinear, the
per-architecture policy, in-place quantization, kino's pre-quantized checkpoint format, streaming
quantized loading, and FP8 attention. See each module's docstring for its contract."""

from .apply import QuantReport, quantize_module
from .attention import install_lowbit_attention, sdpa_lowbit, uninstall_lowbit_attention
from .formats import MODES, QuantMode
from .linear import QuantLinear
from .peak import PeakRss, measure_peak_rss
from .policy import WAN_T2V_POLICY, QuantPolicy, policy_for
from .store import is_quantized, load_quantized_transformer, quantize_checkpoint, read_manifest, save_quantized
from .stream import stream_quantize

__all__ = [
    "MODES",
    "PeakRss",
    "QuantLinear",
    "QuantMode",
    "QuantPolicy",
    "QuantReport",
    "WAN_T2V_POLICY",
    "install_lowbit_attention",
    "is_quantized",
    "load_quantized_transformer",
    "measure_peak_rss",
    "policy_for",
    "quantize_checkpoint",
    "quantize_module",
    "read_manifest",
    "save_quantized",
    "sdpa_lowbit",
    "stream_quantize",
    "uninstall_lowbit_attention",
]
