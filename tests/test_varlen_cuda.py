"""The CUDA backend's packed sequences, the kernel source run by the emulator, against the per-sequence oracle.

Every kernel takes one program's sequence from ``seq_info`` (``csrc/cuda/attn_common.cuh``): offsets and lengths
from ``cu_seqlens``, bottom-right alignment; programs past a sequence's rows exit. The covering set below puts
every band, variant, dtype and head dim of the kernels once on "short" lengths (0, 1, 17, 40, Lq_b != Lk_b, a
sequence with no keys and one with no queries; the emulator's time is per tile), dropout and int64 offsets once,
and "cross" (65, 130, a key sequence of 1100) once; the pairwise matrix is in ``full``. Every case compares the
output, the lse and every gradient (dq, dk, dv, dsinks) with the float64 oracle (``testing.check_varlen``); the
ops poison their outputs under emulation, so an element no program writes fails.
"""

from __future__ import annotations

import pytest
import torch
from _cuda_support import emulate  # noqa: F401  (the module's ops run on the emulator)

from fastattn import _validate, testing
from fastattn.backends import cuda as cuda_backend
from fastattn.backends import registry

_COVERING = [
    {"dtype": torch.float16, "mask": "none", "variant": "plain", "head_dim": 32, "gqa": 2},
    {"dtype": torch.bfloat16, "mask": "causal", "variant": "softcap", "head_dim": 64, "gqa": 1},
    {"dtype": torch.float16, "mask": "window", "variant": "alibi", "head_dim": 96, "gqa": 2},
    {"dtype": torch.bfloat16, "mask": "causal_window", "variant": "sinks", "head_dim": 128, "gqa": 4},
    {"dtype": torch.float16, "mask": "causal", "variant": "chunk", "head_dim": 32, "gqa": 2},
    {"dtype": torch.bfloat16, "mask": "window", "variant": "all", "head_dim": 256, "gqa": 2},
]
_PAIRWISE = testing.pairwise(
    {
        "dtype": [torch.float16, torch.bfloat16],
        "mask": list(testing.PACKED_MASK_KINDS),
        "variant": list(testing.VARIANT_KINDS),
        "head_dim": list(cuda_backend.HEAD_DIMS),
        "gqa": [1, 2, 4],
    }
)


def _id(case):
    return "-".join(str(case[k]) for k in ("dtype", "mask", "variant", "head_dim", "gqa"))


def _run(kind, kw, hq=4, hkv=2, d=32, dtype=torch.float16, seed=0, index_dtype=torch.int32):
    g = torch.Generator().manual_seed(seed)
    lq, lk = testing.packed_lengths(kind, g)
    q, k, v, cu_q, cu_k, max_q, max_k = testing.random_packed(
        lq, lk, hq, hkv, d, dtype=dtype, generator=g, index_dtype=index_dtype
    )
    kw = {"enable_gqa": hq != hkv, **kw}
    return testing.check_varlen("cuda", q, k, v, cu_q, cu_k, max_q, max_k, kw)


