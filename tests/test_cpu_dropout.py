"""Dropout in the native CPU backend: the GPU backends' Philox contract, forward and backward.

Against the float64 oracle given the kernel's own keep-mask (``fastattn.backends.cpu.dropout_keep_mask``),
bit for bit against the Triton backend's mask (so one torch seed gives every backend the same dropout),
and statistically (keep fraction, the expectation of the output). Outputs and scratch are poisoned inside
the op (``FASTATTN_POISON=1``).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn._ext import unavailable_reason
from fastattn._validate import validate
from fastattn.backends import cpu as cpu_backend
from fastattn.backends._philox import philox_seed_offset
from fastattn.backends.registry import choose
from fastattn.testing import assert_close

pytestmark = pytest.mark.skipif(unavailable_reason("cpu") is not None, reason=str(unavailable_reason("cpu")))

sdpa = fastattn.scaled_dot_product_attention


@pytest.fixture(scope="module", autouse=True)
def _built():
    cpu_backend.load()
    old = os.environ.get("FASTATTN_POISON")
    os.environ["FASTATTN_POISON"] = "1"
    yield
    if old is None:
        os.environ.pop("FASTATTN_POISON", None)
    else:
        os.environ["FASTATTN_POISON"] = old


def _kernel_keep(seed: int, b: int, hq: int, lq: int, lk: int, p: float) -> torch.Tensor:
    """The keep-mask a forward run right after ``torch.manual_seed(seed)`` applies (its first draw is its philox)."""
    torch.manual_seed(seed)
    return cpu_backend.dropout_keep_mask(philox_seed_offset("cpu"), b, hq, lq, lk, p)


# (B, Hq, Hkv, Lq, Lk, D, dtype, p, mask kind)
CASES = [
    (2, 4, 2, 65, 129, 64, torch.float32, 0.2, "causal"),
    (1, 2, 2, 130, 300, 32, torch.float32, 0.5, "float"),
    (2, 2, 1, 17, 70, 64, torch.bfloat16, 0.1, "bool"),
    (1, 4, 4, 257, 257, 64, torch.bfloat16, 0.3, "none"),
    (1, 2, 2, 33, 33, 16, torch.float32, 0.9, "window"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_against_oracle_with_the_kernels_keep_mask(case):
    b, hq, hkv, lq, lk, d, dtype, p, kind = case
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(b, hq, lq, d, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(b, hkv, lk, d, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(b, hkv, lk, d, generator=gen).to(dtype).requires_grad_()
    kw = {"enable_gqa": hq != hkv, "dropout_p": p}
    if kind == "causal":
        kw.update(is_causal=True, q_offset=lk - lq)
    elif kind == "bool":
        kw["attn_mask"] = torch.rand(b, 1, lq, lk, generator=gen) < 0.7
    elif kind == "float":
        kw["attn_mask"] = torch.randn(1, hq, lq, lk, generator=gen).requires_grad_()
    elif kind == "window":
        kw["window"] = (5, 2)
    grad = torch.randn(b, hq, lq, d, generator=gen).to(dtype)

    torch.manual_seed(3)
    out = sdpa(q, k, v, backend="cpu", **kw)
    inputs = (q, k, v) + ((kw["attn_mask"],) if kind == "float" else ())
    got = torch.autograd.grad(out, inputs, grad)
    keep = _kernel_keep(3, b, hq, lq, lk, p)
    assert 0 < keep.sum() < keep.numel()

    def oracle(compute_dtype, cast):
        ins = [cast(t).detach().requires_grad_() for t in inputs]
        kw_o = dict(kw)
        if kind == "float":
            kw_o["attn_mask"] = ins[3]
        o = reference.attention(*ins[:3], keep_mask=keep, compute_dtype=compute_dtype, **kw_o)
        return (o, *torch.autograd.grad(o, ins, grad.to(o.dtype)))

    truth = oracle(torch.float64, lambda t: t.double())
    base = oracle(dtype, lambda t: t) if dtype != torch.float32 else [None] * len(truth)
    for name, g, t, bl, factor in zip(("out", "dq", "dk", "dv", "dmask"), (out, *got), truth, base, (2, 3, 3, 3, 3)):
        assert_close(g, t, bl, factor=factor, name=name)
    # Not vacuous: the same call without dropout is far from it.
    plain = reference.attention(*(t.detach().double() for t in inputs[:3]), **{**kw, "dropout_p": 0.0})
    assert (plain - truth[0]).abs().max() > 0.05


def test_same_seed_same_result_and_backward_replays_the_forward():
    q, k, v = (torch.randn(1, 2, 100, 32, requires_grad=True) for _ in range(3))
    results = []
    for _ in range(2):
        torch.manual_seed(42)
        out = sdpa(q, k, v, dropout_p=0.25, backend="cpu")
        results.append((out, *torch.autograd.grad(out.sum(), (q, k, v))))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    torch.manual_seed(43)
    assert not torch.equal(sdpa(q, k, v, dropout_p=0.25, backend="cpu"), results[0][0])


def test_keep_fraction_and_independence():
    p = 0.3
    philox = torch.tensor([0x1234_5678_9ABC, 77], dtype=torch.int64)
    keep = cpu_backend.dropout_keep_mask(philox, 4, 8, 256, 256, p)
    n = keep.numel()
    frac_dropped = 1.0 - keep.float().mean().item()
    assert abs(frac_dropped - p) < 6 * (p * (1 - p) / n) ** 0.5, frac_dropped
    # Rows, heads and batches draw different numbers; another offset gives another mask.
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])
    other = cpu_backend.dropout_keep_mask(torch.tensor([0x1234_5678_9ABC, 78]), 4, 8, 256, 256, p)
    assert (other != keep).float().mean().item() > 0.3
    # Neighbouring elements are uncorrelated: P(both dropped) is p².
    both = (~keep[..., :-1] & ~keep[..., 1:]).float().mean().item()
    assert abs(both - p * p) < 0.005, both


def test_output_expectation_is_the_undropped_output():
    """Inverted dropout is unbiased: the mean over many seeds converges to attention without dropout."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, 8, 16, generator=gen) for _ in range(3))
    draws = 3000
    outs = torch.stack([sdpa(q, k, v, dropout_p=0.4, backend="cpu") for _ in range(draws)]).double()
    want = reference.attention(q.double(), k.double(), v.double())
    stderr = outs.std(0) / draws**0.5
    assert ((outs.mean(0) - want).abs() <= 5 * stderr + 1e-6).all(), ((outs.mean(0) - want).abs() / stderr).max()


