"""Graph attention layers with PyTorch Geometric's arguments and parameter names, on fastattn's fused ops.

``GATConv``, ``GATv2Conv`` and ``TransformerConv`` take PyG's constructor arguments, register the same
parameters under the same names (``load_state_dict(pyg_layer.state_dict())`` works strictly, both
ways), initialise them as PyG does, and return what PyG's layers return (outputs, gradients and
``return_attention_weights``), without PyG installed and without its message passing: attention runs
in ``fastattn.graph``'s fused kernels, so no edges × heads × channels tensor is allocated.

Options fastattn does not implement are refused by name when the layer is built, never ignored:
``in_channels=-1`` (lazy initialisation), message-passing keywords other than PyG's defaults
(``aggr``, ``flow``, ``node_dim``, ``decomposed_layers``, ...). ``edge_index`` must be a ``(2, E)``
tensor (not a ``SparseTensor``). Attention weights returned by ``return_attention_weights`` carry
no gradient. ``backend=`` (keyword, not PyG's) names a graph backend (``fastattn.graph.backend_names()``).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..graph import _backends
from ..graph._dropout import philox_seed_offset
from ..graph._structure import Graph, graph_for
from ..graph.functional import dot_attention, gat_attention, gatv2_attention, self_loop_attr

__all__ = ["GATConv", "GATv2Conv", "TransformerConv"]

# PyG's MessagePassing keywords accepted when they hold the value fastattn computes.
_DEFAULTS = {"aggr": ("add", "sum"), "flow": ("source_to_target",), "node_dim": (0, -2), "decomposed_layers": (1,)}


def _refuse(layer: str, kwargs: dict) -> None:
    for name, value in kwargs.items():
        if name in _DEFAULTS and value in _DEFAULTS[name]:
            continue
        if name in _DEFAULTS:
            raise ValueError(
                f"fastattn.nn.{layer}: option {name}={value!r} is not supported "
                f"(fastattn computes PyG's default {name}={_DEFAULTS[name][0]!r})"
            )
        raise TypeError(f"fastattn.nn.{layer}: option {name!r} is not supported")


def _in_pair(layer: str, in_channels) -> tuple[int, int]:
    pair = (in_channels, in_channels) if isinstance(in_channels, int) else tuple(in_channels)
    if len(pair) != 2 or any(not isinstance(c, int) for c in pair):
        raise TypeError(f"fastattn.nn.{layer}: in_channels must be an int or a pair of ints, got {in_channels!r}")
    if any(c <= 0 for c in pair):
        raise ValueError(
            f"fastattn.nn.{layer}: in_channels={in_channels!r} is not supported: lazy initialisation (-1) is not "
            "implemented; give the input sizes"
        )
    return pair


def _linear(in_features: int, out_features: int, bias: bool, glorot: bool) -> nn.Linear:
    """A ``nn.Linear`` initialised as PyG's ``Linear`` (``weight_initializer='glorot'`` or its default)."""
    lin = nn.Linear(in_features, out_features, bias=bias)
    lin._fastattn_glorot = glorot
    return lin


def _reset_linear(lin: nn.Linear) -> None:
    if getattr(lin, "_fastattn_glorot", False):
        _glorot(lin.weight)
    else:  # PyG's kaiming_uniform(fan=in, a=sqrt(5)), torch's own default
        nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5))
    if lin.bias is not None:
        bound = 1.0 / math.sqrt(lin.in_features)
        nn.init.uniform_(lin.bias, -bound, bound)


def _glorot(t: Optional[Tensor]) -> None:
    if t is not None:
        bound = math.sqrt(6.0 / (t.size(-2) + t.size(-1)))
        nn.init.uniform_(t, -bound, bound)


def _edge_2d(edge_attr: Tensor) -> Tensor:
    return edge_attr.view(-1, 1) if edge_attr.dim() == 1 else edge_attr  # PyG's (E,) -> (E, 1)


