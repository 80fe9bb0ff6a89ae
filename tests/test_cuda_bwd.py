"""The CUDA backend's backward kernels (csrc/cuda/attn_bwd.cu) run on CPU tensors by the emulator.

``FASTATTN_CUDA_EMULATE=1`` is set for this module only (a fixture). The gradient matrix takes ``out``
and ``lse`` from the float64-capable oracle forward (the backward only depends on the lse format), so
it checks the backward alone; one case chains the CUDA forward op into it. The op poisons dq, dk, dv
(and dmask, the float mask's gradient) with NaN in the emulation build before the kernels write them, so
an element they miss fails the NaN check of ``assert_close``. Tolerance: 3x PyTorch's own low-precision
error (``fastattn.testing``).
The default run is a covering set (every mask kind, dtype, head dim, odd length and GQA appear); the
product is under ``@pytest.mark.full``.
"""

from __future__ import annotations

import pytest
import torch
from _cuda_support import bwd_args, emulate, sass_audit  # noqa: F401

from fastattn import _ext
from fastattn import reference as oracle
from fastattn._autograd import AttentionFunction
from fastattn._validate import validate
from fastattn.backends import cuda as cuda_fwd
from fastattn.backends.registry import Backend
from fastattn.testing import assert_close, random_qkv

pytestmark = pytest.mark.skipif(
    _ext.unavailable_reason("cuda_emulate") is not None, reason=str(_ext.unavailable_reason("cuda_emulate"))
)

KINDS = (
    "none", "causal", "bool", "key_padding", "float", "window", "causal_mask", "causal_padding", "q_offset",
    "window_offset",
)  # fmt: skip


