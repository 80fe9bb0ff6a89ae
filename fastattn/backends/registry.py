"""One registry of backends, the automatic choice between them, and what every backend shares.

A backend is an object with a name, a ``Capabilities`` table (devices, dtypes, head dims, features), two
questions that answer ``None`` or a sentence (``unavailable_reason``: can it run on this machine at all;
``unsupported_reason``: can it take this call, derived from the table plus ``extra_reason`` for what a
table cannot say, such as a GPU's compute capability) and two calls (``forward``, ``backward``) that run
its ``torch.library`` ops. The entry point validates once into an ``AttnParams`` and asks the registry
for a backend; no backend re-validates or re-interprets it.

Cross-backend concerns live here and nowhere else (no backend imports another):

* **Backward fallback** (``run_backward``): a backend whose backward kernels cannot take a call its
  forward took says why (``backward_reason``); the backward then runs on the first backend of the
  automatic order for that device that can, with the same ``(out, lse)`` and dropout seed.
* **Dropout**: the autograd function draws one ``philox`` seed per call (``_philox.philox_seed_offset``)
  and hands it to the forward and to whichever backward runs; every backend implements the one keep-mask
  contract (the reference through ``_philox.keep_mask``), so nothing converts a seed to a stored mask.
* **Autocast** (``autocast_inputs``): under ``torch.autocast`` float32 inputs run in the autocast dtype,
  whatever the backend, as torch's own SDPA does.

Never silently slow: when the automatic choice lands on ``reference`` (unfused, O(Lq·Lk) memory)
because the fused backends it tried refused the call, a :class:`SlowPathWarning` names their reasons
and the fix, once per distinct message; naming ``backend="reference"`` is the way to choose it
knowingly, without a warning. ``fastattn info`` lists each backend's ``slow_cases``.

Compile-safe: ``choose`` runs while ``torch.compile`` traces, so every ``unavailable_reason`` must
answer without touching the file system there (backends settle availability when their library
loads), and the warning is issued at trace time through Dynamo's ``comptime`` hook, since
``warnings.warn`` would break the graph.

Ops: every backend's forward op takes ``OP_FWD_ARGS`` in that order and its backward op ``OP_BWD_ARGS``;
one fake per direction (``fake_forward``, ``fake_backward``) serves all of them. ``summary`` is the list of
tile-summary tensors the backend asked ``AttnParams.tile_summary`` for (its kernels' blocks, in
``blocks``), which differ per backend; the reference's is empty. ``variant`` is the call's scalar variant
(band, q_offset, chunk, softcap) packed into one ``float[]`` (``params.VariantScalars``), so that a new scalar
rule changes no schema, fake or reference op; the tensor variants are ``alibi_slopes`` and ``sinks``. The last
four arguments describe the sequence layout (``op_layout``): ``cu_seqlens_q``/``cu_seqlens_k`` are None for a
dense batch, and for packed sequences the ``(B + 1,)`` offsets with ``max_seqlen_q``/``max_seqlen_k``; they
default to the dense layout.

Packed outputs: ``q``, ``k``, ``v`` are the ``(1, H, total, D)`` views of the caller's ``(total, H, D)``
tensors, and every backend returns ``out``, ``dq``, ``dk``, ``dv`` in that token-major memory layout
(``packed_empty``), so that the caller's ``(total, H, D)`` results are contiguous; the lse is
``(1, Hq, total_q)``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..params import FEATURES, AttnParams

__all__ = [
    "Backend",
    "Capabilities",
    "register",
    "get",
    "names",
    "choose",
    "run_backward",
    "autocast_inputs",
    "fake_forward",
    "fake_backward",
    "UnsupportedError",
    "SlowPathWarning",
    "OP_FWD_ARGS",
    "OP_BWD_ARGS",
    "OP_LAYOUT_ARGS",
    "op_layout",
    "packed_empty",
]


class UnsupportedError(RuntimeError):
    """A backend named explicitly cannot take these inputs (or cannot run here)."""


class SlowPathWarning(UserWarning):
    """The automatic choice ran a call on the unfused ``reference`` backend that a fused one could take."""


_CASTS = {
    torch.float32: ".float()",
    torch.bfloat16: ".bfloat16()",
    torch.float16: ".half()",
    torch.float64: ".double()",
}


@dataclass(frozen=True)
class Capabilities:
    """What a backend takes, as data: ``reason`` derives its refusal of a call from it.

    ``devices``: device types (None: any). ``head_dims``: exactly these head dims (query and value), or None for
    any up to ``max_head_dim`` (None: unbounded). ``features``: the ``params.FEATURES`` it implements.
    """

    devices: Optional[tuple[str, ...]]
    dtypes: tuple[torch.dtype, ...]
    head_dims: Optional[tuple[int, ...]] = None
    max_head_dim: Optional[int] = None
    features: frozenset[str] = frozenset(FEATURES)

    def reason(self, params: AttnParams) -> Optional[str]:
        """Every reason this table refuses ``params`` (joined), or None."""
        reasons = []
        if self.devices is not None and params.device.type not in self.devices:
            reasons.append(f"it runs on {' or '.join(self.devices)} tensors, got device {params.device}")
        if params.dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            casts = " or ".join(_CASTS[d] for d in self.dtypes if d in _CASTS)
            reasons.append(f"dtype {params.dtype} is not supported ({names}): cast the inputs with {casts}")
        for name, dim in (("head_dim", params.head_dim), ("head_dim_v", params.head_dim_v)):
            if self.head_dims is not None and dim not in self.head_dims:
                reasons.append(f"{name} {dim} is not supported (one of {', '.join(map(str, self.head_dims))})")
            elif self.max_head_dim is not None and dim > self.max_head_dim:
                reasons.append(f"{name} {dim} is above the supported {self.max_head_dim}")
        lacking = params.features - self.features
        missing = [f for f in FEATURES if f in lacking]
        if missing:
            reasons.append("it has no " + ", no ".join(FEATURES[f] for f in missing))
        return "; ".join(reasons) or None


class Backend:
    """Base class: subclasses set ``name``, ``description``, ``capabilities`` and implement the calls."""

    name: str = ""
    description: str = ""
    capabilities: Capabilities = Capabilities(devices=("cpu", "cuda"), dtypes=())
    # What its ``kvcache_forward`` takes (``fastattn.kvcache_attention``), or None: it has no decode kernels.
    kvcache_capabilities: Optional[Capabilities] = None
    # What sends a call this backend would otherwise take to ``reference``, each with its fix (``fastattn info``).
    slow_cases: tuple[str, ...] = ()

    def unavailable_reason(self) -> Optional[str]:
        """Why this backend cannot run on this machine at all, or None."""
        return None

    def extra_reason(self, params: AttnParams) -> Optional[str]:
        """What the capability table cannot say (a GPU's compute capability, the interpreter), or None."""
        return None

    def unsupported_reason(self, params: AttnParams) -> Optional[str]:
        """Why this backend cannot take this call, or None: the table's reasons, then ``extra_reason``.

        A key/value-cache call (``params.layout`` ``"kvcache"``/``"paged"``) is judged by ``kvcache_capabilities``.
        """
        table = self.capabilities
        if "kvcache" in params.features:
            table = self.kvcache_capabilities
            if table is None:
                return "it has no " + FEATURES["kvcache"]
        return table.reason(params) or self.extra_reason(params)

    def backward_reason(self, params: AttnParams) -> Optional[str]:
        """Why this backend's backward cannot run a call its forward took (``run_backward`` falls back), or None."""
        return None

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, params: AttnParams, philox: Optional[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """``(out (B, Hq, Lq, Dv), lse (B, Hq, Lq))``; ``philox`` is the dropout seed (None without dropout)."""
        raise NotImplementedError

    def kvcache_forward(
        self,
        query: Tensor,
        key_cache: Tensor,
        value_cache: Tensor,
        cache_seqlens: Tensor,
        key: Optional[Tensor],
        value: Optional[Tensor],
        block_table: Optional[Tensor],
        params: AttnParams,
        num_splits: int,
    ) -> tuple[Tensor, Tensor]:
        """``(out (B, Hq, Lq, Dv), lse (B, Hq, Lq))`` of ``fastattn.kvcache_attention`` (``num_splits`` 0: choose),
        after appending ``key``/``value`` into the caches in place."""
        raise NotImplementedError(f"backend {self.name!r} has no key/value-cache attention")

    def backward(
        self,
        grad_out: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        params: AttnParams,
        philox: Optional[Tensor],
        need_mask_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """``(dq, dk, dv, dmask)``; ``dmask`` is ``(B, Hq, Lq, Lk)`` in the mask's dtype, or None unless asked for.

        The sinks' gradient is not a backend's job: it needs only ``out``, ``lse`` and ``grad_out``
        (``fastattn.variants.sink_grad``), and the autograd function computes it once for every backend.
        """
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


def _reason(backend: Backend, params: AttnParams) -> Optional[str]:
    return backend.unavailable_reason() or backend.unsupported_reason(params)


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


def choose(name: Optional[str], params: AttnParams) -> Backend:
    """The named backend (refusing with its reason), or the first suitable one in auto order."""
    if name is None or name == "auto":
        env = os.environ.get("FASTATTN_BACKEND")
        if env and env != "auto":
            name = env
    if name is not None and name != "auto":
        backend = get(name)
        reason = _reason(backend, params)
        if reason:
            raise UnsupportedError(f"backend {name!r} cannot run this call: {reason}")
        return backend
    skipped = []
    for candidate in _auto_order(params.device):
        backend = _REGISTRY.get(candidate)
        if backend is None:
            continue
        reason = _reason(backend, params)
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


def backward_backend(backend: Backend, params: AttnParams) -> Backend:
    """The backend whose backward runs a call ``backend``'s forward took: itself, or the first fallback able to."""
    if backend.backward_reason(params) is None:
        return backend
    for candidate in _auto_order(params.device):
        other = _REGISTRY.get(candidate)
        if other is None or other is backend:
            continue
        if _reason(other, params) is None and other.backward_reason(params) is None:
            return other
    raise UnsupportedError(
        f"backend {backend.name!r} cannot run this backward ({backend.backward_reason(params)}), and no other can"
    )


def run_backward(
    backend: Backend,
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    params: AttnParams,
    philox: Optional[Tensor],
    need_mask_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """The backward of a call ``backend``'s forward ran, on ``backward_backend(backend, params)``."""
    chosen = backward_backend(backend, params)
    return chosen.backward(grad_out, q, k, v, out, lse, params, philox, need_mask_grad)


def autocast_inputs(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Under ``torch.autocast`` float32 inputs in the autocast dtype (differentiable casts); else as they are."""
    device_type = q.device.type
    if q.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        if dtype in (torch.float16, torch.bfloat16):
            return q.to(dtype), k.to(dtype), v.to(dtype)
    return q, k, v


# ---------------------------------------------------------------------------------------------- ops

# The arguments of every backend's forward and backward op, in order (Python ``custom_op``s and C++
# ``TORCH_LIBRARY`` schemas alike; tests/test_backend_ops.py compares the registered schemas with these).
OP_LAYOUT_ARGS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")
OP_FWD_ARGS = (
    "q", "k", "v", "mask", "alibi_slopes", "sinks", "summary", "philox",
    "scale", "dropout_p", "variant", "blocks", *OP_LAYOUT_ARGS,
)  # fmt: skip
OP_BWD_ARGS = (
    "grad_out", "q", "k", "v", "out", "lse", "mask", "alibi_slopes", "summary", "philox",
    "scale", "dropout_p", "variant", "blocks", "need_mask_grad", *OP_LAYOUT_ARGS,
)  # fmt: skip


def op_layout(params: AttnParams) -> tuple[Optional[Tensor], Optional[Tensor], int, int]:
    """``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)``: the ops' layout arguments (Nones, 0s if dense)."""
    if not params.is_packed:
        return None, None, 0, 0
    return params.cu_seqlens_q, params.cu_seqlens_k, int(params.seqlen_q), int(params.seqlen_k)


def packed_empty(like: Tensor, heads: int, total: int, dim: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """An uninitialised ``(1, heads, total, dim)`` view of a ``(total, heads, dim)`` tensor (token-major memory).

    The layout of every packed output and gradient, so that the caller's ``(total, heads, dim)`` is contiguous.
    """
    # (total, heads, dim) → (heads, total, dim) → (1, heads, total, dim)
    return like.new_empty(total, heads, dim, dtype=dtype or like.dtype).permute(1, 0, 2).unsqueeze(0)


def op_scalars(params: AttnParams) -> tuple[float, float, list[float]]:
    """``(scale, dropout_p, variant)``: the ops' scalar arguments, ``variant`` the packed ``VariantScalars``."""
    return float(params.scale), float(params.dropout_p), params.variant_scalars.pack()


def fake_forward(q, k, v, mask, alibi_slopes, sinks, summary, philox, scale, dropout_p, variant, blocks,
                 cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):  # fmt: skip
    """The fake of every backend's forward op: ``out (B, Hq, Lq, Dv)`` in q's dtype, ``lse (B, Hq, Lq)``.

    The lse is float32, float64 for float64 inputs (only the reference takes those). Packed (``cu_seqlens_q``
    given): ``out`` in the token-major layout of ``packed_empty``.
    """
    if cu_seqlens_q is not None:
        out = packed_empty(q, q.shape[1], q.shape[2], v.shape[3])
    else:
        out = q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out, q.new_empty(q.shape[:3], dtype=lse_dtype)


def fake_backward(grad_out, q, k, v, out, lse, mask, alibi_slopes, summary, philox, scale, dropout_p, variant, blocks,
                  need_mask_grad, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):  # fmt: skip
    """The fake of every backend's backward op: gradients shaped like their inputs (contiguous, as the
    kernels write them; token-major when packed, as ``packed_empty``), and ``dmask`` ``(B, Hq, Lq, Lk)`` in the
    mask argument's dtype or an empty tensor."""
    if need_mask_grad:
        dmask = q.new_empty(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dtype=mask.dtype)
    else:
        dmask = q.new_empty(0)
    if cu_seqlens_q is not None:
        return tuple(packed_empty(t, t.shape[1], t.shape[2], t.shape[3]) for t in (q, k, v)) + (dmask,)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask
