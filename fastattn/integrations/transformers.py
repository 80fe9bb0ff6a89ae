"""fastattn as an attention implementation of Hugging Face transformers.

::

    import fastattn.integrations.transformers as fastattn_hf

    fastattn_hf.register()  # idempotent; registers the name "fastattn"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fastattn")
    # or: Model._from_config(config, attn_implementation="fastattn"), model.set_attn_implementation("fastattn")

transformers needs two functions under one name, and ``register`` installs both: with only an
attention function, transformers hands it ``attention_mask=None`` and padded batches come out wrong
(measured with 5.23).

* The **mask function** (``AttentionMaskInterface``) answers transformers' mask request. When the
  pattern is structural (causal, bidirectional, causal or bidirectional sliding window, Llama 4's
  chunked causal, each with an optional key-padding mask) it returns a ``CompactMask``: ``is_causal``,
  ``window``, ``chunk``, ``q_offset`` and a ``(B, 1, 1, Lk)`` boolean padding mask, so no
  ``(B, 1, Lq, Lk)`` tensor is built and the kernels' tile skipping applies. Packed documents
  (transformers detected ``position_ids`` restarting, with no padding mask and no cache) give a
  ``CompactMask`` that carries the document ids instead. It recognises the pattern by identity with
  transformers' own mask functions, never by evaluating them; any other pattern (or/and overlays,
  block-wise masks, chunks that left padding or a dropped cache prefix shifts off the chunk grid, packed
  chunked documents, a model that asks for a materialised mask, a static-cache offset or packed documents
  under tracing) gets transformers' dense boolean ``sdpa_mask``.
* The **attention function** (``AttentionInterface``) maps transformers' call onto
  ``fastattn.scaled_dot_product_attention``: GQA through ``enable_gqa`` (no ``repeat_kv`` copy),
  gpt-oss's attention sinks (``s_aux``), Gemma 2's logit ``softcap``, dropout only while the module
  trains, output in transformers' ``(B, Lq, H, Dv)`` layout. What it cannot honour (returning
  attention weights, a head mask, a paged cache) is refused with an error naming the feature and the
  model, never ignored.
* **Decoding steps** (a few new queries after the cached keys of a ``DynamicCache``, plain or sliding-window,
  with no padding, under ``torch.no_grad``) go to ``fastattn.kvcache_attention`` over the cache transformers
  has just appended to: split-KV over the keys, each key/value head read once for its GQA group. Padded
  batches, static caches, Llama 4's chunked layers, training and ``torch.compile`` stay on
  ``scaled_dot_product_attention`` (``_decode_step`` says why for each).
* **Bloom** computes its attention itself (ALiBi added to the mask, no attention function), so
  ``register`` also routes ``BloomAttention`` to fastattn with in-kernel ALiBi when the model runs
  under a registered name (:func:`bloom_attention_forward`); other implementations keep Bloom's own.

**Packed documents** (padding-free training, ``DataCollatorWithFlattening``) go to
``fastattn.varlen_attention``, each document attending only itself, as transformers' FlashAttention path
does, in this order: the collator's ``cu_seq_lens_q``/``cu_seq_lens_k`` + ``max_length_q``/``max_length_k``
keywords (``return_flash_attn_kwargs=True``; the ``torch.compile`` path, nothing is read on the host); a
packed ``CompactMask``; or, with no mask beyond plain causal, ``position_ids`` that restart inside one row
(read on the host, as FlashAttention's path does). The last matters: with a cache (``use_cache`` defaults to
True, in training too) transformers does not look for packing when it builds masks, and ``"eager"`` and
``"sdpa"`` then let documents attend each other (measured with 5.24: relative logit error about 1). A padding
mask takes precedence over the packed keywords, as in FlashAttention's path.

**Padded batches** with at least 1/8 padding tokens and no cache (training, a prefill) are unpadded: each
row's run of real tokens becomes one ``varlen_attention`` sequence and the output is scattered back, zeros at
the padding (1.2-1.55x the compact mask's speed on the CPU at 25-53% padding, 0.94-1.03x at 6%:
``benchmarks/results/varlen-padded-cpu-epyc-2core-2026-12-05.md``). Below that, with a cache, or for masks
that are not one run per row, the compact mask stays.

Positions: transformers places a mask by the absolute position of the first query (``q_offset``)
and of the first key (``kv_offset``, non-zero for a sliding-window cache that dropped old keys);
fastattn's ``q_offset`` is the key index of query 0, their difference: ``Lk - Lq`` for a plain
key/value cache, FlashAttention's bottom-right alignment.

Tested with transformers 5.24.0 (the mask-interface keywords ``q_offset``/``kv_offset`` appeared
in 5.x; 4.x passed ``cache_position`` and is refused).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from ..functional import scaled_dot_product_attention as _fastattn_sdpa
from ..functional import varlen_attention as _fastattn_varlen
from ..kvcache import kvcache_attention as _fastattn_kvcache

__all__ = ["CompactMask", "attention_forward", "bloom_attention_forward", "mask_function", "register"]

_MIN_VERSION = (5, 0)


@dataclass(frozen=True)
class CompactMask:
    """A structural attention mask, as the mask function hands it to the attention function.

    ``padding``: ``(B, 1, 1, Lk)`` bool (True = attend) or None; for Bloom, whose own code cannot take a
    boolean mask, also the dense ``(B, 1, Lq, Lk)`` one of the patterns that are not structural.
    ``is_causal``, ``window`` (``(left, right)``, -1 unbounded, or None) and ``chunk`` (0: none) in
    fastattn's sense; ``q_offset``: the key index of query 0. ``q_length``/``kv_length`` are the sizes
    transformers asked for, checked against the query and key the attention function receives.
    ``implementation``: the registered name the mask was built for (Bloom's route reads its backend);
    ``dense``: ``padding`` is the whole pattern, materialised (causality and offsets included).
    ``documents``: for packed documents, transformers' ``(B, L)`` document index of every token
    (``find_packed_sequence_indices``); the band then applies inside each document, and ``packed_layout``
    gives the offsets of the flattened ``B * L`` tokens.
    """

    padding: Optional[Tensor]
    is_causal: bool
    window: Optional[tuple[int, int]]
    q_offset: int
    q_length: int
    kv_length: int
    chunk: int = 0
    implementation: Optional[str] = None
    dense: bool = False
    documents: Optional[Tensor] = None
    _layout: dict = field(default_factory=dict, repr=False, compare=False)

    def packed_layout(self) -> tuple[Tensor, int]:
        """``(cu_seqlens (D + 1,) int32, longest document)`` of the ``B * L`` tokens, computed once per mask.

        Every layer reuses the one mask object, so the host reads the document ids once per forward.
        """
        if not self._layout:
            docs = self.documents
            rows, length = docs.shape
            # (B, L) document ids → ids unique over the flattened B·L tokens (a row never continues the previous one).
            flat = (docs + torch.arange(rows, device=docs.device).unsqueeze(1) * (length + 1)).reshape(-1)
            starts = (torch.diff(flat) != 0).nonzero().reshape(-1) + 1
            edges = torch.tensor([0], device=docs.device), starts, torch.tensor([flat.numel()], device=docs.device)
            cu = torch.cat(edges).to(torch.int32)
            self._layout["value"] = (cu, int(torch.diff(cu).max()))
        return self._layout["value"]

    def to_dense(self) -> Tensor:
        """The same mask as a dense ``(B|1, 1, Lq, Lk)`` boolean (for inspection and tests only)."""
        from ..variants import allowed

        left, right = self.window if self.window is not None else (-1, -1)
        if self.is_causal:
            right = 0 if right < 0 else min(right, 0)
        device = self.padding.device if self.padding is not None else "cpu"
        band = allowed(self.q_length, self.kv_length, left, right, self.q_offset, self.chunk, device)
        # (Lq, Lk) → (1, 1, Lq, Lk)
        band = band.view(1, 1, self.q_length, self.kv_length)
        return band if self.padding is None else band & self.padding


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


@functools.lru_cache(maxsize=1)
def _code_objects() -> dict[str, Any]:
    """Code objects of transformers' mask closures, to recognise them by identity."""
    from transformers import masking_utils as mu

    positions = torch.zeros(1, 1, dtype=torch.long)
    return {
        "and": mu.and_masks(mu.causal_mask_function).__code__,
        "sliding": mu.sliding_window_overlay(1).__code__,
        "sliding_bidirectional": mu.sliding_window_bidirectional_overlay(1).__code__,
        "chunked": mu.chunked_overlay(1, torch.zeros(1)).__code__,
        "packed": mu.packed_sequence_mask_function(positions).__code__,
        "remap": mu.remap_positions_for_packed_sequence(mu.causal_mask_function, positions).__code__,
    }


def _cell(fn: Callable, name: str) -> Any:
    """The value of the free variable ``name`` of closure ``fn``."""
    return fn.__closure__[fn.__code__.co_freevars.index(name)].cell_contents


def _structure(mask_fn: Callable) -> Optional[tuple[bool, Optional[tuple[int, int]], int, Optional[Tensor]]]:
    """``(is_causal, window, chunk, left_padding)`` of a transformers mask function, or None when it is not
    structural. ``left_padding`` is the chunked overlay's per-row shift of the chunk grid (None otherwise)."""
    from transformers import masking_utils as mu

    if mask_fn is mu.causal_mask_function:
        return True, None, 0, None
    if mask_fn is mu.bidirectional_mask_function:
        return False, None, 0, None
    codes = _code_objects()
    if getattr(mask_fn, "__code__", None) is not codes["and"]:
        return None
    parts = _cell(mask_fn, "mask_functions")
    if len(parts) != 2:
        return None
    overlay, base = parts
    code = getattr(overlay, "__code__", None)
    if code is codes["sliding"] and base is mu.causal_mask_function:
        size = _cell(overlay, "sliding_window")
        # kv_idx > q_idx - size: the size - 1 previous keys and the query's own.
        if isinstance(size, int) and size >= 1:
            return True, (size - 1, 0), 0, None
    elif code is codes["sliding_bidirectional"] and base is mu.bidirectional_mask_function:
        size = _cell(overlay, "sliding_window")
        # abs(q_idx - kv_idx) <= size
        if isinstance(size, int) and size >= 0:
            return False, (size, size), 0, None
    elif code is codes["chunked"] and base is mu.causal_mask_function:
        # (kv_idx - left_padding[b]) // size == (q_idx - left_padding[b]) // size
        size, left_padding = _cell(overlay, "chunk_size"), _cell(overlay, "left_padding")
        if isinstance(size, int) and size >= 1 and isinstance(left_padding, Tensor):
            return True, None, size, left_padding
    return None


def _on_chunk_grid(chunk: int, left_padding: Optional[Tensor], kv_offset: Any) -> bool:
    """Whether transformers' chunks are the kernels'. transformers counts them from each row's first real
    token in absolute positions, ``(kv_offset + j - pad[b]) // chunk``; the kernels from key 0 of the keys
    passed, ``j // chunk`` (and the query's ``i + q_offset`` alike). They agree when ``kv_offset - pad[b]``
    is a multiple of the chunk for every row. Needs the values, so never under tracing."""
    if chunk == 0:
        return True
    if _tracing():
        return False
    shift = int(kv_offset) - (left_padding if left_padding is not None else torch.zeros(1, dtype=torch.long))
    return bool((shift % chunk == 0).all())


def _packed_structure(mask_fn: Callable) -> Optional[tuple[bool, Optional[tuple[int, int]], Tensor]]:
    """``(is_causal, window, document ids)`` of transformers' packed-documents mask function, or None.

    transformers builds it as ``and_masks(remap_positions_for_packed_sequence(base, position_ids),
    packed_sequence_mask_function(documents))``: ``base`` applied to the positions inside each document, and
    no pair across documents. A structural ``base`` on positions that restart at each document and grow by one
    is that band on each document alone.
    """
    codes = _code_objects()
    if getattr(mask_fn, "__code__", None) is not codes["and"]:
        return None
    parts = _cell(mask_fn, "mask_functions")
    if len(parts) != 2:
        return None
    remapped, packed = parts
    if (
        getattr(remapped, "__code__", None) is not codes["remap"]
        or getattr(packed, "__code__", None) is not codes["packed"]
    ):
        return None
    structure = _structure(_cell(remapped, "mask_function"))
    if structure is None or structure[2]:  # not structural, or chunked (its grid shift not checked here)
        return None
    is_causal, window, _, _ = structure
    return is_causal, window, _cell(packed, "packed_sequence_mask")


def mask_function(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: Any = 0,
    mask_function: Optional[Callable] = None,
    attention_mask: Optional[Tensor] = None,
    allow_is_causal_skip: bool = True,
    allow_is_bidirectional_skip: bool = False,
    **kwargs: Any,
) -> Any:
    """transformers' mask-interface call (the keywords of ``masking_utils.sdpa_mask``) → a mask.

    Returns a ``CompactMask`` for the structural patterns, else transformers' dense boolean
    ``(B, 1, Lq, Lk)`` mask (for Bloom inside a ``CompactMask``). ``allow_*_skip=False`` means the model
    itself manipulates the mask tensor (falcon, doge, ...), so it gets the dense one.
    """
    from transformers import masking_utils as mu

    config = kwargs.get("config")
    implementation = getattr(config, "_attn_implementation", None)
    if mask_function is None:
        mask_function = mu.causal_mask_function
    structure = _structure(mask_function)
    offsets_known = not (_tracing() and (isinstance(q_offset, Tensor) or isinstance(kv_offset, Tensor)))
    packed = _packed_structure(mask_function)
    # Packed documents without padding or a cache (transformers' own conditions for this pattern); under tracing
    # the document boundaries cannot be read without a graph break, and the dense mask is used.
    if packed is not None and attention_mask is None and q_length == kv_length and not _tracing():
        is_causal, window, documents = packed
        if documents.shape == (batch_size, q_length):
            return CompactMask(
                padding=None,
                is_causal=is_causal,
                window=window,
                q_offset=0,
                q_length=q_length,
                kv_length=kv_length,
                documents=documents,
            )
    if structure is not None and offsets_known and _on_chunk_grid(structure[2], structure[3], kv_offset):
        is_causal, window, chunk, _ = structure
        if allow_is_causal_skip if is_causal else allow_is_bidirectional_skip:
            padding = None
            if attention_mask is not None:
                kv_offset = int(kv_offset)
                padding = mu.prepare_padding_mask(attention_mask.to(torch.bool), kv_length, kv_offset)
                padding = padding[:, kv_offset : kv_offset + kv_length]
                if not _tracing() and bool(padding.all()):
                    padding = None
                else:
                    # (B, Lk) → (B, 1, 1, Lk)
                    padding = padding[:, None, None, :]
            return CompactMask(
                padding=padding,
                is_causal=is_causal,
                window=window,
                q_offset=int(q_offset) - int(kv_offset),
                q_length=q_length,
                kv_length=kv_length,
                chunk=chunk,
                implementation=implementation,
            )
    dense = mu.sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        **kwargs,
    )
    if getattr(config, "model_type", None) == "bloom":
        # Bloom adds whatever mask it gets to its scores: a boolean one would silently add 0/1, so it travels
        # in a CompactMask, which routes Bloom's attention to fastattn (``bloom_attention_forward``).
        return CompactMask(
            padding=dense,
            is_causal=False,
            window=None,
            q_offset=0,
            q_length=q_length,
            kv_length=kv_length,
            implementation=implementation,
            dense=True,
        )
    return dense


