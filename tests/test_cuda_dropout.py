"""Dropout in the CUDA backend (csrc/cuda/dropout.cuh), run on CPU tensors by the emulator.

The contract is the Triton backend's (``fastattn/backends/triton/dropout.py``): the keep-mask of a philox
``[seed, offset]`` is Triton's ``tl.rand`` stream, so the reference keep-mask here is always Triton's own
``dropout_keep_mask`` (under ``TRITON_INTERPRET=1``, set by conftest). Checked:

* the CUDA keep-mask equals Triton's bit for bit (the mask op, and the masks the three attention kernels
  actually apply, read back from probe inputs);
* forward output and lse, and the three gradients (plus a float mask's), against the float64 oracle given
  that keep-mask, with the 2x / 3x-of-PyTorch tolerance;
* reproducibility, keep rate and unbiased scaling, the entry point with autograd, opcheck.

``FASTATTN_CUDA_EMULATE=1`` is set for this module only (a fixture). Shapes stay small (the emulator runs a
fiber per GPU thread); the larger product is under ``@pytest.mark.full``.
"""

from __future__ import annotations

import math

import pytest
import torch
from _cuda_support import bwd_args, emulate, fwd_args, params_for  # noqa: F401

import fastattn
from fastattn import _ext
from fastattn import reference as oracle
from fastattn._validate import validate
from fastattn.backends import cuda as cuda_fwd
from fastattn.backends._philox import philox_seed_offset
from fastattn.testing import assert_close, random_qkv

pytestmark = pytest.mark.skipif(
    _ext.unavailable_reason("cuda_emulate") is not None, reason=str(_ext.unavailable_reason("cuda_emulate"))
)

triton_dropout = pytest.importorskip("fastattn.backends.triton.dropout", reason="triton is not installed")


def _philox(seed: int, offset: int) -> torch.Tensor:
    return torch.tensor([seed, offset], dtype=torch.int64)


def _triton_keep(philox, b, hq, lq, lk, p):
    return triton_dropout.dropout_keep_mask(philox, b, hq, lq, lk, p)


# (b, hq, lq, lk, p, offset): odd lengths 1, 17, 65; offsets low, just below 2**32 (the counter's high word
# changes inside the call) and near 2**62 (the largest philox_seed_offset draws).
MASK_CASES = [
    (1, 1, 1, 1, 0.5, 3),
    (2, 3, 17, 65, 0.3, 2**32 - 1500),
    (1, 2, 65, 17, 0.1, 2**62 - 12345),
    (2, 1, 65, 65, 0.9, 2**32 - 4000),
    (1, 4, 1, 130, 0.25, 12345),
]


@pytest.mark.parametrize("b, hq, lq, lk, p, offset", MASK_CASES)
def test_keep_mask_is_tritons_bit_for_bit(b, hq, lq, lk, p, offset):
    philox = _philox(int(torch.randint(0, 2**62, ()).item()), offset)
    raw = torch.ops.fastattn.cuda_dropout_keep_mask(philox, b, hq, lq, lk, p)
    assert raw.dtype == torch.uint8 and raw.shape == (b, hq, lq, lk)
    assert ((raw == 0) | (raw == 1)).all(), "an element the kernel did not write (poisoned 0xFF) or a bad value"
    ours, theirs = raw.bool(), _triton_keep(philox, b, hq, lq, lk, p)
    mismatch = ours != theirs
    assert not mismatch.any(), f"{int(mismatch.sum())} of {ours.numel()} keep decisions differ from Triton's"
    assert torch.equal(cuda_fwd.dropout_keep_mask(philox, b, hq, lq, lk, p), theirs)
    if ours.numel() > 100:
        assert ours.any() and not ours.all()


def test_keep_mask_high_counter_word_matters():
    """Offset 2**32 - 700: the call's element indices straddle 2**32. Moving the offset by exactly 2**32 changes
    only the counter's high word; a generator that dropped it would give the same mask."""
    b, hq, lq, lk, p = 1, 2, 17, 65, 0.5
    seed = 987654321987
    low = _philox(seed, 2**32 - 700)
    assert low[1] < 2**32 <= low[1] + b * hq * lq * lk - 1  # non-vacuous: both halves are in this call
    a = cuda_fwd.dropout_keep_mask(low, b, hq, lq, lk, p)
    shifted = cuda_fwd.dropout_keep_mask(_philox(seed, 2**33 - 700), b, hq, lq, lk, p)
    assert torch.equal(a, _triton_keep(low, b, hq, lq, lk, p))
    assert (a != shifted).float().mean() > 0.3  # independent streams disagree on about half
    other_seed = cuda_fwd.dropout_keep_mask(_philox(seed + 2**32, 2**32 - 700), b, hq, lq, lk, p)
    assert (a != other_seed).float().mean() > 0.3  # the seed's high word is in the key


