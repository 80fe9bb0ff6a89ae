"""fastattn.nn.Attention (seq2seq dot / cosine) against the same math written plainly in float64."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _nn_support import automatic_choice_is_reference  # noqa: F401

import fastattn
import fastattn.nn as fnn
from fastattn.nn import attention as attention_module
from fastattn.testing import assert_close

HIDDEN = 24


def oracle(module, query, context, mask):
    """Plain float64 math with the module's weights: (attended, weights)."""
    p = {n: t.double() for n, t in module.named_parameters()}
    q = F.linear(query.double(), p["query_proj.weight"], p.get("query_proj.bias"))
    k = F.linear(context.double(), p["key_proj.weight"], p.get("key_proj.bias"))
    v = F.linear(context.double(), p["value_proj.weight"], p.get("value_proj.bias"))
    single = q.dim() == 2
    if single:
        q = q.unsqueeze(1)
    if module.attention_type == "cosine":
        q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
        scale = 1.0 / module.temperature
    else:
        scale = 1.0 / math.sqrt(HIDDEN)
    scores = q @ k.transpose(-1, -2) * scale  # (B, Lq, Lk)
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    attended = weights @ v
    return (attended.squeeze(1), weights.squeeze(1)) if single else (attended, weights)


CASES = [
    dict(id="dot-single-mask", kind="dot", lq=None, mask=True, lk=9),
    dict(id="dot-multi-nomask", kind="dot", lq=3, mask=False, lk=17),
    dict(id="cosine-single-nomask-t1", kind="cosine", lq=None, mask=False, lk=5, temperature=1.0),
    dict(id="cosine-multi-mask-t0.1", kind="cosine", lq=2, mask=True, lk=1, temperature=0.1),
    dict(id="dot-single-nobias-lk1", kind="dot", lq=None, mask=False, lk=1, bias=False),
]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_matches_plain_math_and_gradients(case, monkeypatch):
    gen = torch.Generator().manual_seed(7)
    module = fnn.Attention(
        case["kind"], hidden_size=HIDDEN, temperature=case.get("temperature", 1.0), bias=case.get("bias", True)
    )
    with torch.no_grad():
        for name, t in module.named_parameters():
            if "bias" in name:
                t.normal_(0.0, 0.5, generator=gen)
    batch, lk = 3, case["lk"]
    qshape = (batch, HIDDEN) if case["lq"] is None else (batch, case["lq"], HIDDEN)
    query = torch.randn(qshape, generator=gen, requires_grad=True)
    context = torch.randn(batch, lk, HIDDEN, generator=gen, requires_grad=True)
    mask = None
    if case["mask"]:
        mask = torch.rand(batch, lk, generator=gen) < 0.6
        mask[:, 0] = True
    calls = []
    real = attention_module.scaled_dot_product_attention

    def counting(q, *args, **kwargs):
        calls.append(tuple(q.shape))
        return real(q, *args, **kwargs)

    monkeypatch.setattr(attention_module, "scaled_dot_product_attention", counting)
    attended, weights = module(query, context, mask)
    lq = 1 if case["lq"] is None else case["lq"]
    assert calls == [(batch, 1, lq, HIDDEN)], "the attended vector must come from fastattn's entry point"

    q64 = query.detach().double().requires_grad_()
    c64 = context.detach().double().requires_grad_()
    m64 = copy.deepcopy(module).double()
    e_att, e_w = oracle(m64, q64, c64, mask)
    assert attended.shape == e_att.shape and weights.shape == e_w.shape
    assert_close(attended, e_att, None, name="attended")
    assert_close(weights, e_w, None, name="weights")
    if mask is not None:
        w3 = weights if weights.dim() == 3 else weights.unsqueeze(1)
        assert bool((w3.masked_select(~mask.unsqueeze(1).expand_as(w3)) == 0).all())
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))

    g_att = torch.randn(attended.shape, generator=gen, dtype=torch.float64)
    g_w = torch.randn(weights.shape, generator=gen, dtype=torch.float64)
    loss = (attended * g_att.float()).sum() + (weights * g_w.float()).sum()
    names = ["query", "context", *[n for n, _ in module.named_parameters()]]
    grads = torch.autograd.grad(loss, [query, context, *module.parameters()])
    e_loss = (e_att * g_att).sum() + (e_w * g_w).sum()
    e_grads = torch.autograd.grad(e_loss, [q64, c64, *m64.parameters()])
    for name, g, e in zip(names, grads, e_grads):
        assert_close(g, e, None, name=f"grad {name}", atol=1e-4 * max(1.0, float(e.abs().max())))


