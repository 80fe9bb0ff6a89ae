"""fastattn as a transformers attention implementation: same answers as "eager", compact masks.

Tiny randomly initialised models built from configs (no hub access): Llama (GQA), Mistral (sliding
window smaller than the sequence), Qwen2 (full and sliding layers mixed) and BERT (an encoder); and the
attention variants: Bloom (ALiBi, in the kernel), gpt-oss (learned sinks, alternating sliding layers),
Gemma 2 (logit softcap, alternating sliding layers) and Llama 4 (chunked layers).
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

VOCAB, SEQ, WINDOW, CHUNK = 97, 11, 4, 3
PADS = (0, 3, 6)  # left padding per batch row; SEQ > WINDOW so the window bites; multiples of CHUNK
SOFTCAP = 1.0  # small, so that the cap bites on these scores (checked in the test)


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
    elif kind == "bloom":
        cfg = transformers.BloomConfig(
            vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, initializer_range=0.3, pad_token_id=0
        )
    elif kind == "gpt_oss":
        # gpt-oss's YaRN parameters assume its own context length, so max_position_embeddings stays its own.
        common.pop("max_position_embeddings")
        cfg = transformers.GptOssConfig(
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            num_local_experts=2,
            num_experts_per_tok=1,
            **common,
        )
    elif kind == "gemma2":
        cfg = transformers.Gemma2Config(
            num_key_value_heads=2,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            attn_logit_softcapping=SOFTCAP,
            **common,
        )
    elif kind == "llama4":
        cfg = transformers.Llama4TextConfig(
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size_mlp=64,
            attention_chunk_size=CHUNK,
            layer_types=["chunked_attention", "full_attention"],
            no_rope_layers=[1, 0],
            num_local_experts=2,
            num_experts_per_tok=1,
            **common,
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
        "bloom": transformers.BloomForCausalLM,
        "gpt_oss": transformers.GptOssForCausalLM,
        "gemma2": transformers.Gemma2ForCausalLM,
        "llama4": transformers.Llama4ForCausalLM,
    }[kind]


def _pair(kind: str, name: str = "fastattn", **overrides):
    """The same random weights under fastattn (``name``) and under "eager"."""
    torch.manual_seed(0)
    cfg = _config(kind, **overrides)
    cls = _model_class(kind)
    # _from_config writes the implementation into the config it is given: one copy each.
    fast = cls._from_config(copy.deepcopy(cfg), attn_implementation=name)
    with torch.no_grad():
        for param_name, param in fast.named_parameters():
            if param_name.endswith("sinks"):
                param.normal_()  # gpt-oss initialises them at the weights' scale: make them matter
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
                    gqa=kw.get("enable_gqa", False),
                    dropout=kw["dropout_p"],
                    backend=kw["backend"],
                    softcap=kw.get("softcap"),
                    sinks=kw.get("sinks"),
                    chunk=kw.get("chunk"),
                    alibi=kw.get("alibi_slopes"),
                )
            )
            return inner(q, k, v, **kw)

        monkeypatch.setattr(fastattn_hf, "_fastattn_sdpa", spy)


class KvSpy:
    """Records what reaches ``fastattn.kvcache_attention`` (decoding steps) from the integration."""

    def __init__(self, monkeypatch):
        self.calls = []
        inner = fastattn_hf._fastattn_kvcache

        def spy(q, k_cache, v_cache, cache_seqlens, **kw):
            assert kw.get("key") is None and kw.get("value") is None  # transformers' cache has appended already
            self.calls.append(
                dict(
                    q=tuple(q.shape),
                    k=tuple(k_cache.shape),
                    seqlens=cache_seqlens.tolist(),
                    causal=kw["is_causal"],
                    window=kw["window"],
                    gqa=kw["enable_gqa"],
                    softcap=kw.get("softcap"),
                    sinks=kw.get("sinks"),
                )
            )
            return inner(q, k_cache, v_cache, cache_seqlens, **kw)

        monkeypatch.setattr(fastattn_hf, "_fastattn_kvcache", spy)


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


@pytest.fixture(autouse=True)
def _compact_padding(request, monkeypatch):
    """Most tests here describe the compact key-padding path (what a padded batch with little padding, or a
    decoding step with padding, takes), so padded prefills stay on it; tests that ask for ``unpadding`` keep
    the integration's default, where these batches (27% padding) are unpadded into varlen_attention."""
    if "unpadding" not in request.fixturenames:
        monkeypatch.setattr(fastattn_hf, "_UNPAD_MIN_PADDING", 2.0)


