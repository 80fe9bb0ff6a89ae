"""A reference encoder-decoder Transformer on ``fastattn.MultiheadAttention``'s building blocks.

What "done right" means here: the decoder has causal self-attention *and* cross-attention to the
encoder's output; tokens are embedded (scaled by ``sqrt(d_model)``) plus sinusoidal positions
computed for the positions asked (so decoding at position ``t`` needs no table); pre-norm (with a
final norm per stack) or post-norm; key-padding masks come from lengths; greedy ``generate`` keeps a
key/value cache per layer and attends with one query against the cached keys, aligned bottom-right
with ``q_offset = Lk - Lq``, and gives the same tokens as decoding the whole prefix every step.

All masks here are fastattn's (boolean True = attend) and batch-first, passed straight to
``MultiheadAttention.attend``; no torch-convention conversion happens in this module.

Packed documents (padding-free training): ``forward(src, tgt, src_cu_seqlens=..., tgt_cu_seqlens=...)`` with
1-D token tensors holding the documents end to end. Every attention then runs ``attend_packed``: the
encoder's self-attention and the decoder's causal self-attention within each document, the cross-attention
from document ``b``'s target to document ``b``'s source only (``Lq_b != Lk_b``); positions restart at 0 in
every document, so the logits of each document equal those of the document alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.multihead import MultiheadAttention, check_backend

__all__ = ["Transformer", "Packed", "sinusoidal_positions", "lengths_to_mask"]


def sinusoidal_positions(positions: Tensor, d_model: int, dtype: torch.dtype) -> Tensor:
    """``(L, d_model)`` encodings of integer ``positions`` (Vaswani et al.): sin on even, cos on odd dims."""
    half = torch.arange(0, d_model, 2, device=positions.device, dtype=torch.float32)
    freq = torch.exp(half * (-math.log(10000.0) / d_model))
    angles = positions.to(torch.float32).unsqueeze(-1) * freq  # (L, ceil(d/2))
    enc = torch.zeros(positions.shape[0], d_model, device=positions.device, dtype=torch.float32)
    enc[:, 0::2] = torch.sin(angles)
    enc[:, 1::2] = torch.cos(angles[:, : d_model // 2])
    return enc.to(dtype)


def lengths_to_mask(lengths: Optional[Tensor], seqlen: int, batch: int) -> Optional[Tensor]:
    """``(B,)`` lengths → key-padding mask ``(B, 1, 1, L)``, True = a real token (attend); None stays None."""
    if lengths is None:
        return None
    if not isinstance(lengths, Tensor) or lengths.shape != (batch,) or lengths.dtype.is_floating_point:
        got = f"{lengths.dtype} {tuple(lengths.shape)}" if isinstance(lengths, Tensor) else type(lengths).__name__
        raise ValueError(f"lengths: expected an integer tensor of shape ({batch},), got {got}")
    positions = torch.arange(seqlen, device=lengths.device)
    return (positions.unsqueeze(0) < lengths.unsqueeze(1)).view(batch, 1, 1, seqlen)


@dataclass(frozen=True)
class Packed:
    """Documents laid end to end: ``cu_seqlens`` ``(B + 1,)`` offsets and the longest document (a Python int)."""

    cu_seqlens: Tensor
    max_seqlen: int

    @staticmethod
    def of(name: str, tokens: Tensor, cu_seqlens: Tensor, max_seqlen: Optional[int]) -> Packed:
        if not isinstance(tokens, Tensor) or tokens.dim() != 1 or tokens.dtype.is_floating_point:
            got = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"{name}: expected 1-D integer token ids of packed documents (total,), got {got}")
        if not isinstance(cu_seqlens, Tensor):
            raise TypeError(f"{name}_cu_seqlens: expected a torch.Tensor of offsets, got {type(cu_seqlens).__name__}")
        if max_seqlen is None:  # read on the host: pass it to keep torch.compile's graph whole
            max_seqlen = int(torch.diff(cu_seqlens).max()) if cu_seqlens.numel() > 1 else 0
        return Packed(cu_seqlens, max_seqlen)

    def positions(self, total: int) -> Tensor:
        """Every token's position inside its document, ``(total,)``, computed on the device (no host read)."""
        starts = self.cu_seqlens[:-1].long()
        lengths = torch.diff(self.cu_seqlens).long()
        # (B,) document starts → (total,) the start of each token's document
        first = torch.repeat_interleave(starts, lengths, output_size=total)
        return torch.arange(total, device=self.cu_seqlens.device) - first


