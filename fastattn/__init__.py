"""fastattn: fused masked attention kernels for PyTorch behind torch's SDPA signature."""

from . import backends, nn, reference
from .functional import scaled_dot_product_attention
from .masks import Mask, MaskSpec
from .nn import MultiheadAttention, replace_attention

__version__ = "0.1.0"

__all__ = [
    "Mask",
    "MaskSpec",
    "MultiheadAttention",
    "backends",
    "nn",
    "reference",
    "replace_attention",
    "scaled_dot_product_attention",
    "__version__",
]