@pytest.fixture
def unpadding():
    assert fastattn_hf._UNPAD_MIN_PADDING < sum(PADS) / (len(PADS) * SEQ)  # the test batch is unpadded


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


class VarlenSpy:
    """Records what reaches ``fastattn.varlen_attention`` from the integration."""

    def __init__(self, monkeypatch):
        self.calls = []
        inner = fastattn_hf._fastattn_varlen

        def spy(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
            self.calls.append(dict(q=tuple(q.shape), cu=cu_q.tolist(), cu_k=cu_k.tolist(), max=(max_q, max_k), **kw))
            return inner(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

        monkeypatch.setattr(fastattn_hf, "_fastattn_varlen", spy)


DOC_LENGTHS = (5, 13, 1, 8)  # > WINDOW, so the sliding layers' window bites inside a document


def _documents():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in DOC_LENGTHS]


def _flattened(return_flash_attn_kwargs: bool) -> dict:
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=return_flash_attn_kwargs)
    batch = collator([{"input_ids": d} for d in _documents()])
    batch.pop("labels")
    return batch


# How the packed batch reaches the model: the collator's FlashAttention keywords, position_ids without a cache
# (transformers' mask function sees the documents), position_ids with the default cache (it does not).
PACKED_ROUTES = ["flash_kwargs", "position_ids_no_cache", "position_ids_cache"]


def _packed_inputs(route: str) -> dict:
    batch = _flattened(return_flash_attn_kwargs=route == "flash_kwargs")
    if route == "position_ids_no_cache":
        batch["use_cache"] = False
    return batch


@pytest.mark.parametrize("route", PACKED_ROUTES)
@pytest.mark.parametrize("kind", DECODERS)
def test_packed_documents_equal_each_document_alone(kind, route, monkeypatch):
    """Every document's logits in the packed row equal that document run alone under eager (not eager on the
    packed row: with a cache, eager lets documents attend each other)."""
    fast, eager = _pair(kind)
    with torch.no_grad():
        alone = torch.cat([eager(input_ids=torch.tensor([d])).logits[0] for d in _documents()])
        _forbid_torch_attention(monkeypatch)
        _forbid_dense_masks(monkeypatch)
        spy = VarlenSpy(monkeypatch)
        packed = fast(**_packed_inputs(route)).logits[0]
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)
    bounds = [0, 5, 18, 19, 27]
    assert len(spy.calls) == fast.config.num_hidden_layers
    assert all(c["cu"] == bounds and c["max"] == (13, 13) and c["is_causal"] for c in spy.calls)
    if kind == "mistral":
        assert all(c["window"] == (WINDOW - 1, 0) for c in spy.calls)


def test_eager_on_the_packed_row_is_wrong_with_a_cache():
    """The pitfall the integration guards against (transformers 5.24): not a fastattn bug, a reason to test
    against each document alone."""
    _, eager = _pair("llama")
    with torch.no_grad():
        alone = torch.cat([eager(input_ids=torch.tensor([d])).logits[0] for d in _documents()])
        packed = eager(**_packed_inputs("position_ids_cache")).logits[0]
    assert (packed - alone).norm() / alone.norm() > 0.1


@pytest.mark.parametrize("route", ["flash_kwargs", "position_ids_cache"])
def test_packed_training_step_gradients_equal_the_documents_alone(route):
    fast, eager = _pair("qwen2")
    grads = {}
    fast.train()
    loss = fast(**_packed_inputs(route)).logits.square().mean()
    loss.backward()
    grads["fast"] = {n: p.grad for n, p in fast.named_parameters() if p.grad is not None}
    eager.train()
    total = sum(DOC_LENGTHS)
    for d in _documents():
        # The packed loss is a mean over all tokens: each document contributes its sum over the total count.
        (eager(input_ids=torch.tensor([d]), use_cache=False).logits.square().sum() / (total * VOCAB)).backward()
    grads["eager"] = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    assert grads["fast"].keys() == grads["eager"].keys()
    for n, g in grads["fast"].items():
        torch.testing.assert_close(g, grads["eager"][n], rtol=1e-3, atol=1e-5, msg=n)


