"""The per-tile summary against the dense mask, tile by tile."""

from __future__ import annotations

import math

import pytest
import torch

from fastattn import Mask
from fastattn._validate import validate
from fastattn.masks import EMPTY, FULL, PARTIAL
from fastattn.reference import allowed_and_bias


def _spec(lq, lk, attn_mask=None, **kw):
    q, k = torch.randn(2, 3, lq, 8), torch.randn(2, 3, lk, 8)
    return validate(
        q, k, k, attn_mask, 0.0, kw.pop("is_causal", False), None, False, kw.pop("window", None), kw.pop("q_offset", 0),
        chunk=kw.pop("chunk", None),
    )[0]  # fmt: skip


def _dense_states(spec, bq, bk):
    """Brute force: every tile of the dense allowed matrix, judged on in-range positions."""
    allowed, bias = allowed_and_bias(spec, "cpu", torch.float32)
    if bias is not None:
        allowed = allowed & (bias != float("-inf"))
    allowed = allowed.expand(2, 3, spec.seqlen_q, spec.seqlen_k)
    nq, nk = math.ceil(spec.seqlen_q / bq), math.ceil(spec.seqlen_k / bk)
    states = torch.empty(2, 3, nq, nk, dtype=torch.int8)
    for a in range(nq):
        for b in range(nk):
            tile = allowed[:, :, a * bq : (a + 1) * bq, b * bk : (b + 1) * bk]
            full = tile.flatten(2).all(-1) & (bias is None)
            states[:, :, a, b] = torch.where(~tile.flatten(2).any(-1), EMPTY, torch.where(full, FULL, PARTIAL))
    return states


CASES = [
    dict(lq=37, lk=53, is_causal=True),
    dict(lq=16, lk=64, is_causal=True, q_offset=48),
    dict(lq=64, lk=64, window=(10, 0)),
    dict(lq=50, lk=70, window=(5, 9), q_offset=3),
    dict(lq=33, lk=33, window=(-1, 4), q_offset=-5),
    dict(lq=40, lk=45, mask="bool"),
    dict(lq=40, lk=45, mask="padding"),
    dict(lq=40, lk=45, mask="blocks", is_causal=True),
    dict(lq=29, lk=31, mask="float_inf", window=(6, 6)),
    dict(lq=1, lk=100, mask="padding", is_causal=True, q_offset=99),
    dict(lq=70, lk=70, chunk=24),
    dict(lq=70, lk=90, chunk=24, is_causal=True, q_offset=20),
    dict(lq=45, lk=60, chunk=10, window=(5, 2), q_offset=-7),
    dict(lq=40, lk=45, chunk=13, mask="padding", is_causal=True),
    dict(lq=33, lk=50, chunk=64, q_offset=-40),
]


def _make_mask(kind, lq, lk):
    if kind == "bool":
        return torch.rand(2, 3, lq, lk) > 0.5
    if kind == "padding":
        lengths = torch.tensor([lk - 13, lk])
        return (torch.arange(lk) < lengths[:, None]).view(2, 1, 1, lk)
    if kind == "blocks":  # coarse blocks so that EMPTY and FULL tiles both occur
        coarse = torch.rand(1, 3, math.ceil(lq / 16), math.ceil(lk / 16)) > 0.5
        return coarse.repeat_interleave(16, -2).repeat_interleave(16, -1)[..., :lq, :lk]
    if kind == "float_inf":
        m = torch.randn(lq, lk)
        m[:, 8:24] = float("-inf")
        return m
    return None


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("block", [(16, 16), (32, 16), (16, 64)])
def test_summary_matches_dense(case, block):
    case = dict(case)
    lq, lk = case.pop("lq"), case.pop("lk")
    spec = _spec(lq, lk, _make_mask(case.pop("mask", None), lq, lk), **case)
    summary = spec.tile_summary(*block)
    expected = _dense_states(spec, *block)
    state = summary.state.expand_as(expected)
    if spec.mask is None or not spec.has_structure:
        torch.testing.assert_close(state, expected, rtol=0, atol=0)
    else:
        # A band and a tensor combine per tile as min(band, tensor): always sound, but a tile that
        # only their conjunction empties stays PARTIAL (exactness would cost Lq x Lk work).
        assert not ((state == EMPTY) & (expected != EMPTY)).any(), "a tile with work was marked EMPTY"
        assert not ((state == FULL) & (expected != FULL)).any(), "a tile needing the mask was marked FULL"
        band = _spec(
            spec.seqlen_q, spec.seqlen_k, window=spec.window, q_offset=spec.q_offset, is_causal=spec.causal,
            chunk=spec.chunk or None,
        )  # fmt: skip
        tensor = _spec(spec.seqlen_q, spec.seqlen_k, spec.mask_base)
        bound = torch.minimum(_dense_states(band, *block), _dense_states(tensor, *block))
        torch.testing.assert_close(state, bound, rtol=0, atol=0)
    # kv lists: the non-empty tiles, in increasing order.
    for b in range(2):
        for h in range(3):
            for qt in range(expected.shape[2]):
                sb, sh = min(b, summary.state.shape[0] - 1), min(h, summary.state.shape[1] - 1)
                count = int(summary.kv_count[sb, sh, qt])
                listed = summary.kv_index[sb, sh, qt, :count].tolist()
                assert listed == (state[b, h, qt] != EMPTY).nonzero().flatten().tolist()


