"""fastattn: fused masked attention kernels for PyTorch behind torch's SDPA signature."""

from . import backends, nn, reference
from .functional import scaled_dot_product_attention, varlen_attention
from .kvcache import kvcache_attention
from .masks import Mask
from .nn import MultiheadAttention, replace_attention
from .params import AttnParams

__version__ = "0.1.0"

__all__ = [
    "AttnParams",
    "Mask",
    "MultiheadAttention",
    "backends",
    "kvcache_attention",
    "nn",
    "reference",
    "replace_attention",
    "scaled_dot_product_attention",
    "varlen_attention",
    "__version__",
]