def test_the_packed_mask_is_compact():
    """No cache: transformers hands the mask function its packed pattern; fastattn keeps the document ids only."""
    batch = _flattened(return_flash_attn_kwargs=False)
    cfg = _config("llama")
    cfg._attn_implementation = "fastattn"
    embeds = torch.randn(1, sum(DOC_LENGTHS), 32)
    mask = masking_utils.create_causal_mask(
        config=cfg, inputs_embeds=embeds, attention_mask=None, cache=None, position_ids=batch["position_ids"]
    )
    assert isinstance(mask, fastattn_hf.CompactMask) and mask.documents is not None
    cu, longest = mask.packed_layout()
    assert cu.tolist() == [0, 5, 18, 19, 27] and longest == 13
    assert mask.packed_layout()[0] is cu  # every layer reuses it: the host reads the ids once per forward


@pytest.mark.parametrize("kind", DECODERS)
def test_greedy_generate_gives_the_same_tokens(kind, monkeypatch):
    fast, eager = _pair(kind)
    ids, mask = _batch(kind)
    new = 6  # SEQ + new > WINDOW + 1: the sliding cache drops keys (kv_offset > 0)
    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    ref = eager.generate(**args)
    spy, kv = Spy(monkeypatch), KvSpy(monkeypatch)
    out = fast.generate(**args)
    assert torch.equal(out, ref), (out[:, SEQ:], ref[:, SEQ:])
    layers = fast.config.num_hidden_layers
    assert len(spy.calls) + len(kv.calls) == layers * new
    decode = spy.calls[layers:]
    for call in decode:
        assert call["q"][2] == 1
        assert call["q_offset"] == call["k"][2] - 1  # bottom-right: the new token sees every cached key
    for call in kv.calls:  # a step with no padding left in its keys: over the cache, every key attended
        assert call["q"][2] == 1 and call["seqlens"] == [call["k"][2]] * len(PADS)
    if kind == "mistral":  # the cache keeps WINDOW - 1 keys plus the new one
        assert max(c["k"][2] for c in decode + kv.calls) == WINDOW
    if kind in ("mistral", "qwen2"):
        # once the left padding has left a sliding layer's cache, no mask is needed: kvcache_attention's steps
        assert kv.calls and all(c["window"] == (WINDOW - 1, 0) for c in kv.calls)
    else:
        assert kv.calls == []  # a padded batch keeps its padding mask: scaled_dot_product_attention


