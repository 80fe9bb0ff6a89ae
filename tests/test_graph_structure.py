"""The graph layout the kernels read (CSR by target, CSC by source, edge ids, replaced self loops), its
cache per edge_index tensor, the checks on edge_index, and the self loops' edge features against PyG."""

from __future__ import annotations

import gc

import pytest
import torch
from _graph_support import GRAPHS, make_graph

from fastattn.graph import Graph, clear_cache, self_loop_attr
from fastattn.graph._structure import _cache, graph_for


@pytest.mark.parametrize("case", list(GRAPHS))
@pytest.mark.parametrize("loops", [False, True])
def test_csr_and_csc_describe_exactly_the_kept_edges(case, loops):
    ei, ns, nd = make_graph(case, torch.Generator().manual_seed(0))
    g = Graph.from_edge_index(ei, (ns, nd), add_self_loops=loops)
    src, dst = ei
    want = [(int(s), int(d), e) for e, (s, d) in enumerate(zip(src, dst)) if not (loops and s == d)]
    if loops:
        want += [(i, i, ei.shape[1] + i) for i in range(min(ns, nd))]
    assert g.num_edges == ei.shape[1] and g.num_loops == (min(ns, nd) if loops else 0)
    # CSR: row i holds exactly the kept edges into i, by edge id.
    csr = sorted(
        (int(g.col[q]), i, int(g.eid[q])) for i in range(nd) for q in range(int(g.rowptr[i]), int(g.rowptr[i + 1]))
    )
    assert csr == sorted(want)
    assert g.rowptr[0] == 0 and bool((g.rowptr[1:] >= g.rowptr[:-1]).all())
    # CSC: column j holds exactly the kept edges out of j, each pointing at its CSR slot.
    csc = []
    for j in range(ns):
        for t in range(int(g.colptr[j]), int(g.colptr[j + 1])):
            q = int(g.slot[t])
            assert int(g.col[q]) == j and int(g.rowptr[g.row[t]]) <= q < int(g.rowptr[g.row[t] + 1])
            csc.append((j, int(g.row[t]), int(g.eid[q])))
    assert sorted(csc) == sorted(want)
    # PyG's order of the edges attention runs over: edge_index without its self loops, then the new loops.
    assert [tuple(c) for c in g.kept_edge_index().t().tolist()] == [(s, d) for s, d, _ in want]


def test_cache_hits_for_the_same_tensor_and_rebuilds_after_an_in_place_edit():
    clear_cache()
    ei = torch.tensor([[0, 1, 2], [1, 2, 0]])
    a = graph_for(ei, 3, 3)
    assert graph_for(ei, 3, 3) is a
    assert graph_for(ei, 3, 3, add_self_loops=True) is not a
    assert graph_for(ei.clone(), 3, 3) is not a  # another tensor, same values: its own entry
    ei[1, 0] = 2  # in place: the version counter moves
    b = graph_for(ei, 3, 3)
    assert b is not a and int(b.col[b.rowptr[2]]) in (0, 1)
    assert graph_for(ei, 4, 4) is not b  # other node counts


def test_cache_is_bounded_and_holds_no_edge_index_alive():
    clear_cache()
    for _ in range(40):
        graph_for(torch.randint(0, 5, (2, 7)), 5, 5)
    assert len(_cache) <= 16
    ei = torch.tensor([[0], [1]])
    graph_for(ei, 2, 2)
    ref = next(reversed(_cache.values()))[0]
    del ei
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize(
    "edge_index,match,exc",
    [
        (
            torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
            "expected dtype torch.int64 or torch.int32, got torch.float32",
            TypeError,
        ),
        (torch.tensor([0, 1, 2]), r"expected shape \(2, num_edges\), got \(3,\)", ValueError),
        (torch.tensor([[0, -1], [1, 0]]), "node indices must be >= 0, got -1", ValueError),
        (torch.tensor([[0, 3], [1, 0]]), r"source index 3 \(row 0\) is out of range for 3 source nodes", ValueError),
        (torch.tensor([[0, 1], [1, 5]]), r"target index 5 \(row 1\) is out of range for 3 target nodes", ValueError),
        ([[0, 1], [1, 0]], r"expected a \(2, num_edges\) integer tensor .* got list", TypeError),
    ],
)
def test_bad_edge_index_is_refused_by_name(edge_index, match, exc):
    with pytest.raises(exc, match="edge_index: " + match):
        graph_for(edge_index, 3, 3)


def test_int32_edge_index_and_a_graph_built_for_other_sizes():
    g = graph_for(torch.tensor([[0, 1], [1, 0]], dtype=torch.int32), 2, 2)
    assert g.col.dtype == torch.int64
    with pytest.raises(ValueError, match="the Graph was built for 2 sources and 2 targets"):
        graph_for(g, 3, 3)
    with pytest.raises(ValueError, match="built without self loops"):
        graph_for(g, 2, 2, add_self_loops=True)


FILL_CASES = [(fill, "self_loops") for fill in ("mean", "add", "sum", "max", "min", "mul", 0.5, None, "tensor")] + [
    (fill, case) for fill in ("mean", "max", "mul") for case in ("random", "isolated", "bipartite")
]


@pytest.mark.parametrize("fill,case", FILL_CASES)
def test_self_loop_attr_matches_pyg(fill, case):
    utils = pytest.importorskip("torch_geometric.utils")
    ei, ns, nd = make_graph(case, torch.Generator().manual_seed(1))
    if case == "bipartite":  # PyG fills over min(ns, nd) nodes and needs every target below that
        ei = ei[:, ei[1] < min(ns, nd)]
    ea = torch.randn(ei.shape[1], 3)
    fill_value = torch.tensor([1.0, -2.0, 3.0]) if fill == "tensor" else fill
    g = Graph.from_edge_index(ei, (ns, nd), add_self_loops=True)
    ei_nl, ea_nl = utils.remove_self_loops(ei, ea)
    _, want = utils.add_self_loops(ei_nl, ea_nl, fill_value=fill_value, num_nodes=min(ns, nd))
    got = self_loop_attr(ea, g, fill_value)
    torch.testing.assert_close(got, want[ea_nl.shape[0] :], rtol=1e-6, atol=1e-6)


def test_self_loop_attr_refuses_an_unknown_fill():
    g = Graph.from_edge_index(torch.tensor([[0, 1], [1, 0]]), 2, add_self_loops=True)
    with pytest.raises(ValueError, match="fill_value: expected a number, a tensor or one of"):
        self_loop_attr(torch.randn(2, 3), g, "median")
