"""The variants (softcap, ALiBi, sinks, chunk) on every backend against the float64 oracle, from the one catalogue.

Each backend runs a pairwise covering set (``fastattn.testing.pairwise``) of mask kind x variant kind x dtype x
lengths x GQA x head dim, forward and every gradient (dq, dk, dv, dsinks, dmask) through the entry point
(``fastattn.testing.check_backend``), outputs poisoned with NaN (``FASTATTN_POISON=1``). The oracle's own
statement of each rule is checked against an independent one (an explicit bias tensor, an extra softmax
column, a dense mask), the sinks' gradient by ``gradcheck``, and the chunk's tile skipping by the kernel's own
count of visited tiles. The CUDA kernels' variant cases are in ``tests/test_cuda_variants.py`` (emulator).
"""

from __future__ import annotations

import dataclasses
import os
import re

import pytest
import torch

import fastattn
from fastattn import reference, testing
from fastattn._validate import validate
from fastattn.backends import registry

sdpa = fastattn.scaled_dot_product_attention

# (Lq, Lk): odd lengths, a single query or key, more queries than keys, and one above 1000 (shrunk below).
LENGTHS = [(1, 17), (17, 17), (65, 129), (129, 65), (17, 1), (1030, 1030)]
GQA = [(2, 2), (4, 2), (3, 1)]


def _shrink(case: dict) -> dict:
    """The long length runs with one batch, at most 2 heads and the smallest head dim (the interpreter's cost)."""
    if case["lengths"][0] < 1000:
        return case
    return {**case, "gqa": (2, 1) if case["gqa"][0] != case["gqa"][1] else (1, 1), "head_dim": 16}


def _exempt(a, va, b, vb) -> bool:
    return {a, b} & {"gqa", "head_dim"} and (1030, 1030) in (va, vb)


def _factors(dtypes, head_dims) -> dict:
    return {
        "variant": [v for v in testing.VARIANT_KINDS if v != "plain"],
        "mask": list(testing.MASK_KINDS),
        "dtype": list(dtypes),
        "lengths": LENGTHS,
        "gqa": GQA,
        "head_dim": list(head_dims),
    }


def _cases(dtypes, head_dims) -> list[dict]:
    return testing.pairwise(_factors(dtypes, head_dims), _shrink, _exempt)


def _case_id(c: dict) -> str:
    return (
        f"{c['variant']}-{c['mask']}-{str(c['dtype']).removeprefix('torch.')}-{c['lengths'][0]}x{c['lengths'][1]}-"
        f"h{c['gqa'][0]}kv{c['gqa'][1]}-d{c['head_dim']}"
    )


def _run_case(backend: str, case: dict, seed: int = 0) -> dict:
    (lq, lk), (hq, hkv), d, dtype = case["lengths"], case["gqa"], case["head_dim"], case["dtype"]
    batch = 1 if lq > 1000 else 2
    g = torch.Generator().manual_seed(seed)
    q, k, v = testing.random_qkv(batch, hq, hkv, lq, lk, d, dtype=dtype, generator=g)
    kw = testing.case_kwargs(case["mask"], case["variant"], batch, hq, lq, lk, dtype, g)
    kw["enable_gqa"] = hq != hkv
    return testing.check_backend(backend, q, k, v, kw)


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setenv("FASTATTN_POISON", "1")


# ---------------------------------------------------------------------------------------------- the oracle