def _check_x(layer: str, name: str, x) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 2:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"fastattn.nn.{layer}: {name} must be a 2-D (num_nodes, in_channels) tensor, got {got}")
    return x


def _dropped_weights(layer: nn.Module, graph: Graph, alpha: Tensor, philox: Tensor, dropout_p: float) -> Tensor:
    """PyG's GAT layers return their weights after dropout: apply the kernels' own keep-mask to them."""
    backend = _backends.choose(layer.backend, alpha.device, alpha.dtype)
    keep = backend.dropout_keep(philox, graph.num_ids, alpha.shape[1], dropout_p)
    if graph.kept is not None:
        keep = keep[graph.kept]
    return alpha * keep.to(alpha.dtype) / (1.0 - dropout_p)


class GATConv(nn.Module):
    """PyG's ``GATConv`` (Veličković et al.): ``α_ij = softmax_j(LeakyReLU(a_src·Wx_j + a_dst·Wx_i + a_edge·W_e e))``.

    The attention vectors reduce every node's features to one logit per head before the fused op
    (GAT's score is linear inside the LeakyReLU), and edge features to one logit per edge and head,
    through ``W_e``'s product with ``a_edge`` (an (edge_dim, heads) matrix): the only per-edge tensors
    are edges × heads.
    """

    def __init__(
        self,
        in_channels: Union[int, tuple[int, int]],
        out_channels: int,
        heads: int = 1,
        concat: bool = True,
        negative_slope: float = 0.2,
        dropout: float = 0.0,
        add_self_loops: bool = True,
        edge_dim: Optional[int] = None,
        fill_value: Union[float, Tensor, str] = "mean",
        bias: bool = True,
        residual: bool = False,
        *,
        backend: Optional[str] = None,
        **kwargs,
    ):
        super().__init__()
        _refuse("GATConv", kwargs)
        pair = _in_pair("GATConv", in_channels)
        self.in_channels, self.out_channels, self.heads, self.concat = in_channels, out_channels, heads, concat
        self.negative_slope, self.dropout, self.add_self_loops = negative_slope, dropout, add_self_loops
        self.edge_dim, self.fill_value, self.residual, self.backend = edge_dim, fill_value, residual, backend
        hc = heads * out_channels
        self.lin = self.lin_src = self.lin_dst = None
        if isinstance(in_channels, int):
            self.lin = _linear(in_channels, hc, bias=False, glorot=True)
        else:
            self.lin_src = _linear(pair[0], hc, bias=False, glorot=True)
            self.lin_dst = _linear(pair[1], hc, bias=False, glorot=True)
        self.att_src = nn.Parameter(torch.empty(1, heads, out_channels))
        self.att_dst = nn.Parameter(torch.empty(1, heads, out_channels))
        if edge_dim is not None:
            self.lin_edge = _linear(edge_dim, hc, bias=False, glorot=True)
            self.att_edge = nn.Parameter(torch.empty(1, heads, out_channels))
        else:
            self.lin_edge = None
            self.register_parameter("att_edge", None)
        total = out_channels * (heads if concat else 1)
        if residual:
            self.res = _linear(pair[1], total, bias=False, glorot=True)
        else:
            self.register_parameter("res", None)
        if bias:
            self.bias = nn.Parameter(torch.empty(total))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.lin, self.lin_src, self.lin_dst, self.lin_edge, self.res):
            if lin is not None:
                _reset_linear(lin)
        _glorot(self.att_src)
        _glorot(self.att_dst)
        _glorot(self.att_edge)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(
        self,
        x: Union[Tensor, tuple[Tensor, Optional[Tensor]]],
        edge_index: Union[Tensor, Graph],
        edge_attr: Optional[Tensor] = None,
        size: Optional[tuple[int, int]] = None,
        return_attention_weights: Optional[bool] = None,
    ):
        H, C = self.heads, self.out_channels
        res = None
        if isinstance(x, Tensor):
            _check_x("GATConv", "x", x)
            res = self.res(x) if self.res is not None else None
            lin = self.lin if self.lin is not None else self.lin_src
            x_src = lin(x).view(-1, H, C)  # (N, H·C) -> (N, H, C)
            x_dst = x_src if self.lin is not None else self.lin_dst(x).view(-1, H, C)
        else:
            x_src_in, x_dst_in = x
            _check_x("GATConv", "x[0]", x_src_in)
            if x_dst_in is not None and self.res is not None:
                res = self.res(x_dst_in)
            lin_src = self.lin if self.lin is not None else self.lin_src
            lin_dst = self.lin if self.lin is not None else self.lin_dst
            x_src = lin_src(x_src_in).view(-1, H, C)
            x_dst = None if x_dst_in is None else lin_dst(_check_x("GATConv", "x[1]", x_dst_in)).view(-1, H, C)
        num_src = x_src.shape[0]
        num_dst = x_dst.shape[0] if x_dst is not None else num_src
        if size is not None:
            num_src, num_dst = int(size[0]), int(size[1])
        alpha_src = (x_src * self.att_src).sum(-1)  # (Ns, H)
        if x_dst is not None:
            alpha_dst = (x_dst * self.att_dst).sum(-1)  # (Nd, H)
        else:
            alpha_dst = x_src.new_zeros(num_dst, H)
        graph = graph_for(edge_index, num_src, num_dst, self.add_self_loops, device=x_src.device)

        alpha_edge = loop_alpha = None
        if edge_attr is not None and self.lin_edge is not None:
            ea = _edge_2d(edge_attr)
            # a_edge · (W_e e) = (a_edge W_e) e: one (H, edge_dim) matrix, so only E x H logits per edge.
            w = (self.lin_edge.weight.view(H, C, -1) * self.att_edge.view(H, C, 1)).sum(1)  # (H, De)
            alpha_edge = ea @ w.t()  # (E, H)
            if self.add_self_loops and graph.num_loops > 0:
                loop_alpha = self_loop_attr(ea, graph, self.fill_value) @ w.t()  # (num_loops, H)
        dropout_p = self.dropout if self.training else 0.0
        philox = philox_seed_offset(x_src.device) if dropout_p > 0.0 else None
        result = gat_attention(
            x_src, alpha_src, alpha_dst, graph, alpha_edge=alpha_edge, loop_alpha=loop_alpha,
            add_self_loops=self.add_self_loops, negative_slope=self.negative_slope, dropout_p=dropout_p,
            philox=philox, return_attention_weights=bool(return_attention_weights), backend=self.backend,
        )  # fmt: skip
        out, weights = (result, None) if not return_attention_weights else result
        out = out.reshape(-1, H * C) if self.concat else out.mean(dim=1)  # (Nd, H, C) -> (Nd, H·C) or (Nd, C)
        if res is not None:
            out = out + res
        if self.bias is not None:
            out = out + self.bias
        if return_attention_weights:
            kept_index, alpha = weights
            if dropout_p > 0.0:
                alpha = _dropped_weights(self, graph, alpha, philox, dropout_p)
            return out, (kept_index, alpha)
        return out

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, heads={self.heads})"