def _setup(b, hq, hkv, lq, lk, d, dtype, kind, seed=0):
    """Inputs, params, scale, the oracle's ``out``/``lse`` and ``dO`` of one case (masks fresh, never all-True)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = random_qkv(b, hq, hkv, lq, lk, d, d, dtype, generator=gen)
    mask, causal, window, q_offset = None, False, None, 0
    if kind == "causal":
        causal = True
    elif kind == "bool":  # full (B, H, Lq, Lk), with a query row that attends nothing
        mask = torch.rand(b, hq, lq, lk, generator=gen) > 0.3
        mask[:, :, lq // 2, :] = False
    elif kind == "key_padding":  # (B, 1, 1, Lk) broadcast: each batch keeps a random prefix
        keep = torch.randint(1, lk + 1, (b,), generator=gen)
        mask = (torch.arange(lk).view(1, lk) < keep.view(b, 1)).view(b, 1, 1, lk)
    elif kind == "float":  # additive (1, H, Lq, Lk) with some -inf, in the inputs' dtype or fp32
        bias = torch.randn(1, hq, lq, lk, generator=gen) * 2
        bias[torch.rand(1, hq, lq, lk, generator=gen) < 0.2] = float("-inf")
        mask = bias.to(dtype if seed % 2 else torch.float32)
    elif kind == "window":
        window = (9, 5)
    elif kind == "causal_mask":  # causal plus an (Lq, Lk) bool mask broadcast over batch and heads
        causal, mask = True, torch.rand(lq, lk, generator=gen) > 0.25
    elif kind == "causal_padding":  # causal plus (B, 1, 1, Lk) key padding: the common case
        keep = torch.randint(lk // 2 + 1, lk + 1, (b,), generator=gen)
        causal, mask = True, (torch.arange(lk).view(1, lk) < keep.view(b, 1)).view(b, 1, 1, lk)
    elif kind == "q_offset":  # bottom-right causal shifted so that the first rows see nothing
        causal, q_offset = True, lk - lq - 2
    elif kind == "window_offset":
        window, q_offset = (20, 0), 7
    params, q, k, v = validate(q, k, v, mask, 0.0, causal, None, hq != hkv, window, q_offset)
    out, lse = oracle.attention_forward(q, k, v, params)
    grad_out = torch.randn(out.shape, generator=gen).to(dtype)
    return q, k, v, params, params.scale, out, lse, grad_out


def _check(q, k, v, params, scale, out, lse, grad_out):
    dq, dk, dv, dmask = cuda_fwd.attn_bwd(grad_out, q, k, v, out, lse, params, None, False)
    assert dmask is None
    truth = oracle.attention_backward(*(t.double() for t in (grad_out, q, k, v)), params)
    base = oracle.attention_backward(grad_out, q, k, v, params, compute_dtype=q.dtype)
    for name, got, ref, bl, like in zip(("dq", "dk", "dv"), (dq, dk, dv), truth, base, (q, k, v)):
        assert got.dtype == q.dtype and got.shape == like.shape, name
        assert_close(got, ref, bl, factor=3, name=name)
    empty = torch.isinf(lse) & (lse < 0)  # rows that attend nothing: exactly zero dq
    if empty.any():
        assert (dq[empty] == 0).all()
    return dq, dk, dv


# (b, hq, hkv, lq, lk, d, dtype, kind): every kind, dtype, head dim and the lengths 1, 17, 65, 129, 1030.
CASES = [
    (2, 2, 2, 17, 17, 64, torch.float16, "none"),
    (1, 4, 2, 65, 129, 64, torch.bfloat16, "causal"),
    (2, 2, 1, 129, 65, 128, torch.float16, "bool"),
    (2, 2, 2, 65, 129, 128, torch.bfloat16, "key_padding"),
    (1, 2, 2, 17, 129, 64, torch.float16, "float"),
    (1, 2, 2, 129, 129, 64, torch.bfloat16, "window"),
    (1, 4, 1, 65, 65, 128, torch.float16, "causal_mask"),
    (1, 2, 2, 17, 1030, 64, torch.bfloat16, "q_offset"),
    (1, 2, 2, 65, 129, 128, torch.bfloat16, "window_offset"),
    (1, 1, 1, 1, 1, 64, torch.float16, "none"),
    (1, 2, 2, 1, 65, 128, torch.bfloat16, "bool"),
    (1, 2, 2, 65, 1, 64, torch.float16, "causal"),
    (1, 2, 1, 17, 65, 32, torch.float16, "causal"),
    (1, 2, 2, 65, 65, 96, torch.bfloat16, "float"),
    (1, 3, 1, 129, 17, 32, torch.bfloat16, "key_padding"),
    (1, 1, 1, 1030, 65, 64, torch.float16, "q_offset"),
    (1, 2, 1, 129, 129, 96, torch.float16, "window"),
    # Head dim 256 (both passes split D between warp pairs): lengths 17 and 65, GQA, partial and skipped tiles.
    (1, 2, 2, 17, 17, 256, torch.float16, "none"),
    (2, 2, 2, 65, 65, 256, torch.bfloat16, "causal_padding"),
    (1, 4, 2, 65, 65, 256, torch.float16, "bool"),
    (1, 2, 1, 17, 65, 256, torch.bfloat16, "window_offset"),
]


@pytest.mark.parametrize("b, hq, hkv, lq, lk, d, dtype, kind", CASES)
def test_grads_match_oracle(b, hq, hkv, lq, lk, d, dtype, kind):
    _check(*_setup(b, hq, hkv, lq, lk, d, dtype, kind, seed=lq * 1000 + lk + d))


def test_covering_set():
    """Every mask kind, dtype, head dim, odd length and a GQA group appear in the default cases."""
    assert {c[7] for c in CASES} == set(KINDS)
    assert {c[6] for c in CASES} == {torch.float16, torch.bfloat16}
    assert {c[5] for c in CASES} == set(cuda_fwd.HEAD_DIMS)
    assert {1, 17, 65, 129, 1030} <= {c[3] for c in CASES} & {c[4] for c in CASES}
    assert any(c[1] != c[2] for c in CASES)


@pytest.mark.full
@pytest.mark.parametrize("d", cuda_fwd.HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lq, lk", [(1, 17), (17, 65), (65, 129), (129, 65), (129, 129)])
@pytest.mark.parametrize("hq, hkv", [(2, 2), (4, 2)])
def test_grads_match_oracle_full(d, dtype, kind, lq, lk, hq, hkv):
    _check(*_setup(2, hq, hkv, lq, lk, d, dtype, kind, seed=lq + 7 * lk + d))


@pytest.mark.full
@pytest.mark.parametrize(
    "lq, lk, d, kind",
    [
        (1030, 65, 64, "causal"), (65, 1030, 64, "key_padding"), (1030, 1030, 64, "none"),
        (1030, 129, 256, "causal_padding"), (129, 1030, 256, "float"), (513, 513, 256, "window"),
    ],
)  # fmt: skip
def test_grads_long_full(lq, lk, d, kind):
    _check(*_setup(1, 1, 1, lq, lk, d, torch.float16, kind, seed=3))


def test_cuda_forward_then_backward():
    """The CUDA forward op's (out, lse) feed the backward: the pair against the float64 oracle."""
    q, k, v, params, scale, _, _, grad_out = _setup(1, 4, 2, 65, 129, 64, torch.bfloat16, "causal_mask", seed=4)
    out, lse = cuda_fwd.attn_fwd(q, k, v, params)
    _check(q, k, v, params, scale, out, lse, grad_out)