def test_keep_mask_argument_errors():
    philox = _philox(1, 2)
    with pytest.raises(RuntimeError, match=r"argument 'philox' must have dtype torch.int64, got torch.int32"):
        torch.ops.fastattn.cuda_dropout_keep_mask(philox.int(), 1, 1, 4, 4, 0.5)
    with pytest.raises(RuntimeError, match=r"argument 'philox' must have shape \(2,\) \(\[seed, offset\]\), got \[3\]"):
        torch.ops.fastattn.cuda_dropout_keep_mask(torch.zeros(3, dtype=torch.int64), 1, 1, 4, 4, 0.5)
    with pytest.raises(RuntimeError, match=r"argument 'dropout_p' must be in \(0, 1\), got 0"):
        torch.ops.fastattn.cuda_dropout_keep_mask(philox, 1, 1, 4, 4, 0.0)
    q = torch.randn(1, 1, 8, 64, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"dropout_p > 0 needs argument 'philox'.*got None"):
        torch.ops.fastattn.cuda_attn_fwd(*fwd_args(q, q, q, dropout_p=0.5))
    with pytest.raises(RuntimeError, match=r"argument 'dropout_p' must be in \[0, 1\), got 1"):
        torch.ops.fastattn.cuda_attn_fwd(*fwd_args(q, q, q, philox=philox, dropout_p=1.0))
    with pytest.raises(ValueError, match=r"philox: expected the \[seed, offset\] int64 tensor"):
        cuda_fwd.attn_fwd(q, q, q, params_for(8, 8, heads=1, dropout_p=0.5), None)


# ---- the masks the kernels apply, read back from probe inputs --------------------------------------------
#
# Probe: every key row equal (k_j = k_0), so each query's scores are constant and P = 1/Lk exactly where
# attended. Forward with V = identity columns (Lk <= D): out[i, j] = keep_ij / (Lk (1 - p)), nonzero iff
# kept. Backward with dO = identity rows (Lq <= D), V = ones (dP = 1) and out = 0 (delta = 0): the dQ pass's
# dS = P·Z (written out as a zero float mask's gradient) and the dK/dV pass's dV[j, i] = P_ij·Z_ij, each
# nonzero iff kept. Rows and columns of the lanes, GQA's query-head index and the counter all show.

PROBE_CASES = [  # (b, hq, hkv, lq, lk, d, dtype, offset)
    (2, 4, 2, 17, 65, 128, torch.float16, 2**32 - 3000),
    (1, 2, 2, 65, 17, 64, torch.bfloat16, 2**62 - 999),
    (1, 1, 1, 1, 1, 32, torch.float16, 77),
    (1, 2, 1, 65, 130, 96, torch.bfloat16, 5),
]


def _probe_inputs(b, hq, hkv, lq, lk, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, 1, d, generator=gen).to(dtype).expand(b, hkv, lk, d).contiguous()
    return q, k


