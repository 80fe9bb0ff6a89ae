"""fastattn as a transformers attention implementation: same answers as "eager", compact masks.

Tiny randomly initialised models built from configs (no hub access): Llama (GQA), Mistral (sliding
window smaller than the sequence), Qwen2 (full and sliding layers mixed) and BERT (an encoder).
Every comparison is against the same weights under ``attn_implementation="eager"``, in fp32, on a
left-padded batch, at the non-padding positions (padding rows attend nothing under fastattn and
give zeros; eager averages over masked keys there, so they are not comparable).
"""

from __future__ import annotations

import copy
import inspect
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from transformers import masking_utils  # noqa: E402

import fastattn  # noqa: E402
import fastattn.integrations.transformers as fastattn_hf  # noqa: E402

VOCAB, SEQ, WINDOW = 97, 11, 4
PADS = (0, 3, 6)  # left padding per batch row; SEQ > WINDOW so the window bites


def _config(kind: str, **overrides):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        # Larger than the default 0.02, so attention is far from uniform and masks matter.
        initializer_range=0.3,
        pad_token_id=0,
    )
    if kind == "llama":
        cfg = transformers.LlamaConfig(num_key_value_heads=2, **common)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(num_key_value_heads=2, sliding_window=WINDOW, **common)
    elif kind == "qwen2":
        # layer 0 full attention, layer 1 sliding window
        cfg = transformers.Qwen2Config(
            num_key_value_heads=1, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, **common
        )
    elif kind == "bert":
        cfg = transformers.BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            initializer_range=0.3,
            # No dropout anywhere, so training-mode gradients are deterministic and comparable.
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    else:
        raise ValueError(kind)
    for name, value in overrides.items():
        setattr(cfg, name, value)
    return cfg


def _model_class(kind: str):
    return {
        "llama": transformers.LlamaForCausalLM,
        "mistral": transformers.MistralForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "bert": transformers.BertForMaskedLM,
    }[kind]


def _pair(kind: str, name: str = "fastattn", **overrides):
    """The same random weights under fastattn (``name``) and under "eager"."""
    torch.manual_seed(0)
    cfg = _config(kind, **overrides)
    cls = _model_class(kind)
    # _from_config writes the implementation into the config it is given: one copy each.
    fast = cls._from_config(copy.deepcopy(cfg), attn_implementation=name)
    eager = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager")
    eager.load_state_dict(fast.state_dict())
    assert fast.config._attn_implementation == name and eager.config._attn_implementation == "eager"
    return fast.eval(), eager.eval()


