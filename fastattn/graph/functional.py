"""Fused graph attention: softmax over each target's incoming edges without per-edge feature tensors.

Three scorings, one kernel family (``_ops.py``); every head in one pass, forward and backward, float32
and bfloat16 (float64 on the reference backend). Per edge only scalars are ever stored (edges × heads,
for the backward); nothing of size edges × heads × channels is allocated.

``edge_index`` is PyG's ``(2, E)`` (row 0 sources ``j``, row 1 targets ``i``) or a prepared
:class:`~fastattn.graph.Graph`. With ``add_self_loops=True`` the self loops already present are
replaced by one per node (PyG's ``remove_self_loops`` + ``add_self_loops``); the new loops' edge
features come from ``fill_value`` as in PyG (``"mean"``, ``"add"``/``"sum"``, ``"max"``, ``"min"``,
``"mul"`` of each node's incoming edges, a number, or a tensor).

Dropout: ``dropout_p`` drops attention weights (after the softmax) with a counter-based generator
(``_dropout.py``); pass ``philox`` (``[seed, offset]`` int64) to choose the draw, else one is taken from
torch's generator. Attention weights (``return_attention_weights=True``) are the softmax before dropout,
by edge in PyG's order, and carry no gradient.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from ._backends import choose
from ._dropout import philox_seed_offset
from ._structure import Graph, graph_for
from .reference import KINDS

__all__ = ["dot_attention", "gat_attention", "gatv2_attention", "self_loop_attr"]

EdgeIndex = Union[Tensor, Graph]
FillValue = Union[float, int, Tensor, str, None]


def _check_nodes(name: str, t, ndim: int, what: str, ref: Optional[Tensor] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a tensor {what}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {what}, got shape {tuple(t.shape)}")
    if ref is not None:
        if t.dtype != ref.dtype:
            raise TypeError(f"{name}: expected dtype {ref.dtype} like the other features, got {t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name}: expected a tensor on {ref.device} like the other features, got {t.device}")
    elif not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")


def _edge_features(edge_attr: Optional[Tensor], num_edges: int, ref: Tensor) -> Optional[Tensor]:
    """``edge_attr`` as ``(E, De)`` (PyG's 1-D edge features become one column)."""
    if edge_attr is None:
        return None
    if not isinstance(edge_attr, Tensor):
        raise TypeError(f"edge_attr: expected a tensor (num_edges, edge_dim), got {type(edge_attr).__name__}")
    if edge_attr.dim() == 1:
        edge_attr = edge_attr.view(-1, 1)  # (E,) -> (E, 1)
    if edge_attr.dim() != 2 or edge_attr.shape[0] != num_edges:
        raise ValueError(f"edge_attr: expected (num_edges={num_edges}, edge_dim), got shape {tuple(edge_attr.shape)}")
    _check_nodes("edge_attr", edge_attr, 2, "(num_edges, edge_dim)", ref)
    return edge_attr


def self_loop_attr(edge_attr: Tensor, graph: Graph, fill_value: FillValue = "mean") -> Tensor:
    """Edge features ``(graph.num_loops, D)`` of the added self loops, as PyG's ``add_self_loops`` fills them.

    The string reductions run over each node's incoming edges of ``edge_index`` without its own self
    loops (PyG removes those first); a node without any gets 0 (1 for ``"mul"``). Fixed shapes only
    (masks, no filtering), so ``torch.compile`` traces it.
    """
    n, width = graph.num_loops, edge_attr.shape[1:]
    if fill_value is None:
        return edge_attr.new_ones(n, *width)
    if isinstance(fill_value, (int, float)) and not isinstance(fill_value, bool):
        return edge_attr.new_full((n, *width), float(fill_value))
    if isinstance(fill_value, Tensor):
        value = fill_value.to(edge_attr.device, edge_attr.dtype)
        if value.dim() != edge_attr.dim():
            value = value.unsqueeze(0)
        return value.expand(n, *width).contiguous()
    if not isinstance(fill_value, str) or fill_value not in ("mean", "add", "sum", "max", "min", "mul"):
        raise ValueError(
            "fill_value: expected a number, a tensor or one of 'mean', 'add', 'sum', 'max', 'min', 'mul', "
            f"got {fill_value!r}"
        )
    e = graph.num_edges
    dst = graph.edge_index[1, :e]
    kept = graph.kept[:e] if graph.kept is not None else torch.ones(e, dtype=torch.bool, device=dst.device)
    rows = max(graph.num_dst, n)  # targets beyond the loops' nodes reduce into rows that are cut off below
    keep_col = kept.view(-1, *([1] * len(width)))  # (E,) -> (E, 1, ...) to broadcast over the features
    index = dst.view(-1, *([1] * len(width))).expand_as(edge_attr)
    count = torch.zeros(rows, dtype=edge_attr.dtype, device=dst.device).index_add(0, dst, kept.to(edge_attr.dtype))
    count = count.view(-1, *([1] * len(width)))
    if fill_value in ("add", "sum", "mean"):
        total = edge_attr.new_zeros(rows, *width).index_add(0, dst, edge_attr * keep_col)
        out = total / count.clamp(min=1) if fill_value == "mean" else total
    elif fill_value == "mul":
        out = edge_attr.new_ones(rows, *width).scatter_reduce(
            0, index, torch.where(keep_col, edge_attr, 1.0), "prod", include_self=True
        )
    else:
        skip = float("-inf") if fill_value == "max" else float("inf")
        reduce = "amax" if fill_value == "max" else "amin"
        out = edge_attr.new_zeros(rows, *width).scatter_reduce(
            0, index, torch.where(keep_col, edge_attr, skip), reduce, include_self=False
        )
        out = torch.where(count > 0, out, 0.0)
    return out[:n]


def _run(
    kind: int,
    dst: Tensor,
    src: Tensor,
    values: Optional[Tensor],
    att: Optional[Tensor],
    edge_index: EdgeIndex,
    edge_attr: Optional[Tensor],
    loop_attr: Optional[Tensor],
    edge_proj: Optional[Tensor],
    fill_value: FillValue,
    add_self_loops: bool,
    scale: float,
    negative_slope: float,
    dropout_p: float,
    philox: Optional[Tensor],
    return_lse: bool,
    return_attention_weights: bool,
    backend: Optional[str],
):
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p}")
    graph = graph_for(edge_index, src.shape[0], dst.shape[0], add_self_loops, device=dst.device)
    chosen = choose(backend, dst.device, dst.dtype)
    if kind != KINDS["gat"]:
        edge_attr = _edge_features(edge_attr, graph.num_edges, dst)
        if edge_attr is not None:
            heads, channels = src.shape[1], src.shape[2]
            if edge_proj is None:
                raise ValueError("edge_proj: required with edge_attr (the edge projection W_e, PyG's lin_edge.weight)")
            if edge_proj.shape != (heads * channels, edge_attr.shape[1]):
                raise ValueError(
                    f"edge_proj: expected (heads * channels, edge_dim) = ({heads * channels}, {edge_attr.shape[1]}), "
                    f"got shape {tuple(edge_proj.shape)}"
                )
            _check_nodes("edge_proj", edge_proj, 2, "(heads * channels, edge_dim)", dst)
            if graph.num_loops > 0 and loop_attr is None:
                loop_attr = self_loop_attr(edge_attr, graph, fill_value)
    if edge_attr is None or graph.num_loops == 0:
        loop_attr = None
    if float(dropout_p) > 0.0:
        philox = philox_seed_offset(dst.device) if philox is None else philox
    else:
        philox = None
    contiguous = lambda t: None if t is None else t.contiguous()  # noqa: E731
    out, lse, probs = chosen.attention(
        graph, kind, dst.contiguous(), src.contiguous(), contiguous(values), contiguous(att), contiguous(edge_attr),
        contiguous(loop_attr), contiguous(edge_proj), philox, float(scale), float(negative_slope), float(dropout_p),
        bool(return_attention_weights),
    )  # fmt: skip
    result: list = [out]
    if return_lse:
        result.append(lse)
    if return_attention_weights:
        alpha = probs if graph.kept is None else probs[graph.kept]
        result.append((graph.kept_edge_index(), alpha.detach().to(out.dtype)))
    return result[0] if len(result) == 1 else tuple(result)