def test_covering_set_spans_the_kernels():
    assert {c["head_dim"] for c in _COVERING} == set(cuda_backend.HEAD_DIMS)
    assert {c["variant"] for c in _COVERING} == set(testing.VARIANT_KINDS)
    assert {c["mask"] for c in _COVERING} == set(testing.PACKED_MASK_KINDS)
    assert {c["dtype"] for c in _COVERING} == set(cuda_backend._DTYPES)


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=_id(c)) for c in _COVERING]
    + [pytest.param(c, id=_id(c), marks=pytest.mark.full) for c in _PAIRWISE],
)
def test_short_sequences_against_the_oracle(case):
    g = torch.Generator().manual_seed(1)
    lq, lk = testing.packed_lengths("short")
    kw = testing.packed_mask_kwargs(case["mask"], max(lk))
    kw.update(testing.variant_kwargs(case["variant"], len(lq), 4, max(lq), max(lk), g))
    _run("short", kw, hkv=4 // case["gqa"], d=case["head_dim"], dtype=case["dtype"])


def test_long_and_cross_lengths_against_the_oracle():
    """65, 130 queries, a key sequence of 1100, empty sequences on either side, GQA 2:1, causal + ALiBi."""
    g = torch.Generator().manual_seed(2)
    kw = {"is_causal": True, **testing.variant_kwargs("alibi", 7, 2, 130, 1100, g)}
    _run("cross", kw, hq=2, hkv=1, seed=2)


@pytest.mark.full
def test_sequences_above_1000_full():
    """1030 queries and keys in one sequence beside 0, 1, 17, 65 and 129: several query and key tiles per program."""
    g = torch.Generator().manual_seed(5)
    kw = {**testing.packed_mask_kwargs("causal_window", 1030), **testing.variant_kwargs("all", 6, 2, 1030, 1030, g)}
    _run("self", kw, hq=2, hkv=1, d=64, dtype=torch.bfloat16, seed=5)


def test_dropout_against_the_oracle():
    """Sequence b draws row b of the contract's numbers for the batch padded to the maxima (as the Triton and CPU
    backends), in the forward and in both backward passes; the sinks' gradient comes from the autograd function."""
    _run("short", {"dropout_p": 0.3, "window": (6, 2), "sinks": torch.randn(4) + 1.0}, dtype=torch.bfloat16, seed=3)


def test_int64_offsets():
    _run("short", {"is_causal": True}, hq=3, hkv=1, d=64, seed=4, index_dtype=torch.int64)


def test_backend_takes_packed():
    params, *_ = _validate.validate_packed(*testing.random_packed([3, 4], [5, 0], 2, 2, 32, dtype=torch.float16))
    assert registry.get("cuda").unsupported_reason(params) is None


def test_opcheck_packed_ops():
    lq, lk = [3, 0, 6, 1], [4, 2, 0, 5]  # an empty sequence on either side, Lq_b != Lk_b
    q, k, v, cu_q, cu_k, max_q, max_k = testing.random_packed(lq, lk, 4, 2, 32, dtype=torch.float16)
    # (total, H, D) → (1, H, total, D)
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    layout = (cu_q, cu_k, max_q, max_k)
    philox = torch.tensor([123, 456], dtype=torch.int64)
    scalars = (0.25, 0.2, [3.0, 0.0, 0.0, 0.0, 2.0])
    blocks = [cuda_backend.BLOCK_M, cuda_backend.block_n(32)]
    args = (q4, k4, v4, None, torch.rand(len(lq), 4), torch.randn(4), [], philox, *scalars, blocks, *layout)
    torch.library.opcheck(torch.ops.fastattn.cuda_attn_fwd.default, args)
    out, lse = torch.ops.fastattn.cuda_attn_fwd(*args)
    assert out.shape == (1, 4, sum(lq), 32) and out.transpose(1, 2).is_contiguous()  # token-major
    bblocks = [cuda_backend.BLOCK_M_DQ, cuda_backend.BLOCK_N, cuda_backend.BLOCK_M_KV]
    bargs = (torch.randn_like(out), q4, k4, v4, out, lse, None, args[4], [], philox, *scalars, bblocks, False,
             *layout)  # fmt: skip
    torch.library.opcheck(torch.ops.fastattn.cuda_attn_bwd.default, bargs)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"cu_seqlens_k": None}, "'cu_seqlens_q' and 'cu_seqlens_k' come together"),
        ({"cu_seqlens_q": torch.tensor([0.0, 3.0])}, "cu_seqlens_q"),
        ({"cu_seqlens_k": torch.tensor([0, 9], dtype=torch.int32)}, "shape (B + 1,)"),
        ({"max_seqlen_q": 99}, "max_seqlen_q"),
    ],
)
def test_bad_layout_arguments_name_the_argument(change, message):
    q, k, v, cu_q, cu_k, max_q, max_k = testing.random_packed([3, 2], [4, 1], 2, 2, 32, dtype=torch.float16)
    layout = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, "max_seqlen_q": max_q, "max_seqlen_k": max_k, **change}
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    args = (q4, k4, v4, None, None, None, [], None, 0.25, 0.0, [-1.0, -1.0, 0.0, 0.0, 0.0], [64, 64])
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        torch.ops.fastattn.cuda_attn_fwd(*args, *layout.values())
