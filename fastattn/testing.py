"""Test helpers shared by fastattn's own tests and by users who check a backend on their machine.

The tolerance rule (as FlashAttention's tests use it): a backend's error against the float64
oracle may be at most ``factor`` times the error of the same computation done by plain PyTorch in
the low-precision dtype (2 for outputs, 3 for gradients), with an absolute floor scaled to the
reference's magnitude for cases where PyTorch's own error is zero or not finite.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["assert_close", "floor_for", "poison", "random_qkv", "runnable_backends"]

# Absolute floor per dtype, relative to max(1, |reference|.max()).
_FLOORS = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def floor_for(dtype: torch.dtype) -> float:
    return _FLOORS[dtype]


def poison(t: Tensor) -> Tensor:
    """Fill with NaN (in place) so an element a kernel never writes fails the comparison."""
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    return t.fill_(-12345)


def random_qkv(
    batch: int,
    heads_q: int,
    heads_kv: int,
    seqlen_q: int,
    seqlen_k: int,
    head_dim: int,
    head_dim_v: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    requires_grad: bool = False,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fresh standard-normal q, k, v in ``(B, H, L, D)`` layout (never zeros)."""
    head_dim_v = head_dim if head_dim_v is None else head_dim_v

    def draw(*shape):
        t = torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    return (
        draw(batch, heads_q, seqlen_q, head_dim),
        draw(batch, heads_kv, seqlen_k, head_dim),
        draw(batch, heads_kv, seqlen_k, head_dim_v),
    )


def _describe(bad: Tensor, actual: Tensor, expected: Tensor, limit: int = 5) -> str:
    idx = bad.nonzero()[:limit]
    rows = [
        f"  at {tuple(i.tolist())}: got {actual[tuple(i)].item():.6g}, expected {expected[tuple(i)].item():.6g}"
        for i in idx
    ]
    return "\n".join(rows)


def assert_close(
    actual: Tensor,
    expected: Tensor,
    baseline: Optional[Tensor] = None,
    *,
    factor: float = 2.0,
    name: str = "output",
    atol: Optional[float] = None,
) -> None:
    """``|actual - expected| <= max(factor * |baseline - expected|.max(), floor)`` elementwise.

    ``expected`` is the float64 oracle; ``baseline`` plain PyTorch in ``actual``'s dtype (None for
    float32/float64, where the floor alone applies). NaN must appear exactly where expected has
    NaN. On failure the message says how many elements are off and where the first ones are.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        wrong = nan_a ^ nan_e
        raise AssertionError(
            f"{name}: NaN pattern differs in {int(wrong.sum())} of {a.numel()} elements\n{_describe(wrong, a, e)}"
        )
    a, e = torch.where(nan_e, 0.0, a), torch.where(nan_e, 0.0, e)
    finite = torch.isfinite(e)
    scale = max(1.0, float(e[finite].abs().max())) if finite.any() else 1.0
    tol = atol if atol is not None else floor_for(actual.dtype) * scale
    if baseline is not None:
        err = (baseline.detach().double().cpu() - e).abs()
        err = err[torch.isfinite(err) & finite]
        if err.numel():
            tol = max(tol, factor * float(err.max()))
    diff = (a - e).abs()
    # Infinities must match exactly (a fully masked row is 0, but lse is -inf).
    bad = (diff > tol) | (torch.isinf(e) & (a != e))
    bad &= ~(torch.isinf(e) & (a == e))
    if bad.any():
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.numel()} elements off by more than {tol:.3g} "
            f"(max error {float(diff[~torch.isinf(e)].max()) if (~torch.isinf(e)).any() else 0.0:.3g}, "
            f"dtype {actual.dtype})\n{_describe(bad, a, e)}"
        )


def runnable_backends(query: Tensor, key: Tensor, value: Tensor, **kwargs) -> list[str]:
    """Names of the registered backends that accept this call on this machine."""
    from ._validate import validate
    from .backends import registry

    args = {
        k: kwargs.get(k, d)
        for k, d in (
            ("attn_mask", None),
            ("dropout_p", 0.0),
            ("is_causal", False),
            ("scale", None),
            ("enable_gqa", False),
            ("window", None),
            ("q_offset", 0),
        )
    }
    problem, _, _, _, spec = validate(query, key, value, **args)
    names = []
    for name in registry.names():
        backend = registry.get(name)
        if (
            backend.unavailable_reason() is None
            and backend.unsupported_reason(problem, spec, args["dropout_p"]) is None
        ):
            names.append(name)
    return names
