"""fastattn.models.Transformer: structure, causality, padding, KV-cache decoding, backends, training."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from _nn_support import automatic_choice_is_reference  # noqa: F401

import fastattn
from fastattn.models import Transformer, sinusoidal_positions
from fastattn.models.toy import BOS, EOS, evaluate, make_batch, train
from fastattn.models.transformer import DecoderCache
from fastattn.nn import MultiheadAttention
from fastattn.nn import multihead as mh_module
from fastattn.testing import assert_close

VOCAB = 12


def _model(norm_first=True, backend=None, seed=0, layers=2):
    torch.manual_seed(seed)
    model = Transformer(
        VOCAB,
        d_model=16,
        nhead=2,
        num_encoder_layers=layers,
        num_decoder_layers=layers,
        dim_feedforward=32,
        dropout=0.0,
        norm_first=norm_first,
        backend=backend,
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.2)
    return model.eval()


def _tokens(batch, length, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=gen)


def test_decoder_has_causal_self_attention_and_cross_attention(monkeypatch):
    model = _model(layers=1)
    for layer in model.decoder_layers:
        assert isinstance(layer.self_attn, MultiheadAttention) and isinstance(layer.cross_attn, MultiheadAttention)
    seen = []
    real = mh_module.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.shape[2], k.shape[2], kwargs.get("is_causal", False), kwargs.get("q_offset", 0)))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(mh_module, "scaled_dot_product_attention", spy)
    model(_tokens(2, 7, 0), torch.cat([torch.full((2, 1), BOS), _tokens(2, 4, 1)], 1))
    # encoder self (7 x 7, not causal), decoder self (5 x 5, causal), cross (5 x 7, not causal)
    assert seen == [(7, 7, False, 0), (5, 5, True, 0), (5, 7, False, 0)]


@pytest.mark.parametrize("norm_first", [True, False], ids=["prenorm", "postnorm"])
def test_target_position_sees_only_its_prefix_and_the_source(norm_first):
    model = _model(norm_first)
    src, tgt = _tokens(2, 6, 0), _tokens(2, 5, 1)
    with torch.no_grad():
        base = model(src, tgt)
        changed_tail = tgt.clone()
        changed_tail[:, 3:] = (changed_tail[:, 3:] + 1 - 3) % (VOCAB - 3) + 3
        after = model(src, changed_tail)
        other_src = model(_tokens(2, 6, 5), tgt)
    torch.testing.assert_close(after[:, :3], base[:, :3], rtol=0, atol=1e-5)
    assert (after[:, 3:] - base[:, 3:]).abs().max() > 1e-3  # the changed positions do change
    assert (other_src - base).abs().min(dim=-1).values.max() > 1e-4  # cross-attention reads the source


def test_padding_from_lengths_hides_padded_tokens():
    model = _model()
    src, tgt = _tokens(3, 6, 0), _tokens(3, 5, 1)
    src_len, tgt_len = torch.tensor([6, 3, 1]), torch.tensor([5, 2, 4])
    with torch.no_grad():
        base = model(src, tgt, src_len, tgt_len)
        src2, tgt2 = src.clone(), tgt.clone()
        for b in range(3):
            src2[b, src_len[b] :] = 3 + (src2[b, src_len[b] :] - 2) % (VOCAB - 3)
            tgt2[b, tgt_len[b] :] = 3 + (tgt2[b, tgt_len[b] :] - 2) % (VOCAB - 3)
        after = model(src2, tgt2, src_len, tgt_len)
        no_lengths = model(src2, tgt2)
    valid = torch.arange(5).unsqueeze(0) < tgt_len.unsqueeze(1)
    torch.testing.assert_close(after[valid], base[valid], rtol=0, atol=1e-5)
    assert (no_lengths[valid] - base[valid]).abs().max() > 1e-3  # without lengths the padding is read


@pytest.mark.parametrize("norm_first", [True, False], ids=["prenorm", "postnorm"])
def test_kv_cache_greedy_decoding_equals_no_cache(norm_first, monkeypatch):
    model = _model(norm_first, seed=1)
    src, src_len = _tokens(3, 6, 2), torch.tensor([6, 4, 2])
    offsets = []
    real = mh_module.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        if kwargs.get("is_causal"):
            offsets.append((q.shape[2], k.shape[2], kwargs.get("q_offset", 0)))
        return real(q, k, v, *args, **kwargs)

    kv_calls = []
    real_kv = mh_module.kvcache_attention

    def kv_spy(q, key_cache, value_cache, cache_seqlens, *, key=None, value=None, **kwargs):
        kv_calls.append((q.shape[2], cache_seqlens.tolist(), key.shape[2], kwargs.get("is_causal", True)))
        return real_kv(q, key_cache, value_cache, cache_seqlens, key=key, value=value, **kwargs)

    def refuse(*args):
        raise RuntimeError("a decoding step read cache_seqlens on the host")

    monkeypatch.setattr(mh_module, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(mh_module, "kvcache_attention", kv_spy)
    monkeypatch.setattr(fastattn.kvcache, "_check_values", refuse)  # decode() checks the capacity on the host
    cached = model.generate(src, src_len, bos_id=BOS, max_new_tokens=8, use_cache=True)
    cached_offsets, offsets[:] = list(offsets), []
    plain = model.generate(src, src_len, bos_id=BOS, max_new_tokens=8, use_cache=False)
    assert cached.shape == plain.shape == (3, 8)
    assert torch.equal(cached, plain)
    # With the cache every step is one query appended at position t of a preallocated cache and attending its
    # t + 1 keys bottom-right (kvcache_attention); the causal SDPA path is not taken.
    layers = len(model.decoder_layers)
    assert kv_calls == [(1, [t] * 3, 1, True) for t in range(8) for _ in range(layers)]
    assert cached_offsets == []
    assert all(q == k and off == 0 for q, k, off in offsets)

    # The step logits agree too, not only their argmax.
    memory, memory_mask = model.encode(src, src_len)
    seq = torch.cat([torch.full((3, 1), BOS), cached], 1)
    full = model.decode(seq[:, :-1], memory, memory_mask)
    for cache in (DecoderCache(), DecoderCache(capacity=8)):  # concatenated, and preallocated (kvcache_attention)
        with torch.no_grad():  # kvcache_attention is forward only
            steps = torch.cat([model.decode(seq[:, t : t + 1], memory, memory_mask, cache=cache) for t in range(8)], 1)
        torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-5)


def test_decoding_past_a_preallocated_cache_raises_and_changes_nothing():
    """Every step checks the capacity on the host (the layers' kvcache_attention calls do not read the lengths):
    a step past it raises, naming the cache, before any layer writes; the cache is as it was."""
    model = _model(seed=2)
    src, src_len = _tokens(2, 5, 3), torch.tensor([5, 3])
    memory, memory_mask = model.encode(src, src_len)
    cache = DecoderCache(capacity=4)
    with torch.no_grad():
        model.decode(_tokens(2, 3, 4), memory, memory_mask, cache=cache)
        # the bits: the unfilled slots of new_empty buffers may hold NaN patterns
        before = [(c.self_k.view(torch.int32).clone(), c.self_v.view(torch.int32).clone()) for c in cache.layers]
        for new in (2, 5):
            with pytest.raises(ValueError, match=rf"cache: capacity 4 is below the {3 + new} positions asked"):
                model.decode(_tokens(2, new, 5), memory, memory_mask, cache=cache)
            assert cache.length == 3 and cache.seqlens.tolist() == [3, 3]
            for c, (k, v) in zip(cache.layers, before):
                assert torch.equal(c.self_k.view(torch.int32), k) and torch.equal(c.self_v.view(torch.int32), v)
        model.decode(_tokens(2, 1, 6), memory, memory_mask, cache=cache)  # the last position still fits
    assert cache.length == 4 and cache.seqlens.tolist() == [4, 4]


def test_generate_stops_at_eos_and_pads_after():
    model = _model()
    with torch.no_grad():
        model.generator.bias.fill_(-100.0)
        model.generator.bias[EOS] = 100.0
    out = model.generate(_tokens(2, 4, 0), bos_id=BOS, eos_id=EOS, max_new_tokens=5)
    assert out.tolist() == [[EOS], [EOS]]


def _available_fused_backends():
    names = []
    for name in fastattn.backends.names():
        if name != "reference" and fastattn.backends.get(name).unavailable_reason() is None:
            names.append(name)
    return names


@pytest.mark.parametrize("backend", ["auto", *_available_fused_backends()])
def test_backend_parity_against_reference(backend, monkeypatch):
    """Logits and every parameter gradient of one model, fused backend vs the reference backend."""
    monkeypatch.delenv("FASTATTN_BACKEND")  # "auto" here is the real automatic choice
    ref = _model(backend="reference")
    fused = copy.deepcopy(ref)
    for m in fused.modules():
        if isinstance(m, MultiheadAttention):
            m.backend = None if backend == "auto" else backend
    src, tgt = _tokens(2, 9, 0), _tokens(2, 7, 1)
    src_len, tgt_len = torch.tensor([9, 5]), torch.tensor([7, 3])
    results = []
    for model in (ref, fused):
        model.train()
        logits = model(src, tgt, src_len, tgt_len)
        grads = torch.autograd.grad(logits.square().mean(), list(model.parameters()))
        results.append((logits, grads))
    (l_ref, g_ref), (l_fused, g_fused) = results
    assert_close(l_fused, l_ref, None, name=f"logits ({backend})")
    for (name, _), a, e in zip(ref.named_parameters(), g_fused, g_ref):
        assert_close(a, e, None, name=f"grad {name} ({backend})", atol=1e-5 * max(1.0, float(e.abs().max())))


def test_tiny_copy_task_trains_to_accuracy():
    """Fixed steps on 1 core (about 10 s here); greedy decoding with the cache must then copy."""
    torch.manual_seed(0)
    model = Transformer(
        10, d_model=32, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64, dropout=0.0
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster and does not fight the other workers
    try:
        losses = train(model, "copy", steps=150, batch=32, min_len=2, max_len=5, vocab_size=10, lr=5e-3)
        token_acc, seq_acc = evaluate(model, "copy", batch=256, min_len=2, max_len=5, vocab_size=10)
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < 0.3 * losses[0]
    assert token_acc >= 0.85, (token_acc, seq_acc)


def test_toy_batches_are_copy_and_reverse():
    b = make_batch("reverse", 4, 2, 5, 10, torch.Generator().manual_seed(0))
    for i in range(4):
        n = int(b.src_lengths[i])
        assert b.tgt_out[i, :n].tolist() == b.src[i, :n].flip(0).tolist() and b.tgt_out[i, n] == EOS
        assert b.tgt_in[i, 0] == BOS and b.tgt_in[i, 1 : n + 1].tolist() == b.tgt_out[i, :n].tolist()
        assert (b.src[i, n:] == 0).all() and (b.tgt_out[i, n + 1 :] == 0).all()


def test_sinusoidal_positions_formula():
    enc = sinusoidal_positions(torch.tensor([0, 3, 10]), 8, torch.float64)
    for row, pos in enumerate((0, 3, 10)):
        for i in range(4):
            angle = pos / 10000 ** (2 * i / 8)
            assert math.isclose(enc[row, 2 * i].item(), math.sin(angle), abs_tol=1e-6)
            assert math.isclose(enc[row, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-6)


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    model = _model(layers=1).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    src, tgt, src_len = _tokens(2, 6, 0), _tokens(2, 4, 1), torch.tensor([6, 3])
    out_c = compiled(src, tgt, src_len)
    out_e = model(src, tgt, src_len)
    torch.testing.assert_close(out_c, out_e)
    g_c = torch.autograd.grad(out_c.square().sum(), list(model.parameters()))
    g_e = torch.autograd.grad(out_e.square().sum(), list(model.parameters()))
    for a, e in zip(g_c, g_e):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: Transformer(10, d_model=10, nhead=3), r"d_model: expected a multiple of nhead=3, got 10"),
        (lambda: Transformer(10, d_model=8, nhead=2, activation="tanh"), r"activation: expected 'relu' or 'gelu'"),
        (lambda: Transformer(10, d_model=8, nhead=2, backend="nope"), r"backend"),
        (lambda: _model()(torch.randn(2, 3), _tokens(2, 3, 0)), r"src: expected integer token ids of shape \(B, L\)"),
        (lambda: _model()(_tokens(2, 3, 0), _tokens(2, 3, 0)[0]), r"tgt: expected integer token ids"),
        (lambda: _model()(_tokens(2, 3, 0), _tokens(2, 3, 0), torch.tensor([3])), r"lengths: expected an integer"),
    ],
)
def test_bad_input_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------- packed documents


def _documents(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen) for n in lengths]


def test_packed_documents_equal_each_document_alone():
    """Encoder, causal decoder and cross-attention (Lq_b != Lk_b) on packed documents: each document's logits
    and the gradients of a loss over all of them equal those of the documents run alone."""
    model = _model()
    src, tgt = _documents([3, 7, 1, 5], 1), _documents([4, 2, 6, 1], 2)
    offsets = [torch.tensor([0, *itertools.accumulate(len(t) for t in ts)]) for ts in (src, tgt)]
    packed = model(torch.cat(src), torch.cat(tgt), src_cu_seqlens=offsets[0], tgt_cu_seqlens=offsets[1].int())
    alone = torch.cat([model(s[None], t[None])[0] for s, t in zip(src, tgt)])
    assert_close(packed, alone, None, name="packed logits")
    params = list(model.parameters())
    grads = torch.autograd.grad(packed.square().sum(), params)
    expected = torch.autograd.grad(alone.square().sum(), params)
    for (name, _), a, e in zip(model.named_parameters(), grads, expected):
        assert_close(a, e, None, name=f"grad {name}", atol=1e-5 * max(1.0, float(e.abs().max())))


def test_packed_training_loss_equals_the_padded_batchs():
    from fastattn.models.toy import loss_fn, pack

    model = _model()
    batch = make_batch("reverse", 6, 1, 7, VOCAB, torch.Generator().manual_seed(3))
    torch.testing.assert_close(loss_fn(model, pack(batch)), loss_fn(model, batch))


def test_packed_input_errors():
    model = _model()
    src, cu = torch.randint(3, VOCAB, (5,)), torch.tensor([0, 5])
    with pytest.raises(ValueError, match="src_cu_seqlens, tgt_cu_seqlens: packed documents need both offsets"):
        model(src, src, src_cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"tgt: expected 1-D integer token ids of packed documents \(total,\)"):
        model(src, src[None], src_cu_seqlens=cu, tgt_cu_seqlens=cu)
    with pytest.raises(ValueError, match="src_lengths, tgt_lengths: packed documents need no padding lengths"):
        model(src, src, torch.tensor([5]), src_cu_seqlens=cu, tgt_cu_seqlens=cu)