def dot_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    edge_index: EdgeIndex,
    *,
    edge_attr: Optional[Tensor] = None,
    edge_proj: Optional[Tensor] = None,
    add_self_loops: bool = False,
    fill_value: FillValue = "mean",
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    philox: Optional[Tensor] = None,
    return_lse: bool = False,
    return_attention_weights: bool = False,
    backend: Optional[str] = None,
):
    """Graph-transformer attention (PyG's ``TransformerConv``): ``softmax_j(q_i · (k_j + e_ij) · scale)``.

    ``query (Nd, H, C)``, ``key (Ns, H, C)``, ``value (Ns, H, Cv)``; ``out[i] = Σ_j α_ij (v_j + e_ij)``
    ``(Nd, H, Cv)``, where ``e_ij = W_e edge_attr[ij]`` with ``edge_proj`` = ``W_e`` ``(H·C, De)`` (PyG's
    ``lin_edge.weight``), computed per edge inside the kernel; ``scale`` defaults to ``1/sqrt(C)``.
    ``return_lse`` adds ``lse (Nd, H)`` (float32, natural log, ``-inf`` for a target without edges).
    """
    _check_nodes("query", query, 3, "(num_dst, heads, channels)")
    _check_nodes("key", key, 3, "(num_src, heads, channels)", query)
    _check_nodes("value", value, 3, "(num_src, heads, value_channels)", query)
    if key.shape[1:] != query.shape[1:]:
        want = f"(num_src, {query.shape[1]}, {query.shape[2]})"
        raise ValueError(f"key: expected {want} like query, got {tuple(key.shape)}")
    if value.shape[:2] != key.shape[:2]:
        raise ValueError(
            f"value: expected ({key.shape[0]}, {key.shape[1]}, value_channels) like key, got {tuple(value.shape)}"
        )
    if edge_attr is not None and value.shape[2] != query.shape[2]:
        raise ValueError(
            f"value: with edge_attr the projected edge features are added to keys and values, so value needs "
            f"{query.shape[2]} channels like key, got {value.shape[2]}"
        )
    scale = 1.0 / math.sqrt(query.shape[2]) if scale is None else float(scale)
    return _run(
        KINDS["dot"], query, key, value, None, edge_index, edge_attr, None, edge_proj, fill_value, add_self_loops,
        scale, 0.0, dropout_p, philox, return_lse, return_attention_weights, backend,
    )  # fmt: skip


