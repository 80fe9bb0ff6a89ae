"""The graph layout every fused graph-attention kernel reads, built from PyG's ``edge_index`` and cached.

A :class:`Graph` holds two compressed views of the same edges:

* **CSR by target** (``rowptr``, ``col``, ``eid``): the incoming edges of target ``i`` are the slots
  ``rowptr[i]:rowptr[i+1]``; slot ``q`` comes from source ``col[q]`` and is edge id ``eid[q]``. The
  forward and the backward's first pass walk it (one online softmax per target).
* **CSC by source** (``colptr``, ``row``, ``slot``): the outgoing edges of source ``j`` are
  ``colptr[j]:colptr[j+1]``, going to target ``row[t]`` through CSR slot ``slot[t]``. The backward's
  second pass walks it, so source-side gradients are sums per source, not scatters with atomics.

Edge ids are those of ``edge_index`` (``0 .. E-1``), then, with ``add_self_loops``, one self loop per
node ``i < min(num_src, num_dst)`` as id ``E + i`` (PyG's ``add_self_loops`` order). PyG's
``remove_self_loops`` is applied without changing any size: a self loop already in ``edge_index``
is sorted past ``rowptr[-1]`` (and ``colptr[-1]``), where no kernel looks. Every size is therefore
fixed by the inputs' shapes, which is what lets ``torch.compile(fullgraph=True)`` trace the build.

Building sorts the edges twice (O(E log E)); :func:`graph_for` caches the result per ``edge_index``
tensor (its identity, storage and version counter), so a static graph is prepared once and a graph
that changes every step costs one build per step.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = ["Graph", "build_graph", "graph_for", "check_edge_index", "clear_cache"]


@dataclass(frozen=True, eq=False)
class Graph:
    """Incoming-edge CSR and outgoing-edge CSC of one graph (see the module docstring)."""

    num_src: int
    num_dst: int
    num_edges: int  # E: the edges of edge_index
    num_loops: int  # self loops added after them (ids E .. E + num_loops - 1)
    rowptr: Tensor  # (num_dst + 1,) int64
    col: Tensor  # (E + num_loops,) int64: source of each CSR slot
    eid: Tensor  # (E + num_loops,) int64: edge id of each CSR slot
    colptr: Tensor  # (num_src + 1,) int64
    row: Tensor  # (E + num_loops,) int64: target of each CSC slot
    slot: Tensor  # (E + num_loops,) int64: CSR slot of each CSC slot
    edge_index: Tensor  # (2, E + num_loops) int64: every edge id's (source, target)
    kept: Optional[Tensor]  # (E + num_loops,) bool, False for the self loops add_self_loops replaced; None: all kept

    @property
    def num_ids(self) -> int:
        """Edge ids in use: ``num_edges + num_loops``."""
        return self.num_edges + self.num_loops

    @property
    def device(self) -> torch.device:
        return self.rowptr.device

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(rowptr, col, eid, colptr, row, slot)``: the op arguments, in their order."""
        return self.rowptr, self.col, self.eid, self.colptr, self.row, self.slot

    @classmethod
    def from_edge_index(
        cls,
        edge_index: Tensor,
        num_nodes: Union[int, tuple[int, int], None] = None,
        add_self_loops: bool = False,
    ) -> Graph:
        """Build (uncached) the graph of ``edge_index`` for ``num_nodes`` nodes, or ``(num_src, num_dst)``.

        Without ``num_nodes`` the count is ``edge_index.max() + 1``. Pass the result instead of
        ``edge_index`` to any fastattn graph op to skip the cache lookup (and to compile through it).
        """
        if num_nodes is None:
            n = int(edge_index.max()) + 1 if isinstance(edge_index, Tensor) and edge_index.numel() else 0
            num_src = num_dst = n
        elif isinstance(num_nodes, int):
            num_src = num_dst = num_nodes
        else:
            num_src, num_dst = (int(v) for v in num_nodes)
        device = edge_index.device if isinstance(edge_index, Tensor) else torch.device("cpu")
        checked = check_edge_index(edge_index, num_src, num_dst, device)
        return build_graph(checked, num_src, num_dst, add_self_loops)

    def kept_edge_index(self) -> Tensor:
        """``(2, E')`` the edges attention runs over, in PyG's order (its edge_index after the self-loop steps)."""
        return self.edge_index if self.kept is None else self.edge_index[:, self.kept]


