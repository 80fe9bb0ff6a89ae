"""The entry point as a whole: torch compatibility, dispatch, autograd, compile, op checks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import fastattn
from fastattn import reference
from fastattn._validate import validate
from fastattn.backends import registry
from fastattn.testing import assert_close

sdpa = fastattn.scaled_dot_product_attention


def _qkv(b=2, h=4, hk=4, lq=9, lk=13, d=16, dtype=torch.float64, grad=False):
    return tuple(
        torch.randn(*shape, dtype=dtype, requires_grad=grad)
        for shape in ((b, h, lq, d), (b, hk, lk, d), (b, hk, lk, d))
    )


def test_signature_matches_torch_positional_order():
    q, k, v = _qkv()
    mask = torch.rand(9, 13) > 0.2
    mask[:, 0] = True
    expected = F.scaled_dot_product_attention(q, k, v, mask, 0.0, False, scale=0.5, enable_gqa=False)
    torch.testing.assert_close(sdpa(q, k, v, mask, 0.0, False, 0.5, False, backend="reference"), expected)


@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
def test_causal_bias_objects_mean_the_same(variant):
    q, k, v = _qkv(lq=5, lk=12)
    bias = causal_upper_left(5, 12) if variant == "upper_left" else causal_lower_right(5, 12)
    offset = 0 if variant == "upper_left" else 7
    ours = sdpa(q, k, v, bias, backend="reference")
    torch.testing.assert_close(ours, sdpa(q, k, v, is_causal=True, q_offset=offset, backend="reference"))
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, bias))


def test_mask_and_causal_combine():
    q, k, v = _qkv(lq=12, lk=12)
    mask = torch.rand(12, 12) > 0.3
    combined = sdpa(q, k, v, mask, is_causal=True, backend="reference")
    explicit = sdpa(q, k, v, mask & torch.ones(12, 12, dtype=torch.bool).tril(), backend="reference")
    torch.testing.assert_close(combined, explicit)


def test_float_mask_gradient_is_reduced_over_broadcast_dims():
    q, k, v = _qkv(grad=True)
    bias = torch.randn(1, 4, 1, 13, dtype=torch.float64, requires_grad=True)  # per-head, per-key
    out = sdpa(q, k, v, bias, backend="reference")
    grad_out = torch.randn_like(out)
    ours = torch.autograd.grad(out, [q, k, v, bias], grad_out)
    expected_out = reference.attention(q, k, v, bias)
    expected = torch.autograd.grad(expected_out, [q, k, v, bias], grad_out)
    assert ours[3].shape == bias.shape
    for a, e in zip(ours, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_gradcheck_through_entry_point():
    q, k, v = _qkv(b=1, h=2, hk=1, lq=5, lk=6, d=4, grad=True)
    bias = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v, b: sdpa(q, k, v, b, is_causal=True, enable_gqa=True, q_offset=1, backend="reference")
    assert torch.autograd.gradcheck(fn, (q, k, v, bias))


def test_dropout_keep_rate_and_unbiased_scale():
    q, k = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
    v = torch.ones(1, 2, 64, 8)  # each output element is then sum(keep * p) / (1 - p_drop)
    torch.manual_seed(1)
    out = sdpa(q, k, v, dropout_p=0.3, backend="reference")
    torch.manual_seed(1)
    again = sdpa(q, k, v, dropout_p=0.3, backend="reference")
    assert torch.equal(out, again)  # same seed, same result
    assert abs(out.mean().item() - 1.0) < 0.05  # unbiased: E[out] = 1
    assert out.std().item() > 0.05  # something was dropped


def test_dropout_backward_replays_the_forward_mask():
    q, k, v = _qkv(b=1, h=2, hk=2, lq=6, lk=7, d=4, grad=True)
    fn = lambda q, k, v: sdpa(q, k, v, dropout_p=0.4, backend="reference")
    torch.manual_seed(3)
    out = fn(q, k, v)
    grads = torch.autograd.grad(out.sum(), [q, k, v])
    # The same draw, made explicit: the oracle with the keep-mask of the call's seed (the shared contract).
    from fastattn.backends._philox import keep_mask, philox_seed_offset

    torch.manual_seed(3)
    keep = keep_mask(philox_seed_offset("cpu"), 1, 2, 6, 7, 0.4)
    expected = reference.attention(q, k, v, keep_mask=keep, dropout_p=0.4)
    torch.testing.assert_close(out, expected)
    for a, e in zip(grads, torch.autograd.grad(expected.sum(), [q, k, v])):
        torch.testing.assert_close(a, e)


def _params(device="cpu"):
    q, k, v = _qkv(dtype=torch.float32)
    params, *_ = validate(q, k, v)
    return params


def test_auto_order_follows_the_documented_precedence(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FASTATTN_CUDA_EMULATE", raising=False)
    assert registry._auto_order(torch.device("cpu")) == ["cpu", "reference"]
    monkeypatch.setenv("FASTATTN_CUDA_EMULATE", "1")
    assert registry._auto_order(torch.device("cpu")) == ["cuda", "cpu", "reference"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert registry._auto_order(torch.device("cpu")) == ["triton", "cuda", "cpu", "reference"]
    assert registry._auto_order(torch.device("cuda")) == ["cuda", "triton", "reference"]


def test_env_backend_overrides_auto_and_is_validated(monkeypatch):
    params = _params()
    monkeypatch.setenv("FASTATTN_BACKEND", "reference")
    assert registry.choose(None, params).name == "reference"
    monkeypatch.setenv("FASTATTN_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend: expected one of"):
        registry.choose("auto", params)


def test_auto_skips_a_backend_that_refuses(monkeypatch):
    class Refuses(registry.Backend):
        name = "refuses-test"

        def unsupported_reason(self, params):
            return "never"

    monkeypatch.delenv("FASTATTN_BACKEND", raising=False)
    monkeypatch.setattr(registry, "_auto_order", lambda device: ["refuses-test", "reference"])
    registry.register(Refuses())
    try:
        assert registry.choose(None, _params()).name == "reference"
    finally:
        registry._REGISTRY.pop("refuses-test")


def test_torch_compile_fullgraph_forward_and_backward():
    q, k, v = _qkv(dtype=torch.float32, grad=True)
    bias = torch.randn(9, 13, requires_grad=True)

    def fn(q, k, v, bias):
        return sdpa(q, k, v, bias, is_causal=True, window=(4, -1), backend="reference")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, bias)
    expected = fn(q, k, v, bias)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.sum(), [q, k, v, bias])
    for a, e in zip(grads, torch.autograd.grad(expected.sum(), [q, k, v, bias])):
        torch.testing.assert_close(a, e)


def test_opcheck_reference_ops():
    q, k, v = _qkv(dtype=torch.float32, lq=7, lk=11)
    mask = torch.randn(2, 4, 7, 11)
    philox = torch.tensor([123, 456], dtype=torch.int64)
    alibi, sinks = torch.rand(1, 4), torch.randn(4)
    cases = ((None, None, None, None, 0.0, 0, 0.0), (mask, alibi, sinks, philox, 0.2, 5, 3.0))
    for mask_arg, alibi_arg, sinks_arg, philox_arg, p, chunk, softcap in cases:
        scalars = (0.25, p, [3.0, 0.0, 2.0, float(chunk), softcap], [])
        fwd_args = (q, k, v, mask_arg, alibi_arg, sinks_arg, [], philox_arg, *scalars)
        torch.library.opcheck(torch.ops.fastattn.reference_fwd.default, fwd_args)
        out, lse = torch.ops.fastattn.reference_fwd(*fwd_args)
        grad_out = torch.randn(2, 4, 7, 16)
        for need_mask_grad in (False, mask_arg is not None):
            torch.library.opcheck(
                torch.ops.fastattn.reference_bwd.default,
                (grad_out, q, k, v, out, lse, mask_arg, alibi_arg, [], philox_arg, *scalars, need_mask_grad),
            )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reference_backend_low_precision_within_tolerance(dtype):
    q, k, v = (t.to(dtype) for t in _qkv(lq=65, lk=129, d=32, dtype=torch.float32))
    expected = reference.attention(q.double(), k.double(), v.double(), is_causal=True)
    baseline = reference.attention(q, k, v, is_causal=True, compute_dtype=dtype)
    out = sdpa(q, k, v, is_causal=True, backend="reference")
    assert out.dtype == dtype
    assert_close(out, expected, baseline, factor=2, name="out")


def test_assert_close_reports_where_it_fails():
    expected = torch.zeros(3, 4, dtype=torch.float64)
    actual = expected.clone().float()
    actual[1, 2] = 0.5
    with pytest.raises(AssertionError, match=r"1 of 12 elements off .*\n  at \(1, 2\): got 0.5, expected 0"):
        assert_close(actual, expected)
    actual[1, 2] = float("nan")
    with pytest.raises(AssertionError, match="NaN pattern differs"):
        assert_close(actual, expected)


def test_import_does_not_pull_in_optional_packages():
    code = "import sys, fastattn; print(sorted(m for m in ('transformers', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_compile_backward_with_packed_qkv_views():
    """q, k, v as transposed views of one packed projection: the fake's strides must match the real op's."""
    x = torch.randn(2, 7, 48, requires_grad=True)

    def fn(x):
        # (B, L, 3·H·D) → three (B, H, L, D) views of the same storage.
        q, k, v = (t.unflatten(-1, (4, 4)).transpose(1, 2) for t in x.chunk(3, -1))
        return sdpa(q, k, v, is_causal=True, backend="reference")

    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    (expected,) = torch.autograd.grad(fn(x).sum(), x)
    torch.testing.assert_close(grad, expected)