# The most queries per sequence a step may have to go to ``kvcache_attention``: its kernels put a GQA group's
# queries in one program, sized for decoding (one token, or a few with speculative decoding).
_DECODE_MAX_QUERIES = 16


def _decode_step(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Optional[Tensor],
    dropout_p: float,
    causal: bool,
    window: Optional[tuple[int, int]],
    q_offset: int,
    chunk: int,
    sinks: Optional[Tensor],
) -> bool:
    """Whether this call is a decoding step over a key/value cache that ``fastattn.kvcache_attention`` computes
    exactly: a few queries (at most ``_DECODE_MAX_QUERIES``) after cached keys, placed bottom-right (query
    ``i`` at key ``Lk - Lq + i``, a plain or sliding-window ``DynamicCache``) or attending every key, with no
    padding or float mask, no dropout, no chunk and nothing that needs a gradient (the call is forward only).

    The steps that stay on ``scaled_dot_product_attention``: batches with padding (the mask has no place in
    the decode kernels), static caches (transformers then asks for a dense mask), Llama 4's chunked layers,
    training, and anything under ``torch.compile`` or ``torch.jit`` tracing (this route is not tested there;
    transformers compiles decoding over a static cache, which stays on ``scaled_dot_product_attention`` anyway).
    The lengths passed are the cache's own, valid by construction: the call does not read them on the host.
    """
    lq, lk = query.shape[2], key.shape[2]
    if not 0 < lq <= _DECODE_MAX_QUERIES or lk <= lq or mask is not None or dropout_p or chunk or _tracing():
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (query, key, value, sinks)):
        return False
    return q_offset == lk - lq or (not causal and window is None)