@pytest.mark.parametrize("b, hq, hkv, lq, lk, d, dtype, offset", PROBE_CASES)
def test_kernels_apply_tritons_mask(b, hq, hkv, lq, lk, d, dtype, offset):
    p = 0.4
    philox = _philox(int(torch.randint(0, 2**62, ()).item()), offset)
    keep = _triton_keep(philox, b, hq, lq, lk, p)
    q, k = _probe_inputs(b, hq, hkv, lq, lk, d, dtype, seed=lq + lk)
    scale = 1.0 / math.sqrt(d)
    if lk <= d:
        v = torch.eye(lk, d).to(dtype).expand(b, hkv, lk, d).contiguous()
        params = fastattn.AttnParams.for_tensors(q, k, v, scale, dropout_p=p)
        out, lse = cuda_fwd.attn_fwd(q, k, v, params, philox)
        assert torch.equal(out[..., :lk] != 0, keep), "forward: the applied mask is not Triton's"
        assert (out[..., lk:] == 0).all()
        plain = params.replace(dropout_p=0.0)
        assert_close(lse, oracle.attention_forward(q.double(), k.double(), v.double(), plain)[1], name="lse")
    if lq <= d:
        # The backward's probe: a zero float mask asks the dQ pass for dS; no GQA in dV (it sums the group).
        hkv_b = hq
        k_b = k[:, :1].expand(b, hkv_b, lk, d).contiguous()
        v = torch.ones(b, hkv_b, lk, d).to(dtype)
        grad_out = torch.eye(lq, d).to(dtype).expand(b, hq, lq, d).contiguous()
        out = torch.zeros(b, hq, lq, d).to(dtype)
        plain = fastattn.AttnParams.for_tensors(q, k_b, v, scale)
        lse = oracle.attention_forward(q, k_b, v, plain)[1]  # score + log(Lk): P = 1 / Lk up to rounding
        zero_bias = torch.zeros(1, 1, lq, lk).to(dtype)
        spec_b = plain.replace(mask=zero_bias.expand(b, hq, lq, lk), mask_base=zero_bias, dropout_p=p)
        dq, dk, dv, dmask = cuda_fwd.attn_bwd(grad_out, q, k_b, v, out, lse, spec_b, philox, True)
        assert torch.equal(dmask != 0, keep), "dQ pass: the applied mask is not Triton's"
        assert torch.equal(dv[..., :lq].transpose(-1, -2) != 0, keep), "dK/dV pass: the applied mask is not Triton's"
        assert (dv[..., lq:] == 0).all()


# ---- values against the oracle given Triton's keep-mask --------------------------------------------------


