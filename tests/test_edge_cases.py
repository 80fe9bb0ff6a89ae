"""Defined edge cases, through the entry point, on every backend that runs here."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.backends import names
from fastattn.testing import assert_close, runnable_backends

sdpa = fastattn.scaled_dot_product_attention


def _backends_for(q, k, v, **kw):
    found = runnable_backends(q, k, v, **kw)
    assert "reference" in found
    return found


@pytest.mark.parametrize("backend", names())
def test_batch_zero_gives_empty_output(backend):
    q, k, v = torch.randn(0, 2, 5, 8), torch.randn(0, 2, 7, 8), torch.randn(0, 2, 7, 4)
    out, lse = sdpa(q, k, v, backend=backend, return_lse=True)
    assert out.shape == (0, 2, 5, 4) and lse.shape == (0, 2, 5)


@pytest.mark.parametrize("backend", names())
def test_zero_keys_give_zeros_and_zero_grads(backend):
    q = torch.randn(2, 3, 5, 8, requires_grad=True)
    k, v = torch.randn(2, 3, 0, 8, requires_grad=True), torch.randn(2, 3, 0, 6, requires_grad=True)
    out, lse = sdpa(q, k, v, backend=backend, return_lse=True)
    assert out.shape == (2, 3, 5, 6)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


def test_query_length_one_and_non_contiguous_inputs():
    # (B, L, H, D) storage viewed as (B, H, L, D): the layout transformers and MHA produce.
    q = torch.randn(2, 1, 4, 16).transpose(1, 2)
    k = torch.randn(2, 37, 4, 16).transpose(1, 2)
    v = torch.randn(2, 37, 4, 32).transpose(1, 2)[..., ::2]  # stride(-1) == 2
    assert not k.is_contiguous() and v.stride(-1) == 2
    expected = reference.attention(q.double(), k.double(), v.double(), is_causal=True, q_offset=36)
    for backend in _backends_for(q, k, v, is_causal=True, q_offset=36):
        out = sdpa(q, k, v, is_causal=True, q_offset=36, backend=backend)
        assert_close(out, expected, name=f"{backend} out")


def test_nan_in_a_query_row_stays_in_that_row():
    q, k, v = torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    q[0, 1, 4, 3] = float("nan")
    for backend in _backends_for(q, k, v):
        out = sdpa(q, k, v, backend=backend)
        nan_rows = torch.isnan(out).any(-1)
        expected = torch.zeros_like(nan_rows)
        expected[0, 1, 4] = True
        assert torch.equal(nan_rows, expected), backend


def test_nan_in_a_key_reaches_only_rows_that_attend_it():
    q, k, v = torch.randn(1, 1, 12, 8), torch.randn(1, 1, 12, 8), torch.randn(1, 1, 12, 8)
    k[0, 0, 6, 0] = float("nan")
    for backend in _backends_for(q, k, v, is_causal=True):
        out = sdpa(q, k, v, is_causal=True, backend=backend)
        nan_rows = torch.isnan(out).any(-1)[0, 0]
        assert nan_rows[6:].all() and not nan_rows[:6].any(), backend


def test_fully_masked_rows_give_zeros_and_zero_grads_never_nan():
    q = torch.randn(2, 2, 10, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 10, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 10, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 1, 10, 10) > 0.5
    mask[:, :, 3] = False  # row 3 attends nothing
    for backend in _backends_for(q, k, v, attn_mask=mask):
        out, lse = sdpa(q, k, v, mask, backend=backend, return_lse=True)
        assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
        assert torch.isneginf(lse[:, :, 3]).all()
        (grad_q,) = torch.autograd.grad(out.sum(), q)
        assert torch.isfinite(grad_q).all() and torch.equal(grad_q[:, :, 3], torch.zeros_like(grad_q[:, :, 3]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_half_scores_do_not_overflow(dtype):
    # Scores around 3e4 * 64: far beyond fp16's range if formed in fp16.
    q = (torch.randn(1, 2, 33, 64) * 170).to(dtype)
    k = (torch.randn(1, 2, 33, 64) * 170).to(dtype)
    v = torch.randn(1, 2, 33, 64).to(dtype)
    expected = reference.attention(q.double(), k.double(), v.double(), scale=1.0)
    for backend in _backends_for(q, k, v):
        out = sdpa(q, k, v, scale=1.0, backend=backend)
        assert torch.isfinite(out).all(), backend
        assert_close(out, expected, name=f"{backend} out")


def test_three_d_inputs_and_lse_shape():
    q, k, v = torch.randn(4, 17, 8), torch.randn(2, 33, 8), torch.randn(2, 33, 5)
    out, lse = sdpa(q, k, v, enable_gqa=True, return_lse=True)
    assert out.shape == (4, 17, 5) and lse.shape == (4, 17) and lse.dtype == torch.float32
    expected, expected_lse = reference.attention(q.double(), k.double(), v.double(), enable_gqa=True, return_lse=True)
    assert_close(out, expected)
    assert_close(lse, expected_lse.float(), name="lse")