class GATv2Conv(nn.Module):
    """PyG's ``GATv2Conv`` (Brody et al.): ``α_ij = softmax_j(a · LeakyReLU(W_l x_j + W_r x_i + W_e e_ij))``.

    The "dynamic" score is not linear in the node features, so the fused kernel evaluates it per edge
    from the gathered rows (and the edge projection ``W_e e_ij``, computed on the fly), never storing it.
    """

    def __init__(
        self,
        in_channels: Union[int, tuple[int, int]],
        out_channels: int,
        heads: int = 1,
        concat: bool = True,
        negative_slope: float = 0.2,
        dropout: float = 0.0,
        add_self_loops: bool = True,
        edge_dim: Optional[int] = None,
        fill_value: Union[float, Tensor, str] = "mean",
        bias: bool = True,
        share_weights: bool = False,
        residual: bool = False,
        *,
        backend: Optional[str] = None,
        **kwargs,
    ):
        super().__init__()
        _refuse("GATv2Conv", kwargs)
        pair = _in_pair("GATv2Conv", in_channels)
        self.in_channels, self.out_channels, self.heads, self.concat = in_channels, out_channels, heads, concat
        self.negative_slope, self.dropout, self.add_self_loops = negative_slope, dropout, add_self_loops
        self.edge_dim, self.fill_value, self.residual = edge_dim, fill_value, residual
        self.share_weights, self.backend = share_weights, backend
        hc = heads * out_channels
        self.lin_l = _linear(pair[0], hc, bias=bias, glorot=True)
        self.lin_r = self.lin_l if share_weights else _linear(pair[1], hc, bias=bias, glorot=True)
        self.att = nn.Parameter(torch.empty(1, heads, out_channels))
        self.lin_edge = _linear(edge_dim, hc, bias=False, glorot=True) if edge_dim is not None else None
        total = out_channels * (heads if concat else 1)
        if residual:
            self.res = _linear(pair[1], total, bias=False, glorot=True)
        else:
            self.register_parameter("res", None)
        if bias:
            self.bias = nn.Parameter(torch.empty(total))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.lin_l, self.lin_r, self.lin_edge, self.res):
            if lin is not None:
                _reset_linear(lin)
        _glorot(self.att)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(
        self,
        x: Union[Tensor, tuple[Tensor, Tensor]],
        edge_index: Union[Tensor, Graph],
        edge_attr: Optional[Tensor] = None,
        return_attention_weights: Optional[bool] = None,
    ):
        H, C = self.heads, self.out_channels
        res = None
        if isinstance(x, Tensor):
            _check_x("GATv2Conv", "x", x)
            res = self.res(x) if self.res is not None else None
            x_l = self.lin_l(x).view(-1, H, C)  # (N, H·C) -> (N, H, C)
            x_r = x_l if self.share_weights else self.lin_r(x).view(-1, H, C)
        else:
            x_l_in, x_r_in = x
            _check_x("GATv2Conv", "x[0]", x_l_in)
            _check_x("GATv2Conv", "x[1]", x_r_in)
            res = self.res(x_r_in) if self.res is not None else None
            x_l = self.lin_l(x_l_in).view(-1, H, C)
            x_r = self.lin_r(x_r_in).view(-1, H, C)
        if edge_attr is not None and self.lin_edge is None:
            raise ValueError("fastattn.nn.GATv2Conv: edge_attr was given but the layer has no edge_dim")
        graph = graph_for(edge_index, x_l.shape[0], x_r.shape[0], self.add_self_loops, device=x_l.device)
        dropout_p = self.dropout if self.training else 0.0
        philox = philox_seed_offset(x_l.device) if dropout_p > 0.0 else None
        result = gatv2_attention(
            x_l, x_r, self.att, graph, edge_attr=None if edge_attr is None else _edge_2d(edge_attr),
            edge_proj=None if edge_attr is None else self.lin_edge.weight, add_self_loops=self.add_self_loops,
            fill_value=self.fill_value, negative_slope=self.negative_slope, dropout_p=dropout_p, philox=philox,
            return_attention_weights=bool(return_attention_weights), backend=self.backend,
        )  # fmt: skip
        out, weights = (result, None) if not return_attention_weights else result
        out = out.reshape(-1, H * C) if self.concat else out.mean(dim=1)  # (Nd, H, C) -> (Nd, H·C) or (Nd, C)
        if res is not None:
            out = out + res
        if self.bias is not None:
            out = out + self.bias
        if return_attention_weights:
            kept_index, alpha = weights
            if dropout_p > 0.0:
                alpha = _dropped_weights(self, graph, alpha, philox, dropout_p)
            return out, (kept_index, alpha)
        return out

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, heads={self.heads})"


