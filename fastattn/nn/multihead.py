"""``MultiheadAttention``: ``torch.nn.MultiheadAttention`` running on fastattn's fused entry point.

It subclasses torch's module, so the constructor, the parameter names, the ``state_dict`` keys,
the initialisation and ``isinstance`` checks are torch's own and a torch checkpoint loads with
``strict=True``; only ``forward`` differs. torch MHA's mask convention (boolean True = *ignore*,
float masks added, ``key_padding_mask`` ``(N, S)``, ``attn_mask`` ``(L, S)`` or ``(N*H, L, S)``)
is converted to fastattn's (boolean True = *attend*) in ``_fastattn_mask``, here and nowhere else.

Two building blocks, ``project`` and ``attend``, are the whole computation: ``forward`` is them
plus torch's layout and mask conventions, and ``fastattn.models.Transformer`` calls them directly
(batch-first, fastattn masks, ``q_offset`` for a key/value cache), so there is one implementation.
Packed sequences (``cu_seqlens``) take ``attend_packed`` instead of ``attend``: the same projections on
the ``(1, total, E)`` view of the tokens, then ``fastattn.varlen_attention``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backends, variants
from ..functional import scaled_dot_product_attention, varlen_attention
from ..kvcache import kvcache_attention

__all__ = ["MultiheadAttention"]


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_backend(backend: Optional[str]) -> Optional[str]:
    """``None``/``"auto"`` or a registered backend's name; anything else fails at construction."""
    if backend is None or backend == "auto":
        return None
    backends.get(backend)  # raises with the list of names
    return backend