@pytest.mark.parametrize("kind", ["llama", "mistral", "gpt_oss", "gemma2"])
def test_decoding_steps_of_an_unpadded_batch_go_to_kvcache_attention(kind, monkeypatch):
    """No padding: every step after the prefill is kvcache_attention over transformers' own DynamicCache
    (GQA, sliding windows, sinks, softcap), and greedy decoding gives eager's tokens and logits. The lengths the
    integration passes are the cache's own, so no step reads them on the host (a device sync per layer)."""
    import fastattn.kvcache as kvmod

    def refuse(*args):
        raise RuntimeError("a decoding step read cache_seqlens on the host")

    monkeypatch.setattr(kvmod, "_check_values", refuse)
    fast, eager = _pair(kind)
    ids = _batch(kind)[0][:, -5:]  # the last 5 tokens of every row: no padding in any
    new = 7  # 5 + 7 > WINDOW + 1: the sliding layers' caches drop keys
    args = dict(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    args.update(output_logits=True, return_dict_in_generate=True)
    ref = eager.generate(**args)
    spy, kv = Spy(monkeypatch), KvSpy(monkeypatch)
    _forbid_torch_attention(monkeypatch)
    out = fast.generate(**args)
    assert torch.equal(out.sequences, ref.sequences), (out.sequences[:, 5:], ref.sequences[:, 5:])
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=1e-4, atol=1e-4)
    layers = fast.config.num_hidden_layers
    assert len(spy.calls) == layers and all(c["q"][2] == 5 for c in spy.calls)  # the prefill
    assert len(kv.calls) == layers * (new - 1)
    for step, call in enumerate(kv.calls):
        assert call["q"][2] == 1 and call["causal"]
        assert call["seqlens"] == [call["k"][2]] * len(PADS)  # every cached key, the new one included
        assert call["gqa"] == (call["q"][1] != call["k"][1]) and call["gqa"]
        if kind in ("mistral", "gpt_oss", "gemma2") and step % layers == 0:  # sliding layer: the window
            assert call["window"] == (WINDOW - 1, 0) and call["k"][2] <= max(WINDOW, 5 + step // layers)
    if kind == "gpt_oss":
        assert all(c["sinks"] is not None for c in kv.calls)
    if kind == "gemma2":
        assert all(c["softcap"] == SOFTCAP for c in kv.calls)


def test_decoding_steps_that_stay_on_sdpa(monkeypatch):
    """A padded batch (the mask), and a step whose queries need a gradient, are not kvcache_attention's."""
    fast, _ = _pair("llama")
    ids, mask = _batch("llama")
    kv = KvSpy(monkeypatch)
    fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert kv.calls == []
    cache = transformers.DynamicCache(config=fast.config)
    arg = "cache" if "cache" in inspect.signature(fast.forward).parameters else "past_key_values"
    plain = ids[:, -4:]
    fast(input_ids=plain, use_cache=True, **{arg: cache})
    fast(input_ids=plain[:, -1:], **{arg: cache}).logits.sum().backward()  # grad enabled, weights require it
    assert kv.calls == []


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


@pytest.mark.parametrize("kind", DECODERS + ["bert", "gpt_oss", "gemma2"])
def test_padded_batches_are_unpadded_into_varlen_attention(kind, unpadding, monkeypatch):
    """27% padding (left for decoders, right for BERT): each row's tokens are one varlen sequence; the logits at
    the real tokens equal eager's, the padding positions get zeros, and no padding mask reaches a kernel."""
    fast, eager = _pair(kind)
    ids, mask = _batch(kind)
    keep = mask.bool()
    with torch.no_grad():
        ref = eager(input_ids=ids, attention_mask=mask).logits
        spy, varlen = Spy(monkeypatch), VarlenSpy(monkeypatch)
        _forbid_torch_attention(monkeypatch)
        out = fast(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-4, atol=1e-4)
    assert spy.calls == [] and len(varlen.calls) == fast.config.num_hidden_layers
    lengths = [SEQ - pad for pad in PADS]
    cu = [0] + [sum(lengths[: i + 1]) for i in range(len(lengths))]
    for call in varlen.calls:
        assert call["q"][0] == sum(lengths) and call["cu"] == cu and call["cu_k"] == cu
        assert call["max"] == (SEQ, SEQ) and call["is_causal"] is (kind != "bert")
    if kind == "gpt_oss":
        assert all(c["sinks"] is not None for c in varlen.calls)
    if kind == "gemma2":
        assert all(c["softcap"] == SOFTCAP for c in varlen.calls)
    if kind in ("mistral", "gpt_oss", "gemma2"):
        assert varlen.calls[0]["window"] == (WINDOW - 1, 0)


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_unpadded_prefill_then_greedy_generate(kind, unpadding, monkeypatch):
    """The prefill of a left-padded batch unpadded, its decoding steps on the compact mask: eager's tokens."""
    fast, eager = _pair(kind)
    ids, mask = _batch(kind)
    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    ref = eager.generate(**args)
    spy, varlen, kv = Spy(monkeypatch), VarlenSpy(monkeypatch), KvSpy(monkeypatch)
    out = fast.generate(**args)
    assert torch.equal(out, ref), (out[:, SEQ:], ref[:, SEQ:])
    layers = fast.config.num_hidden_layers
    # the steps: the compact mask, or (Gemma 2's sliding layer, once the padding has left it) the cache kernel
    assert len(varlen.calls) == layers and len(spy.calls) + len(kv.calls) == 3 * layers
    assert all(c["q"][2] == 1 and c["mask"][1] == torch.bool for c in spy.calls)


@pytest.mark.parametrize("kind", ["llama", "bert", "gpt_oss"])
def test_unpadded_training_gradients_match_eager(kind, unpadding):
    _gradients_match_eager(kind, "fastattn")


def test_little_padding_keeps_the_compact_mask(unpadding, monkeypatch):
    """Below the threshold (one padding token in 33), the compact key-padding path is faster: it stays."""
    fast, eager = _pair("llama")
    ids, mask = _batch("llama")
    mask = torch.ones_like(mask)
    mask[2, 0] = 0
    with torch.no_grad():
        ref = eager(input_ids=ids, attention_mask=mask).logits
        spy, varlen = Spy(monkeypatch), VarlenSpy(monkeypatch)
        out = fast(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], rtol=1e-4, atol=1e-4)
    assert varlen.calls == [] and all(c["mask"] == ((len(PADS), 1, 1, SEQ), torch.bool) for c in spy.calls)


