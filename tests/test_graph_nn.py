"""fastattn.nn.GATConv / GATv2Conv / TransformerConv against PyTorch Geometric's layers with the same weights.

Outputs, attention weights (with their edge_index) and the gradients of the inputs, the edge features
and every parameter agree within float32 rounding, on random graphs and the edge cases of issue 22,
with PyG's message passing patched to raise while fastattn's layers run (so they never fall back
to it). Dropout is compared by giving PyG's ``F.dropout`` the keep-mask fastattn's kernels draw.
"""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import sys
import textwrap

import pytest
import torch
from _graph_support import make_graph

import fastattn.nn as fnn
from fastattn.graph import _backends
from fastattn.graph._dropout import philox_seed_offset
from fastattn.graph._structure import graph_for
from fastattn.testing import assert_close

pyg = pytest.importorskip("torch_geometric", reason="torch-geometric is a test dependency (requirements-dev.txt)")
from torch_geometric.nn import GATConv, GATv2Conv, TransformerConv  # noqa: E402
from torch_geometric.nn.conv import MessagePassing  # noqa: E402

PAIRS = {
    "GATConv": (GATConv, fnn.GATConv),
    "GATv2Conv": (GATv2Conv, fnn.GATv2Conv),
    "TransformerConv": (TransformerConv, fnn.TransformerConv),
}
IN, OUT, EDGE_DIM = 6, 4, 3


@contextlib.contextmanager
def pyg_message_passing_forbidden():
    """Every entry point of PyG's message passing raises inside the block."""

    def boom(*args, **kwargs):
        raise AssertionError("PyG's message passing ran inside a fastattn layer")

    with pytest.MonkeyPatch.context() as mp:
        for name in ("propagate", "edge_updater", "message", "aggregate", "update", "edge_update"):
            mp.setattr(MessagePassing, name, boom)
        mp.setattr(pyg.utils, "softmax", boom)
        yield


def _run(layer, x, edge_index, edge_attr, weights, grad_seed=0):
    """Output, attention weights and the gradients of x, edge_attr and every parameter."""
    x = (
        tuple(t.detach().clone().requires_grad_(True) for t in x)
        if isinstance(x, tuple)
        else x.detach().clone().requires_grad_(True)
    )
    ea = None if edge_attr is None else edge_attr.detach().clone().requires_grad_(True)
    kwargs = {"edge_attr": ea} if ea is not None else {}
    if weights is not None:
        kwargs["return_attention_weights"] = weights
    result = layer(x, edge_index, **kwargs)
    out, (att_index, alpha) = result if weights is not None else (result, (None, None))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    loss = (out * g).sum()
    inputs = list(x) if isinstance(x, tuple) else [x]
    inputs += [ea] if ea is not None else []
    params = dict(layer.named_parameters())
    grads = torch.autograd.grad(loss, inputs + list(params.values()), allow_unused=True)
    return out, att_index, alpha, grads[: len(inputs)], dict(zip(params, grads[len(inputs) :]))