def _setup(b, hq, hkv, lq, lk, d, dtype, kind, seed):
    """Inputs, params and scale of one case: "causal_pad" (causal with key padding), "window", "float"."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = random_qkv(b, hq, hkv, lq, lk, d, d, dtype, generator=gen)
    mask, causal, window, q_offset = None, False, None, 0
    if kind == "causal_pad":
        keep = torch.randint(lk // 2 + 1, lk + 1, (b,), generator=gen)
        mask = (torch.arange(lk).view(1, lk) < keep.view(b, 1)).view(b, 1, 1, lk)
        causal, q_offset = True, lk - lq
    elif kind == "window":
        window = (9, 5)
    elif kind == "float":
        bias = torch.randn(1, hq, lq, lk, generator=gen)
        bias[torch.rand(1, hq, lq, lk, generator=gen) < 0.1] = float("-inf")
        bias[..., 0] = 0.0
        mask = bias.to(dtype)
        # Causal with q_offset 4: every row sees at least 5 keys. A row that sees one key has dS = P·(dP·Z − delta)
        # = 0 exactly, and what a kernel returns there is O's fp16 rounding (through delta = rowsum(dO∘O)) times
        # Z: at p = 0.6 that exceeded the 2e-3 floor (the kernel matched the float64 oracle given its own O to
        # 1e-6); the check against that oracle below covers such rows in "causal_pad" (Lq > Lk).
        causal, q_offset = True, 4
    params, q, k, v = validate(q, k, v, mask, 0.1, causal, None, hq != hkv, window, q_offset)
    return q, k, v, params, params.scale


# (b, hq, hkv, lq, lk, d, dtype, kind, p): fp16 and bf16, GQA, causal + padding, every backward head dim.
VALUE_CASES = [
    (2, 4, 2, 33, 65, 64, torch.float16, "causal_pad", 0.2),
    (1, 2, 1, 65, 40, 128, torch.bfloat16, "causal_pad", 0.5),
    (1, 2, 2, 17, 130, 32, torch.bfloat16, "window", 0.1),
    (1, 3, 1, 65, 65, 96, torch.float16, "float", 0.3),
]


@pytest.mark.parametrize("b, hq, hkv, lq, lk, d, dtype, kind, p", VALUE_CASES)
def test_forward_and_grads_match_oracle_with_the_keep_mask(b, hq, hkv, lq, lk, d, dtype, kind, p):
    q, k, v, params, scale = _setup(b, hq, hkv, lq, lk, d, dtype, kind, seed=lq * 7 + lk + d)
    params = params.replace(dropout_p=p)
    philox = philox_seed_offset("cpu")
    out, lse = cuda_fwd.CudaBackend().forward(q, k, v, params, philox)
    keep = _triton_keep(philox, b, hq, lq, lk, p)
    assert keep.any() and not keep.all()
    ref, ref_lse = oracle.attention_forward(q.double(), k.double(), v.double(), params, keep)
    base = oracle.attention_forward(q, k, v, params, keep, compute_dtype=dtype)[0]
    base_lse = oracle.attention_forward(q.float(), k.float(), v.float(), params.replace(dropout_p=0.0))[1]
    assert_close(out, ref, base, factor=2)
    assert_close(lse, ref_lse, base_lse, factor=2, name="lse")  # never includes dropout

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(lq)).to(dtype)
    need_mask_grad = kind == "float"
    dq, dk, dv, dmask = cuda_fwd.attn_bwd(grad_out, q, k, v, out, lse, params, philox, need_mask_grad)
    truth = oracle.attention_backward(*(t.double() for t in (grad_out, q, k, v)), params, keep)
    # The baseline gets the kernels' inputs: the same (checked above) out and lse, delta = rowsum(dO∘O) from
    # it. Where a row attends one key, dS = P·(dP·Z − delta) cancels to 0 and what is left is O's rounding
    # (times Z): both must see the same O for "3x PyTorch's own error" to mean anything there.
    bl = oracle.attention_backward(grad_out, q, k, v, params, keep.to(dtype), compute_dtype=dtype, out=out, lse=lse)
    names = ("dq", "dk", "dv", "dmask")
    got = (dq, dk, dv, dmask) if need_mask_grad else (dq, dk, dv)
    for name, g, t, bb in zip(names, got, truth, bl):
        assert_close(g, t, bb, factor=3, name=name)
    # The backward alone: against the float64 oracle given the same out and lse (well conditioned everywhere).
    given = oracle.attention_backward(
        *(t.double() for t in (grad_out, q, k, v)), params, keep, out=out.double(), lse=lse.double()
    )
    for name, g, t, bb in zip(names, got, given, bl):
        assert_close(g, t, bb, factor=3, name=f"{name} (given out, lse)")
    # Without the mask (or with another seed) the gradients are clearly different: the mask is not a no-op.
    plain = oracle.attention_backward(*(t.double() for t in (grad_out, q, k, v)), params.replace(dropout_p=0.0))
    assert (dv.double() - plain[2]).abs().max() > 10 * (dv.double() - truth[2]).abs().max()


@pytest.mark.full
@pytest.mark.parametrize("d", cuda_fwd.HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["causal_pad", "window", "float"])
@pytest.mark.parametrize("lq, lk", [(1, 17), (65, 129), (129, 65)])
@pytest.mark.parametrize("p", [0.1, 0.6])
def test_forward_and_grads_match_oracle_full(d, dtype, kind, lq, lk, p):
    test_forward_and_grads_match_oracle_with_the_keep_mask(2, 4, 2, lq, lk, d, dtype, kind, p)


def test_forward_head_dim_256_and_reference_backward_fallback(monkeypatch):
    """Head dim 256 in the CUDA forward; the backward made to fall back (as the registry does where a backend's
    backward cannot run) to another backend on CPU tensors: it gets the call's dropout seed and applies
    the shared contract's keep-mask. Gradients match the oracle given Triton's mask."""
    from fastattn.backends import get

    b, hq, hkv, lq, lk, d, dtype, p = 1, 2, 1, 17, 40, 256, torch.float16, 0.3
    q, k, v, params, scale = _setup(b, hq, hkv, lq, lk, d, dtype, "causal_pad", seed=3)
    params = params.replace(dropout_p=p)
    monkeypatch.setattr(cuda_fwd.CudaBackend, "backward_reason", lambda self, params: "forced by this test")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the fallback: first able in cuda, cpu, reference
    seen = []
    # The fallback is the first able of cpu (float16 since the per-ISA kernels) and reference: either must get
    # the call's seed.
    for name in ("cpu", "reference"):
        backend_type = type(get(name))
        real_backward = backend_type.backward

        def spy(self, *args, _real=real_backward):
            seen.append(args[7])  # philox
            return _real(self, *args)

        monkeypatch.setattr(backend_type, "backward", spy)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(11)
    kw = dict(attn_mask=params.mask, is_causal=True, q_offset=params.q_offset, enable_gqa=True, dropout_p=p)
    out = fastattn.scaled_dot_product_attention(*leaves, backend="cuda", **kw)
    grad_out = torch.randn(out.shape).to(dtype)
    out.backward(grad_out)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton's keep-mask below runs under the interpreter again
    torch.manual_seed(11)
    philox = philox_seed_offset("cpu")
    keep = _triton_keep(philox, b, hq, lq, lk, p)
    assert len(seen) == 1 and torch.equal(seen[0], philox)
    ref = oracle.attention_forward(q.double(), k.double(), v.double(), params, keep)[0]
    assert_close(out, ref, oracle.attention_forward(q, k, v, params, keep, compute_dtype=dtype)[0])
    truth = oracle.attention_backward(*(t.double() for t in (grad_out, q, k, v)), params, keep)
    bl = oracle.attention_backward(grad_out, q, k, v, params, keep.to(dtype), compute_dtype=dtype)
    for name, leaf, t, bb in zip(("dq", "dk", "dv"), leaves, truth, bl):
        assert_close(leaf.grad, t, bb, factor=3, name=name)


# ---- reproducibility, statistics, the entry point --------------------------------------------------------


def test_same_seed_same_bits_other_seed_differs(monkeypatch):
    """One philox -> bit-identical out, lse and gradients (in any fiber order); another seed -> other results."""
    q, k, v, params, scale = _setup(1, 4, 2, 65, 65, 64, torch.bfloat16, "causal_pad", seed=5)
    grad_out = torch.randn(q.shape).to(q.dtype)
    params = params.replace(dropout_p=0.3)

    def run(philox):
        out, lse = cuda_fwd.attn_fwd(q, k, v, params, philox)
        grads = cuda_fwd.attn_bwd(grad_out, q, k, v, out, lse, params, philox, False)[:3]
        return (out, lse, *grads)

    first = run(_philox(42, 1000))
    monkeypatch.setenv("FASTATTN_EMULATE_ORDER", "random:3")
    again = run(_philox(42, 1000))
    for a, c in zip(first, again):
        assert torch.equal(a, c)
    monkeypatch.delenv("FASTATTN_EMULATE_ORDER")
    other = run(_philox(43, 1000))
    assert torch.equal(first[1], other[1])  # lse excludes dropout
    for a, c in zip((first[0], *first[2:]), (other[0], *other[2:])):
        assert not torch.equal(a, c)
    shifted = run(_philox(42, 1001))  # the offset moves the stream too
    assert not torch.equal(first[0], shifted[0])


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate(p):
    """Over 2**19 draws the keep rate is 1 - p within 8 standard deviations (sd = sqrt(p (1-p) / n))."""
    b, hq, lq, lk = 2, 4, 256, 256
    keep = cuda_fwd.dropout_keep_mask(philox_seed_offset("cpu"), b, hq, lq, lk, p)
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 8 * math.sqrt(p * (1 - p) / n)
    # No structure along rows or columns: every row's and column's rate is plausible too.
    rows = keep.float().mean(-1)
    assert (rows - (1 - p)).abs().max() < 8 * math.sqrt(p * (1 - p) / lk) + 1e-6


def test_dropout_is_unbiased():
    """V = ones: each output is sum_j P_ij Z_ij with E = 1 (Z = keep / (1 - p)); the mean over 2 x 256 rows is 1
    within 5 standard errors, while the rows themselves vary (something is dropped)."""
    p = 0.4
    q, k, _ = random_qkv(1, 2, 2, 256, 256, 32, dtype=torch.float16)
    v = torch.ones(1, 2, 256, 32, dtype=torch.float16)
    params = fastattn.AttnParams.for_tensors(q, k, v, 32**-0.5, dropout_p=p)
    out, _ = cuda_fwd.attn_fwd(q, k, v, params, philox_seed_offset("cpu"))
    rows = out[..., 0].double().flatten()
    assert torch.equal(out, out[..., :1].expand_as(out))  # V's columns are equal, so are out's
    assert rows.std() > 0.01
    assert abs(rows.mean().item() - 1.0) < 5 * rows.std().item() / math.sqrt(rows.numel())


def test_entry_point_autograd_runs_the_cuda_kernels(monkeypatch):
    """sdpa(dropout_p=..., backend="cuda") with autograd: the CUDA forward and backward run (no fallback), the
    keep-mask is the one ``torch.manual_seed`` reproduces, and everything matches the oracle with it."""
    from fastattn.backends.cuda import CudaBackend

    calls = []
    real = cuda_fwd.attn_bwd

    def spy(*args):
        calls.append(args[6].dropout_p)
        return real(*args)

    monkeypatch.setattr(cuda_fwd, "attn_bwd", spy)
    assert CudaBackend().backward_reason(None) is None
    b, hq, hkv, lq, lk, d, dtype, p = 2, 4, 2, 33, 47, 64, torch.float16, 0.25
    q, k, v, params, scale = _setup(b, hq, hkv, lq, lk, d, dtype, "causal_pad", seed=8)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    kw = dict(attn_mask=params.mask, is_causal=True, q_offset=params.q_offset, enable_gqa=True, dropout_p=p)
    torch.manual_seed(21)
    out = fastattn.scaled_dot_product_attention(*leaves, backend="cuda", **kw)
    grad_out = torch.randn(out.shape).to(dtype)
    out.backward(grad_out)
    assert calls == [p]
    torch.manual_seed(21)
    keep = _triton_keep(philox_seed_offset("cpu"), b, hq, lq, lk, p)
    ref = oracle.attention(q.double(), k.double(), v.double(), keep_mask=keep, **kw)
    assert_close(out, ref, oracle.attention(q, k, v, keep_mask=keep, compute_dtype=dtype, **kw))
    params = params.replace(dropout_p=p)
    truth = oracle.attention_backward(*(t.double() for t in (grad_out, q, k, v)), params, keep)
    bl = oracle.attention_backward(grad_out, q, k, v, params, keep.to(dtype), compute_dtype=dtype)
    for name, leaf, t, bb in zip(("dq", "dk", "dv"), leaves, truth, bl):
        assert_close(leaf.grad, t, bb, factor=3, name=name)
    # A fresh call draws a fresh seed: another mask.
    again = fastattn.scaled_dot_product_attention(q, k, v, backend="cuda", **kw)
    assert not torch.equal(again, out.detach())


def test_auto_choice_takes_cuda_with_dropout(monkeypatch):
    """With the emulator on and Triton's interpreter off, the automatic choice now runs dropout on "cuda"."""
    from fastattn.backends import registry

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FASTATTN_BACKEND", raising=False)
    q, k, v = random_qkv(1, 2, 2, 9, 9, 64, dtype=torch.bfloat16)
    params, *_ = validate(q, k, v, None, 0.2, False, None, False, None, 0)
    assert registry.choose(None, params).name == "cuda"