def _batch(kind: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (len(PADS), SEQ), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(PADS):
        if kind == "bert":  # encoders pad on the right
            mask[row, SEQ - pad :] = 0
        else:
            mask[row, :pad] = 0
    return ids.masked_fill(mask == 0, 0), mask


class Spy:
    """Records what reaches ``fastattn.scaled_dot_product_attention`` from the integration."""

    def __init__(self, monkeypatch):
        self.calls = []
        inner = fastattn_hf._fastattn_sdpa

        def spy(q, k, v, **kw):
            mask = kw["attn_mask"]
            self.calls.append(
                dict(
                    q=tuple(q.shape),
                    k=tuple(k.shape),
                    mask=None if mask is None else (tuple(mask.shape), mask.dtype),
                    causal=kw["is_causal"],
                    window=kw["window"],
                    q_offset=kw["q_offset"],
                    gqa=kw["enable_gqa"],
                    dropout=kw["dropout_p"],
                    backend=kw["backend"],
                )
            )
            return inner(q, k, v, **kw)

        monkeypatch.setattr(fastattn_hf, "_fastattn_sdpa", spy)


def _forbid_torch_attention(monkeypatch):
    """fastattn's run must not fall back on torch's own attention anywhere."""

    def boom(*args, **kwargs):
        raise AssertionError("torch's scaled_dot_product_attention ran under attn_implementation='fastattn'")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", boom)


def _forbid_dense_masks(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a dense (B, 1, Lq, Lk) mask was built for a structural pattern")

    monkeypatch.setattr(masking_utils, "sdpa_mask", boom)


@pytest.fixture(autouse=True)
def _registered():
    fastattn_hf.register()
    yield


# ---------------------------------------------------------------------------------------------
# registration and import


def test_import_fastattn_does_not_import_transformers():
    code = "import sys, fastattn, fastattn.integrations; assert 'transformers' not in sys.modules, 'imported'"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr


def test_register_is_idempotent_and_installs_both_functions():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert fastattn_hf.register() == "fastattn"
    fn = AttentionInterface._global_mapping["fastattn"]
    assert fastattn_hf.register("fastattn") == "fastattn"
    assert AttentionInterface._global_mapping["fastattn"] is fn
    assert AttentionMaskInterface._global_mapping["fastattn"] is fastattn_hf.mask_function
    assert "fastattn" in transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS.valid_keys()
    with pytest.raises(ValueError, match="sdpa"):
        fastattn_hf.register("sdpa")


def test_set_attn_implementation_switches_a_built_model(monkeypatch):
    fast, eager = _pair("llama", name="eager")
    fast.set_attn_implementation("fastattn")
    spy = Spy(monkeypatch)
    ids, mask = _batch("llama")
    with torch.no_grad():
        out = fast(input_ids=ids, attention_mask=mask).logits
        ref = eager(input_ids=ids, attention_mask=mask).logits
    assert len(spy.calls) == 2
    keep = mask.bool()
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# the mask function against transformers' own dense masks


def _dense(**kw):
    return masking_utils.sdpa_mask(allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kw)


@pytest.mark.parametrize(
    "pattern, q_length, kv_length, q_offset, kv_offset, with_padding",
    [
        ("causal", 7, 7, 0, 0, True),
        ("causal", 3, 10, 7, 0, True),  # prefill against cached keys
        ("causal", 1, 10, 9, 0, False),  # decoding one token
        ("sliding", 9, 9, 0, 0, True),
        ("sliding", 1, 4, 12, 9, True),  # sliding cache that dropped keys: kv_offset > 0
        ("sliding", 3, 6, 10, 7, False),
        ("bidirectional", 6, 8, 0, 0, True),
        ("sliding_bidirectional", 9, 9, 0, 0, True),
        ("sliding_bidirectional", 3, 8, 6, 2, True),
    ],
)
def test_mask_function_is_compact_and_equals_the_dense_mask(
    pattern, q_length, kv_length, q_offset, kv_offset, with_padding
):
    fns = {
        "causal": masking_utils.causal_mask_function,
        "sliding": masking_utils.sliding_window_causal_mask_function(WINDOW),
        "bidirectional": masking_utils.bidirectional_mask_function,
        "sliding_bidirectional": masking_utils.sliding_window_bidirectional_mask_function(2),
    }
    batch, total = 2, kv_offset + kv_length
    padding = torch.ones(batch, total, dtype=torch.bool)
    if with_padding:
        padding[1, : kv_offset + max(1, kv_length // 3)] = False  # some before kv_offset, some after
    kw = dict(
        batch_size=batch,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=fns[pattern],
        attention_mask=padding,
    )
    compact = fastattn_hf.mask_function(allow_is_causal_skip=True, allow_is_bidirectional_skip=True, **kw)
    assert isinstance(compact, fastattn_hf.CompactMask)
    if with_padding:
        assert compact.padding.shape == (batch, 1, 1, kv_length)
    else:
        assert compact.padding is None  # an all-True padding mask is dropped
    dense = _dense(**kw)
    assert torch.equal(compact.to_dense().expand_as(dense), dense)


def test_mask_function_falls_back_to_dense_for_other_patterns():
    overlay = masking_utils.or_masks(masking_utils.causal_mask_function, lambda b, h, q, k: k == 0)
    kw = dict(batch_size=2, q_length=5, kv_length=5, mask_function=overlay, attention_mask=None)
    got = fastattn_hf.mask_function(allow_is_causal_skip=True, **kw)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.bool and got.shape == (2, 1, 5, 5)
    assert torch.equal(got, _dense(**kw))
    # A model that asks for a materialised mask (allow_is_causal_skip=False) gets one.
    kw["mask_function"] = masking_utils.causal_mask_function
    got = fastattn_hf.mask_function(allow_is_causal_skip=False, **kw)
    assert isinstance(got, torch.Tensor) and torch.equal(got, _dense(**kw))


# ---------------------------------------------------------------------------------------------
# whole models against "eager"

DECODERS = ["llama", "mistral", "qwen2"]


@pytest.mark.parametrize("kind", [*DECODERS, "bert"])
def test_logits_equal_eager_on_a_padded_batch(kind, monkeypatch):
    fast, eager = _pair(kind)
    ids, mask = _batch(kind)
    with torch.no_grad():
        ref = eager(input_ids=ids, attention_mask=mask).logits
        spy = Spy(monkeypatch)
        _forbid_torch_attention(monkeypatch)
        _forbid_dense_masks(monkeypatch)
        out = fast(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-4, atol=1e-4)
    assert len(spy.calls) == fast.config.num_hidden_layers
    b = len(PADS)
    for call in spy.calls:
        # Compact: a (B, 1, 1, Lk) key-padding mask, never a (B, 1, Lq, Lk) one.
        assert call["mask"] == ((b, 1, 1, SEQ), torch.bool)
        assert call["causal"] is (kind != "bert")
        assert call["dropout"] == 0.0
    windows = [c["window"] for c in spy.calls]
    expected = {
        "llama": [None, None],
        "mistral": [(WINDOW - 1, 0)] * 2,
        "qwen2": [None, (WINDOW - 1, 0)],
        "bert": [None, None],
    }[kind]
    assert windows == expected
    if kind != "bert":
        # GQA reaches fastattn as fewer key heads, not as repeat_kv copies.
        assert all(c["gqa"] and c["k"][1] < c["q"][1] for c in spy.calls)


def test_reference_backend_by_name(monkeypatch):
    """The tests above run the automatic choice (Triton when TRITON_INTERPRET=1); this pins the oracle."""
    name = fastattn_hf.register("fastattn_reference", backend="reference")
    fast, eager = _pair("mistral", name=name)
    ids, mask = _batch("mistral")
    spy = Spy(monkeypatch)
    keep = mask.bool()
    with torch.no_grad():
        out = fast(input_ids=ids, attention_mask=mask).logits
        ref = eager(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-4, atol=1e-4)
    assert spy.calls and all(c["backend"] == "reference" for c in spy.calls)


def test_compact_path_for_causal_plus_padding_builds_no_dense_mask(monkeypatch):
    """The mask the model hands its layers is a CompactMask, and transformers' dense builder never runs."""
    fast, _ = _pair("llama")
    seen = []
    inner = fastattn_hf.attention_forward

    def record(module, q, k, v, attention_mask, *args, **kwargs):
        seen.append(attention_mask)
        return inner(module, q, k, v, attention_mask, *args, **kwargs)

    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, "fastattn", record)
    _forbid_dense_masks(monkeypatch)
    ids, mask = _batch("llama")
    with torch.no_grad():
        fast(input_ids=ids, attention_mask=mask)
    assert len(seen) == 2
    for m in seen:
        assert isinstance(m, fastattn_hf.CompactMask)
        assert m.is_causal and m.window is None and m.q_offset == 0
        assert m.padding.shape == (len(PADS), 1, 1, SEQ)
        assert torch.equal(m.padding[:, 0, 0], mask.bool())


def test_packed_sequences_fall_back_to_a_dense_mask(monkeypatch):
    """position_ids that restart mark packed sequences: transformers' dense mask, same answers."""
    fast, eager = _pair("llama")
    ids = torch.randint(1, VOCAB, (1, 9))
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        ref = eager(input_ids=ids, position_ids=position_ids, use_cache=False).logits
        spy = Spy(monkeypatch)
        out = fast(input_ids=ids, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert all(c["mask"] == ((1, 1, 9, 9), torch.bool) and not c["causal"] for c in spy.calls)


@pytest.mark.parametrize("kind", DECODERS)
def test_greedy_generate_gives_the_same_tokens(kind, monkeypatch):
    fast, eager = _pair(kind)
    ids, mask = _batch(kind)
    new = 6  # SEQ + new > WINDOW + 1: the sliding cache drops keys (kv_offset > 0)
    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    ref = eager.generate(**args)
    spy = Spy(monkeypatch)
    out = fast.generate(**args)
    assert torch.equal(out, ref), (out[:, SEQ:], ref[:, SEQ:])
    layers = fast.config.num_hidden_layers
    assert len(spy.calls) == layers * new
    decode = spy.calls[layers:]
    for call in decode:
        assert call["q"][2] == 1
        assert call["q_offset"] == call["k"][2] - 1  # bottom-right: the new token sees every cached key
    if kind == "mistral":
        assert max(c["k"][2] for c in decode) == WINDOW  # the cache keeps WINDOW - 1 keys plus the new one


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_prefill_against_cached_keys(kind, monkeypatch):
    """A second chunk of several queries against the cache: q_offset = Lk - Lq."""
    fast, eager = _pair(kind)
    ids, mask = _batch(kind)
    extra = torch.randint(1, VOCAB, (len(PADS), 4))
    full_mask = torch.cat([mask, torch.ones_like(extra)], dim=1)
    logits = {}
    for name, model in (("fast", fast), ("eager", eager)):
        cache = transformers.DynamicCache(config=model.config)
        # transformers 5.24 renamed past_key_values to cache (the old name still works, with a warning)
        arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=True, **{arg: cache})
            if name == "fast":
                spy = Spy(monkeypatch)
            logits[name] = model(input_ids=extra, attention_mask=full_mask, **{arg: cache}).logits
    torch.testing.assert_close(logits["fast"], logits["eager"], rtol=1e-4, atol=1e-4)
    for call in spy.calls:
        assert call["q"][2] == 4 and call["q_offset"] == call["k"][2] - 4
        if kind == "llama":
            assert call["mask"] == ((len(PADS), 1, 1, call["k"][2]), torch.bool)
        else:  # the sliding cache kept only keys past the left padding: no padding mask at all
            assert call["mask"] is None and call["window"] == (WINDOW - 1, 0)


@pytest.mark.parametrize("kind", ["llama", "mistral", "bert"])
def test_gradients_flow_and_match_eager_in_training(kind):
    _gradients_match_eager(kind, "fastattn")


def _gradients_match_eager(kind: str, name: str) -> None:
    fast, eager = _pair(kind, name=name)
    ids, mask = _batch(kind)
    grads = {}
    for name, model in (("fast", fast), ("eager", eager)):
        model.train()
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = logits[mask.bool()].square().mean()
        loss.backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["fast"].keys() == grads["eager"].keys() and len(grads["fast"]) > 0
    for n, g in grads["fast"].items():
        assert torch.isfinite(g).all(), n
        torch.testing.assert_close(g, grads["eager"][n], rtol=1e-3, atol=1e-5, msg=n)
    q_proj = next(g for n, g in grads["fast"].items() if "q_proj" in n or "query" in n)
    assert q_proj.abs().sum() > 0  # the query projection learns only through attention


def test_dropout_only_in_training(monkeypatch):
    fast, eager = _pair("llama", attention_dropout=0.5)
    ids, mask = _batch("llama")
    spy = Spy(monkeypatch)
    keep = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(
            fast(input_ids=ids, attention_mask=mask).logits[keep],
            eager(input_ids=ids, attention_mask=mask).logits[keep],
            rtol=1e-4,
            atol=1e-4,
        )
    assert all(c["dropout"] == 0.0 for c in spy.calls)
    spy.calls.clear()
    fast.train()
    a = fast(input_ids=ids, attention_mask=mask).logits
    b = fast(input_ids=ids, attention_mask=mask).logits
    assert all(c["dropout"] == 0.5 for c in spy.calls)
    assert not torch.allclose(a, b)  # a fresh dropout draw each call
    a.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------
# what it cannot honour


class _FakeModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = transformers.LlamaConfig(num_hidden_layers=1)
        self.is_causal = True


@pytest.mark.parametrize(
    "kwargs, feature",
    [
        (dict(softcap=50.0), "softcap"),
        (dict(s_aux=torch.zeros(4)), "sinks"),
        (dict(output_attentions=True), "output_attentions"),
        (dict(block_table=torch.zeros(1, 1, dtype=torch.int32)), "paged"),
        (dict(head_mask=torch.ones(4)), "head_mask"),
    ],
)
def test_refuses_what_it_cannot_honour_naming_feature_and_model(kwargs, feature):
    q = torch.randn(1, 4, 3, 8)
    k = v = torch.randn(1, 2, 3, 8)
    with pytest.raises(NotImplementedError, match=rf"(?s){feature}.*llama \(_FakeModule\)"):
        fastattn_hf.attention_forward(_FakeModule(), q, k, v, None, **kwargs)


def test_refuses_softcap_in_a_real_model():
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        attn_logit_softcapping=50.0,
    )
    model = transformers.Gemma2ForCausalLM._from_config(cfg, attn_implementation="fastattn").eval()
    with pytest.raises(NotImplementedError, match=r"(?s)softcap.*gemma2"):
        with torch.no_grad():
            model(input_ids=torch.randint(1, VOCAB, (1, 5)))


def test_position_bias_matches_sdpa_integration():
    """An additive per-head bias (T5-style models) combines with a boolean mask as transformers' SDPA does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = _FakeModule().eval()
    module.is_causal = False
    q = torch.randn(2, 4, 5, 8)
    k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
    bias = torch.randn(1, 4, 5, 7)
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    mask[1, ..., :3] = False
    out, _ = fastattn_hf.attention_forward(module, q, k, v, mask, scaling=0.3, position_bias=bias)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3, position_bias=bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the Triton backend (a small subset; under TRITON_INTERPRET=1 on a CPU)


def _triton_or_skip():
    if "triton" not in fastattn.backends.names():
        pytest.skip("the Triton backend is not registered (fastattn.backends.names() lacks 'triton')")
    reason = fastattn.backends.get("triton").unavailable_reason()
    if reason:
        pytest.skip(f"the Triton backend is unavailable here: {reason}")
    return fastattn_hf.register("fastattn_triton", backend="triton")


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_triton_backend_logits_and_generate(kind, monkeypatch):
    name = _triton_or_skip()
    fast, eager = _pair(kind, name=name)
    ids, mask = _batch(kind)
    spy = Spy(monkeypatch)
    keep = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(
            fast(input_ids=ids, attention_mask=mask).logits[keep],
            eager(input_ids=ids, attention_mask=mask).logits[keep],
            rtol=1e-4,
            atol=1e-4,
        )
    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert torch.equal(fast.generate(**args), eager.generate(**args))
    assert spy.calls and all(c["backend"] == "triton" for c in spy.calls)


def test_triton_backend_gradients(monkeypatch):
    name = _triton_or_skip()
    spy = Spy(monkeypatch)
    _gradients_match_eager("llama", name)
    assert spy.calls and all(c["backend"] == "triton" for c in spy.calls)
