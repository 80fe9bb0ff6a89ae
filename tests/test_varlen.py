"""Packed variable-length sequences (``fastattn.varlen_attention``): the oracle, the entry point, its errors.

The ground truth is ``fastattn.reference.varlen_attention``: the dense oracle run on every sequence alone
(aligned bottom-right), through plain autograd. It is checked here against torch's math SDPA on each
sequence with an explicit mask, and against the dense entry point when every sequence has the same length.
Each backend's packed kernels are checked against it through ``fastattn.testing.check_varlen`` in this file
(the reference backend) and in the backend's own test file.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastattn
from fastattn import reference, testing
from fastattn.backends import registry
from fastattn.backends._philox import keep_mask, keep_mask_sequence

varlen = fastattn.varlen_attention


def _packed(kind="short", hq=4, hkv=2, d=16, dv=None, dtype=torch.float32, index_dtype=torch.int32):
    lq, lk = testing.packed_lengths(kind)
    return testing.random_packed(lq, lk, hq, hkv, d, dv, dtype=dtype, index_dtype=index_dtype)


# ---------------------------------------------------------------------------------------------- the oracle


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (False, (3, 2)), (True, (4, -1))])
def test_oracle_is_torch_math_on_each_sequence(causal, window):
    """Independent of fastattn's rules: each sequence through torch's math SDPA with an explicit mask."""
    q, k, v, cu_q, cu_k, max_q, max_k = _packed("cross", dtype=torch.float64)
    kw = {"is_causal": causal, "window": window, "enable_gqa": True}
    out, lse = reference.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, return_lse=True, **kw)
    for b in range(cu_q.shape[0] - 1):
        sq, eq, sk, ek = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        lq, lk = eq - sq, ek - sk
        if lq == 0:
            continue
        if lk == 0:
            assert torch.equal(out[sq:eq], torch.zeros_like(out[sq:eq])) and torch.isneginf(lse[:, sq:eq]).all()
            continue
        pos = torch.arange(lq).unsqueeze(1) + (lk - lq)  # bottom-right: query i sits at key i + Lk - Lq
        j = torch.arange(lk).unsqueeze(0)
        allowed = torch.ones(lq, lk, dtype=torch.bool)
        if causal:
            allowed &= j <= pos
        if window is not None:
            if window[0] >= 0:
                allowed &= j >= pos - window[0]
            if window[1] >= 0:
                allowed &= j <= pos + window[1]
        # (L, H, D) → (1, H, L, D)
        qb, kb, vb = (t.transpose(0, 1).unsqueeze(0) for t in (q[sq:eq], k[sk:ek], v[sk:ek]))
        kb, vb = kb.repeat_interleave(2, 1), vb.repeat_interleave(2, 1)
        with sdpa_kernel(SDPBackend.MATH):
            expected = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed)
        rows = allowed.any(-1)  # torch gives NaN for a row with nothing to attend; fastattn gives zeros
        got = out[sq:eq].transpose(0, 1).unsqueeze(0)
        torch.testing.assert_close(got[:, :, rows], expected[:, :, rows], rtol=1e-12, atol=1e-12)
        assert torch.equal(got[:, :, ~rows], torch.zeros_like(got[:, :, ~rows]))


@pytest.mark.parametrize("causal", [False, True])
def test_equal_lengths_are_the_dense_batch(causal):
    """One sequence per row of a dense batch: varlen on the flattened batch equals the dense entry point."""
    batch, hq, hkv, lq, lk, d = 3, 4, 2, 13, 21, 8
    q, k, v = testing.random_qkv(batch, hq, hkv, lq, lk, d, dtype=torch.float64)
    dense = fastattn.scaled_dot_product_attention(
        q, k, v, is_causal=causal, q_offset=lk - lq, enable_gqa=True, backend="reference"
    )
    # (B, H, L, D) → (B·L, H, D)
    flat = [t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (q, k, v)]
    cu_q = torch.arange(batch + 1, dtype=torch.int32) * lq
    cu_k = torch.arange(batch + 1, dtype=torch.int64) * lk
    out = varlen(*flat, cu_q, cu_k, lq, lk, is_causal=causal, enable_gqa=True, backend="reference")
    torch.testing.assert_close(out, dense.transpose(1, 2).reshape(-1, hq, d), rtol=1e-12, atol=1e-12)


def test_dropout_numbers_are_the_padded_batchs():
    """Sequence b draws row b of the keep-mask of the batch padded to the maximum lengths."""
    philox = torch.tensor([0x1234_5678_9ABC, 77], dtype=torch.int64)
    full = keep_mask(philox, 3, 2, 9, 11, 0.3)
    for b, (lq, lk) in enumerate([(9, 4), (0, 11), (5, 11)]):
        assert torch.equal(keep_mask_sequence(philox, b, 2, lq, lk, 9, 11, 0.3), full[b : b + 1, :, :lq, :lk])


# ---------------------------------------------------------------------------------------------- the entry point


_REFERENCE_CASES = testing.pairwise(
    {
        "lengths": ["cross", "self", "single", "uniform"],
        "mask": list(testing.PACKED_MASK_KINDS),
        "variant": ["plain", "softcap", "alibi", "sinks", "chunk", "all"],
        "gqa": [1, 2],
    }
)


@pytest.mark.parametrize("case", _REFERENCE_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_reference_backend_against_the_oracle(case):
    g = torch.Generator().manual_seed(3)
    lq, lk = testing.packed_lengths(case["lengths"], g)
    hq = 4
    q, k, v, cu_q, cu_k, max_q, max_k = testing.random_packed(lq, lk, hq, hq // case["gqa"], 16, 8, generator=g)
    kw = {**testing.packed_mask_kwargs(case["mask"], max_k), "enable_gqa": case["gqa"] > 1}
    kw.update(testing.variant_kwargs(case["variant"], len(lq), hq, max_q, max_k, g))
    testing.check_varlen("reference", q, k, v, cu_q, cu_k, max_q, max_k, kw)


def test_reference_backend_dropout_against_the_oracle():
    q, k, v, cu_q, cu_k, max_q, max_k = _packed("cross")
    kw = {"dropout_p": 0.3, "is_causal": True, "enable_gqa": True, "sinks": torch.randn(4)}
    testing.check_varlen("reference", q, k, v, cu_q, cu_k, max_q, max_k, kw)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_outputs_are_contiguous_and_lse_documented(index_dtype):
    q, k, v, cu_q, cu_k, max_q, max_k = _packed(dv=8, index_dtype=index_dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = varlen(q, k, v, cu_q, cu_k, max_q, max_k, enable_gqa=True, return_lse=True, backend="reference")
    assert out.shape == (q.shape[0], 4, 8) and out.is_contiguous()
    assert lse.shape == (4, q.shape[0]) and lse.dtype == torch.float32
    out.sum().backward()
    assert q.grad.is_contiguous() and k.grad.is_contiguous() and v.grad.is_contiguous()


def test_empty_sequences_and_empty_batches():
    h, d = 2, 8
    # Every key sequence empty: zeros, lse -inf (or the sink), zero gradients.
    q = torch.randn(5, h, d, requires_grad=True)
    k, v = torch.randn(0, h, d), torch.randn(0, h, d)
    cu_q, cu_k = torch.tensor([0, 2, 5], dtype=torch.int32), torch.zeros(3, dtype=torch.int32)
    sinks = torch.randn(h, requires_grad=True)
    out, lse = varlen(q, k, v, cu_q, cu_k, 3, 0, sinks=sinks, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(lse, sinks.detach()[:, None].expand(h, 5))
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q)) and torch.equal(sinks.grad, torch.zeros_like(sinks))
    # No sequences at all.
    empty = torch.zeros(1, dtype=torch.int64)
    out = varlen(torch.randn(0, h, d), k, v, empty, empty, 0, 0)
    assert out.shape == (0, h, d)


def test_compile_fullgraph_training_step():
    """A training step's forward traces into one graph (max lengths are ints: no ``.item()``); AOT autograd
    compiles its backward."""
    torch._dynamo.reset()
    q, k, v, cu_q, cu_k, max_q, max_k = _packed("short")
    proj = torch.nn.Linear(16, 16, dtype=torch.float32)
    sinks = torch.randn(4, requires_grad=True)

    def loss_fn(q, k, v):
        out = varlen(proj(q), k, v, cu_q, cu_k, max_q, max_k, is_causal=True, enable_gqa=True, sinks=sinks,
                     backend="reference")  # fmt: skip
        return out.square().mean()

    loss = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(q, k, v)
    grads = torch.autograd.grad(loss, [proj.weight, sinks])
    expected = loss_fn(q, k, v)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grads, list(torch.autograd.grad(expected, [proj.weight, sinks])))


def test_opcheck_reference_ops_packed():
    q, k, v, cu_q, cu_k, max_q, max_k = _packed("short", dv=8)
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    philox = torch.tensor([123, 456], dtype=torch.int64)
    layout = (cu_q, cu_k, max_q, max_k)
    for alibi, sinks, ph, p in ((None, None, None, 0.0), (torch.rand(len(cu_q) - 1, 4), torch.randn(4), philox, 0.2)):
        scalars = (0.25, p, [3.0, 0.0, 0.0, 0.0, 2.0], [])
        fwd = (q4, k4, v4, None, alibi, sinks, [], ph, *scalars, *layout)
        torch.library.opcheck(torch.ops.fastattn.reference_fwd.default, fwd)
        out, lse = torch.ops.fastattn.reference_fwd(*fwd)
        grad_out = torch.randn_like(out)
        bwd = (grad_out, q4, k4, v4, out, lse, None, alibi, [], ph, *scalars, False, *layout)
        torch.library.opcheck(torch.ops.fastattn.reference_bwd.default, bwd)


def test_every_kernel_backend_claims_packed_or_refuses_it_with_the_reason():
    params, *_ = fastattn._validate.validate_packed(*_packed()[:7], enable_gqa=True)
    assert "packed" in params.features
    for name in registry.names():
        backend = registry.get(name)
        if "packed" not in backend.capabilities.features:
            assert "packed variable-length sequences" in backend.unsupported_reason(params)
    # Every fused backend has a packed path now (the CUDA kernels through seq_info; tests/test_varlen_cuda.py).
    for name in ("triton", "cpu", "cuda"):
        assert "packed" in registry.get(name).capabilities.features, name


# ---------------------------------------------------------------------------------------------- bad input


def _args(**changes):
    q, k, v, cu_q, cu_k, max_q, max_k = _packed("short")
    args = {"query": q, "key": k, "value": v, "cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k,
            "max_seqlen_q": max_q, "max_seqlen_k": max_k, "enable_gqa": True}  # fmt: skip
    args.update(changes)
    return args


def _cu(values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype)


@pytest.mark.parametrize(
    "changes,error,match",
    [
        ({"cu_seqlens_q": _cu([0, 5, 5, 22, 23, 63, 66], torch.float32)}, TypeError,
         r"cu_seqlens_q: expected dtype torch.int32 or torch.int64, got torch.float32"),
        ({"cu_seqlens_k": [0, 9, 12]}, TypeError, r"cu_seqlens_k: expected a torch.Tensor"),
        ({"cu_seqlens_q": _cu([[0, 66]])}, ValueError, r"cu_seqlens_q: expected a 1-D tensor \(batch \+ 1,\)"),
        ({"cu_seqlens_q": _cu([1, 5, 5, 22, 23, 63, 66])}, ValueError,
         r"cu_seqlens_q: expected offsets starting at 0, got 1 first"),
        ({"cu_seqlens_q": _cu([0, 5, 4, 22, 23, 63, 66])}, ValueError,
         r"cu_seqlens_q: expected nondecreasing offsets .* got 5 then 4 at entries 1, 2"),
        ({"cu_seqlens_k": _cu([0, 9, 12, 12, 45, 80, 80])}, ValueError,
         r"cu_seqlens_k: expected the last offset to equal the key tokens \(81, key.shape\[0\]\), got 80"),
        ({"cu_seqlens_k": _cu([0, 9, 12, 12, 45, 81])}, ValueError,
         r"cu_seqlens_k: expected the same number of sequences as cu_seqlens_q \(6, .*got 5"),
        ({"max_seqlen_q": 17}, ValueError,
         r"max_seqlen_q: expected at least the longest sequence of cu_seqlens_q \(40\), got 17"),
        ({"max_seqlen_k": torch.tensor(35)}, TypeError, r"max_seqlen_k: expected a Python int"),
        ({"max_seqlen_k": -1}, ValueError, r"max_seqlen_k: expected an integer >= 0, got -1"),
        ({"query": torch.randn(1, 66, 4, 16)}, ValueError,
         r"query: expected a 3-D \(total_tokens, heads, head_dim\) tensor of packed sequences, got 4-D"),
        ({"value": torch.randn(80, 2, 16)}, ValueError, r"value: expected as many tokens as key \(81\), got 80"),
        ({"enable_gqa": False}, ValueError, r"key, value: expected 4 heads \(query's\) unless enable_gqa=True, got 2"),
        ({"alibi_slopes": torch.rand(5, 4)}, ValueError, r"alibi_slopes: expected shape \(4,\) or \(6, 4\), got"),
    ],
)  # fmt: skip
def test_bad_input_is_named(changes, error, match):
    with pytest.raises(error, match=match):
        varlen(**_args(**changes))


def test_cu_seqlens_on_another_device_is_named():
    args = _args(cu_seqlens_q=_cu([0, 5, 5, 22, 23, 63, 66]).to("meta"))
    with pytest.raises(ValueError, match=r"cu_seqlens_q: expected device cpu \(query's\), got meta"):
        varlen(**args)


def test_values_are_checked_again_after_an_in_place_change():
    args = _args()
    varlen(**args, backend="reference")
    args["cu_seqlens_q"][1] = 70  # same tensor object, new version: checked again
    with pytest.raises(ValueError, match="cu_seqlens_q: expected nondecreasing offsets"):
        varlen(**args, backend="reference")


# ---------------------------------------------------------------------------------------------- scheduling


def test_tile_schedule_lists_every_real_tile_once_and_no_other():
    from fastattn.backends._varlen import num_programs, tile_schedule

    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        lengths = torch.randint(0, 150, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        block = int(torch.randint(1, 70, (1,), generator=g))
        cu = testing.cu_seqlens(lengths, torch.int64)
        sched = tile_schedule(cu, block, sum(lengths))
        assert sched.dtype == torch.int32 and sched.shape == (num_programs(sum(lengths), len(lengths), block), 2)
        real = [(b, t) for b, n in enumerate(lengths) for t in range(-(-n // block))]
        rows = [tuple(r) for r in sched.tolist()]
        assert rows[: len(real)] == real
        assert all(r == (len(lengths), 0) for r in rows[len(real) :]) and len(rows) - len(real) <= len(lengths)


def test_packed_tile_minimum_is_each_sequences_own():
    params, *_ = fastattn._validate.validate_packed(*_packed("cross")[:7], is_causal=True, enable_gqa=True)
    lq, lk = testing.packed_lengths("cross")
    expected = 0
    for a, b in zip(lq, lk):
        if a and b:
            band = torch.ones(a, b, dtype=torch.bool).tril(b - a)  # bottom-right causal
            tiles = band.reshape(a, b)
            rows = [tiles[i : i + 16] for i in range(0, a, 16)]
            expected += sum(int(r[:, j : j + 32].any()) for r in rows for j in range(0, b, 32))
    assert params.packed_tile_minimum(16, 32) == expected