def check_variants(
    num_heads: int, softcap: Any, alibi_slopes: Any, sinks: Any, chunk: Any
) -> tuple[Optional[float], Optional[int]]:
    """Construction-time checks of the variant keywords; returns ``(softcap, chunk)`` normalised."""
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0:
            raise ValueError(f"softcap: expected a positive float or None, got {softcap!r}")
        softcap = float(softcap)
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, Tensor) or not alibi_slopes.dtype.is_floating_point:
            raise TypeError(
                f"alibi_slopes: expected a floating tensor of shape ({num_heads},) or None, got {alibi_slopes!r}"
            )
        if tuple(alibi_slopes.shape) != (num_heads,):
            raise ValueError(
                f"alibi_slopes: expected shape ({num_heads},) (one slope per head), got {_shape(alibi_slopes)}"
            )
    if not isinstance(sinks, bool):
        raise TypeError(f"sinks: expected a bool (True: a learned sink logit per head), got {type(sinks).__name__}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk: expected a positive int or None, got {chunk!r}")
    return softcap, chunk


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in ``torch.nn.MultiheadAttention`` whose attention runs in fastattn's fused kernels.

    Same constructor (plus keyword-only ``backend``: a name from ``fastattn.backends.names()``, or
    ``None`` for the automatic choice), same ``forward`` signature and outputs, same parameters.

    * ``need_weights=False`` (what ``nn.Transformer`` layers pass) runs only the fused kernel: no
      ``L x S`` buffer is built unless both a full ``attn_mask`` and a ``key_padding_mask`` are given
      (they are merged into one mask; ``is_causal=True`` with a padding mask needs no merge).
    * ``need_weights=True`` (torch's default) computes the output with the fused kernel and then the
      weights a second time, explicitly, exactly as torch does (``softmax(q k^T / sqrt(d) + mask)``):
      that costs ``O(N * H * L * S)`` extra memory and ``2 * N * H * L * S * d`` extra FLOPs. Pass
      ``need_weights=False`` whenever the weights are not used. In training with ``dropout > 0`` the
      returned weights are the probabilities *before* dropout (torch returns them after its own random
      drop, which the fused kernel's draw cannot reproduce); the output does apply dropout.
    * ``is_causal=True`` is a hint that ``attn_mask`` is the causal mask, as in torch: the fused path
      uses causal masking and ignores ``attn_mask`` (the weights path uses ``attn_mask``). Unlike torch,
      ``is_causal=True`` without ``attn_mask`` is accepted and means the top-left causal mask. Keys
      appended by ``add_bias_kv``/``add_zero_attn`` are visible to every query, as in torch's mask
      path (torch's own ``is_causal`` shortcut, taken without padding mask and weights, hides them).
    * A query row whose keys are all masked gives zeros (fastattn's rule); torch's math gives NaN
      there, and so do the weights returned for that row.

    Inside ``nn.TransformerEncoderLayer`` torch may bypass ``self_attn.forward`` in inference;
    ``fastattn.replace_attention(model)`` swaps modules and also closes that path.

    Packed sequences: ``forward(query, key, value, need_weights=False, cu_seqlens=cu)`` with 2-D ``(total, E)``
    inputs holding sequences end to end (``cu``: ``(B + 1,)`` int32/int64 offsets) runs every sequence
    attending only its own keys (``fastattn.varlen_attention``); ``cu_seqlens_k`` gives the keys' offsets
    when they differ (cross-attention), ``max_seqlen``/``max_seqlen_k`` the longest sequences (Python ints;
    read from the offsets when omitted, a device sync). ``is_causal`` is then causal inside each sequence,
    aligned bottom-right. Masks, weights and the appended ``add_bias_kv``/``add_zero_attn`` keys are refused
    with packed sequences (each would need a per-sequence layout of its own).

    ``context_parallel_group``: a ``torch.distributed`` group across which the sequence is sharded
    (``fastattn.distributed.shard_sequence``). Inputs are then this rank's shards, attention runs as
    ``fastattn.distributed.ring_attention`` and the output is this rank's shard. Only key padding
    masks (this rank's shard) are supported there; weights and attention dropout are refused.

    Attention variants (keyword-only, as ``fastattn.scaled_dot_product_attention`` defines them; the
    returned weights follow them too):

    * ``softcap``: scores become ``softcap * tanh(score / softcap)`` (Gemma 2).
    * ``alibi_slopes``: a ``(num_heads,)`` float tensor; ``-slope * |i - j|`` is added to the scores in
      the kernel (a non-persistent buffer: the slopes are configuration, not weights, and a torch
      checkpoint still loads with ``strict=True``). ``fastattn.testing.alibi_slopes(num_heads)`` gives
      the paper's geometric slopes.
    * ``sinks=True``: a learned ``sinks`` parameter ``(num_heads,)``, one logit per head that joins
      every row's softmax and carries no value (gpt-oss), trained through its own gradient;
      initialised to zeros (a sink as likely as a key of score 0).
    * ``chunk``: query ``i`` attends key ``j`` only when ``i // chunk == j // chunk`` (Llama 4).

    ALiBi and ``chunk`` place keys by their index, which the keys that ``add_bias_kv``/``add_zero_attn``
    append (visible to every query) do not have: those combinations are refused.
    """

    def __init__(
        self,
        embed_dim,
        num_heads,
        dropout=0.0,
        bias=True,
        add_bias_kv=False,
        add_zero_attn=False,
        kdim=None,
        vdim=None,
        batch_first=False,
        device=None,
        dtype=None,
        *,
        backend: Optional[str] = None,
        context_parallel_group=None,
        softcap: Optional[float] = None,
        alibi_slopes: Optional[Tensor] = None,
        sinks: bool = False,
        chunk: Optional[int] = None,
    ) -> None:
        super().__init__(
            embed_dim,
            num_heads,
            dropout=dropout,
            bias=bias,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            kdim=kdim,
            vdim=vdim,
            batch_first=batch_first,
            device=device,
            dtype=dtype,
        )
        self.backend = check_backend(backend)
        self.context_parallel_group = context_parallel_group
        self.softcap, self.chunk = check_variants(num_heads, softcap, alibi_slopes, sinks, chunk)
        if (alibi_slopes is not None or chunk is not None) and (add_bias_kv or add_zero_attn):
            raise ValueError(
                "alibi_slopes/chunk: they place keys by index, which the keys of add_bias_kv/add_zero_attn lack; "
                f"expected add_bias_kv=False and add_zero_attn=False, got {add_bias_kv} and {add_zero_attn}"
            )
        slopes = None if alibi_slopes is None else alibi_slopes.detach().to(device=device, dtype=torch.float32)
        self.register_buffer("alibi_slopes", slopes, persistent=False)
        if sinks:
            self.sinks = nn.Parameter(torch.zeros(num_heads, device=device, dtype=dtype))
        else:
            self.register_parameter("sinks", None)

    def extra_repr(self) -> str:
        cp = ", context_parallel" if self.context_parallel_group is not None else ""
        variants = "".join(
            f", {name}={value}"
            for name, value in (("softcap", self.softcap), ("chunk", self.chunk))
            if value is not None
        )
        variants += ", alibi" if self.alibi_slopes is not None else ""
        variants += ", sinks" if self.sinks is not None else ""
        return f"backend={self.backend or 'auto'}{cp}{variants}"

    def variant_kwargs(self) -> dict:
        """The entry point's variant keywords for this module (``softcap``, ``alibi_slopes``, ``sinks``, ``chunk``)."""
        return dict(softcap=self.softcap, alibi_slopes=self.alibi_slopes, sinks=self.sinks, chunk=self.chunk)

    # ---- building blocks (batch-first, fastattn mask convention) ---------------------------------

    def _split_heads(self, x: Tensor) -> Tensor:
        # (B, L, E) → (B, L, H, D) → (B, H, L, D)
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def project(
        self, query: Optional[Tensor] = None, key: Optional[Tensor] = None, value: Optional[Tensor] = None
    ) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """In-projection of batch-first ``(B, L, E)`` inputs to heads ``(B, H, L, D)``; None stays None.

        Self-attention (``query is key is value``) with packed weights runs as one GEMM.
        """
        bias = self.in_proj_bias
        b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None, None, None)
        if self._qkv_same_embed_dim:
            if query is not None and query is key and key is value:
                q, k, v = F.linear(query, self.in_proj_weight, bias).chunk(3, dim=-1)
                return self._split_heads(q), self._split_heads(k), self._split_heads(v)
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return tuple(
            None if x is None else self._split_heads(F.linear(x, w, b))
            for x, w, b in ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v))
        )

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
        q_offset: int = 0,
    ) -> Tensor:
        """Fused attention over projected heads, then the out-projection: ``(B, Lq, E)``.

        ``attn_mask`` follows fastattn (boolean True = attend, float added, broadcastable to
        ``(B, H, Lq, Lk)``); ``q_offset`` places query ``i`` at key position ``i + q_offset``.
        """
        if self.context_parallel_group is not None:
            out = self._attend_context_parallel(q, k, v, attn_mask, is_causal, q_offset)
        else:
            out = scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=is_causal,
                q_offset=q_offset,
                backend=self.backend,
                **self.variant_kwargs(),
            )
        # (B, H, Lq, D) → (B, Lq, H, D) → (B, Lq, E)
        out = out.transpose(1, 2).flatten(-2)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias)

    def attend_kvcache(
        self,
        q: Tensor,
        key_cache: Tensor,
        value_cache: Tensor,
        cache_seqlens: Tensor,
        k: Optional[Tensor] = None,
        v: Optional[Tensor] = None,
        is_causal: bool = True,
        check_values: bool = True,
    ) -> Tensor:
        """Attention over a key/value cache (``fastattn.kvcache_attention``, forward only), then the out-projection.

        ``k``/``v`` (the new positions' heads) are appended into the caches in place at ``cache_seqlens``.
        ``check_values=False``: the caller has checked ``cache_seqlens`` against the capacity itself, and the call
        does not read it on the host (``kvcache_attention``'s ``check_values``).
        """
        variants = self.variant_kwargs()
        if variants.pop("chunk") is not None:
            raise ValueError("chunk: kvcache_attention has no chunked attention; decode this module without a cache")
        out = kvcache_attention(
            q,
            key_cache,
            value_cache,
            cache_seqlens,
            key=k,
            value=v,
            is_causal=is_causal,
            backend=self.backend,
            check_values=check_values,
            **variants,
        )
        # (B, H, Lq, D) → (B, Lq, H, D) → (B, Lq, E)
        out = out.transpose(1, 2).flatten(-2)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias)

    def attend_packed(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cu_seqlens_q: Tensor,
        cu_seqlens_k: Tensor,
        max_seqlen_q: int,
        max_seqlen_k: int,
        is_causal: bool = False,
    ) -> Tensor:
        """Fused attention over packed sequences, then the out-projection: ``(total_q, E)``.

        ``q``, ``k``, ``v``: ``project``'s heads of the ``(1, total, E)`` tokens, ``(1, H, total, D)``.
        """
        if self.context_parallel_group is not None:
            raise ValueError("cu_seqlens: packed sequences are not supported with context_parallel_group")
        # (1, H, total, D) → (total, H, D): views of the projection's (1, total, H, D) memory.
        q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))
        out = varlen_attention(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            backend=self.backend,
            **self.variant_kwargs(),
        )
        # (total_q, H, D) → (total_q, E)
        return F.linear(out.flatten(-2), self.out_proj.weight, self.out_proj.bias)

    def _attend_context_parallel(self, q, k, v, attn_mask, is_causal, q_offset) -> Tensor:
        """Ring attention over the sequence shards of ``context_parallel_group``."""
        from ..distributed import ring_attention

        if q_offset != 0:
            raise ValueError(
                f"q_offset: context parallelism places shards by their global positions; expected 0, got {q_offset}"
            )
        if self.training and self.dropout > 0.0:
            raise ValueError(
                f"dropout: attention dropout is not supported with context_parallel_group; expected 0.0 in training, "
                f"got {self.dropout} (call .eval() or build the module with dropout=0.0)"
            )
        return ring_attention(
            q,
            k,
            v,
            group=self.context_parallel_group,
            is_causal=is_causal,
            attn_mask=attn_mask,
            backend=self.backend,
            **self.variant_kwargs(),
        )

    # ---- torch's interface -----------------------------------------------------------------------

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        cu_seqlens: Optional[Tensor] = None,
        max_seqlen: Optional[int] = None,
        cu_seqlens_k: Optional[Tensor] = None,
        max_seqlen_k: Optional[int] = None,
    ) -> tuple[Tensor, Optional[Tensor]]:
        if cu_seqlens is not None or cu_seqlens_k is not None:
            return self._forward_packed(
                query, key, value, key_padding_mask, need_weights, attn_mask, is_causal, cu_seqlens, max_seqlen,
                cu_seqlens_k, max_seqlen_k,
            )  # fmt: skip
        batched = self._check_inputs(query, key, value)
        # One internal layout: batch-first (B, L, E).
        if not batched:
            query, key, value = _same_identity((query, key, value), lambda t: t.unsqueeze(0))
        elif not self.batch_first:
            query, key, value = _same_identity((query, key, value), lambda t: t.transpose(0, 1))
        batch, seqlen_q, seqlen_k = query.shape[0], query.shape[1], key.shape[1]
        kpm, am = self._check_masks(key_padding_mask, attn_mask, batched, batch, seqlen_q, seqlen_k)

        if self.context_parallel_group is not None and need_weights:
            raise ValueError(
                "need_weights: attention weights need the whole sequence on one rank; pass need_weights=False "
                "with context_parallel_group"
            )
        q, k, v = self.project(query, key, value)
        k, v = self._extra_keys(k, v)
        extra = k.shape[2] - seqlen_k
        if is_causal and am is None and (need_weights or extra):
            # The weights path and the appended always-visible keys need the causal mask written out.
            am = (
                torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=query.device)
                .triu(1)
                .view(1, 1, seqlen_q, seqlen_k)
            )
        fused_causal = is_causal and extra == 0
        mask = _fastattn_mask(None if fused_causal else am, kpm, extra, query.dtype)
        out = self.attend(q, k, v, attn_mask=mask, is_causal=fused_causal)

        weights = None
        if need_weights:
            weights = _torch_weights(q, k, am, kpm, extra, query.dtype, self.variant_kwargs())
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _forward_packed(
        self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal, cu_q, max_q, cu_k, max_k
    ) -> tuple[Tensor, None]:
        """``forward`` for packed ``(total, E)`` inputs (see the class docstring): ``(out (total_q, E), None)``."""
        if cu_q is None:
            raise ValueError("cu_seqlens: expected the queries' offsets when cu_seqlens_k is given, got None")
        refused = {
            "key_padding_mask": key_padding_mask is not None,
            "attn_mask": attn_mask is not None,
            "need_weights": need_weights,
            "add_bias_kv": self.bias_k is not None,
            "add_zero_attn": self.add_zero_attn,
        }
        for name, bad in refused.items():
            if bad:
                fix = "pass need_weights=False" if name == "need_weights" else "each sequence's own keys are its mask"
                raise ValueError(f"{name}: not supported with packed sequences (cu_seqlens); {fix}")
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor) or t.dim() != 2:
                got = _shape(t) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected a 2-D (total_tokens, E) tensor of packed sequences, got {got}")
        cu_k = cu_q if cu_k is None else cu_k
        if max_q is None:
            max_q = _longest(cu_q)
        if max_k is None:
            max_k = max_q if cu_k is cu_q else _longest(cu_k)
        # (total, E) → (1, total, E): project's batch-first layout.
        q, k, v = self.project(*_same_identity((query, key, value), lambda t: t.unsqueeze(0)))
        return self.attend_packed(q, k, v, cu_q, cu_k, max_q, max_k, is_causal), None

    def _extra_keys(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """torch's ``add_bias_kv`` then ``add_zero_attn``: keys appended after the source ones."""
        if self.bias_k is not None:
            batch = k.shape[0]
            # (1, 1, E) → (B, H, 1, D)
            bias_k = self.bias_k.expand(batch, 1, self.embed_dim)
            bias_v = self.bias_v.expand(batch, 1, self.embed_dim)
            k = torch.cat([k, self._split_heads(bias_k)], dim=2)
            v = torch.cat([v, self._split_heads(bias_v)], dim=2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(*k.shape[:2], 1, k.shape[3])], dim=2)
            v = torch.cat([v, v.new_zeros(*v.shape[:2], 1, v.shape[3])], dim=2)
        return k, v

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> bool:
        """Clear errors for torch MHA's shape rules; returns whether the inputs are batched."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if query.dim() not in (2, 3):
            raise ValueError(
                "query: expected a 2-D (L, E) unbatched or 3-D "
                f"{'(N, L, E)' if self.batch_first else '(L, N, E)'} tensor, got shape {_shape(query)}"
            )
        for name, t in (("key", key), ("value", value)):
            if t.dim() != query.dim():
                raise ValueError(f"{name}: expected {query.dim()}-D like query, got shape {_shape(t)}")
        for name, t, dim, label in (
            ("query", query, self.embed_dim, "embed_dim"),
            ("key", key, self.kdim, "kdim"),
            ("value", value, self.vdim, "vdim"),
        ):
            if t.shape[-1] != dim:
                raise ValueError(f"{name}: expected last dim {label}={dim}, got shape {_shape(t)}")
        batched = query.dim() == 3
        seq = 1 if (batched and self.batch_first) else 0
        if key.shape[seq] != value.shape[seq]:
            raise ValueError(
                f"value: expected the same sequence length as key ({key.shape[seq]}), got shape {_shape(value)}"
            )
        if batched:
            bdim = 1 - seq
            for name, t in (("key", key), ("value", value)):
                if t.shape[bdim] != query.shape[bdim]:
                    raise ValueError(
                        f"{name}: expected batch size {query.shape[bdim]} (query's, dim {bdim}), got shape {_shape(t)}"
                    )
        return batched

    def _check_masks(
        self,
        key_padding_mask: Optional[Tensor],
        attn_mask: Optional[Tensor],
        batched: bool,
        batch: int,
        seqlen_q: int,
        seqlen_k: int,
    ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Masks in torch's convention as 4-D views: kpm ``(B, 1, 1, S)``, attn_mask ``(1|B, 1|H, L, S)``."""
        heads = self.num_heads
        for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if m is not None and not isinstance(m, Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(m).__name__}")
            if m is not None and m.dtype != torch.bool and not m.dtype.is_floating_point:
                raise TypeError(f"{name}: expected dtype bool (True = ignore) or a floating dtype, got {m.dtype}")
        kpm = am = None
        if key_padding_mask is not None:
            expected = (batch, seqlen_k) if batched else (seqlen_k,)
            if tuple(key_padding_mask.shape) != expected:
                raise ValueError(
                    f"key_padding_mask: expected shape ({', '.join(map(str, expected))}), "
                    f"got {_shape(key_padding_mask)}"
                )
            kpm = key_padding_mask.reshape(batch, 1, 1, seqlen_k)
        if attn_mask is not None:
            groups = batch * heads if batched else heads
            if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (seqlen_q, seqlen_k):
                am = attn_mask.reshape(1, 1, seqlen_q, seqlen_k)
            elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (groups, seqlen_q, seqlen_k):
                # (N*H, L, S) → (N, H, L, S)
                am = attn_mask.reshape(batch, heads, seqlen_q, seqlen_k)
            else:
                lead = "N*num_heads" if batched else "num_heads"
                raise ValueError(
                    f"attn_mask: expected shape ({seqlen_q}, {seqlen_k}) or ({lead}={groups}, {seqlen_q}, "
                    f"{seqlen_k}), got {_shape(attn_mask)}"
                )
        return kpm, am


