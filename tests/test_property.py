"""Hypothesis: random shapes, masks, windows, offsets and scales; every backend against an independent truth.

Fused backends are compared with the float64 oracle. The reference backend *is* the oracle, so it
is compared with the independent row-by-row computation instead (comparing the oracle with
itself would prove nothing).
"""

from __future__ import annotations

import pytest
import torch
from _independent import row_by_row
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastattn
from fastattn import reference
from fastattn.testing import assert_close, runnable_backends


@st.composite
def problems(draw):
    heads_kv = draw(st.integers(1, 2))
    group = draw(st.integers(1, 2))
    lq, lk = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    d = draw(st.sampled_from([8, 16, 24]))
    kw = {
        "is_causal": draw(st.booleans()),
        "scale": draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
        "q_offset": draw(st.integers(-lq, lk)),
        "window": draw(st.one_of(st.none(), st.tuples(st.integers(-1, 12), st.integers(-1, 12)))),
        "enable_gqa": group > 1,
    }
    mask = draw(st.sampled_from(["none", "bool", "padding", "float"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return heads_kv, group, lq, lk, d, mask, seed, kw


def _inputs(heads_kv, group, lq, lk, d, mask, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads_kv * group, lq, d, generator=g)
    k, v = torch.randn(1, heads_kv, lk, d, generator=g), torch.randn(1, heads_kv, lk, d, generator=g)
    attn_mask = {
        "none": None,
        "bool": torch.rand(1, 1, lq, lk, generator=g) > 0.3,
        "padding": torch.rand(1, 1, 1, lk, generator=g) > 0.3,
        "float": torch.randn(lq, lk, generator=g),
    }[mask]
    return q, k, v, attn_mask


FUSED = [name for name in fastattn.backends.names() if name != "reference"]


@pytest.mark.parametrize("backend", FUSED)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_fused_backend_matches_oracle(backend, problem):
    heads_kv, group, lq, lk, d, mask, seed, kw = problem
    q, k, v, attn_mask = _inputs(heads_kv, group, lq, lk, d, mask, seed)
    expected, expected_lse = reference.attention(
        q.double(),
        k.double(),
        v.double(),
        None if attn_mask is None else attn_mask.double() if attn_mask.dtype != torch.bool else attn_mask,
        return_lse=True,
        **kw,
    )
    if backend not in runnable_backends(q, k, v, attn_mask=attn_mask, **kw):
        return  # this backend refuses these inputs here (its reason is tested by the backend's own tests)
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, attn_mask, backend=backend, return_lse=True, **kw)
    assert_close(out, expected, name=f"{backend} out")
    assert_close(lse, expected_lse.float(), name=f"{backend} lse", atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(problems())
def test_reference_backend_matches_independent_rows(problem):
    heads_kv, group, lq, lk, d, mask, seed, kw = problem
    q, k, v, attn_mask = _inputs(heads_kv, group, lq, lk, d, mask, seed)
    q, k, v = q.double(), k.double(), v.double()
    attn_mask = attn_mask.double() if attn_mask is not None and attn_mask.dtype != torch.bool else attn_mask
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, attn_mask, backend="reference", return_lse=True, **kw)
    scale = kw["scale"] if kw["scale"] is not None else d**-0.5
    dense = None if attn_mask is None else attn_mask.expand(1, 1, lq, lk)[0, 0]
    bool_mask = dense if dense is not None and dense.dtype == torch.bool else None
    float_mask = dense if dense is not None and dense.dtype != torch.bool else None
    for h in range(q.shape[1]):
        exp_out, exp_lse = row_by_row(
            q[0, h],
            k[0, h // group],
            v[0, h // group],
            scale,
            kw["is_causal"],
            kw["window"] or (-1, -1),
            kw["q_offset"],
            bool_mask,
            float_mask,
        )
        torch.testing.assert_close(out[0, h], exp_out, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse[0, h], exp_lse, rtol=1e-10, atol=1e-10)
