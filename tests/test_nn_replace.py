"""replace_attention over stock torch models: everything swapped, same outputs, fastattn provably ran.

"Provably": while the swapped model runs, torch's attention entry points (functional SDPA, MHA's
functional form, its native fast path, the encoder layer's fused inference kernel and the nested
tensor conversion) raise, and the calls into fastattn's entry point are counted.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from _nn_support import automatic_choice_is_reference, torch_attention_forbidden  # noqa: F401
from torch import nn

import fastattn.nn as fnn
from fastattn.testing import assert_close

D_MODEL, NHEAD = 16, 2


def _transformer(batch_first=True, norm_first=False, layers=2):
    return nn.Transformer(
        d_model=D_MODEL,
        nhead=NHEAD,
        num_encoder_layers=layers,
        num_decoder_layers=layers,
        dim_feedforward=32,
        dropout=0.0,
        batch_first=batch_first,
        norm_first=norm_first,
    )


def _randomise_biases(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.normal_(0.0, 0.3)


def _inputs(batch_first, batch=2, src_len=7, tgt_len=5):
    def draw(length):
        return torch.randn(batch, length, D_MODEL) if batch_first else torch.randn(length, batch, D_MODEL)

    src_kpm = torch.zeros(batch, src_len, dtype=torch.bool)
    src_kpm[1, 4:] = True  # right padding, so torch's nested-tensor path would be eligible
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(tgt_len)
    return draw(src_len), draw(tgt_len), src_kpm, tgt_mask


def _attention_modules(model):
    return [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]


def test_swaps_every_attention_module_keeping_weights_device_dtype_mode():
    model = _transformer(layers=2)
    model.eval()
    before = {n: p for n, p in model.named_parameters()}
    before_sd = copy.deepcopy(model.state_dict())
    out = fnn.replace_attention(model, backend="reference")
    assert out is model
    mods = _attention_modules(model)
    assert len(mods) == 2 + 2 * 2
    assert all(type(m) is fnn.MultiheadAttention and m.backend == "reference" for m in mods)
    assert all(not m.training for m in model.modules())
    after = dict(model.named_parameters())
    assert list(after) == list(before) and all(after[n] is before[n] for n in before)  # same Parameter objects
    assert all(torch.equal(before_sd[k], v) for k, v in model.state_dict().items())
    for layer in model.encoder.layers:
        assert layer.activation_relu_or_gelu == 0  # torch's fused inference path is closed
    assert model.encoder.use_nested_tensor is False


def test_idempotent_and_backend_update():
    model = _transformer(layers=1)
    fnn.replace_attention(model)
    modules = list(model.modules())
    state = [(type(m), getattr(m, "backend", None), getattr(m, "activation_relu_or_gelu", None)) for m in modules]
    fnn.replace_attention(model)
    assert list(model.modules()) == modules
    assert [
        (type(m), getattr(m, "backend", None), getattr(m, "activation_relu_or_gelu", None)) for m in modules
    ] == state
    assert all(m.backend is None for m in _attention_modules(model))
    fnn.replace_attention(model, backend="reference")
    assert all(m.backend == "reference" for m in _attention_modules(model))
    fnn.replace_attention(model)  # None keeps an explicit choice
    assert all(m.backend == "reference" for m in _attention_modules(model))


def test_aliased_module_is_swapped_once_and_stays_shared():
    shared = nn.MultiheadAttention(D_MODEL, NHEAD)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    fnn.replace_attention(model)
    assert model["a"] is model["b"][0] and type(model["a"]) is fnn.MultiheadAttention


def test_foreign_subclass_is_left_alone_with_a_warning():
    class Custom(nn.MultiheadAttention):
        pass

    model = nn.Sequential(Custom(D_MODEL, NHEAD))
    with pytest.warns(UserWarning, match="left unchanged"):
        fnn.replace_attention(model)
    assert type(model[0]) is Custom


def test_bad_arguments():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        fnn.replace_attention("model")
    with pytest.raises(ValueError, match="backend"):
        fnn.replace_attention(nn.Linear(2, 2), backend="nope")


@pytest.mark.parametrize(
    "batch_first, norm_first, grad",
    [(True, False, False), (False, True, False), (True, True, True)],
    ids=["batchfirst-postnorm-nograd", "seqfirst-prenorm-nograd", "batchfirst-prenorm-grad"],
)
def test_same_outputs_in_eval_and_fastattn_ran(batch_first, norm_first, grad, monkeypatch):
    """Eval mode under no_grad is where torch's encoder layer would bypass self_attn.forward."""
    torch_model = _transformer(batch_first=batch_first, norm_first=norm_first)
    _randomise_biases(torch_model)
    torch_model.eval()
    oracle = copy.deepcopy(torch_model).double()
    ours = fnn.replace_attention(copy.deepcopy(torch_model))
    src, tgt, src_kpm, tgt_mask = _inputs(batch_first)
    kwargs = dict(src_key_padding_mask=src_kpm, memory_key_padding_mask=src_kpm, tgt_mask=tgt_mask)
    context = contextlib.nullcontext() if grad else torch.no_grad()
    with context:
        expected = oracle(src.double(), tgt.double(), **{**kwargs, "tgt_mask": tgt_mask.double()})
        baseline = torch_model(src, tgt, **kwargs)
        with torch_attention_forbidden(monkeypatch) as calls:
            actual = ours(src, tgt, **kwargs)
    assert len(calls) == 2 + 2 * 2  # every encoder self-attn, decoder self- and cross-attn
    assert_close(actual, expected, baseline, factor=2, name="transformer output")


