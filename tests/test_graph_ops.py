"""The fused graph ops against the float64 per-edge oracle on every backend: outputs, lse, attention
weights and every gradient (features, edge features, attention vectors, W_e, through lse too).

Backends: ``cpu`` natively, ``triton`` under the interpreter, ``reference`` (the oracle itself in the
inputs' precision). Every case draws fresh inputs; outputs and scratch start as NaN
(``FASTATTN_POISON=1``), so an element a kernel never writes fails. The default run is a covering set
(every graph case of issue 22 with every scoring on the CPU, a cross-section on Triton); the full
product is marked ``full``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from _graph_support import GRAPHS, OPS, make_graph, make_inputs, oracle

from fastattn.graph import Graph, _backends
from fastattn.graph._structure import graph_for
from fastattn.testing import assert_close

KINDS = ("dot", "gat", "gatv2")


@pytest.fixture(scope="module", autouse=True)
def _poison():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTATTN_POISON", "1")
        yield


def _skip_unless_runs(backend: str, dtype=torch.float32) -> None:
    b = _backends.get(backend)
    reason = b.unavailable_reason() or b.unsupported_reason(torch.device("cpu"), dtype)
    if reason:
        pytest.skip(f"{backend}: {reason}")


def check(backend, kind, case, edge, loops, dtype=torch.float32, dropout_p=0.0, seed=0):
    """One case through ``backend`` against the oracle (2x/3x rule of shared/NOTES.md for bfloat16)."""
    _skip_unless_runs(backend, dtype)
    gen = torch.Generator().manual_seed(seed)
    ei, ns, nd = make_graph(case, gen)
    args, kw = make_inputs(kind, ns, nd, ei.shape[1], edge, dtype, gen)
    if not loops:
        kw.pop("loop_alpha", None)  # GAT's self-loop logits exist only with add_self_loops
    philox = torch.tensor([1234 + seed, 77 * seed], dtype=torch.int64) if dropout_p else None
    result = OPS[kind](
        *args, ei, **kw, add_self_loops=loops, dropout_p=dropout_p, philox=philox, backend=backend,
        return_lse=True, return_attention_weights=True,
    )  # fmt: skip
    out, lse, (kept_index, alpha) = result
    go = torch.randn(out.shape, generator=gen)
    gl = torch.randn(lse.shape, generator=gen)
    inputs = [*args, *kw.values()]

    def loss(o, lse_):  # lse takes part too: its gradient is folded into the kernels' delta
        return (o.double() * go).sum() + (torch.where(torch.isfinite(lse_), lse_, 0.0).double() * gl).sum()

    grads = torch.autograd.grad(loss(out, lse), inputs, allow_unused=True)

    graph = graph_for(ei, ns, nd, loops)
    keep = (
        _backends.get(backend).dropout_keep(philox, graph.num_ids, args[0].shape[1], dropout_p) if dropout_p else None
    )

    def reference_run(compute_dtype):
        ins = [t.detach().clone().requires_grad_(True) for t in inputs]
        a, k = ins[: len(args)], dict(zip(kw, ins[len(args) :]))
        o, lse_, p = oracle(kind, graph, a, k, keep=keep, dropout_p=dropout_p, compute_dtype=compute_dtype)
        g = torch.autograd.grad(loss(o, lse_), ins, allow_unused=True)
        return o, lse_, p, g

    ref_out, ref_lse, ref_probs, ref_grads = reference_run(torch.float64)
    base_out, base_lse, base_probs, base_grads = None, None, None, [None] * len(inputs)
    if dtype != torch.float32:  # plain PyTorch in bfloat16 (the self loops' mean features are bf16 too)
        base_out, base_lse, base_probs, base_grads = reference_run(dtype)
    assert_close(out, ref_out, base_out, name=f"{backend} out")
    assert_close(lse, ref_lse.float(), base_lse, name=f"{backend} lse")
    assert torch.equal(kept_index, graph.kept_edge_index())
    kept = graph.kept if graph.kept is not None else torch.ones(graph.num_ids, dtype=torch.bool)
    base_alpha = None if base_probs is None else base_probs[kept]
    assert_close(alpha, ref_probs[kept], base_alpha, name=f"{backend} attention weights")
    names = [f"d{i}" for i in range(len(args))] + [f"d_{n}" for n in kw]
    for name, g, r, b, t in zip(names, grads, ref_grads, base_grads, inputs):
        assert g is not None and r is not None, name
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert_close(g, r, b, factor=3.0, name=f"{backend} {name}")


# Every graph case with every scoring on the CPU, edge features and self-loop replacement in turn.
CPU_CASES = [
    (kind, case, edge, loops)
    for i, (kind, case) in enumerate(itertools.product(KINDS, GRAPHS))
    for edge, loops in ([(False, False), (True, True)] if i % 2 else [(True, False), (False, True)])
]


@pytest.mark.parametrize("kind,case,edge,loops", CPU_CASES)
def test_cpu_against_oracle(kind, case, edge, loops):
    check("cpu", kind, case, edge, loops)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["random", "hub", "isolated"])
def test_cpu_bfloat16(kind, case):
    check("cpu", kind, case, edge=True, loops=case != "hub", dtype=torch.bfloat16)


TRITON_CASES = [
    ("dot", "hub", True, False),
    ("dot", "isolated", False, True),
    ("gat", "self_loops", True, True),
    ("gat", "no_edges", False, True),
    ("gatv2", "random", True, True),
    ("gatv2", "one_node", False, True),
    ("gatv2", "bipartite", True, False),
]


@pytest.mark.parametrize("kind,case,edge,loops", TRITON_CASES)
def test_triton_against_oracle(kind, case, edge, loops):
    check("triton", kind, case, edge, loops)


@pytest.mark.parametrize("kind", KINDS)
def test_triton_bfloat16(kind):
    check("triton", kind, "random", edge=kind != "gat", loops=True, dtype=torch.bfloat16)


@pytest.mark.parametrize("kind", KINDS)
def test_reference_backend(kind):
    check("reference", kind, "random", edge=True, loops=True)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("kind", KINDS)
def test_dropout_against_oracle_with_the_same_keep_mask(backend, kind):
    check(backend, kind, "hub" if backend == "cpu" else "random", edge=True, loops=True, dropout_p=0.3, seed=3)


@pytest.mark.full
@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,case,edge,loops", list(itertools.product(KINDS, GRAPHS, (False, True), (False, True))))
def test_full_matrix(backend, kind, case, edge, loops, dtype):
    check(backend, kind, case, edge, loops, dtype=dtype, dropout_p=0.2 if case == "random" else 0.0)


def test_dropout_keep_masks_agree_across_backends():
    """One Philox contract: the reference (torch integer arithmetic), C++ and tl.rand draw the same bits."""
    philox = torch.tensor([2**40 + 12345, 2**33 + 7], dtype=torch.int64)
    masks = {}
    for name in ("reference", "cpu", "triton"):
        b = _backends.get(name)
        if b.unavailable_reason() or b.unsupported_reason(torch.device("cpu"), torch.float32):
            continue
        masks[name] = b.dropout_keep(philox, 1000, 7, 0.25)
    assert "reference" in masks and len(masks) >= 2, masks.keys()
    for name, m in masks.items():
        assert m.shape == (1000, 7) and m.dtype == torch.bool
        assert torch.equal(m, masks["reference"]), name
    kept = masks["reference"].float().mean().item()
    assert abs(kept - 0.75) < 0.02, kept


def test_dropout_is_reproducible_and_replayed_by_backward():
    _skip_unless_runs("cpu")
    gen = torch.Generator().manual_seed(5)
    ei, ns, nd = make_graph("random", gen)
    args, _ = make_inputs("gatv2", ns, nd, ei.shape[1], False, torch.float32, gen)
    torch.manual_seed(11)
    a = OPS["gatv2"](*args, ei, dropout_p=0.5, backend="cpu")
    torch.manual_seed(11)
    b = OPS["gatv2"](*args, ei, dropout_p=0.5, backend="cpu")
    c = OPS["gatv2"](*args, ei, dropout_p=0.5, backend="cpu")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cpu_results_do_not_depend_on_the_thread_count():
    _skip_unless_runs("cpu")
    gen = torch.Generator().manual_seed(2)
    ei = torch.randint(0, 300, (2, 5000), generator=gen)
    args, kw = make_inputs("gatv2", 300, 300, 5000, True, torch.float32, gen, heads=4, channels=8)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = OPS["gatv2"](*args, ei, **kw, add_self_loops=True, backend="cpu")
            grads = torch.autograd.grad(out.sum(), [*args, *kw.values()])
            results.append((out, *grads))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)


def test_backends_agree_with_each_other():
    _skip_unless_runs("triton")
    _skip_unless_runs("cpu")
    gen = torch.Generator().manual_seed(9)
    ei, ns, nd = make_graph("hub", gen)
    args, kw = make_inputs("gatv2", ns, nd, ei.shape[1], True, torch.float32, gen)
    outs = {b: OPS["gatv2"](*args, ei, **kw, add_self_loops=True, backend=b) for b in ("cpu", "triton")}
    torch.testing.assert_close(outs["cpu"], outs["triton"], rtol=1e-5, atol=1e-5)


def test_graph_object_and_edge_index_give_the_same_result():
    _skip_unless_runs("cpu")
    gen = torch.Generator().manual_seed(4)
    ei, ns, nd = make_graph("self_loops", gen)
    args, kw = make_inputs("dot", ns, nd, ei.shape[1], True, torch.float32, gen)
    g = Graph.from_edge_index(ei, (ns, nd), add_self_loops=True)
    a = OPS["dot"](*args, ei, **kw, add_self_loops=True, backend="cpu")
    b = OPS["dot"](*args, g, **kw, add_self_loops=True, backend="cpu")
    assert torch.equal(a, b)


def test_auto_choice_and_named_backend_errors(monkeypatch):
    assert {"reference", "cpu", "triton"} <= set(_backends.names())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backends.choose(None, torch.device("cpu"), torch.float32).name == "triton"
    monkeypatch.setenv("FASTATTN_GRAPH_BACKEND", "reference")
    assert _backends.choose(None, torch.device("cpu"), torch.float32).name == "reference"
    monkeypatch.delenv("FASTATTN_GRAPH_BACKEND")
    monkeypatch.delenv("TRITON_INTERPRET")
    if _backends.get("cpu").unavailable_reason() is None:
        assert _backends.choose(None, torch.device("cpu"), torch.float32).name == "cpu"
    assert _backends.choose(None, torch.device("cpu"), torch.float64).name == "reference"
    with pytest.raises(_backends.UnsupportedError, match="float32 and bfloat16, got torch.float16"):
        _backends.choose("cpu", torch.device("cpu"), torch.float16)
    with pytest.raises(ValueError, match="backend: expected one of"):
        _backends.choose("nope", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize(
    "make_call,match",
    [
        (lambda q, k, v, ei: dict(query=q[:, :2], key=k, value=v), r"key: expected \(num_src, 2, 5\) like query"),
        (lambda q, k, v, ei: dict(query=q, key=k.double(), value=v), "key: expected dtype torch.float32"),
        (lambda q, k, v, ei: dict(query=q[0], key=k, value=v), r"query: expected \(num_dst, heads, channels\)"),
        (lambda q, k, v, ei: dict(query=q, key=k, value=v, dropout_p=1.0), r"dropout_p: expected a probability"),
        (
            lambda q, k, v, ei: dict(query=q, key=k, value=v, edge_attr=torch.randn(3, 2)),
            r"edge_attr: expected \(num_edges=70",
        ),
        (
            lambda q, k, v, ei: dict(query=q, key=k, value=v, edge_attr=torch.randn(70, 2)),
            "edge_proj: required with edge_attr",
        ),
    ],
)
def test_bad_inputs_are_refused_by_name(make_call, match):
    gen = torch.Generator().manual_seed(0)
    ei, ns, nd = make_graph("random", gen)
    (q, k, v), _ = make_inputs("dot", ns, nd, ei.shape[1], True, torch.float32, gen)
    call = make_call(q.detach(), k.detach(), v.detach(), ei)
    with pytest.raises((ValueError, TypeError), match=match):
        OPS["dot"](edge_index=ei, backend="reference", **call)


def test_cpu_op_checks_name_the_argument():
    _skip_unless_runs("cpu")
    from fastattn.graph import _cpu

    _cpu.load()
    g = Graph.from_edge_index(torch.tensor([[0, 1], [1, 0]]), 2)
    x = torch.randn(2, 2, 4)
    with pytest.raises(RuntimeError, match="argument 'att' is required for kind gatv2"):
        torch.ops.fastattn.cpu_graph_attn(
            *g.tensors(), x, x, None, None, None, None, None, None, 2, 2, 1.0, 0.2, 0.0, False
        )
    with pytest.raises(
        RuntimeError, match=r"argument 'src' must be \(sources, 2, 4\) like 'dst', got shape \(2, 2, 3\)"
    ):
        torch.ops.fastattn.cpu_graph_attn(
            *g.tensors(), x, x[..., :3].contiguous(), x, None, None, None, None, None, 0, 2, 1.0, 0.2, 0.0, False
        )
    with pytest.raises(RuntimeError, match="argument 'philox'"):
        torch.ops.fastattn.cpu_graph_attn(
            *g.tensors(), x, x, x, None, None, None, None, None, 0, 2, 1.0, 0.2, 0.5, False
        )