def _qkv(b=2, hq=4, hkv=2, lq=13, lk=19, d=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(11)
    return testing.random_qkv(b, hq, hkv, lq, lk, d, dtype=dtype, generator=g)


def test_oracle_softcap_is_the_formula():
    q, k, v = _qkv()
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.3
    expected = torch.softmax(2.5 * torch.tanh(scores / 2.5), -1) @ v.repeat_interleave(2, 1)
    out = reference.attention(q, k, v, scale=0.3, softcap=2.5, enable_gqa=True)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("slopes_shape", ["heads", "batch_heads"])
def test_oracle_alibi_equals_the_explicit_bias(slopes_shape):
    """In-kernel ALiBi is the additive bias ``-slope * |i + q_offset - j|`` a user would build by hand."""
    q, k, v = _qkv()
    slopes = testing.alibi_slopes(4) if slopes_shape == "heads" else torch.rand(2, 4)
    i, j = torch.arange(13).view(13, 1) + 5, torch.arange(19).view(1, 19)
    bias = -slopes.view(-1, 4, 1, 1).double() * (i - j).abs()
    expected = reference.attention(q, k, v, bias, enable_gqa=True, is_causal=True, q_offset=5)
    out = reference.attention(q, k, v, enable_gqa=True, is_causal=True, q_offset=5, alibi_slopes=slopes)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_oracle_sinks_are_an_extra_column_without_value():
    """A sink is one more key whose score is the sink's logit and whose value is zero."""
    q, k, v = _qkv(hq=2, hkv=2)
    sinks = torch.randn(2, dtype=torch.float64)
    out, lse = reference.attention(q, k, v, sinks=sinks, return_lse=True)
    scores = torch.cat([(q @ k.transpose(-1, -2)) / 8**0.5, sinks.view(1, 2, 1, 1).expand(2, 2, 13, 1)], -1)
    probs = torch.softmax(scores, -1)
    torch.testing.assert_close(out, probs[..., :-1] @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=1e-12, atol=1e-12)
    # A row with nothing to attend: zeros, and the lse is the sink's.
    out, lse = reference.attention(q, k, v, is_causal=True, q_offset=-20, sinks=sinks, return_lse=True)
    assert (out == 0).all() and torch.equal(lse, sinks.view(1, 2, 1).expand(2, 2, 13))


def test_oracle_chunk_equals_the_dense_mask():
    q, k, v = _qkv()
    pos, j = torch.arange(13).view(13, 1) + 7, torch.arange(19).view(1, 19)
    dense = torch.div(pos, 6, rounding_mode="floor") == torch.div(j, 6, rounding_mode="floor")
    for causal in (False, True):
        expected = reference.attention(q, k, v, dense, enable_gqa=True, is_causal=causal, q_offset=7)
        out = reference.attention(q, k, v, enable_gqa=True, is_causal=causal, q_offset=7, chunk=6)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_sinks_gradcheck():
    """The sinks' gradient (computed once, in the autograd function, for every backend) against finite
    differences, with every other variant, GQA, a float mask and rows that attend nothing."""
    q, k, v = (t.requires_grad_() for t in _qkv(b=1, hq=4, hkv=2, lq=6, lk=9, d=4))
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 4, 6, 9, dtype=torch.float64, requires_grad=True)
    slopes = testing.alibi_slopes(4)

    def fn(q, k, v, sinks, bias):
        return sdpa(
            q, k, v, bias, is_causal=True, q_offset=-1, enable_gqa=True, softcap=2.0, alibi_slopes=slopes,
            sinks=sinks, chunk=4, backend="reference",
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, (q, k, v, sinks, bias))


def test_sink_gradient_formula_matches_autograd():
    """``variants.sink_grad`` (what every backend's autograd returns) equals autograd through the oracle."""
    from fastattn.variants import sink_grad

    q, k, v = _qkv()
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)
    out, lse = reference.attention(q, k, v, enable_gqa=True, window=(4, 1), sinks=sinks, return_lse=True)
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    (expected,) = torch.autograd.grad(out, sinks, grad_out)
    torch.testing.assert_close(sink_grad(sinks, lse, grad_out, out), expected, rtol=1e-12, atol=1e-12)