def test_fully_masked_row_gives_zeros_and_finite_gradients():
    module = fnn.Attention("dot", hidden_size=HIDDEN)
    query = torch.randn(2, HIDDEN, requires_grad=True)
    context = torch.randn(2, 4, HIDDEN, requires_grad=True)
    mask = torch.tensor([[True, False, True, False], [False] * 4])
    attended, weights = module(query, context, mask)
    assert bool((attended[1] == 0).all()) and bool((weights[1] == 0).all())
    assert bool((weights[0, ~mask[0]] == 0).all())
    (attended.sum() + weights.sum()).backward()
    assert torch.isfinite(query.grad).all() and torch.isfinite(context.grad).all()


def test_cosine_temperature_sharpens():
    torch.manual_seed(3)
    base = fnn.Attention("cosine", hidden_size=HIDDEN, temperature=1.0)
    sharp = fnn.Attention("cosine", hidden_size=HIDDEN, temperature=0.05)
    sharp.load_state_dict(base.state_dict())
    query, context = torch.randn(4, HIDDEN), torch.randn(4, 6, HIDDEN)
    _, w_base = base(query, context)
    _, w_sharp = sharp(query, context)
    assert bool((w_sharp.max(-1).values > w_base.max(-1).values).all())


@pytest.mark.parametrize(
    "build, call, match",
    [
        (lambda: fnn.Attention("general"), None, r"attention_type: expected one of \('dot', 'cosine'\), got 'general'"),
        (lambda: fnn.Attention("dot", hidden_size=0), None, r"hidden_size: expected a positive int, got 0"),
        (lambda: fnn.Attention("cosine", temperature=0.0), None, r"temperature: expected a positive number"),
        (lambda: fnn.Attention("dot", backend="nope"), None, r"backend"),
        (
            lambda: fnn.Attention("dot", hidden_size=HIDDEN),
            lambda m: m(torch.randn(2, HIDDEN + 1), torch.randn(2, 3, HIDDEN)),
            r"query: expected shape \(B, 24\) or \(B, Lq, 24\), got \(2, 25\)",
        ),
        (
            lambda: fnn.Attention("dot", hidden_size=HIDDEN),
            lambda m: m(torch.randn(2, HIDDEN), torch.randn(2, HIDDEN)),
            r"context: expected shape \(B, Lk, 24\), got \(2, 24\)",
        ),
        (
            lambda: fnn.Attention("dot", hidden_size=HIDDEN),
            lambda m: m(torch.randn(3, HIDDEN), torch.randn(2, 4, HIDDEN)),
            r"query: expected batch size 2",
        ),
        (
            lambda: fnn.Attention("dot", hidden_size=HIDDEN),
            lambda m: m(torch.randn(2, HIDDEN), torch.randn(2, 4, HIDDEN), torch.ones(2, 5, dtype=torch.bool)),
            r"mask: expected a bool tensor of shape \(2, 4\), True = attend; got torch.bool \(2, 5\)",
        ),
    ],
)
def test_bad_input_errors(build, call, match):
    with pytest.raises(ValueError, match=match):
        module = build()
        call(module)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    module = fnn.Attention("cosine", hidden_size=HIDDEN, temperature=0.5)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    query = torch.randn(2, HIDDEN, requires_grad=True)
    context = torch.randn(2, 5, HIDDEN)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    att_c, w_c = compiled(query, context, mask)
    att_e, w_e = module(query, context, mask)
    torch.testing.assert_close(att_c, att_e)
    torch.testing.assert_close(w_c, w_e)
    (g_c,) = torch.autograd.grad(att_c.sum() + w_c.pow(2).sum(), query)
    (g_e,) = torch.autograd.grad(att_e.sum() + w_e.pow(2).sum(), query)
    torch.testing.assert_close(g_c, g_e)


def _triton_reason():
    if "triton" not in fastattn.backends.names():
        return "no 'triton' backend registered in fastattn.backends"
    return fastattn.backends.get("triton").unavailable_reason()


_TRITON_REASON = _triton_reason()


@pytest.mark.skipif(_TRITON_REASON is not None, reason=f"triton backend absent: {_TRITON_REASON}")
def test_through_triton_matches_reference():
    torch.manual_seed(5)
    ref = fnn.Attention("dot", hidden_size=HIDDEN, backend="reference")
    tri = fnn.Attention("dot", hidden_size=HIDDEN, backend="triton")
    tri.load_state_dict(ref.state_dict())
    query = torch.randn(2, HIDDEN, requires_grad=True)
    context = torch.randn(2, 17, HIDDEN)
    mask = torch.rand(2, 17) < 0.7
    mask[:, 0] = True
    (a_ref, w_ref), (a_tri, w_tri) = ref(query, context, mask), tri(query, context, mask)
    assert_close(a_tri, a_ref, None, name="attended (triton)")
    torch.testing.assert_close(w_tri, w_ref)
    (g_ref,) = torch.autograd.grad(a_ref.sum(), query)
    (g_tri,) = torch.autograd.grad(a_tri.sum(), query)
    assert_close(g_tri, g_ref, None, name="grad query (triton)", atol=1e-4)