def _model_name(module: torch.nn.Module) -> str:
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    return f"{model_type} ({type(module).__name__})" if model_type else type(module).__name__


def _refuse(feature: str, module: torch.nn.Module) -> None:
    raise NotImplementedError(
        f"fastattn cannot honour {feature}, which the model {_model_name(module)} asked for; "
        "load it with attn_implementation='eager' or 'sdpa' instead"
    )


def _sinks(module: torch.nn.Module, kwargs: dict) -> Optional[Tensor]:
    """The attention sinks a model passes (gpt-oss: ``s_aux``), or its module's ``sinks`` parameter, or None."""
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    sinks = getattr(module, "sinks", None)
    return sinks if isinstance(sinks, Tensor) else None


def _check_supported(module: torch.nn.Module, attention_mask: Any, kwargs: dict) -> None:
    if kwargs.get("head_mask") is not None:
        _refuse("a head_mask", module)
    if kwargs.get("output_attentions"):
        _refuse("output_attentions=True (fastattn never forms the attention weights)", module)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if (
        isinstance(attention_mask, dict)
        or type(cache).__name__ == "PagedAttentionCache"
        or any(kwargs.get(name) is not None for name in ("block_table", "read_index", "write_index"))
    ):
        _refuse("a paged key/value cache (continuous batching)", module)


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    *,
    backend: Optional[str] = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention-interface call → ``fastattn.scaled_dot_product_attention``.

    query ``(B, Hq, Lq, D)``, key/value ``(B, Hkv, Lk, D|Dv)`` → ``((B, Lq, Hq, Dv), None)``.
    ``attention_mask`` is a ``CompactMask``, a dense tensor (bool, or float added to the scores),
    or None; with None, causality follows the ``is_causal`` keyword or the module's flag and, as
    in transformers' SDPA integration, is top-left aligned and dropped for a single query.
    """
    _check_supported(module, attention_mask, kwargs)
    packed = _packed_call(module, query, key, attention_mask, is_causal, kwargs)
    if packed is not None:
        variant = {"softcap": kwargs.get("softcap"), "sinks": _sinks(module, kwargs)}
        return _varlen_forward(module, query, key, value, dropout, scaling, backend, *packed, **variant)
    unpadded = _unpad_layout(query, key, attention_mask, kwargs)
    if unpadded is not None:
        variant = {"softcap": kwargs.get("softcap"), "sinks": _sinks(module, kwargs)}
        tokens, cu, longest = unpadded
        mask = attention_mask
        return _varlen_forward(
            module, query, key, value, dropout, scaling, backend, cu, cu, longest, longest, mask.is_causal,
            mask.window, tokens=tokens, **variant,
        )  # fmt: skip
    lq, lk = query.shape[2], key.shape[2]
    window: Optional[tuple[int, int]] = None
    q_offset, chunk = 0, 0
    if isinstance(attention_mask, CompactMask):
        if (attention_mask.q_length, attention_mask.kv_length) != (lq, lk):
            raise ValueError(
                f"attention_mask: the mask built for {_model_name(module)} expects (query, key) lengths "
                f"({attention_mask.q_length}, {attention_mask.kv_length}), got ({lq}, {lk})"
            )
        mask, causal = attention_mask.padding, attention_mask.is_causal
        window, q_offset, chunk = attention_mask.window, attention_mask.q_offset, attention_mask.chunk
        sliding = kwargs.get("sliding_window")
        if sliding is not None and attention_mask.is_causal and window is not None and window != (sliding - 1, 0):
            raise ValueError(
                f"sliding_window: {_model_name(module)} passed {sliding}, but its mask has window {window}"
            )
    elif attention_mask is None or isinstance(attention_mask, Tensor):
        mask = attention_mask
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(causal) and lq > 1 and mask is None
    else:
        raise TypeError(
            f"attention_mask: expected a fastattn CompactMask, a tensor or None for {_model_name(module)}, "
            f"got {type(attention_mask).__name__} (was the model's mask built under another attn_implementation?)"
        )

    bias = kwargs.get("position_bias")
    if bias is not None:
        # An additive per-head bias: fold the boolean mask into it (-inf where not attended).
        if mask is None:
            mask = bias
        elif mask.dtype == torch.bool:
            mask = bias.masked_fill(~mask, float("-inf"))
        else:
            mask = bias + mask

    dropout_p = float(dropout) if module.training else 0.0
    sinks = _sinks(module, kwargs)
    if _decode_step(query, key, value, mask, dropout_p, causal, window, q_offset, chunk, sinks):
        out = _fastattn_kvcache(
            query,
            key,
            value,
            # key/value already hold this step's keys (the cache appended them): nothing to append here
            torch.full((query.shape[0],), lk, dtype=torch.int32, device=query.device),
            is_causal=causal,
            window=window,
            softcap=kwargs.get("softcap"),
            sinks=sinks,
            scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
            backend=backend,
            # every length is lk, key's own: valid by construction, so no device read (a sync on a GPU) per layer
            check_values=False,
        )
        # (B, Hq, Lq, Dv) → (B, Lq, Hq, Dv)
        return out.transpose(1, 2).contiguous(), None
    out = _fastattn_sdpa(
        query,
        key,
        value,
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=causal,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
        window=window,
        q_offset=q_offset,
        softcap=kwargs.get("softcap"),
        sinks=sinks,
        chunk=chunk or None,
        backend=backend,
    )
    # (B, Hq, Lq, Dv) → (B, Lq, Hq, Dv)
    return out.transpose(1, 2).contiguous(), None


def _alibi_slopes(num_heads: int, device: torch.device) -> Tensor:
    """ALiBi's per-head slopes (Press et al.), float32 ``(H,)``, in Bloom's arithmetic (float32 powers), so equal
    to its bits: ``(2^(-8/n))^h`` for ``h = 1..n``, ``n`` the largest power of two not above ``num_heads``, and
    the remaining heads ``(2^(-4/n))^h`` for odd ``h``."""
    n = 2 ** math.floor(math.log2(num_heads))
    powers = torch.arange(1, n + 1, device=device, dtype=torch.int32)
    slopes = torch.pow(torch.tensor(2.0 ** (-8.0 / n), device=device), powers)
    if n != num_heads:
        extra = torch.arange(1, 2 * (num_heads - n), 2, device=device, dtype=torch.int32)
        slopes = torch.cat([slopes, torch.pow(torch.tensor(2.0 ** (-4.0 / n), device=device), extra)])
    return slopes


def _one_run(padding: Tensor) -> bool:
    """Whether every row of a ``(B, 1, 1, Lk)`` key padding attends one contiguous run of keys."""
    rows = padding.reshape(padding.shape[0], -1)
    starts = rows[:, :1].int() + (rows[:, 1:] & ~rows[:, :-1]).sum(dim=1, keepdim=True)
    return bool((starts <= 1).all())


def bloom_attention_forward(
    module: torch.nn.Module,
    hidden_states: Tensor,
    residual: Tensor,
    alibi: Tensor,
    attention_mask: CompactMask,
    layer_past: Any = None,
    output_attentions: bool = False,
) -> tuple[Tensor, None]:
    """``BloomAttention.forward`` with fastattn and in-kernel ALiBi: ``hidden_states (B, L, H*D)`` → output
    ``(B, L, H*D)`` after the output projection, dropout and residual, as Bloom's own.

    Bloom adds ``slope * (position among the row's real tokens)`` of each key to the scores; within a causal
    row that differs from fastattn's ``-slope * |i + q_offset - j|`` by a per-row constant, which the softmax
    ignores, as long as the row's real tokens are one contiguous run (left or right padding, a cache). A key
    padding with holes (or one whose values cannot be read, under tracing) and a dense mask (which carries
    no query positions: ``q_offset`` is 0 there) use Bloom's own ``alibi`` tensor instead, as a
    ``(B, H, 1, Lk)`` float bias broadcast over the queries (no ``(Lq, Lk)`` tensor per head, but no longer
    in-kernel).
    """
    if output_attentions:
        _refuse("output_attentions=True (fastattn never forms the attention weights)", module)
    batch, q_length, _ = hidden_states.shape
    heads = module.num_heads
    # (B, L, 3*H*D) → 3 × (B, H, L, D), views
    query, key, value = module._reshape(module.query_key_value(hidden_states))
    if layer_past is not None:
        key, value = layer_past.update(key, value, module.layer_idx)
    lk = key.shape[2]
    if (attention_mask.q_length, attention_mask.kv_length) != (q_length, lk):
        raise ValueError(
            f"attention_mask: the mask built for {_model_name(module)} expects (query, key) lengths "
            f"({attention_mask.q_length}, {attention_mask.kv_length}), got ({q_length}, {lk})"
        )
    padding = attention_mask.padding
    in_kernel = not attention_mask.dense and (padding is None or (not _tracing() and _one_run(padding)))
    slopes, mask = None, padding
    if in_kernel:
        slopes = _alibi_slopes(heads, query.device) * module.beta
    else:
        # (B*H, 1, Lk) → (B, H, 1, Lk), Bloom's own bias, plus -inf where the boolean mask says no
        bias = (module.beta * alibi).reshape(batch, heads, 1, -1)[..., :lk].to(query.dtype)
        mask = bias if padding is None else bias.masked_fill(~padding, float("-inf"))
    backend_fn = _REGISTERED.get(attention_mask.implementation or "")
    context = _fastattn_sdpa(
        query,
        key,
        value,
        attn_mask=mask,
        dropout_p=module.attention_dropout.p if module.training else 0.0,
        is_causal=attention_mask.is_causal,
        scale=module.inv_norm_factor,
        window=attention_mask.window,
        q_offset=attention_mask.q_offset,
        chunk=attention_mask.chunk or None,
        alibi_slopes=slopes,
        backend=getattr(backend_fn, "_fastattn_backend", None),
    )
    # (B, H, L, D) → (B, L, H*D)
    context = context.transpose(1, 2).reshape(batch, q_length, -1)
    if module.pretraining_tp > 1 and module.slow_but_exact:
        # Bloom's tensor-parallel emulation: the projection in slices, without its bias (as Bloom's own).
        slices = module.hidden_size / module.pretraining_tp
        output = torch.zeros_like(context)
        for i in range(module.pretraining_tp):
            lo, hi = int(i * slices), int((i + 1) * slices)
            output = output + torch.nn.functional.linear(context[:, :, lo:hi], module.dense.weight[:, lo:hi])
    else:
        output = module.dense(context)
    output = residual + torch.nn.functional.dropout(output, module.hidden_dropout, module.training)
    return output, None


def _route_bloom() -> None:
    """Sends ``BloomAttention`` to fastattn when its mask is a ``CompactMask`` (built by fastattn's mask
    function, so the model runs under a fastattn name); any other mask keeps Bloom's own code. Idempotent."""
    try:
        from transformers.models.bloom import modeling_bloom
    except ImportError:
        return
    cls = modeling_bloom.BloomAttention
    if getattr(cls.forward, "_fastattn_bloom", False):
        return
    own = cls.forward

    @functools.wraps(own)
    def forward(
        self,
        hidden_states,
        residual,
        alibi,
        attention_mask,
        layer_past=None,
        use_cache=False,
        output_attentions=False,
        **kwargs,
    ):
        if isinstance(attention_mask, CompactMask):
            return bloom_attention_forward(
                self, hidden_states, residual, alibi, attention_mask, layer_past, output_attentions
            )
        return own(
            self, hidden_states, residual, alibi, attention_mask, layer_past, use_cache, output_attentions, **kwargs
        )

    forward._fastattn_bloom = True
    cls.forward = forward


def _as_int(value: Any, fallback: int) -> int:
    """A maximum length as a Python int: read on the host eagerly; under tracing, ``fallback`` (an upper bound)."""
    if isinstance(value, Tensor):
        return fallback if _tracing() else int(value)
    return int(value)


# position_ids tensors already read, by id: (weak reference, version counter, the packed layout or None). Every
# layer of a forward receives the same tensor; the host reads it once per forward, not once per layer.
_POSITIONS_READ: dict[int, tuple[Any, int, Optional[tuple[Tensor, int]]]] = {}


def _position_layout(position_ids: Any, batch: int, length: int) -> Optional[tuple[Tensor, int]]:
    """``(cu_seqlens, longest)`` when ``position_ids`` mark packed documents in one row, else None.

    FlashAttention's test (``_is_packed_sequence``: one row whose positions are not one increasing run) and its
    boundaries (``prepare_fa_kwargs_from_position_ids``: a document starts where the position is the row's
    minimum).
    """
    if not isinstance(position_ids, Tensor) or batch != 1 or length == 1 or position_ids.shape[-1] != length:
        return None
    if _tracing():  # reading the positions would break the graph: the collator's keywords are the compiled path
        return None
    try:
        version = position_ids._version
    except RuntimeError:  # an inference tensor: no version counter, read it every time
        version = None
    seen = _POSITIONS_READ.get(id(position_ids))
    if version is not None and seen is not None and seen[0]() is position_ids and seen[1] == version:
        return seen[2]
    pos = position_ids.reshape(-1)
    layout = None
    if bool((torch.arange(length, device=pos.device) + pos.min() != pos).any()):
        from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

        (cu, _), (longest, _) = prepare_fa_kwargs_from_position_ids(position_ids)
        layout = (cu, int(longest))
    if version is not None:
        if len(_POSITIONS_READ) > 16:
            _POSITIONS_READ.clear()
        _POSITIONS_READ[id(position_ids)] = (weakref.ref(position_ids), version, layout)
    return layout


def _packed_call(
    module: torch.nn.Module, query: Tensor, key: Tensor, attention_mask: Any, is_causal: Optional[bool], kwargs: dict
) -> Optional[tuple[Tensor, Tensor, int, int, bool, Optional[tuple[int, int]]]]:
    """``(cu_seqlens_q, cu_seqlens_k, max_q, max_k, is_causal, window)`` when this call is packed documents, else None.

    Only without a padding mask and with queries and keys of the same tokens (``Lq == Lk``: no cached prefix).
    """
    batch, lq, lk = query.shape[0], query.shape[2], key.shape[2]
    compact = isinstance(attention_mask, CompactMask)
    if attention_mask is not None and not compact:
        return None  # a dense mask tensor: transformers built the pattern itself, it is applied as given
    if compact and (attention_mask.padding is not None or attention_mask.q_offset != 0 or attention_mask.chunk):
        return None
    if lq != lk:
        return None
    if compact:
        causal, window = attention_mask.is_causal, attention_mask.window
    else:
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        sliding = kwargs.get("sliding_window")
        window = (sliding - 1, 0) if causal and sliding is not None else None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if all(x is not None for x in (cu_q, cu_k, max_q, max_k)):
        total = batch * lq
        return cu_q, cu_k, _as_int(max_q, total), _as_int(max_k, total), causal, window
    if compact and attention_mask.documents is not None:
        cu, longest = attention_mask.packed_layout()
        return cu, cu, longest, longest, causal, window
    layout = _position_layout(kwargs.get("position_ids"), batch, lq)
    if layout is not None:
        cu, longest = layout
        return cu, cu, longest, longest, causal, window
    return None


def _varlen_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    dropout: float,
    scaling: Optional[float],
    backend: Optional[str],
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_q: int,
    max_k: int,
    causal: bool,
    window: Optional[tuple[int, int]],
    *,
    softcap: Optional[float] = None,
    sinks: Optional[Tensor] = None,
    tokens: Optional[Tensor] = None,
) -> tuple[Tensor, None]:
    """Packed documents → ``fastattn.varlen_attention`` over the ``B * L`` tokens → ``((B, L, Hq, Dv), None)``.

    Gemma 2's ``softcap`` and gpt-oss's ``sinks`` apply inside each document, as in the padded path.
    ``tokens`` (an unpadded batch, ``_unpad_layout``): only these of the ``B * L`` tokens are attended, and the
    output is zeros at the others (the padding, where no query attends anything)."""
    batch, heads_q, length = query.shape[:3]
    # (B, H, L, D) → (B, L, H, D) → (B·L, H, D): a view when the projections are (B, L, H, D) in memory.
    q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (query, key, value))
    if tokens is not None:  # (B·L, H, D) → the real tokens (T, H, D)
        q, k, v = q[tokens], k[tokens], v[tokens]
    out = _fastattn_varlen(
        q,
        k,
        v,
        cu_seqlens_q.to(query.device),
        cu_seqlens_k.to(query.device),
        max_q,
        max_k,
        dropout_p=float(dropout) if module.training else 0.0,
        is_causal=causal,
        scale=scaling,
        enable_gqa=heads_q != key.shape[1],
        window=window,
        softcap=softcap,
        sinks=sinks,
        backend=backend,
    )
    if tokens is not None:  # (T, Hq, Dv) → (B·L, Hq, Dv), zeros at the padding
        out = out.new_zeros(batch * length, *out.shape[1:]).index_copy(0, tokens, out)
    # (B·L, Hq, Dv) → (B, L, Hq, Dv)
    return out.view(batch, length, heads_q, -1), None


