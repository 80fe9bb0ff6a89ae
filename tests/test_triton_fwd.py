"""Triton forward kernel against the float64 oracle, under ``TRITON_INTERPRET=1`` on CPU tensors.

The default run takes a pairwise covering set of (mask kind × head dims × dtype × lengths × GQA ×
layout): every value of every factor appears and every pair of values of two factors appears in
some case. ``-m full`` runs the full product. Outputs are NaN-poisoned before the kernel writes
them; strided layouts put NaN around the data so a read outside the masks shows up.
"""

from __future__ import annotations

import itertools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (set before triton is imported) or a GPU", allow_module_level=True)
pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import fastattn  # noqa: E402
from fastattn import reference  # noqa: E402
from fastattn._validate import validate  # noqa: E402
from fastattn.backends import registry  # noqa: E402
from fastattn.backends._philox import keep_mask, philox_seed_offset  # noqa: E402
from fastattn.backends.triton import fwd  # noqa: E402  (importing the package registers "triton")
from fastattn.backends.triton._common import key_tile_range, query_tile_range  # noqa: E402
from fastattn.backends.triton.dropout import dropout_keep_mask  # noqa: E402
from fastattn.masks import EMPTY, FULL  # noqa: E402
from fastattn.params import VariantScalars  # noqa: E402
from fastattn.testing import assert_close  # noqa: E402

if not torch.cuda.is_available() and type(fwd._attn_fwd_kernel).__name__ != "InterpretedFunction":
    pytest.skip("the Triton kernels were defined before TRITON_INTERPRET=1 was set", allow_module_level=True)

