"""``kvcache_attention``: decoding over a key/value cache, contiguous or paged, with an in-place append.

Decoding is bound by reading the cache: one new token (or a few) per sequence attends every cached key. The
call validates everything first (shapes, dtypes, and the values of ``cache_seqlens`` and ``block_table``)
so that a bad input raises **before** anything is written: the caches are then bit-identical to what they
were. It then chooses a backend (its ``kvcache_capabilities``) and runs that backend's op, which appends
``key``/``value`` into the caches and attends, split over the keys when the batch and heads alone cannot
fill the machine (flash-decoding; the partial results merge exactly through their lse, ``merge_splits``).

Layouts (``AttnParams.layout``)::

    contiguous ("kvcache"): key_cache (B, Hkv, Lmax, D)          value_cache (B, Hkv, Lmax, Dv)
    paged ("paged"):        key_cache (num_pages, Hkv, page_size, D), block_table (B, pages_per_seq) int32:
                            key position j of sequence b is slot j % page_size of page block_table[b, j // page_size]

A contiguous cache is the paged one with ``page_size = Lmax`` and ``block_table[b] = [b]`` (the kernels read
both through the same addressing). ``cache_seqlens (B,)`` int32 counts the keys cached before the call; after
appending ``Lnew`` keys sequence ``b`` attends ``total_b = cache_seqlens[b] + Lnew`` keys, and query ``i`` sits
at key position ``total_b - Lq + i`` (bottom-right). ``cache_seqlens`` itself is never changed.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ._validate import _check_alibi, _check_bool, _check_scale, _check_sinks, _check_window, _shape
from .backends.registry import choose
from .params import AttnParams
from .variants import check_score_rules

__all__ = ["kvcache_attention", "validate_kvcache", "append_", "gather", "merge_splits", "choose_splits"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, t: Any, dims: int, what: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {what}, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name}: expected a {dims}-D tensor {what}, got shape {_shape(t)}")
    return t


def _check_like(name: str, t: Tensor, query: Tensor) -> None:
    if t.dtype != query.dtype:
        raise TypeError(f"{name}: expected dtype {query.dtype} (query's), got {t.dtype}")
    if t.device != query.device:
        raise ValueError(f"{name}: expected device {query.device} (query's), got {t.device}")


def _check_no_grad(tensors: dict[str, Optional[Tensor]]) -> None:
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise ValueError(
                f"{name}: kvcache_attention is forward only (inference), got a tensor that requires grad; call it "
                "under torch.no_grad() / torch.inference_mode(), or pass .detach()"
            )


def _check_index(name: str, t: Any, device: torch.device, dims: int, what: str) -> Tensor:
    t = _check_tensor(name, t, dims, what)
    if t.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype torch.int32 {what}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (query's), got {t.device}")
    return t


# cache_seqlens and block_table entries up to which _check_values walks a CPU table in Python rather than screening.
_WALK_ENTRIES = 1024


def _check_values(
    cache_seqlens: Tensor, block_table: Optional[Tensor], new: int, capacity: int, page_size: int, num_pages: int
) -> None:
    """The values: ``0 <= cache_seqlens[b]``, ``cache_seqlens[b] + Lnew <= capacity``, and every page a sequence
    uses (the first ``ceil(total_b / page_size)`` entries of its row) in ``[0, num_pages)``; entries past a
    sequence's pages are never read and may hold anything.

    A small table on the CPU is walked in Python (``_first_bad_value``). Otherwise one screen in tensor ops covers
    the whole table, and its verdict is the one value read on the host (a single device sync on a GPU); only a bad
    verdict walks the values, to name the first. On the CPU the walk costs about 40 ns an entry and the screen
    about 50 us at any size: they cross near ``_WALK_ENTRIES``. (At 64 sequences of 512 pages the walk took 1.4 ms,
    close to the 1.8 ms an H200 needs to read their 8.6 GB of bf16 cache at 8 heads of 128.)"""
    entries = cache_seqlens.numel() + (0 if block_table is None else block_table.numel())
    if cache_seqlens.device.type == "cpu" and entries <= _WALK_ENTRIES:
        message = _first_bad_value(cache_seqlens, block_table, new, capacity, page_size, num_pages)
        if message:
            raise ValueError(message)
        return
    lengths = cache_seqlens.long()  # int64: cache_seqlens + Lnew must not wrap around
    bad = ((lengths < 0) | (lengths + new > capacity)).any()
    if block_table is not None and block_table.numel():
        used = (lengths.clamp(0, capacity) + new + page_size - 1) // page_size  # (B,) pages each sequence uses
        in_use = torch.arange(block_table.shape[1], device=block_table.device) < used[:, None]  # (B, pages_per_seq)
        bad = bad | (in_use & ((block_table < 0) | (block_table >= num_pages))).any()
    if bool(bad):
        message = _first_bad_value(cache_seqlens, block_table, new, capacity, page_size, num_pages)
        raise ValueError(message or "cache_seqlens, block_table: the screen found a bad value that the walk did not")


def _first_bad_value(
    cache_seqlens: Tensor, block_table: Optional[Tensor], new: int, capacity: int, page_size: int, num_pages: int
) -> Optional[str]:
    """The error message for the first bad value (lengths first, then the pages they use), or None."""
    lengths = cache_seqlens.tolist()
    for b, n in enumerate(lengths):
        if n < 0:
            return f"cache_seqlens: expected lengths >= 0, got {n} for sequence {b}"
        if n + new > capacity:
            return (
                f"cache_seqlens: sequence {b} holds {n} keys and {new} are appended, past the cache's capacity of "
                f"{capacity} keys per sequence" + (" (pages_per_seq * page_size)" if block_table is not None else "")
                + f"; got cache_seqlens[{b}] = {n}"
            )  # fmt: skip
    if block_table is None:
        return None
    rows = block_table.tolist()
    for b, (n, row) in enumerate(zip(lengths, rows)):
        used = -(-(n + new) // page_size)
        for p, page in enumerate(row[:used]):
            if not 0 <= page < num_pages:
                return (
                    f"block_table: expected page indices in [0, {num_pages}) (key_cache.shape[0]) for the "
                    f"{used} pages sequence {b} uses, got block_table[{b}, {p}] = {page}"
                )
    return None


def _host_can_read(device: torch.device) -> bool:
    """Whether the values of tensors on ``device`` can be read on the host now: not while torch.compile traces (a
    graph break), nor while the current CUDA stream is being captured into a CUDA graph (a synchronization there
    is an error, and the values at capture are not those of the replays)."""
    if torch.compiler.is_compiling():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def validate_kvcache(
    query: Any,
    key_cache: Any,
    value_cache: Any,
    cache_seqlens: Any,
    key: Any = None,
    value: Any = None,
    block_table: Any = None,
    is_causal: Any = True,
    window: Any = None,
    softcap: Any = None,
    alibi_slopes: Any = None,
    sinks: Any = None,
    scale: Any = None,
    enable_gqa: Any = False,
    num_splits: Any = None,
    check_values: Any = True,
) -> tuple[AttnParams, int]:
    """Checks every input of ``kvcache_attention``; returns ``(params, num_splits)`` (0: the backend chooses).

    Nothing is written before this returns. The values of ``cache_seqlens`` and ``block_table`` are checked
    eagerly (``_check_values``) unless ``check_values`` is False, or while they cannot be read on the host
    (``_host_can_read``: torch.compile tracing, CUDA graph capture); they are then trusted, as FlashAttention's
    ``flash_attn_with_kvcache`` trusts them.
    """
    query = _check_tensor("query", query, 4, "(batch, heads_q, seqlen_q, head_dim)")
    if query.dtype not in _DTYPES:
        raise TypeError(f"query: expected a floating dtype (float16, bfloat16, float32, float64), got {query.dtype}")
    paged = block_table is not None
    what = "(num_pages, heads_kv, page_size, head_dim)" if paged else "(batch, heads_kv, max_seqlen, head_dim)"
    key_cache = _check_tensor("key_cache", key_cache, 4, what)
    value_cache = _check_tensor("value_cache", value_cache, 4, what.replace("head_dim", "head_dim_v"))
    _check_like("key_cache", key_cache, query)
    _check_like("value_cache", value_cache, query)
    batch, heads_q, seqlen_q, head_dim = query.shape
    slots, heads_kv, page, kd = key_cache.shape
    if kd != head_dim:
        raise ValueError(f"key_cache: expected head_dim {head_dim} (query's last dim), got {kd}")
    if tuple(value_cache.shape[:3]) != (slots, heads_kv, page):
        raise ValueError(
            f"value_cache: expected the first three dims of key_cache {tuple(key_cache.shape[:3])}, got "
            f"{_shape(value_cache)}"
        )
    if not paged and slots != batch:
        raise ValueError(f"key_cache: expected {batch} sequences in dim 0 (query's batch), got {_shape(key_cache)}")
    enable_gqa = _check_bool("enable_gqa", enable_gqa)
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(f"key_cache: expected heads_kv dividing query's {heads_q} heads, got {heads_kv}")
    if heads_kv != heads_q and not enable_gqa:
        raise ValueError(f"key_cache: expected {heads_q} heads (query's) unless enable_gqa=True, got {heads_kv}")
    cache_seqlens = _check_index("cache_seqlens", cache_seqlens, query.device, 1, "(batch,)")
    if cache_seqlens.shape[0] != batch:
        raise ValueError(f"cache_seqlens: expected shape ({batch},) (query's batch), got {_shape(cache_seqlens)}")
    if paged:
        block_table = _check_index("block_table", block_table, query.device, 2, "(batch, pages_per_seq)")
        if block_table.shape[0] != batch:
            raise ValueError(f"block_table: expected {batch} rows (query's batch), got shape {_shape(block_table)}")
        if page == 0:
            raise ValueError(f"key_cache: expected page_size >= 1, got shape {_shape(key_cache)}")
        capacity = block_table.shape[1] * page
    else:
        capacity = page
    if (key is None) != (value is None):
        given, missing = ("key", "value") if value is None else ("value", "key")
        raise ValueError(f"{missing}: expected a tensor when {given} is given (both or neither), got None")
    new = 0
    if key is not None:
        key = _check_tensor("key", key, 4, "(batch, heads_kv, seqlen_new, head_dim)")
        value = _check_tensor("value", value, 4, "(batch, heads_kv, seqlen_new, head_dim_v)")
        _check_like("key", key, query)
        _check_like("value", value, query)
        new = key.shape[2]
        expected_k = (batch, heads_kv, new, head_dim)
        expected_v = (batch, heads_kv, new, value_cache.shape[3])
        if tuple(key.shape) != expected_k:
            raise ValueError(
                f"key: expected shape {expected_k} (batch, heads_kv, seqlen_new, head_dim), got {_shape(key)}"
            )
        if tuple(value.shape) != expected_v:
            raise ValueError(f"value: expected shape {expected_v} (key's, value_cache's head dim), got {_shape(value)}")
    _check_no_grad({"query": query, "key_cache": key_cache, "value_cache": value_cache, "key": key, "value": value})
    if num_splits is not None:
        if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral) or num_splits < 1:
            raise ValueError(f"num_splits: expected None (choose) or an integer >= 1, got {num_splits!r}")
    params = AttnParams(
        batch=batch,
        heads_q=heads_q,
        heads_kv=heads_kv,
        seqlen_q=seqlen_q,
        seqlen_k=capacity,
        head_dim=head_dim,
        head_dim_v=value_cache.shape[3],
        dtype=query.dtype,
        device=query.device,
        scale=_check_scale(scale, head_dim),
        causal=_check_bool("is_causal", is_causal),
        window=_check_window(window),
        alibi=_check_alibi(alibi_slopes, query, False),
        sinks=_check_sinks(sinks, query),
        layout="paged" if paged else "kvcache",
        **check_score_rules({"softcap": softcap}),
    )
    if _check_bool("check_values", check_values) and _host_can_read(query.device):
        _check_values(cache_seqlens, block_table, new, capacity, page, slots)
    return params, int(num_splits or 0)


def kvcache_attention(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    cache_seqlens: Tensor,
    *,
    key: Optional[Tensor] = None,
    value: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    is_causal: bool = True,
    window: Optional[tuple[int, int]] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    num_splits: Optional[int] = None,
    backend: Optional[str] = None,
    check_values: bool = True,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention of new queries over a key/value cache (FlashAttention's ``flash_attn_with_kvcache``); forward only.

    Shapes::

        query        (B, Hq, Lq, D)
        key_cache    (B, Hkv, Lmax, D)                    contiguous, or
                     (num_pages, Hkv, page_size, D)       paged, with block_table (B, pages_per_seq) int32
        value_cache  like key_cache, last dim Dv
        cache_seqlens (B,) int32: keys cached per sequence before this call (not changed by it)
        key, value   (B, Hkv, Lnew, D|Dv) or None: written into the caches in place at positions
                     cache_seqlens[b] ... cache_seqlens[b] + Lnew - 1 (through block_table when paged)
        out          (B, Hq, Lq, Dv);  lse (B, Hq, Lq) float32 (float64 for float64 inputs), natural log

    Sequence ``b`` attends its ``total_b = cache_seqlens[b] + Lnew`` keys; query ``i`` sits at key position
    ``total_b - Lq + i`` (bottom-right alignment) for ``is_causal`` (default True, as decoding needs),
    ``window=(left, right)`` and ALiBi. ``softcap``, ``alibi_slopes`` (``(Hq,)`` or ``(B, Hq)``), ``sinks``
    (``(Hq,)``), ``scale`` and ``enable_gqa`` are those of ``fastattn.scaled_dot_product_attention``; with GQA the
    kernels read each key/value head once for its whole group of query heads. A row that attends nothing gives
    zeros (lse = the sink's logit, or -inf).

    ``num_splits``: how many parts the keys of one sequence are split into (across programs on a GPU, threads
    on the CPU), merged exactly through their lse; None chooses from the batch, heads and the machine; 1 forces
    no split. Results agree within rounding whatever the split.

    Every input is checked before anything is written: a bad one raises an error naming it and leaves both
    caches bit-identical. Slots outside the appended positions are never written. Two sequences whose block
    tables name the same page would write into each other's keys: page tables are the caller's to keep
    disjoint (as in vLLM and FlashAttention).

    ``check_values``: the values of ``cache_seqlens`` and ``block_table`` (lengths within the capacity, pages in
    range) are checked on the host, which on a GPU waits for the stream once per call. ``False`` skips that
    check, and the call then never synchronizes: values out of range are the caller's to prevent, as in
    FlashAttention (the kernels would read and write outside the caches). The check is skipped anyway while
    torch.compile traces and while a CUDA graph is being captured, where the host cannot read them.
    """
    params, splits = validate_kvcache(
        query, key_cache, value_cache, cache_seqlens, key, value, block_table, is_causal, window, softcap,
        alibi_slopes, sinks, scale, enable_gqa, num_splits, check_values,
    )  # fmt: skip
    return_lse = _check_bool("return_lse", return_lse)
    chosen = choose(backend, params)
    out, lse = chosen.kvcache_forward(
        query, key_cache, value_cache, cache_seqlens, key, value, block_table, params, splits
    )
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------- shared by backends