def gat_attention(
    x: Tensor,
    alpha_src: Tensor,
    alpha_dst: Tensor,
    edge_index: EdgeIndex,
    *,
    alpha_edge: Optional[Tensor] = None,
    loop_alpha: Optional[Tensor] = None,
    add_self_loops: bool = False,
    negative_slope: float = 0.2,
    dropout_p: float = 0.0,
    philox: Optional[Tensor] = None,
    return_lse: bool = False,
    return_attention_weights: bool = False,
    backend: Optional[str] = None,
):
    """GAT attention (PyG's ``GATConv``): ``softmax_j(LeakyReLU(a_j + b_i + c_ij))``, ``out[i] = Σ_j α_ij x_j``.

    ``x (Ns, H, C)`` the sources' transformed features; ``alpha_src (Ns, H)`` = ``a_src · x_j`` and
    ``alpha_dst (Nd, H)`` = ``a_dst · x_i`` (per-node scalars: GAT's score is linear before the LeakyReLU,
    so the attention vectors are applied once per node, and their gradients flow through autograd);
    ``alpha_edge (E, H)`` = ``a_edge · W_e e_ij`` per edge, and ``loop_alpha (num_loops, H)`` the same for
    the added self loops (required with ``alpha_edge`` and ``add_self_loops``). Output ``(Nd, H, C)``.
    """
    _check_nodes("x", x, 3, "(num_src, heads, channels)")
    _check_nodes("alpha_src", alpha_src, 2, "(num_src, heads)", x)
    _check_nodes("alpha_dst", alpha_dst, 2, "(num_dst, heads)", x)
    if alpha_src.shape != x.shape[:2]:
        raise ValueError(f"alpha_src: expected {tuple(x.shape[:2])} like x, got {tuple(alpha_src.shape)}")
    if alpha_dst.shape[1] != x.shape[1]:
        raise ValueError(f"alpha_dst: expected (num_dst, {x.shape[1]}), got {tuple(alpha_dst.shape)}")
    if alpha_edge is not None:
        _check_nodes("alpha_edge", alpha_edge, 2, "(num_edges, heads)", x)
        if alpha_edge.shape[1] != x.shape[1]:
            raise ValueError(f"alpha_edge: expected (num_edges, {x.shape[1]}), got {tuple(alpha_edge.shape)}")
        n_edges = edge_index.num_edges if isinstance(edge_index, Graph) else edge_index.shape[-1]
        if alpha_edge.shape[0] != n_edges:
            got = tuple(alpha_edge.shape)
            raise ValueError(f"alpha_edge: expected ({n_edges}, {x.shape[1]}) (edges, heads), got {got}")
        if add_self_loops and loop_alpha is None:
            raise ValueError("loop_alpha: required with alpha_edge and add_self_loops=True (the loops' edge logits)")
    if loop_alpha is not None:
        _check_nodes("loop_alpha", loop_alpha, 2, "(num_loops, heads)", x)
    return _run(
        KINDS["gat"], alpha_dst, alpha_src, x, None, edge_index, alpha_edge, loop_alpha, None, None, add_self_loops,
        1.0, negative_slope, dropout_p, philox, return_lse, return_attention_weights, backend,
    )  # fmt: skip


