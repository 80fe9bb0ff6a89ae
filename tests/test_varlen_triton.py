"""The Triton backend's packed kernels (``PACKED``) under ``TRITON_INTERPRET=1``, against the per-sequence oracle.

Lengths come from the catalogue (``testing.packed_lengths``): "short" (0, 1, 17, Lq_b != Lk_b, empty key
sequences) keeps the interpreter quick for the dtype/variant covering set; "cross" adds 65, 129/130 and a key
sequence above 1000; "self" (1030 on both sides) is in the ``full`` matrix. Every case checks the output, the
lse and every gradient (``check_varlen``), with outputs poisoned (``FASTATTN_POISON=1``).
"""

from __future__ import annotations

import pytest
import torch

from fastattn import _validate, testing
from fastattn.backends import registry
from fastattn.backends.triton import bwd, fwd

pytestmark = pytest.mark.usefixtures("poisoned")


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setenv("FASTATTN_POISON", "1")


# Every dtype, band and variant appears (not every pair: the interpreter's time is per tile); the full pairwise
# set is in the ``full`` matrix.
_COVERING = [
    {"dtype": torch.float32, "mask": "none", "variant": "plain"},
    {"dtype": torch.float16, "mask": "causal", "variant": "softcap"},
    {"dtype": torch.bfloat16, "mask": "window", "variant": "alibi"},
    {"dtype": torch.float32, "mask": "causal_window", "variant": "sinks"},
    {"dtype": torch.float16, "mask": "causal", "variant": "chunk"},
    {"dtype": torch.bfloat16, "mask": "window", "variant": "all"},
]
_PAIRWISE = testing.pairwise(
    {
        "dtype": [torch.float32, torch.float16, torch.bfloat16],
        "mask": list(testing.PACKED_MASK_KINDS),
        "variant": ["plain", "softcap", "alibi", "sinks", "chunk", "all"],
    }
)


def _run(kind, case_kw, hq=4, hkv=2, d=16, dv=8, dtype=torch.float32, seed=0, backward=True, index_dtype=torch.int32):
    g = torch.Generator().manual_seed(seed)
    lq, lk = testing.packed_lengths(kind, g)
    q, k, v, cu_q, cu_k, max_q, max_k = testing.random_packed(
        lq, lk, hq, hkv, d, dv, dtype=dtype, generator=g, index_dtype=index_dtype
    )
    kw = {"enable_gqa": hq != hkv, **case_kw}
    return testing.check_varlen("triton", q, k, v, cu_q, cu_k, max_q, max_k, kw, backward=backward)


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id="-".join(map(str, c.values()))) for c in _COVERING]
    + [pytest.param(c, id="-".join(map(str, c.values())), marks=pytest.mark.full) for c in _PAIRWISE],
)
def test_short_sequences_against_the_oracle(case):
    g = torch.Generator().manual_seed(1)
    lq, _ = testing.packed_lengths("short")
    max_q = max(lq)
    kw = testing.packed_mask_kwargs(case["mask"], max_q)
    kw.update(testing.variant_kwargs(case["variant"], len(lq), 4, max_q, max_q, g))
    _run("short", kw, dtype=case["dtype"])


def test_long_and_cross_lengths_against_the_oracle():
    """65, 129/130 queries, a key sequence of 1100, empty sequences on either side, GQA 2:1, causal + ALiBi."""
    g = torch.Generator().manual_seed(2)
    kw = {"is_causal": True, **testing.variant_kwargs("alibi", 7, 2, 130, 1100, g)}
    _run("cross", kw, hq=2, hkv=1, seed=2)


def test_dropout_against_the_oracle():
    """The contract's numbers of row b of the batch padded to the maxima, in the forward and both backward passes."""
    _run("short", {"dropout_p": 0.3, "window": (6, 2), "sinks": torch.randn(4) + 1.0}, dtype=torch.bfloat16, seed=3)


def test_head_dims_below_their_padded_size_and_int64_offsets():
    _run("short", {"is_causal": True}, hq=3, hkv=1, d=40, dv=24, seed=4, index_dtype=torch.int64)