def append_(
    key_cache: Tensor,
    value_cache: Tensor,
    cache_seqlens: Tensor,
    key: Optional[Tensor],
    value: Optional[Tensor],
    block_table: Optional[Tensor],
) -> None:
    """Writes ``key``/``value`` ``(B, Hkv, Lnew, D)`` at positions ``cache_seqlens[b] + [0, Lnew)``, in place.

    One scatter per cache on the device (no host read): ``(page, slot)`` of every new position, from the block
    table or, for a contiguous cache, page ``b`` and slot = position.
    """
    if key is None or key.shape[2] == 0:
        return
    batch, new = key.shape[0], key.shape[2]
    pos = cache_seqlens.long().unsqueeze(1) + torch.arange(new, device=key.device)  # (B, Lnew)
    if block_table is None:
        pages, slots = torch.arange(batch, device=key.device).unsqueeze(1).expand(batch, new), pos
    else:
        page_size = key_cache.shape[2]
        pages = block_table.long().gather(1, torch.div(pos, page_size, rounding_mode="floor"))
        slots = pos % page_size
    # cache[pages, :, slots] indexes (B, Lnew, Hkv, D) (the two index tensors around a slice go first):
    # (B, Hkv, Lnew, D) → (B, Lnew, Hkv, D)
    key_cache[pages, :, slots] = key.permute(0, 2, 1, 3)
    value_cache[pages, :, slots] = value.permute(0, 2, 1, 3)


