"""Shared by the graph tests: the graph cases of issue 22, random inputs per scoring, the float64 oracle call."""

from __future__ import annotations

import torch

from fastattn.graph import Graph, dot_attention, gat_attention, gatv2_attention, self_loop_attr
from fastattn.graph.reference import KINDS, graph_attention

# name -> (num_src, num_dst)
GRAPHS = {
    "random": (13, 13),  # random edges: duplicates and self loops occur by chance
    "isolated": (13, 13),  # targets 9..12 have no incoming edge, sources 0..2 no outgoing one
    "self_loops": (11, 11),  # every node has a self loop, plus random edges
    "duplicates": (10, 10),  # every edge three times
    "hub": (40, 6),  # target 0 has 100 incoming edges (several blocks of the kernels)
    "bipartite": (9, 6),
    "no_edges": (5, 5),
    "one_node": (1, 1),  # one node with its self loop
    "one_node_no_edges": (1, 1),
}


def make_graph(case: str, gen: torch.Generator) -> tuple[torch.Tensor, int, int]:
    """``(edge_index (2, E), num_src, num_dst)`` for one case of :data:`GRAPHS`."""
    ns, nd = GRAPHS[case]

    def rand(n, hi, lo=0):
        return torch.randint(lo, hi, (n,), generator=gen)

    if case in ("random", "bipartite"):
        ei = torch.stack([rand(70, ns), rand(70, nd)])
    elif case == "isolated":
        ei = torch.stack([rand(50, ns, 3), rand(50, 9)])
    elif case == "self_loops":
        loops = torch.arange(ns)
        ei = torch.cat([torch.stack([loops, loops]), torch.stack([rand(30, ns), rand(30, nd)])], 1)
        ei = ei[:, torch.randperm(ei.shape[1], generator=gen)]
    elif case == "duplicates":
        ei = torch.stack([rand(20, ns), rand(20, nd)]).repeat(1, 3)
    elif case == "hub":
        ei = torch.cat(
            [
                torch.stack([rand(100, ns), torch.zeros(100, dtype=torch.long)]),
                torch.stack([rand(30, ns), rand(30, nd)]),
            ],
            1,
        )
    elif case == "one_node":
        ei = torch.zeros(2, 1, dtype=torch.long)
    else:  # no_edges, one_node_no_edges
        ei = torch.zeros(2, 0, dtype=torch.long)
    return ei, ns, nd


def make_inputs(kind: str, ns: int, nd: int, num_edges: int, edge: bool, dtype, gen, heads=3, channels=5, edge_dim=4):
    """Positional and keyword tensors of the public op of ``kind``, fresh standard normal (never zeros)."""

    def draw(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(True)

    if kind == "dot":
        args = [
            draw(nd, heads, channels),
            draw(ns, heads, channels),
            draw(ns, heads, channels if edge else channels + 2),
        ]
    elif kind == "gat":
        args = [draw(ns, heads, channels), draw(ns, heads), draw(nd, heads)]
    else:
        args = [draw(ns, heads, channels), draw(nd, heads, channels), draw(heads, channels)]
    kw = {}
    if edge and kind == "gat":
        kw["alpha_edge"] = draw(num_edges, heads)
        kw["loop_alpha"] = draw(min(ns, nd), heads)
    elif edge:
        kw["edge_attr"] = draw(num_edges, edge_dim)
        kw["edge_proj"] = (torch.randn(heads * channels, edge_dim, generator=gen) / 2).to(dtype).requires_grad_(True)
    return args, kw


OPS = {"dot": dot_attention, "gat": gat_attention, "gatv2": gatv2_attention}


def oracle(
    kind: str, graph: Graph, args, kw, *, keep=None, dropout_p=0.0, negative_slope=0.2, compute_dtype=torch.float64
):
    """``(out, lse)`` of the per-edge reference for the public op's arguments (differentiable)."""
    cast = lambda t: t.to(compute_dtype)  # noqa: E731
    a = [cast(t) for t in args]
    k = {name: cast(t) for name, t in kw.items()}
    if kind == "dot":
        dst, src, values, att = a[0], a[1], a[2], None
        scale = a[0].shape[2] ** -0.5
    elif kind == "gat":
        dst, src, values, att, scale = a[2], a[1], a[0], None, 1.0
    else:
        dst, src, values, att, scale = a[1], a[0], None, a[2], 1.0
    edge_attr = k.get("edge_attr", k.get("alpha_edge"))
    loop_attr = k.get("loop_alpha")
    if "edge_attr" in k and graph.num_loops:
        loop_attr = self_loop_attr(edge_attr, graph, "mean")
    if graph.num_loops == 0:
        loop_attr = None
    out, lse, probs = graph_attention(
        KINDS[kind], graph, dst, src, values, att, edge_attr, loop_attr, k.get("edge_proj"), scale=scale,
        negative_slope=negative_slope, keep=keep, dropout_p=dropout_p, compute_dtype=compute_dtype,
    )  # fmt: skip
    return out, lse, probs