def compare(name, kwargs, case="random", bipartite=False, edge=False, weights=True, train_dropout=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ei, ns, nd = make_graph(case, gen)
    if not bipartite:
        nd = ns = max(ns, nd)
    pyg_cls, fa_cls = PAIRS[name]
    in_channels = (IN, IN + 2) if bipartite else IN
    torch.manual_seed(seed)
    theirs = pyg_cls(in_channels, OUT, edge_dim=EDGE_DIM if edge else None, **kwargs)
    ours = fa_cls(in_channels, OUT, edge_dim=EDGE_DIM if edge else None, backend="cpu", **kwargs)
    # Strict both ways: the same parameter names and shapes.
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = (
        (torch.randn(ns, IN, generator=gen), torch.randn(nd, IN + 2, generator=gen))
        if bipartite
        else torch.randn(ns, IN, generator=gen)
    )
    edge_attr = torch.randn(ei.shape[1], EDGE_DIM, generator=gen) if edge else None

    if train_dropout:
        ours.train(), theirs.train()
        torch.manual_seed(100 + seed)
        philox = philox_seed_offset("cpu")  # what the layer draws next
        graph = graph_for(ei, ns, nd, getattr(ours, "add_self_loops", False))
        keep = _backends.get("cpu").dropout_keep(philox, graph.num_ids, ours.heads, ours.dropout)
        if graph.kept is not None:
            keep = keep[graph.kept]
        rate = ours.dropout

        def keep_dropout(t, p=0.5, training=True, inplace=False):  # F.dropout's signature, fastattn's mask
            return t * keep.to(t.dtype) / (1.0 - rate) if training and p > 0 else t

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.nn.functional, "dropout", keep_dropout)
            want = _run(theirs, x, ei, edge_attr, weights)
        torch.manual_seed(100 + seed)
        with pyg_message_passing_forbidden():
            got = _run(ours, x, ei, edge_attr, weights)
    else:
        ours.eval(), theirs.eval()
        want = _run(theirs, x, ei, edge_attr, weights)
        with pyg_message_passing_forbidden():
            got = _run(ours, x, ei, edge_attr, weights)

    out, att_index, alpha, in_grads, param_grads = got
    w_out, w_index, w_alpha, w_in_grads, w_param_grads = want
    assert_close(out, w_out, name="out")
    if weights is not None:
        assert torch.equal(att_index, w_index)
        assert_close(alpha, w_alpha.detach(), name="attention weights")
    for i, (g, w) in enumerate(zip(in_grads, w_in_grads)):
        assert_close(g, w, name=f"input grad {i}")
    for pname, w in w_param_grads.items():
        g = param_grads[pname]
        if w is None:
            assert g is None or not g.any(), pname
        else:
            assert_close(g, w, name=f"grad {pname}")


GAT_OPTIONS = [
    {},
    {"heads": 3},
    {"heads": 2, "concat": False, "negative_slope": 0.1},
    {"heads": 2, "add_self_loops": False},
    {"heads": 2, "bias": False, "residual": True},
]
FILLS = ["mean", "add", "max", "min", "mul", 0.5]


@pytest.mark.parametrize("name", ["GATConv", "GATv2Conv"])
@pytest.mark.parametrize("options", GAT_OPTIONS, ids=str)
def test_gat_layers_match_pyg(name, options):
    compare(name, options)


@pytest.mark.parametrize("name", ["GATConv", "GATv2Conv"])
@pytest.mark.parametrize("fill", FILLS)
def test_gat_layers_with_edge_features_and_self_loop_fill(name, fill):
    compare(name, {"heads": 2, "fill_value": fill}, case="self_loops", edge=True)


def test_gatv2_share_weights_and_tensor_fill():
    compare("GATv2Conv", {"heads": 2, "share_weights": True, "fill_value": torch.tensor([0.5, -1.0, 2.0])}, edge=True)


TRANSFORMER_OPTIONS = [
    {},
    {"heads": 3},
    {"heads": 2, "concat": False},
    {"heads": 2, "beta": True},
    {"heads": 2, "root_weight": False},
    {"heads": 2, "bias": False, "beta": True, "concat": False},
]


@pytest.mark.parametrize("options", TRANSFORMER_OPTIONS, ids=str)
@pytest.mark.parametrize("edge", [False, True])
def test_transformer_conv_matches_pyg(options, edge):
    compare("TransformerConv", options, edge=edge)


@pytest.mark.parametrize("name", list(PAIRS))
def test_bipartite_inputs(name):
    kwargs = {"heads": 2} if name == "TransformerConv" else {"heads": 2, "add_self_loops": False}
    compare(name, kwargs, case="bipartite", bipartite=True, edge=True)


@pytest.mark.parametrize(
    "name,case",
    list(
        itertools.product(
            PAIRS, ["isolated", "self_loops", "duplicates", "no_edges", "one_node", "one_node_no_edges", "hub"]
        )
    ),
)
def test_graph_edge_cases(name, case):
    compare(name, {"heads": 2}, case=case, edge=name != "GATConv")


