"""The native CPU backend (``backend="cpu"``): fused, tiled, multi-threaded attention in C++.

The ops ``fastattn::cpu_attn_fwd`` / ``fastattn::cpu_attn_bwd`` live in ``csrc/cpu`` (design note in
``csrc/cpu/attn_cpu_kernel.h``), a library of their own built with the plain C++ compiler by
``fastattn._ext.load("cpu")`` on first use (one line on stderr says so; the build is cached). Importing
this module is cheap: nothing is built or loaded until a call needs it.

Masks reach the kernel as the band ``(left, right, q_offset)`` plus the broadcast mask view, read
through its strides. The per-tile states that drive tile skipping are built inside the op by one
pass over the mask's own elements (much cheaper than ``AttnParams.tile_summary``'s generic reductions
at long lengths); a ``fastattn.Mask``'s cached summary is passed in instead, so reused masks are never
scanned again.

Packed sequences (``varlen_attention``): the ops take the registry's layout arguments and run each sequence
through the dense kernels on views of its own rows (``csrc/cpu/attn_cpu.cpp``, "packed sequences"), aligned
bottom-right; no padding and no ``(total, total)`` mask exist, and the work is each sequence's own tiles.

Dropout follows the GPU backends' contract (``fastattn/backends/triton/dropout.py``) bit for bit
(``csrc/cpu/attn_cpu_dropout.h``): the forward draws ``philox = [seed, offset]`` from torch's CPU
generator and returns ``saved = (philox,)``; the backward regenerates the keep-mask from it, so nothing
of size Lq x Lk is stored and one torch seed gives the same mask on every backend.

Instruction sets: the kernels are compiled once per ISA (``avx512``, ``avx2``, ``default``) and one is chosen
per call (``csrc/cpu/cpu_isa.h``): ``FASTATTN_CPU_ISA=avx512|avx2|default`` forces one (a clear error names
the variable for a value it does not know or an ISA the CPU lacks), else the best this CPU supports, capped
by torch's own choice (``ATEN_CPU_CAPABILITY``). :func:`isa` says which one runs; ``fastattn info`` and the
benchmarks' headers show it. float32 runs in fp32 tiles; float16, and bfloat16 where the CPU has no native
bf16 dot, are converted to fp32 tiles (O(L·D) conversions, the O(L²·D) work in fp32); bfloat16 with a native
dot (the avx512 build, avx512_bf16/AMX) runs bf16 GEMMs through oneDNN's brgemm.

``torch.compile`` cannot build or load a library while it traces, so an already built library is
loaded when this module is imported (:func:`_load_if_built`): a compiled model then finds the ops
registered. Only before the first build does a compiled call see the backend unavailable (one eager
call, or ``fastattn build --kind cpu``, builds it).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..params import FEATURES, AttnParams
from .registry import Backend, Capabilities, fake_backward, fake_forward, op_layout, op_scalars, register

__all__ = [
    "CPUBackend",
    "ISAS",
    "available_isas",
    "block_sizes",
    "describe_isa",
    "dispatch_counts",
    "dropout_keep_mask",
    "isa",
    "load",
]

ISAS = ("avx512", "avx2", "default")

_LOADED = False
_LOAD_ERROR: Optional[str] = None


def load() -> None:
    """Build (if needed) and load the CPU library, and register the ops' fake implementations."""
    global _LOADED, _LOAD_ERROR
    if _LOADED:
        return
    from .. import _ext

    try:
        _ext.load("cpu")
    except Exception as exc:  # a failed build: remember why, for unavailable_reason
        _LOAD_ERROR = f"building the CPU extension failed: {exc}"
        raise
    _register_fakes()
    _LOADED = True


def _load_if_built() -> None:
    """Load the CPU library at import when it is already built and intact (cheap; never builds, never raises)."""
    global _LOADED
    from .. import _ext

    try:
        if _ext.unavailable_reason("cpu") is None and _ext.cached_library("cpu") is not None:
            _ext.load("cpu")
            _register_fakes()
            _LOADED = True
    except Exception:  # whatever failed here fails again, with its message, on the first call
        pass


