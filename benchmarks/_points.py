"""Benchmark points: the grid, each mask kind as tensors, and the FLOP count of a point.

A point is one attention shape with one mask; every backend is timed on the same inputs and the
same mask. Mask kinds (``--masks``), each combinable with ``causal``:

* ``none``: no mask (causal or not).
* ``padding``: key padding, a boolean ``(B, 1, 1, Lk)`` mask; batch element ``b`` keeps its first
  ``round(Lk * (1 - 0.5 * (b + 0.5) / B))`` keys (between half and all of them).
* ``boolean``: block-sparse boolean ``(1, 1, Lq, Lk)``: ``block`` x ``block`` tiles kept with
  probability ``density`` (seeded), plus the diagonal tiles so that no row is empty.
* ``window``: sliding window of ``window`` keys: ``window=(W - 1, 0)`` with causal (Mistral's), the
  symmetric ``(W // 2, W // 2)`` without.

``causal`` is the ``none`` kind with ``causal=True`` (an alias on the command line).

FLOPs follow ``shared/NOTES.md`` (FlashAttention's convention): forward ``4·B·H·Lq·Lk·D``, halved
when causal; backward 2.5x forward, fwd+bwd 3.5x. A masked point (padding, boolean, window)
counts only the (query, key) pairs that take part: ``4·D·pairs``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import Tensor

from fastattn.variants import allowed as band_allowed

MODES = ("fwd", "bwd", "fwd+bwd")
MASKS = ("none", "padding", "boolean", "window")
MASK_ALIASES = {"causal": ("none", True), "sliding": ("window", None), "sliding_window": ("window", None)}
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}


@dataclass(frozen=True)
class Shape:
    """One attention problem and its mask (everything but the backend and the mode)."""

    dtype: str
    batch: int
    heads: int
    seqlen: int
    seqlen_k: int
    head_dim: int
    causal: bool
    mask: str
    window: int = 256
    block: int = 64
    density: float = 0.1

    def asdict(self) -> dict:
        return asdict(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def label(self) -> str:
        mask = self.mask + ("+causal" if self.causal else "")
        return (
            f"{self.dtype} B={self.batch} H={self.heads} L={self.seqlen}"
            + (f" Lk={self.seqlen_k}" if self.seqlen_k != self.seqlen else "")
            + f" D={self.head_dim} {mask}"
        )


def parse_dtype(name: str) -> str:
    name = DTYPE_ALIASES.get(name.strip(), name.strip())
    if name not in DTYPES:
        raise ValueError(f"--dtypes: expected names from {sorted(DTYPES) + sorted(DTYPE_ALIASES)}, got {name!r}")
    return name


def parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on", "causal"):
        return True
    if t in ("0", "false", "no", "off", "none"):
        return False
    raise ValueError(f"--causal: expected true/false values, got {text!r}")


def mask_kinds(names: list[str], causal_values: list[bool]) -> list[tuple[str, bool]]:
    """``(mask, causal)`` pairs for ``--masks`` x ``--causal``, with ``causal`` as an alias, no duplicates."""
    out: list[tuple[str, bool]] = []
    for name in names:
        name = name.strip()
        kind, forced = MASK_ALIASES.get(name, (name, None))
        if kind not in MASKS:
            raise ValueError(f"--masks: expected names from {list(MASKS) + list(MASK_ALIASES)}, got {name!r}")
        for causal in [forced] if forced is not None else causal_values:
            if (kind, causal) not in out:
                out.append((kind, causal))
    return out


def grid(
    *,
    dtypes: list[str],
    seqlens: list[int],
    head_dims: list[int],
    masks: list[tuple[str, bool]],
    tokens: int,
    batch: Optional[int],
    heads: Optional[int],
    hidden: int,
    seqlen_k: Optional[int] = None,
    window: int = 256,
    block: int = 64,
    density: float = 0.1,
) -> list[Shape]:
    """Every shape of the product, with batch ``tokens // L`` (at least 1) unless given, and heads
    ``hidden // D`` unless given (FlashAttention's convention: B·L = 16k tokens, hidden 2048)."""
    shapes = []
    for dtype, d, (mask, causal), length in itertools.product(dtypes, head_dims, masks, seqlens):
        b = batch if batch is not None else max(1, tokens // length)
        h = heads if heads is not None else max(1, hidden // d)
        shapes.append(
            Shape(dtype, b, h, length, seqlen_k or length, d, causal, mask, window=window, block=block, density=density)
        )
    return shapes


@dataclass
class MaskInputs:
    """A shape's mask in every form the backends take; built once per shape, outside timing."""

    causal: bool
    window: Optional[tuple[int, int]]
    tensor: Optional[Tensor]  # bool, broadcastable to (B, H, Lq, Lk): (B, 1, 1, Lk) or (1, 1, Lq, Lk)
    valid_len: Optional[Tensor]  # padding: (B,) int64, keys kept per batch element
    dense2d: Optional[Tensor]  # boolean kind: (Lq, Lk) bool

    @property
    def bounds(self) -> tuple[int, int]:
        """``(left, right)`` of causal and window together, -1 unbounded (as ``AttnParams.bounds``)."""
        left, right = self.window or (-1, -1)
        if self.causal:
            right = 0 if right < 0 else min(right, 0)
        return left, right

    def fastattn_kwargs(self) -> dict:
        return {"attn_mask": self.tensor, "is_causal": self.causal, "window": self.window}

    def band(self, seqlen_q: int, seqlen_k: int, device) -> Tensor:
        left, right = self.bounds
        return band_allowed(seqlen_q, seqlen_k, left, right, 0, 0, device)

    def dense(self, seqlen_q: int, seqlen_k: int, device) -> Optional[Tensor]:
        """One boolean mask with causal and window folded in, ``(B|1, 1, Lq, Lk)``, for torch SDPA
        (which refuses ``attn_mask`` with ``is_causal``); None when ``is_causal`` alone says it."""
        if self.tensor is None and self.window is None:
            return None
        allowed = self.band(seqlen_q, seqlen_k, device).view(1, 1, seqlen_q, seqlen_k)
        if self.tensor is not None:
            allowed = allowed & self.tensor
        return allowed.contiguous()


def padding_lengths(batch: int, seqlen_k: int) -> list[int]:
    return [max(1, round(seqlen_k * (1.0 - 0.5 * (b + 0.5) / batch))) for b in range(batch)]


def block_sparse(seqlen_q: int, seqlen_k: int, block: int, density: float, seed: int = 0) -> Tensor:
    """``(Lq, Lk)`` bool: ``block``-sized tiles kept with probability ``density``, plus the diagonal."""
    gen = torch.Generator().manual_seed(seed)
    nq, nk = math.ceil(seqlen_q / block), math.ceil(seqlen_k / block)
    tiles = torch.rand(nq, nk, generator=gen) < density
    diag = torch.arange(nq).unsqueeze(1) * nk // max(nq, 1) == torch.arange(nk).unsqueeze(0)
    tiles |= diag
    # (nq, nk) → (nq·block, nk·block) → cropped to (Lq, Lk)
    full = tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return full[:seqlen_q, :seqlen_k].contiguous()


def window_pair(shape: Shape) -> tuple[int, int]:
    w = shape.window
    return (w - 1, 0) if shape.causal else (w // 2, w // 2)


def build_mask(shape: Shape, device) -> MaskInputs:
    """The shape's mask on ``device`` (deterministic: the same mask for every backend and run)."""
    lq, lk = shape.seqlen, shape.seqlen_k
    window = tensor = valid = dense2d = None
    if shape.mask == "window":
        window = window_pair(shape)
    elif shape.mask == "padding":
        valid = torch.tensor(padding_lengths(shape.batch, lk), dtype=torch.int64)
        # (B, 1, 1, Lk): key j of batch b takes part iff j < valid[b]
        tensor = (torch.arange(lk).view(1, lk) < valid.view(-1, 1)).view(shape.batch, 1, 1, lk).to(device)
        valid = valid.to(device)
    elif shape.mask == "boolean":
        dense2d = block_sparse(lq, lk, shape.block, shape.density).to(device)
        tensor = dense2d.view(1, 1, lq, lk)
    elif shape.mask != "none":
        raise ValueError(f"mask: expected one of {MASKS}, got {shape.mask!r}")
    return MaskInputs(shape.causal, window, tensor, valid, dense2d)


def attended_pairs(shape: Shape, maskin: MaskInputs) -> int:
    """(query, key) pairs that take part, summed over batch and heads; equal to
    ``AttnParams.attended_pairs`` but summed over the mask's own (broadcast) size, never B·H·Lq·Lk."""
    allowed = maskin.band(shape.seqlen, shape.seqlen_k, "cpu").view(1, 1, shape.seqlen, shape.seqlen_k)
    if maskin.tensor is not None:
        allowed = allowed & maskin.tensor.cpu()
    bm, hm = allowed.shape[0], allowed.shape[1]
    return int(allowed.sum()) * (shape.batch // bm) * (shape.heads // hm)


def forward_flops(shape: Shape, pairs: Optional[int] = None) -> float:
    """Forward FLOPs (NOTES.md): dense ``4·B·H·Lq·Lk·D`` (halved when causal), masked ``4·D·pairs``."""
    if shape.mask == "none":
        dense = 4.0 * shape.batch * shape.heads * shape.seqlen * shape.seqlen_k * shape.head_dim
        return dense * (0.5 if shape.causal else 1.0)
    if pairs is None:
        raise ValueError(f"forward_flops: mask {shape.mask!r} needs the attended pair count")
    return 4.0 * shape.head_dim * pairs


def flops(shape: Shape, mode: str, pairs: Optional[int] = None) -> float:
    if mode not in MODE_FACTOR:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    return forward_flops(shape, pairs) * MODE_FACTOR[mode]