@pytest.mark.parametrize("name", list(PAIRS))
def test_training_dropout_matches_pyg_given_the_same_keep_mask(name):
    compare(name, {"heads": 2, "dropout": 0.4}, case="hub", edge=True, train_dropout=True)


@pytest.mark.parametrize("name", list(PAIRS))
def test_return_attention_weights_follows_pyg(name):
    """GAT layers return weights only for a true value; TransformerConv for any bool (PyG's own rules)."""
    compare(name, {"heads": 2}, weights=True)
    compare(name, {"heads": 2}, weights=None)
    gen = torch.Generator().manual_seed(0)
    ei, n, _ = make_graph("random", gen)
    layer = PAIRS[name][1](IN, OUT, heads=2, backend="cpu")
    result = layer(torch.randn(n, IN), ei, return_attention_weights=False)
    assert isinstance(result, tuple) == (name == "TransformerConv")


def test_bfloat16_layer_close_to_float32():
    gen = torch.Generator().manual_seed(1)
    ei, n, _ = make_graph("random", gen)
    x = torch.randn(n, IN, generator=gen)
    layer = fnn.GATv2Conv(IN, OUT, heads=2, edge_dim=EDGE_DIM, backend="cpu")
    ea = torch.randn(ei.shape[1], EDGE_DIM, generator=gen)
    want = layer(x, ei, ea)
    got = layer.to(torch.bfloat16)(x.bfloat16(), ei, ea.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


def test_unsupported_options_are_refused_by_name():
    with pytest.raises(ValueError, match="in_channels=-1 .*lazy"):
        fnn.GATConv(-1, 4)
    with pytest.raises(ValueError, match="option aggr='mean' is not supported"):
        fnn.GATv2Conv(4, 4, aggr="mean")
    with pytest.raises(TypeError, match="option 'node_dim_foo' is not supported"):
        fnn.TransformerConv(4, 4, node_dim_foo=1)
    fnn.GATConv(4, 4, aggr="add", flow="source_to_target", node_dim=0)  # PyG's defaults pass
    layer = fnn.GATv2Conv(4, 4)
    with pytest.raises(ValueError, match="edge_attr was given but the layer has no edge_dim"):
        layer(torch.randn(3, 4), torch.tensor([[0, 1], [1, 2]]), torch.randn(2, 2))
    with pytest.raises(TypeError, match="edge_index: expected a \\(2, num_edges\\) integer tensor"):
        layer(torch.randn(3, 4), [[0, 1], [1, 2]])
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 1], [1, 2]]), torch.ones(2), (3, 3), check_invariants=True)
    with pytest.raises(ValueError, match="edge_index: a sparse adjacency"):
        layer(torch.randn(3, 4), sparse)
    with pytest.raises(ValueError, match="source index 7 \\(row 0\\) is out of range for 3 source nodes"):
        layer(torch.randn(3, 4), torch.tensor([[0, 7], [1, 2]]))


def test_layers_import_and_run_without_pyg():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch_geometric"] = None  # any import of PyG fails
        import torch, fastattn.nn as fnn
        ei = torch.tensor([[0, 1, 2], [1, 2, 0]])
        for layer in (fnn.GATConv(4, 3, heads=2), fnn.GATv2Conv(4, 3, heads=2), fnn.TransformerConv(4, 3, heads=2)):
            layer.backend = "cpu"
            out = layer(torch.randn(3, 4), ei)
            out.sum().backward()
            assert out.shape == (3, 6), out.shape
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_example_trains_a_gatv2_model():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "graph_node_classification.py"
    spec = importlib.util.spec_from_file_location("graph_node_classification", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    accuracy = example.main(
        ["--nodes", "600", "--epochs", "30", "--p-in", "0.05", "--p-out", "0.005", "--backend", "cpu"]
    )
    assert accuracy > 0.6  # 5 classes: chance is 0.2
