"""Ring attention: context parallelism over ``torch.distributed``, forward and backward, exact.

Each rank holds a shard of the sequence (queries, keys and values split on the length dim).
Key/value shards travel around the ring with ``batch_isend_irecv`` while the rank computes on the
shard in hand; the partial results merge exactly through their log-sum-exp:

    lse = logaddexp(lse_a, lse_b),   out = out_a·exp(lse_a − lse) + out_b·exp(lse_b − lse)

Layout. Without causality rank ``r`` holds the contiguous chunk ``r`` of ``W``. With
``is_causal`` the sequence is cut into ``2W`` chunks and rank ``r`` holds chunks ``r`` and
``2W−1−r`` (the zig-zag layout): every rank then has the same amount of causal work, so none
idles. ``shard_sequence`` / ``unshard_sequence`` apply and undo the layout; lengths must be
divisible by ``W`` (``2W`` when causal), a documented restriction (pad the sequence and mask the
padding with a key-padding mask).

Backward is a second ring pass: each rank recomputes its blocks from the global ``out`` and
``lse`` (``P = exp(S − lse)``, ``delta = rowsum(dO ∘ O)``, as every backend's backward does),
keeps dQ, and sends the dK/dV accumulators along with the key/value shard they belong to; after
a full turn they arrive at their owner. At most two key/value shards are in flight per rank (the
one in hand and the one arriving), never the whole sequence.

Blocks that causality, the window or the chunk leave empty are skipped without a kernel launch. A rank
that fails makes the others fail within the process group's timeout instead of hanging.

Variants: positions are global, so the band, ALiBi (``-slope·|pos − j|`` depends on the difference only)
and the softcap pass through to each block with the block's ``q_offset``. ``chunk`` compares absolute
positions: a block whose key shard chunk starts on a chunk boundary keeps the rule as it is; when the
shard chunks are smaller than the attention chunks and divide them, a whole block is in or out, decided
here; other sizes are refused. The ``sinks`` enter the merge once, after every block has been merged
(``variants.merge_sinks``), not once per shard: blocks run without them. Their gradient on a rank is the
contribution of that rank's queries (sum it over ranks as for any replicated parameter, e.g. DDP does).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import variants
from .._validate import validate
from ..backends.registry import choose, run_backward
from ..params import AttnParams

__all__ = ["ring_attention", "shard_sequence", "unshard_sequence"]


def _world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("fastattn.distributed: torch.distributed is not initialised (call init_process_group)")
    return dist.get_world_size(group), dist.get_rank(group)


def _chunks(world: int, is_causal: bool) -> int:
    return 2 * world if is_causal else world


def _layout(rank: int, world: int, is_causal: bool, length: int) -> list[tuple[int, int]]:
    """``(global start, length)`` of each chunk that ``rank`` holds, in local order."""
    n = _chunks(world, is_causal)
    c = length // n
    ids = (rank, n - 1 - rank) if is_causal else (rank,)
    return [(i * c, c) for i in ids]


def _check_divisible(length: int, world: int, is_causal: bool, what: str) -> None:
    n = _chunks(world, is_causal)
    if length % n:
        raise ValueError(
            f"{what}: expected a sequence length divisible by {n} ({'2 × ' if is_causal else ''}world size {world}"
            f"{', zig-zag layout for causal' if is_causal else ''}), got {length}; pad it and mask the padding"
        )


def shard_sequence(tensor: Tensor, *, group=None, is_causal: bool = False, dim: int = -2) -> Tensor:
    """This rank's shard of ``tensor`` along ``dim`` (the zig-zag pair of chunks when ``is_causal``)."""
    world, rank = _world(group)
    length = tensor.shape[dim]
    _check_divisible(length, world, is_causal, "shard_sequence")
    return torch.cat([tensor.narrow(dim, s, n) for s, n in _layout(rank, world, is_causal, length)], dim=dim)


def unshard_sequence(shard: Tensor, *, group=None, is_causal: bool = False, dim: int = -2) -> Tensor:
    """The whole tensor, gathered on every rank from each rank's shard (inverse of ``shard_sequence``)."""
    world, _ = _world(group)
    parts = [torch.empty_like(shard) for _ in range(world)]
    dist.all_gather(parts, shard.contiguous(), group=group)
    length = shard.shape[dim] * world
    pieces: list[tuple[int, Tensor]] = []
    for r, part in enumerate(parts):
        offset = 0
        for start, n in _layout(r, world, is_causal, length):
            pieces.append((start, part.narrow(dim, offset, n)))
            offset += n
    return torch.cat([p for _, p in sorted(pieces, key=lambda x: x[0])], dim=dim)