@pytest.mark.parametrize("d, lq, lk", [(64, 65, 129), (256, 65, 65)])
def test_deterministic_and_fiber_order(monkeypatch, d, lq, lk):
    """Bit-identical gradients run to run and whichever emulated thread (and block) runs first.

    GQA (the group's reduction in the dK/dV pass) with a partial bool mask; a reversed or random order would
    expose a missing barrier or cp.async wait. At D = 256 the warp pairs also exchange their partial S and dP
    through shared memory (two barriers per sub-tile, in both passes).
    """
    case = _setup(1, 4, 1, lq, lk, d, torch.float16, "bool", seed=11)
    results = [_check(*case), _check(*case)]
    for order in ("reversed", "random:7"):
        monkeypatch.setenv("FASTATTN_EMULATE_ORDER", order)
        results.append(_check(*case))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("d", [64, 256])
def test_empty_tiles_are_never_loaded(d):
    """K/V and Q/dO rows that only EMPTY (skipped) tiles hold are NaN: reading them would give NaN gradients.

    A window (9, 5), Lq = Lk = 129: far tiles are skipped on both sides. At D = 256 the blocks are smaller
    (32 keys in the dK/dV pass, 32 query rows in the dQ pass): the same rows stay unread.
    """
    q, k, v, params, scale, out, lse, grad_out = _setup(1, 1, 1, 129, 129, d, torch.float16, "window", seed=2)
    dq, dk, dv, _ = cuda_fwd.attn_bwd(grad_out, q, k, v, out, lse, params, None, False)
    # Rows 0..15 of q/dO are only in query tile 0 (rows 0..31 and 0..63): key tile 2 (keys 128..) never sees them.
    # Poison K/V rows 128.. (only key tile 2) and check that query rows < 64 (which cannot see them) are unchanged.
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 128:], v2[:, :, 128:] = float("nan"), float("nan")
    dq2, _, _, _ = cuda_fwd.attn_bwd(grad_out, q, k2, v2, out, lse, params, None, False)
    assert torch.equal(dq2[:, :, :64], dq[:, :, :64])
    # Poison q/dO rows 96.. (query tiles 3, 4 of 32; tile 1 of 64): key tile 0 (keys < 64) never sees them.
    q2, g2 = q.clone(), grad_out.clone()
    q2[:, :, 96:], g2[:, :, 96:] = float("nan"), float("nan")
    _, dk2, dv2, _ = cuda_fwd.attn_bwd(g2, q2, k, v, out, lse, params, None, False)
    assert torch.equal(dk2[:, :, :64], dk[:, :, :64]) and torch.equal(dv2[:, :, :64], dv[:, :, :64])


