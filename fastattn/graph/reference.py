"""The float64 oracle of graph attention: per edge, with gather and scatter, as the definition reads.

It materialises edges × heads × channels tensors (that is what the fused kernels exist to avoid) and
walks ``graph.edge_index`` in edge-id order with ``graph.kept`` (never the CSR the kernels read), so
it checks the layout as well as the arithmetic. Autograd through it gives the reference gradients.

Scores, for an edge from source ``j`` to target ``i``, head ``h`` (``e`` its edge features):

=========  ====================================================  ==================
kind       score                                                 value
=========  ====================================================  ==================
``dot``    ``scale · q_i · (k_j + W_e e)``                        ``v_j + W_e e``
``gat``    ``LeakyReLU(a_j + b_i + c_e)`` (scalars per head)      ``x_j``
``gatv2``  ``att · LeakyReLU(xl_j + xr_i + W_e e)``               ``xl_j``
=========  ====================================================  ==================

Softmax over each target's incoming edges; a target with none gives zeros and ``lse = -inf``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._structure import Graph

__all__ = ["KINDS", "graph_attention"]

KINDS = {"dot": 0, "gat": 1, "gatv2": 2}


def graph_attention(
    kind: int,
    graph: Graph,
    dst: Tensor,
    src: Tensor,
    values: Optional[Tensor],
    att: Optional[Tensor],
    edge_attr: Optional[Tensor],
    loop_attr: Optional[Tensor],
    edge_proj: Optional[Tensor],
    *,
    scale: float = 1.0,
    negative_slope: float = 0.2,
    keep: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(out (Nd, H, Cv), lse (Nd, H), probs (num_ids, H))`` in ``compute_dtype``, differentiable.

    Arguments are the fused ops' (see ``fastattn.graph._ops``); ``keep`` is the dropout keep-mask
    ``(num_ids, H)`` bool, applied with ``1 / (1 - dropout_p)``. ``probs`` are the softmax weights
    before dropout, by edge id, 0 for the self loops that ``add_self_loops`` replaced.
    """
    cast = lambda t: None if t is None else t.to(compute_dtype)  # noqa: E731
    dst, src, values, att, edge_attr, loop_attr, edge_proj = map(
        cast, (dst, src, values, att, edge_attr, loop_attr, edge_proj)
    )
    num_dst, heads = dst.shape[0], dst.shape[1]
    ids = torch.arange(graph.num_ids, device=dst.device)
    if graph.kept is not None:
        ids = ids[graph.kept]
    s_idx, d_idx = graph.edge_index[0, ids], graph.edge_index[1, ids]

    feats = None
    if edge_attr is not None:
        full = edge_attr if loop_attr is None or graph.num_loops == 0 else torch.cat([edge_attr, loop_attr])
        feats = full[ids]
        if kind != KINDS["gat"]:
            feats = (feats @ edge_proj.t()).view(-1, heads, edge_proj.shape[0] // heads)  # (E', H, C)

    if kind == KINDS["dot"]:
        k, v = src[s_idx], values[s_idx]
        if feats is not None:
            k, v = k + feats, v + feats
        score = (dst[d_idx] * k).sum(-1) * scale
    elif kind == KINDS["gat"]:
        pre = src[s_idx] + dst[d_idx]
        if feats is not None:
            pre = pre + feats
        score = F.leaky_relu(pre, negative_slope)
        v = values[s_idx]
    elif kind == KINDS["gatv2"]:
        z = src[s_idx] + dst[d_idx]
        if feats is not None:
            z = z + feats
        score = (F.leaky_relu(z, negative_slope) * att.reshape(1, heads, -1)).sum(-1)
        v = src[s_idx]
    else:
        raise ValueError(f"kind: expected 0 (dot), 1 (gat) or 2 (gatv2), got {kind!r}")

    # Softmax per target over its incoming edges (the max is a constant: no gradient through it).
    row_max = torch.full((num_dst, heads), float("-inf"), dtype=compute_dtype, device=dst.device)
    row_max = row_max.scatter_reduce(0, d_idx[:, None].expand(-1, heads), score.detach(), "amax", include_self=True)
    ex = torch.exp(score - row_max[d_idx])
    denom = torch.zeros(num_dst, heads, dtype=compute_dtype, device=dst.device).index_add(0, d_idx, ex)
    probs_kept = ex / denom[d_idx]
    some = denom > 0
    lse = torch.where(some, row_max + torch.log(torch.where(some, denom, 1.0)), float("-inf"))

    weights = probs_kept
    if keep is not None and dropout_p > 0.0:
        weights = probs_kept * keep[ids].to(compute_dtype) / (1.0 - dropout_p)
    out = torch.zeros(num_dst, heads, v.shape[-1], dtype=compute_dtype, device=dst.device)
    out = out.index_add(0, d_idx, weights[..., None] * v)
    probs = torch.zeros(graph.num_ids, heads, dtype=compute_dtype, device=dst.device).index_copy(
        0, ids, probs_kept.detach()
    )
    return out, lse, probs