def gatv2_attention(
    x_l: Tensor,
    x_r: Tensor,
    att: Tensor,
    edge_index: EdgeIndex,
    *,
    edge_attr: Optional[Tensor] = None,
    edge_proj: Optional[Tensor] = None,
    add_self_loops: bool = False,
    fill_value: FillValue = "mean",
    negative_slope: float = 0.2,
    dropout_p: float = 0.0,
    philox: Optional[Tensor] = None,
    return_lse: bool = False,
    return_attention_weights: bool = False,
    backend: Optional[str] = None,
):
    """GATv2 "dynamic" attention (PyG's ``GATv2Conv``): ``softmax_j(att · LeakyReLU(xl_j + xr_i + e_ij))``.

    ``x_l (Ns, H, C)`` the sources' features (also the values: ``out[i] = Σ_j α_ij xl_j``), ``x_r (Nd, H, C)``
    the targets', ``att`` ``(H, C)`` (or PyG's ``(1, H, C)``); ``e_ij = W_e edge_attr[ij]`` with
    ``edge_proj`` = ``W_e`` ``(H·C, De)``, inside the LeakyReLU, computed per edge in the kernel.
    """
    _check_nodes("x_l", x_l, 3, "(num_src, heads, channels)")
    _check_nodes("x_r", x_r, 3, "(num_dst, heads, channels)", x_l)
    if x_r.shape[1:] != x_l.shape[1:]:
        raise ValueError(f"x_r: expected (num_dst, {x_l.shape[1]}, {x_l.shape[2]}) like x_l, got {tuple(x_r.shape)}")
    if not isinstance(att, Tensor) or att.numel() != x_l.shape[1] * x_l.shape[2]:
        got = tuple(att.shape) if isinstance(att, Tensor) else type(att).__name__
        raise ValueError(f"att: expected ({x_l.shape[1]}, {x_l.shape[2]}) (heads, channels), got {got}")
    att = att.reshape(x_l.shape[1], x_l.shape[2])  # PyG's (1, H, C) -> (H, C)
    _check_nodes("att", att, 2, "(heads, channels)", x_l)
    return _run(
        KINDS["gatv2"], x_r, x_l, None, att, edge_index, edge_attr, None, edge_proj, fill_value, add_self_loops,
        1.0, negative_slope, dropout_p, philox, return_lse, return_attention_weights, backend,
    )  # fmt: skip