def test_unaligned_and_strided_inputs():
    """A (B, L, H, D) storage seen as (B, H, L, D) is read in place; an odd offset is copied: same gradients."""
    q, k, v, params, scale, out, lse, grad_out = _setup(2, 2, 2, 17, 33, 64, torch.bfloat16, "none", seed=6)
    ref = cuda_fwd.attn_bwd(grad_out, q, k, v, out, lse, params, None, False)[:3]
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (grad_out, q, k, v, out)]
    got = cuda_fwd.attn_bwd(*strided[:4], strided[4], lse, params, None, False)[:3]
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    shifted = [torch.cat([t.new_zeros(1), t.flatten()])[1:].view(t.shape) for t in (grad_out, q, k, v, out)]
    got = cuda_fwd.attn_bwd(*shifted[:4], shifted[4], lse, params, None, False)[:3]
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


def test_opcheck():
    q, k, v, params, scale, out, lse, grad_out = _setup(1, 2, 1, 17, 33, 64, torch.float16, "bool", seed=8)
    left, right = params.bounds
    kw = dict(scale=scale, left=left, right=right, q_offset=params.q_offset)
    args = bwd_args(grad_out, q, k, v, out, lse, params.mask, cuda_fwd.summaries(params), **kw)
    torch.library.opcheck(torch.ops.fastattn.cuda_attn_bwd.default, args)
    q, k, v, params, scale, out, lse, grad_out = _setup(1, 2, 2, 17, 33, 32, torch.bfloat16, "causal", seed=9)
    left, right = params.bounds
    kw = dict(scale=scale, left=left, right=right, q_offset=params.q_offset)
    torch.library.opcheck(torch.ops.fastattn.cuda_attn_bwd.default, bwd_args(grad_out, q, k, v, out, lse, **kw))
    variant = dict(kw, chunk=5, softcap=2.0, alibi=torch.rand(1, 2))
    torch.library.opcheck(torch.ops.fastattn.cuda_attn_bwd.default, bwd_args(grad_out, q, k, v, out, lse, **variant))
    q, k, v, params, scale, out, lse, grad_out, _ = _setup_mask_grad(
        1, 2, 1, 17, 33, 32, torch.float16, "head", "causal"
    )
    left, right = params.bounds
    kw = dict(scale=scale, left=left, right=right, q_offset=params.q_offset, need_mask_grad=True)
    args = bwd_args(grad_out, q, k, v, out, lse, params.mask, cuda_fwd.summaries(params), **kw)
    torch.library.opcheck(torch.ops.fastattn.cuda_attn_bwd.default, args)


def test_unsupported_raise_clear_errors():
    q, k, v, params, scale, out, lse, grad_out = _setup(1, 1, 1, 17, 17, 64, torch.float16, "float", seed=1)
    with pytest.raises(ValueError, match=r"philox: expected the call's int64 \[seed, offset\] tensor"):
        cuda_fwd.attn_bwd(grad_out, q, k, v, out, lse, params.replace(dropout_p=0.1), None, False)
    _, _, _, spec_bool, _, _, _, _ = _setup(1, 1, 1, 17, 17, 64, torch.float16, "bool", seed=1)
    with pytest.raises(ValueError, match="need_mask_grad: expected a floating attn_mask"):
        cuda_fwd.attn_bwd(grad_out, q, k, v, out, lse, spec_bool, None, True)
    with pytest.raises(RuntimeError, match="need_mask_grad=True needs a floating-point argument 'mask'"):
        torch.ops.fastattn.cuda_attn_bwd(*bwd_args(grad_out, q, k, v, out, lse, scale=scale, need_mask_grad=True))
    with pytest.raises(RuntimeError, match=r"argument 'blocks' must be \[64, 64, 32\]"):
        torch.ops.fastattn.cuda_attn_bwd(*bwd_args(grad_out, q, k, v, out, lse, blocks=(64, 64, 64)))
    with pytest.raises(RuntimeError, match=r"argument 'summary' must be \[\] or \[kv_state"):
        torch.ops.fastattn.cuda_attn_bwd(*bwd_args(grad_out, q, k, v, out, lse, summary=(lse,)))
    q, k, v, params, scale, out, lse, grad_out = _setup(1, 1, 1, 17, 17, 80, torch.float16, "none", seed=1)
    with pytest.raises(RuntimeError, match=r"head_dim \(q.size\(3\)\) must be one of 32, 64, 96, 128, 256"):
        torch.ops.fastattn.cuda_attn_bwd(*bwd_args(grad_out, q, k, v, out, lse, scale=scale))
    with pytest.raises(RuntimeError, match="argument 'lse' must have shape"):
        torch.ops.fastattn.cuda_attn_bwd(
            *bwd_args(grad_out[..., :64], q[..., :64], k[..., :64], v[..., :64], out[..., :64], lse[:, :, :3])
        )


