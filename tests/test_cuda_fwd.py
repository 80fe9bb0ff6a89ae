"""The CUDA backend's forward kernel (csrc/cuda/attn_fwd.cu) run on CPU tensors by the emulator.

``FASTATTN_CUDA_EMULATE=1`` is set for this module only (a fixture), so other test modules in the
same worker keep their automatic backend choice. The op poisons its outputs with NaN in the
emulation build before the kernel writes them, so an element the kernel misses fails the NaN
check of ``assert_close``. Every case compares against the float64 oracle with the 2x-of-PyTorch
rule; the default run is a covering set (every head dim, dtype, mask kind and length appears),
the product is under ``@pytest.mark.full``. The emulator is slow (fibers per GPU thread): shapes
stay small, with one key length above 1000 on a single head.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from _cuda_support import emulate, fwd_args, params_for, sass_audit  # noqa: F401

import fastattn
from fastattn import _ext
from fastattn import reference as oracle
from fastattn._validate import validate
from fastattn.backends import cuda as cuda_backend
from fastattn.backends import registry
from fastattn.backends.registry import UnsupportedError
from fastattn.masks import EMPTY
from fastattn.testing import assert_close

pytestmark = pytest.mark.skipif(
    _ext.unavailable_reason("cuda_emulate") is not None, reason=str(_ext.unavailable_reason("cuda_emulate"))
)


def _inputs(b, hq, hkv, lq, lk, d, dtype, mask_kind, seed):
    """q, k, v and the sdpa keyword arguments of one case (masks drawn fresh, never all-True)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(*shape, generator=g).to(dtype) for shape in ((b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, d))
    )
    kw: dict = {"enable_gqa": hkv != hq}
    if mask_kind == "causal":
        kw["is_causal"] = True
    elif mask_kind == "bool":  # full (B, H, Lq, Lk), with one query row that attends nothing
        mask = torch.rand(b, hq, lq, lk, generator=g) > 0.3
        mask[:, :, lq // 2, :] = False
        kw["attn_mask"] = mask
    elif mask_kind == "key_padding":  # (B, 1, 1, Lk) broadcast: each batch keeps a random prefix
        keep = torch.randint(1, lk + 1, (b,), generator=g)
        kw["attn_mask"] = (torch.arange(lk).view(1, lk) < keep.view(b, 1)).view(b, 1, 1, lk)
    elif mask_kind == "float":  # additive (1, H, Lq, Lk) with some -inf
        bias = torch.randn(1, hq, lq, lk, generator=g) * 2
        bias[torch.rand(1, hq, lq, lk, generator=g) < 0.2] = float("-inf")
        kw["attn_mask"] = bias.to(dtype if seed % 2 else torch.float32)
    elif mask_kind == "window":
        kw["window"] = (9, 5)
    elif mask_kind == "causal_mask":  # causal plus a (Lq, Lk) bool mask broadcast over batch and heads
        kw["is_causal"] = True
        kw["attn_mask"] = torch.rand(lq, lk, generator=g) > 0.25
    elif mask_kind == "q_offset":  # bottom-right causal (KV-cache decoding)
        kw["is_causal"] = True
        kw["q_offset"] = lk - lq
    elif mask_kind == "window_offset":
        kw["window"] = (20, 0)
        kw["q_offset"] = 7
    return q, k, v, kw


def _check(q, k, v, kw):
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, backend="cuda", return_lse=True, **kw)
    ref, ref_lse = oracle.attention(q.double(), k.double(), v.double(), return_lse=True, **kw)
    base = oracle.attention(q, k, v, compute_dtype=q.dtype, **kw)
    base_lse = oracle.attention(q.float(), k.float(), v.float(), return_lse=True, **kw)[1]
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_close(out, ref, base, factor=2)
    assert_close(lse, ref_lse, base_lse, factor=2, name="lse")
    return out, lse


# A covering set: every head dim, dtype, mask kind and odd length appears; GQA in several.
# (b, hq, hkv, lq, lk, d, dtype, mask)
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
    (1, 1, 1, 65, 65, 256, torch.float16, "key_padding"),
    (1, 2, 2, 17, 65, 256, torch.bfloat16, "none"),
    (1, 1, 1, 1030, 65, 128, torch.float16, "q_offset"),
]


