"""``replace_attention``: put fastattn under an existing model without changing its results.

Each ``torch.nn.MultiheadAttention`` is converted *in place* (its class becomes
``fastattn.MultiheadAttention``, a subclass with the same attributes): parameters stay the same
objects, so weights, device, dtype, ``requires_grad``, optimizer state, hooks, training mode and
every alias of the module are kept, and running it twice changes nothing.

torch's ``nn.TransformerEncoderLayer`` has an inference fast path (eval mode, no grad) that calls
``torch._transformer_encoder_layer_fwd`` with the attention weights and never calls
``self_attn.forward``; ``nn.TransformerEncoder`` may also turn padded inputs into nested tensors
that only that path accepts. Both are closed for layers whose ``self_attn`` is fastattn's: the
layer's ``activation_relu_or_gelu`` flag (read only by that fast-path check and its call) is set
to 0, and the encoder's ``use_nested_tensor`` to False. The layer's activation itself is untouched.
"""

from __future__ import annotations

import warnings
from typing import Optional

from torch import nn

from .multihead import MultiheadAttention, check_backend

__all__ = ["replace_attention"]


def _convert(module: nn.MultiheadAttention, backend: Optional[str]) -> None:
    """Class swap in place; sets every attribute that ``MultiheadAttention.__init__`` adds."""
    module.__class__ = MultiheadAttention
    module.backend = backend
    module.context_parallel_group = None
    module.softcap = module.chunk = None
    module.register_buffer("alibi_slopes", None, persistent=False)
    module.register_parameter("sinks", None)


def replace_attention(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Swap every ``nn.MultiheadAttention`` in ``model`` for ``fastattn.MultiheadAttention``; returns ``model``.

    ``backend``: a name from ``fastattn.backends.names()`` for every swapped module, or ``None`` for
    the automatic choice. Modules that already are fastattn's keep their backend unless ``backend``
    is given. A user subclass of ``nn.MultiheadAttention`` (which may override ``forward``) is left
    alone with a warning.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    backend = check_backend(backend)
    for name, module in model.named_modules():
        if isinstance(module, MultiheadAttention):
            if backend is not None:
                module.backend = backend
        elif type(module) is nn.MultiheadAttention:
            _convert(module, backend)
        elif isinstance(module, nn.MultiheadAttention):
            warnings.warn(
                f"replace_attention: {name or 'model'} is a {type(module).__name__}, a subclass of "
                "nn.MultiheadAttention that may override forward; left unchanged",
                stacklevel=2,
            )
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and isinstance(module.self_attn, MultiheadAttention):
            module.activation_relu_or_gelu = 0
        if isinstance(module, nn.TransformerEncoder) and any(
            isinstance(m, MultiheadAttention) for m in module.modules()
        ):
            module.use_nested_tensor = False
    return model
