"""The CUDA kernels' variants (softcap, ALiBi, sinks, chunk) on CPU tensors through the emulator, against the oracle.

The same catalogue and check as ``tests/test_variants.py`` (forward and every gradient against the float64
oracle, outputs poisoned with NaN by the emulation build's ops), on the kernel sources as nvcc compiles them.
The emulator runs every GPU thread as a fiber, so the default run is a hand-picked covering set (every variant,
each with several masks, both dtypes, every head dim, the odd lengths, GQA, one length above 1000); the
pairwise set of the full catalogue is marked ``full``. The nvcc build's SASS check of the variant
instantiations is in ``test_cuda_fwd.py`` / ``test_cuda_bwd.py`` (``full``) and ``make test-ext-cuda``.
"""

from __future__ import annotations

import pytest
import torch
from _cuda_support import emulate  # noqa: F401

import fastattn
from fastattn import _ext, testing
from fastattn.backends import cuda as cuda_backend

pytestmark = pytest.mark.skipif(
    _ext.unavailable_reason("cuda_emulate") is not None, reason=str(_ext.unavailable_reason("cuda_emulate"))
)

# (variant, mask, dtype, (Lq, Lk), (Hq, Hkv), head dim)
CASES = [
    ("softcap", "causal", torch.float16, (65, 129), (4, 2), 64),
    ("softcap", "float", torch.bfloat16, (17, 65), (2, 2), 128),
    ("alibi", "none", torch.bfloat16, (129, 65), (2, 1), 64),
    ("alibi", "window_offset", torch.float16, (65, 65), (2, 2), 32),
    ("sinks", "bool", torch.float16, (17, 17), (4, 2), 96),
    ("sinks", "q_offset", torch.bfloat16, (65, 129), (2, 2), 64),
    ("chunk", "causal_bool", torch.bfloat16, (129, 129), (2, 1), 64),
    ("chunk", "key_padding", torch.float16, (65, 17), (2, 2), 128),
    ("all", "window", torch.float16, (1, 17), (2, 2), 64),
    ("all", "float", torch.bfloat16, (65, 65), (4, 2), 256),
    ("all", "causal", torch.float16, (17, 1), (2, 2), 32),
    ("all", "q_offset", torch.bfloat16, (1030, 1030), (1, 1), 32),
]


def _run(variant, mask, dtype, lengths, gqa, d, seed=0):
    (lq, lk), (hq, hkv) = lengths, gqa
    batch = 1 if lq > 1000 else 2
    g = torch.Generator().manual_seed(seed)
    q, k, v = testing.random_qkv(batch, hq, hkv, lq, lk, d, dtype=dtype, generator=g)
    kw = testing.case_kwargs(mask, variant, batch, hq, lq, lk, dtype, g)
    kw["enable_gqa"] = hq != hkv
    return testing.check_backend("cuda", q, k, v, kw)


def _id(case) -> str:
    variant, mask, dtype, (lq, lk), (hq, hkv), d = case
    return f"{variant}-{mask}-{str(dtype)[6:]}-{lq}x{lk}-h{hq}kv{hkv}-d{d}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_variants_match_oracle(case):
    _run(*case)


def test_cases_cover_every_variant_dtype_and_head_dim():
    assert {c[0] for c in CASES} == set(testing.VARIANT_KINDS) - {"plain"}
    assert {c[2] for c in CASES} == {torch.float16, torch.bfloat16}
    assert {c[5] for c in CASES} == set(cuda_backend.HEAD_DIMS)
    assert {1, 17, 65, 129} <= {n for c in CASES for n in c[3]} and max(c[3][0] for c in CASES) > 1000


FULL = testing.pairwise(
    {
        "variant": [v for v in testing.VARIANT_KINDS if v != "plain"],
        "mask": list(testing.MASK_KINDS),
        "dtype": [torch.float16, torch.bfloat16],
        "lengths": [(1, 17), (17, 17), (65, 129), (129, 65), (17, 1)],
        "gqa": [(2, 2), (4, 2), (2, 1)],
        "head_dim": list(cuda_backend.HEAD_DIMS),
    }
)


@pytest.mark.full
@pytest.mark.parametrize(
    "case", [tuple(c[k] for k in ("variant", "mask", "dtype", "lengths", "gqa", "head_dim")) for c in FULL], ids=_id
)
def test_variants_match_oracle_full(case):
    _run(*case, seed=1)


def test_sinks_and_dropout_through_the_entry_point():
    """Sinks with dropout on the CUDA kernels: the forward's and the backward's keep-mask are the call's seed's
    (the shared contract), the sinks' gradient comes from the autograd function."""
    from fastattn import reference
    from fastattn.backends._philox import keep_mask, philox_seed_offset

    g = torch.Generator().manual_seed(4)
    q, k, v = (t.requires_grad_() for t in testing.random_qkv(1, 2, 2, 33, 40, 64, dtype=torch.float16, generator=g))
    sinks = torch.randn(2, generator=g).requires_grad_()
    kw = dict(is_causal=True, softcap=3.0, alibi_slopes=testing.alibi_slopes(2), chunk=16, dropout_p=0.25)
    torch.manual_seed(9)
    out = fastattn.scaled_dot_product_attention(q, k, v, sinks=sinks, backend="cuda", **kw)
    grad = torch.randn(out.shape, generator=g).to(out.dtype)
    got = torch.autograd.grad(out, (q, k, v, sinks), grad)
    torch.manual_seed(9)
    keep = keep_mask(philox_seed_offset("cpu"), 1, 2, 33, 40, 0.25)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    ref = reference.attention(*leaves[:3], sinks=leaves[3], keep_mask=keep, **kw)
    expected = torch.autograd.grad(ref, leaves, grad.double())
    base_leaves = [t.detach().requires_grad_() for t in (q, k, v, sinks)]
    base = reference.attention(
        *base_leaves[:3], sinks=base_leaves[3], keep_mask=keep, compute_dtype=torch.float16, **kw
    )  # fmt: skip
    base_grads = torch.autograd.grad(base, base_leaves, grad)
    testing.assert_close(out, ref, base, name="out")
    for name, a, e, b in zip(("dq", "dk", "dv", "dsinks"), got, expected, base_grads):
        testing.assert_close(a, e, b, factor=3, name=name)
