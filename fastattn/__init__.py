"""fastattn: fused masked attention kernels for PyTorch behind torch's SDPA signature."""

from . import backends, reference
from .functional import scaled_dot_product_attention
from .masks import Mask, MaskSpec

__version__ = "0.1.0"

__all__ = ["Mask", "MaskSpec", "backends", "reference", "scaled_dot_product_attention", "__version__"]
