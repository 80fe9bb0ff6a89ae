"""The contenders: fastattn's registered backends, torch SDPA (default and forced), FlexAttention.

Each runner answers two questions with ``None`` or a sentence (``unavailable_reason`` for the
machine, ``unsupported_reason`` for a point) and builds a call ``fn(q, k, v) -> out`` for a point,
doing all mask preparation (SDPA's dense mask, Flex's block mask) once, outside timing.
A call that still fails on its first run is reported by the caller with torch's own message.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from _points import MaskInputs, Shape
from torch import Tensor

import fastattn
from fastattn._validate import validate
from fastattn.backends.registry import Backend

Call = Callable[[Tensor, Tensor, Tensor], Tensor]

SDPA_FORCED = ("flash", "efficient", "cudnn", "math")
TORCH_NAMES = ("sdpa", *SDPA_FORCED, "flex")


class Runner:
    name = ""
    description = ""
    default_on_cpu = True

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return None

    def unsupported_reason(
        self, shape: Shape, mode: str, maskin: MaskInputs, q: Tensor, k: Tensor, v: Tensor
    ) -> Optional[str]:
        return None

    def make_call(self, shape: Shape, maskin: MaskInputs, device: torch.device) -> tuple[Call, list[Tensor]]:
        """``(fn, extra)``: the call and the tensors it keeps alive (counted in peak memory)."""
        raise NotImplementedError


class FastattnRunner(Runner):
    """A backend of ``fastattn.backends`` through the public entry point."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.backend = fastattn.backends.get(name)
        self.description = f"fastattn {name}: {self.backend.description}"
        # On the CPU, "triton" and "cuda" can only run under the interpreter / emulator: not worth timing.
        self.default_on_cpu = name not in ("triton", "cuda")

    def unavailable_reason(self, device):
        reason = self.backend.unavailable_reason()
        if reason:
            return reason
        return None

    def unsupported_reason(self, shape, mode, maskin, q, k, v):
        if mode != "fwd" and type(self.backend).backward is Backend.backward:
            return f"fastattn backend {self.name!r} has no backward"
        params, *_ = validate(q, k, v, maskin.tensor, 0.0, maskin.causal, None, False, maskin.window, 0)
        return self.backend.unsupported_reason(params)

    def make_call(self, shape, maskin, device):
        kwargs = maskin.fastattn_kwargs()
        name = self.name

        def fn(q, k, v):
            return fastattn.scaled_dot_product_attention(q, k, v, **kwargs, backend=name)

        return fn, []