MASKS = ["none", "causal", "bool_full", "bool_pad", "float", "window", "causal_bool", "q_offset"]
HEAD_DIMS = [(16, 16), (32, 32), (64, 64), (80, 80), (96, 96), (128, 128), (256, 256), (64, 32)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LENGTHS = [(1, 17), (17, 17), (65, 129), (129, 65), (17, 1)]
GQA = [(2, 2), (4, 2), (4, 1)]
LAYOUTS = ["contig", "transposed", "padded", "lastdim"]
FACTORS = [MASKS, HEAD_DIMS, DTYPES, LENGTHS, GQA, LAYOUTS]


def _pairwise(factors):
    """Greedy all-pairs covering set (deterministic): every pair of values of two factors appears."""
    uncovered = {
        (i, a, j, b)
        for i, j in itertools.combinations(range(len(factors)), 2)
        for a in range(len(factors[i]))
        for b in range(len(factors[j]))
    }
    cases = []
    while uncovered:
        i, a, j, b = min(uncovered)
        choice = {i: a, j: b}
        for f in range(len(factors)):
            if f in choice:
                continue

            def gain(val, f=f, choice=choice):
                return sum(
                    ((min(f, g), val if f < g else choice[g], max(f, g), choice[g] if f < g else val) in uncovered)
                    for g in choice
                )

            choice[f] = max(range(len(factors[f])), key=lambda v: (gain(v), -v))
        row = [choice[f] for f in range(len(factors))]
        for x, y in itertools.combinations(range(len(factors)), 2):
            uncovered.discard((x, row[x], y, row[y]))
        cases.append(tuple(factors[f][row[f]] for f in range(len(factors))))
    return cases


def _case_id(case):
    mask, (d, dv), dtype, (lq, lk), (hq, hkv), layout = case
    return f"{mask}-d{d}v{dv}-{str(dtype)[6:]}-{lq}x{lk}-h{hq}kv{hkv}-{layout}"


COVERING = _pairwise(FACTORS)
# The full product minus the covering set; layouts cycle instead of multiplying (×4 would be hours).
FULL_PRODUCT = [
    (*c, LAYOUTS[n % len(LAYOUTS)])
    for n, c in enumerate(itertools.product(*FACTORS[:-1]))
    if (*c, LAYOUTS[n % len(LAYOUTS)]) not in set(COVERING)
]


def _layout(x: torch.Tensor, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """``x`` (B, H, L, D) in ``dtype`` with the given memory layout; padding elements are NaN."""
    b, h, seq, d = x.shape
    if layout == "contig":
        return x.to(dtype)
    if layout == "transposed":  # (B, L, H, D) storage, as a projection's output viewed per head
        return torch.empty(b, seq, h, d, dtype=dtype).transpose(1, 2).copy_(x)
    if layout == "padded":  # a slice of a larger NaN buffer: strides do not match sizes
        buf = torch.full((b, h + 1, seq + 3, d + 5), float("nan"), dtype=dtype)
        return buf[:, 1:, 2 : seq + 2, :d].copy_(x)
    if layout == "lastdim":  # stride(-1) != 1: the launcher makes this one contiguous
        buf = torch.full((b, h, seq, d, 2), float("nan"), dtype=dtype)
        return buf[..., 1].copy_(x)
    raise ValueError(layout)


def _mask_args(kind: str, batch: int, heads: int, lq: int, lk: int, dtype: torch.dtype) -> dict:
    """Keyword arguments of the entry point for one mask kind (with fully masked rows where natural)."""
    if kind == "none":
        return {}
    if kind == "causal":
        return {"is_causal": True}
    if kind == "bool_full":
        m = torch.rand(batch, heads, lq, lk) > 0.3
        m[0, 0, 0] = False  # a fully masked row
        return {"attn_mask": m}
    if kind == "bool_pad":  # key padding (B, 1, 1, Lk): batch 1 keeps only its first third
        lengths = torch.tensor([lk, max(1, lk // 3)] + [lk] * (batch - 2))[:batch]
        return {"attn_mask": (torch.arange(lk) < lengths.view(-1, 1)).view(batch, 1, 1, lk)}
    if kind == "float":
        m = torch.randn(1, heads, lq, lk)
        m[torch.rand_like(m) < 0.1] = float("-inf")
        return {"attn_mask": m.to(dtype)}
    if kind == "window":
        return {"window": (5, 3)}
    if kind == "causal_bool":
        return {"is_causal": True, "attn_mask": torch.rand(lq, lk) > 0.2}
    if kind == "q_offset":  # bottom-right causal (KV-cache alignment); negative when Lq > Lk: empty rows
        return {"is_causal": True, "q_offset": lk - lq}
    raise ValueError(kind)


def _params(lq, lk, mask=None, **kw):
    """AttnParams of a (1, 2, lq, 16) x (1, 2, lk, 16) call (for the tile summaries of the launcher tests)."""
    q, k = torch.randn(1, 2, lq, 16), torch.randn(1, 2, lk, 16)
    return fastattn.AttnParams.for_tensors(q, k, k, 0.25, mask=mask, **kw)


def _run_launcher(q, k, v, params, philox=None, visited=None):
    """Launch the kernel directly with NaN-poisoned outputs (so an unwritten element fails)."""
    block_m, block_n = fwd.fwd_tiles(q.shape[-1], v.shape[-1], q.dtype, fwd._arch(q.device))
    state = count = index = None
    if params.mask is not None:
        s = params.tile_summary(block_m, block_n)
        state, count, index = s.state, s.kv_count, s.kv_index
    out = torch.full((*q.shape[:-1], v.shape[-1]), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full(q.shape[:-1], float("nan"), dtype=torch.float32, device=q.device)
    fwd.attn_fwd(
        q, k, v, params.mask, state, count, index, philox, params.scale, params.variant_scalars, params.dropout_p,
        block_m, block_n, visited=visited, out=out, lse=lse,
    )  # fmt: skip
    return out, lse


def _check(case, batch=2):
    mask_kind, (d, dv), dtype, (lq, lk), (hq, hkv), layout = case
    x = [torch.randn(batch, hq, lq, d), torch.randn(batch, hkv, lk, d), torch.randn(batch, hkv, lk, dv)]
    q, k, v = (_layout(t, dtype, layout) for t in x)
    kw = _mask_args(mask_kind, batch, hq, lq, lk, dtype)
    params, q4, k4, v4 = validate(
        q, k, v, kw.get("attn_mask"), 0.0, kw.get("is_causal", False), None, hq != hkv,
        kw.get("window"), kw.get("q_offset", 0),
    )  # fmt: skip
    out, lse = _run_launcher(q4, k4, v4, params)
    o64, l64 = reference.attention_forward(q4.double(), k4.double(), v4.double(), params)
    ob = lb = None
    if dtype != torch.float32:  # plain PyTorch's own error in this dtype sets the tolerance
        ob, lb = reference.attention_forward(q4, k4, v4, params, compute_dtype=dtype)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert_close(out, o64, ob, factor=2, name="out")
    assert_close(lse, l64, lb, factor=2, name="lse")


@pytest.mark.parametrize("case", COVERING, ids=_case_id)
def test_forward_covering(case):
    _check(case)


@pytest.mark.full
@pytest.mark.parametrize("case", FULL_PRODUCT, ids=_case_id)
def test_forward_full(case):
    _check(case)


def test_covering_set_covers_every_pair():
    """The default cases contain every value and every pair of values of two factors."""
    for (i, fi), (j, fj) in itertools.combinations(enumerate(FACTORS), 2):
        seen = {(c[i], c[j]) for c in COVERING}
        assert len(seen) == len(fi) * len(fj), (i, j)


@pytest.mark.parametrize(
    "lq, lk, kw, dtype",
    [
        (1030, 1030, {"is_causal": True}, torch.float16),
        (3, 1030, {"is_causal": True, "q_offset": 1027, "window": (300, -1)}, torch.bfloat16),
    ],
    ids=["causal-1030", "decode-window-1030"],
)
def test_forward_long(lq, lk, kw, dtype):
    """One length above 1000 (tiny head dim and batch: the interpreter's time is per tile)."""
    q, k, v = (torch.randn(1, 1, n, 16, dtype=dtype) for n in (lq, lk, lk))
    params, q4, k4, v4 = validate(
        q, k, v, None, 0.0, kw["is_causal"], None, False, kw.get("window"), kw.get("q_offset", 0)
    )
    out, lse = _run_launcher(q4, k4, v4, params)
    o64, l64 = reference.attention_forward(q4.double(), k4.double(), v4.double(), params)
    ob, lb = reference.attention_forward(q4, k4, v4, params, compute_dtype=dtype)
    assert_close(out, o64, ob, name="out")
    assert_close(lse, l64, lb, name="lse")


def test_entry_point_and_3d():
    """Through ``fastattn.scaled_dot_product_attention(backend="triton")``, 3-D inputs, GQA, causal+mask."""
    q = torch.randn(4, 33, 32)
    k, v = torch.randn(2, 47, 32), torch.randn(2, 47, 48)
    mask = torch.rand(33, 47) > 0.4
    out, lse = fastattn.scaled_dot_product_attention(
        q, k, v, mask, is_causal=True, enable_gqa=True, q_offset=14, return_lse=True, backend="triton"
    )
    ref, ref_lse = reference.attention(
        q.double(), k.double(), v.double(), mask, is_causal=True, enable_gqa=True, q_offset=14, return_lse=True
    )
    assert out.shape == (4, 33, 48) and lse.shape == (4, 33)
    assert_close(out, ref)
    assert_close(lse, ref_lse, name="lse")


def test_fully_masked_rows_give_zeros():
    """Rows with nothing to attend: out 0, lse -inf, never NaN (bool mask rows and a negative q_offset)."""
    q, k, v = torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32)
    mask = torch.rand(1, 2, 40, 40) > 0.5
    mask[:, :, 3] = False
    mask[:, :, 30:] = False  # whole query tiles masked: their summary has no key tile at all
    params, q4, k4, v4 = validate(q, k, v, mask, 0.0, True, None, False, None, -5)
    out, lse = _run_launcher(q4, k4, v4, params)
    assert not torch.isnan(out).any()
    empty = ~(mask & params.allowed()).any(-1)
    assert empty[:, :, 3].all() and empty[:, :, :5].all() and empty[:, :, 30:].all()
    assert (out[empty] == 0).all() and (lse[empty] == float("-inf")).all()
    o64, l64 = reference.attention_forward(q4.double(), k4.double(), v4.double(), params)
    assert_close(out, o64)
    assert_close(lse, l64, name="lse")


def test_dropout_matches_regenerated_keep_mask():
    """Forward dropout equals the oracle with the keep-mask regenerated from ``saved`` (the backward's contract)."""
    p = 0.3
    q, k, v = torch.randn(1, 4, 40, 16), torch.randn(1, 2, 70, 16), torch.randn(1, 2, 70, 24)
    mask = torch.rand(1, 1, 40, 70) > 0.2
    params, q4, k4, v4 = validate(q, k, v, mask, p, True, None, True, None, 20)
    philox = philox_seed_offset("cpu")
    out, lse = fwd.forward(q4, k4, v4, params, philox)
    keep = dropout_keep_mask(philox, 1, 4, 40, 70, p)
    assert torch.equal(keep, keep_mask(philox, 1, 4, 40, 70, p))  # the kernels' bits are the contract's
    assert abs(keep.float().mean().item() - (1 - p)) < 0.03
    o64, l64 = reference.attention_forward(q4.double(), k4.double(), v4.double(), params, keep)
    assert_close(out, o64)
    assert_close(lse, l64, name="lse")  # the lse never includes dropout
    # Another seed gives another output; the same seed reproduces it exactly.
    out2, _ = fwd.forward(q4, k4, v4, params, philox_seed_offset("cpu"))
    assert not torch.equal(out2, out)
    out3, _ = _run_launcher(q4, k4, v4, params, philox)
    assert torch.equal(out3, out)


def _dense_nonempty_tiles(allowed: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """Non-empty key tiles per query tile, counted from the dense ``(B|1, H|1, Lq, Lk)`` allowed matrix."""
    *lead, lq, lk = allowed.shape
    nq, nk = triton.cdiv(lq, block_m), triton.cdiv(lk, block_n)
    padded = torch.nn.functional.pad(allowed, (0, nk * block_n - lk, 0, nq * block_m - lq))
    return padded.reshape(*lead, nq, block_m, nk, block_n).any(5).any(3).sum(-1)


@pytest.mark.parametrize(
    "kind, lq, lk, kw",
    [
        ("causal", 150, 150, {"is_causal": True}),
        ("causal-bottom-right", 70, 200, {"is_causal": True, "q_offset": 130}),
        ("window", 200, 180, {"window": (40, 10), "q_offset": 5}),
        ("padding", 64, 200, {"pad": True}),
        ("dense", 100, 130, {}),
    ],
)
def test_visited_tiles(kind, lq, lk, kw):
    """The kernel's own per-program count of loaded key tiles equals the number of non-empty tiles."""
    q, k, v = torch.randn(2, 2, lq, 16), torch.randn(2, 2, lk, 16), torch.randn(2, 2, lk, 16)
    mask = None
    if kw.get("pad"):
        mask = (torch.arange(lk) < torch.tensor([[lk], [45]])).view(2, 1, 1, lk)
    params, q4, k4, v4 = validate(
        q, k, v, mask, 0.0, kw.get("is_causal", False), None, False, kw.get("window"), kw.get("q_offset", 0)
    )
    out, lse, visited = fwd.forward(q4, k4, v4, params, None, count_visited=True)
    block_m, block_n = fwd.fwd_tiles(16, 16, torch.float32, None)
    allowed, _ = reference.allowed_and_bias(params, "cpu", torch.float64)
    expected = _dense_nonempty_tiles(allowed.expand(2, 2, lq, lk), block_m, block_n)
    assert torch.equal(visited, expected.to(torch.int32)), (visited, expected)
    summary = params.tile_summary(block_m, block_n)
    assert torch.equal(visited, summary.kv_count.expand_as(visited))
    n_k = triton.cdiv(lk, block_n)
    if kind == "dense":
        assert (visited == n_k).all()
    else:
        assert visited.sum() < visited.numel() * n_k  # something was skipped
    o64, _ = reference.attention_forward(q4.double(), k4.double(), v4.double(), params)
    assert_close(out, o64)


@triton.jit
def _ranges_kernel(
    Out, seqlen_q, seqlen_k, left, right, q_offset, chunk, n_tiles, BM: tl.constexpr, BN: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_CHUNK: tl.constexpr, BY_KEY: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    if BY_KEY:
        lo, flo, fhi, hi = query_tile_range(
            t * BN, seqlen_q, seqlen_k, left, right, q_offset, chunk, BM, BN, HAS_LEFT, HAS_RIGHT, HAS_CHUNK
        )
    else:
        lo, flo, fhi, hi = key_tile_range(
            t * BM, seqlen_q, seqlen_k, left, right, q_offset, chunk, BM, BN, HAS_LEFT, HAS_RIGHT, HAS_CHUNK
        )
    tl.store(Out + t * 4 + 0, lo)
    tl.store(Out + t * 4 + 1, flo)
    tl.store(Out + t * 4 + 2, fhi)
    tl.store(Out + t * 4 + 3, hi)


@pytest.mark.parametrize(
    "lq, lk, left, right, off, chunk",
    [
        (70, 70, -1, 0, 0, 0), (50, 130, 20, 5, 40, 0), (130, 50, -1, 0, -30, 0), (64, 64, 3, -1, 0, 0),
        (33, 97, -1, -1, 0, 0), (70, 70, -1, -1, 0, 24), (70, 130, -1, 0, 40, 40), (130, 50, 9, 3, -30, 20),
        (64, 97, -1, -1, 5, 16),
    ],
)  # fmt: skip
def test_band_tile_ranges_match_summary(lq, lk, left, right, off, chunk):
    """``_common``'s band and chunk ranges (forward by query tile, backward by key tile) agree with the summary."""
    bm, bn = 16, 32
    params = _params(lq, lk, window=(left, right), q_offset=off, chunk=chunk)
    state = params.tile_summary(bm, bn).state[0, 0]  # (nQ, nK)
    nq, nk = state.shape
    for by_key, n, lines in ((False, nq, state), (True, nk, state.t())):
        out = torch.zeros(n, 4, dtype=torch.int32)
        _ranges_kernel[(n,)](
            out, lq, lk, left, right, off, max(chunk, 1), n, bm, bn, left >= 0, right >= 0, chunk > 0, by_key
        )
        # The in-bounds test of the last partial tile (the "full" stage must not need it).
        last_partial = (lq % bm) if by_key else (lk % bn)
        for t in range(n):
            lo, flo, fhi, hi = out[t].tolist()
            nonempty = (lines[t] != EMPTY).nonzero().flatten().tolist()
            assert list(range(lo, hi)) == nonempty, (by_key, t, out[t], lines[t])
            assert lo <= flo <= fhi <= hi
            for u in range(flo, fhi):
                assert lines[t, u] == FULL
                assert not (last_partial and u == len(lines[t]) - 1)
            if by_key and t == nk - 1 and lk % bn:
                assert flo == fhi  # a key tile crossing seqlen_k is always bounds-masked


def test_fastattn_mask_summary_reuse():
    """A ``fastattn.Mask`` built on a 16×16 base block gives the same result, its summary derived by coarsening."""
    q, k, v = torch.randn(1, 2, 80, 32), torch.randn(1, 2, 90, 32), torch.randn(1, 2, 90, 32)
    dense = torch.rand(1, 1, 80, 90) > 0.5
    dense[..., :, 40:] = False
    m = fastattn.Mask(dense)
    a = fastattn.scaled_dot_product_attention(q, k, v, m, backend="triton")
    b = fastattn.scaled_dot_product_attention(q, k, v, dense, backend="triton")
    assert torch.equal(a, b)
    assert m._base  # the base summary was built and cached
    assert_close(a, reference.attention(q.double(), k.double(), v.double(), dense))


def test_bad_summary_is_refused():
    q, k, v = torch.randn(1, 1, 40, 16), torch.randn(1, 1, 40, 16), torch.randn(1, 1, 40, 16)
    mask = torch.rand(1, 1, 40, 40) > 0.5
    params, q4, k4, v4 = validate(q, k, v, mask)
    s = params.tile_summary(16, 16)  # not the kernel's block
    with pytest.raises(ValueError, match="tile_state"):
        fwd.attn_fwd(q4, k4, v4, params.mask, s.state, s.kv_count, s.kv_index, None, 1.0, VariantScalars(), 0.0, 32, 32)
    with pytest.raises(ValueError, match="philox"):
        fwd.attn_fwd(q4, k4, v4, None, None, None, None, None, 1.0, VariantScalars(), 0.5, 32, 32)


def test_backend_reasons():
    backend = registry.get("triton")
    assert backend.unavailable_reason() is None
    q = torch.randn(1, 1, 8, 16)
    params, *_ = validate(q.double(), q.double(), q.double())
    assert "float64" in backend.unsupported_reason(params)
    q = torch.randn(1, 1, 8, 512)
    params, *_ = validate(q, q, q)
    assert "head_dim 512" in backend.unsupported_reason(params)


def test_autocast_runs_in_half():
    q, k, v = torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton")
    assert out.dtype == torch.bfloat16
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    ref = reference.attention(qb.double(), kb.double(), vb.double(), is_causal=True)
    base = reference.attention(qb, kb, vb, is_causal=True, compute_dtype=torch.bfloat16)
    assert_close(out, ref, base)


def _op_args(mask_kind: str, dropout_p: float = 0.0):
    q, k, v = torch.randn(1, 2, 37, 32), torch.randn(1, 1, 45, 32), torch.randn(1, 1, 45, 16)
    mask = None
    if mask_kind == "bool":
        mask = (torch.rand(1, 1, 37, 45) > 0.3).expand(1, 2, 37, 45)
    elif mask_kind == "float":
        mask = torch.randn(1, 2, 1, 45).expand(1, 2, 37, 45)
    bm, bn = fwd.fwd_tiles(32, 16, torch.float32, None)
    summary = []
    if mask is not None:
        s = _params(37, 45, mask=mask).tile_summary(bm, bn)
        summary = [s.state, s.kv_count, s.kv_index]
    philox = philox_seed_offset("cpu") if dropout_p else None
    return (q, k, v, mask, None, None, summary, philox, 0.2, dropout_p, [7.0, 0.0, 3.0, 0.0, 0.0], [bm, bn])


@pytest.mark.parametrize("mask_kind, p", [("none", 0.0), ("bool", 0.2)])
def test_opcheck(mask_kind, p):
    torch.library.opcheck(torch.ops.fastattn.triton_attn_fwd.default, _op_args(mask_kind, p))


def test_torch_compile_fullgraph():
    """The op traces into one graph (fake implementation), and the compiled call matches eager."""
    args = _op_args("bool")

    def f(q, k, v, mask, state, count, index):
        out, lse = torch.ops.fastattn.triton_attn_fwd(q, k, v, mask, None, None, [state, count, index], *args[7:])
        return out * 2, lse

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, got_lse = compiled(*args[:4], *args[6])
    ref, ref_lse = f(*args[:4], *args[6])
    assert torch.equal(got, ref) and torch.equal(got_lse, ref_lse)


def test_torch_compile_entry_point():
    """``fastattn.scaled_dot_product_attention(backend="triton")`` under ``torch.compile(fullgraph=True)``."""
    q, k, v = torch.randn(1, 2, 40, 32), torch.randn(1, 2, 50, 32), torch.randn(1, 2, 50, 32)
    mask = torch.rand(1, 1, 40, 50) > 0.3

    def f(q, k, v, mask):
        return fastattn.scaled_dot_product_attention(q, k, v, mask, is_causal=True, backend="triton")

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, mask)
    assert torch.equal(got, f(q, k, v, mask))


def _peak_allocation(fn) -> tuple[int, int]:
    """(peak of live CPU allocations, largest single allocation) in bytes during ``fn``, from the profiler.

    Ops report their allocations inclusively (a parent repeats its children's), so only leaf ops
    and the bare ``[memory]`` records (frees, and allocations outside any op) are summed, in time order.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.events() if e.cpu_memory_usage and (e.name == "[memory]" or not e.cpu_children)),
        key=lambda e: e.time_range.start,
    )
    assert events, "the profiler recorded no memory events"
    live = peak = largest = 0
    for e in events:
        live += e.cpu_memory_usage
        peak = max(peak, live)
        largest = max(largest, e.cpu_memory_usage)
    return peak, largest


@pytest.mark.parametrize("kind", ["causal", "key_padding"])
def test_no_lq_by_lk_allocation(kind):
    """The fused forward never allocates Lq×Lk: its peak grows linearly in L and stays far below Lq·Lk·4 bytes."""
    peaks = {}
    for seqlen in (512, 1024):
        q, k, v = (torch.randn(1, 1, seqlen, 16) for _ in range(3))
        mask = (torch.arange(seqlen) < 200).view(1, 1, 1, seqlen) if kind == "key_padding" else None
        params, q4, k4, v4 = validate(q, k, v, mask, 0.0, kind == "causal")
        peaks[seqlen] = _peak_allocation(lambda: fwd.forward(q4, k4, v4, params, None))  # noqa: B023
    (peak_512, _), (peak_1024, largest) = peaks[512], peaks[1024]
    assert largest < 1024 * 1024, peaks  # not even an Lq x Lk bool
    assert peak_1024 < 1024 * 1024 * 4 / 8, peaks
    assert peak_1024 < 3 * peak_512, peaks  # quadratic growth would be 4x