def test_summary_keeps_broadcast_dims():
    spec = _spec(64, 64, _make_mask("padding", 64, 64))
    assert spec.tile_summary(16, 16).state.shape == (2, 1, 4, 4)
    assert _spec(64, 64, is_causal=True).tile_summary(16, 16).state.shape == (1, 1, 4, 4)


def test_summary_is_cached_per_block():
    spec = _spec(40, 40, is_causal=True)
    assert spec.tile_summary(16, 16) is spec.tile_summary(16, 16)
    assert spec.tile_summary(32, 16) is not spec.tile_summary(16, 16)


def test_mask_object_reuses_base_summary_and_coarsens_exactly():
    lq, lk = 70, 90
    tensor = _make_mask("blocks", lq, lk)
    mask = Mask(tensor, base_block=(16, 16))
    for block in [(16, 16), (32, 32), (64, 16), (16, 48)]:
        direct = _spec(lq, lk, tensor, is_causal=True).tile_summary(*block)
        reused = _spec(lq, lk, mask, is_causal=True).tile_summary(*block)
        torch.testing.assert_close(reused.state, direct.state, rtol=0, atol=0)
        torch.testing.assert_close(reused.kv_index, direct.kv_index, rtol=0, atol=0)
    assert len(mask._base) == 1  # the tensor was reduced once, at the base block


def test_coarsen_refuses_non_multiples():
    summary = _spec(32, 32, is_causal=True).tile_summary(16, 16)
    with pytest.raises(ValueError, match=r"block: expected multiples of the base block \(16, 16\), got \(24, 16\)"):
        summary.coarsen(24, 16)


def test_attended_pairs_counts_the_dense_mask():
    tensor = _make_mask("bool", 20, 30)
    spec = _spec(20, 30, tensor, window=(3, 5))
    allowed, _ = allowed_and_bias(spec, "cpu", torch.float32)
    assert spec.attended_pairs(2, 3) == int(allowed.expand(2, 3, 20, 30).sum())
    assert _spec(8, 8, chunk=3).attended_pairs(2, 3) == (9 + 9 + 4) * 6
    assert _spec(8, 8, is_causal=True).attended_pairs(2, 3) == 36 * 6


@pytest.mark.parametrize(
    "lq, lk, left, right, offset, chunk",
    [
        (37, 53, -1, 0, 0, 7),
        (16, 64, -1, 0, 48, 16),
        (50, 70, 5, 9, 3, 0),
        (33, 33, -1, 4, -5, 10),
        (60, 20, 3, -1, -30, 9),
    ],
)
def test_row_bounds_monotone_and_gap_free(lq, lk, left, right, offset, chunk):
    """The premise of the analytic tile states: each row's interval [lo, hi] contains its own position and its
    ends never decrease, so consecutive rows' intervals leave no gap (variants module docstring)."""
    from fastattn.variants import row_bounds

    pos = torch.arange(lq) + offset
    lo, hi = row_bounds(pos, left, right, chunk, lq + lk + abs(offset) + 1)
    assert ((lo <= pos) & (pos <= hi)).all()
    assert (lo[1:] >= lo[:-1]).all() and (hi[1:] >= hi[:-1]).all()
    assert (lo[1:] <= hi[:-1] + 1).all()
