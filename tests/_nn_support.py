"""Shared by the nn and model tests: proof that fastattn ran, and a fast automatic choice."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from fastattn.nn import multihead as mh_module

# torch's attention entry points, including the encoder layer's inference fast path.
_TORCH_ENTRY_POINTS = ("_native_multi_head_attention", "_transformer_encoder_layer_fwd", "_nested_tensor_from_mask")


@pytest.fixture(autouse=True)
def automatic_choice_is_reference(monkeypatch):
    """Modules built with ``backend=None`` resolve to "reference" here: under pytest the automatic
    choice is the Triton interpreter (conftest sets TRITON_INTERPRET=1), far too slow for every
    case; the tests named for a backend (triton, and each available one) pass it explicitly."""
    monkeypatch.setenv("FASTATTN_BACKEND", "reference")


@contextlib.contextmanager
def torch_attention_forbidden(monkeypatch):
    """Make torch's attention entry points raise; yield a list that counts fastattn entry-point calls."""

    def forbidden(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"torch's {name} ran where fastattn should have")

        return fail

    calls = []
    real = mh_module.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(F, "scaled_dot_product_attention", forbidden("scaled_dot_product_attention"))
        m.setattr(F, "multi_head_attention_forward", forbidden("multi_head_attention_forward"))
        for name in _TORCH_ENTRY_POINTS:
            m.setattr(torch, name, forbidden(name))
        m.setattr(mh_module, "scaled_dot_product_attention", counting)
        yield calls
