"""The oracle against torch's math SDPA (float64) and against an independent row-by-row computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _independent import row_by_row
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastattn import reference


def _torch_math(q, k, v, **kw):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, **kw)


def _rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize(
    "batch,hq,hkv,lq,lk,d,dv",
    [(1, 1, 1, 1, 1, 8, 8), (2, 4, 4, 17, 33, 16, 16), (2, 8, 2, 65, 40, 32, 24), (1, 3, 1, 129, 7, 8, 16)],
)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "bool_broadcast", "float", "causal"])
def test_oracle_matches_torch_math(batch, hq, hkv, lq, lk, d, dv, mask_kind):
    q, k, v = _rand(batch, hq, lq, d), _rand(batch, hkv, lk, d), _rand(batch, hkv, lk, dv)
    kw = {"enable_gqa": hq != hkv, "scale": 0.3}
    if mask_kind == "bool":
        kw["attn_mask"] = torch.rand(batch, hq, lq, lk) > 0.3
        kw["attn_mask"][..., 0] = True  # torch gives NaN for an empty row; the oracle gives 0
    elif mask_kind == "bool_broadcast":
        kw["attn_mask"] = torch.rand(batch, 1, 1, lk) > 0.3
        kw["attn_mask"][..., 0] = True
    elif mask_kind == "float":
        kw["attn_mask"] = _rand(lq, lk)
    elif mask_kind == "causal":
        kw["is_causal"] = True
    out, lse = reference.attention(q, k, v, return_lse=True, **kw)
    expected = _torch_math(q, k, v, **kw)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert lse.shape == (batch, hq, lq) and lse.dtype == torch.float64


@pytest.mark.parametrize(
    "lq,lk,causal,window,q_offset,mask",
    [
        (9, 9, False, (2, 1), 0, None),
        (7, 12, True, (3, -1), 0, None),
        (5, 12, True, (-1, -1), 7, None),  # bottom-right causal (q_offset = Lk - Lq)
        (12, 5, True, (-1, -1), 0, None),  # top-left causal, Lq > Lk: leading rows see key 0 only
        (8, 8, True, (-1, -1), -3, None),  # negative offset: the first rows attend nothing
        (10, 14, True, (-1, -1), 0, "bool"),  # causal combined with a mask
        (10, 14, False, (4, 4), 2, "float"),
        (6, 30, False, (0, 0), 3, "bool"),
    ],
)
def test_oracle_matchesrow_by_row(lq, lk, causal, window, q_offset, mask):
    heads, d = 2, 8
    q, k, v = _rand(heads, lq, d), _rand(heads, lk, d), _rand(heads, lk, d)
    bool_mask = torch.rand(lq, lk) > 0.4 if mask == "bool" else None
    float_mask = _rand(lq, lk) if mask == "float" else None
    attn_mask = bool_mask if bool_mask is not None else float_mask
    out, lse = reference.attention(
        q, k, v, attn_mask, is_causal=causal, scale=0.7, window=window, q_offset=q_offset, return_lse=True
    )
    for h in range(heads):
        exp_out, exp_lse = row_by_row(q[h], k[h], v[h], 0.7, causal, window, q_offset, bool_mask, float_mask)
        torch.testing.assert_close(out[h], exp_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse[h], exp_lse, rtol=1e-12, atol=1e-12)


def test_oracle_dropout_from_keep_mask():
    q, k, v = _rand(1, 2, 9, 8), _rand(1, 2, 11, 8), _rand(1, 2, 11, 8)
    keep = torch.rand(1, 2, 9, 11) > 0.25
    out = reference.attention(q, k, v, keep_mask=keep, dropout_p=0.25)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    expected = (probs * keep / 0.75) @ v
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "mask_kind, variant",
    [("none", "plain"), ("float", "plain"), ("causal_bool", "plain"), ("window", "plain"), ("float", "all"),
     ("causal_bool", "softcap"), ("none", "sinks"), ("window", "alibi"), ("causal_bool", "chunk")],
)  # fmt: skip
def test_explicit_backward_matches_autograd(mask_kind, variant):
    """attention_backward (the kernels' statement) equals autograd through the oracle: GQA, dropout, every
    variant (the softcap's 1 - tanh², the sinks' gradient) included."""
    from fastattn._validate import validate
    from fastattn.testing import variant_kwargs

    q, k, v = _rand(2, 4, 13, 8), _rand(2, 2, 19, 8), _rand(2, 2, 19, 12)
    for t in (q, k, v):
        t.requires_grad_()
    kw = {"enable_gqa": True, "scale": 0.4, **variant_kwargs(variant, 2, 4, 13, 19, torch.Generator().manual_seed(3))}
    if "sinks" in kw:
        kw["sinks"] = kw["sinks"].double().requires_grad_()
    mask = None
    if mask_kind == "float":
        mask = _rand(2, 1, 13, 19).requires_grad_()
    elif mask_kind == "causal_bool":
        mask, kw["is_causal"] = torch.rand(13, 19) > 0.3, True
    elif mask_kind == "window":
        kw["window"], kw["q_offset"] = (3, 2), 4
    keep = torch.rand(2, 4, 13, 19) > 0.2
    out = reference.attention(q, k, v, mask, keep_mask=keep, dropout_p=0.2, **kw)
    grad_out = _rand(*out.shape)
    inputs = [q, k, v] + ([mask] if mask is not None and mask.requires_grad else [])
    inputs += [kw["sinks"]] if "sinks" in kw else []
    grads = torch.autograd.grad(out, inputs, grad_out)

    params, q4, k4, v4 = validate(
        q, k, v, mask, 0.2, kw.pop("is_causal", False), kw.pop("scale"), kw.pop("enable_gqa"), kw.pop("window", None),
        kw.pop("q_offset", 0), **kw,
    )  # fmt: skip
    dq, dk, dv, ds, dsinks = reference.attention_backward(grad_out, q4, k4, v4, params, keep)
    torch.testing.assert_close(dq, grads[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dk, grads[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dv, grads[2], rtol=1e-10, atol=1e-10)
    if mask_kind == "float":
        torch.testing.assert_close(ds.sum(1, keepdim=True), grads[3], rtol=1e-10, atol=1e-10)
    if "sinks" in kw:
        torch.testing.assert_close(dsinks, grads[-1], rtol=1e-10, atol=1e-10)


def test_low_precision_oracle_computes_in_requested_dtype():
    """compute_dtype=float16 measures plain PyTorch's own fp16 error (the tolerance baseline)."""
    q, k, v = (t.half() for t in (_rand(1, 2, 64, 32), _rand(1, 2, 64, 32), _rand(1, 2, 64, 32)))
    exact = reference.attention(q.double(), k.double(), v.double())
    half = reference.attention(q, k, v, compute_dtype=torch.float16)
    upcast = reference.attention(q, k, v)
    err_half = (half.double() - exact).abs().max()
    err_up = (upcast.double() - exact).abs().max()
    assert half.dtype == upcast.dtype == torch.float16
    assert err_half > err_up  # fp16 arithmetic is measurably worse than fp32 arithmetic


def test_backward_from_global_lse_decomposes_over_key_blocks():
    """Given the whole problem's out and lse, per-block gradients add up to the whole (ring attention's premise)."""
    from fastattn._validate import validate

    q, k, v = _rand(1, 2, 10, 8), _rand(1, 2, 24, 8), _rand(1, 2, 24, 8)
    grad_out = _rand(1, 2, 10, 8)
    params, q4, k4, v4 = validate(q, k, v, None, 0.0, True, None, False, (9, -1), 14, softcap=2.0)
    out, lse = reference.attention_forward(q4, k4, v4, params)
    whole = reference.attention_backward(grad_out, q4, k4, v4, params)
    dq = torch.zeros_like(q)
    dk, dv = [], []
    for start in (0, 12):
        block, _, kb, vb = validate(
            q, k[:, :, start : start + 12], v[:, :, start : start + 12], None, 0.0, True, None, False, (9, -1),
            14 - start, softcap=2.0,
        )  # fmt: skip
        g = reference.attention_backward(grad_out, q4, kb, vb, block, out=out, lse=lse)
        dq += g[0]
        dk.append(g[1])
        dv.append(g[2])
    torch.testing.assert_close(dq, whole[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat(dk, 2), whole[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat(dv, 2), whole[2], rtol=1e-10, atol=1e-10)