def _longest(cu_seqlens: Tensor) -> int:
    """The longest sequence of ``(B + 1,)`` offsets, read on the host (a device sync on a GPU)."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(
            f"cu_seqlens: expected a torch.Tensor of int32 or int64 offsets, got {type(cu_seqlens).__name__}"
        )
    return int(torch.diff(cu_seqlens).max()) if cu_seqlens.numel() > 1 else 0


def _same_identity(ts: tuple[Tensor, Tensor, Tensor], fn) -> tuple[Tensor, Tensor, Tensor]:
    """Apply ``fn`` keeping ``query is key is value`` (the one-GEMM self-attention test) intact."""
    q, k, v = ts
    nq = fn(q)
    nk = nq if k is q else fn(k)
    nv = nk if v is k else (nq if v is q else fn(v))
    return nq, nk, nv


def _append_keys(mask: Tensor, extra: int, fill) -> Tensor:
    """Extend the key dim by ``extra`` columns of ``fill`` (bias_kv / zero_attn keys are always visible)."""
    if not extra:
        return mask
    pad = torch.full((*mask.shape[:-1], extra), fill, dtype=mask.dtype, device=mask.device)
    return torch.cat([mask, pad], dim=-1)


def _fastattn_mask(am: Optional[Tensor], kpm: Optional[Tensor], extra: int, dtype: torch.dtype) -> Optional[Tensor]:
    """torch MHA masks (True = ignore, float added) → one fastattn mask (True = attend, float added).

    Two boolean masks merge by ``&``; if either is float, booleans become ``-inf`` and they add, as
    in torch. A single mask stays at its own (broadcast) shape.
    """
    parts = [m for m in (am, kpm) if m is not None]
    if not parts:
        return None
    if all(m.dtype == torch.bool for m in parts):
        allowed = ~parts[0]
        for m in parts[1:]:
            allowed = allowed & ~m
        return _append_keys(allowed, extra, True)
    total = None
    for m in parts:
        m = (
            torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
            if m.dtype == torch.bool
            else m
        )
        total = m if total is None else total + m
    return _append_keys(total, extra, 0.0)


def _torch_weights(
    q: Tensor,
    k: Tensor,
    am: Optional[Tensor],
    kpm: Optional[Tensor],
    extra: int,
    dtype: torch.dtype,
    variant: Optional[dict] = None,
) -> Tensor:
    """The attention weights ``(B, H, L, S)`` computed as ``F.multi_head_attention_forward`` does.

    An explicit second computation: ``(B * H, L, S)`` scores and probabilities in memory. With a variant
    (``variant``: the entry point's keywords) the scores follow ``fastattn.variants`` instead: softcap and
    ALiBi before the mask, the chunk's pairs only, and the sink in the softmax's denominator.
    """
    if variant is not None and any(value is not None for value in variant.values()):
        return _variant_weights(q, k, am, kpm, dtype, **variant)
    batch, heads, seqlen_q, head_dim = q.shape
    seqlen_k = k.shape[2]
    mask = None
    for m in (am, kpm):
        if m is None:
            continue
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        m = _append_keys(m, extra, 0.0)
        mask = m if mask is None else mask + m
    # (B, H, L, D) → (B*H, L, D): torch's bmm layout.
    q = q.reshape(batch * heads, seqlen_q, head_dim) * math.sqrt(1.0 / float(head_dim))
    k = k.reshape(batch * heads, seqlen_k, head_dim)
    if mask is None:
        scores = torch.bmm(q, k.transpose(-2, -1))
    else:
        mask = mask.expand(batch, heads, seqlen_q, seqlen_k).reshape(batch * heads, seqlen_q, seqlen_k)
        scores = torch.baddbmm(mask, q, k.transpose(-2, -1))
    return F.softmax(scores, dim=-1).view(batch, heads, seqlen_q, seqlen_k)


def _variant_weights(
    q: Tensor,
    k: Tensor,
    am: Optional[Tensor],
    kpm: Optional[Tensor],
    dtype: torch.dtype,
    softcap: Optional[float],
    alibi_slopes: Optional[Tensor],
    sinks: Optional[Tensor],
    chunk: Optional[int],
) -> Tensor:
    """``_torch_weights`` under the variants, in ``fastattn.variants``' order (no extra keys: refused)."""
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    scores = (q * math.sqrt(1.0 / float(q.shape[-1]))) @ k.transpose(-2, -1)
    # (H,) → (1, H): score_mod's (B|1, H) slopes
    alibi = None if alibi_slopes is None else alibi_slopes.view(1, -1)
    scores, _ = variants.score_mod(scores, alibi, 0, softcap=softcap or 0.0)
    for m in (am, kpm):
        if m is not None:
            scores = scores.masked_fill(m, float("-inf")) if m.dtype == torch.bool else scores + m
    if chunk is not None:
        allowed = variants.allowed(seqlen_q, seqlen_k, -1, -1, 0, chunk, q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is None:
        return F.softmax(scores, dim=-1)
    # (H,) → (B, H, L, 1): the sink's column joins the softmax, then leaves (it carries no value)
    sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    return F.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