class _CudaForwardAndBackward(Backend):
    """The CUDA forward op with this backward, as CudaBackend will wire it: checks the pair through autograd."""

    name = "cuda-fwd-cuda-bwd"

    def forward(self, q, k, v, params, philox):
        return cuda_fwd.attn_fwd(q, k, v, params, philox)

    def backward(self, grad_out, q, k, v, out, lse, params, philox, need_mask_grad):
        return cuda_fwd.attn_bwd(grad_out, q, k, v, out, lse, params, philox, need_mask_grad)


def test_autograd_end_to_end():
    """Leaf gradients through the one AttentionFunction (GQA, key padding) against the float64 oracle."""
    q, k, v, params, scale, _, _, grad_out = _setup(2, 4, 2, 33, 65, 64, torch.float16, "key_padding", seed=12)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = AttentionFunction.apply(*leaves, params.mask, None, _CudaForwardAndBackward(), params)
    out.backward(grad_out)
    truth = oracle.attention_backward(*(t.double() for t in (grad_out, q, k, v)), params)
    base = oracle.attention_backward(grad_out, q, k, v, params, compute_dtype=q.dtype)
    for name, leaf, ref, bl in zip(("dq", "dk", "dv"), leaves, truth, base):
        assert_close(leaf.grad, ref, bl, factor=3, name=name)


def test_compile_fullgraph():
    """``torch.compile(fullgraph=True)`` traces the op through its fake: same gradients as eager."""
    q, k, v, params, scale, out, lse, grad_out = _setup(1, 2, 1, 17, 33, 64, torch.bfloat16, "causal", seed=13)
    left, right = params.bounds

    def fn(grad_out, q, k, v, out, lse):
        args = bwd_args(grad_out, q, k, v, out, lse, scale=scale, left=left, right=right, q_offset=params.q_offset)
        return torch.ops.fastattn.cuda_attn_bwd(*args)

    eager = fn(grad_out, q, k, v, out, lse)
    compiled = torch.compile(fn, fullgraph=True)(grad_out, q, k, v, out, lse)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_memory_no_lq_by_lk():
    """The backward allocates nothing of Lq x Lk elements (a broadcast key-padding mask is read in place).

    The profiler must see the (B, Hq, Lq, D) gradients, so the check is not vacuous.
    """
    seqlen, d = 320, 32  # Lq*Lk = 102400 elements; the largest (L, D) tensor is 320*32*2 = 20 KiB
    q, k, v, params, scale, out, lse, grad_out = _setup(1, 1, 1, seqlen, seqlen, d, torch.float16, "key_padding")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        cuda_fwd.attn_bwd(grad_out, q, k, v, out, lse, params, None, False)
    sizes = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert max(sizes) >= seqlen * d * 2, "the profiler did not see the gradients: the check would be vacuous"
    assert max(sizes) < seqlen * seqlen