# Padded batches go through varlen_attention (unpad, attend, pad) from this fraction of padding tokens on:
# benchmarks/varlen.py --padded-input on the CPU (8 sequences of up to 2048 tokens, causal, fp32) measured
# 1.0x at 6% padding, 1.22-1.25x at 25% and 1.5x at 53% against the compact key-padding mask, whose kernels
# compute the padded query rows and the partial tiles the unpadded sequences do not have.
_UNPAD_MIN_PADDING = 0.125


def _unpad_layout(
    query: Tensor, key: Tensor, attention_mask: Any, kwargs: dict
) -> Optional[tuple[Tensor, Tensor, int]]:
    """``(tokens, cu_seqlens, longest)`` when this call is a padded batch that is faster unpadded, else None.

    That is: a ``CompactMask`` whose only mask is a key padding with one run of real tokens per row (left or
    right padding), queries and keys of the same tokens (``Lq == Lk``, ``q_offset == 0``: no cache), no chunk
    and no additive bias, with at least ``_UNPAD_MIN_PADDING`` of the tokens padding. Each row's run is then
    one sequence whose causal and window bands are its own (bottom-right equals top-left when ``Lq == Lk``).
    ``tokens``: the real tokens' indices in the flattened ``(B * L)`` batch. Reads the mask on the host, so
    never under tracing.
    """
    if not isinstance(attention_mask, CompactMask) or attention_mask.padding is None or _tracing():
        return None
    mask = attention_mask
    if mask.dense or mask.documents is not None or mask.chunk or mask.q_offset != 0 or mask.padding.dtype != torch.bool:
        return None
    batch, lq, lk = query.shape[0], query.shape[2], key.shape[2]
    if lq != lk or kwargs.get("position_bias") is not None or mask.padding.numel() != batch * lk:
        return None
    keep = mask.padding.reshape(batch, lk)
    lengths = keep.sum(dim=1)
    if float(lengths.sum()) > (1.0 - _UNPAD_MIN_PADDING) * batch * lk or not _one_run(mask.padding):
        return None
    cu = torch.zeros(batch + 1, dtype=torch.int32, device=query.device)
    cu[1:] = lengths.cumsum(0)
    return keep.reshape(-1).nonzero().squeeze(1).to(query.device), cu, int(lengths.max())


