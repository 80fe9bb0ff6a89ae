"""The native CPU backend of the graph ops (``backend="cpu"``): C++ kernels, multi-threaded over nodes.

The ops ``fastattn::cpu_graph_attn`` / ``cpu_graph_attn_bwd`` / ``cpu_graph_dropout_keep`` live in
``csrc/cpu/graph_cpu.cpp`` (kernels and design note in ``graph_cpu_kernel.h``) and join the CPU
extension library that ``fastattn._ext.load("cpu")`` builds on first use (one line on stderr; cached).
Importing this module is cheap: nothing is built until a call needs it.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._backends import GraphBackend, by_edge_id, register
from ._ops import bwd_fake, fwd_fake, register_autograd

__all__ = ["CPUGraphBackend", "load"]

_LOADED = False
_LOAD_ERROR: Optional[str] = None


def load() -> None:
    """Build (if needed) and load the CPU library; register the graph ops' fakes and autograd once."""
    global _LOADED, _LOAD_ERROR
    if _LOADED:
        return
    from .. import _ext

    try:
        _ext.load("cpu")
    except Exception as exc:  # a failed build: remember why, for unavailable_reason
        _LOAD_ERROR = f"building the CPU extension failed: {exc}"
        raise
    torch.library.register_fake("fastattn::cpu_graph_attn")(fwd_fake)
    torch.library.register_fake("fastattn::cpu_graph_attn_bwd")(bwd_fake)

    @torch.library.register_fake("fastattn::cpu_graph_dropout_keep")
    def _keep_fake(philox, num_ids, heads, p):
        return philox.new_empty(num_ids, heads, dtype=torch.bool)

    register_autograd("fastattn::cpu_graph_attn", lambda *args: torch.ops.fastattn.cpu_graph_attn_bwd(*args))
    _LOADED = True


class CPUGraphBackend(GraphBackend):
    name = "cpu"
    description = "native C++ kernels: online softmax per target over its CSR row, all heads at once, at::parallel_for"

    def unavailable_reason(self) -> Optional[str]:
        if _LOADED:
            return None
        if _LOAD_ERROR:
            return _LOAD_ERROR
        from .. import _ext

        return _ext.unavailable_reason("cpu")

    def unsupported_reason(self, device, dtype):
        if device.type != "cpu":
            return f"it runs on CPU tensors only, got device {device}"
        if dtype not in (torch.float32, torch.bfloat16):
            return f"it supports float32 and bfloat16, got {dtype}"
        return None

    def attention(
        self, graph, kind, dst, src, values, att, edge_attr, loop_attr, edge_proj, philox, scale, negative_slope,
        dropout_p, return_probs,
    ):  # fmt: skip
        load()
        out, lse, probs = torch.ops.fastattn.cpu_graph_attn(
            *graph.tensors(), dst, src, values, att, edge_attr, loop_attr, edge_proj, philox,
            kind, graph.num_edges, float(scale), float(negative_slope), float(dropout_p), bool(return_probs),
        )  # fmt: skip
        return out, lse, by_edge_id(graph, probs) if return_probs else probs

    def dropout_keep(self, philox, num_ids, heads, p):
        load()
        return torch.ops.fastattn.cpu_graph_dropout_keep(philox, num_ids, heads, float(p))


register(CPUGraphBackend())
