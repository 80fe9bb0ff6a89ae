"""One registry of backends and the automatic choice between them.

A backend is an object with a name, two questions (``unavailable_reason``: can it run on this
machine at all; ``unsupported_reason``: can it take these inputs) that answer ``None`` or a
sentence, and two calls (``forward``, ``backward``) that run its ``torch.library`` ops. The
entry point validates once, asks the registry for a backend and hands it the normalised 4-D
tensors and the ``MaskSpec``; no backend re-validates or re-interprets masks.

Never silently slow: when the automatic choice lands on ``reference`` (unfused, O(Lq·Lk) memory)
because the fused backends it tried refused the call, a :class:`SlowPathWarning` names their reasons
and the fix, once per distinct message; naming ``backend="reference"`` is the way to choose it
knowingly, without a warning. ``fastattn info`` lists each backend's ``slow_cases``.

Compile-safe: ``choose`` runs while ``torch.compile`` traces, so every ``unavailable_reason`` must
answer without touching the file system there (backends settle availability when their library
loads), and the warning is issued at trace time through Dynamo's ``comptime`` hook, since
``warnings.warn`` would break the graph.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
from torch import Tensor

from .._validate import Problem
from ..masks import MaskSpec

__all__ = ["Backend", "register", "get", "names", "choose", "UnsupportedError", "SlowPathWarning"]


class UnsupportedError(RuntimeError):
    """A backend named explicitly cannot take these inputs (or cannot run here)."""


class SlowPathWarning(UserWarning):
    """The automatic choice ran a call on the unfused ``reference`` backend that a fused one could take."""


class Backend:
    """Base class; subclasses set ``name`` and ``description`` and implement the four methods."""

    name: str = ""
    description: str = ""
    # What sends a call this backend would otherwise take to ``reference``, each with its fix (``fastattn info``).
    slow_cases: tuple[str, ...] = ()

    def unavailable_reason(self) -> Optional[str]:
        """Why this backend cannot run on this machine at all, or None."""
        return None

    def unsupported_reason(self, problem: Problem, spec: MaskSpec, dropout_p: float) -> Optional[str]:
        """Why this backend cannot take these inputs, or None."""
        return None

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, spec: MaskSpec, scale: float, dropout_p: float
    ) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """Returns ``(out, lse, saved)``; ``saved`` holds what backward needs to replay dropout."""
        raise NotImplementedError

    def backward(
        self,
        grad_out: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        spec: MaskSpec,
        scale: float,
        dropout_p: float,
        saved: tuple[Tensor, ...],
        need_mask_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """Returns ``(dq, dk, dv, dmask)``; ``dmask`` is ``(B, Hq, Lq, Lk)`` or None unless asked for."""
        raise NotImplementedError(f"backend {self.name!r} has no backward")


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> Backend:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"backend: expected one of {['auto', *_REGISTRY]} or None, got {name!r}")
    return _REGISTRY[name]


def _reason(backend: Backend, problem: Problem, spec: MaskSpec, dropout_p: float) -> Optional[str]:
    return backend.unavailable_reason() or backend.unsupported_reason(problem, spec, dropout_p)


def _auto_order(device: torch.device) -> list[str]:
    """Preference order for the automatic choice (see the entry point's docstring)."""
    if device.type == "cuda":
        return ["cuda", "triton", "reference"]
    order = []
    if os.environ.get("TRITON_INTERPRET") == "1":
        order.append("triton")
    if os.environ.get("FASTATTN_CUDA_EMULATE") == "1":
        order.append("cuda")
    return order + ["cpu", "reference"]


def choose(name: Optional[str], problem: Problem, spec: MaskSpec, dropout_p: float) -> Backend:
    """The named backend (refusing with its reason), or the first suitable one in auto order."""
    if name is None or name == "auto":
        env = os.environ.get("FASTATTN_BACKEND")
        if env and env != "auto":
            name = env
    if name is not None and name != "auto":
        backend = get(name)
        reason = _reason(backend, problem, spec, dropout_p)
        if reason:
            raise UnsupportedError(f"backend {name!r} cannot run this call: {reason}")
        return backend
    skipped = []
    for candidate in _auto_order(problem.device):
        backend = _REGISTRY.get(candidate)
        if backend is None:
            continue
        reason = _reason(backend, problem, spec, dropout_p)
        if reason is None:
            if candidate == "reference" and skipped:
                _warn_slow_path(
                    "fastattn: this call runs on the slow reference backend (unfused, O(Lq*Lk) memory), refused by "
                    f"{'; '.join(skipped)}. Pass backend='reference' to choose it knowingly (no warning); this "
                    "warning is shown once per reason."
                )
            return backend
        skipped.append(f"{candidate}: {reason}")
    raise UnsupportedError("no backend can run this call; " + "; ".join(skipped))


_WARNED: set[str] = set()


def _emit_slow_path(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, SlowPathWarning, stacklevel=5)


def _emit_at_trace_time(ctx) -> None:
    """Dynamo's ``comptime`` callback: it runs once while the graph is traced, and adds nothing to the graph."""
    _emit_slow_path(ctx.get_local("message").as_python_constant())


def _warn_slow_path(message: str) -> None:
    if torch.compiler.is_compiling():
        try:
            from torch._dynamo.comptime import comptime
        except ImportError:  # an older or changed torch: no warning under compile rather than a graph break
            return
        comptime(_emit_at_trace_time)
    else:
        _emit_slow_path(message)
