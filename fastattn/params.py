"""``AttnParams``: the one frozen description of an attention call, from the entry point to every kernel.

The entry point validates its arguments once (``fastattn._validate``) into an ``AttnParams``; the registry
chooses a backend from it (capabilities as data, ``fastattn.backends.registry``); the autograd function
hands it to the backend's forward and backward; each backend turns it into its op's arguments, which
have one order across backends (``backends/registry.py``: ``OP_FWD_SCHEMA``/``OP_BWD_SCHEMA``). Nothing
below the entry point re-validates or re-interprets it. It holds:

* sizes: batch, heads (query and key/value), lengths, head dims, dtype, device, ``three_d`` (the caller
  passed 3-D tensors); and the sequence ``layout`` (``SEQ_LAYOUTS``) with, for packed sequences, the
  ``cu_seqlens_q``/``cu_seqlens_k`` tensors and the token counts ``total_q``/``total_k``;
* the softmax: ``scale``, ``dropout_p``;
* the variant (rules: ``fastattn.variants``): the band (``causal``, ``window``, ``q_offset``), ``chunk``,
  ``softcap``, ``alibi`` slopes and ``sinks``;
* the mask tensor (``mask``: the ``(B, Hq, Lq, Lk)`` broadcast view, never copied; ``mask_base``: the
  same with its size-1 dims kept; ``mask_obj``: a ``fastattn.Mask`` whose summary is reused) and its
  per-tile summary (``tile_summary``), cached per block size.

``features`` names what a call uses beyond plain attention; a backend's ``Capabilities`` name what it
can do, and the difference is its refusal (``registry.Capabilities.reason``). A new variant adds a field
here, a check in ``_validate``, its rule in each language (``fastattn/variants.py``, the Triton rule
module, ``csrc/attn_rules.h``) and a feature name: see ``DESIGN.md``, "Adding a variant".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import variants
from .masks import Mask, TileSummary, tensor_tile_summary

__all__ = ["AttnParams", "SEQ_LAYOUTS", "FEATURES", "VariantScalars"]

# Everything a call may use beyond plain dense attention (bool/float mask tensors, dropout, GQA, a value
# head dim different from the query's, the float mask's gradient, the variants, the sequence layouts), in
# order, each with what a backend's refusal calls it ("it has no ...": ``registry.Capabilities.reason``).
FEATURES = {
    "mask_bool": "boolean attn_mask",
    "mask_float": "float attn_mask",
    "mask_grad": "gradient for a float attn_mask",
    "dropout": "dropout (dropout_p > 0)",
    "gqa": "grouped-query attention (fewer key/value heads)",
    "head_dim_v": "value head dim different from the query's",
    "softcap": "logit softcap (softcap=)",
    "alibi": "in-kernel ALiBi (alibi_slopes=)",
    "sinks": "attention sinks (sinks=)",
    "chunk": "chunked attention (chunk=)",
    "packed": "packed variable-length sequences (varlen_attention)",
    "kvcache": "key/value-cache attention (kvcache_attention)",
    "paged": "paged key/value caches (block_table=)",
}


# How sequences sit in the tensors. ``"dense"``: ``(B, H, L, D)``, every row of a batch one sequence of ``Lq``
# queries and ``Lk`` keys. ``"packed"`` (``fastattn.varlen_attention``): ``B`` sequences of lengths
# ``cu_seqlens[b + 1] - cu_seqlens[b]`` laid end to end; below the entry point the tensors are the views
# ``(1, H, total, D)`` of the caller's ``(total, H, D)``, ``batch`` is the number of sequences and
# ``seqlen_q``/``seqlen_k`` are the caller's ``max_seqlen_q``/``max_seqlen_k``; every sequence is aligned
# bottom-right (query ``i`` of ``b`` sits at key position ``i + Lk_b - Lq_b``, ``q_offset`` is 0). Kernels
# read a per-sequence start and length, and a dense batch is the case of one sequence per row. ``"kvcache"`` and
# ``"paged"`` (``fastattn.kvcache_attention``): ``Lq`` queries per row over a contiguous ``(B, Hkv, Lmax, D)`` or
# paged ``(num_pages, Hkv, page_size, D)`` key/value cache; ``seqlen_k`` is the cache's capacity per sequence, the
# per-sequence lengths live in ``cache_seqlens`` (not in the params), and alignment is bottom-right per sequence.
SEQ_LAYOUTS = ("dense", "packed", "kvcache", "paged")


class VariantScalars(NamedTuple):
    """The variant's scalars as every op takes them: one ``float[] variant`` argument (``pack``), read back by
    ``unpack`` here (the Python ops) and by ``unpack_variant`` in ``csrc/attn_rules.h`` (the C++ ops), in this
    field order. The band has causal folded in (``AttnParams.bounds``, -1 unbounded); 0 is "none" for ``chunk``
    and ``softcap``. Integers travel exactly (doubles, below 2**53). A new scalar rule is a field here, named as
    its ``AttnParams`` field, and its read in ``unpack_variant``: no op schema, fake or reference op changes. The
    tensor variants (ALiBi slopes, sinks) are op arguments of their own."""

    window_left: int = -1
    window_right: int = -1
    q_offset: int = 0
    chunk: int = 0
    softcap: float = 0.0

    def pack(self) -> list[float]:
        return [float(x) for x in self]

    @classmethod
    def unpack(cls, variant: Sequence[float]) -> VariantScalars:
        """The scalars of an op's ``variant`` argument, each in its field's type (int or float)."""
        if len(variant) != len(cls._fields):
            names = ", ".join(cls._fields)
            raise ValueError(f"variant: expected {len(cls._fields)} numbers ({names}), got {len(variant)}")
        return cls(*(type(d)(x) for d, x in zip(cls._field_defaults.values(), variant)))

    def params_kwargs(self) -> dict:
        """The keywords of ``AttnParams.for_tensors`` that these scalars give."""
        kw = self._asdict()
        kw["window"] = (kw.pop("window_left"), kw.pop("window_right"))
        return kw


@dataclass(frozen=True, eq=False)
class AttnParams:
    """The normalised description of one attention call (see the module docstring)."""

    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    head_dim_v: int
    dtype: torch.dtype
    device: torch.device
    scale: float
    three_d: bool = False
    dropout_p: float = 0.0
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    q_offset: int = 0
    chunk: int = 0
    softcap: float = 0.0
    alibi: Optional[Tensor] = None
    sinks: Optional[Tensor] = None
    mask: Optional[Tensor] = None
    mask_base: Optional[Tensor] = None
    mask_obj: Optional[Mask] = None
    layout: str = "dense"
    cu_seqlens_q: Optional[Tensor] = None
    cu_seqlens_k: Optional[Tensor] = None
    total_q: int = 0
    total_k: int = 0
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @staticmethod
    def for_tensors(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        scale: float,
        *,
        mask: Optional[Tensor] = None,
        cu_seqlens_q: Optional[Tensor] = None,
        cu_seqlens_k: Optional[Tensor] = None,
        max_seqlen_q: int = 0,
        max_seqlen_k: int = 0,
        **kw,
    ) -> AttnParams:
        """Params of 4-D ``q``, ``k``, ``v`` (already validated: ops and tests build them this way).

        With ``cu_seqlens_q`` (and ``cu_seqlens_k``) the layout is packed: ``q`` is the ``(1, Hq, total_q, D)``
        view of the packed tensor, and the lengths are the maxima given.
        """
        b, hq, lq, d = q.shape
        lk = k.shape[2]
        if cu_seqlens_q is not None:
            kw.update(
                layout="packed",
                cu_seqlens_q=cu_seqlens_q,
                cu_seqlens_k=cu_seqlens_k,
                total_q=lq,
                total_k=lk,
            )
            b, lq, lk = cu_seqlens_q.shape[0] - 1, int(max_seqlen_q), int(max_seqlen_k)
        return AttnParams(
            batch=b,
            heads_q=hq,
            heads_kv=k.shape[1],
            seqlen_q=lq,
            seqlen_k=lk,
            head_dim=d,
            head_dim_v=v.shape[-1],
            dtype=q.dtype,
            device=q.device,
            scale=float(scale),
            mask=mask,
            mask_base=mask,
            **kw,
        )

    def replace(self, **changes) -> AttnParams:
        """A copy with ``changes`` (and an empty summary cache)."""
        return dataclasses.replace(self, _cache={}, **changes)

    # ------------------------------------------------------------------ derived facts

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_kv if self.heads_kv else 1

    @property
    def bounds(self) -> tuple[int, int]:
        """``(left, right)`` of the band with causal folded in; -1 is unbounded."""
        left, right = self.window
        if self.causal:
            right = 0 if right < 0 else min(right, 0)
        return left, right

    @property
    def variant_scalars(self) -> VariantScalars:
        """The ops' ``variant`` argument, before packing: the band with causal folded in and the other fields."""
        left, right = self.bounds
        return VariantScalars(left, right, *(getattr(self, name) for name in VariantScalars._fields[2:]))

    @property
    def has_band(self) -> bool:
        return self.bounds != (-1, -1)

    @property
    def has_structure(self) -> bool:
        """Whether the band or the chunk leaves pairs out (the analytic part of the summary is not all FULL)."""
        return self.has_band or self.chunk > 0

    @property
    def mask_kind(self) -> str:
        if self.mask is None:
            return "none"
        return "bool" if self.mask.dtype == torch.bool else "float"

    @property
    def is_key_padding(self) -> bool:
        """A mask tensor that depends on the key only (``(B|1, 1|H, 1, Lk)``)."""
        return self.mask_base is not None and self.mask_base.shape[-2] == 1

    @property
    def features(self) -> frozenset[str]:
        """The names (``FEATURES``) of what this call uses beyond plain dense attention."""
        used = set()
        if self.mask is not None:
            used.add("mask_bool" if self.mask.dtype == torch.bool else "mask_float")
            if self.mask.dtype.is_floating_point and self.mask.requires_grad:
                used.add("mask_grad")
        if self.dropout_p > 0.0:
            used.add("dropout")
        if self.heads_q != self.heads_kv:
            used.add("gqa")
        if self.head_dim_v != self.head_dim:
            used.add("head_dim_v")
        if self.softcap > 0.0:
            used.add("softcap")
        if self.alibi is not None:
            used.add("alibi")
        if self.sinks is not None:
            used.add("sinks")
        if self.chunk > 0:
            used.add("chunk")
        if self.layout == "packed":
            used.add("packed")
        if self.layout in ("kvcache", "paged"):
            used.add("kvcache")
        if self.layout == "paged":
            used.add("paged")
        return frozenset(used)

    @property
    def score_rules(self) -> dict[str, float]:
        """The scalar score rules by name (``variants.SCORE_RULES``; 0.0: off), as ``variants.score_mod`` takes them."""
        return {name: getattr(self, name) for name in variants.SCORE_RULES}

    @property
    def has_score_mod(self) -> bool:
        """Softcap or ALiBi: every score is modified (no tile is free of arithmetic, but none is emptied)."""
        return self.softcap > 0.0 or self.alibi is not None

    # ------------------------------------------------------------------ the packed layout

    @property
    def is_packed(self) -> bool:
        return self.layout == "packed"

    def seq_lengths(self) -> tuple[list[int], list[int], list[int], list[int]]:
        """``(starts_q, lengths_q, starts_k, lengths_k)`` of the packed sequences, as Python lists.

        Reads ``cu_seqlens`` on the host (a device sync for GPU tensors): for the oracle, tests and FLOP counts,
        never for the kernels, which read the tensors themselves.
        """
        cu_q, cu_k = self.cu_seqlens_q.tolist(), self.cu_seqlens_k.tolist()
        return (
            cu_q[:-1],
            [e - s for s, e in zip(cu_q[:-1], cu_q[1:])],
            cu_k[:-1],
            [e - s for s, e in zip(cu_k[:-1], cu_k[1:])],
        )

    def sequence(self, b: int, seqlen_q: int, seqlen_k: int) -> AttnParams:
        """The dense params of packed sequence ``b`` alone: one row, aligned bottom-right, its ALiBi slopes."""
        alibi = self.alibi
        if alibi is not None and alibi.shape[0] > 1:
            alibi = alibi[b : b + 1]
        return self.replace(
            batch=1,
            seqlen_q=seqlen_q,
            seqlen_k=seqlen_k,
            q_offset=seqlen_k - seqlen_q,
            alibi=alibi,
            layout="dense",
            cu_seqlens_q=None,
            cu_seqlens_k=None,
            total_q=0,
            total_k=0,
        )

    def packed_tile_minimum(self, block_q: int, block_k: int) -> int:
        """The (query tile, key tile) pairs a packed kernel must visit per query head: each sequence's own
        non-empty tiles (``variants.tile_states`` of its ``(Lq_b, Lk_b)``, aligned bottom-right), summed."""
        left, right = self.bounds
        total = 0
        for lq, lk in zip(*self.seq_lengths()[1::2]):
            if lq and lk:
                states = variants.tile_states(lq, lk, left, right, lk - lq, self.chunk, block_q, block_k)
                total += int((states != variants.EMPTY).sum())
        return total

    def _dense_only(self, what: str) -> None:
        if self.is_packed:
            raise ValueError(
                f"{what}: expected the dense layout (one (Lq, Lk) grid for every row), got packed sequences; "
                "use AttnParams.sequence(b, Lq_b, Lk_b) for sequence b"
            )

    def allowed(self, device=None) -> Tensor:
        """Dense ``(Lq, Lk)`` boolean of the band and the chunk (for the oracle and tests)."""
        self._dense_only("allowed")
        left, right = self.bounds
        return variants.allowed(
            self.seqlen_q, self.seqlen_k, left, right, self.q_offset, self.chunk, device or self.device
        )

    # ------------------------------------------------------------------ the tile summary

    def tile_summary(self, block_q: int, block_k: int) -> TileSummary:
        """The per-tile summary for ``(block_q, block_k)``, cached on these params (not while compiling).

        While ``torch.compile`` traces (a backward runs inside a traced subgraph), writing into the cache is
        a side effect Dynamo refuses, so the summary is then computed without caching it.
        """
        self._dense_only("tile_summary")
        key = (block_q, block_k)
        if key in self._cache:
            return self._cache[key]
        device = self.mask.device if self.mask is not None else self.device
        left, right = self.bounds
        state = variants.tile_states(
            self.seqlen_q, self.seqlen_k, left, right, self.q_offset, self.chunk, block_q, block_k, device
        )
        if self.mask_base is not None:
            if self.mask_obj is not None:
                tens = self.mask_obj._tensor_summary(self.mask_base, self.seqlen_q, self.seqlen_k, block_q, block_k)
            else:
                tens = tensor_tile_summary(self.mask_base, self.seqlen_q, self.seqlen_k, block_q, block_k)
            state = torch.minimum(state.to(tens.state.device), tens.state)
        summary = TileSummary.from_state(block_q, block_k, state)
        if not torch.compiler.is_compiling():
            self._cache[key] = summary
        return summary

    def attended_pairs(self, batch: Optional[int] = None, heads: Optional[int] = None) -> int:
        """Number of (query, key) pairs that take part, summed over batch and heads (for FLOP counts)."""
        batch = self.batch if batch is None else batch
        heads = self.heads_q if heads is None else heads
        if self.is_packed:
            _, lengths_q, _, lengths_k = self.seq_lengths()
            pairs = (
                self.sequence(b, lq, lk).attended_pairs(1, 1) for b, (lq, lk) in enumerate(zip(lengths_q, lengths_k))
            )
            return sum(pairs) * heads
        allowed = self.allowed(self.mask.device if self.mask is not None else "cpu")
        if self.mask_base is not None:
            base = self.mask_base if self.mask_base.dtype == torch.bool else self.mask_base != float("-inf")
            return int((allowed & base).expand(batch, heads, -1, -1).sum())
        return int(allowed.sum()) * batch * heads
