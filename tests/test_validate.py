"""Every validation error names the argument, what was expected and what was received."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn import scaled_dot_product_attention as sdpa


def _qkv(b=2, h=4, hk=4, lq=8, lk=8, d=16, dv=16, dtype=torch.float32):
    return (
        torch.randn(b, h, lq, d, dtype=dtype),
        torch.randn(b, hk, lk, d, dtype=dtype),
        torch.randn(b, hk, lk, dv, dtype=dtype),
    )


def test_too_few_dims():
    q = torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"query: expected a 3-D .* or 4-D .* got 2-D with shape \(8, 16\)"):
        sdpa(q, q, q)


def test_too_many_dims():
    q = torch.randn(1, 2, 3, 8, 16)
    with pytest.raises(ValueError, match=r"query: expected .* got 5-D"):
        sdpa(q, q, q)


def test_not_a_tensor():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="key: expected a torch.Tensor, got list"):
        sdpa(q, [1.0], v)


def test_dtype_mismatch():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="expected one dtype, got query torch.float32, key torch.float64"):
        sdpa(q, k.double(), v)


def test_non_floating_dtype():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="query: expected a floating dtype .* got torch.int64"):
        sdpa(q.long(), k.long(), v.long())


def test_head_dim_mismatch():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"key: expected head_dim 16 \(query's last dim\), got 8"):
        sdpa(q, k[..., :8], v)


def test_key_value_length_mismatch():
    q, k, v = _qkv(lk=8)
    with pytest.raises(ValueError, match=r"value: expected the same seqlen as key \(8\), got 7"):
        sdpa(q, k, v[:, :, :7])


def test_batch_mismatch():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"expected batch size 2 \(query's\), got key 1"):
        sdpa(q, k[:1], v[:1])


def test_head_count_without_gqa():
    q, k, v = _qkv(h=4, hk=2)
    with pytest.raises(ValueError, match=r"expected 4 heads \(query's\) unless enable_gqa=True, got 2"):
        sdpa(q, k, v)


def test_head_count_not_dividing():
    q, k, v = _qkv(h=4, hk=3)
    with pytest.raises(ValueError, match="with enable_gqa, expected a head count dividing query's 4, got 3"):
        sdpa(q, k, v, enable_gqa=True)


def test_key_value_heads_differ():
    q, k, v = _qkv(h=4, hk=2)
    with pytest.raises(ValueError, match=r"value: expected 2 heads \(key's\), got 4"):
        sdpa(q, k, torch.randn(2, 4, 8, 16), enable_gqa=True)


def test_mask_dtype():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="attn_mask: expected dtype bool or a floating dtype, got torch.int32"):
        sdpa(q, k, v, torch.ones(8, 8, dtype=torch.int32))


def test_mask_not_broadcastable():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"attn_mask: expected a shape broadcastable to \(2, 4, 8, 8\), got \(3, 8\)"):
        sdpa(q, k, v, torch.ones(3, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="broadcastable"):
        sdpa(q, k, v, torch.ones(1, 2, 4, 8, 8, dtype=torch.bool))


def test_mask_wrong_type():
    q, k, v = _qkv()
    with pytest.raises(
        TypeError, match="attn_mask: expected a torch.Tensor, fastattn.Mask, CausalBias or None, got str"
    ):
        sdpa(q, k, v, "causal")


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_range(p):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=rf"dropout_p: expected a float in \[0, 1\), got {p}"):
        sdpa(q, k, v, dropout_p=p)


def test_dropout_type():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="dropout_p: expected a float in"):
        sdpa(q, k, v, dropout_p="0.1")


@pytest.mark.parametrize(
    "window,exc,msg",
    [
        ((-2, 3), ValueError, r"window: expected integers >= -1 \(-1 = unbounded\), got \(-2, 3\)"),
        ((1,), TypeError, r"window: expected a pair \(left, right\) of integers >= -1, got \(1,\)"),
        (4, TypeError, r"window: expected a pair"),
        ((1.5, 2), TypeError, r"window\[0\]: expected an integer, got float 1.5"),
        ((True, 2), TypeError, r"window\[0\]: expected an integer, got bool"),
    ],
)
def test_window(window, exc, msg):
    q, k, v = _qkv()
    with pytest.raises(exc, match=msg):
        sdpa(q, k, v, window=window)


@pytest.mark.parametrize("offset", [1.0, "2", None])
def test_q_offset_type(offset):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="q_offset: expected an integer, got"):
        sdpa(q, k, v, q_offset=offset)


def test_unknown_backend_lists_known():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"backend: expected one of \['auto', 'reference'.*got 'flash9'"):
        sdpa(q, k, v, backend="flash9")


def test_scale_and_flags():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="scale: expected a float or None, got str"):
        sdpa(q, k, v, scale="0.1")
    with pytest.raises(ValueError, match="scale: expected a finite number, got inf"):
        sdpa(q, k, v, scale=float("inf"))
    with pytest.raises(TypeError, match="is_causal: expected a bool, got int"):
        sdpa(q, k, v, is_causal=1)
    with pytest.raises(TypeError, match="enable_gqa: expected a bool, got str"):
        sdpa(q, k, v, enable_gqa="yes")


def test_device_mismatch_of_mask_is_named():
    q, k, v = _qkv()
    mask = torch.ones(8, 8, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match=r"attn_mask: expected device cpu \(query's\), got meta"):
        sdpa(q, k, v, mask)


def test_causal_bias_conflicts_with_offset():
    from torch.nn.attention.bias import causal_lower_right

    q, k, v = _qkv(lq=4, lk=8)
    with pytest.raises(
        ValueError, match="q_offset: causal_lower_right already aligns queries at Lk - Lq; expected 0, got 1"
    ):
        sdpa(q, k, v, causal_lower_right(4, 8), q_offset=1)
    with pytest.raises(ValueError, match=r"attn_mask: expected a CausalBias for seqlens \(4, 8\), got \(4, 9\)"):
        sdpa(q, k, v, causal_lower_right(4, 9))


def test_named_backend_that_cannot_run_says_why():
    class Picky(fastattn.backends.Backend):
        name = "picky-test"

        def unsupported_reason(self, params):
            return f"head_dim must be 64, got {params.head_dim}"

    fastattn.backends.register(Picky())
    try:
        q, k, v = _qkv()
        with pytest.raises(
            fastattn.backends.UnsupportedError, match="'picky-test' cannot run this call: head_dim must be 64, got 16"
        ):
            sdpa(q, k, v, backend="picky-test")
    finally:
        fastattn.backends.registry._REGISTRY.pop("picky-test")


@pytest.mark.parametrize(
    "kw, exc, msg",
    [
        ({"softcap": 0.0}, ValueError, r"softcap: expected a finite number > 0 \(or None\), got 0.0"),
        ({"softcap": -1.0}, ValueError, r"softcap: expected a finite number > 0"),
        ({"softcap": float("inf")}, ValueError, r"softcap: expected a finite number > 0"),
        ({"softcap": "30"}, TypeError, r"softcap: expected a positive float or None, got str"),
        ({"chunk": 0}, ValueError, r"chunk: expected an integer >= 1 \(or None\), got 0"),
        ({"chunk": 8.0}, TypeError, r"chunk: expected an integer, got float 8.0"),
        ({"alibi_slopes": [0.5] * 4}, TypeError, r"alibi_slopes: expected a torch.Tensor or None, got list"),
        ({"alibi_slopes": torch.ones(3)}, ValueError, r"alibi_slopes: expected shape \(4,\) or \(2, 4\), got \(3\)"),
        ({"alibi_slopes": torch.ones(4, dtype=torch.int64)}, TypeError, r"alibi_slopes: expected a floating dtype"),
        (
            {"alibi_slopes": torch.ones(4, requires_grad=True)},
            ValueError,
            r"alibi_slopes: no gradient is computed for ALiBi slopes .* pass alibi_slopes.detach\(\)",
        ),
        ({"alibi_slopes": torch.ones(4, device="meta")}, ValueError, r"alibi_slopes: expected device cpu"),
        (
            {"sinks": torch.ones(2, 4)},
            ValueError,
            r"sinks: expected shape \(4,\) \(one logit per query head\), got \(2, 4\)",
        ),
        ({"sinks": torch.ones(4, dtype=torch.int32)}, TypeError, r"sinks: expected a floating dtype, got torch.int32"),
        ({"sinks": 1.0}, TypeError, r"sinks: expected a torch.Tensor or None, got float"),
    ],
)
def test_variant_arguments(kw, exc, msg):
    q, k, v = _qkv()
    with pytest.raises(exc, match=msg):
        sdpa(q, k, v, **kw)


def test_variant_refused_by_a_backend_is_named():
    """A backend whose capability table lacks a variant refuses it by name (the table is the refusal)."""
    from fastattn._validate import validate
    from fastattn.backends.registry import Capabilities

    caps = Capabilities(devices=("cpu",), dtypes=(torch.float32,), features=frozenset({"gqa"}))
    q, k, v = _qkv()
    params, *_ = validate(q, k, v, None, 0.1, softcap=5.0, chunk=4, sinks=torch.zeros(4))
    reason = caps.reason(params)
    assert reason == (
        "it has no dropout (dropout_p > 0), no logit softcap (softcap=), no attention sinks (sinks=), "
        "no chunked attention (chunk=)"
    )
    params, *_ = validate(q.double(), k.double(), v.double())
    assert caps.reason(params) == "dtype torch.float64 is not supported (float32): cast the inputs with .float()"
