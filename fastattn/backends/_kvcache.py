"""The ``torch.library`` ops of ``fastattn.kvcache_attention``, one per backend, with one schema and one fake.

Each op appends ``key``/``value`` into the caches in place (``fastattn.kvcache.append_``; the schema declares
the mutation of ``key_cache`` and ``value_cache``, so ``torch.compile`` functionalises it) and then attends::

    kvcache_fwd_<backend>(query, key_cache, value_cache, cache_seqlens, key?, value?, block_table?,
                          alibi_slopes?, sinks?, scale, variant, num_splits)
        -> (out (B, Hq, Lq, Dv), lse (B, Hq, Lq))

``variant`` is the packed ``VariantScalars`` of the attention ops (``backends/registry.py``): the band with causal
folded in (``AttnParams.bounds``), measured from each query's bottom-right position, and the softcap; its
``q_offset`` and ``chunk`` are 0. ``num_splits`` 0 lets the kernel choose. The reference op gathers each
sequence's keys and runs the oracle on them (float64 inputs give the float64 ground truth).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .. import reference as oracle
from ..kvcache import append_, choose_splits, gather
from ..params import AttnParams, VariantScalars

__all__ = [
    "KVCACHE_OP_ARGS",
    "kvcache_fwd_reference",
    "kvcache_fwd_cpu",
    "kvcache_fwd_triton",
    "op_args",
    "fake_kvcache",
    "capacity",
    "gpu_workers",
    "splits_for",
]

KVCACHE_OP_ARGS = (
    "query", "key_cache", "value_cache", "cache_seqlens", "key", "value", "block_table", "alibi_slopes", "sinks",
    "scale", "variant", "num_splits",
)  # fmt: skip


def op_args(params: AttnParams, num_splits: int) -> tuple:
    """``(alibi_slopes, sinks, scale, variant, num_splits)`` of ``params``."""
    sinks = None if params.sinks is None else params.sinks.detach()
    return params.alibi, sinks, float(params.scale), params.variant_scalars.pack(), int(num_splits)


def fake_kvcache(query, key_cache, value_cache, cache_seqlens, key, value, block_table, alibi_slopes, sinks, scale,
                 variant, num_splits):  # fmt: skip
    """The fake of every backend's op: ``out`` in query's dtype, the lse float32 (float64 for float64)."""
    out = query.new_empty(*query.shape[:3], value_cache.shape[3])
    lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    return out, query.new_empty(query.shape[:3], dtype=lse_dtype)


@torch.library.custom_op("fastattn::kvcache_fwd_reference", mutates_args=("key_cache", "value_cache"))
def kvcache_fwd_reference(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    cache_seqlens: Tensor,
    key: Optional[Tensor],
    value: Optional[Tensor],
    block_table: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    sinks: Optional[Tensor],
    scale: float,
    variant: list[float],
    num_splits: int,
) -> tuple[Tensor, Tensor]:
    append_(key_cache, value_cache, cache_seqlens, key, value, block_table)
    batch, heads_q, seqlen_q, _ = query.shape
    new = 0 if key is None else key.shape[2]
    scalars = VariantScalars.unpack(variant)
    outs, lses = [], []
    for b, cached in enumerate(cache_seqlens.tolist()):
        total = cached + new
        k = gather(key_cache, b, total, block_table).unsqueeze(0)
        v = gather(value_cache, b, total, block_table).unsqueeze(0)
        alibi = None if alibi_slopes is None else alibi_slopes[b : b + 1] if alibi_slopes.shape[0] > 1 else alibi_slopes
        aligned = scalars._replace(q_offset=total - seqlen_q)  # bottom-right
        params = AttnParams.for_tensors(
            query[b : b + 1], k, v, scale, alibi=alibi, sinks=sinks, **aligned.params_kwargs()
        )  # fmt: skip
        out, lse = oracle.attention_forward(query[b : b + 1], k, v, params)
        outs.append(out)
        lses.append(lse)
    if batch == 0:
        return fake_kvcache(query, key_cache, value_cache, cache_seqlens, key, value, block_table, alibi_slopes,
                            sinks, scale, variant, num_splits)  # fmt: skip
    return torch.cat(outs).contiguous(), torch.cat(lses).contiguous()


kvcache_fwd_reference.register_fake(fake_kvcache)


def capacity(key_cache: Tensor, block_table: Optional[Tensor]) -> int:
    """Keys a sequence can hold: ``Lmax``, or ``pages_per_seq * page_size``."""
    return key_cache.shape[2] * (1 if block_table is None else block_table.shape[1])


# No split is chosen shorter than this many keys of the cache's capacity: a split's fixed cost is its share of
# the merge.
MIN_SPLIT_KEYS = 256


def gpu_workers(device: torch.device) -> int:
    """SMs for the GPU kernels' ``(batch, kv head, split)`` programs to fill; 2 on CPU tensors (the Triton
    interpreter, the CUDA emulator: enough to exercise splits in tests)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def splits_for(num_splits: int, query: Tensor, key_cache: Tensor, block_table: Optional[Tensor], workers: int) -> int:
    """``num_splits``, or for 0 ``choose_splits``' choice for this call's ``batch * kv heads`` programs."""
    programs = query.shape[0] * key_cache.shape[1]
    return num_splits or choose_splits(programs, workers, capacity(key_cache, block_table), MIN_SPLIT_KEYS)


@torch.library.custom_op("fastattn::kvcache_fwd_cpu", mutates_args=("key_cache", "value_cache"))
def kvcache_fwd_cpu(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    cache_seqlens: Tensor,
    key: Optional[Tensor],
    value: Optional[Tensor],
    block_table: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    sinks: Optional[Tensor],
    scale: float,
    variant: list[float],
    num_splits: int,
) -> tuple[Tensor, Tensor]:
    """The native CPU kernel (``csrc/cpu/decode_cpu_kernel.h``) after the append; splits fill the threads."""
    if os.environ.get("FASTATTN_CPU_ISA"):  # a bad value raises here, before the append writes the cache
        torch.ops.fastattn.cpu_kvcache_info()
    append_(key_cache, value_cache, cache_seqlens, key, value, block_table)
    splits = splits_for(num_splits, query, key_cache, block_table, torch.get_num_threads())
    new = 0 if key is None else key.shape[2]
    return torch.ops.fastattn.cpu_kvcache_fwd(
        query, key_cache, value_cache, cache_seqlens.contiguous(), new, block_table, alibi_slopes, sinks, scale,
        variant, splits,
    )  # fmt: skip


kvcache_fwd_cpu.register_fake(fake_kvcache)


@torch.library.custom_op("fastattn::kvcache_fwd_triton", mutates_args=("key_cache", "value_cache"))
def kvcache_fwd_triton(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    cache_seqlens: Tensor,
    key: Optional[Tensor],
    value: Optional[Tensor],
    block_table: Optional[Tensor],
    alibi_slopes: Optional[Tensor],
    sinks: Optional[Tensor],
    scale: float,
    variant: list[float],
    num_splits: int,
) -> tuple[Tensor, Tensor]:
    """The Triton split-KV kernel (``backends/triton/decode.py``) after the append."""
    from .triton.decode import kvcache_decode

    append_(key_cache, value_cache, cache_seqlens, key, value, block_table)
    new = 0 if key is None else key.shape[2]
    return kvcache_decode(
        query, key_cache, value_cache, cache_seqlens, new, block_table, alibi_slopes, sinks, scale,
        VariantScalars.unpack(variant), num_splits,
    )  # fmt: skip


kvcache_fwd_triton.register_fake(fake_kvcache)
