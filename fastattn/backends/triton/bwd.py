"""Triton backward of ``backend="triton"``: delta preprocess, a dK/dV pass and a dQ pass.

Design note
-----------
Math (per query head ``h``, kv head ``g = h // group``; ``P`` recomputed from the saved lse, never stored)::

    S  = scale * Q K^T + bias,   P = exp(S - lse)        (masked / out-of-range -> 0; lse = -inf -> 0)
    delta = rowsum(dO * O)                                (preprocess; includes dropout, as O does)
    dV = (P * Z)^T dO,           dP = (dO V^T) * Z        (Z = keep / (1 - p), 1 without dropout)
    dS = P * (dP - delta),       dQ = scale * dS K,  dK = scale * dS^T Q,  dbias = dS

Three kernels, one name each through every layer:

* ``_attn_bwd_preprocess_kernel``: ``delta`` (fp32, ``(B, Hq, Lq)``), one program per query tile.
* ``_attn_bwd_dkdv_kernel``: one program per (key tile, batch, kv head). The K/V tile and the dK/dV
  accumulators stay in registers while the query tiles that see this key tile stream past, for each
  query head of the GQA group in a fixed order. The group's reduction therefore happens in registers,
  in the same order every run: deterministic, no atomics, no repeated K/V.
* ``_attn_bwd_dq_kernel``: one program per (query tile, batch, query head); Q, dO, lse and delta stay
  resident while the non-empty key tiles stream past. A second pass instead of FlashAttention-2's atomic
  dQ accumulation: it recomputes ``QK^T`` and ``dO V^T`` (2 extra matmuls) but is deterministic. It also
  writes ``dS`` to the bias gradient when (and only when) a float mask requires grad: that ``(B, Hq, Lq,
  Lk)`` tensor is the one Lq x Lk allocation of the backend, and every element of it is written (the
  empty tiles with zeros).

Tile skipping is the forward's: the dQ pass walks ``TileSummary.kv_index`` (non-empty key tiles of its
query tile); the dK/dV pass walks the transposed lists (non-empty query tiles of its key tile), built by
``_transposed_lists`` from the summary's tile states, never from a dense mask. Band-only specs use the
same (analytic, tiny) summary. FULL tiles skip the boolean mask load; the band and sequence-end bounds
are still applied (a few integer compares per element).

FLOPs (FlashAttention's convention, what benchmarks report): backward = 2.5 x forward =
``10 * B * Hq * Lq * Lk * D`` (halved by causal), the 5 matmuls of a one-pass backward. The two-pass
schedule executes 7 (``QK^T`` and ``dO V^T`` in both passes), 1.4 x the reported count: the price of
determinism without atomics.
Minimum bytes (``e`` = element size): read Q, O, dO, K, V, lse and write dQ, dK, dV once:
``e * (B*Hq*Lq*(2D + 2Dv) + B*Hkv*Lk*(2D + 2Dv)) + 12 * B*Hq*Lq`` (lse, delta written and read), plus a
mask tensor's own size (broadcast dims stored once) and, only when asked, the ``e * B*Hq*Lq*Lk`` bias
gradient. Each pass re-reads its streamed operand once per resident tile (Q/dO ``Lk / BLOCK_N`` times,
K/V ``Lq / BLOCK_M`` times), mostly from L2; per streamed byte a tile does ~``BLOCK`` FLOPs.
Bound: for L >= ~1k the FLOP/byte ratio at minimum traffic is ~``L`` (hundreds to thousands), far above
an H100's ~300 FLOP/byte ridge: **compute bound** (tensor cores; target: at least FA2's ~322 TFLOP/s at
D = 128). Short sequences are bound by launch overhead and the lse/delta/summary reads. With a bias
gradient, the ``Lq x Lk`` write makes it memory bound (2 bytes per 10 D FLOPs in 16-bit).

Registers (what made the first version spill on every bf16 d64/d128 GPU variant, 0.5-12 KB):

* The dK/dV pass forms ``Sᵀ = K Qᵀ`` and ``dPᵀ = V dOᵀ`` (keys are rows) instead of ``S = Q Kᵀ``:
  ``Pᵀ``/``dSᵀ`` then enter ``dV += Pᵀ dO`` and ``dK += dSᵀ Q`` as the left operand in the layout the
  matmul produced; transposing a computed tile costs a shared-memory round trip and its registers.
  ``Qᵀ`` is loaded transposed from memory; masks, band and dropout are built in ``(key, query)``
  shape directly (``_probs_tile(KEY_ROWS=True)``, ``allowed_t``, ``dropout_keep_t``: the same numbers).
* Head dims are ``tl.constexpr`` (as in the forward) and the launcher passes rows with a unit last
  stride only (other layouts are copied), so the kernels take no head-dim strides: column masks are
  known to be uniform over vectors and loads/stores are 16 bytes wide. The first version's spill
  figures came from compiling it with a runtime head dim and head-dim strides, which makes every
  access scalar (one 64-bit address per element); a real launch specialises a stride of 1 and a head
  dim divisible by 16, so they overstated it. At unit strides the transposed form above still
  removed spills (sm_80 bf16 d64 32x128, 8 warps: 48 B to 0).
* Blocks and warps per (arch, fp32 or not, padded head dim, mask tensor/dropout or not) come from
  ``bwd_config``: the first spill-free entry of a preference order, found with ``fastattn
  compile-check`` (which compiles exactly these variants on every run of ``make test``). Typical
  (Triton 3.8, bf16, no mask; dK/dV ``BLOCK_M x BLOCK_N``, dQ ``BLOCK_M x BLOCK_N``, 8 warps):
  sm_90 d64 64x128 / 128x64, d128 32x128 / 128x64 (wgmma); sm_80 d64 32x128 / 128x64, d128 32x64 /
  128x32 (mma.sync). A mask tensor or dropout (a mask tile and Philox draws per score) takes
  narrower tiles. Not autotuned: the tile summary depends on the blocks, and nothing has timed
  alternatives on a GPU yet.

Under ``TRITON_INTERPRET=1`` one fixed block is used (32, or 64 above 512 keys: the interpreter's cost
is per tile). Sequence lengths and the scale are runtime arguments, never ``tl.constexpr``. fp32 uses
TF32 only where torch allows it; float64 (for gradcheck) accumulates in float64.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...masks import TileSummary
from ...params import AttnParams, VariantScalars
from .._varlen import num_programs, tile_schedule
from ..registry import fake_backward, op_layout, op_scalars, packed_empty
from ._common import (
    SCORE_ALIBI,
    SCORE_GRAD,
    TILE_FULL,
    TILE_PARTIAL,
    allowed,
    allowed_t,
    apply_tensor_mask,
    key_tile_range,
    load_tensor_mask,
    packed_entry,
    query_tile_range,
    score_args,
    score_grad,
    score_mod,
)
from .dropout import dropout_keep, dropout_keep_t
from .fwd import _arch, _arch_key, _last_dim_contiguous, _pow2_dim, call_families, has_variants, is_heavy
from .tuning import family, lookup

__all__ = [
    "attn_bwd",
    "attn_bwd_debug",
    "triton_attn_bwd",
    "block_sizes",
    "bwd_config",
    "fallback_reason",
    "INTERPRET_BLOCKS",
]

# Under TRITON_INTERPRET=1 one fixed block: the interpreter's cost is per numpy op (the forward's too).
INTERPRET_BLOCKS = (32, 32, 32, 32)
INTERPRET_BLOCKS_LONG = (64, 64, 64, 64)


def bwd_config(
    head_dim: int,
    head_dim_v: int,
    dtype: torch.dtype,
    arch: Optional[int],
    heavy: bool = False,
    fam: Optional[str] = None,
    packed: bool = False,
) -> Optional[tuple[tuple[int, int, int, int], tuple[int, int, int, int]]]:
    """``((BLOCK_M, BLOCK_N, num_warps, num_stages) of dK/dV, (the same) of dQ)`` for one variant, or None
    where no spill-free config exists (sm_75 beyond fp16 at head dims <= 64: the backend's backward then
    runs the reference backward, see ``fallback_reason``). sm_86/sm_89 (99 KB of shared memory per block)
    take ``_BWD_CONFIGS_99KB`` where sm_80's entry needs more.

    ``arch`` is the compute capability (e.g. 90, 89, 86, 80, 75; None = the interpreter: one fixed 32 x 32
    tile); ``heavy``: a mask tensor or dropout. The dK/dV pass keeps ``BLOCK_N`` keys resident and streams
    ``BLOCK_M`` query rows, the dQ pass the reverse. Each entry is the first spill-free choice, in an
    order of preference (large resident tiles first; tensor-core MMA kept: wgmma on sm_90 wherever the
    tile has the 64 rows it needs), that ``fastattn compile-check`` found clean under both Triton 3.8's
    and 3.6's ptxas; the check compiles exactly these. Head dims below their padded size take
    ``_BWD_CONFIGS_PARTIAL_DIM`` where it has an entry. Not autotuned per call (the tile summary depends
    on the blocks): ``fam`` (the launch's ``tuning.family``) selects a config timed on a GPU by
    ``benchmarks/tune.py`` where the tuned table for this arch and Triton version has one. fp16 and bf16
    share entries. ``fam == VARIANTS_FAMILY`` (a launch with a variant: heavy, nothing timed yet) takes
    ``_BWD_VARIANT_CONFIGS`` where the heavy entry spills with the variants. ``packed`` (a ``varlen_attention``
    launch: no tuned entries, which were timed and checked on the dense kernels only) takes
    ``_BWD_PACKED_CONFIGS`` where the dense choice spills with ``PACKED``.
    """
    d = max(_pow2_dim(head_dim), _pow2_dim(head_dim_v))
    variants = fam == VARIANTS_FAMILY
    fam = fam if fam is not None else ("mask" if heavy else "none")
    tuned = None if variants or packed else lookup("bwd", arch, dtype, d, fam)
    if tuned is not None:
        return tuned
    if arch is None:
        return (32, 32, 4, 1), (32, 32, 4, 1)
    if dtype == torch.float64:  # gradcheck only; no tensor cores, never compile-checked
        return (16, 32, 4, 1), (32, 16, 4, 1)
    packed_key = (_arch_key(arch), dtype == torch.float32, d, heavy or variants)
    if packed and packed_key in _BWD_PACKED_CONFIGS:
        return _BWD_PACKED_CONFIGS[packed_key]
    if variants and (_arch_key(arch), dtype == torch.float32, d) in _BWD_VARIANT_CONFIGS:
        return _BWD_VARIANT_CONFIGS[(_arch_key(arch), dtype == torch.float32, d)]
    family = 90 if arch >= 90 else (80 if arch >= 80 else 75)
    key = (family, dtype == torch.float32, d, heavy)
    if 80 < arch < 90 and key[1:] in _BWD_CONFIGS_99KB:  # sm_86/sm_89: 99 KB of shared memory per block
        return _BWD_CONFIGS_99KB[key[1:]]
    partial = head_dim != _pow2_dim(head_dim) or head_dim_v != _pow2_dim(head_dim_v)
    if partial and key in _BWD_CONFIGS_PARTIAL_DIM:
        return _BWD_CONFIGS_PARTIAL_DIM[key]
    return _BWD_CONFIGS.get(key)


# The family of a launch with a variant (softcap, ALiBi, chunk: ``fwd.has_variants``): heavy tiles, no tuned
# entries, and these where the heavy ones spill with every variant on (``fastattn compile-check``'s
# "+variants" builds under Triton 3.8 and 3.6: sm_90 checked with 3.6, the GPU image's, in ``make gpu-preflight``;
# sm_75/80/86 with 3.6 by hand on 2026-12-05, which moved the d16/d32 sm_75, d32/d64 sm_80 and d64 sm_86 entries).
# (arch: 90, 86 for sm_86/89, 80, 75; fp32; padded head dim).
VARIANTS_FAMILY = "variants"
# fmt: off
_BWD_VARIANT_CONFIGS: dict = {
    (75, False,  16): ((16, 64, 8, 1), (64, 32, 8, 1)),
    (75, False,  32): ((32, 32, 8, 1), (64, 32, 8, 1)),
    (80, False,  32): ((16, 128, 8, 1), (128, 32, 8, 2)),
    (80, False,  64): ((16, 64, 8, 1), (128, 32, 8, 2)),
    (80, False, 128): ((16, 32, 4, 2), (64, 32, 8, 2)),
    (80, True ,  16): ((32, 128, 8, 1), (128, 64, 8, 1)),
    (80, True , 128): ((16, 32, 8, 2), (64, 32, 8, 2)),
    (86, False,  64): ((16, 128, 8, 1), (128, 32, 8, 2)),
    (86, True ,  64): ((16, 64, 8, 1), (32, 64, 4, 1)),
    (90, False,  64): ((16, 128, 8, 2), (128, 32, 8, 2)),
    (90, False, 256): ((32, 32, 8, 1), (64, 16, 8, 2)),
    (90, True ,  16): ((32, 128, 8, 2), (128, 32, 8, 2)),
    (90, True ,  32): ((16, 128, 8, 2), (128, 32, 8, 2)),
    (90, True ,  64): ((16, 64, 8, 1), (64, 32, 8, 2)),
    (90, True , 256): ((16, 16, 8, 1), (32, 32, 8, 2)),
}
# fmt: on

# Packed launches (``PACKED``: the sequence's bounds from the offsets and the schedule stay live through the tile
# loop) where the dense choice spills (``fastattn compile-check --packed``, Triton 3.8 and 3.6): (arch: 90, 86 for
# sm_86/89, 80; fp32; padded head dim; heavy or with a variant). The light key serves none/causal/window, the
# heavy one mask-free dropout and every variant, as the two packed builds of compile-check stand for them. Each is
# a clean config near the dense one (fewer stages, then a shorter streamed tile, then a shorter resident one; a
# later one where the first clean one sat at 252-255 registers); the comments say what the dense choice spilled
# (Triton 3.8; "3.6:" where only Triton 3.6 spilled it) and, in brackets, a nearer candidate that spilled under
# 3.6. The d16/d32 "3.6:" entries are from ``compile-check --packed --head-dims 16,32`` under Triton 3.6 (the GPU
# image's), which spilled 8-56 B in 21 of its 36 builds at sm_80/86/90 with the dense choices; the default run
# compiles packed builds at head dim 128 only, so ``make gpu-preflight`` had not seen them.
# fmt: off
_BWD_PACKED_CONFIGS: dict = {
    (80, False,  16, False): ((64, 128, 8, 1), (128, 64, 8, 2)),  # 3.6: dense 2 stages: 16 B
    (80, False,  16, True ): ((16, 128, 8, 2), (128, 64, 8, 2)),  # 3.6: dense 32x128: 16 B (1 stage: 168 B)
    (80, False,  32, False): ((32, 128, 8, 1), (128, 64, 8, 2)),  # 3.6: dense 2 stages: 8 B
    (80, False,  32, True ): ((16, 128, 8, 1), (128, 32, 8, 2)),  # dense 32x128: 392 B
    (80, False,  64, False): ((16, 128, 8, 1), (128, 64, 8, 2)),  # dense 32x128: 24 B
    (80, False,  64, True ): ((16, 32, 8, 1), (128, 32, 8, 2)),   # dense 16x128: 136 B, 16x64: 32 B
    (80, False, 256, False): ((16, 32, 8, 2), (64, 64, 8, 2)),    # dense 16x64: 40 B
    (80, False, 256, True ): ((16, 16, 8, 1), (32, 32, 4, 2)),    # dense 4 warps: 48 B
    (80, True ,  16, False): ((32, 128, 8, 1), (128, 64, 8, 2)),  # 3.6: dense 2 stages: 16 B
    (80, True ,  16, True ): ((16, 128, 8, 1), (128, 64, 8, 1)),  # dense 32x128: 336 B
    (80, True ,  32, False): ((32, 128, 8, 1), (128, 32, 8, 2)),  # 3.6: dense 2 stages: 32 B
    (80, True ,  32, True ): ((16, 64, 8, 1), (128, 32, 8, 2)),   # 3.6: dense 16x128: 16 B (16x64 x2: 24 B)
    (80, True ,  64, False): ((16, 128, 8, 1), (128, 32, 8, 2)),  # dense 2 stages: 8 B (16x64 x2: 40 B, 3.6)
    (80, True , 128, False): ((32, 32, 8, 1), (64, 32, 8, 1)),    # dense 32x64: 56-64 B, dQ 4 warps: 8 B
    (80, True , 128, True ): ((16, 32, 8, 2), (32, 32, 8, 2)),    # dense dQ 64x32: 8 B (64x16 x2: 16 B, 3.6)
    (80, True , 256, False): ((16, 16, 8, 1), (32, 32, 8, 2)),    # dense 4 warps: 16 B
    (86, False,  16, False): ((64, 128, 8, 1), (128, 64, 8, 2)),  # 3.6: dense 2 stages: 24 B
    (86, False,  32, False): ((32, 128, 8, 1), (128, 64, 8, 2)),  # 3.6: dense 2 stages: 16 B
    (86, False,  32, True ): ((16, 128, 8, 1), (128, 32, 8, 2)),  # dense 32x128: 288 B
    (86, False,  64, False): ((16, 128, 8, 1), (128, 64, 8, 2)),  # dense 32x128: 8 B
    (86, False,  64, True ): ((16, 32, 8, 1), (128, 32, 8, 2)),   # variants' 16x128: 56 B (16x64: 8 B; 3.6: x2: 16 B)
    (86, False, 256, False): ((16, 32, 8, 2), (32, 32, 4, 2)),    # dense 16x64: 32 B
    (86, True ,  16, False): ((32, 128, 8, 1), (128, 64, 8, 2)),  # 3.6: dense 2 stages: 32 B
    (86, True ,  16, True ): ((16, 128, 8, 1), (128, 64, 8, 2)),  # dense 32x128: 256 B
    (86, True ,  32, False): ((32, 128, 8, 1), (128, 32, 8, 2)),  # 3.6: dense 2 stages: 40 B
    (86, True ,  32, True ): ((16, 32, 8, 1), (128, 32, 8, 2)),   # dense 16x128: 8 B (16x64: 16 B, 3.6)
    (86, True ,  64, False): ((16, 64, 8, 1), (128, 32, 8, 2)),   # dense 16x128: 16 B (16x64 x2: 40 B, 3.6)
    (86, True ,  64, True ): ((16, 32, 8, 1), (32, 64, 4, 1)),    # dense 16x64: 8 B
    (86, True , 128, True ): ((16, 32, 8, 1), (32, 32, 4, 2)),    # dense 16x64: 64-72 B
    (90, False,  16, False): ((64, 128, 8, 1), (128, 64, 8, 2)),  # 3.6: dense 2 stages: 24 B
    (90, False,  32, False): ((64, 128, 8, 1), (128, 64, 8, 2)),  # 3.6: dense 2 stages: 56 B
    (90, False,  32, True ): ((16, 128, 8, 2), (128, 64, 8, 2)),  # 3.6: dense 32x128: 16 B (1 stage: 152 B)
    (90, False,  64, False): ((32, 128, 8, 1), (128, 64, 8, 2)),  # dense 64x128: 32 B (2 stages: 8 B, 3.6)
    (90, False, 128, False): ((16, 128, 8, 2), (128, 64, 8, 2)),  # dense 32x128: 32 B
    (90, False, 128, True ): ((16, 32, 8, 2), (128, 32, 8, 2)),   # 3.6: dense 16x64: 32 B (1 stage: 160 B)
    (90, False, 256, False): ((16, 32, 8, 2), (128, 16, 8, 2)),   # dense 16x64: 112 B, dQ 128x32: 8 B
    (90, False, 256, True ): ((16, 16, 8, 1), (64, 16, 8, 2)),    # 3.6: dense 32x32: 56 B (16x32: 8 B)
    (90, True ,  16, False): ((32, 128, 8, 2), (128, 64, 8, 2)),  # 3.6: dense 64x128: 32 B (1 stage: 255 registers)
    (90, True ,  16, True ): ((16, 128, 8, 2), (128, 32, 8, 2)),  # 3.6: dense 32x128: 24 B (1 stage: 240 B)
    (90, True ,  32, False): ((32, 128, 8, 1), (128, 64, 8, 2)),  # dense 64x128: 80 B
    (90, True ,  64, False): ((16, 128, 8, 2), (128, 64, 8, 2)),  # dense 32x128: 8 B
    (90, True ,  64, True ): ((16, 32, 8, 1), (64, 32, 8, 2)),    # dense 16x128: 112 B (16x64: 72 B, 3.6)
}
# fmt: on

# From ``fastattn compile-check`` with Triton 3.8 and 3.6 (spill-free under both: see ``bwd_config``); sm_75
# has entries only where a spill-free one exists (fp16, head dims <= 64: Triton's FMA matmuls hold whole rows
# in registers).
# fmt: off
_BWD_CONFIGS: dict = {
    # (arch, fp32, head dim, heavy): ((dK/dV BLOCK_M, BLOCK_N, warps, stages), (dQ ...))
    (90, False,  16, False): ((64, 128, 8, 2), (128, 64, 8, 2)),
    (90, False,  32, False): ((64, 128, 8, 2), (128, 64, 8, 2)),
    (90, False,  64, False): ((64, 128, 8, 2), (128, 64, 8, 2)),
    (90, False, 128, False): ((32, 128, 8, 2), (128, 64, 8, 2)),
    (90, False, 256, False): ((16, 64, 8, 2), (128, 32, 8, 2)),
    (90, False,  16, True ): ((32, 128, 8, 2), (128, 64, 8, 2)),
    (90, False,  32, True ): ((32, 128, 8, 2), (128, 64, 8, 2)),
    (90, False,  64, True ): ((32, 128, 8, 2), (128, 64, 8, 2)),
    (90, False, 128, True ): ((16, 64, 8, 2), (128, 32, 8, 2)),
    (90, False, 256, True ): ((32, 32, 8, 1), (64, 32, 8, 2)),
    (90, True ,  16, False): ((64, 128, 8, 2), (128, 64, 8, 2)),
    (90, True ,  32, False): ((64, 128, 8, 1), (128, 64, 8, 2)),
    (90, True ,  64, False): ((32, 128, 8, 2), (128, 64, 8, 2)),
    (90, True , 128, False): ((16, 32, 4, 2), (128, 32, 8, 2)),
    (90, True , 256, False): ((16, 16, 4, 1), (32, 32, 8, 2)),
    (90, True ,  16, True ): ((32, 128, 8, 2), (128, 32, 8, 2)),
    (90, True ,  32, True ): ((32, 128, 8, 2), (128, 32, 8, 2)),
    (90, True ,  64, True ): ((16, 128, 8, 2), (64, 32, 8, 2)),  # dQ 64x64: 24 B with dropout (3.8)
    (90, True , 128, True ): ((16, 32, 4, 2), (64, 32, 8, 2)),
    (90, True , 256, True ): ((16, 16, 4, 1), (32, 32, 8, 2)),
    (80, False,  16, False): ((64, 128, 8, 2), (128, 64, 8, 2)),
    (80, False,  32, False): ((32, 128, 8, 2), (128, 64, 8, 2)),
    (80, False,  64, False): ((32, 128, 8, 1), (128, 64, 8, 2)),
    (80, False, 128, False): ((32, 64, 8, 2), (128, 32, 8, 2)),
    (80, False, 256, False): ((16, 64, 8, 2), (64, 64, 8, 2)),
    (80, False,  16, True ): ((32, 128, 8, 2), (128, 64, 8, 2)),
    (80, False,  32, True ): ((32, 128, 8, 1), (128, 32, 8, 2)),
    (80, False,  64, True ): ((16, 128, 8, 2), (128, 32, 8, 2)),
    (80, False, 128, True ): ((16, 32, 4, 2), (64, 64, 8, 2)),
    (80, False, 256, True ): ((16, 16, 4, 1), (32, 32, 4, 2)),
    (80, True ,  16, False): ((32, 128, 8, 2), (128, 64, 8, 2)),
    (80, True ,  32, False): ((32, 128, 8, 2), (128, 32, 8, 2)),
    (80, True ,  64, False): ((16, 128, 8, 2), (128, 32, 8, 2)),
    (80, True , 128, False): ((32, 64, 8, 1), (64, 32, 4, 2)),
    (80, True , 256, False): ((16, 16, 4, 1), (32, 32, 8, 2)),
    (80, True ,  16, True ): ((32, 128, 8, 1), (128, 64, 8, 2)),
    (80, True ,  32, True ): ((16, 128, 8, 2), (128, 32, 8, 2)),
    (80, True ,  64, True ): ((16, 32, 8, 1), (128, 32, 8, 2)),
    (80, True , 128, True ): ((16, 64, 8, 2), (64, 32, 8, 2)),
    (80, True , 256, True ): ((16, 16, 8, 2), (16, 16, 4, 1)),
    (75, False,  16, False): ((32, 128, 8, 1), (128, 32, 8, 1)),
    (75, False,  32, False): ((32, 128, 8, 1), (128, 32, 8, 1)),
    (75, False,  64, False): ((16, 64, 8, 1), (32, 32, 8, 1)),
    (75, False,  16, True ): ((32, 64, 8, 1), (64, 64, 8, 1)),
    (75, False,  32, True ): ((16, 64, 8, 1), (128, 32, 8, 1)),
    (75, False,  64, True ): ((16, 16, 4, 1), (32, 32, 8, 1)),
}
# sm_86/sm_89 (99 KB of shared memory per block, against sm_80's 163): the sm_80 entries above that
# need more, or spill with sm_86's ptxas (fastattn compile-check --arch sm_86), replaced by the next
# spill-free candidates.
_BWD_CONFIGS_99KB: dict = {
    # (fp32, head dim, heavy): ((dK/dV ...), (dQ ...))
    (False, 128, True):  ((16, 32, 4, 2), (64, 32, 8, 2)),  # sm_80's dQ 64x64 spills 16 B on sm_86
    (False, 256, False): ((16, 64, 8, 2), (32, 32, 4, 2)),
    (True,   64, True):  ((16, 64, 8, 1), (32, 64, 4, 2)),
    (True,  128, False): ((16, 64, 8, 2), (32, 32, 4, 2)),
    (True,  128, True):  ((16, 64, 8, 1), (32, 32, 4, 2)),
    (True,  256, False): ((16, 16, 4, 1), (16, 16, 4, 1)),
}
# Head dims below their padded size (80 and 96 pad to 128) mask the head dim in every load, which costs
# registers: where the padded dim's dK/dV tile spills for them (Triton 3.6's ptxas, 8-16 bytes), they
# take these, and the padded dim keeps its larger tile.
_BWD_CONFIGS_PARTIAL_DIM: dict = {
    (90, False, 128, False): ((16, 128, 8, 2), (128, 64, 8, 2)),
    (90, False, 128, True):  ((16, 32, 8, 2), (128, 32, 8, 2)),
}
# fmt: on


def block_sizes(
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    max_seqlen: int = 0,
    *,
    head_dim_v: Optional[int] = None,
    heavy: bool = False,
    fam: Optional[str] = None,
    packed: bool = False,
) -> tuple[int, int, int, int]:
    """``(dK/dV BLOCK_M, dK/dV BLOCK_N, dQ BLOCK_M, dQ BLOCK_N)`` for this variant on ``device``.

    Under the interpreter: 32, or 64 for sequences above 512 (its cost is per tile, not per element).
    On a GPU: ``bwd_config``'s blocks.
    """
    arch = _arch(torch.device(device))
    padded = max(_pow2_dim(head_dim), _pow2_dim(head_dim_v or head_dim))
    if arch is None and lookup("bwd", None, dtype, padded, fam or ("mask" if heavy else "none")) is None:
        return INTERPRET_BLOCKS if max_seqlen <= 512 else INTERPRET_BLOCKS_LONG
    config = bwd_config(head_dim, head_dim_v or head_dim, dtype, arch, heavy, fam, packed)
    if config is None:
        raise ValueError(f"head_dim: {_no_config(head_dim, head_dim_v or head_dim, dtype, arch)}")
    (bm1, bn1, _, _), (bm2, bn2, _, _) = config
    return bm1, bn1, bm2, bn2


def _no_config(head_dim: int, head_dim_v: int, dtype: torch.dtype, arch: int) -> str:
    return (
        f"the Triton backward has no spill-free kernel config for sm_{arch}, {dtype}, head dims "
        f"{head_dim}/{head_dim_v} (fastattn compile-check)"
    )


def fallback_reason(params: AttnParams) -> Optional[str]:
    """Why the Triton backward kernels do not run for these inputs (``bwd_config`` is None), or None."""
    arch = _arch(params.device)
    if arch is None:
        return None
    heavy, variants = call_families(params)
    fam = VARIANTS_FAMILY if variants else None
    if bwd_config(params.head_dim, params.head_dim_v, params.dtype, arch, heavy, fam, params.is_packed) is None:
        return _no_config(params.head_dim, params.head_dim_v, params.dtype, arch)
    return None


def _transposed_lists(state: Tensor) -> tuple[Tensor, Tensor]:
    """For each key tile, its non-empty query tiles: ``(q_count (Bm, Hm, nK), q_index (Bm, Hm, nK, nQ))``.

    ``state`` is a summary's ``(Bm, Hm, nQ, nK)`` tile states; the lists are the summary of the
    transposed states (block sizes do not matter to ``from_state``).
    """
    t = TileSummary.from_state(1, 1, state.transpose(-1, -2))
    return t.kv_count, t.kv_index


def _rows(t: Tensor) -> tuple[int, int, int]:
    """Batch, head and row strides of a ``(B, H, L, D)`` tensor whose last dim has unit stride."""
    return t.stride()[:3]


def _bstrides(t: Tensor) -> list[int]:
    """Strides of a summary tensor with 0 on its broadcast (size-1) batch/head dims."""
    return [0 if t.shape[i] == 1 else t.stride(i) for i in range(2)] + list(t.stride())[2:]


@triton.jit
def _attn_bwd_preprocess_kernel(
    o_ptr, do_ptr, delta_ptr,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    heads_q, seqlen_q, head_dim_v,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] in fp32 (contiguous (B, Hq, Lq) output)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // heads_q
    h = pid_bh % heads_q
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    ok = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < head_dim_v)
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=ok, other=0.0)  # fmt: skip
    do = tl.load(
        do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
        mask=ok,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + pid_bh * seqlen_q + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _probs_tile(
    s, lse2, offs_m, offs_n, mask_base, stride_mm, stride_mn, need_mask, seqlen_q, seqlen_k, left, right, q_offset,
    chunk, MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_CHUNK: tl.constexpr,
    KEY_ROWS: tl.constexpr,
):  # fmt: skip
    """``P = exp2(s - lse2)`` of one tile of scores (exp2 domain, after ``_common.score_mod``).

    ``(BLOCK_M, BLOCK_N)`` (the dQ pass), or with ``KEY_ROWS`` the transposed ``(BLOCK_N, BLOCK_M)``: the
    dK/dV pass forms ``Sᵀ = K Qᵀ`` directly, so ``Pᵀ`` and ``dSᵀ`` enter ``dV += Pᵀ dO`` and
    ``dK += dSᵀ Q`` as the left operand in the layout the matmul produced (transposing a computed tile
    costs a shared-memory round trip and its registers). ``lse2`` is ``lse * log2(e)`` with +inf for an
    empty row (lse = -inf) and rows past ``seqlen_q``, so those give 0, never NaN. ``need_mask`` false
    (a FULL tile) skips the mask load.
    """
    if KEY_ROWS:
        ok = allowed_t(offs_m, offs_n, seqlen_k, left, right, q_offset, chunk, HAS_LEFT, HAS_RIGHT, HAS_CHUNK)
        lse2 = lse2[None, :]
    else:
        ok = allowed(offs_m, offs_n, seqlen_k, left, right, q_offset, chunk, HAS_LEFT, HAS_RIGHT, HAS_CHUNK)
        lse2 = lse2[:, None]
    if MASK_KIND == 0:
        s = tl.where(ok, s, float("-inf"))
    else:
        if KEY_ROWS:  # the mask's (key, query) tile: the row/column roles of load_tensor_mask swapped
            tile = load_tensor_mask(
                mask_base, stride_mn, stride_mm, offs_n, offs_m, seqlen_k, seqlen_q, need_mask, MASK_KIND
            )
        else:
            tile = load_tensor_mask(
                mask_base, stride_mm, stride_mn, offs_m, offs_n, seqlen_q, seqlen_k, need_mask, MASK_KIND
            )
        s = apply_tensor_mask(s, ok, tile, 1.4426950408889634, MASK_KIND)
    return tl.exp2(s - lse2)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, Mask, State, QCount, QIndex, Philox, Alibi, CuQ, CuK, Schedule,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh, stride_lm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_sb, stride_sh, stride_sm, stride_sn,
    stride_cb, stride_ch, stride_cn,
    stride_ib, stride_ih, stride_in, stride_im,
    heads_q, heads_kv, group, seqlen_q, seqlen_k, num_seqs, total_q,
    scale, qk_scale2, left, right, q_offset, chunk, score, stride_ab, dropout_p, dropout_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_CHUNK: tl.constexpr,
    SCORE: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC: tl.constexpr, PACKED: tl.constexpr,
):  # fmt: skip
    """dK, dV of one key tile of kv head ``g``: K/V resident, the group's query tiles stream past.

    Works on transposed tiles (``Sᵀ = K Qᵀ``, ``dPᵀ = V dOᵀ``: keys are rows), so that no computed tile
    is ever transposed; Q is loaded as ``Qᵀ`` straight from memory. ``PACKED``: program (schedule entry of a
    sequence's key tile, kv head); the query tiles come from ``query_tile_range`` of that sequence (bottom-right),
    the lengths from ``CuQ``/``CuK`` (``seqlen_*`` arrive as the maxima, the dropout contract's index).
    """
    pid = tl.program_id(0)
    pid_bg = tl.program_id(1).to(tl.int64)
    drop_lq = seqlen_q  # the dropout contract's lengths: the call's (packed: the maxima)
    drop_lk = seqlen_k
    if PACKED:
        # b: the sequence (ALiBi's row and the dropout contract's batch index)
        b, pid_n, row_q, row_k, seqlen_q, seqlen_k = packed_entry(Schedule, CuQ, CuK, pid, num_seqs)
        q_offset = seqlen_k - seqlen_q
        b_mem = 0  # the tensors' batch dim (one row of packed tokens)
        delta_len = total_q
        g = pid_bg
    else:
        pid_n = pid
        b = pid_bg // heads_kv
        b_mem = b
        g = pid_bg % heads_kv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d[None, :] < HEAD_DIM
    dv_ok = offs_dv[None, :] < HEAD_DIM_V
    n_ok = offs_n[:, None] < seqlen_k
    k_rows = offs_n[:, None].to(tl.int64)
    # The dense expressions are kept as they were where PACKED is off: ptxas' allocation at 255 registers moved
    # by a byte or two of spill with equivalent forms (compile-check).
    if PACKED:
        k_rows_mem = row_k + k_rows
    else:
        k_rows_mem = k_rows
    k = tl.load(K + b_mem * stride_kb + g * stride_kh + k_rows_mem * stride_kn + offs_d[None, :], mask=n_ok & d_ok,
                other=0.0)  # fmt: skip
    v = tl.load(V + b_mem * stride_vb + g * stride_vh + k_rows_mem * stride_vn + offs_dv[None, :], mask=n_ok & dv_ok,
                other=0.0)  # fmt: skip
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)
    if PACKED:  # the sequence's query tiles that see this key tile (the same for every head)
        m_lo, _, _, m_hi = query_tile_range(
            pid_n * BLOCK_N, seqlen_q, seqlen_k, left, right, q_offset, chunk, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT,
            HAS_CHUNK,
        )  # fmt: skip
    # The group's query heads in a fixed order: the GQA reduction is deterministic, with no atomics.
    for r in range(0, group):
        h = g * group + r
        bh = b * heads_q + h
        q_base = Q + b_mem * stride_qb + h * stride_qh
        do_base = DO + b_mem * stride_dob + h * stride_doh
        lse_base = Lse + b_mem * stride_lb + h * stride_lh
        if PACKED:
            q_base += row_q * stride_qm
            do_base += row_q * stride_dom
            lse_base += row_q * stride_lm
            delta_base = Delta + h * delta_len + row_q
        mask_base = Mask + b_mem * stride_mb + h * stride_mh
        state_base = State + b_mem * stride_sb + h * stride_sh + pid_n * stride_sn
        index_base = QIndex + b_mem * stride_ib + h * stride_ih + pid_n * stride_in
        if PACKED:
            it_lo = m_lo
            it_hi = m_hi
        else:
            it_lo = 0
            it_hi = tl.load(QCount + b * stride_cb + h * stride_ch + pid_n * stride_cn)
        slope2 = 0.0
        if SCORE[SCORE_ALIBI]:  # this query head's slope, in the exp2 domain
            slope2 = tl.load(Alibi + b * stride_ab + h).to(tl.float32) * 1.4426950408889634
        for it in range(it_lo, it_hi):
            if PACKED:  # every tile of the range is visited; the band's bounds are applied to all of them
                tile_state = TILE_PARTIAL
                offs_m = (it * BLOCK_M + rows).to(tl.int64)
            else:
                m_tile = tl.load(index_base + it * stride_im)
                tile_state = tl.load(state_base + m_tile * stride_sm)
                offs_m = m_tile.to(tl.int64) * BLOCK_M + rows
            m_in = offs_m < seqlen_q
            # Qᵀ (BLOCK_D, BLOCK_M): loaded transposed, the K Qᵀ matmul's right operand as it is.
            q_t = tl.load(q_base + offs_m[None, :] * stride_qm + offs_d[:, None],
                          mask=m_in[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)  # fmt: skip
            do = tl.load(
                do_base + offs_m[:, None] * stride_dom + offs_dv[None, :], mask=m_in[:, None] & dv_ok, other=0.0
            )
            lse = tl.load(lse_base + offs_m * stride_lm, mask=m_in, other=float("-inf")).to(ACC)
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            if PACKED:
                delta = tl.load(delta_base + offs_m, mask=m_in, other=0.0).to(ACC)
            else:
                delta = tl.load(Delta + bh * seqlen_q + offs_m, mask=m_in, other=0.0).to(ACC)
            s_t, t_t = score_mod(
                tl.dot(k, q_t, out_dtype=ACC, input_precision=DOT_PRECISION), offs_m, offs_n, q_offset, qk_scale2,
                score, slope2, SCORE, True,
            )  # fmt: skip
            p_t = _probs_tile(
                s_t, lse2, offs_m, offs_n, mask_base, stride_mm, stride_mn, tile_state != TILE_FULL,
                seqlen_q, seqlen_k, left, right, q_offset, chunk, MASK_KIND, HAS_LEFT, HAS_RIGHT, HAS_CHUNK, True,
            )  # fmt: skip
            if SCORE[SCORE_GRAD]:
                # dV first, then fold the rules' derivative (the softcap's 1 - tanh²) into Pᵀ, dSᵀ's factor: Pᵀ,
                # tanh and dPᵀ are never live together (one tile fewer in registers).
                if DROPOUT:
                    keep_t = dropout_keep_t(Philox, bh, offs_m, offs_n, drop_lq, drop_lk, dropout_p)
                    pz_t = tl.where(keep_t, p_t * dropout_scale, 0.0)
                else:
                    pz_t = p_t
                dv += tl.dot(pz_t.to(do.dtype), do, out_dtype=ACC, input_precision=DOT_PRECISION)
                p_t = score_grad(p_t, t_t, score, SCORE)
                dp_t = tl.dot(v, tl.trans(do), out_dtype=ACC, input_precision=DOT_PRECISION)
                if DROPOUT:
                    dp_t = tl.where(keep_t, dp_t * dropout_scale, 0.0)
            else:
                dp_t = tl.dot(v, tl.trans(do), out_dtype=ACC, input_precision=DOT_PRECISION)
                if DROPOUT:
                    keep_t = dropout_keep_t(Philox, bh, offs_m, offs_n, drop_lq, drop_lk, dropout_p)
                    pz_t = tl.where(keep_t, p_t * dropout_scale, 0.0)
                    dp_t = tl.where(keep_t, dp_t * dropout_scale, 0.0)
                else:
                    pz_t = p_t
                dv += tl.dot(pz_t.to(do.dtype), do, out_dtype=ACC, input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), out_dtype=ACC, input_precision=DOT_PRECISION)
    dk = dk * scale
    dk_ptrs = DK + b_mem * stride_dkb + g * stride_dkh + k_rows_mem * stride_dkn + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=n_ok & d_ok)
    dv_ptrs = DV + b_mem * stride_dvb + g * stride_dvh + k_rows_mem * stride_dvn + offs_dv[None, :]
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=n_ok & dv_ok)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, DS, KeepOut, Mask, State, KVCount, KVIndex, Philox, Alibi, CuQ, CuK, Schedule,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh, stride_lm,
    stride_dqb, stride_dqh, stride_dqm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_sb, stride_sh, stride_sm, stride_sn,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im, stride_in,
    heads_q, group, seqlen_q, seqlen_k, n_k_tiles, num_seqs, total_q,
    scale, qk_scale2, left, right, q_offset, chunk, score, stride_ab, dropout_p, dropout_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_CHUNK: tl.constexpr,
    SCORE: tl.constexpr, DROPOUT: tl.constexpr,
    WRITE_DS: tl.constexpr, WRITE_KEEP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC: tl.constexpr, PACKED: tl.constexpr,
):  # fmt: skip
    """dQ of one query tile of head ``h`` (and dS for a bias gradient): Q/dO resident, key tiles stream past.

    ``DS`` / ``KeepOut`` are contiguous ``(B, Hq, Lq, Lk)``; with ``WRITE_DS`` / ``WRITE_KEEP`` (the
    debug keep-mask) every element is written, the empty tiles' too (zero / the regenerated mask).
    ``PACKED`` (neither of those): program (schedule entry of a sequence's query tile, head), its key tiles from
    ``key_tile_range`` of that sequence, as in the forward.
    """
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    drop_lq = seqlen_q  # the dropout contract's lengths: the call's (packed: the maxima)
    drop_lk = seqlen_k
    if PACKED:
        # b: the sequence (ALiBi's row and the dropout contract's batch index)
        b, pid_m, row_q, row_k, seqlen_q, seqlen_k = packed_entry(Schedule, CuQ, CuK, pid, num_seqs)
        q_offset = seqlen_k - seqlen_q
        b_mem = 0  # the tensors' batch dim (one row of packed tokens)
        delta_len = total_q
        h = pid_bh
        drop_bh = b * heads_q + h
    else:
        pid_m = pid
        b = pid_bh // heads_q
        b_mem = b
        h = pid_bh % heads_q
        drop_bh = pid_bh
    g = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d[None, :] < HEAD_DIM
    dv_ok = offs_dv[None, :] < HEAD_DIM_V
    m_ok = offs_m[:, None] < seqlen_q
    q_rows = offs_m[:, None].to(tl.int64)
    # The dense expressions are kept as they were where PACKED is off (see the dK/dV kernel).
    if PACKED:
        q_rows_mem = row_q + q_rows
        lse_base = Lse + b_mem * stride_lb + h * stride_lh + row_q * stride_lm
        delta_base = Delta + h * delta_len + row_q
        key_cols = row_k + cols[:, None]
    else:
        q_rows_mem = q_rows
        lse_base = Lse + b * stride_lb + h * stride_lh
        delta_base = Delta + pid_bh * seqlen_q
        key_cols = cols[:, None]
    q = tl.load(Q + b_mem * stride_qb + h * stride_qh + q_rows_mem * stride_qm + offs_d[None, :], mask=m_ok & d_ok,
                other=0.0)  # fmt: skip
    do_ptrs = DO + b_mem * stride_dob + h * stride_doh + q_rows_mem * stride_dom + offs_dv[None, :]
    do = tl.load(do_ptrs, mask=m_ok & dv_ok, other=0.0)
    lse = tl.load(lse_base + offs_m * stride_lm, mask=offs_m < seqlen_q, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse.to(ACC) * 1.4426950408889634)
    delta = tl.load(delta_base + offs_m, mask=offs_m < seqlen_q, other=0.0).to(ACC)
    # Pointer blocks of the first key tile; each step below adds a scalar key offset.
    k_ptrs = K + b_mem * stride_kb + g * stride_kh + key_cols * stride_kn + offs_d[None, :]
    v_ptrs = V + b_mem * stride_vb + g * stride_vh + key_cols * stride_vn + offs_dv[None, :]
    mask_base = Mask + b_mem * stride_mb + h * stride_mh
    # (B, Hq, Lq, Lk) contiguous gradient / debug outputs: this tile's first key.
    dense_ptrs = pid_bh * seqlen_q * seqlen_k + offs_m[:, None].to(tl.int64) * seqlen_k + cols[None, :]
    state_base = State + b_mem * stride_sb + h * stride_sh + pid_m * stride_sm
    index_base = KVIndex + b_mem * stride_ib + h * stride_ih + pid_m * stride_im
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    if PACKED:  # the sequence's key tiles that this query tile sees, as in the forward
        it_lo, _, _, it_hi = key_tile_range(
            pid_m * BLOCK_M, seqlen_q, seqlen_k, left, right, q_offset, chunk, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT,
            HAS_CHUNK,
        )  # fmt: skip
        count = it_hi
    else:
        it_lo = 0
        count = tl.load(KVCount + b * stride_cb + h * stride_ch + pid_m * stride_cm)
    slope2 = 0.0
    if SCORE[SCORE_ALIBI]:  # this head's slope, in the exp2 domain
        slope2 = tl.load(Alibi + b * stride_ab + h).to(tl.float32) * 1.4426950408889634
    for it in range(it_lo, count):
        if PACKED:  # every tile of the range is visited; the band's bounds are applied to all of them
            tile_state = TILE_PARTIAL
            start_n = tl.cast(it, tl.int64) * BLOCK_N
        else:
            n_tile = tl.load(index_base + it * stride_in)
            tile_state = tl.load(state_base + n_tile * stride_sn)
            start_n = n_tile.to(tl.int64) * BLOCK_N
        offs_n = start_n + cols
        n_ok = offs_n[:, None] < seqlen_k
        k = tl.load(k_ptrs + start_n * stride_kn, mask=n_ok & d_ok, other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=n_ok & dv_ok, other=0.0)
        s, t = score_mod(
            tl.dot(q, tl.trans(k), out_dtype=ACC, input_precision=DOT_PRECISION), offs_m, offs_n, q_offset,
            qk_scale2, score, slope2, SCORE, False,
        )  # fmt: skip
        p = _probs_tile(
            s, lse2, offs_m, offs_n, mask_base, stride_mm, stride_mn, tile_state != TILE_FULL,
            seqlen_q, seqlen_k, left, right, q_offset, chunk, MASK_KIND, HAS_LEFT, HAS_RIGHT, HAS_CHUNK, False,
        )  # fmt: skip
        if SCORE[SCORE_GRAD] and not WRITE_DS:  # fold the rules' derivative into P now: t is not live across dP
            p = score_grad(p, t, score, SCORE)
        dp = tl.dot(do, tl.trans(v), out_dtype=ACC, input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = dropout_keep(Philox, drop_bh, offs_m, offs_n, drop_lq, drop_lk, dropout_p)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
            if WRITE_KEEP:
                tl.store(KeepOut + dense_ptrs + start_n, keep.to(tl.int8), mask=m_ok & (offs_n[None, :] < seqlen_k))
        ds = p * (dp - delta[:, None])
        if WRITE_DS:  # the float mask's gradient: the score's after the score rules
            tl.store(DS + dense_ptrs + start_n, ds.to(DS.dtype.element_ty), mask=m_ok & (offs_n[None, :] < seqlen_k))
            if SCORE[SCORE_GRAD]:  # then the gradient of the score before them
                ds = score_grad(ds, t, score, SCORE)
        dq += tl.dot(ds.to(k.dtype), k, out_dtype=ACC, input_precision=DOT_PRECISION)
    if WRITE_DS or WRITE_KEEP:
        # The rest of the list holds the empty key tiles: zero gradient (and the mask as drawn).
        for it in range(count, n_k_tiles):
            start_n = tl.load(index_base + it * stride_in).to(tl.int64) * BLOCK_N
            offs_n = start_n + cols
            ok = m_ok & (offs_n[None, :] < seqlen_k)
            if WRITE_DS:
                tl.store(DS + dense_ptrs + start_n, tl.zeros([BLOCK_M, BLOCK_N], DS.dtype.element_ty), mask=ok)
            if WRITE_KEEP:
                keep = dropout_keep(Philox, pid_bh, offs_m, offs_n, seqlen_q, seqlen_k, dropout_p)
                tl.store(KeepOut + dense_ptrs + start_n, keep.to(tl.int8), mask=ok)
    dq = dq * scale
    dq_ptrs = DQ + b_mem * stride_dqb + h * stride_dqh + q_rows_mem * stride_dqm + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=m_ok & d_ok)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """TF32 for fp32 on a GPU only where torch allows it (as the forward does); IEEE otherwise."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _launch(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Optional[Tensor],
    state_kv: Tensor,
    state_q: Tensor,
    philox: Optional[Tensor],
    scale: float,
    variant: VariantScalars,
    dropout_p: float,
    need_mask_grad: bool,
    blocks: list[int],
    write_keep: bool = False,
    *,
    alibi_slopes: Optional[Tensor] = None,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Allocates the gradients and runs the three kernels: ``(dq, dk, dv, dmask or empty, keep or None)``.

    The variants as in the forward's launcher (``fwd.attn_fwd``); the sinks need nothing here (they are in
    the lse, and their own gradient is the autograd function's). Packed sequences (``cu_seqlens_*`` given, as
    in ``fwd.attn_fwd``; ``state_kv``/``state_q`` are then None): the delta pass runs over the packed tokens, the
    dK/dV and dQ passes over the device-side schedules of the sequences' key and query tiles
    (``_varlen.tile_schedule``), and the gradients come back token-major (``registry.packed_empty``).
    """
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k, head_dim_v = k.shape[1], k.shape[2], v.shape[3]
    bm1, bn1, bm2, bn2 = blocks
    dropout = dropout_p > 0.0
    packed = cu_seqlens_q is not None
    total_q, total_k = seqlen_q, seqlen_k
    if dropout and (philox is None or philox.dtype != torch.int64 or philox.numel() != 2):
        raise ValueError(f"philox: expected the call's int64 [seed, offset] tensor when dropout_p > 0, got {philox}")
    if packed and (mask is not None or need_mask_grad or write_keep or cu_seqlens_k is None):
        raise ValueError("mask, need_mask_grad, cu_seqlens_k: packed sequences take cu_seqlens_k and no mask tensor")
    for name, state, bq, bk in () if packed else (("state_kv", state_kv, bm1, bn1), ("state_q", state_q, bm2, bn2)):
        expected = (triton.cdiv(seqlen_q, bq), triton.cdiv(seqlen_k, bk))
        if tuple(state.shape[-2:]) != expected:
            raise ValueError(
                f"{name}: expected tile states for block ({bq}, {bk}) {expected}, got {tuple(state.shape)}"
            )

    poison = os.environ.get("FASTATTN_POISON") == "1"  # test hook: unwritten elements stay NaN
    # The gradients are contiguous (as the registry's shared fake says); the kernels read rows with a unit
    # last stride (vectorised, and what Triton specialises on), so other layouts go through a copy.
    if packed:
        dq, dk, dv = (packed_empty(t, t.shape[1], t.shape[2], t.shape[3]) for t in (q, k, v))
    else:
        dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    q, k, v, grad_out = (_last_dim_contiguous(t) for t in (q, k, v, grad_out))
    dq_k, dk_k, dv_k = dq, dk, dv
    if need_mask_grad:
        dmask = torch.empty(batch, heads_q, seqlen_q, seqlen_k, dtype=mask.dtype, device=q.device)
    else:
        dmask = q.new_empty(0)
    if poison:
        for t in (dq_k, dk_k, dv_k, dmask):
            t.fill_(float("nan"))
    keep_out = None
    if write_keep:
        keep_out = torch.full((batch, heads_q, seqlen_q, seqlen_k), -1, dtype=torch.int8, device=q.device)

    delta = torch.empty(batch, heads_q, seqlen_q, dtype=torch.float32, device=q.device)
    _attn_bwd_preprocess_kernel[(triton.cdiv(seqlen_q, 64), batch * heads_q)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), heads_q, seqlen_q, head_dim_v,
        BLOCK_M=64, BLOCK_DV=_pow2_dim(head_dim_v),
    )  # fmt: skip

    kind = 0 if mask is None else (1 if mask.dtype == torch.bool else 2)
    # A bool mask is read as bytes: a same-size view keeps the broadcast (stride-0) strides.
    mask_arg = q if mask is None else (mask.view(torch.uint8) if kind == 1 else mask)
    mask_strides = [0, 0, 0, 0] if mask is None else list(mask.stride())
    dummy = torch.zeros(2, dtype=torch.int64, device=q.device)
    philox_arg = philox if dropout else dummy
    alibi_arg = dummy if alibi_slopes is None else alibi_slopes.float().contiguous()
    stride_ab = 0 if alibi_slopes is None or alibi_slopes.shape[0] == 1 else heads_q
    left, right, chunk = variant.window_left, variant.window_right, variant.chunk
    qk_scale2, score, score_flags = score_args(scale, variant, alibi_slopes is not None)
    scalars = (
        float(scale), qk_scale2, left, right, variant.q_offset, max(chunk, 1), score, stride_ab, float(dropout_p),
        1.0 / (1.0 - dropout_p),
    )  # fmt: skip
    meta = dict(
        MASK_KIND=kind,
        HAS_LEFT=left >= 0,
        HAS_RIGHT=right >= 0,
        HAS_CHUNK=chunk > 0,
        SCORE=score_flags,
        DROPOUT=dropout,
        HEAD_DIM=head_dim,
        HEAD_DIM_V=head_dim_v,
        BLOCK_D=_pow2_dim(head_dim),
        BLOCK_DV=_pow2_dim(head_dim_v),
        DOT_PRECISION=_dot_precision(q.dtype, q.device),
        ACC=_acc_dtype(q.dtype),
    )
    heavy = is_heavy(mask is not None, dropout_p, chunk, score_flags)
    variants = has_variants(chunk, score_flags)
    fam = VARIANTS_FAMILY if variants else family(heavy, left, right)
    config = bwd_config(head_dim, head_dim_v, q.dtype, _arch(q.device), heavy, fam, packed)
    if config is None:
        raise ValueError(f"head_dim: {_no_config(head_dim, head_dim_v, q.dtype, _arch(q.device))}")
    cfg_kv, cfg_q = config
    launch_kv = dict(num_warps=cfg_kv[2], num_stages=cfg_kv[3])
    launch_q = dict(num_warps=cfg_q[2], num_stages=cfg_q[3])

    if packed:
        num_seqs = cu_seqlens_q.shape[0] - 1
        cu_q, cu_k = cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32)
        sched_kv, sched_q = tile_schedule(cu_k, bn1, total_k), tile_schedule(cu_q, bm2, total_q)
        grid_kv = (num_programs(total_k, num_seqs, bn1), heads_kv)
        grid_q = (num_programs(total_q, num_seqs, bm2), heads_q)
        # No summary: the kernels' tile ranges are analytic per sequence; these stand in for its tensors.
        state_kv, q_count, q_index = dummy.view(1, 1, 1, 2), dummy.view(1, 1, 2), dummy.view(1, 1, 1, 2)
        summary_q = TileSummary(bm2, bn2, state_kv, q_count, q_index)
        seqlen_q, seqlen_k = int(max_seqlen_q), int(max_seqlen_k)  # the dropout contract's lengths
        layout = dict(PACKED=True)
    else:
        num_seqs, cu_q, cu_k, sched_kv, sched_q = 0, dummy, dummy, dummy, dummy
        grid_kv = (triton.cdiv(seqlen_k, bn1), batch * heads_kv)
        grid_q = (triton.cdiv(seqlen_q, bm2), batch * heads_q)
        state_kv = state_kv.to(device=q.device, dtype=torch.int8)
        q_count, q_index = _transposed_lists(state_kv)
        summary_q = TileSummary.from_state(bm2, bn2, state_q.to(device=q.device, dtype=torch.int8))
        layout = dict(PACKED=False)
    _attn_bwd_dkdv_kernel[grid_kv](
        q, k, v, grad_out, lse, delta, dk_k, dv_k, mask_arg, state_kv, q_count, q_index, philox_arg, alibi_arg,
        cu_q, cu_k, sched_kv,
        *_rows(q), *_rows(k), *_rows(v), *_rows(grad_out), *lse.stride(),
        *_rows(dk_k), *_rows(dv_k), *mask_strides,
        *_bstrides(state_kv), *_bstrides(q_count), *_bstrides(q_index),
        heads_q, heads_kv, heads_q // heads_kv, seqlen_q, seqlen_k, num_seqs, total_q, *scalars,
        BLOCK_M=bm1, BLOCK_N=bn1, **meta, **layout, **launch_kv,
    )  # fmt: skip

    _attn_bwd_dq_kernel[grid_q](
        q, k, v, grad_out, lse, delta, dq_k, dmask, keep_out if write_keep else dummy,
        mask_arg, summary_q.state, summary_q.kv_count, summary_q.kv_index, philox_arg, alibi_arg,
        cu_q, cu_k, sched_q,
        *_rows(q), *_rows(k), *_rows(v), *_rows(grad_out), *lse.stride(),
        *_rows(dq_k), *mask_strides,
        *_bstrides(summary_q.state), *_bstrides(summary_q.kv_count), *_bstrides(summary_q.kv_index),
        heads_q, heads_q // heads_kv, seqlen_q, seqlen_k, summary_q.state.shape[-1], num_seqs, total_q, *scalars,
        WRITE_DS=need_mask_grad, WRITE_KEEP=write_keep, BLOCK_M=bm2, BLOCK_N=bn2, **meta, **layout, **launch_q,
    )  # fmt: skip
    return dq, dk, dv, dmask, (None if keep_out is None else keep_out.bool())


@torch.library.custom_op("fastattn::triton_attn_bwd", mutates_args=())
def triton_attn_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    summary: list[Tensor],
    philox: Optional[Tensor],
    scale: float,
    dropout_p: float,
    variant: list[float],
    blocks: list[int],
    need_mask_grad: bool,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The registry's backward op (``OP_BWD_ARGS``): ``(dq, dk, dv, dmask)``; ``dmask`` is ``(B, Hq, Lq, Lk)`` in
    the mask's dtype, or empty unless asked for.

    ``summary`` = ``[state_kv, state_q]``: the tile states for the dK/dV and dQ blocks (``blocks`` =
    ``block_sizes(...)``), empty for packed sequences; ``philox``: the call's dropout seed or None.
    """
    state_kv, state_q = summary if summary else (None, None)
    dq, dk, dv, dmask, _ = _launch(
        grad_out, q, k, v, out, lse, mask, state_kv, state_q, philox, scale, VariantScalars.unpack(variant),
        dropout_p, need_mask_grad, blocks, alibi_slopes=alibi_slopes, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
    )  # fmt: skip
    return dq, dk, dv, dmask


triton_attn_bwd.register_fake(fake_backward)


def _prepare(q: Tensor, v: Tensor, params: AttnParams, philox: Optional[Tensor], need_mask_grad: bool):
    if need_mask_grad and (params.mask is None or not params.mask.dtype.is_floating_point):
        got = "no mask" if params.mask is None else f"a {params.mask.dtype} mask"
        raise ValueError(f"need_mask_grad: expected a floating attn_mask to differentiate, got {got}")
    if params.dropout_p > 0.0 and philox is None:
        raise ValueError("philox: expected the call's [seed, offset] int64 tensor when dropout_p > 0, got None")
    heavy, variants = call_families(params)
    fam = VARIANTS_FAMILY if variants else family(heavy, *params.bounds)
    blocks = list(
        block_sizes(
            q.shape[-1], q.dtype, q.device, max(q.shape[2], params.seqlen_k), head_dim_v=v.shape[-1], heavy=heavy,
            fam=fam, packed=params.is_packed,
        )
    )  # fmt: skip
    return blocks


def _states(params: AttnParams, blocks: list[int]) -> list[Tensor]:
    """The tile states for the dK/dV and dQ blocks (cached on ``params``)."""
    return [params.tile_summary(blocks[0], blocks[1]).state, params.tile_summary(blocks[2], blocks[3]).state]


def attn_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    params: AttnParams,
    philox: Optional[Tensor],
    need_mask_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Backward of the Triton backend: ``(dq, dk, dv, dmask or None)`` from the forward's ``(out, lse)``.

    Only the lse format matters (natural log, fp32, ``(B, Hq, Lq)``, -inf for an empty row), not the
    kernel that produced it. ``philox`` is the call's dropout seed (see ``dropout.py``). ``dmask``
    (``(B, Hq, Lq, Lk)``, the mask's dtype) only when ``need_mask_grad``, for a float mask.
    """
    blocks = _prepare(q, v, params, philox, need_mask_grad)
    states = [] if params.is_packed else _states(params, blocks)
    dq, dk, dv, dmask = triton_attn_bwd(
        grad_out, q, k, v, out, lse, params.mask, params.alibi, states, philox,
        *op_scalars(params), blocks, bool(need_mask_grad), *op_layout(params),
    )  # fmt: skip
    return dq, dk, dv, (dmask if need_mask_grad else None)


def attn_bwd_debug(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    params: AttnParams,
    philox: Optional[Tensor],
    need_mask_grad: bool = False,
    blocks: Optional[tuple[int, int, int, int]] = None,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """``attn_bwd`` plus the dropout keep-mask the dQ kernel used (``(B, Hq, Lq, Lk)`` bool), for tests.

    ``blocks`` overrides ``block_sizes`` (tests use it to check that results do not depend on tiling).
    Allocates ``Lq x Lk`` for the keep-mask: debugging only, never on the training path.
    """
    default_blocks = _prepare(q, v, params, philox, need_mask_grad)
    blocks = list(blocks or default_blocks)
    state_kv, state_q = _states(params, blocks)
    dq, dk, dv, dmask, keep = _launch(
        grad_out, q, k, v, out, lse, params.mask, state_kv, state_q, philox, float(params.scale),
        params.variant_scalars, float(params.dropout_p), bool(need_mask_grad), blocks,
        write_keep=params.dropout_p > 0.0, alibi_slopes=params.alibi,
    )  # fmt: skip
    return dq, dk, dv, (dmask if need_mask_grad else None), keep
