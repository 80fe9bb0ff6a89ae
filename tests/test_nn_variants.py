"""fastattn.MultiheadAttention with attention variants (softcap, ALiBi, learned sinks, chunk) against the oracle.

torch's module has no variants, so the oracle is written here from the module's weights, independently of
the module's own ``project``/``attend``: the in-projection by ``F.linear`` in float64, then
``fastattn.reference.attention`` in float64 (plain autograd, the sinks' gradient included), then the
out-projection. The baseline for the low-precision tolerance is the same computation in the tested dtype.
The returned weights are checked by what defines them: ``weights @ V`` is the attention output of each head.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _nn_support import automatic_choice_is_reference, torch_attention_forbidden  # noqa: F401
from torch import nn

import fastattn.nn as fnn
from fastattn import backends, reference
from fastattn.testing import alibi_slopes, assert_close

E, H = 16, 4


def _backend_or_skip(name: str) -> str:
    reason = backends.get(name).unavailable_reason()
    if reason:
        pytest.skip(f"backend {name!r} unavailable here: {reason}")
    return name


def _heads(x: torch.Tensor) -> torch.Tensor:
    # (B, L, E) → (B, L, H, D) → (B, H, L, D)
    return x.unflatten(-1, (H, E // H)).transpose(1, 2)


def _oracle(params: dict, xq, xk, xv, mask, is_causal, variant: dict, to: torch.dtype):
    """Output ``(B, L, E)`` and per-head attention output ``(B, H, L, D)`` from batch-first inputs."""
    w_q, w_k, w_v = params["in_proj_weight"].to(to).chunk(3)
    b_q, b_k, b_v = params["in_proj_bias"].to(to).chunk(3)
    q, k, v = _heads(F.linear(xq, w_q, b_q)), _heads(F.linear(xk, w_k, b_k)), _heads(F.linear(xv, w_v, b_v))
    sinks = params.get("sinks")
    heads = reference.attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=is_causal,
        softcap=variant.get("softcap"),
        alibi_slopes=variant.get("alibi_slopes"),
        sinks=None if sinks is None else sinks.to(to),
        chunk=variant.get("chunk"),
        compute_dtype=to,
    )
    # (B, H, L, D) → (B, L, E)
    out = F.linear(heads.transpose(1, 2).flatten(-2), params["out_proj.weight"].to(to), params["out_proj.bias"].to(to))
    return out, heads, v


# A covering set: each variant alone and together, with and without a padding mask, causal, cross attention,
# the weights path, bf16, lengths 1, 17, 65.
CASES = [
    dict(id="softcap-sinks-kpm", variant=dict(softcap=1.5), sinks=True, L=17, kpm=True),
    dict(id="alibi-chunk-causal", variant=dict(alibi=True, chunk=6), L=65, causal=True),
    dict(
        id="all-cross-kpm-weights",
        variant=dict(softcap=2.0, alibi=True, chunk=5),
        sinks=True,
        L=17,
        S=23,
        kpm=True,
        weights=True,
    ),  # fmt: skip
    dict(id="sinks-chunk-bf16", variant=dict(chunk=7), sinks=True, L=65, dtype=torch.bfloat16, causal=True),
    dict(id="softcap-alibi-len1-weights", variant=dict(softcap=1.0, alibi=True), L=1, S=17, weights=True),
]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_variants_match_the_oracle(case, monkeypatch):
    backend = _backend_or_skip("cpu")
    dtype = case.get("dtype", torch.float32)
    gen = torch.Generator().manual_seed(3)
    variant = dict(case["variant"])
    if variant.pop("alibi", False):
        variant["alibi_slopes"] = alibi_slopes(H) * 4  # steep enough to matter over these lengths
    module = fnn.MultiheadAttention(E, H, batch_first=True, sinks=case.get("sinks", False), backend=backend, **variant)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "bias" in name else 1.0))
    module.to(dtype)
    batch, seqlen_q = 2, case["L"]
    seqlen_k = case.get("S", seqlen_q)
    xq = torch.randn(batch, seqlen_q, E, generator=gen)
    xk = xq if "S" not in case else torch.randn(batch, seqlen_k, E, generator=gen)
    kpm = None
    if case.get("kpm"):
        kpm = torch.rand(batch, seqlen_k, generator=gen) < 0.3  # True = ignore (torch's convention)
        kpm[1, :] = False
        kpm[0, : seqlen_k // 2] = True  # some queries of row 0 keep no key inside their chunk
    is_causal = case.get("causal", False)
    need_weights = case.get("weights", False)
    grad_out = torch.randn(batch, seqlen_q, E, generator=gen)

    def leaves(to):
        x = xq.to(to).requires_grad_()
        return x, (x if xk is xq else xk.to(to).requires_grad_())

    # ours
    x, y = leaves(dtype)
    with torch_attention_forbidden(monkeypatch) as calls:
        out, weights = module(
            x, y, y, key_padding_mask=kpm, need_weights=need_weights, average_attn_weights=False, is_causal=is_causal
        )
    assert calls == [backend]
    loss = (out * grad_out.to(dtype)).sum()
    params = dict(module.named_parameters())
    names = ["query", *(["key"] if y is not x else []), *params]
    grads = dict(zip(names, torch.autograd.grad(loss, [x, *([y] if y is not x else []), *params.values()])))

    # the oracle (float64) and the baseline (plain PyTorch in dtype)
    mask = None if kpm is None else ~kpm[:, None, None, :]  # (B, S) → (B, 1, 1, S), True = attend
    results = {}
    for label, to in (("oracle", torch.float64), ("base", dtype)):
        detached = {n: p.detach().to(to).requires_grad_() for n, p in params.items()}
        xo, yo = leaves(to)
        o, heads, v = _oracle(detached, xo, yo, yo, mask, is_causal, variant, to)
        lo = (o * grad_out.to(to)).sum()
        g = torch.autograd.grad(lo, [xo, *([yo] if yo is not xo else []), *detached.values()])
        results[label] = (o, heads, v, dict(zip(names, g)))
    (o64, heads64, v64, g64), (olo, _, _, glo) = results["oracle"], results["base"]
    base = olo if dtype != torch.float32 else None
    assert_close(out, o64, base, factor=2, name="output")
    assert set(grads) == set(g64) and ("sinks" in grads) == case.get("sinks", False)
    for name, g in grads.items():
        assert g is not None and g.abs().sum() > 0, f"no gradient for {name}"
        assert_close(g, g64[name], None if base is None else glo[name], factor=3, name=f"grad {name}")
    if need_weights:
        assert weights.shape == (batch, H, seqlen_q, seqlen_k)
        # The weights define each head's output: weights @ V equals the oracle's per-head attention.
        assert_close(weights @ v64.detach().to(weights.dtype), heads64.detach(), name="weights @ V")
        if module.sinks is None:
            assert_close(weights.sum(-1), torch.ones(batch, H, seqlen_q, dtype=torch.float64), name="sum")
    else:
        assert weights is None


def test_sinks_are_a_parameter_and_alibi_slopes_stay_out_of_the_state_dict():
    slopes = alibi_slopes(H)
    module = fnn.MultiheadAttention(E, H, sinks=True, alibi_slopes=slopes, softcap=30.0, chunk=8)
    assert isinstance(module.sinks, nn.Parameter) and module.sinks.shape == (H,)
    assert torch.equal(module.alibi_slopes, slopes) and "alibi_slopes" not in module.state_dict()
    assert "sinks" in module.state_dict()
    plain = fnn.MultiheadAttention(E, H, softcap=30.0)
    assert plain.sinks is None and plain.alibi_slopes is None
    # A torch checkpoint still loads strictly into a module without sinks.
    plain.load_state_dict(nn.MultiheadAttention(E, H).state_dict(), strict=True)
    assert "softcap=30.0" in repr(plain) and "sinks" in repr(module) and "alibi" in repr(module)
    # The slopes follow the module's device moves (a buffer), and stay float32 for the kernel's validation.
    assert module.to(torch.float64).alibi_slopes.dtype.is_floating_point


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(softcap=0.0), r"softcap: expected a positive float or None, got 0.0"),
        (dict(softcap="big"), r"softcap: expected a positive float"),
        (dict(alibi_slopes=torch.ones(H + 1)), rf"alibi_slopes: expected shape \({H},\).*got \({H + 1}\)"),
        (dict(alibi_slopes=[0.5] * H), r"alibi_slopes: expected a floating tensor"),
        (dict(chunk=0), r"chunk: expected a positive int or None, got 0"),
        (dict(sinks=1), r"sinks: expected a bool"),
        (dict(chunk=4, add_bias_kv=True), r"alibi_slopes/chunk.*add_bias_kv=False.*got True"),
        (dict(alibi_slopes=torch.ones(H), add_zero_attn=True), r"alibi_slopes/chunk.*add_zero_attn"),
    ],
)
def test_bad_variant_arguments_are_refused_by_name(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fnn.MultiheadAttention(E, H, **kwargs)