def _register_fakes() -> None:
    """The registry's shared fakes for the ops defined in C++ (one per direction, as every backend's)."""
    torch.library.register_fake("fastattn::cpu_attn_fwd")(fake_forward)
    torch.library.register_fake("fastattn::cpu_attn_bwd")(fake_backward)

    @torch.library.register_fake("fastattn::cpu_dropout_keep_mask")
    def _keep_fake(philox, batch, heads_q, seqlen_q, seqlen_k, dropout_p):
        return philox.new_empty((batch, heads_q, seqlen_q, seqlen_k), dtype=torch.uint8)


def dropout_keep_mask(philox: Tensor, batch: int, heads_q: int, seqlen_q: int, seqlen_k: int, p: float) -> Tensor:
    """The keep-mask the CPU kernels apply, ``(B, Hq, Lq, Lk)`` bool (``fastattn::cpu_dropout_keep_mask``).

    Same arguments and result as the Triton and CUDA backends' ``dropout_keep_mask``; the attention kernels
    never materialise it (tests, and replaying a forward with an explicit mask).
    """
    load()
    return torch.ops.fastattn.cpu_dropout_keep_mask(philox, batch, heads_q, seqlen_q, seqlen_k, float(p)).bool()


def isa() -> str:
    """The instruction-set build the next CPU call runs: ``"avx512"``, ``"avx2"`` or ``"default"``.

    Raises ``RuntimeError`` naming ``FASTATTN_CPU_ISA`` when that variable holds an unknown value or an ISA
    this CPU lacks (the same error a call would raise). Builds the library on first use, like a call.
    """
    load()
    return torch.ops.fastattn.cpu_attn_isa()


def available_isas() -> list[str]:
    """The ISA builds this CPU can run and the library has, best first: what ``FASTATTN_CPU_ISA`` accepts here."""
    load()
    return list(torch.ops.fastattn.cpu_attn_isas())


def describe_isa() -> str:
    """One line: the ISA the next call runs and why, e.g. ``"avx2 (forced by FASTATTN_CPU_ISA=avx2; this CPU:
    avx512)"``, or the error a bad ``FASTATTN_CPU_ISA`` gives. Never builds: ``"not built yet"`` before the
    library exists."""
    if not _LOADED:
        _load_if_built()
    if not _LOADED:
        return "not built yet (`fastattn build --kind cpu`, or one call, builds it)"
    try:
        info = torch.ops.fastattn.cpu_attn_info()
    except RuntimeError as exc:
        return f"error: {str(exc).splitlines()[0]}"
    return info.split("isa=", 1)[1].rsplit(" brgemm_bf16=", 1)[0]


def dispatch_counts() -> dict[str, dict[str, int]]:
    """Calls of the CPU attention kernels so far in this process, per ISA build and direction.

    ``{"avx512": {"fwd": n, "bwd": n}, "avx2": {...}, "default": {...}}``: what tests read to prove that the
    build they forced is the one that ran.
    """
    load()
    flat = torch.ops.fastattn.cpu_attn_dispatch_counts()
    return {name: {"fwd": flat[2 * i], "bwd": flat[2 * i + 1]} for i, name in enumerate(ISAS)}


def block_sizes(params: AttnParams, seqlen_k: int) -> tuple[int, int]:
    """``(BQ, BK)``: small key tiles where a mask or band can skip them, longer ones when dense.

    A chunk alone whose size is a multiple of 256 (and q_offset of 64) keeps the dense tiles: every tile is then
    all in or all out of the chunks, so nothing is lost to skipping, and the longer key tiles keep the P·V
    product's accumulator traffic per key at the dense rate (measured: 64-key tiles cost a chunk of L/4 about
    30% more per attended pair, benchmarks/cpu_variants.py).
    """
    aligned_chunk = params.chunk > 0 and params.chunk % 256 == 0 and params.q_offset % 64 == 0
    if params.mask is not None or params.has_band or (params.chunk > 0 and not aligned_chunk):
        return 64, 64
    return 64, 256 if seqlen_k >= 256 else 64