@pytest.mark.parametrize("kind", ["llama", "mistral", "bert"])
def test_gradients_flow_and_match_eager_in_training(kind):
    _gradients_match_eager(kind, "fastattn")


def _gradients_match_eager(kind: str, name: str) -> dict:
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
    return grads["fast"]


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
# models with attention variants: Bloom (ALiBi), gpt-oss (sinks), Gemma 2 (softcap), Llama 4 (chunks)

VARIANT_MODELS = ["bloom", "gpt_oss", "gemma2", "llama4"]


def _check_variant_calls(kind: str, calls: list, model) -> None:
    """What reached fastattn on the prefill: each model's variant, per layer."""
    assert len(calls) == 2
    if kind == "bloom":
        slopes = fastattn_hf._alibi_slopes(4, torch.device("cpu"))
        assert all(torch.equal(c["alibi"], slopes) and c["causal"] for c in calls)
        assert all(c["mask"] == ((len(PADS), 1, 1, SEQ), torch.bool) for c in calls)  # padding only, no bias
    else:
        assert all(c["alibi"] is None for c in calls)
    if kind == "gpt_oss":
        sinks = [layer.self_attn.sinks for layer in model.model.layers]
        assert all(c["sinks"] is s for c, s in zip(calls, sinks))
    else:
        assert all(c["sinks"] is None for c in calls)
    assert [c["softcap"] for c in calls] == ([SOFTCAP] * 2 if kind == "gemma2" else [None] * 2)
    assert [c["chunk"] for c in calls] == ([CHUNK, None] if kind == "llama4" else [None] * 2)
    if kind in ("gpt_oss", "gemma2"):
        assert [c["window"] for c in calls] == [(WINDOW - 1, 0), None]


@pytest.mark.parametrize("kind", VARIANT_MODELS)
def test_variant_models_logits_equal_eager(kind, monkeypatch):
    fast, eager = _pair(kind)
    ids, mask = _batch(kind)
    keep = mask.bool()
    with torch.no_grad():
        ref = eager(input_ids=ids, attention_mask=mask).logits
        if kind == "gemma2":  # the cap changes the answer, so ignoring it would fail the comparison below
            uncapped = _pair(kind, attn_logit_softcapping=None)[1](input_ids=ids, attention_mask=mask).logits
            assert (uncapped[keep] - ref[keep]).abs().max() > 1e-2
        spy = Spy(monkeypatch)
        _forbid_torch_attention(monkeypatch)
        _forbid_dense_masks(monkeypatch)
        out = fast(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-4, atol=1e-4)
    _check_variant_calls(kind, spy.calls, fast)


@pytest.mark.parametrize("kind", ["bloom", "gpt_oss", "gemma2"])
def test_variant_models_greedy_generate(kind, monkeypatch):
    fast, eager = _pair(kind)
    ids, mask = _batch(kind)
    new = 3
    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    ref = eager.generate(**args)
    spy, kv = Spy(monkeypatch), KvSpy(monkeypatch)
    out = fast.generate(**args)
    assert torch.equal(out, ref), (out[:, SEQ:], ref[:, SEQ:])
    # the sliding layers' steps go to kvcache_attention once the padding has left their cache
    assert len(spy.calls) + len(kv.calls) == 2 * new
    assert all(c["q"][2] == 1 for c in spy.calls[2:] + kv.calls)