def gather(cache: Tensor, b: int, length: int, block_table: Optional[Tensor]) -> Tensor:
    """Sequence ``b``'s first ``length`` cached rows as ``(Hkv, length, D)`` (a copy when paged; for the oracle)."""
    if block_table is None:
        return cache[b, :, :length]
    page_size = cache.shape[2]
    used = -(-length // page_size)
    pages = cache[block_table[b, :used].long()]  # (used, Hkv, page_size, D)
    # (used, Hkv, page_size, D) → (Hkv, used * page_size, D)
    return pages.transpose(0, 1).reshape(cache.shape[1], used * page_size, cache.shape[3])[:, :length]


def choose_splits(programs: int, workers: int, capacity: int, min_keys: int) -> int:
    """Splits of each sequence's keys: enough ``(batch, kv head, split)`` tasks for ``2 * workers`` (threads or
    SMs) when ``programs`` (batch times kv heads) alone are fewer, none shorter than ``min_keys`` of the
    cache's ``capacity`` (a split's fixed cost is its share of the merge)."""
    if programs >= 2 * workers:
        return 1
    want = -(-2 * workers // max(programs, 1))
    return max(1, min(want, capacity // max(min_keys, 1), 256))


def merge_splits(out: Tensor, lse: Tensor, sinks: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Exact merge of ``S`` partial softmaxes: ``out (S, B, Hq, Lq, Dv)`` fp32 and ``lse (S, B, Hq, Lq)``, each
    over its own keys (-inf: none), into ``(out (B, Hq, Lq, Dv), lse (B, Hq, Lq))`` with the sink's logit added
    to the denominator once: ``lse = logsumexp_s(lse_s)``, ``out = sum_s exp(lse_s - lse) out_s``."""
    if sinks is not None:
        sink = sinks.to(lse.dtype)[None, None, :, None].expand(1, *lse.shape[1:])
        lse = torch.cat([lse, sink], 0)
        out = torch.cat([out, out.new_zeros(1, *out.shape[1:])], 0)
    top = lse.amax(0)
    safe = torch.where(torch.isneginf(top), 0.0, top)
    weight = torch.exp(lse - safe)  # (S, B, Hq, Lq); 0 for empty parts
    total = weight.sum(0)
    merged = (out * weight.unsqueeze(-1)).sum(0) / torch.where(total > 0, total, 1.0).unsqueeze(-1)
    return merged, torch.where(total > 0, safe + torch.log(total), float("-inf"))
