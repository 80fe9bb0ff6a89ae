"""fastattn.models.Transformer with a logit softcap and learned sinks in every attention module.

The oracle is the same model in float64 on the reference backend (fastattn's float64 statement of every
rule, sinks' gradient included); the model under test runs in float32 on the CPU backend. KV-cache decoding
must give the tokens of decoding the whole prefix every step (the cache's ``q_offset`` with the variants).
"""

from __future__ import annotations

import copy

import pytest
import torch
from _nn_support import automatic_choice_is_reference  # noqa: F401

import fastattn
from fastattn.models import Transformer
from fastattn.models.toy import BOS
from fastattn.nn import multihead as mh_module
from fastattn.testing import assert_close

VOCAB, SOFTCAP = 12, 2.0


def _model(backend):
    torch.manual_seed(0)
    model = Transformer(
        VOCAB,
        d_model=16,
        nhead=2,
        num_encoder_layers=1,
        num_decoder_layers=2,
        dim_feedforward=32,
        dropout=0.0,
        backend=backend,
        softcap=SOFTCAP,
        sinks=True,
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("sinks"):
                p.normal_(0.0, 0.5)
            elif "in_proj_weight" in name:
                p.mul_(4.0)  # scores of a few units, so that the cap of 2 bends them
    return model


def _batch(seed):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(3, VOCAB, (2, 9), generator=gen)
    tgt = torch.cat([torch.full((2, 1), BOS), torch.randint(3, VOCAB, (2, 6), generator=gen)], dim=1)
    return src, tgt, torch.tensor([9, 5]), torch.tensor([7, 4])


def test_softcap_and_sinks_match_the_float64_oracle_with_gradients(monkeypatch):
    if fastattn.backends.get("cpu").unavailable_reason():
        pytest.skip(f"the cpu backend is unavailable: {fastattn.backends.get('cpu').unavailable_reason()}")
    model = _model("cpu").train()
    oracle = copy.deepcopy(model).double()
    for module in oracle.modules():
        if isinstance(module, mh_module.MultiheadAttention):
            module.backend = "reference"
    src, tgt, src_len, tgt_len = _batch(1)
    seen = []
    real = mh_module.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((kwargs["backend"], kwargs["softcap"], kwargs["sinks"]))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(mh_module, "scaled_dot_product_attention", spy)
    logits = model(src, tgt, src_len, tgt_len)
    expected = oracle(src, tgt, src_len, tgt_len)
    # every attention module (1 encoder self, 2 decoder self, 2 cross) with its own sinks and the cap
    sinks = [m.sinks for m in model.modules() if isinstance(m, mh_module.MultiheadAttention)]
    assert len(sinks) == 5 and [s for _, _, s in seen[:5]] == sinks
    assert all(b == "cpu" and c == SOFTCAP for b, c, _ in seen[:5])
    keep = torch.arange(tgt.shape[1]).unsqueeze(0) < tgt_len.unsqueeze(1)
    assert_close(logits[keep], expected[keep], name="logits")
    grad = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    (logits * grad * keep.unsqueeze(-1)).sum().backward()
    (expected * grad.double() * keep.unsqueeze(-1)).sum().backward()
    params = dict(oracle.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is None:
            assert params[name].grad is None, name
            continue
        assert_close(p.grad, params[name].grad, name=f"grad {name}")
    assert all(s.grad is not None and s.grad.abs().min() > 0 for s in sinks)


def test_kv_cache_decoding_equals_no_cache_with_the_variants():
    model = _model(None).eval()  # the reference backend here (tests' automatic choice)
    src, _, src_len, _ = _batch(3)
    cached = model.generate(src, src_len, bos_id=BOS, max_new_tokens=6, use_cache=True)
    uncached = model.generate(src, src_len, bos_id=BOS, max_new_tokens=6, use_cache=False)
    assert torch.equal(cached, uncached)
    # The cap matters here: without it, the same weights decode differently or score differently.
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if isinstance(module, mh_module.MultiheadAttention):
            module.softcap = None
    with torch.no_grad():
        tgt = torch.cat([torch.full((2, 1), BOS), cached], dim=1)
        assert (plain(src, tgt, src_len) - model(src, tgt, src_len)).abs().max() > 1e-2


def test_bad_variant_arguments_name_themselves():
    with pytest.raises(ValueError, match="softcap: expected a positive float"):
        Transformer(VOCAB, d_model=16, nhead=2, softcap=-1.0)
    with pytest.raises(TypeError, match="sinks: expected a bool"):
        Transformer(VOCAB, d_model=16, nhead=2, sinks="yes")