@pytest.mark.parametrize("kind", ["bloom", "gpt_oss", "gemma2"])
def test_variant_models_gradients_match_eager(kind):
    grads = _gradients_match_eager(kind, "fastattn")
    if kind == "gpt_oss":
        sinks = [g for n, g in grads.items() if n.endswith("sinks")]
        assert len(sinks) == 2 and all(g.abs().min() > 0 for g in sinks)


def test_bloom_mask_with_a_hole_uses_blooms_own_bias(monkeypatch):
    """Real tokens that are not one run (a hole in the attention mask): Bloom counts positions among the
    real tokens only, so the in-kernel ALiBi would differ; its own bias goes in as a (B, H, 1, Lk) float."""
    fast, eager = _pair("bloom")
    ids, mask = _batch("bloom")
    mask[0, 4:6] = 0
    keep = mask.bool()
    with torch.no_grad():
        ref = eager(input_ids=ids, attention_mask=mask).logits
        spy = Spy(monkeypatch)
        out = fast(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-4, atol=1e-4)
    assert all(c["alibi"] is None and c["mask"] == ((len(PADS), 4, 1, SEQ), torch.float32) for c in spy.calls)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        with torch.no_grad():
            fast(input_ids=ids, attention_mask=mask, output_attentions=True)


def test_bloom_static_cache_decoding_uses_blooms_bias_on_the_dense_mask(monkeypatch):
    """A static cache decodes with a materialised mask (transformers asks for one): it carries no query
    position, so Bloom's own ALiBi bias goes in; the prefill keeps the in-kernel ALiBi."""
    fast, eager = _pair("bloom")
    ids, mask = _batch("bloom")
    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, cache_implementation="static")
    args.update(min_new_tokens=3, output_logits=True, return_dict_in_generate=True)
    ref = eager.generate(**args)
    spy = Spy(monkeypatch)
    out = fast.generate(**args)
    assert torch.equal(out.sequences, ref.sequences)
    for got, expected in zip(out.logits, ref.logits):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    prefill, decode = spy.calls[:2], spy.calls[2:]
    assert all(c["alibi"] is not None and c["mask"][1] == torch.bool for c in prefill)
    assert decode and all(c["alibi"] is None and c["mask"][1] == torch.float32 for c in decode)


def test_bloom_alibi_slopes_are_blooms():
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    for heads in (1, 4, 6, 12, 16):
        # All-ones mask: Bloom's bias of key j is slope * j, so key 1 holds the slopes; (B*H, 1, L) → (H,)
        alibi = build_alibi_tensor(torch.ones(1, 3, dtype=torch.long), heads, torch.float32)[:, 0, 1]
        torch.testing.assert_close(fastattn_hf._alibi_slopes(heads, torch.device("cpu")), alibi, rtol=0, atol=0)


@pytest.mark.parametrize("pads, kv_offset, compact", [((0, 3, 6), 0, True), ((0, 2), 0, False), ((1, 4), 1, True)])
def test_chunked_mask_function(pads, kv_offset, compact):
    """Llama 4's chunks are counted from each row's first real token: compact (``chunk``) when that grid is
    the kernels' (``kv_offset - pad`` a multiple of the chunk in every row), else transformers' dense mask."""
    total, q_length = 12, 4
    padding = torch.ones(len(pads), total, dtype=torch.bool)
    for row, pad in enumerate(pads):
        padding[row, :pad] = False
    left = (~padding).sum(dim=1)
    kw = dict(
        batch_size=len(pads),
        q_length=q_length,
        kv_length=total - kv_offset,
        q_offset=total - q_length,
        kv_offset=kv_offset,
        mask_function=masking_utils.chunked_causal_mask_function(CHUNK, left),
        attention_mask=padding,
    )
    got = fastattn_hf.mask_function(allow_is_causal_skip=True, **kw)
    dense = _dense(**kw)
    if compact:
        assert isinstance(got, fastattn_hf.CompactMask) and got.chunk == CHUNK and got.is_causal
        assert torch.equal(got.to_dense().expand_as(dense), dense)
    else:
        assert isinstance(got, torch.Tensor) and torch.equal(got, dense)


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