def check_edge_index(edge_index, num_src: int, num_dst: int, device: torch.device) -> Tensor:
    """``edge_index`` as int64 after every check (with the argument named in each error)."""
    if not isinstance(edge_index, Tensor):
        kind = type(edge_index).__name__
        hint = ""
        if kind == "SparseTensor":
            hint = " (a torch_sparse SparseTensor is not supported: pass its COO edge_index)"
        raise TypeError(
            f"edge_index: expected a (2, num_edges) integer tensor (PyG's edge_index: row 0 sources, row 1 "
            f"targets) or a fastattn.graph.Graph, got {kind}{hint}"
        )
    if edge_index.layout != torch.strided:
        raise ValueError(
            f"edge_index: a sparse adjacency ({edge_index.layout}) is not supported; pass the (2, num_edges) "
            "edge_index of its COO form (adj.coalesce().indices())"
        )
    if edge_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"edge_index: expected dtype torch.int64 or torch.int32, got {edge_index.dtype}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index: expected shape (2, num_edges), got {tuple(edge_index.shape)}")
    if edge_index.device != device:
        raise ValueError(f"edge_index: expected a tensor on {device} like the node features, got {edge_index.device}")
    if edge_index.shape[1] > 0:
        lo = int(edge_index.min())
        src_hi, dst_hi = (int(v) for v in edge_index.max(dim=1).values)
        if lo < 0:
            raise ValueError(f"edge_index: node indices must be >= 0, got {lo}")
        if src_hi >= num_src:
            raise ValueError(f"edge_index: source index {src_hi} (row 0) is out of range for {num_src} source nodes")
        if dst_hi >= num_dst:
            raise ValueError(f"edge_index: target index {dst_hi} (row 1) is out of range for {num_dst} target nodes")
    return edge_index.long()


def build_graph(edge_index: Tensor, num_src: int, num_dst: int, add_self_loops: bool = False) -> Graph:
    """The :class:`Graph` of a checked int64 ``edge_index`` (no cache, no checks: see :func:`graph_for`)."""
    device = edge_index.device
    src, dst = edge_index[0], edge_index[1]
    num_edges = src.shape[0]
    kept = None
    num_loops = 0
    if add_self_loops:
        # PyG: remove_self_loops, then add_self_loops(num_nodes=min(num_src, num_dst)).
        num_loops = min(num_src, num_dst)
        loop = torch.arange(num_loops, device=device)
        kept = torch.cat([src != dst, torch.ones(num_loops, dtype=torch.bool, device=device)])
        src, dst = torch.cat([src, loop]), torch.cat([dst, loop])
    # Dropped edges sort after every target (key num_dst) and after every source (key num_src).
    key = dst if kept is None else torch.where(kept, dst, num_dst)
    key_sorted, eid = torch.sort(key, stable=True)
    col = src[eid]
    rowptr = torch.searchsorted(key_sorted, torch.arange(num_dst + 1, device=device))
    ckey = col if kept is None else torch.where(kept[eid], col, num_src)
    ckey_sorted, slot = torch.sort(ckey, stable=True)
    row = key_sorted[slot]
    colptr = torch.searchsorted(ckey_sorted, torch.arange(num_src + 1, device=device))
    return Graph(
        num_src=num_src,
        num_dst=num_dst,
        num_edges=num_edges,
        num_loops=num_loops,
        rowptr=rowptr,
        col=col,
        eid=eid,
        colptr=colptr,
        row=row,
        slot=slot,
        edge_index=torch.stack([src, dst]),
        kept=kept,
    )


_CACHE_SIZE = 16
_cache: OrderedDict[tuple, tuple[weakref.ref, Graph]] = OrderedDict()


def clear_cache() -> None:
    """Forget every cached :class:`Graph`."""
    _cache.clear()


def graph_for(
    edge_index: Union[Tensor, Graph],
    num_src: int,
    num_dst: int,
    add_self_loops: bool = False,
    device: Optional[torch.device] = None,
) -> Graph:
    """The :class:`Graph` of ``edge_index``: built (and checked) once per tensor, then reused.

    The key is the tensor's identity, storage pointer and version counter (an in-place edit builds
    anew), the node counts and ``add_self_loops``; a weak reference makes sure a recycled ``id()`` never
    hits. At most 16 graphs are kept (least recently used first out). A :class:`Graph` passes through
    after its sizes are checked. Under ``torch.compile`` the graph is built inline, uncached and unchecked.
    """
    if isinstance(edge_index, Graph):
        g = edge_index
        if (g.num_src, g.num_dst) != (num_src, num_dst):
            raise ValueError(
                f"edge_index: the Graph was built for {g.num_src} sources and {g.num_dst} targets, "
                f"the node features have {num_src} and {num_dst}"
            )
        if add_self_loops and g.num_loops == 0 and min(num_src, num_dst) > 0:
            raise ValueError(
                "edge_index: add_self_loops=True, but the Graph was built without self loops "
                "(Graph.from_edge_index(..., add_self_loops=True))"
            )
        return g
    if torch.compiler.is_compiling():
        return build_graph(edge_index.long(), num_src, num_dst, add_self_loops)
    if not isinstance(edge_index, Tensor) or edge_index.layout != torch.strided:
        check_edge_index(edge_index, num_src, num_dst, device)  # raises, naming what was given
    key = (id(edge_index), edge_index.data_ptr(), edge_index._version, num_src, num_dst, bool(add_self_loops))
    hit = _cache.get(key)
    if hit is not None and hit[0]() is edge_index:
        _cache.move_to_end(key)
        return hit[1]
    checked = check_edge_index(edge_index, num_src, num_dst, device if device is not None else edge_index.device)
    g = build_graph(checked, num_src, num_dst, add_self_loops)
    _cache[key] = (weakref.ref(edge_index), g)
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return g