def _setup_mask_grad(b, hq, hkv, lq, lk, d, dtype, shape, band, mask_dtype=None, seed=0):
    """A float mask (learned bias) broadcast as ``shape`` ("head": (1, H, Lq, Lk), "key": (B, 1, 1, Lk)), with
    some -inf, combined with a band ("causal" or "window") so that some (64, 64) tiles are EMPTY (skipped)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = random_qkv(b, hq, hkv, lq, lk, d, d, dtype, generator=gen)
    dims = (1, hq, lq, lk) if shape == "head" else (b, 1, 1, lk)
    bias = torch.randn(dims, generator=gen)
    bias[torch.rand(dims, generator=gen) < 0.1] = float("-inf")
    bias[..., 0] = 0.0  # key 0 finite: no row loses every key to the bias
    mask = bias.to(mask_dtype or dtype)
    causal, window = band == "causal", ((9, 5) if band == "window" else None)
    params, q, k, v = validate(q, k, v, mask, 0.0, causal, None, hq != hkv, window, 0)
    out, lse = oracle.attention_forward(q, k, v, params)
    grad_out = torch.randn(out.shape, generator=gen).to(dtype)
    return q, k, v, params, params.scale, out, lse, grad_out, mask


def _allowed(params, lq, lk):
    """(Lq, Lk) bool: the band of params.bounds (the float mask's -inf is checked separately)."""
    left, right = params.bounds
    pos = torch.arange(lq).view(lq, 1) + params.q_offset
    j = torch.arange(lk).view(1, lk)
    return ((left < 0) | (pos - left <= j)) & ((right < 0) | (j <= pos + right))


# (b, hq, hkv, lq, lk, d, dtype, mask shape, band, mask dtype): fp16 and bf16, lengths 17 and 65, both
# broadcasts, causal and window, a mask in the inputs' dtype and in fp32, GQA. Each has skipped tiles.
MASK_GRAD_CASES = [
    (2, 2, 1, 65, 65, 64, torch.float16, "head", "causal", None),
    (2, 2, 2, 17, 65, 32, torch.bfloat16, "key", "window", None),
    (1, 2, 2, 65, 17, 128, torch.bfloat16, "head", "window", torch.float32),
    (2, 2, 2, 65, 65, 32, torch.float16, "key", "causal", torch.float32),
    (1, 2, 1, 65, 65, 256, torch.bfloat16, "head", "causal", None),
    (2, 2, 2, 17, 65, 256, torch.float16, "key", "window", torch.float32),
]


@pytest.mark.parametrize("b, hq, hkv, lq, lk, d, dtype, shape, band, mask_dtype", MASK_GRAD_CASES)
def test_mask_grad_matches_oracle(b, hq, hkv, lq, lk, d, dtype, shape, band, mask_dtype):
    """dmask = dS against the oracle's dscores; exactly 0 outside the band (skipped tiles) and where -inf.

    The op poisons dmask with NaN in the emulation build: an element the dQ pass never writes fails.
    """
    q, k, v, params, scale, out, lse, grad_out, mask = _setup_mask_grad(
        b, hq, hkv, lq, lk, d, dtype, shape, band, mask_dtype, seed=lq * 100 + lk + d
    )
    summary = params.tile_summary(cuda_fwd.BLOCK_M_DQ, cuda_fwd.BLOCK_N)
    n_k = (lk + cuda_fwd.BLOCK_N - 1) // cuda_fwd.BLOCK_N
    assert (summary.kv_count < n_k).any(), "no skipped tile: the zero-fill path would go untested"
    dq, dk, dv, dmask = cuda_fwd.attn_bwd(grad_out, q, k, v, out, lse, params, None, True)
    assert dmask.dtype == mask.dtype and dmask.shape == (b, hq, lq, lk)
    truth = oracle.attention_backward(*(t.double() for t in (grad_out, q, k, v)), params)
    base = oracle.attention_backward(grad_out, q, k, v, params, compute_dtype=q.dtype)
    for name, got, ref, bl in zip(("dq", "dk", "dv", "dmask"), (dq, dk, dv, dmask), truth, base):
        assert_close(got, ref, bl, factor=3, name=name)
    masked = ~_allowed(params, lq, lk) | torch.isinf(params.mask)  # (B, Hq, Lq, Lk) by broadcasting
    assert masked.any() and (~masked).any()
    assert (dmask[masked] == 0).all(), "dmask must be exactly zero where a pair is masked or a tile skipped"
    # The plain run (no dmask) gives bit-identical dq, dk, dv: the dS-writing instantiation changes nothing else.
    plain = cuda_fwd.attn_bwd(grad_out, q, k, v, out, lse, params, None, False)
    for a, c in zip((dq, dk, dv), plain[:3]):
        assert torch.equal(a, c)


def test_mask_grad_end_to_end(monkeypatch):
    """fastattn.scaled_dot_product_attention(backend="cuda") with a float (1, H, Lq, Lk) mask that requires grad:
    the mask's gradient comes from the CUDA backward (the fallback is never asked) reduced over the broadcast."""
    from fastattn import scaled_dot_product_attention
    from fastattn.backends import cuda as cuda_backend_module

    calls = []
    real = cuda_fwd.attn_bwd

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(cuda_backend_module, "attn_bwd", spy)
    q, k, v, params, scale, _, _, grad_out, mask = _setup_mask_grad(
        2, 2, 2, 65, 65, 64, torch.bfloat16, "head", "causal", seed=21
    )
    leaves = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    out = scaled_dot_product_attention(*leaves[:3], attn_mask=leaves[3], is_causal=True, backend="cuda")
    out.backward(grad_out)
    assert calls == [True], f"expected one CUDA backward call with need_mask_grad=True, got {calls}"
    truth = oracle.attention_backward(*(t.double() for t in (grad_out, q, k, v)), params)
    base = oracle.attention_backward(grad_out, q, k, v, params, compute_dtype=q.dtype)
    for name, leaf, ref, bl in zip(("dq", "dk", "dv"), leaves, truth, base):
        assert_close(leaf.grad, ref, bl, factor=3, name=name)
    # (B, H, Lq, Lk) -> the mask's (1, H, Lq, Lk): summed over the batch, in fp32 for the low-precision baseline.
    ref_mask = truth[3].sum(0, keepdim=True)
    base_mask = base[3].float().sum(0, keepdim=True).to(mask.dtype)
    assert leaves[3].grad.shape == mask.shape
    assert_close(leaves[3].grad, ref_mask, base_mask, factor=3, name="dmask")


def test_head_dim_256_end_to_end(monkeypatch):
    """backend="cuda" at head dim 256: the CUDA backward runs (the fallback is never asked), GQA with causal
    plus key padding, leaf gradients against the float64 oracle."""
    from fastattn import scaled_dot_product_attention
    from fastattn.backends import cuda as cuda_backend_module

    calls = []
    real = cuda_fwd.attn_bwd

    def spy(*args):
        calls.append(args[1].shape[-1])
        return real(*args)

    monkeypatch.setattr(cuda_backend_module, "attn_bwd", spy)
    q, k, v, params, scale, _, _, grad_out = _setup(2, 4, 2, 33, 65, 256, torch.bfloat16, "causal_padding", seed=22)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = scaled_dot_product_attention(
        *leaves, attn_mask=params.mask, is_causal=True, enable_gqa=True, backend="cuda"
    )  # fmt: skip
    out.backward(grad_out)
    assert calls == [256], f"expected one CUDA backward call at head dim 256, got {calls}"
    truth = oracle.attention_backward(*(t.double() for t in (grad_out, q, k, v)), params)
    base = oracle.attention_backward(grad_out, q, k, v, params, compute_dtype=q.dtype)
    for name, leaf, ref, bl in zip(("dq", "dk", "dv"), leaves, truth, base):
        assert_close(leaf.grad, ref, bl, factor=3, name=name)


@pytest.mark.full
@pytest.mark.skipif(_ext.unavailable_reason("cuda") is not None, reason=str(_ext.unavailable_reason("cuda")))
def test_real_kernel_sass_has_tensor_cores_and_no_spills(tmp_path):
    """nvcc (compile only, sm_80 and sm_90): every backward variant (head dims 32-256, fp16/bf16, the dS-writing
    dQ kernel) has HMMA, LDSM and LDGSTS in its SASS and no spills beyond mk/known-spills.json's named entries
    (the dK/dV kernel at head dim 256 on sm_90, issue #19; the design note's table)."""
    rows = sass_audit(tmp_path, "attn_bwd.cu", "attn_bwd_d", known_spills=True)
    # per arch, dtype and head dim: the dK/dV kernel with and without the score modifiers (kMod), and the dQ
    # kernel's four (kMod x the dS-writing instantiation)
    assert len(rows) == 2 * 2 * 6 * len(cuda_fwd.HEAD_DIMS), [r["kernel"] for r in rows]