def test_opcheck_with_dropout():
    q, k, v, params, scale = _setup(1, 2, 1, 17, 33, 32, torch.float16, "causal_pad", seed=13)
    philox = _philox(7, 2**32 - 100)
    left, right = params.bounds
    s = params.tile_summary(cuda_fwd.BLOCK_M, cuda_fwd.block_n(32))
    kw = dict(philox=philox, scale=scale, dropout_p=0.3, left=left, right=right, q_offset=params.q_offset)
    fwd = fwd_args(q, k, v, params.mask, (s.state, s.kv_count, s.kv_index), **kw)
    torch.library.opcheck(torch.ops.fastattn.cuda_attn_fwd.default, fwd)
    out, lse = torch.ops.fastattn.cuda_attn_fwd(*fwd)
    grad_out = torch.randn(out.shape).to(q.dtype)
    bwd = bwd_args(grad_out, q, k, v, out, lse, params.mask, cuda_fwd.summaries(params), **kw)
    torch.library.opcheck(torch.ops.fastattn.cuda_attn_bwd.default, bwd)
    torch.library.opcheck(torch.ops.fastattn.cuda_dropout_keep_mask.default, (philox, 2, 3, 17, 33, 0.3))


def test_torch_compile_fullgraph_with_dropout():
    """torch.compile(fullgraph=True) traces the dropout call (the seed drawn inside the graph) through both fakes."""
    q, k, v, params, scale = _setup(1, 2, 2, 17, 33, 64, torch.float16, "causal_pad", seed=14)
    q.requires_grad_()

    def f(q, k, v, mask):
        return fastattn.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=True, q_offset=params.q_offset, dropout_p=0.3, backend="cuda"
        )

    torch.manual_seed(4)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, params.mask)
    (dq,) = torch.autograd.grad(out.float().sum(), q)
    torch.manual_seed(4)
    eager = f(q, k, v, params.mask)
    (dq_eager,) = torch.autograd.grad(eager.float().sum(), q)
    assert torch.equal(out, eager) and torch.equal(dq, dq_eager)
