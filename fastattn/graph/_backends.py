"""Backends of the fused graph-attention ops and the automatic choice between them.

The same shape as the attention registry (``fastattn/backends/registry.py``): a backend has a name,
two questions that answer ``None`` or a sentence (``unavailable_reason``: can it run on this machine;
``unsupported_reason``: can it take these inputs) and two calls: ``attention`` (the differentiable
op of ``_ops.py``) and ``dropout_keep`` (the keep-mask of ``_dropout.py``, for tests and for returning
attention weights after dropout). A separate registry, because graph ops take a different problem
(a graph, not a mask) and have their own set of backends: ``reference`` (the float64 oracle, any
device), ``cpu`` (the native C++ kernels) and ``triton`` (GPU, or CPU tensors under ``TRITON_INTERPRET=1``).

Automatic choice: ``FASTATTN_GRAPH_BACKEND`` if set; on CUDA tensors ``triton``, then ``reference``; on
CPU tensors ``triton`` when ``TRITON_INTERPRET=1`` (as the attention registry does), then ``cpu``, then
``reference``. A backend named explicitly that cannot take the inputs raises with its reason.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ..backends.registry import UnsupportedError
from . import _dropout
from ._structure import Graph
from .reference import graph_attention

__all__ = ["GraphBackend", "register", "get", "names", "choose", "UnsupportedError"]


class GraphBackend:
    """Base class; subclasses set ``name`` and ``description`` and implement ``attention``."""

    name: str = ""
    description: str = ""

    def unavailable_reason(self) -> Optional[str]:
        return None

    def unsupported_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        return None

    def attention(
        self,
        graph: Graph,
        kind: int,
        dst: Tensor,
        src: Tensor,
        values: Optional[Tensor],
        att: Optional[Tensor],
        edge_attr: Optional[Tensor],
        loop_attr: Optional[Tensor],
        edge_proj: Optional[Tensor],
        philox: Optional[Tensor],
        scale: float,
        negative_slope: float,
        dropout_p: float,
        return_probs: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(out, lse, probs)``; ``probs`` by edge id ``(num_ids, H)`` (empty unless asked), no gradient."""
        raise NotImplementedError

    def dropout_keep(self, philox: Tensor, num_ids: int, heads: int, p: float) -> Tensor:
        return _dropout.keep_mask(philox, num_ids, heads, p)


_REGISTRY: dict[str, GraphBackend] = {}


def register(backend: GraphBackend) -> GraphBackend:
    _REGISTRY[backend.name] = backend
    return backend


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> GraphBackend:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"backend: expected one of {['auto', *_REGISTRY]} or None, got {name!r}")
    return _REGISTRY[name]


def _auto_order(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["triton", "reference"]
    order = ["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else []
    return order + ["cpu", "reference"]


def choose(name: Optional[str], device: torch.device, dtype: torch.dtype) -> GraphBackend:
    """The named backend (refusing with its reason), or the first suitable one in automatic order."""
    if name is None or name == "auto":
        env = os.environ.get("FASTATTN_GRAPH_BACKEND")
        if env and env != "auto":
            name = env
    if name is not None and name != "auto":
        backend = get(name)
        reason = backend.unavailable_reason() or backend.unsupported_reason(device, dtype)
        if reason:
            raise UnsupportedError(f"graph backend {name!r} cannot run this call: {reason}")
        return backend
    skipped = []
    for candidate in _auto_order(device):
        backend = _REGISTRY.get(candidate)
        if backend is None:
            continue
        reason = backend.unavailable_reason() or backend.unsupported_reason(device, dtype)
        if reason is None:
            return backend
        skipped.append(f"{candidate}: {reason}")
    raise UnsupportedError("no graph backend can run this call; " + "; ".join(skipped))


def by_edge_id(graph: Graph, probs_by_slot: Tensor) -> Tensor:
    """Kernel probabilities by CSR slot ``(num_ids, H)`` -> by edge id (the kernels leave 0 in dropped slots)."""
    return torch.empty_like(probs_by_slot).index_copy(0, graph.eid, probs_by_slot)


class ReferenceBackend(GraphBackend):
    name = "reference"
    description = "per-edge gather/scatter in torch (the oracle; allocates edges x heads x channels)"

    def unsupported_reason(self, device, dtype):
        if not dtype.is_floating_point:
            return f"it needs floating-point features, got {dtype}"
        return None

    def attention(
        self, graph, kind, dst, src, values, att, edge_attr, loop_attr, edge_proj, philox, scale, negative_slope,
        dropout_p, return_probs,
    ):  # fmt: skip
        keep = None
        if dropout_p > 0.0:
            keep = self.dropout_keep(philox, graph.num_ids, dst.shape[1], dropout_p)
        compute = torch.float64 if dst.dtype == torch.float64 else torch.float32
        out, lse, probs = graph_attention(
            kind, graph, dst, src, values, att, edge_attr, loop_attr, edge_proj, scale=scale,
            negative_slope=negative_slope, keep=keep, dropout_p=dropout_p, compute_dtype=compute,
        )  # fmt: skip
        probs = probs.float() if return_probs else probs.new_empty(0, dst.shape[1], dtype=torch.float32)
        return out.to(dst.dtype), lse.float(), probs


register(ReferenceBackend())
