"""The dropout seed that the Triton and CUDA backends share (no triton import: the CUDA backend needs it too).

The contract it belongs to is stated in ``fastattn/backends/triton/dropout.py`` (Triton's ``tl.rand``) and
implemented bit for bit for the CUDA kernels in ``csrc/cuda/dropout.cuh``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["philox_seed_offset"]


def philox_seed_offset(device: torch.device | str) -> Tensor:
    """``[seed, offset]`` (int64, on ``device``) drawn from torch's default generator of the device."""
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)
