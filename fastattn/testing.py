"""Test helpers shared by fastattn's own tests and by users who check a backend on their machine.

The tolerance rule (as FlashAttention's tests use it): a backend's error against the float64
oracle may be at most ``factor`` times the error of the same computation done by plain PyTorch in
the low-precision dtype (2 for outputs, 3 for gradients), with an absolute floor scaled to the
reference's magnitude for cases where PyTorch's own error is zero or not finite.

The catalogue of test cases (one for every backend's tests): ``MASK_KINDS`` and ``VARIANT_KINDS`` name
the mask and variant patterns, ``mask_kwargs`` / ``variant_kwargs`` draw them (fresh random tensors, with
rows that attend nothing where the pattern allows), ``pairwise`` builds the covering sets (every pair of
values of any two factors in some case), and ``check_backend`` runs one case through the entry point on a
named backend and compares the output, the lse and every gradient (dq, dk, dv, dsinks, dmask) with the
float64 oracle.

Packed sequences (``varlen_attention``): ``PACKED_LENGTHS`` names sets of per-sequence lengths (empty
sequences on either side, 1, 17, 65, 129 and > 1000 in one batch, ``Lq_b != Lk_b``), ``packed_lengths`` draws
them, ``random_packed`` the tensors and offsets, ``PACKED_MASK_KINDS`` / ``packed_mask_kwargs`` the
per-sequence band, and ``check_varlen`` compares a backend with the oracle run on every sequence alone
(``fastattn.reference.varlen_attention``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = [
    "assert_close",
    "floor_for",
    "poison",
    "random_qkv",
    "runnable_backends",
    "MASK_KINDS",
    "VARIANT_KINDS",
    "mask_kwargs",
    "variant_kwargs",
    "case_kwargs",
    "pairwise",
    "check_backend",
    "alibi_slopes",
    "PACKED_LENGTHS",
    "PACKED_MASK_KINDS",
    "packed_lengths",
    "cu_seqlens",
    "random_packed",
    "packed_mask_kwargs",
    "check_varlen",
    "packed_visited",
]

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
    """Names of the registered backends that accept this call (the entry point's keywords) on this machine."""
    from ._validate import validate
    from .backends import registry

    params, *_ = validate(query, key, value, **kwargs)
    return [
        name
        for name in registry.names()
        if registry.get(name).unavailable_reason() is None and registry.get(name).unsupported_reason(params) is None
    ]


# ---------------------------------------------------------------------------------------------- the catalogue

# Mask patterns: none, causal (top-left), a full (B, H, Lq, Lk) boolean with a row that attends nothing,
# key padding (B, 1, 1, Lk), an additive (1, H, Lq, Lk) float mask with -inf entries, a two-sided window,
# causal with a (Lq, Lk) boolean, bottom-right causal whose first rows see nothing (q_offset), and a
# causal window with a positive offset.
MASK_KINDS = ("none", "causal", "bool", "key_padding", "float", "window", "causal_bool", "q_offset", "window_offset")
# Variants: each alone, and all four together.
VARIANT_KINDS = ("plain", "softcap", "alibi", "sinks", "chunk", "all")


def mask_kwargs(
    kind: str, batch: int, heads: int, seqlen_q: int, seqlen_k: int, dtype: torch.dtype, generator: torch.Generator
) -> dict:
    """The entry point's mask keywords (``attn_mask``, ``is_causal``, ``window``, ``q_offset``) for a mask kind."""
    g = generator
    if kind == "none":
        return {}
    if kind == "causal":
        return {"is_causal": True}
    if kind == "bool":
        keep = torch.rand(batch, heads, seqlen_q, seqlen_k, generator=g) > 0.3
        keep[0, 0, seqlen_q // 2] = False  # a row that attends nothing: zeros, zero gradients
        return {"attn_mask": keep}
    if kind == "key_padding":  # each batch keeps a random prefix of at least one key
        lengths = torch.randint(1, seqlen_k + 1, (batch,), generator=g)
        return {"attn_mask": (torch.arange(seqlen_k) < lengths.view(batch, 1)).view(batch, 1, 1, seqlen_k)}
    if kind == "float":
        bias = torch.randn(1, heads, seqlen_q, seqlen_k, generator=g)
        bias[torch.rand(bias.shape, generator=g) < 0.15] = float("-inf")
        return {"attn_mask": bias.to(dtype)}
    if kind == "window":
        return {"window": (max(1, seqlen_k // 5), 3)}
    if kind == "causal_bool":
        return {"is_causal": True, "attn_mask": torch.rand(seqlen_q, seqlen_k, generator=g) > 0.25}
    if kind == "q_offset":  # bottom-right causal, two rows earlier: the first rows see nothing
        return {"is_causal": True, "q_offset": seqlen_k - seqlen_q - 2}
    if kind == "window_offset":
        return {"is_causal": True, "window": (max(2, seqlen_k // 3), -1), "q_offset": 7}
    raise ValueError(f"kind: expected one of {MASK_KINDS}, got {kind!r}")


def alibi_slopes(heads: int) -> Tensor:
    """ALiBi's geometric slopes ``2^(-8 (h + 1) / H)`` (Press et al.), float32 ``(H,)``."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)], dtype=torch.float32)


def variant_kwargs(kind: str, batch: int, heads: int, seqlen_q: int, seqlen_k: int, generator: torch.Generator) -> dict:
    """The entry point's variant keywords (``softcap``, ``alibi_slopes``, ``sinks``, ``chunk``) for a variant kind.

    The softcap is small enough to bend typical scores; the chunk is not a multiple of any kernel tile;
    the sinks are large enough to take a real share of each row; ALiBi slopes vary per batch.
    """
    g = generator
    kw: dict[str, Any] = {}
    if kind in ("softcap", "all"):
        kw["softcap"] = 1.5
    if kind in ("alibi", "all"):
        slopes = alibi_slopes(heads)
        kw["alibi_slopes"] = slopes if batch == 1 else slopes * (1 + torch.rand(batch, 1, generator=g))
    if kind in ("sinks", "all"):
        kw["sinks"] = torch.randn(heads, generator=g) + 1.0
    if kind in ("chunk", "all"):
        kw["chunk"] = max(1, max(seqlen_q, seqlen_k) // 3 + 1)
    if kind not in VARIANT_KINDS:
        raise ValueError(f"kind: expected one of {VARIANT_KINDS}, got {kind!r}")
    return kw


def case_kwargs(
    mask: str,
    variant: str,
    batch: int,
    heads: int,
    seqlen_q: int,
    seqlen_k: int,
    dtype: torch.dtype,
    generator: torch.Generator,
) -> dict:
    """``mask_kwargs`` and ``variant_kwargs`` together."""
    return {
        **mask_kwargs(mask, batch, heads, seqlen_q, seqlen_k, dtype, generator),
        **variant_kwargs(variant, batch, heads, seqlen_q, seqlen_k, generator),
    }


def pairwise(
    factors: dict[str, list],
    shrink: Callable[[dict], dict] = lambda case: case,
    exempt: Callable[[str, Any, str, Any], bool] = lambda a, va, b, vb: False,
) -> list[dict]:
    """A deterministic greedy covering set: every pair of values of any two factors appears in some case.

    ``shrink`` maps a case to the one that actually runs (e.g. long lengths with small sizes); pairs it can
    never produce are ``exempt``.
    """
    names = list(factors)

    def pairs(case):
        return {(a, repr(case[a]), b, repr(case[b])) for i, a in enumerate(names) for b in names[i + 1 :]}

    uncovered = set()
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            uncovered |= {
                (a, repr(va), b, repr(vb)) for va in factors[a] for vb in factors[b] if not exempt(a, va, b, vb)
            }
    cases = []
    while uncovered:
        a, ra, b, rb = min(uncovered)
        case = {a: next(v for v in factors[a] if repr(v) == ra), b: next(v for v in factors[b] if repr(v) == rb)}
        for f in names:
            if f in case:
                continue

            def gain(v, f=f, case=case, uncovered=uncovered):
                trial = {**case, f: v}
                return sum(
                    (x, repr(trial[x]), y, repr(trial[y])) in uncovered
                    for x, y in itertools.combinations(names, 2)
                    if x in trial and y in trial and f in (x, y)
                )

            case[f] = max(factors[f], key=gain)
        case = shrink(case)
        uncovered -= pairs(case)
        cases.append(case)
    return cases


def check_backend(
    backend: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kw: dict,
    *,
    backward: bool = True,
    mask_grad: bool = True,
    out_factor: float = 2.0,
    grad_factor: float = 3.0,
) -> dict:
    """Runs ``scaled_dot_product_attention(q, k, v, **kw, backend=backend)`` (and its backward) against the oracle.

    The oracle is ``fastattn.reference.attention`` in float64 (through plain autograd: an independent
    statement of every gradient, the sinks' included); plain PyTorch's error in ``q``'s dtype (the same
    oracle computed in that dtype) sets the tolerance. ``dq``, ``dk``, ``dv`` always; ``dsinks`` when ``kw``
    has sinks; ``dmask`` for a float mask when ``mask_grad``. The lse (fp32 whatever the inputs) is held to
    fp32's floor. Returns the backend's results by name.
    """
    from . import reference
    from .functional import scaled_dot_product_attention

    dtype = q.dtype
    grad_names = ["q", "k", "v"]
    if kw.get("sinks") is not None:
        grad_names.append("sinks")
    mask = kw.get("attn_mask")
    if mask_grad and isinstance(mask, Tensor) and mask.dtype.is_floating_point:
        grad_names.append("attn_mask")

    def run(fn, cast, **extra):
        args = {**kw, "q": q, "k": k, "v": v}
        for name in ("q", "k", "v", "attn_mask", "sinks"):
            if isinstance(args.get(name), Tensor) and args[name].dtype.is_floating_point:
                args[name] = cast(args[name])
        if backward:
            for name in grad_names:
                args[name] = args[name].detach().clone().requires_grad_(True)
        qq, kk, vv = args.pop("q"), args.pop("k"), args.pop("v")
        out, lse = fn(qq, kk, vv, return_lse=True, **args, **extra)
        grads = {}
        if backward:
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float32)
            out.backward(grad_out.to(out.device, out.dtype))
            leaves = {"q": qq, "k": kk, "v": vv, **args}
            grads = {f"d{name}": leaves[name].grad for name in grad_names}
        return out, lse, grads

    out, lse, grads = run(scaled_dot_product_attention, lambda t: t, backend=backend)
    ref, ref_lse, ref_grads = run(reference.attention, lambda t: t.double())
    base, base_grads = None, {}
    if dtype in (torch.float16, torch.bfloat16):
        base, _, base_grads = run(reference.attention, lambda t: t, compute_dtype=dtype)
    assert out.dtype == dtype and lse.dtype == torch.float32, (out.dtype, lse.dtype)
    assert_close(out, ref, base, factor=out_factor, name=f"{backend} out")
    assert_close(lse, ref_lse, name=f"{backend} lse")
    for name, got in grads.items():
        assert got is not None, f"{backend}: no gradient for {name}"
        assert_close(got, ref_grads[name], base_grads.get(name), factor=grad_factor, name=f"{backend} {name}")
    return {"out": out, "lse": lse, **grads}


# ---------------------------------------------------------------------------------------------- packed sequences

# Per-sequence lengths ``(Lq, Lk)``: "self" (Lq_b = Lk_b: 17, 0, 1, 65, 129, 1030, the training case), "cross"
# (Lq_b != Lk_b both ways, a sequence with no keys and one with no queries), "short" (the same shapes, all
# short: for the slow interpreters), "single" (one sequence: the dense case) and "uniform" (equal lengths).
PACKED_LENGTHS = ("self", "cross", "short", "single", "uniform")
# The per-sequence band: none, causal (bottom-right), a two-sided window, a causal window.
PACKED_MASK_KINDS = ("none", "causal", "window", "causal_window")


def packed_lengths(kind: str, generator: Optional[torch.Generator] = None) -> tuple[list[int], list[int]]:
    """``(lengths_q, lengths_k)`` of a ``PACKED_LENGTHS`` kind (shuffled with ``generator`` when given)."""
    if kind == "self":
        lq = [17, 0, 1, 65, 129, 1030]
        lk = list(lq)
    elif kind == "cross":
        lq = [5, 0, 33, 1, 70, 3, 130]
        lk = [9, 4, 0, 65, 64, 1, 1100]
    elif kind == "short":
        lq = [5, 0, 17, 1, 40, 3]
        lk = [9, 3, 0, 33, 35, 1]
    elif kind == "single":
        lq, lk = [37], [53]
    elif kind == "uniform":
        lq, lk = [24] * 3, [24] * 3
    else:
        raise ValueError(f"kind: expected one of {PACKED_LENGTHS}, got {kind!r}")
    if generator is not None:
        order = torch.randperm(len(lq), generator=generator).tolist()
        lq, lk = [lq[i] for i in order], [lk[i] for i in order]
    return lq, lk


def cu_seqlens(lengths: list[int], dtype: torch.dtype = torch.int32, device: str = "cpu") -> Tensor:
    """The ``(B + 1,)`` offsets of sequences of these lengths."""
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=dtype, device=device)


def random_packed(
    lengths_q: list[int],
    lengths_k: list[int],
    heads_q: int,
    heads_kv: int,
    head_dim: int,
    head_dim_v: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    index_dtype: torch.dtype = torch.int32,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int, int]:
    """``(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)``: fresh standard-normal packed tensors."""
    head_dim_v = head_dim if head_dim_v is None else head_dim_v

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    tq, tk = sum(lengths_q), sum(lengths_k)
    return (
        draw(tq, heads_q, head_dim),
        draw(tk, heads_kv, head_dim),
        draw(tk, heads_kv, head_dim_v),
        cu_seqlens(lengths_q, index_dtype, device),
        cu_seqlens(lengths_k, index_dtype, device),
        max(lengths_q, default=0),
        max(lengths_k, default=0),
    )


def packed_mask_kwargs(kind: str, max_seqlen_k: int) -> dict:
    """``varlen_attention``'s band keywords (``is_causal``, ``window``) for a ``PACKED_MASK_KINDS`` kind."""
    if kind == "none":
        return {}
    if kind == "causal":
        return {"is_causal": True}
    if kind == "window":
        return {"window": (max(1, max_seqlen_k // 7), 5)}
    if kind == "causal_window":
        return {"is_causal": True, "window": (max(2, max_seqlen_k // 5), -1)}
    raise ValueError(f"kind: expected one of {PACKED_MASK_KINDS}, got {kind!r}")


def check_varlen(
    backend: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    kw: dict,
    *,
    backward: bool = True,
    out_factor: float = 2.0,
    grad_factor: float = 3.0,
) -> dict:
    """``varlen_attention(..., **kw, backend=backend)`` and its backward against the per-sequence oracle.

    The oracle is ``fastattn.reference.varlen_attention`` in float64 (each sequence alone, through plain autograd);
    plain PyTorch's error in ``q``'s dtype sets the tolerance, as in ``check_backend``. Compares the output, the
    lse, ``dq``, ``dk``, ``dv`` and (with sinks) ``dsinks``; with ``dropout_p`` in ``kw`` the oracle applies the
    keep-mask of the contract drawn from the same seed. Returns the backend's results by name.
    """
    from . import reference
    from .backends._philox import keep_mask, philox_seed_offset
    from .functional import varlen_attention

    dtype = q.dtype
    grad_names = ["q", "k", "v"] + (["sinks"] if kw.get("sinks") is not None else [])
    dropout = float(kw.get("dropout_p", 0.0))
    seed = int(torch.randint(0, 2**31, (1,)).item())
    keep = None
    if dropout > 0.0:
        torch.manual_seed(seed)
        philox = philox_seed_offset(q.device)
        batch = cu_seqlens_q.shape[0] - 1
        keep = keep_mask(philox, batch, q.shape[1], max_seqlen_q, max_seqlen_k, dropout)

    def run(fn, cast, **extra):
        args = {**kw, "q": q, "k": k, "v": v}
        for name in ("q", "k", "v", "sinks"):
            if isinstance(args.get(name), Tensor):
                args[name] = cast(args[name])
        if backward:
            for name in grad_names:
                args[name] = args[name].detach().clone().requires_grad_(True)
        qq, kk, vv = args.pop("q"), args.pop("k"), args.pop("v")
        torch.manual_seed(seed)
        out, lse = fn(qq, kk, vv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, return_lse=True, **args,
                      **extra)  # fmt: skip
        grads = {}
        if backward:
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float32)
            out.backward(grad_out.to(out.device, out.dtype))
            leaves = {"q": qq, "k": kk, "v": vv, **args}
            grads = {f"d{name}": leaves[name].grad for name in grad_names}
        return out, lse, grads

    out, lse, grads = run(varlen_attention, lambda t: t, backend=backend)
    oracle_extra = {} if keep is None else {"keep_mask": keep}
    ref, ref_lse, ref_grads = run(reference.varlen_attention, lambda t: t.double(), **oracle_extra)
    base, base_grads = None, {}
    if dtype in (torch.float16, torch.bfloat16):
        base, _, base_grads = run(reference.varlen_attention, lambda t: t, compute_dtype=dtype, **oracle_extra)
    assert out.dtype == dtype and lse.dtype == torch.float32, (out.dtype, lse.dtype)
    assert out.shape == (q.shape[0], q.shape[1], v.shape[2]) and lse.shape == (q.shape[1], q.shape[0])
    assert_close(out, ref, base, factor=out_factor, name=f"{backend} varlen out")
    assert_close(lse, ref_lse, name=f"{backend} varlen lse")
    for name, got in grads.items():
        expected = ref_grads[name]
        if got is None and expected is None:  # no query saw any key: no gradient path at all
            continue
        assert got is not None, f"{backend}: no gradient for {name}"
        if expected is None:
            expected = torch.zeros_like(got, dtype=torch.float64)
        assert_close(got, expected, base_grads.get(name), factor=grad_factor, name=f"{backend} varlen {name}")
    return {"out": out, "lse": lse, **grads}


def packed_visited(
    backend: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
) -> Optional[tuple[int, int, int]]:
    """``(visited, minimum, padded)`` key tiles of a backend's packed forward, summed over heads: what its kernels
    loaded (their own counter), each sequence's non-empty tiles (``AttnParams.packed_tile_minimum``) and the tiles
    of the batch padded to the maxima with the same band. None for a backend without a counter (the CPU kernels
    skip exactly the empty tiles of each sequence's analytic summary, but count nothing).
    """
    from . import _validate, variants
    from .backends.triton import fwd

    if backend != "triton":
        return None
    params, q4, k4, v4 = _validate.validate_packed(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal=causal,
        enable_gqa=q.shape[1] != k.shape[1],
    )  # fmt: skip
    _, _, visited = fwd.forward(q4, k4, v4, params, None, count_visited=True)
    block_m, block_n = fwd.fwd_blocks(
        q.shape[-1], v.shape[-1], q.dtype, fwd._arch(q.device), False, *params.bounds
    )  # the forward's blocks: no mask, no dropout, no variant
    left, right = params.bounds
    dense = variants.tile_states(max_seqlen_q, max_seqlen_k, left, right, max_seqlen_k - max_seqlen_q, 0, block_m,
                                 block_n)  # fmt: skip
    padded = int((dense != variants.EMPTY).sum()) * params.batch * params.heads_q
    return int(visited.sum()), params.heads_q * params.packed_tile_minimum(block_m, block_n), padded