@dataclass
class _Config:
    group: object
    world: int
    rank: int
    is_causal: bool
    params: AttnParams  # of the local shards, every variant in it; each block replaces sizes and q_offset
    backend: Optional[str]
    timeout: Optional[timedelta]


def _pairs(cfg: _Config, owner: int, length_q: int, length_k: int):
    """Non-empty (q chunk, k chunk) pairs between this rank's queries and ``owner``'s keys.

    Yields ``(q_local_start, q_len, k_local_start, k_len, q_offset, chunk)``: the block's ``chunk`` rule
    (0 when the whole block lies inside one attention chunk, see the module docstring).
    """
    q_chunks = _layout(cfg.rank, cfg.world, cfg.is_causal, length_q)
    k_chunks = _layout(owner, cfg.world, cfg.is_causal, length_k)
    left, right = cfg.params.bounds
    chunk = cfg.params.chunk
    q_local = 0
    for qs, qn in q_chunks:
        k_local = 0
        for ks, kn in k_chunks:
            offset = qs - ks
            block_chunk = chunk
            if chunk and ks % chunk:  # shard chunks inside attention chunks: the block is wholly in or out
                block_chunk = 0
                same = qs // chunk == ks // chunk
            else:
                same = True
            state = variants.tile_states(qn, kn, left, right, offset, block_chunk, max(qn, 1), max(kn, 1))
            if same and int(state.max()) != variants.EMPTY:
                yield q_local, qn, k_local, kn, offset, block_chunk
            k_local += kn
        q_local += qn


def _check_chunk(chunk: int, length: int, world: int, is_causal: bool) -> None:
    shard_chunk = length // _chunks(world, is_causal)
    if chunk and shard_chunk % chunk and chunk % shard_chunk:
        raise ValueError(
            f"chunk: expected a size that divides, or is a multiple of, the length of a shard chunk ({shard_chunk}: "
            f"the sequence over {_chunks(world, is_causal)} chunks), got {chunk}"
        )


def _block_call(cfg: _Config, q, k, v, mask, q_offset, chunk):
    """Params, normalised tensors and the chosen backend for one block (no sinks: they join at the merge)."""
    alibi = cfg.params.alibi
    if alibi is not None and alibi.shape[0] == 1:  # (1, Hq) → (Hq,), as the entry point takes it
        alibi = alibi[0]
    params, q4, k4, v4 = validate(
        q, k, v, mask, 0.0, cfg.params.causal, cfg.params.scale, cfg.params.heads_q != cfg.params.heads_kv,
        cfg.params.window, q_offset, softcap=cfg.params.softcap or None, alibi_slopes=alibi, chunk=chunk or None,
    )  # fmt: skip
    return params, q4, k4, v4, choose(cfg.backend, params)