class TransformerConv(nn.Module):
    """PyG's ``TransformerConv`` (Shi et al.): ``α_ij = softmax_j(q_i · (k_j + W_e e_ij) / sqrt(C))``.

    Output ``Σ_j α_ij (v_j + W_e e_ij)``, plus the root weight (``lin_skip``) and the optional gate ``beta``.
    """

    def __init__(
        self,
        in_channels: Union[int, tuple[int, int]],
        out_channels: int,
        heads: int = 1,
        concat: bool = True,
        beta: bool = False,
        dropout: float = 0.0,
        edge_dim: Optional[int] = None,
        bias: bool = True,
        root_weight: bool = True,
        *,
        backend: Optional[str] = None,
        **kwargs,
    ):
        super().__init__()
        _refuse("TransformerConv", kwargs)
        pair = _in_pair("TransformerConv", in_channels)
        self.in_channels, self.out_channels, self.heads, self.concat = in_channels, out_channels, heads, concat
        self.beta, self.root_weight = beta and root_weight, root_weight
        self.dropout, self.edge_dim, self.backend = dropout, edge_dim, backend
        hc = heads * out_channels
        self.lin_key = _linear(pair[0], hc, bias=bias, glorot=False)
        self.lin_query = _linear(pair[1], hc, bias=bias, glorot=False)
        self.lin_value = _linear(pair[0], hc, bias=bias, glorot=False)
        if edge_dim is not None:
            self.lin_edge = _linear(edge_dim, hc, bias=False, glorot=False)
        else:
            self.register_parameter("lin_edge", None)
        width = hc if concat else out_channels
        self.lin_skip = _linear(pair[1], width, bias=bias, glorot=False)
        if self.beta:
            self.lin_beta = _linear(3 * width, 1, bias=False, glorot=False)
        else:
            self.register_parameter("lin_beta", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.lin_key, self.lin_query, self.lin_value, self.lin_edge, self.lin_skip, self.lin_beta):
            if lin is not None:
                _reset_linear(lin)

    def forward(
        self,
        x: Union[Tensor, tuple[Tensor, Tensor]],
        edge_index: Union[Tensor, Graph],
        edge_attr: Optional[Tensor] = None,
        return_attention_weights: Optional[bool] = None,
    ):
        H, C = self.heads, self.out_channels
        if isinstance(x, Tensor):
            x = (x, x)
        _check_x("TransformerConv", "x[0]", x[0])
        _check_x("TransformerConv", "x[1]", x[1])
        query = self.lin_query(x[1]).view(-1, H, C)  # (N, H·C) -> (N, H, C)
        key = self.lin_key(x[0]).view(-1, H, C)
        value = self.lin_value(x[0]).view(-1, H, C)
        if edge_attr is not None and self.lin_edge is None:
            raise ValueError("fastattn.nn.TransformerConv: edge_attr was given but the layer has no edge_dim")
        if edge_attr is None and self.lin_edge is not None:
            raise ValueError("fastattn.nn.TransformerConv: the layer has edge_dim set, so edge_attr is required")
        want_weights = isinstance(return_attention_weights, bool)  # PyG: True or False both return them
        result = dot_attention(
            query, key, value, edge_index, edge_attr=None if edge_attr is None else _edge_2d(edge_attr),
            edge_proj=None if edge_attr is None else self.lin_edge.weight, scale=1.0 / math.sqrt(C),
            dropout_p=self.dropout if self.training else 0.0, return_attention_weights=want_weights,
            backend=self.backend,
        )  # fmt: skip
        out, weights = (result, None) if not want_weights else result
        out = out.reshape(-1, H * C) if self.concat else out.mean(dim=1)  # (Nd, H, C) -> (Nd, H·C) or (Nd, C)
        if self.root_weight:
            x_r = self.lin_skip(x[1])
            if self.lin_beta is not None:
                beta = torch.sigmoid(self.lin_beta(torch.cat([out, x_r, out - x_r], dim=-1)))
                out = beta * x_r + (1 - beta) * out
            else:
                out = out + x_r
        if want_weights:
            return out, weights
        return out

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, heads={self.heads})"
