"""torchvision's ViT-B/16 under ``fastattn.replace_attention``: 12 modules swapped, same outputs.

torchvision's encoder blocks call ``nn.MultiheadAttention`` directly, whose inference fast path
(``torch._native_multi_head_attention``) would bypass a swapped ``forward``; the test makes torch's
own attention entry points raise while the swapped model runs, so passing proves fastattn ran.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")

import fastattn  # noqa: E402


def _replace_attention():
    fn = getattr(fastattn, "replace_attention", None)
    if fn is None:
        try:
            from fastattn.nn import replace_attention as fn
        except ImportError as exc:
            pytest.skip(f"fastattn.nn.replace_attention does not exist yet (the nn layer, issue in progress): {exc}")
    return fn


def _forbid_torch_attention(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("torch's own attention ran in a model swapped to fastattn")

    monkeypatch.setattr(torch.nn.functional, "multi_head_attention_forward", boom)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", boom)
    monkeypatch.setattr(torch, "_native_multi_head_attention", boom)


def _random_head(model: nn.Module) -> None:
    """torchvision zero-initialises the classifier head: its logits would be 0 whatever attention did."""
    nn.init.normal_(model.heads.head.weight, std=0.02)


@pytest.fixture(scope="module")
def vit_pair():
    replace_attention = _replace_attention()
    torch.manual_seed(0)
    reference = torchvision.models.vit_b_16().eval()  # random weights: no download
    _random_head(reference)
    swapped = copy.deepcopy(reference)
    # The oracle backend keeps the full-size model cheap (the suite's TRITON_INTERPRET=1 would make the
    # automatic choice the Triton interpreter); the small ViT below runs the automatic choice.
    returned = replace_attention(swapped, backend="reference")
    swapped = returned if isinstance(returned, nn.Module) else swapped
    return reference, swapped


def test_vit_b_16_swaps_its_12_attention_modules(vit_pair):
    reference, swapped = vit_pair
    from fastattn.nn import MultiheadAttention

    assert sum(type(m) is nn.MultiheadAttention for m in reference.modules()) == 12
    assert sum(isinstance(m, MultiheadAttention) for m in swapped.modules()) == 12
    assert not any(type(m) is nn.MultiheadAttention for m in swapped.modules())
    # Same parameters, same values.
    ref_state, new_state = reference.state_dict(), swapped.state_dict()
    assert ref_state.keys() == new_state.keys()
    assert all(torch.equal(ref_state[k], new_state[k]) for k in ref_state)


def test_vit_b_16_outputs_unchanged(vit_pair, monkeypatch):
    reference, swapped = vit_pair
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = reference(images)
        _forbid_torch_attention(monkeypatch)
        got = swapped(images)
    assert got.shape == (1, 1000) and expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def _gradients_match(reference: nn.Module, swapped: nn.Module, images: torch.Tensor, monkeypatch) -> None:
    grads = {}
    for name, model in (("reference", reference), ("swapped", swapped)):
        model = copy.deepcopy(model).train()
        for module in model.modules():  # deterministic: no dropout anywhere
            if isinstance(module, nn.Dropout):
                module.p = 0.0
            if isinstance(module, nn.MultiheadAttention):
                module.dropout = 0.0
        if name == "swapped":
            _forbid_torch_attention(monkeypatch)
        model(images).square().mean().backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters()}
    for n, g in grads["reference"].items():
        assert g is not None and grads["swapped"][n] is not None, n
        torch.testing.assert_close(grads["swapped"][n], g, rtol=1e-3, atol=1e-3 * g.abs().max().item(), msg=n)
    first = grads["swapped"]["encoder.layers.encoder_layer_0.self_attention.in_proj_weight"]
    assert first.abs().sum() > 0  # attention's own weights learn


def test_small_vit_gradients_match_in_training(monkeypatch):
    """torchvision's ViT architecture, shrunk so that training steps stay cheap."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    reference = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128)
    _random_head(reference)
    swapped = _replace_attention()(copy.deepcopy(reference))
    _gradients_match(reference, swapped, torch.randn(2, 3, 32, 32), monkeypatch)


@pytest.mark.full
def test_vit_b_16_gradients_match_in_training(vit_pair, monkeypatch):
    reference, swapped = vit_pair
    _gradients_match(reference, swapped, torch.randn(1, 3, 224, 224), monkeypatch)