def _merge(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """In place: ``(out, lse) ⊕= (block_out, block_lse)``; rows with nothing attended stay 0."""
    new = torch.logaddexp(lse, block_lse.to(lse.dtype))
    safe = torch.where(torch.isneginf(new), 0.0, new)
    w_old = torch.where(torch.isneginf(lse), 0.0, torch.exp(lse - safe))
    w_new = torch.where(torch.isneginf(block_lse), 0.0, torch.exp(block_lse - safe))
    out.mul_(w_old.unsqueeze(-1)).add_(block_out.to(out.dtype) * w_new.unsqueeze(-1))
    lse.copy_(new)


class _Ring:
    """Sends this rank's tensors to the next rank and receives the previous rank's, asynchronously."""

    def __init__(self, cfg: _Config):
        self.cfg = cfg
        self.next = (
            dist.get_global_rank(cfg.group, (cfg.rank + 1) % cfg.world) if cfg.group else (cfg.rank + 1) % cfg.world
        )
        self.prev = (
            dist.get_global_rank(cfg.group, (cfg.rank - 1) % cfg.world) if cfg.group else (cfg.rank - 1) % cfg.world
        )

    def alloc(self, like: Tensor) -> Tensor:
        """A receive buffer (one place, so tests can watch how many are alive)."""
        return torch.empty_like(like)

    def _lost(self, err: Exception) -> RuntimeError:
        return RuntimeError(
            f"fastattn ring attention: rank {self.cfg.rank} lost its ring neighbours (sending to rank "
            f"{self.next}, receiving from rank {self.prev}): a rank failed or timed out ({err})"
        )

    def start(self, tensors: list[Tensor]) -> tuple[list, list[Tensor]]:
        tensors = [t.contiguous() for t in tensors]  # the transports send dense buffers only
        received = [self.alloc(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.cfg.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.cfg.group) for r in received]
        try:
            return dist.batch_isend_irecv(ops), received
        except RuntimeError as err:
            raise self._lost(err) from err

    def finish(self, requests) -> None:
        try:
            for req in requests:
                ok = req.wait(self.cfg.timeout) if self.cfg.timeout is not None else req.wait()
                if ok is False:
                    raise RuntimeError("wait returned False")
        except RuntimeError as err:
            raise self._lost(err) from err


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulators: fp32, or fp64 for fp64 inputs (so gradcheck-grade checks stay exact)."""
    return torch.promote_types(dtype, torch.float32)


@dataclass
class _Block:
    """One non-empty (query chunk, key chunk) pair of a ring step, ready for a backend call."""

    qs: int  # local query rows [qs, qs + qn)
    qn: int
    ks: int  # rows [ks, ks + kn) of the key/value shard in hand
    kn: int
    params: AttnParams
    q: Tensor
    k: Tensor
    v: Tensor
    backend: object


def _ring_steps(cfg: _Config, ring: _Ring, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]):
    """Yields, for each ring step, the blocks between local queries and the key/value shard in hand.

    The next shard is already on its way while the caller computes; it is waited for when the caller
    asks for the next step.
    """
    length_q, length_k = q.shape[-2] * cfg.world, k.shape[-2] * cfg.world
    shard = [k, v] + ([mask] if mask is not None else [])
    for step in range(cfg.world):
        owner = (cfg.rank - step) % cfg.world
        pending = ring.start(shard) if step < cfg.world - 1 else None
        kb, vb = shard[0], shard[1]
        mb = shard[2] if mask is not None else None
        blocks = []
        for qs, qn, ks, kn, offset, chunk in _pairs(cfg, owner, length_q, length_k):
            qc, kc, vc = q[..., qs : qs + qn, :], kb[..., ks : ks + kn, :], vb[..., ks : ks + kn, :]
            mc = mb[..., ks : ks + kn] if mb is not None else None
            blocks.append(_Block(qs, qn, ks, kn, *_block_call(cfg, qc, kc, vc, mc, offset, chunk)))
        yield blocks
        if pending is not None:
            requests, shard = pending
            ring.finish(requests)


def _ring_forward(cfg: _Config, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], sinks: Optional[Tensor]):
    acc = _acc_dtype(q.dtype)
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=acc, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
    for blocks in _ring_steps(cfg, _Ring(cfg), q, k, v, mask):
        for b in blocks:
            block_out, block_lse = b.backend.forward(b.q, b.k, b.v, b.params, None)
            if b.params.three_d:
                block_out, block_lse = block_out.squeeze(0), block_lse.squeeze(0)
            _merge(out[..., b.qs : b.qs + b.qn, :], lse[..., b.qs : b.qs + b.qn], block_out, block_lse)
    if sinks is not None:  # once, after every block: (H, L, Ev) inputs get a batch dim for the merge
        squeeze = q.dim() == 3
        out4, lse4 = (out.unsqueeze(0), lse.unsqueeze(0)) if squeeze else (out, lse)
        out4, lse4 = variants.merge_sinks(out4, lse4, sinks.detach())
        out, lse = (out4.squeeze(0), lse4.squeeze(0)) if squeeze else (out4, lse4)
    return out.to(q.dtype), lse


def _ring_backward(cfg: _Config, grad_out, q, k, v, mask, out, lse):
    acc = _acc_dtype(q.dtype)
    dq = torch.zeros_like(q, dtype=acc)
    dk = torch.zeros_like(k, dtype=acc)
    dv = torch.zeros_like(v, dtype=acc)
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)  # the backends' lse format
    ring = _Ring(cfg)
    # The dK/dV accumulators travel one step behind their key/value shard: each step's contributions
    # are added to the accumulator that arrived with the shard in hand, and after the last step they
    # move once more, and so come home to their owner.
    moving = None
    for blocks in _ring_steps(cfg, ring, q, k, v, mask):
        if moving is not None:
            ring.finish(moving[0])
            dk, dv = moving[1]
        for b in blocks:
            rows = slice(b.qs, b.qs + b.qn)
            oc, lc, gc = out[..., rows, :], lse[..., rows], grad_out[..., rows, :]
            if b.params.three_d:
                oc, lc, gc = oc.unsqueeze(0), lc.unsqueeze(0), gc.unsqueeze(0)
            gdq, gdk, gdv, _ = run_backward(b.backend, gc.contiguous(), b.q, b.k, b.v, oc, lc, b.params, None, False)
            if b.params.three_d:
                gdq, gdk, gdv = gdq.squeeze(0), gdk.squeeze(0), gdv.squeeze(0)
            dq[..., rows, :] += gdq
            dk[..., b.ks : b.ks + b.kn, :] += gdk
            dv[..., b.ks : b.ks + b.kn, :] += gdv
        moving = ring.start([dk, dv])
    ring.finish(moving[0])
    dk, dv = moving[1]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, sinks, cfg):
        out, lse = _ring_forward(cfg, q, k, v, mask, sinks)
        ctx.save_for_backward(q, k, v, mask, sinks, out, lse)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, mask, sinks, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(ctx.cfg, grad_out, q, k, v, mask, out, lse)
        dsinks = None
        if ctx.needs_input_grad[4]:  # this rank's queries' contribution
            unsq = (lambda t: t.unsqueeze(0)) if q.dim() == 3 else (lambda t: t)
            dsinks = variants.sink_grad(sinks, unsq(lse), unsq(grad_out), unsq(out))
        return dq, dk, dv, None, dsinks, None


def ring_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    group=None,
    is_causal: bool = False,
    attn_mask: Optional[Tensor] = None,
    window: Optional[tuple[int, int]] = None,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
    chunk: Optional[int] = None,
    backend: Optional[str] = None,
    return_lse: bool = False,
    timeout: Optional[timedelta] = None,
):
    """Attention over a sequence sharded across the ranks of ``group``; returns this rank's shard.

    ``query``/``key``/``value``: this rank's shards ``(B, H, L/W, E)`` (3-D accepted), laid out by
    ``shard_sequence(..., is_causal=is_causal)``. ``attn_mask``: optional key padding, this rank's
    shard of a ``(B, 1, 1, L)`` boolean (shard it with ``dim=-1``); it travels with its keys.
    ``window``, ``scale``, ``enable_gqa``, ``softcap``, ``alibi_slopes``, ``sinks``, ``chunk`` and
    ``backend`` mean what they mean for ``fastattn.scaled_dot_product_attention``; positions are
    global, so causal, window, chunk and ALiBi are exact across shards (``chunk`` must divide, or be a
    multiple of, the length of a shard chunk). The sinks join the softmax once. Dropout and general
    masks are not supported here. ``timeout`` bounds each wait on a neighbour (default: the process
    group's timeout).
    """
    world, rank = _world(group)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    _check_divisible(query.shape[-2] * world, world, is_causal, "query")
    _check_divisible(key.shape[-2] * world, world, is_causal, "key")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool or attn_mask.dim() != query.dim() or attn_mask.shape[-2] != 1:
            raise ValueError(
                "attn_mask: expected this rank's shard of a key-padding mask, boolean "
                f"({'(B, 1, 1, L_local)' if query.dim() == 4 else '(1, 1, L_local)'}), "
                f"got {attn_mask.dtype} of shape {tuple(attn_mask.shape)}"
            )
        if attn_mask.shape[-1] != key.shape[-2]:
            raise ValueError(
                f"attn_mask: expected {key.shape[-2]} keys (key's local length), got {attn_mask.shape[-1]}"
            )
    # Validate the local shapes once with the entry point's checks (also names bad arguments).
    params, *_ = validate(
        query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa, window, 0,
        softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, chunk=chunk,
    )  # fmt: skip
    _check_chunk(params.chunk, query.shape[-2] * world, world, is_causal)
    cfg = _Config(group, world, rank, is_causal, params, backend, timeout)
    out, lse = _RingAttention.apply(query, key, value, attn_mask, params.sinks, cfg)
    return (out, lse) if return_lse else out