def _mask_args(params: AttnParams, block_q: int, block_k: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The mask (bool or float32, broadcast dims kept at size 1) and a cached tile state, if any."""
    if params.mask_base is None:
        return None, None
    base = params.mask_base
    if base.dtype != torch.bool and base.dtype != torch.float32:
        base = base.to(torch.float32)  # the mask's own size, never Lq x Lk per head
    state = None
    if params.mask_obj is not None:
        state = params.tile_summary(block_q, block_k).state
    return base, state


def _variant_args(params: AttnParams) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The ALiBi slopes and the sinks as the kernel reads them: contiguous float32, or None."""
    alibi = None if params.alibi is None else params.alibi.float().contiguous()
    sinks = None if params.sinks is None else params.sinks.detach().float().contiguous()
    return alibi, sinks


class CPUBackend(Backend):
    name = "cpu"
    description = (
        "native C++ kernels per ISA (avx512, avx2, default; FASTATTN_CPU_ISA forces one): tiled, register-blocked "
        "fp32 micro-kernels (bf16 with a native dot: oneDNN brgemm), multi-threaded, tile skipping, dropout with "
        "the GPU backends' Philox stream (fp32, bf16, fp16)"
    )
    slow_cases = (
        "CPU tensors in float64: cast them to float32 (or bfloat16 / float16)",
        "before the CPU library is built, calls under torch.compile: run `fastattn build --kind cpu` or one eager call",
        "no C++ compiler or ninja: install them (apt-get install g++; pip install ninja)",
    )
    capabilities = Capabilities(
        devices=("cpu",),
        dtypes=(torch.float32, torch.bfloat16, torch.float16),
        features=frozenset(FEATURES),
    )
    # The decode kernel (csrc/cpu/decode_cpu_kernel.h) converts every row to fp32 as it reads it: float16 too.
    kvcache_capabilities = Capabilities(
        devices=("cpu",),
        dtypes=(torch.float32, torch.bfloat16, torch.float16),
        features=frozenset(FEATURES),
    )

    def unavailable_reason(self) -> Optional[str]:
        if _LOADED:
            return None
        if _LOAD_ERROR:
            return _LOAD_ERROR
        if torch.compiler.is_compiling():  # nothing may touch the file system while torch.compile traces
            return (
                "its library is not built yet, and a call under torch.compile cannot build it: run "
                "`fastattn build --kind cpu` or one eager call first"
            )
        from .. import _ext

        return _ext.unavailable_reason("cpu")

    def forward(self, q, k, v, params, philox):
        load()
        block_q, block_k = block_sizes(params, params.seqlen_k)
        mask, state = _mask_args(params, block_q, block_k)
        return torch.ops.fastattn.cpu_attn_fwd(
            q, k, v, mask, *_variant_args(params), [] if state is None else [state], philox, *op_scalars(params),
            [block_q, block_k], *op_layout(params),
        )  # fmt: skip

    def kvcache_forward(
        self, query, key_cache, value_cache, cache_seqlens, key, value, block_table, params, num_splits
    ):
        from ._kvcache import kvcache_fwd_cpu, op_args

        load()
        return kvcache_fwd_cpu(
            query, key_cache, value_cache, cache_seqlens, key, value, block_table, *op_args(params, num_splits)
        )

    def backward(self, grad_out, q, k, v, out, lse, params, philox, need_mask_grad):
        load()
        block_q, block_k = 64, 64
        mask, state = _mask_args(params, block_q, block_k)
        alibi, _ = _variant_args(params)
        dq, dk, dv, dmask = torch.ops.fastattn.cpu_attn_bwd(
            grad_out, q, k, v, out, lse, mask, alibi, [] if state is None else [state], philox, *op_scalars(params),
            [block_q, block_k], bool(need_mask_grad), *op_layout(params),
        )  # fmt: skip
        if not need_mask_grad:
            return dq, dk, dv, None
        return dq, dk, dv, dmask.to(params.mask.dtype)


register(CPUBackend())
_load_if_built()