class SdpaRunner(Runner):
    """torch SDPA: its own choice (``sdpa``) or one kernel forced through ``sdpa_kernel``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.forced = None if name == "sdpa" else name
        self.description = "torch SDPA, " + (f"forced {name} kernel" if self.forced else "torch's default choice")
        # On the CPU, SDPA's default is its flash kernel: timing "flash" again would repeat "sdpa".
        self.default_on_cpu = name in ("sdpa", "math")

    def _kernel(self):
        from torch.nn.attention import SDPBackend

        return {
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "math": SDPBackend.MATH,
        }[self.forced]

    def unavailable_reason(self, device):
        if self.forced in ("efficient", "cudnn") and device.type != "cuda":
            return f"SDPA's {self.forced} kernel runs on CUDA only"
        if self.forced == "cudnn" and not torch.backends.cudnn.is_available():
            return "cuDNN is not available in this torch build"
        return None

    def unsupported_reason(self, shape, mode, maskin, q, k, v):
        dense_needed = maskin.tensor is not None or maskin.window is not None
        if self.forced == "flash" and dense_needed and q.device.type == "cuda":
            return "SDPA's flash kernel takes no attn_mask (the point needs one)"
        return None

    def make_call(self, shape, maskin, device):
        dense = maskin.dense(shape.seqlen, shape.seqlen_k, device)
        causal = maskin.causal and dense is None
        ctx = (lambda: contextlib.nullcontext()) if self.forced is None else self._forced_ctx

        def fn(q, k, v):
            with ctx():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, is_causal=causal)

        return fn, ([] if dense is None else [dense])

    def _forced_ctx(self):
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel(self._kernel())


_FLEX = {}


def _compiled_flex():
    """One ``torch.compile``-d ``flex_attention`` per process (recompiles per shape, never per call)."""
    if "fn" not in _FLEX:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        # Every (shape, dtype, mask) is a recompile; the default limit (8) would fall back to eager.
        for attr in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, attr):
                setattr(torch._dynamo.config, attr, 1024)
        if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
            torch._dynamo.config.accumulated_recompile_limit = 4096
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def flex_mask_mod(maskin: MaskInputs):
    """FlexAttention's ``mask_mod`` for the point's mask, or None when nothing is masked."""
    left, right = maskin.bounds
    valid, dense2d = maskin.valid_len, maskin.dense2d
    if (left, right) == (-1, -1) and valid is None and dense2d is None:
        return None

    def mask_mod(b, h, q_idx, kv_idx):
        ok = kv_idx >= 0
        if right >= 0:
            ok = ok & (kv_idx <= q_idx + right)
        if left >= 0:
            ok = ok & (kv_idx >= q_idx - left)
        if valid is not None:
            ok = ok & (kv_idx < valid[b])
        if dense2d is not None:
            ok = ok & dense2d[q_idx, kv_idx]
        return ok

    return mask_mod


class FlexRunner(Runner):
    name = "flex"
    description = "torch FlexAttention, compiled, block mask built once per point"

    def unavailable_reason(self, device):
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError as exc:
            return f"FlexAttention cannot be imported: {exc}"
        return None

    def unsupported_reason(self, shape, mode, maskin, q, k, v):
        if mode != "fwd" and q.device.type == "cpu":
            return "FlexAttention has no backward on the CPU (torch raises NotImplementedError)"
        return None

    def make_call(self, shape, maskin, device):
        from torch.nn.attention.flex_attention import create_block_mask

        flex = _compiled_flex()
        mod = flex_mask_mod(maskin)
        block_mask = None
        extra: list[Tensor] = []
        if mod is not None:
            batch = shape.batch if maskin.valid_len is not None else None
            block_mask = create_block_mask(mod, batch, None, shape.seqlen, shape.seqlen_k, device=device)
            extra = [t for t in block_mask.as_tuple() if isinstance(t, Tensor)]

        def fn(q, k, v):
            return flex(q, k, v, block_mask=block_mask)

        return fn, extra


def all_runners() -> dict[str, Runner]:
    """Every runner by name: fastattn's registered backends first, then torch's."""
    runners: dict[str, Runner] = {n: FastattnRunner(n) for n in fastattn.backends.names()}
    for name in ("sdpa", *SDPA_FORCED):
        runners[name] = SdpaRunner(name)
    runners["flex"] = FlexRunner()
    return runners


def default_names(runners: dict[str, Runner], device: torch.device, quick: bool = False) -> list[str]:
    """All runners available here except fastattn's oracle (on the CPU also without SDPA's forced
    flash, which is ``sdpa`` again, and the Triton interpreter and CUDA emulator; with ``quick``,
    without Flex)."""
    return [n for n in runners if not left_out(runners, n, device, quick)]


def left_out(runners: dict[str, Runner], name: str, device: torch.device, quick: bool = False) -> Optional[str]:
    """Why ``name`` is not in the default set here, or None."""
    runner = runners[name]
    reason = runner.unavailable_reason(device)
    if reason:
        return reason
    if name == "reference":
        return "the oracle, not a contender (O(L^2) memory, minutes per run on 2 cores): name it to time it"
    if quick and name == "flex":
        return "--quick leaves it out: compiling it per shape (30 s cold) exceeds the budget; name it to time it"
    if device.type == "cpu" and not runner.default_on_cpu:
        if name == "flash":
            return "on the CPU, SDPA's flash kernel is what 'sdpa' chooses: name it to time it again"
        return "on the CPU it runs under an interpreter/emulator: name it in --backends to time it"
    return None


def quiet_trial(fn: Callable, *args) -> tuple[object, Optional[BaseException], list[str]]:
    """Runs ``fn(*args)`` once: ``(result, exception or None, the warnings it gave)``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fn(*args)
        except Exception as exc:  # the caller classifies it (oom, unsupported, error)
            return None, exc, [str(w.message) for w in caught]
    return result, None, [str(w.message) for w in caught]