@pytest.mark.parametrize("b, hq, hkv, lq, lk, d, dtype, mask_kind", CASES)
def test_forward_matches_oracle(b, hq, hkv, lq, lk, d, dtype, mask_kind):
    _check(*_inputs(b, hq, hkv, lq, lk, d, dtype, mask_kind, seed=lq * 1000 + lk + d))


_MASKS = ("none", "causal", "bool", "key_padding", "float", "window", "causal_mask", "q_offset", "window_offset")


@pytest.mark.full
@pytest.mark.parametrize("d", cuda_backend.HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", _MASKS)
@pytest.mark.parametrize("lq, lk", [(1, 17), (17, 65), (65, 129), (129, 65), (129, 129)])
@pytest.mark.parametrize("hq, hkv", [(2, 2), (4, 2)])
def test_forward_matches_oracle_full(d, dtype, mask_kind, lq, lk, hq, hkv):
    _check(*_inputs(2, hq, hkv, lq, lk, d, dtype, mask_kind, seed=lq + 7 * lk + d))


@pytest.mark.full
@pytest.mark.parametrize("lq, lk, mask_kind", [(1030, 65, "causal"), (65, 1030, "key_padding"), (1030, 1030, "none")])
def test_forward_long_full(lq, lk, mask_kind):
    _check(*_inputs(1, 1, 1, lq, lk, 64, torch.float16, mask_kind, seed=3))


@pytest.mark.parametrize("mask_kind, d", [("bool", 64), ("q_offset", 256)])
def test_same_answer_in_every_fiber_order(monkeypatch, mask_kind, d):
    """Bit-identical output whichever emulated thread runs first: no missing barrier or cp.async wait.

    Head dim 256 reads Q from shared memory in the loop (the other dims keep it in registers).
    """
    q, k, v, kw = _inputs(1, 2, 1, 65, 129, d, torch.bfloat16, mask_kind, seed=11)
    results = []
    for order in ("forward", "reversed", "random:1", "random:5"):
        monkeypatch.setenv("FASTATTN_EMULATE_ORDER", order)
        results.append(_check(q, k, v, kw))
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])


def test_empty_tiles_are_never_loaded():
    """K/V rows that only EMPTY tiles hold are NaN: loading them (0 · NaN in P V) would show up as NaN."""
    # Band: causal with q_offset 0, Lq = 64 -> no query sees keys >= 64 (key tiles 1.. empty).
    q, k, v, kw = _inputs(1, 2, 2, 64, 256, 64, torch.float16, "causal", seed=5)
    ref = oracle.attention(q.double(), k.double(), v.double(), **kw)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 64:], v2[:, :, 64:] = float("nan"), float("nan")
    out = fastattn.scaled_dot_product_attention(q, k2, v2, backend="cuda", **kw)
    assert_close(out, ref, oracle.attention(q, k, v, compute_dtype=q.dtype, **kw))
    # Mask tensor: key padding that drops keys 128.. for every query (tile 2 and 3 EMPTY in the summary).
    mask = (torch.arange(256) < 128).view(1, 1, 1, 256)
    spec_state = params_for(65, 256, mask.expand(1, 2, 65, 256)).tile_summary(64, 64)
    assert (spec_state.state[..., 2:] == EMPTY).all()
    q, k, v, _ = _inputs(1, 2, 2, 65, 256, 64, torch.bfloat16, "none", seed=6)
    ref = oracle.attention(q.double(), k.double(), v.double(), attn_mask=mask)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 128:], v2[:, :, 128:] = float("nan"), float("nan")
    out = fastattn.scaled_dot_product_attention(q, k2, v2, attn_mask=mask, backend="cuda")
    assert_close(out, ref, oracle.attention(q, k, v, attn_mask=mask, compute_dtype=q.dtype))


