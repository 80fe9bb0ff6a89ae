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
  pattern is structural (causal, bidirectional, causal or bidirectional sliding window, each with
  an optional key-padding mask) it returns a ``CompactMask``: ``is_causal``, ``window``,
  ``q_offset`` and a ``(B, 1, 1, Lk)`` boolean padding mask, so no ``(B, 1, Lq, Lk)`` tensor is
  built and the kernels' tile skipping applies. It recognises the pattern by identity with
  transformers' own mask functions, never by evaluating them; any other pattern (packed
  sequences, or/and overlays, chunked or block-wise masks, a model that asks for a materialised
  mask, a static-cache offset under tracing) gets transformers' dense boolean ``sdpa_mask``.
* The **attention function** (``AttentionInterface``) maps transformers' call onto
  ``fastattn.scaled_dot_product_attention``: GQA through ``enable_gqa`` (no ``repeat_kv`` copy),
  dropout only while the module trains, output in transformers' ``(B, Lq, H, Dv)`` layout. What it
  cannot honour (attention sinks, a logit softcap, returning attention weights, a paged cache) is
  refused with an error naming the feature and the model, never ignored.

Positions: transformers places a mask by the absolute position of the first query (``q_offset``)
and of the first key (``kv_offset``, non-zero for a sliding-window cache that dropped old keys);
fastattn's ``q_offset`` is the key index of query 0, their difference: ``Lk - Lq`` for a plain
key/value cache, FlashAttention's bottom-right alignment.

Tested with transformers 5.24.0 (the mask-interface keywords ``q_offset``/``kv_offset`` appeared
in 5.x; 4.x passed ``cache_position`` and is refused).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ..functional import scaled_dot_product_attention as _fastattn_sdpa

__all__ = ["CompactMask", "attention_forward", "mask_function", "register"]

_MIN_VERSION = (5, 0)


@dataclass(frozen=True)
class CompactMask:
    """A structural attention mask, as the mask function hands it to the attention function.

    ``padding``: ``(B, 1, 1, Lk)`` bool (True = attend) or None; ``is_causal`` and ``window``
    (``(left, right)``, -1 unbounded, or None) in fastattn's sense; ``q_offset``: the key index of
    query 0. ``q_length``/``kv_length`` are the sizes transformers asked for, checked against the
    query and key the attention function receives.
    """

    padding: Optional[Tensor]
    is_causal: bool
    window: Optional[tuple[int, int]]
    q_offset: int
    q_length: int
    kv_length: int

    def to_dense(self) -> Tensor:
        """The same mask as a dense ``(B|1, 1, Lq, Lk)`` boolean (for inspection and tests only)."""
        from ..masks import band_allowed

        left, right = self.window if self.window is not None else (-1, -1)
        if self.is_causal:
            right = 0 if right < 0 else min(right, 0)
        device = self.padding.device if self.padding is not None else "cpu"
        band = band_allowed(self.q_length, self.kv_length, left, right, self.q_offset, device)
        # (Lq, Lk) → (1, 1, Lq, Lk)
        band = band.view(1, 1, self.q_length, self.kv_length)
        return band if self.padding is None else band & self.padding


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


@functools.lru_cache(maxsize=1)
def _code_objects() -> dict[str, Any]:
    """Code objects of transformers' mask closures, to recognise them by identity."""
    from transformers import masking_utils as mu

    return {
        "and": mu.and_masks(mu.causal_mask_function).__code__,
        "sliding": mu.sliding_window_overlay(1).__code__,
        "sliding_bidirectional": mu.sliding_window_bidirectional_overlay(1).__code__,
    }


def _cell(fn: Callable, name: str) -> Any:
    """The value of the free variable ``name`` of closure ``fn``."""
    return fn.__closure__[fn.__code__.co_freevars.index(name)].cell_contents


def _structure(mask_fn: Callable) -> Optional[tuple[bool, Optional[tuple[int, int]]]]:
    """``(is_causal, window)`` of a transformers mask function, or None when it is not structural."""
    from transformers import masking_utils as mu

    if mask_fn is mu.causal_mask_function:
        return True, None
    if mask_fn is mu.bidirectional_mask_function:
        return False, None
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
            return True, (size - 1, 0)
    elif code is codes["sliding_bidirectional"] and base is mu.bidirectional_mask_function:
        size = _cell(overlay, "sliding_window")
        # abs(q_idx - kv_idx) <= size
        if isinstance(size, int) and size >= 0:
            return False, (size, size)
    return None


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
    ``(B, 1, Lq, Lk)`` mask. ``allow_*_skip=False`` means the model itself manipulates the mask
    tensor (falcon, doge, ...), so it gets the dense one.
    """
    from transformers import masking_utils as mu

    if mask_function is None:
        mask_function = mu.causal_mask_function
    structure = _structure(mask_function)
    offsets_known = not (_tracing() and (isinstance(q_offset, Tensor) or isinstance(kv_offset, Tensor)))
    if structure is not None and offsets_known:
        is_causal, window = structure
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
            )
    return mu.sdpa_mask(
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


def _model_name(module: torch.nn.Module) -> str:
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    return f"{model_type} ({type(module).__name__})" if model_type else type(module).__name__


def _refuse(feature: str, module: torch.nn.Module) -> None:
    raise NotImplementedError(
        f"fastattn cannot honour {feature}, which the model {_model_name(module)} asked for; "
        "load it with attn_implementation='eager' or 'sdpa' instead"
    )


def _check_supported(module: torch.nn.Module, attention_mask: Any, kwargs: dict) -> None:
    if (
        kwargs.get("s_aux") is not None
        or kwargs.get("sinks") is not None
        or isinstance(getattr(module, "sinks", None), Tensor)
    ):
        _refuse("attention sinks (s_aux / sinks)", module)
    if kwargs.get("softcap") is not None:
        _refuse(f"a logit softcap (softcap={kwargs['softcap']})", module)
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
    lq, lk = query.shape[2], key.shape[2]
    window: Optional[tuple[int, int]] = None
    q_offset = 0
    if isinstance(attention_mask, CompactMask):
        if (attention_mask.q_length, attention_mask.kv_length) != (lq, lk):
            raise ValueError(
                f"attention_mask: the mask built for {_model_name(module)} expects (query, key) lengths "
                f"({attention_mask.q_length}, {attention_mask.kv_length}), got ({lq}, {lk})"
            )
        mask, causal = attention_mask.padding, attention_mask.is_causal
        window, q_offset = attention_mask.window, attention_mask.q_offset
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

    out = _fastattn_sdpa(
        query,
        key,
        value,
        attn_mask=mask,
        dropout_p=float(dropout) if module.training else 0.0,
        is_causal=causal,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
        window=window,
        q_offset=q_offset,
        backend=backend,
    )
    # (B, Hq, Lq, Dv) → (B, Lq, Hq, Dv)
    return out.transpose(1, 2).contiguous(), None


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
    return name