def test_variant_combination_with_dropout_on_the_reference():
    """Every variant together with dropout: the reference applies the shared contract's keep-mask (the same as
    the kernels'), and its gradients equal autograd through the oracle given that mask."""
    from fastattn.backends._philox import keep_mask, philox_seed_offset

    q, k, v = (t.requires_grad_() for t in _qkv())
    kw = dict(enable_gqa=True, softcap=2.0, alibi_slopes=testing.alibi_slopes(4), chunk=5, window=(6, 0))
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    out = sdpa(q, k, v, dropout_p=0.3, sinks=sinks, backend="reference", **kw)
    torch.manual_seed(5)
    keep = keep_mask(philox_seed_offset("cpu"), 2, 4, 13, 19, 0.3)
    expected = reference.attention(q, k, v, keep_mask=keep, dropout_p=0.3, sinks=sinks, **kw)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn(out.shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (q, k, v, sinks), g), torch.autograd.grad(expected, (q, k, v, sinks), g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------- the ops


def test_every_backend_op_takes_the_registry_arguments():
    """One argument order per direction across backends (the ops that exist in this process)."""
    from fastattn.backends import cpu as cpu_backend
    from fastattn.backends.triton import bwd, fwd  # noqa: F401  (defines the Triton ops)

    if registry.get("cpu").unavailable_reason() is None:
        cpu_backend.load()
    ops = [
        name
        for name in ("reference", "triton_attn", "cpu_attn", "cuda_attn")
        if hasattr(torch.ops.fastattn, name + "_fwd")
    ]
    assert "reference" in ops and "triton_attn" in ops
    for name in ops:
        for direction, expected in (("fwd", registry.OP_FWD_ARGS), ("bwd", registry.OP_BWD_ARGS)):
            schema = getattr(torch.ops.fastattn, f"{name}_{direction}").default._schema
            assert tuple(a.name for a in schema.arguments) == expected, (name, direction)


def test_packed_variant_has_one_field_order_in_python_and_cpp():
    """The ops' ``variant`` argument: ``VariantScalars`` packs it, and the C++ reader (``csrc/attn_rules.h``,
    ``unpack_variant``) names the same fields in the same order; each field but the band is an ``AttnParams``
    field of the same name, so packing from a call's params needs no per-field code."""
    from fastattn.backends import cpu as cpu_backend
    from fastattn.params import VariantScalars

    fields = VariantScalars._fields
    assert fields[:2] == ("window_left", "window_right")
    assert set(fields[2:]) <= {f.name for f in dataclasses.fields(fastattn.AttnParams)}
    params = fastattn.AttnParams.for_tensors(*testing.random_qkv(1, 2, 2, 5, 7, 8), 0.5, **VariantScalars(
        3, 1, 2, 4, 1.5).params_kwargs())  # fmt: skip
    assert params.variant_scalars == VariantScalars(3, 1, 2, 4, 1.5)
    assert VariantScalars.unpack(params.variant_scalars.pack()) == params.variant_scalars
    with pytest.raises(ValueError, match=r"variant: expected 5 numbers \(window_left, .*\), got 2"):
        VariantScalars.unpack([1.0, 2.0])
    if registry.get("cpu").unavailable_reason() is not None:
        pytest.skip("the C++ reader is checked through the CPU op, which is not built here")
    cpu_backend.load()
    q, k, v = testing.random_qkv(1, 2, 2, 5, 7, 8)
    with pytest.raises(RuntimeError, match=r"expected 5 numbers \((.*)\), got 1") as err:
        torch.ops.fastattn.cpu_attn_fwd(q, k, v, None, None, None, [], None, 0.5, 0.0, [0.0], [64, 64])
    assert tuple(re.search(r"numbers \((.*)\)", str(err.value)).group(1).split(", ")) == fields


def test_score_rules_are_one_keyword_set_from_the_oracle_to_the_ops():
    """``variants.SCORE_RULES`` is the scalar score rules' one list: each is an ``AttnParams`` and ``VariantScalars``
    field, the oracle and the validators take them as keywords by name (``check_score_rules``), a keyword naming
    no rule is refused by name, and a bad value names its rule."""
    from fastattn import variants
    from fastattn.params import VariantScalars

    assert variants.SCORE_RULES
    for name in variants.SCORE_RULES:
        assert name in {f.name for f in dataclasses.fields(fastattn.AttnParams)} and name in VariantScalars._fields
    q, k, v = (t.double() for t in testing.random_qkv(1, 2, 2, 5, 7, 8))
    with pytest.raises(TypeError, match="unexpected keyword argument 'softcapp'"):
        reference.attention(q, k, v, softcapp=3.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'softcapp'"):
        validate(q, k, v, softcapp=3.0)
    with pytest.raises(ValueError, match=r"softcap: expected a finite number > 0 \(or None\), got -1.0"):
        reference.attention(q, k, v, softcap=-1.0)
    params = validate(q, k, v, softcap=2.5)[0]
    assert params.score_rules == {"softcap": 2.5} and validate(q, k, v)[0].score_rules == {"softcap": 0.0}
    # The oracle's keyword reaches the rule: softcap · tanh(s / softcap) on the scaled scores, written out here.
    s = (q @ k.transpose(-1, -2)) * 8**-0.5
    want = torch.softmax(2.5 * torch.tanh(s / 2.5), -1) @ v
    torch.testing.assert_close(reference.attention(q, k, v, softcap=2.5), want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- Triton

TRITON_FACTORS = ([torch.float32, torch.float16, torch.bfloat16], [16, 40, 64])
TRITON_CASES = _cases(*TRITON_FACTORS)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (tests/conftest.py)")
@pytest.mark.parametrize("case", TRITON_CASES, ids=_case_id)
def test_triton_variants_match_oracle(case, poison):
    _run_case("triton", case)


def test_covering_sets_cover_every_pair():
    """Every pair of values of two factors is in some case, except the long length's with the sizes it shrinks."""
    factors = _factors(*TRITON_FACTORS)
    names = list(factors)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            seen = {(repr(c[a]), repr(c[b])) for c in TRITON_CASES}
            for va in factors[a]:
                for vb in factors[b]:
                    assert _exempt(a, va, b, vb) or (repr(va), repr(vb)) in seen, (a, va, b, vb)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (tests/conftest.py)")
@pytest.mark.parametrize(
    "lq, lk, kw",
    [
        (150, 150, {"chunk": 40}),
        (150, 200, {"chunk": 64, "is_causal": True}),
        (70, 200, {"chunk": 50, "is_causal": True, "q_offset": 130}),
        (200, 180, {"chunk": 45, "window": (30, 10), "q_offset": -20}),
        (100, 130, {"chunk": 33, "pad": True}),
    ],
    ids=["chunk", "chunk-causal", "chunk-decode", "chunk-window-negative-offset", "chunk-padding"],
)
def test_triton_chunk_visits_the_minimum_tiles(lq, lk, kw):
    """With a chunk, each forward program loads exactly the key tiles that hold an attended pair: its own count
    equals the summary's, and the dense count of non-empty tiles."""
    from fastattn.backends.triton import fwd

    kw = dict(kw)
    mask = None
    if kw.pop("pad", False):
        mask = (torch.arange(lk) < torch.tensor([[lk], [45]])).view(2, 1, 1, lk)
    q, k, v = (torch.randn(2, 2, n, 16) for n in (lq, lk, lk))
    params, q4, k4, v4 = validate(q, k, v, mask, **kw)
    out, lse, visited = fwd.forward(q4, k4, v4, params, None, count_visited=True)
    bm, bn = fwd.fwd_tiles(16, 16, torch.float32, None)
    allowed, _ = reference.allowed_and_bias(params, "cpu", torch.float64)
    allowed = allowed.expand(2, 2, lq, lk)
    nq, nk = -(-lq // bm), -(-lk // bn)
    padded = torch.nn.functional.pad(allowed, (0, nk * bn - lk, 0, nq * bm - lq))
    dense = padded.reshape(2, 2, nq, bm, nk, bn).any(5).any(3).sum(-1).to(torch.int32)
    assert torch.equal(visited, dense), (visited, dense)
    if mask is None:
        assert torch.equal(visited, params.tile_summary(bm, bn).kv_count.expand_as(visited))
    assert visited.sum() < visited.numel() * nk  # something was skipped
    testing.assert_close(out, reference.attention(q.double(), k.double(), v.double(), mask, **kw))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (tests/conftest.py)")
def test_triton_opcheck_with_variants():
    from fastattn.backends.triton import bwd, fwd

    q, k, v = testing.random_qkv(1, 4, 2, 20, 24, 16)
    mask = torch.randn(1, 4, 20, 24)
    alibi, sinks = testing.alibi_slopes(4).view(1, 4), torch.randn(4)
    bm, bn = fwd.fwd_tiles(16, 16, torch.float32, None)
    params = fastattn.AttnParams.for_tensors(q, k, v, 0.25, mask=mask)
    s = params.tile_summary(bm, bn)
    scalars = (0.25, 0.0, [5.0, 0.0, 3.0, 7.0, 2.0])
    fwd_args = (q, k, v, mask, alibi, sinks, [s.state, s.kv_count, s.kv_index], None, *scalars, [bm, bn])
    torch.library.opcheck(torch.ops.fastattn.triton_attn_fwd.default, fwd_args)
    out, lse = torch.ops.fastattn.triton_attn_fwd(*fwd_args)
    blocks = list(bwd.block_sizes(16, q.dtype, q.device, 24))
    states = [params.tile_summary(blocks[0], blocks[1]).state, params.tile_summary(blocks[2], blocks[3]).state]
    bwd_args = (torch.randn(out.shape), q, k, v, out, lse, mask, alibi, states, None, *scalars, blocks, True)
    torch.library.opcheck(torch.ops.fastattn.triton_attn_bwd.default, bwd_args)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (tests/conftest.py)")
def test_triton_compile_fullgraph_training_step_with_every_variant():
    """A training step (learned sinks and a learned bias) under ``torch.compile(fullgraph=True)`` equals eager."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 24, 16, generator=g)
    w = torch.randn(16, 16, generator=g) * 0.3
    slopes = testing.alibi_slopes(4)

    def step(w, sinks, bias):
        q = k = v = x @ w
        out = sdpa(
            q, k, v, bias, is_causal=True, softcap=3.0, alibi_slopes=slopes, sinks=sinks, chunk=10, backend="triton"
        )
        return out.square().mean()

    def grads(fn):
        leaves = [w.clone().requires_grad_(), torch.randn(4, generator=torch.Generator().manual_seed(1)),
                  torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(2))]  # fmt: skip
        leaves = [t.requires_grad_() for t in leaves]
        loss = fn(*leaves)
        loss.backward()
        return [loss.detach()] + [t.grad for t in leaves]

    torch._dynamo.reset()
    eager = grads(step)
    compiled = grads(torch.compile(step, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- CPU

CPU_CASES = _cases([torch.float32, torch.bfloat16, torch.float16], [16, 40, 64])


def _cpu_unavailable():
    from fastattn import _ext

    return _ext.unavailable_reason("cpu")


@pytest.mark.skipif(_cpu_unavailable() is not None, reason=str(_cpu_unavailable()))
@pytest.mark.parametrize("case", CPU_CASES, ids=_case_id)
def test_cpu_variants_match_oracle(case, poison):
    _run_case("cpu", case)


@pytest.mark.skipif(_cpu_unavailable() is not None, reason=str(_cpu_unavailable()))
def test_cpu_opcheck_and_compile_with_variants():
    from fastattn.backends import cpu as cpu_backend

    cpu_backend.load()
    q, k, v = testing.random_qkv(1, 4, 2, 20, 24, 16)
    mask = torch.randn(1, 4, 20, 24)
    alibi, sinks = testing.alibi_slopes(4).view(1, 4), torch.randn(4)
    scalars = (0.25, 0.0, [5.0, 0.0, 3.0, 7.0, 2.0])
    fwd_args = (q, k, v, mask, alibi, sinks, [], None, *scalars, [64, 64])
    torch.library.opcheck(torch.ops.fastattn.cpu_attn_fwd.default, fwd_args)
    out, lse = torch.ops.fastattn.cpu_attn_fwd(*fwd_args)
    bwd_args = (torch.randn(out.shape), q, k, v, out, lse, mask, alibi, [], None, *scalars, [64, 64], True)
    torch.library.opcheck(torch.ops.fastattn.cpu_attn_bwd.default, bwd_args)

    def f(q, k, v, sinks):
        return sdpa(q, k, v, enable_gqa=True, softcap=3.0, sinks=sinks, chunk=8, is_causal=True, backend="cpu")

    sinks = sinks.requires_grad_()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, sinks)
    torch.testing.assert_close(got, f(q, k, v, sinks))
    (dsinks,) = torch.autograd.grad(got.sum(), sinks)
    (expected,) = torch.autograd.grad(f(q, k, v, sinks).sum(), sinks)
    torch.testing.assert_close(dsinks, expected)