def test_encoder_only_model_with_padding_in_eval_no_grad(monkeypatch):
    """nn.TransformerEncoder on its own: the nested-tensor conversion and the fused layer are both closed."""
    layer = nn.TransformerEncoderLayer(D_MODEL, NHEAD, dim_feedforward=32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True)
    _randomise_biases(encoder)
    encoder.eval()
    oracle = copy.deepcopy(encoder).double()
    ours = fnn.replace_attention(copy.deepcopy(encoder))
    src, _, src_kpm, _ = _inputs(True)
    with torch.no_grad():
        expected = oracle(src.double(), src_key_padding_mask=src_kpm)
        with torch_attention_forbidden(monkeypatch) as calls:
            actual = ours(src, src_key_padding_mask=src_kpm)
    assert len(calls) == 2
    keep = ~src_kpm  # torch's nested path returns zeros at padded positions; compare real tokens
    assert_close(actual[keep], expected[keep], None, name="encoder output")


def test_swapped_model_keeps_training_and_loss_falls(monkeypatch):
    torch.manual_seed(0)
    model = fnn.replace_attention(_transformer(layers=1))
    model.train()
    head = nn.Linear(D_MODEL, 4)
    src, tgt, src_kpm, tgt_mask = _inputs(True, batch=4)
    target = torch.randint(0, 4, (4, tgt.shape[1]))
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-2)
    losses = []
    with torch_attention_forbidden(monkeypatch):
        for _ in range(15):
            out = model(src, tgt, src_key_padding_mask=src_kpm, memory_key_padding_mask=src_kpm, tgt_mask=tgt_mask)
            loss = F.cross_entropy(head(out).flatten(0, 1), target.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_compile_fullgraph_over_swapped_transformer():
    torch._dynamo.reset()
    model = fnn.replace_attention(_transformer(layers=1))
    model.eval()
    src, tgt, src_kpm, tgt_mask = _inputs(True)
    kwargs = dict(src_key_padding_mask=src_kpm, memory_key_padding_mask=src_kpm, tgt_mask=tgt_mask, tgt_is_causal=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(src, tgt, **kwargs), model(src, tgt, **kwargs))


def test_checkpoints_move_both_ways_and_pickle(tmp_path):
    """A swapped model's state_dict loads strictly into a stock model, and the swapped model pickles."""
    model = fnn.replace_attention(_transformer(layers=1), backend="reference")
    stock = _transformer(layers=1)
    stock.load_state_dict(model.state_dict(), strict=True)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    mods = _attention_modules(loaded)
    assert mods and all(type(m) is fnn.MultiheadAttention and m.backend == "reference" for m in mods)
    assert all(layer.activation_relu_or_gelu == 0 for layer in loaded.encoder.layers)
