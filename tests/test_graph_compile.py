"""The graph ops under ``torch.library.opcheck`` (schema, fakes, autograd registration, AOT dispatch) and
``torch.compile(fullgraph=True)``: the functional ops on a prepared Graph and the layers building it
in the compiled graph; plus the GPU compile of the Triton kernels (no GPU needed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastattn.nn as fnn
from fastattn.graph import Graph, _backends, dot_attention, gat_attention, gatv2_attention

BACKENDS = ["cpu", "triton"]
OPS = {"cpu": "cpu_graph_attn", "triton": "triton_graph_attn"}


def _available(backend: str) -> None:
    b = _backends.get(backend)
    reason = b.unavailable_reason() or b.unsupported_reason(torch.device("cpu"), torch.float32)
    if reason:
        pytest.skip(f"{backend}: {reason}")
    if backend == "cpu":
        from fastattn.graph import _cpu

        _cpu.load()


def _op_args(kind: int, edge: bool, loops: bool, dropout_p: float, probs: bool = False, requires_grad: bool = True):
    gen = torch.Generator().manual_seed(kind)
    ns, nd, heads, ch, de = 7, 6, 2, 3, 2
    ei = torch.stack([torch.randint(0, ns, (20,), generator=gen), torch.randint(0, nd, (20,), generator=gen)])
    g = Graph.from_edge_index(ei, (ns, nd), add_self_loops=loops)

    def draw(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_(requires_grad)

    node = (heads,) if kind == 1 else (heads, ch)
    dst, src = draw(nd, *node), draw(ns, *node)
    values = None if kind == 2 else draw(ns, heads, ch)
    att = draw(heads, ch) if kind == 2 else None
    width = heads if kind == 1 else de
    edge_attr = draw(g.num_edges, width) if edge else None
    loop_attr = draw(g.num_loops, width) if edge and loops else None
    edge_proj = draw(heads * ch, de) if edge and kind != 1 else None
    philox = torch.tensor([5, 9], dtype=torch.int64) if dropout_p else None
    return (
        *g.tensors(),
        dst,
        src,
        values,
        att,
        edge_attr,
        loop_attr,
        edge_proj,
        philox,
        kind,
        g.num_edges,
        0.7,
        0.2,
        dropout_p,
        probs,
    )


OPCHECK_CASES = [
    (0, True, False, 0.0, True),
    (1, True, True, 0.3, False),
    (2, True, True, 0.0, False),
    (2, False, False, 0.3, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,edge,loops,dropout_p,probs", OPCHECK_CASES)
def test_opcheck_forward_with_autograd(backend, kind, edge, loops, dropout_p, probs):
    _available(backend)
    op = getattr(torch.ops.fastattn, OPS[backend]).default
    torch.library.opcheck(op, _op_args(kind, edge, loops, dropout_p, probs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", [0, 1, 2])
def test_opcheck_backward(backend, kind):
    _available(backend)
    args = _op_args(kind, True, True, 0.2, requires_grad=False)
    fwd = getattr(torch.ops.fastattn, OPS[backend])
    out, lse, _ = fwd(*args)
    bwd = getattr(torch.ops.fastattn, OPS[backend] + "_bwd").default
    torch.library.opcheck(bwd, (torch.randn_like(out), torch.randn_like(lse), out, lse, *args[:-1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_functional_ops_fullgraph(backend):
    _available(backend)
    gen = torch.Generator().manual_seed(0)
    ei = torch.randint(0, 9, (2, 30), generator=gen)
    g = Graph.from_edge_index(ei, 9, add_self_loops=True)
    x = torch.randn(9, 2, 4, generator=gen, requires_grad=True)
    y = torch.randn(9, 2, 4, generator=gen, requires_grad=True)
    att = torch.randn(2, 4, generator=gen, requires_grad=True)
    ea = torch.randn(30, 3, generator=gen, requires_grad=True)
    w = torch.randn(8, 3, generator=gen, requires_grad=True)
    a_s, a_d = torch.randn(9, 2, generator=gen), torch.randn(9, 2, generator=gen)

    def f(x, y, att, ea, w):
        one = gatv2_attention(x, y, att, g, edge_attr=ea, edge_proj=w, add_self_loops=True, backend=backend)
        two = dot_attention(y, x, x, g, edge_attr=ea, edge_proj=w, add_self_loops=True, backend=backend)
        three = gat_attention(x, a_s, a_d, g, add_self_loops=True, backend=backend)
        return one + two + three

    want = f(x, y, att, ea, w)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, y, att, ea, w)
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got.sum(), (x, y, att, ea, w))
    want_grads = torch.autograd.grad(want.sum(), (x, y, att, ea, w))
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cls", [fnn.GATConv, fnn.GATv2Conv, fnn.TransformerConv])
def test_compile_layers_fullgraph_building_the_graph_inside(cls):
    _available("cpu")
    gen = torch.Generator().manual_seed(1)
    kwargs = {} if cls is fnn.TransformerConv else {"fill_value": "mean"}
    layer = cls(5, 3, heads=2, edge_dim=2, backend="cpu", **kwargs)
    x = torch.randn(8, 5, generator=gen)
    ei = torch.randint(0, 8, (2, 25), generator=gen)
    ea = torch.randn(25, 2, generator=gen)
    want = layer(x, ei, ea)
    got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, ei, ea)
    torch.testing.assert_close(got, want)


def test_triton_kernels_compile_for_gpus_without_spills_in_loops():
    """Three variants as a GPU would build them (triton.compile, no GPU needed), in a fresh process:
    this session's kernels were defined under TRITON_INTERPRET=1. Every variant: compile_check --all."""
    pytest.importorskip("triton")
    code = (
        "from fastattn.graph.compile_check import Variant, compile_variant\n"
        "for v in [Variant('fwd', 2, True, True, 'bf16', 90), Variant('bwd_dst', 0, True, False, 'fp32', 80),\n"
        "          Variant('bwd_src', 2, True, False, 'bf16', 90)]:\n"
        "    r = compile_variant(v)\n"
        "    print(v.name(), r.ok, r.registers, r.spills_in_loops, r.error)\n"
        "    assert r.ok, r\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
