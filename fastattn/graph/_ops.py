"""The graph-attention op contract shared by the CPU and Triton backends: argument order, fakes, autograd.

Every backend registers two ops in the ``fastattn`` namespace with the same arguments:

``<b>_graph_attn(rowptr, col, eid, colptr, row, slot, dst, src, values?, att?, edge_attr?, loop_attr?,
edge_proj?, philox?, kind, num_edges, scale, negative_slope, dropout_p, return_probs) -> (out, lse, probs)``

``<b>_graph_attn_bwd(grad_out, grad_lse?, out, lse, <the forward's inputs but return_probs>)
-> (d_dst, d_src, d_values, d_att, d_edge_attr, d_loop_attr, d_edge_proj)``

* The six graph tensors are :meth:`Graph.tensors` (the forward takes the CSC too, unused, so that
  the autograd formula finds it among the saved inputs).
* ``kind`` 0 (dot): ``dst`` = queries ``(Nd, H, C)``, ``src`` = keys ``(Ns, H, C)``, ``values``
  ``(Ns, H, Cv)``; ``edge_attr`` ``(E, De)`` raw edge features projected by ``edge_proj`` ``(H·C, De)``
  (PyG's ``lin_edge.weight``) and added to keys and values.
* ``kind`` 1 (GAT): ``dst`` = ``a_dst · x_i`` ``(Nd, H)``, ``src`` = ``a_src · x_j`` ``(Ns, H)``, ``values``
  = ``x`` ``(Ns, H, C)``; ``edge_attr`` = the edge logits ``a_edge · W_e e`` ``(E, H)``, no ``edge_proj``.
* ``kind`` 2 (GATv2): ``dst`` = ``x_r`` ``(Nd, H, C)``, ``src`` = ``x_l`` ``(Ns, H, C)`` (also the
  values: ``values`` is None), ``att`` ``(H, C)``; edge features as for dot, inside the LeakyReLU.
* ``loop_attr`` holds the edge features of the added self loops (ids ``num_edges ..``), required when
  the graph has loops and ``edge_attr`` is given. ``philox`` and ``dropout_p``: ``_dropout.py``.
* ``out`` ``(Nd, H, Cv)`` in the features' dtype, ``lse`` ``(Nd, H)`` float32 (natural log, ``-inf``
  for a target with no incoming edge), ``probs`` ``(num_ids, H)`` float32 by CSR slot (softmax before
  dropout; ``(0, H)`` unless ``return_probs``). Backward outputs absent inputs as empty tensors.

The forward op is differentiable through :func:`register_autograd` (outputs ``out`` and ``lse``;
``probs`` carries no gradient), so ``torch.library.opcheck`` and ``torch.compile(fullgraph=True)``
see one op per direction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["fwd_fake", "bwd_fake", "register_autograd"]


def fwd_fake(
    rowptr, col, eid, colptr, row, slot, dst, src, values, att, edge_attr, loop_attr, edge_proj, philox,
    kind, num_edges, scale, negative_slope, dropout_p, return_probs,
):  # fmt: skip
    num_dst, heads = dst.shape[0], dst.shape[1]
    channels = values.shape[2] if values is not None else src.shape[2]
    out = dst.new_empty(num_dst, heads, channels)
    lse = dst.new_empty(num_dst, heads, dtype=torch.float32)
    probs = dst.new_empty(eid.shape[0] if return_probs else 0, heads, dtype=torch.float32)
    return out, lse, probs


def bwd_fake(
    grad_out, grad_lse, out, lse, rowptr, col, eid, colptr, row, slot, dst, src, values, att, edge_attr, loop_attr,
    edge_proj, philox, kind, num_edges, scale, negative_slope, dropout_p,
):  # fmt: skip
    def like(t):
        return dst.new_empty(0) if t is None else t.new_empty(t.shape)

    loops = loop_attr if (edge_attr is not None and eid.shape[0] > num_edges) else None
    return like(dst), like(src), like(values), like(att), like(edge_attr), like(loops), like(edge_proj)


def register_autograd(fwd_name: str, bwd_op: Callable) -> None:
    """Make the forward op ``fwd_name`` differentiable through ``bwd_op`` (the contract above)."""

    def setup_context(ctx, inputs, output):
        *tensors, kind, num_edges, scale, negative_slope, dropout_p, _return_probs = inputs
        out, lse, _probs = output
        ctx.save_for_backward(*tensors, out, lse)
        ctx.args = (kind, num_edges, scale, negative_slope, dropout_p)

    def backward(ctx, grad_out, grad_lse, _grad_probs):
        *tensors, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grads = bwd_op(grad_out.contiguous(), grad_lse, out, lse, *tensors, *ctx.args)
        optional = tensors[8:13]  # values, att, edge_attr, loop_attr, edge_proj
        # An absent input gets None; loop_attr given for a graph without loops gets zeros.
        rest = [
            None if t is None else (g if g.shape == t.shape else torch.zeros_like(t))
            for g, t in zip(grads[2:], optional)
        ]
        return (None,) * 6 + (grads[0], grads[1], *rest, None) + (None,) * 6

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)