def _attend_packed(
    attn: MultiheadAttention, q_in: Tensor, kv_in: Optional[Tensor], q_seqs: Packed, k_seqs: Packed, causal: bool
) -> Tensor:
    """``attn`` over packed ``(total, E)`` tokens: queries from ``q_in``, keys and values from ``kv_in`` (or q_in)."""
    # (total, E) → (1, total, E): project's batch-first layout (self-attention keeps one tensor: one GEMM)
    q_in = q_in.unsqueeze(0)
    kv_in = q_in if kv_in is None else kv_in.unsqueeze(0)
    q, k, v = attn.project(q_in, kv_in, kv_in)
    return attn.attend_packed(
        q, k, v, q_seqs.cu_seqlens, k_seqs.cu_seqlens, q_seqs.max_seqlen, k_seqs.max_seqlen, is_causal=causal
    )


class _FeedForward(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, activation: str, factory: dict) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward, **factory)
        self.linear2 = nn.Linear(dim_feedforward, d_model, **factory)
        self.dropout = nn.Dropout(dropout)
        self.activation = {"relu": F.relu, "gelu": F.gelu}[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class EncoderLayer(nn.Module):
    """Self-attention over the source (key padding only) and a feed-forward block."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout, activation, norm_first, attn_kw, factory) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True, **attn_kw, **factory)
        self.ff = _FeedForward(d_model, dim_feedforward, dropout, activation, factory)
        self.norm1 = nn.LayerNorm(d_model, **factory)
        self.norm2 = nn.LayerNorm(d_model, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm_first = norm_first

    def _sa(self, x: Tensor, src_mask: Optional[Tensor], packed: Optional[Packed]) -> Tensor:
        if packed is not None:
            return self.dropout1(_attend_packed(self.self_attn, x, None, packed, packed, False))
        q, k, v = self.self_attn.project(x, x, x)
        return self.dropout1(self.self_attn.attend(q, k, v, attn_mask=src_mask))

    def forward(self, x: Tensor, src_mask: Optional[Tensor] = None, packed: Optional[Packed] = None) -> Tensor:
        if self.norm_first:
            x = x + self._sa(self.norm1(x), src_mask, packed)
            return x + self.dropout2(self.ff(self.norm2(x)))
        x = self.norm1(x + self._sa(x, src_mask, packed))
        return self.norm2(x + self.dropout2(self.ff(x)))


@dataclass
class LayerCache:
    """One decoder layer's cache: self-attention keys/values so far, cross-attention keys/values once.

    With a preallocated cache (``DecoderCache(capacity=...)``) ``self_k``/``self_v`` are ``(B, H, capacity, D)``
    buffers that ``fastattn.kvcache_attention`` appends into in place, of which the first ``seqlens[b]`` positions
    are filled; otherwise they hold exactly the keys so far and grow by concatenation.
    """

    self_k: Optional[Tensor] = None
    self_v: Optional[Tensor] = None
    memory_k: Optional[Tensor] = None
    memory_v: Optional[Tensor] = None
    seqlens: Optional[Tensor] = None  # (B,) int32, shared by every layer of a preallocated cache
    capacity: int = 0  # positions of the preallocated buffers


@dataclass
class DecoderCache:
    """The decoder's caches. ``capacity``: preallocate that many target positions per layer and decode through
    ``kvcache_attention`` (in-place append, split-KV kernels); None: concatenate (any number of positions)."""

    layers: list = field(default_factory=list)
    length: int = 0  # target positions already decoded
    capacity: Optional[int] = None
    seqlens: Optional[Tensor] = None  # (B,) int32 positions filled in every layer's preallocated cache


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder's output, and a feed-forward block."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout, activation, norm_first, attn_kw, factory) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True, **attn_kw, **factory)
        self.cross_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True, **attn_kw, **factory)
        self.ff = _FeedForward(d_model, dim_feedforward, dropout, activation, factory)
        self.norm1 = nn.LayerNorm(d_model, **factory)
        self.norm2 = nn.LayerNorm(d_model, **factory)
        self.norm3 = nn.LayerNorm(d_model, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.norm_first = norm_first

    def _sa(self, y: Tensor, tgt_mask: Optional[Tensor], cache: Optional[LayerCache], packed) -> Tensor:
        if packed is not None:
            tgt_seqs, _ = packed
            return self.dropout1(_attend_packed(self.self_attn, y, None, tgt_seqs, tgt_seqs, True))
        q, k, v = self.self_attn.project(y, y, y)
        if cache is not None and cache.seqlens is not None and not (self.training and self.self_attn.dropout > 0):
            if cache.self_k is None:
                capacity = cache.capacity
                # (B, H, capacity, D) buffers; kvcache_attention writes k, v at seqlens and attends bottom-right.
                cache.self_k = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
                cache.self_v = v.new_empty(v.shape[0], v.shape[1], capacity, v.shape[3])
            # decode() has checked the capacity on the host (cache.length), so the values need no device read.
            out = self.self_attn.attend_kvcache(q, cache.self_k, cache.self_v, cache.seqlens, k, v, check_values=False)
            return self.dropout1(out)
        if cache is not None:
            if cache.self_k is not None:
                k, v = torch.cat([cache.self_k, k], dim=2), torch.cat([cache.self_v, v], dim=2)
            cache.self_k, cache.self_v = k, v
        # New queries sit after the cached keys: bottom-right causal alignment.
        out = self.self_attn.attend(q, k, v, attn_mask=tgt_mask, is_causal=True, q_offset=k.shape[2] - q.shape[2])
        return self.dropout1(out)

    def _ca(
        self, y: Tensor, memory: Tensor, memory_mask: Optional[Tensor], cache: Optional[LayerCache], packed
    ) -> Tensor:
        if packed is not None:
            tgt_seqs, src_seqs = packed
            return self.dropout2(_attend_packed(self.cross_attn, y, memory, tgt_seqs, src_seqs, False))
        if cache is not None and cache.memory_k is not None:
            (q, _, _), k, v = self.cross_attn.project(y), cache.memory_k, cache.memory_v
        else:
            q, k, v = self.cross_attn.project(y, memory, memory)
            if cache is not None:
                cache.memory_k, cache.memory_v = k, v
        return self.dropout2(self.cross_attn.attend(q, k, v, attn_mask=memory_mask))

    def forward(
        self,
        y: Tensor,
        memory: Tensor,
        tgt_mask: Optional[Tensor] = None,
        memory_mask: Optional[Tensor] = None,
        cache: Optional[LayerCache] = None,
        packed: Optional[tuple[Packed, Packed]] = None,
    ) -> Tensor:
        """``packed``: ``(target documents, source documents)`` for packed ``(total, E)`` inputs, else None."""
        if self.norm_first:
            y = y + self._sa(self.norm1(y), tgt_mask, cache, packed)
            y = y + self._ca(self.norm2(y), memory, memory_mask, cache, packed)
            return y + self.dropout3(self.ff(self.norm3(y)))
        y = self.norm1(y + self._sa(y, tgt_mask, cache, packed))
        y = self.norm2(y + self._ca(y, memory, memory_mask, cache, packed))
        return self.norm3(y + self.dropout3(self.ff(y)))


class Transformer(nn.Module):
    """Encoder-decoder Transformer for token sequences, batch-first.

    ``forward(src, tgt, src_lengths=None, tgt_lengths=None)`` returns logits ``(B, Lt, tgt_vocab)``
    for teacher forcing (``tgt`` starts with BOS). Lengths give key-padding masks (padding on the
    right); ``pad_id`` is the padding token (its embedding is zero). ``backend`` goes to every
    attention module.

    ``context_parallel_group``: run context-parallel across a ``torch.distributed`` group. ``src``
    and ``tgt`` are then this rank's shards (``shard_sequence(src, group=g, dim=1)`` and
    ``shard_sequence(tgt, group=g, is_causal=True, dim=1)``: the decoder's causal attention uses the
    zig-zag layout), lengths stay global, and the logits are this rank's shard of ``tgt``'s.
    Positions and padding masks are computed from each token's global position. Attention
    dropout must be 0 in training; ``generate`` is not context-parallel.

    ``softcap`` (Gemma 2's logit cap) and ``sinks=True`` (a learned sink logit per head, gpt-oss) go to
    every attention module (``MultiheadAttention``'s keywords). ALiBi and chunked attention are not
    offered: they place keys by position, which cross-attention's source keys do not share with the
    target queries, and ALiBi would replace the sinusoidal positions (another model).

    Packed documents: ``forward(src, tgt, src_cu_seqlens=cs, tgt_cu_seqlens=ct)`` with ``src (total_s,)`` and
    ``tgt (total_t,)`` token ids, documents end to end (``cs``/``ct``: ``(B + 1,)`` offsets; ``src_max_seqlen``/
    ``tgt_max_seqlen`` the longest, read from the offsets when omitted) returns logits ``(total_t, V)``, each
    document's equal to that document alone (the module docstring).
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: Optional[int] = None,
        d_model: int = 256,
        nhead: int = 4,
        num_encoder_layers: int = 3,
        num_decoder_layers: int = 3,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        norm_first: bool = True,
        pad_id: int = 0,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
        context_parallel_group=None,
        softcap: Optional[float] = None,
        sinks: bool = False,
    ) -> None:
        super().__init__()
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation: expected 'relu' or 'gelu', got {activation!r}")
        if d_model % nhead:
            raise ValueError(f"d_model: expected a multiple of nhead={nhead}, got {d_model}")
        tgt_vocab_size = src_vocab_size if tgt_vocab_size is None else tgt_vocab_size
        factory = {"device": device, "dtype": dtype}
        check_backend(backend)
        self.d_model, self.pad_id, self.norm_first = d_model, pad_id, norm_first
        self.src_embed = nn.Embedding(src_vocab_size, d_model, padding_idx=pad_id, **factory)
        self.tgt_embed = nn.Embedding(tgt_vocab_size, d_model, padding_idx=pad_id, **factory)
        self.context_parallel_group = context_parallel_group
        attn_kw = {
            "backend": backend,
            "context_parallel_group": context_parallel_group,
            "softcap": softcap,
            "sinks": sinks,
        }
        args = (d_model, nhead, dim_feedforward, dropout, activation, norm_first, attn_kw, factory)
        self.encoder_layers = nn.ModuleList(EncoderLayer(*args) for _ in range(num_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(*args) for _ in range(num_decoder_layers))
        # Pre-norm leaves the residual stream unnormalised: one final norm per stack.
        self.encoder_norm = nn.LayerNorm(d_model, **factory) if norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(d_model, **factory) if norm_first else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.generator = nn.Linear(d_model, tgt_vocab_size, **factory)
        # Embeddings ~ N(0, 1/d_model), so that after the sqrt(d_model) scale tokens and positions
        # have comparable size (torch's N(0, 1) default would drown the positions).
        for embed in (self.src_embed, self.tgt_embed):
            nn.init.normal_(embed.weight, std=d_model**-0.5)
            with torch.no_grad():
                embed.weight[pad_id].zero_()

    def _positions(self, tokens: Tensor, start: int = 0, causal_layout: bool = False) -> Tensor:
        """Global positions of ``tokens``' columns: a range, or this rank's shard of one under context parallelism."""
        if self.context_parallel_group is None:
            return torch.arange(start, start + tokens.shape[1], device=tokens.device)
        from ..distributed import shard_sequence

        world = torch.distributed.get_world_size(self.context_parallel_group)
        everything = torch.arange(tokens.shape[1] * world, device=tokens.device)
        return shard_sequence(everything, group=self.context_parallel_group, is_causal=causal_layout, dim=0)

    def _padding_mask(self, lengths: Optional[Tensor], positions: Tensor, batch: int) -> Optional[Tensor]:
        if self.context_parallel_group is None:
            return lengths_to_mask(lengths, positions.shape[0], batch)
        if lengths is None:
            return None
        lengths_to_mask(lengths, positions.shape[0], batch)  # the same argument checks
        # (B, L_local): True where the token's global position is inside its sequence.
        return (positions.unsqueeze(0) < lengths.unsqueeze(1)).view(batch, 1, 1, positions.shape[0])

    def _embed(self, embed: nn.Embedding, tokens: Tensor, start: int = 0, causal_layout: bool = False) -> Tensor:
        positions = self._positions(tokens, start, causal_layout)
        x = embed(tokens) * math.sqrt(self.d_model)
        return self.dropout(x + sinusoidal_positions(positions, self.d_model, x.dtype))

    def _check_tokens(self, name: str, tokens: Tensor) -> None:
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point:
            got = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"{name}: expected integer token ids of shape (B, L), got {got}")

    def encode(self, src: Tensor, src_lengths: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """Encoder output ``(B, Ls, d_model)`` and the source key-padding mask (True = attend) or None."""
        self._check_tokens("src", src)
        src_mask = self._padding_mask(src_lengths, self._positions(src), src.shape[0])
        x = self._embed(self.src_embed, src)
        for layer in self.encoder_layers:
            x = layer(x, src_mask)
        return self.encoder_norm(x), src_mask

    def decode(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_mask: Optional[Tensor] = None,
        tgt_lengths: Optional[Tensor] = None,
        cache: Optional[DecoderCache] = None,
    ) -> Tensor:
        """Logits ``(B, Lt, V)`` for ``tgt``; with ``cache``, ``tgt`` holds only the new positions."""
        self._check_tokens("tgt", tgt)
        start = 0 if cache is None else cache.length
        tgt_mask = None
        if tgt_lengths is not None:
            if cache is not None:
                raise ValueError("tgt_lengths: not supported with a key/value cache (decoding pads nothing)")
            tgt_mask = self._padding_mask(tgt_lengths, self._positions(tgt, causal_layout=True), tgt.shape[0])
        if cache is not None and cache.capacity is not None and cache.length + tgt.shape[1] > cache.capacity:
            raise ValueError(
                f"cache: capacity {cache.capacity} is below the {cache.length + tgt.shape[1]} positions asked "
                f"({cache.length} decoded, {tgt.shape[1]} new)"
            )
        if cache is not None and not cache.layers:
            cache.layers = [LayerCache() for _ in self.decoder_layers]
            if cache.capacity is not None:
                cache.seqlens = torch.full((tgt.shape[0],), cache.length, dtype=torch.int32, device=tgt.device)
                for layer_cache in cache.layers:
                    layer_cache.seqlens, layer_cache.capacity = cache.seqlens, cache.capacity
        y = self._embed(self.tgt_embed, tgt, start, causal_layout=True)
        for i, layer in enumerate(self.decoder_layers):
            y = layer(y, memory, tgt_mask, memory_mask, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.length += tgt.shape[1]
            if cache.seqlens is not None:
                cache.seqlens += tgt.shape[1]  # in place: every layer's LayerCache holds this tensor
        return self.generator(self.decoder_norm(y))

    def forward(
        self,
        src: Tensor,
        tgt: Tensor,
        src_lengths: Optional[Tensor] = None,
        tgt_lengths: Optional[Tensor] = None,
        *,
        src_cu_seqlens: Optional[Tensor] = None,
        tgt_cu_seqlens: Optional[Tensor] = None,
        src_max_seqlen: Optional[int] = None,
        tgt_max_seqlen: Optional[int] = None,
    ) -> Tensor:
        if src_cu_seqlens is not None or tgt_cu_seqlens is not None:
            if src_lengths is not None or tgt_lengths is not None:
                raise ValueError("src_lengths, tgt_lengths: packed documents need no padding lengths; pass None")
            if src_cu_seqlens is None or tgt_cu_seqlens is None:
                raise ValueError("src_cu_seqlens, tgt_cu_seqlens: packed documents need both offsets, got one")
            return self.forward_packed(
                src, tgt, Packed.of("src", src, src_cu_seqlens, src_max_seqlen),
                Packed.of("tgt", tgt, tgt_cu_seqlens, tgt_max_seqlen),
            )  # fmt: skip
        memory, memory_mask = self.encode(src, src_lengths)
        return self.decode(tgt, memory, memory_mask, tgt_lengths)

    def forward_packed(self, src: Tensor, tgt: Tensor, src_seqs: Packed, tgt_seqs: Packed) -> Tensor:
        """Logits ``(total_t, V)`` of packed documents (``forward``'s packed form)."""
        if self.context_parallel_group is not None:
            raise ValueError("src_cu_seqlens: packed documents are not supported with context_parallel_group")
        x = self._embed_packed(self.src_embed, src, src_seqs)
        for layer in self.encoder_layers:
            x = layer(x, packed=src_seqs)
        memory = self.encoder_norm(x)
        y = self._embed_packed(self.tgt_embed, tgt, tgt_seqs)
        for layer in self.decoder_layers:
            y = layer(y, memory, packed=(tgt_seqs, src_seqs))
        return self.generator(self.decoder_norm(y))

    def _embed_packed(self, embed: nn.Embedding, tokens: Tensor, seqs: Packed) -> Tensor:
        x = embed(tokens) * math.sqrt(self.d_model)
        return self.dropout(x + sinusoidal_positions(seqs.positions(tokens.shape[0]), self.d_model, x.dtype))

    @torch.no_grad()
    def generate(
        self,
        src: Tensor,
        src_lengths: Optional[Tensor] = None,
        *,
        bos_id: int,
        eos_id: Optional[int] = None,
        max_new_tokens: int = 32,
        use_cache: bool = True,
    ) -> Tensor:
        """Greedy decoding: ``(B, T)`` tokens after BOS, ``T <= max_new_tokens``; after EOS, ``pad_id``.

        With ``use_cache`` each step runs the decoder on the newest token only, against cached keys
        and values (one query, ``q_offset = Lk - 1``); without, it reruns the whole prefix. The self-attention
        cache is preallocated for ``max_new_tokens`` positions and decoded through ``fastattn.kvcache_attention``
        (in-place append, split-KV decode kernels); the cross-attention's keys (the encoder output, computed once)
        stay on ``scaled_dot_product_attention`` with the source padding mask.
        """
        if self.context_parallel_group is not None:
            raise ValueError("generate: not supported with context_parallel_group (decoding is one token at a time)")
        memory, memory_mask = self.encode(src, src_lengths)
        batch = src.shape[0]
        tokens = torch.full((batch, 1), bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(batch, dtype=torch.bool, device=src.device)
        cache = DecoderCache(capacity=max_new_tokens) if use_cache else None
        for _ in range(max_new_tokens):
            step_in = tokens[:, -1:] if use_cache else tokens
            logits = self.decode(step_in, memory, memory_mask, cache=cache)[:, -1]
            nxt = logits.argmax(dim=-1).masked_fill(done, self.pad_id)
            tokens = torch.cat([tokens, nxt.unsqueeze(1)], dim=1)
            if eos_id is not None:
                done = done | (nxt == eos_id)
                if bool(done.all()):
                    break
        return tokens[:, 1:]