def test_automatic_choice_takes_cpu_for_dropout(monkeypatch):
    for var in ("TRITON_INTERPRET", "FASTATTN_CUDA_EMULATE", "FASTATTN_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    q = torch.randn(1, 2, 8, 16)
    params, *_ = validate(q, q, q, dropout_p=0.1)
    assert choose(None, params).name == "cpu"


def test_bad_philox_names_what_was_expected():
    q = torch.randn(1, 1, 8, 16)

    def fwd(philox, p):
        args = (q, q, q, None, None, None, [], philox, 1.0, p, [-1.0, -1.0, 0.0, 0.0, 0.0], [64, 64])
        return torch.ops.fastattn.cpu_attn_fwd(*args)

    with pytest.raises(RuntimeError, match=r"philox: expected the int64 \[seed, offset\] tensor when dropout_p > 0"):
        fwd(None, 0.1)
    with pytest.raises(RuntimeError, match="philox: expected a CPU int64 tensor of 2 elements"):
        fwd(torch.zeros(3).long(), 0.1)
    with pytest.raises(RuntimeError, match="dropout_p: expected 0 <= p < 1, got 1"):
        fwd(torch.zeros(2).long(), 1.0)


def test_opcheck_with_dropout():
    q, k, v = (torch.randn(1, 2, 40, 32) for _ in range(3))
    philox = torch.tensor([5, 6], dtype=torch.int64)
    scalars = (32**-0.5, 0.2, [-1.0, 0.0, 0.0, 0.0, 0.0], [64, 64])
    args = (q, k, v, None, None, None, [], philox, *scalars)
    torch.library.opcheck(torch.ops.fastattn.cpu_attn_fwd.default, args)
    out, lse = torch.ops.fastattn.cpu_attn_fwd(*args)
    bwd = (torch.randn_like(out), q, k, v, out, lse, None, None, [], philox, *scalars, False)
    torch.library.opcheck(torch.ops.fastattn.cpu_attn_bwd.default, bwd)
    torch.library.opcheck(torch.ops.fastattn.cpu_dropout_keep_mask.default, (philox, 1, 2, 40, 40, 0.2))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton interpreter runs it on CPU tensors")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_and_triton_agree_from_one_torch_seed(dtype):
    """One contract: the same seed gives the CPU and Triton backends the same keep-mask bit for bit, hence the
    same outputs and gradients (up to rounding), each matching the oracle given that mask."""
    from fastattn.backends.triton.dropout import dropout_keep_mask as triton_keep

    philox = torch.tensor([987_654_321_987, 123_456], dtype=torch.int64)
    assert torch.equal(
        cpu_backend.dropout_keep_mask(philox, 2, 3, 19, 45, 0.35), triton_keep(philox, 2, 3, 19, 45, 0.35)
    )

    p = 0.3
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 37, 32, generator=gen).to(dtype)
    k, v = (torch.randn(1, 2, 45, 32, generator=gen).to(dtype) for _ in range(2))
    kw = dict(attn_mask=(torch.arange(45) < 40).view(1, 1, 1, 45), is_causal=True, q_offset=8, enable_gqa=True)
    grad = torch.randn(1, 4, 37, 32, generator=gen).to(dtype)

    def run(backend, compute_dtype=None, cast=lambda t: t):
        ins = [cast(t).detach().requires_grad_() for t in (q, k, v)]
        if backend == "oracle":
            out = reference.attention(*ins, keep_mask=_kernel_keep(9, 1, 4, 37, 45, p), dropout_p=p,
                                      compute_dtype=compute_dtype, **kw)  # fmt: skip
        else:
            torch.manual_seed(9)
            out = sdpa(*ins, dropout_p=p, backend=backend, **kw)
        return (out, *torch.autograd.grad(out, ins, grad.to(out.dtype)))

    truth = run("oracle", cast=lambda t: t.double())
    base = run("oracle", compute_dtype=dtype) if dtype != torch.float32 else [None] * 4
    got = {name: run(name) for name in ("cpu", "triton")}
    for name, results in got.items():
        for label, g, t, b, factor in zip(("out", "dq", "dk", "dv"), results, truth, base, (2, 3, 3, 3)):
            assert_close(g, t, b, factor=factor, name=f"{name} {label}")