_REGISTERED: dict[str, Callable] = {}


def register(name: str = "fastattn", *, backend: Optional[str] = None) -> str:
    """Registers fastattn with transformers under ``name`` and returns the name.

    Installs the attention function (``AttentionInterface``) and the mask function
    (``AttentionMaskInterface``) together. ``backend`` pins a fastattn backend (None: the
    automatic choice), so ``register("fastattn_triton", backend="triton")`` offers a second name.
    Calling it again with the same arguments does nothing; with another backend it re-points the
    name. It refuses to replace one of transformers' own implementations.
    """
    try:
        import transformers
    except ModuleNotFoundError as e:
        if e.name != "transformers":
            raise
        raise ImportError(
            "fastattn.integrations.transformers.register(): Hugging Face transformers is not installed; "
            "pip install 'transformers>=5.23,<6' (or, from a fastattn checkout, pip install -e '.[transformers]')"
        ) from e
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    version = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    if version < _MIN_VERSION:
        raise ImportError(
            f"fastattn.integrations.transformers: expected transformers >= 5.0 (tested with 5.24), "
            f"got {transformers.__version__}"
        )
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty string, got {name!r}")
    current = AttentionInterface._global_mapping.get(name)
    if current is not None and current is not _REGISTERED.get(name):
        raise ValueError(f"name: {name!r} is already one of transformers' attention implementations; pick another")
    fn = _REGISTERED.get(name)
    if fn is None or getattr(fn, "_fastattn_backend", None) != backend:
        fn = functools.partial(attention_forward, backend=backend)
        fn._fastattn_backend = backend
        _REGISTERED[name] = fn
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, mask_function)
    _route_bloom()
    return name