@pytest.mark.full
@pytest.mark.parametrize("variant", ["plain", "all"])
@pytest.mark.parametrize("mask", ["none", "causal_window"])
def test_sequences_above_1000_full(mask, variant):
    g = torch.Generator().manual_seed(5)
    kw = testing.packed_mask_kwargs(mask, 1030)
    kw.update(testing.variant_kwargs(variant, 6, 4, 1030, 1030, g))
    _run("self", kw, seed=5)


@pytest.mark.parametrize("kw", [{"is_causal": True}, {"window": (40, 3), "chunk": 50}])
def test_visited_tiles_are_each_sequences_minimum(kw):
    """One program per real (sequence, query tile); each loads exactly its sequence's non-empty key tiles."""
    lq, lk = testing.packed_lengths("cross")
    q, k, v, cu_q, cu_k, max_q, max_k = testing.random_packed(lq, lk, 4, 2, 16)
    params, q4, k4, v4 = _validate.validate_packed(q, k, v, cu_q, cu_k, max_q, max_k, enable_gqa=True, **kw)
    out, lse, visited = fwd.forward(q4, k4, v4, params, None, count_visited=True)
    block_m, block_n = fwd.INTERPRET_TILE
    assert visited.shape == (1, 4, fwd.num_programs(params.total_q, params.batch, block_m))
    assert int(visited.sum()) == 4 * params.packed_tile_minimum(block_m, block_n)
    # No padding: the work is the per-sequence minimum, far below the padded batch's B·ceil(max/tile)² tiles.
    padded = params.batch * -(-max_q // block_m) * -(-max_k // block_n)
    assert params.packed_tile_minimum(block_m, block_n) < padded / 3


def test_backend_takes_packed_and_the_auto_choice_picks_it():
    params, *_ = _validate.validate_packed(*testing.random_packed([3, 4], [5, 0], 2, 2, 8), enable_gqa=False)
    assert registry.get("triton").unsupported_reason(params) is None
    assert registry.choose(None, params).name == "triton"


def test_opcheck_packed_ops():
    lq, lk = [3, 0, 6, 1], [4, 2, 0, 5]  # an empty sequence on either side, Lq_b != Lk_b
    q, k, v, cu_q, cu_k, max_q, max_k = testing.random_packed(lq, lk, 4, 2, 16, 8)
    # (total, H, D) → (1, H, total, D)
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    layout = (cu_q, cu_k, max_q, max_k)
    philox = torch.tensor([123, 456], dtype=torch.int64)
    scalars = (0.25, 0.2, [3.0, 0.0, 0.0, 0.0, 2.0], list(fwd.INTERPRET_TILE))
    args = (q4, k4, v4, None, torch.rand(len(lq), 4), torch.randn(4), [], philox, *scalars, *layout)
    torch.library.opcheck(torch.ops.fastattn.triton_attn_fwd.default, args)
    out, lse = torch.ops.fastattn.triton_attn_fwd(*args)
    bscalars = (*scalars[:-1], list(bwd.INTERPRET_BLOCKS))
    bargs = (torch.randn_like(out), q4, k4, v4, out, lse, None, args[4], [], philox, *bscalars, False, *layout)
    torch.library.opcheck(torch.ops.fastattn.triton_attn_bwd.default, bargs)


def test_packed_visited_report_for_the_benchmark():
    """``testing.packed_visited`` (``benchmarks/varlen.py --visited``): the kernels' count is the minimum, below
    the padded batch's; backends without a counter give None."""
    lq = [40, 1, 0, 70, 17]
    q, k, v, cu, _, max_len, _ = testing.random_packed(lq, lq, 2, 2, 16)
    visited, minimum, padded = testing.packed_visited("triton", q, k, v, cu, cu, max_len, max_len, True)
    assert visited == minimum < padded
    assert testing.packed_visited("cpu", q, k, v, cu, cu, max_len, max_len, True) is None
