"""The Triton backend of the graph ops (``backend="triton"``): CUDA GPUs, or CPU tensors under ``TRITON_INTERPRET=1``.

The ops are ``torch.library.custom_op``s with fakes (``_ops.py``'s contract), so ``torch.compile`` and
``opcheck`` work on CPU tensors under the interpreter too (``triton_op`` + ``wrap_triton`` do not there:
see shared/NOTES.md). Importing this module is cheap: triton and the kernels
(``_triton_kernels.py``) are imported on first use.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ..backends.triton import _TRITON_INSTALLED, _interpreting
from ._backends import GraphBackend, by_edge_id, register
from ._ops import bwd_fake, fwd_fake, register_autograd

__all__ = ["TritonGraphBackend"]

BLOCK_E = 8  # edges per block: one running-max update per block
NUM_WARPS = 8


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _sizes(kind: int, dst: Tensor, src: Tensor, values: Optional[Tensor], edge_attr: Optional[Tensor]):
    """``(H, C, Cv, De)``: heads, score channels (the value channels for GAT), value channels, edge dim."""
    heads = dst.shape[1]
    channels_v = values.shape[2] if values is not None else src.shape[2]
    channels = channels_v if kind == 1 else src.shape[2]
    edge_dim = edge_attr.shape[1] if edge_attr is not None and kind != 1 else 0
    return heads, channels, channels_v, edge_dim


def _poisoned(t: Tensor) -> Tensor:
    """``FASTATTN_POISON=1`` (tests): outputs start as NaN, so an element a kernel never writes shows."""
    return t.fill_(float("nan")) if os.environ.get("FASTATTN_POISON") == "1" and t.numel() else t


def num_warps(kernel: str, kind: int, has_edge: bool) -> int:
    """Warps per program: 8, but 2 for the dot-product backward with edge features (see :func:`_blocks`)."""
    return 2 if (kernel == "bwd_dst" and kind == 0 and has_edge) else NUM_WARPS


def _blocks(kernel: str, kind: int, heads: int, channels: int, channels_v: int, has_edge: bool) -> dict:
    """Launch constants. ``BLOCK_E`` = 8 edges and the warps of :func:`num_warps` were chosen with
    ``python -m fastattn.graph.compile_check`` (sm_80/sm_90, H = 8, C = 16): with 16 edges per block the
    edge-feature variants took up to 255 registers; with 4 warps ptxas spilled a value inside the edge
    loop of three backward variants on sm_90, with 8 warps inside that of the dot-product backward with
    edge features on sm_80, which 2 warps compile cleanly. Not timed on a GPU."""
    return {
        "BLOCK_E": BLOCK_E,
        "BLOCK_H": _pow2(heads),
        "BLOCK_C": _pow2(channels),
        "BLOCK_CV": _pow2(channels_v),
        "num_warps": num_warps(kernel, kind, has_edge),
    }


@torch.library.custom_op("fastattn::triton_graph_attn", mutates_args=())
def triton_graph_attn(
    rowptr: Tensor,
    col: Tensor,
    eid: Tensor,
    colptr: Tensor,
    row: Tensor,
    slot: Tensor,
    dst: Tensor,
    src: Tensor,
    values: Optional[Tensor],
    att: Optional[Tensor],
    edge_attr: Optional[Tensor],
    loop_attr: Optional[Tensor],
    edge_proj: Optional[Tensor],
    philox: Optional[Tensor],
    kind: int,
    num_edges: int,
    scale: float,
    negative_slope: float,
    dropout_p: float,
    return_probs: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from ._triton_kernels import _graph_fwd_kernel

    heads, channels, channels_v, edge_dim = _sizes(kind, dst, src, values, edge_attr)
    num_dst = dst.shape[0]
    out = _poisoned(torch.empty(num_dst, heads, channels_v, dtype=dst.dtype, device=dst.device))
    lse = _poisoned(torch.empty(num_dst, heads, dtype=torch.float32, device=dst.device))
    # Zeros: the slots of replaced self loops (past rowptr[-1]) are never visited and must read 0.
    probs = torch.zeros(eid.shape[0] if return_probs else 0, heads, dtype=torch.float32, device=dst.device)
    proj_t = edge_proj.float().t().contiguous() if edge_proj is not None else lse  # (De, H·C) fp32
    if num_dst > 0:
        _graph_fwd_kernel[(num_dst,)](
            rowptr, col, eid, dst, src, values if values is not None else src, att if att is not None else dst,
            edge_attr if edge_attr is not None else dst, loop_attr if loop_attr is not None else dst, proj_t,
            philox if philox is not None else rowptr, out, lse, probs if return_probs else lse,
            num_edges, heads, channels, channels_v, edge_dim, scale, negative_slope, dropout_p,
            KIND=kind, HAS_EDGE=edge_attr is not None, DROPOUT=dropout_p > 0.0, WRITE_PROBS=return_probs,
            **_blocks("fwd", kind, heads, channels, channels_v, edge_attr is not None),
        )  # fmt: skip
    return out, lse, probs


triton_graph_attn.register_fake(fwd_fake)


@torch.library.custom_op("fastattn::triton_graph_attn_bwd", mutates_args=())
def triton_graph_attn_bwd(
    grad_out: Tensor,
    grad_lse: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    rowptr: Tensor,
    col: Tensor,
    eid: Tensor,
    colptr: Tensor,
    row: Tensor,
    slot: Tensor,
    dst: Tensor,
    src: Tensor,
    values: Optional[Tensor],
    att: Optional[Tensor],
    edge_attr: Optional[Tensor],
    loop_attr: Optional[Tensor],
    edge_proj: Optional[Tensor],
    philox: Optional[Tensor],
    kind: int,
    num_edges: int,
    scale: float,
    negative_slope: float,
    dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from ._triton_kernels import _graph_bwd_dst_kernel, _graph_bwd_src_kernel

    heads, channels, channels_v, edge_dim = _sizes(kind, dst, src, values, edge_attr)
    num_dst, num_src, num_ids = dst.shape[0], src.shape[0], eid.shape[0]
    device, f32 = dst.device, torch.float32
    has_edge = edge_attr is not None
    loops = has_edge and loop_attr is not None and num_ids > num_edges
    p_kept = _poisoned(torch.empty(num_ids, heads, dtype=f32, device=device))
    d_score = _poisoned(torch.empty(num_ids, heads, dtype=f32, device=device))
    d_dst, d_src = _poisoned(torch.empty_like(dst)), _poisoned(torch.empty_like(src))
    d_values = _poisoned(torch.empty_like(values)) if values is not None else dst.new_empty(0)
    d_edge_attr = torch.zeros_like(edge_attr) if has_edge else dst.new_empty(0)  # replaced self loops keep 0
    d_loop_attr = _poisoned(torch.empty_like(loop_attr)) if loops else dst.new_empty(0)
    d_att = torch.zeros(heads, channels, dtype=f32, device=device) if kind == 2 else dst.new_empty(0)
    d_proj_t = torch.zeros(edge_dim, heads * channels, dtype=f32, device=device) if edge_dim else dst.new_empty(0)
    proj_t = edge_proj.float().t().contiguous() if edge_proj is not None else lse
    dlse = grad_lse.float().contiguous() if grad_lse is not None else None
    if num_dst > 0:
        _graph_bwd_dst_kernel[(num_dst,)](
            rowptr, col, eid, dst, src, values if values is not None else src, att if att is not None else dst,
            edge_attr if has_edge else dst, loop_attr if loop_attr is not None else dst, proj_t,
            philox if philox is not None else rowptr, grad_out, out, lse, dlse if dlse is not None else lse,
            p_kept, d_score, d_dst, d_edge_attr if has_edge else dst, d_loop_attr if loops else dst,
            d_att if kind == 2 else lse, d_proj_t if edge_dim else lse,
            num_edges, heads, channels, channels_v, edge_dim, scale, negative_slope, dropout_p,
            KIND=kind, HAS_EDGE=has_edge, DROPOUT=dropout_p > 0.0, HAS_DLSE=dlse is not None,
            **_blocks("bwd_dst", kind, heads, channels, channels_v, has_edge),
        )  # fmt: skip
    if num_src > 0:
        _graph_bwd_src_kernel[(num_src,)](
            colptr, row, slot, eid, dst, src, att if att is not None else dst, edge_attr if has_edge else dst,
            loop_attr if loop_attr is not None else dst, proj_t, grad_out, p_kept, d_score, d_src,
            d_values if values is not None else d_src,
            num_edges, heads, channels, channels_v, edge_dim, negative_slope,
            KIND=kind, HAS_EDGE=has_edge, **_blocks("bwd_src", kind, heads, channels, channels_v, has_edge),
        )  # fmt: skip
    d_att = d_att.to(dst.dtype) if kind == 2 else dst.new_empty(0)
    d_proj = d_proj_t.t().contiguous().to(dst.dtype) if edge_dim else dst.new_empty(0)  # (De, H·C) -> (H·C, De)
    return d_dst, d_src, d_values, d_att, d_edge_attr, d_loop_attr, d_proj


triton_graph_attn_bwd.register_fake(bwd_fake)
register_autograd("fastattn::triton_graph_attn", triton_graph_attn_bwd)


@torch.library.custom_op("fastattn::triton_graph_dropout_keep", mutates_args=())
def triton_graph_dropout_keep(philox: Tensor, num_ids: int, heads: int, p: float) -> Tensor:
    from ._triton_kernels import _graph_dropout_keep_kernel

    n = num_ids * heads
    keep = torch.empty(n, dtype=torch.int8, device=philox.device)
    block = 256
    if n > 0:
        _graph_dropout_keep_kernel[((n + block - 1) // block,)](philox, keep, n, p, BLOCK=block)
    return keep.view(num_ids, heads).bool()


@triton_graph_dropout_keep.register_fake
def _(philox, num_ids, heads, p):
    return philox.new_empty(num_ids, heads, dtype=torch.bool)


class TritonGraphBackend(GraphBackend):
    name = "triton"
    description = (
        "Triton kernels: one program per node, online softmax over blocks of its edges, every head at once "
        "(CUDA GPUs; CPU tensors only under TRITON_INTERPRET=1)"
    )

    def unavailable_reason(self) -> Optional[str]:
        if not _TRITON_INSTALLED:
            return "triton is not installed (pip install 'triton>=3.6')"
        if not torch.cuda.is_available() and not _interpreting():
            return "no CUDA GPU, and TRITON_INTERPRET=1 is not set (the interpreter runs it on CPU tensors, slowly)"
        return None

    def unsupported_reason(self, device, dtype):
        if device.type == "cpu":
            if not _interpreting():
                return "CPU tensors need TRITON_INTERPRET=1 (set before triton is imported)"
        elif device.type != "cuda":
            return f"expected CUDA tensors (or CPU under TRITON_INTERPRET=1), got device {device}"
        if dtype not in (torch.float32, torch.bfloat16):
            return f"it supports float32 and bfloat16, got {dtype}"
        if device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] < 8:
            return "bfloat16 needs compute capability 8.0 or newer"
        return None

    def attention(
        self, graph, kind, dst, src, values, att, edge_attr, loop_attr, edge_proj, philox, scale, negative_slope,
        dropout_p, return_probs,
    ):  # fmt: skip
        out, lse, probs = torch.ops.fastattn.triton_graph_attn(
            *graph.tensors(), dst, src, values, att, edge_attr, loop_attr, edge_proj, philox,
            kind, graph.num_edges, float(scale), float(negative_slope), float(dropout_p), bool(return_probs),
        )  # fmt: skip
        return out, lse, by_edge_id(graph, probs) if return_probs else probs

    def dropout_keep(self, philox, num_ids, heads, p):
        return torch.ops.fastattn.triton_graph_dropout_keep(philox, num_ids, heads, float(p))


register(TritonGraphBackend())