def test_fully_masked_rows_give_zeros_and_minus_inf_lse():
    q, k, v, _ = _inputs(1, 2, 2, 65, 70, 64, torch.float16, "none", seed=8)
    mask = torch.rand(1, 2, 65, 70) > 0.5
    mask[:, :, :3] = False
    mask[:, 1, 40] = False
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cuda", return_lse=True)
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3])) and torch.equal(out[:, 1, 40], 0 * out[:, 1, 40])
    assert torch.isneginf(lse[:, :, :3]).all() and torch.isneginf(lse[:, 1, 40]).all()
    assert torch.isfinite(out).all()
    # A window that leaves every query of the first tile nothing (q_offset pushes them past the keys).
    q, k, v, _ = _inputs(1, 1, 1, 17, 30, 64, torch.bfloat16, "none", seed=9)
    out, lse = fastattn.scaled_dot_product_attention(
        q, k, v, window=(2, 0), q_offset=40, backend="cuda", return_lse=True
    )
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_strided_inputs_forward_and_backward():
    """(B, L, H, D) storage read in place through strides; the CUDA backward (no fallback) matches the oracle."""
    g = torch.Generator().manual_seed(12)
    q = torch.randn(1, 33, 2, 64, generator=g).to(torch.float16).transpose(1, 2).requires_grad_()
    k = torch.randn(1, 40, 2, 64, generator=g).to(torch.float16).transpose(1, 2).requires_grad_()
    v = torch.randn(1, 40, 2, 64, generator=g).to(torch.float16).transpose(1, 2).requires_grad_()
    out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cuda")
    ref = oracle.attention(q.double(), k.double(), v.double(), is_causal=True)
    assert_close(out, ref, oracle.attention(q, k, v, is_causal=True, compute_dtype=q.dtype))
    grad = torch.randn(out.shape, generator=g).to(out.dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    rq, rk, rv = torch.autograd.grad(oracle.attention(qd, kd, vd, is_causal=True), (qd, kd, vd), grad.double())
    for name, got, want in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert_close(got, want, name=name, atol=2e-2 * max(1.0, float(want.abs().max())))
    assert registry.backward_backend(registry.get("cuda"), validate(q, k, v, is_causal=True)[0]).name == "cuda"
    # A start that is not 16-byte aligned (copied by the op) and a transposed (non-contiguous) mask.
    q2 = torch.randn(1, 2, 17, 72, generator=g).to(torch.bfloat16)[..., 3:67]
    k2 = torch.randn(1, 2, 20, 64, generator=g).to(torch.bfloat16)
    mask = (torch.rand(20, 17, generator=g) > 0.3).t()
    out = fastattn.scaled_dot_product_attention(q2, k2, k2, attn_mask=mask, backend="cuda")
    ref = oracle.attention(q2.double(), k2.double(), k2.double(), attn_mask=mask)
    assert_close(out, ref, oracle.attention(q2, k2, k2, attn_mask=mask, compute_dtype=q2.dtype))


def test_opcheck():
    q, k, v, _ = _inputs(1, 2, 1, 17, 33, 32, torch.float16, "none", seed=13)
    op = torch.ops.fastattn.cuda_attn_fwd.default
    torch.library.opcheck(op, fwd_args(q, k, v, scale=0.125, right=0))
    mask = torch.rand(1, 1, 17, 33) > 0.5
    params = params_for(17, 33, mask.expand(1, 2, 17, 33))
    s = params.tile_summary(cuda_backend.BLOCK_M, cuda_backend.block_n(32))
    summary = (s.state, s.kv_count, s.kv_index)
    torch.library.opcheck(op, fwd_args(q, k, v, params.mask, summary, scale=0.125, left=3, q_offset=2))
    alibi, sinks = torch.rand(1, 2), torch.randn(2)
    variant = dict(scale=0.125, left=3, q_offset=2, chunk=5, softcap=2.0, alibi=alibi, sinks=sinks)
    torch.library.opcheck(op, fwd_args(q, k, v, params.mask, summary, **variant))


@pytest.mark.parametrize(
    "d, dtype, message",
    [
        (80, torch.float16, r"head_dim 80 is not supported \(one of 32, 64, 96, 128, 256\)"),
        (64, torch.float32, r"dtype torch.float32 is not supported \(float16, bfloat16\)"),
    ],
)
def test_unsupported_inputs_are_refused_with_the_supported_set(d, dtype, message):
    q = torch.randn(1, 1, 8, d, dtype=dtype)
    with pytest.raises(UnsupportedError, match=message):
        fastattn.scaled_dot_product_attention(q, q, q, backend="cuda")


def test_op_errors_name_the_argument():
    q = torch.randn(1, 1, 8, 80, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"head_dim \(q.size\(3\)\) must be one of 32, 64, 96, 128, 256"):
        torch.ops.fastattn.cuda_attn_fwd(*fwd_args(q, q, q))
    q = torch.randn(1, 1, 8, 64, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"argument 'k' must have dtype torch.float16 like 'q'"):
        torch.ops.fastattn.cuda_attn_fwd(*fwd_args(q, q.bfloat16(), q))
    q = torch.randn(1, 1, 80, 64, dtype=torch.float16)
    mask = torch.ones(1, 1, 80, 80, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"a mask needs its tile summary"):
        torch.ops.fastattn.cuda_attn_fwd(*fwd_args(q, q, q, mask))
    wrong = params_for(80, 80, mask, heads=1).tile_summary(32, 32)
    with pytest.raises(RuntimeError, match=r"argument 'tile_state' must be the TileSummary for block \(64, 64\)"):
        torch.ops.fastattn.cuda_attn_fwd(*fwd_args(q, q, q, mask, (wrong.state, wrong.kv_count, wrong.kv_index)))
    with pytest.raises(RuntimeError, match=r"argument 'alibi_slopes' must have shape \(1 or 1, 1\), got \[2\]"):
        torch.ops.fastattn.cuda_attn_fwd(*fwd_args(q, q, q, alibi=torch.ones(2)))
    with pytest.raises(RuntimeError, match=r"argument 'sinks' must have dtype torch.float32, got torch.float16"):
        torch.ops.fastattn.cuda_attn_fwd(*fwd_args(q, q, q, sinks=torch.ones(1, dtype=torch.float16)))
    with pytest.raises(RuntimeError, match=r"argument 'blocks' must be \[64, 64\]"):
        torch.ops.fastattn.cuda_attn_fwd(*fwd_args(q, q, q, blocks=(64, 32)))


def test_covering_set_covers_every_factor():
    """Guard for the default run: every value of every factor appears in CASES."""
    seen = {name: {c[i] for c in CASES} for i, name in enumerate(("b", "hq", "hkv", "lq", "lk", "d", "dtype", "mask"))}
    assert set(cuda_backend.HEAD_DIMS) <= seen["d"]
    assert {torch.float16, torch.bfloat16} <= seen["dtype"]
    assert set(_MASKS) <= seen["mask"]
    assert {1, 17, 65, 129} <= seen["lq"] | seen["lk"] and max(seen["lk"]) > 1000
    assert any(c[1] != c[2] for c in CASES)
    # every (dtype, head dim in {64, 128}) pair
    assert set(itertools.product((torch.float16, torch.bfloat16), (64, 128))) <= {(c[6], c[5]) for c in CASES}


def test_torch_compile_fullgraph():
    """The op's fake implementation lets torch.compile trace the whole call (forward and fallback backward)."""
    q, k, v, kw = _inputs(1, 2, 2, 17, 33, 64, torch.float16, "causal_mask", seed=14)
    q.requires_grad_()

    def f(q, k, v, mask):
        return fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True, backend="cuda")

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, kw["attn_mask"])
    ref = oracle.attention(q.detach().double(), k.double(), v.double(), **kw)
    assert_close(out, ref, oracle.attention(q.detach(), k, v, compute_dtype=q.dtype, **kw))
    (dq,) = torch.autograd.grad(out.float().sum(), q)
    q64 = q.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(oracle.attention(q64, k.double(), v.double(), **kw).sum(), q64)
    q16 = q.detach().requires_grad_()
    (base,) = torch.autograd.grad(oracle.attention(q16, k, v, compute_dtype=q.dtype, **kw).float().sum(), q16)
    assert_close(dq, want, base, factor=3, name="dq")


@pytest.mark.full
@pytest.mark.skipif(_ext.unavailable_reason("cuda") is not None, reason=str(_ext.unavailable_reason("cuda")))
def test_real_kernel_sass_has_tensor_cores_and_no_spills(tmp_path):
    """nvcc (compile only, sm_80 and sm_90): every variant's SASS has HMMA, LDSM and LDGSTS, and no spills in the
    dense kernels; the packed ones (kPacked) spill no more than their mk/known-spills.json entries."""
    rows = sass_audit(tmp_path, "attn_fwd.cu", "attn_fwd_kernel", known_spills=True)
    # per arch, dtype, kMod and kPacked (the last template argument: dense, packed) and head dim
    assert len(rows) == 2 * 2 * 2 * 2 * len(cuda_backend.HEAD_DIMS), [r["kernel"] for r in rows]
    dense = [r for r in rows if r["kernel"].endswith("ELb0EEEvNS_13AttnFwdParamsE")]
    assert len(dense) == len(rows) // 2 and not [r for r in dense if r["spill"]], dense
