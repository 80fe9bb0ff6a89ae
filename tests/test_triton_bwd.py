"""The Triton backward (``fastattn/backends/triton/bwd.py``) against the float64 oracle.

Runs under ``TRITON_INTERPRET=1`` on CPU tensors (set here, before the kernels are imported). The
gradient matrix takes ``out``/``lse`` from the oracle forward, so it checks the backward alone (it only
depends on the lse format); the end-to-end tests go through ``backend="triton"``. The default run is a
pairwise covering set of the factors below; the full product is marked ``full``.
"""

from __future__ import annotations

import itertools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastattn  # noqa: E402
from fastattn import reference as oracle  # noqa: E402
from fastattn._autograd import AttentionFunction  # noqa: E402
from fastattn._validate import validate  # noqa: E402
from fastattn.backends._philox import philox_seed_offset  # noqa: E402
from fastattn.backends.registry import Backend  # noqa: E402
from fastattn.backends.triton import bwd  # noqa: E402
from fastattn.backends.triton.dropout import dropout_keep_mask  # noqa: E402
from fastattn.masks import EMPTY, FULL, PARTIAL  # noqa: E402
from fastattn.testing import assert_close, random_qkv  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("the Triton backward needs TRITON_INTERPRET=1 or a CUDA GPU", allow_module_level=True)

KINDS = ["none", "causal", "bool", "key_padding", "float", "window", "causal_mask", "q_offset"]
LENGTHS = [1, 17, 65, 129, 1030]
OTHER_LK = {1: 33, 17: 40, 65: 47, 129: 100, 1030: 1100}
FACTORS = {
    "kind": KINDS,
    "length": LENGTHS,
    "lk": ["same", "other"],
    "heads": [(2, 2), (4, 2), (3, 1)],
    "head_dim": [(16, 16), (40, 24), (64, 64), (128, 128)],
    "dtype": [torch.float32, torch.float16, torch.bfloat16],
    "blocks": [None, (16, 32, 32, 16)],
}


def _pairwise(factors: dict, shrink=lambda case: case, exempt=lambda a, va, b, vb: False) -> list[dict]:
    """A deterministic greedy covering set: every pair of values of any two factors appears in some case.

    ``shrink`` maps a case to the one that actually runs; pairs it can never produce are ``exempt``.
    """
    names = list(factors)

    def pairs(case):
        return {(a, case[a], b, case[b]) for i, a in enumerate(names) for b in names[i + 1 :]}

    uncovered = set()
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            uncovered |= {(a, va, b, vb) for va in factors[a] for vb in factors[b] if not exempt(a, va, b, vb)}
    cases = []
    while uncovered:
        a, va, b, vb = min(uncovered, key=repr)
        case = {a: va, b: vb}
        for f in names:
            if f in case:
                continue

            def gain(v, f=f, case=case, uncovered=uncovered):
                trial = {**case, f: v}
                return sum(
                    (x, trial[x], y, trial[y]) in uncovered
                    for i, x in enumerate(names)
                    for y in names[i + 1 :]
                    if x in trial and y in trial and f in (x, y)
                )

            case[f] = max(factors[f], key=gain)
        case = shrink(case)
        uncovered -= pairs(case)
        cases.append(case)
    return cases


def _case_id(c: dict) -> str:
    dt = str(c["dtype"]).replace("torch.", "")
    blocks = "" if c["blocks"] is None else "-b" + "x".join(map(str, c["blocks"]))
    return (
        f"{c['kind']}-L{c['length']}{c['lk']}-h{c['heads'][0]}x{c['heads'][1]}-d{c['head_dim'][0]}x"
        f"{c['head_dim'][1]}-{dt}{blocks}"
    )


def _shrink_long(case: dict) -> dict:
    """The long length runs with one batch, at most 2 heads, head dim 16 and the default blocks."""
    if case["length"] < 1000:
        return case
    heads = (1, 1) if case["heads"][0] == case["heads"][1] else (2, 1)
    return {**case, "heads": heads, "head_dim": (16, 16), "blocks": None}


def _long_exempt(a, va, b, vb) -> bool:
    """Pairs of the long length with the sizes ``_shrink_long`` replaces."""
    return bool({a, b} & {"heads", "head_dim", "blocks"}) and 1030 in (va, vb)


COVERING = _pairwise(FACTORS, _shrink_long, _long_exempt)
# The full product, except that the long length (slow under the interpreter; tiny head dim, default blocks
# anyway) is crossed with the mask kinds, dtypes and head counts only.
FULL_PRODUCT = [
    case
    for case in (dict(zip(FACTORS, values)) for values in itertools.product(*FACTORS.values()))
    if case["length"] < 1000 or (case["head_dim"] == (16, 16) and case["blocks"] is None and case["heads"] != (3, 1))
]
FULL_PRODUCT = [_shrink_long(c) for c in FULL_PRODUCT]


def _mask(kind: str, batch: int, heads: int, seqlen_q: int, seqlen_k: int, dtype, gen: torch.Generator):
    """``(attn_mask, is_causal, window, q_offset)`` for a mask kind; bool masks include fully masked rows."""

    def padding():
        keep = torch.rand(batch, 1, 1, seqlen_k, generator=gen) > 0.1
        keep[1:, ..., max(1, int(seqlen_k * 0.6)) :] = False  # later batches: the tail is padding
        return keep

    if kind == "none":
        return None, False, None, 0
    if kind == "causal":
        return None, True, None, 0
    if kind == "bool":
        keep = torch.rand(batch, heads, seqlen_q, seqlen_k, generator=gen) > 0.3
        keep[0, 0, 0] = False  # a row that attends nothing: zero gradients
        return keep, False, None, 0
    if kind == "key_padding":
        return padding(), False, None, 0
    if kind == "float":
        bias = torch.randn(1, heads, seqlen_q, seqlen_k, generator=gen)
        bias[torch.rand(bias.shape, generator=gen) < 0.1] = float("-inf")
        return bias.to(dtype), False, None, 0
    if kind == "window":
        return None, False, (max(1, seqlen_k // 5), 3), 0
    if kind == "causal_mask":
        return padding(), True, None, 0
    if kind == "q_offset":
        return None, True, None, seqlen_k - seqlen_q - 2  # the first rows see nothing
    raise ValueError(kind)


def _setup(case: dict, seed: int = 0):
    """Inputs, params, the oracle's ``out``/``lse`` and ``dO`` for one case (long cases: tiny batch/head dim)."""
    seqlen_q = case["length"]
    seqlen_k = seqlen_q if case["lk"] == "same" else OTHER_LK[seqlen_q]
    heads_q, heads_kv = case["heads"]
    head_dim, head_dim_v = case["head_dim"]
    batch, blocks = (1 if seqlen_q > 1000 else 2), case["blocks"]
    gen = torch.Generator().manual_seed(seed)
    dtype = case["dtype"]
    q, k, v = random_qkv(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, head_dim_v, dtype, generator=gen)
    attn_mask, is_causal, window, q_offset = _mask(case["kind"], batch, heads_q, seqlen_q, seqlen_k, dtype, gen)
    params, q, k, v = validate(q, k, v, attn_mask, 0.0, is_causal, None, heads_q != heads_kv, window, q_offset)
    out, lse = oracle.attention_forward(q, k, v, params)
    grad_out = torch.randn(out.shape, generator=gen).to(dtype)
    return q, k, v, params, out, lse, grad_out, blocks


def _run(q, k, v, params, out, lse, grad_out, blocks, need_mask_grad):
    dev = [t.to(DEVICE) for t in (grad_out, q, k, v, out, lse)]
    if blocks is None:
        return bwd.attn_bwd(*dev, params, None, need_mask_grad)
    return bwd.attn_bwd_debug(*dev, params, None, need_mask_grad, blocks=blocks)[:4]


def _check_case(case: dict, monkeypatch) -> None:
    monkeypatch.setenv("FASTATTN_POISON", "1")  # gradients start as NaN: unwritten elements fail
    q, k, v, params, out, lse, grad_out, blocks = _setup(case)
    need_mask_grad = params.mask_kind == "float"
    dq, dk, dv, dmask = _run(q, k, v, params, out, lse, grad_out, blocks, need_mask_grad)
    f64 = [t.double() for t in (grad_out, q, k, v)]
    truth = oracle.attention_backward(*f64, params)
    low = q.dtype in (torch.float16, torch.bfloat16)
    base = oracle.attention_backward(grad_out, q, k, v, params, compute_dtype=q.dtype) if low else [None] * 5
    for name, got, ref, bl in zip(("dq", "dk", "dv"), (dq, dk, dv), truth, base):
        assert got.dtype == q.dtype
        assert_close(got, ref, bl, factor=3, name=name)
    if need_mask_grad:
        assert dmask.shape == (q.shape[0], q.shape[1], q.shape[2], k.shape[2]) and dmask.dtype == params.mask.dtype
        assert_close(dmask, truth[3], base[3], factor=3, name="dmask")
    else:
        assert dmask is None
    # A row that attends nothing gets exactly zero gradient.
    empty = torch.isinf(lse) & (lse < 0)
    if empty.any():
        assert (dq.cpu()[empty] == 0).all()


@pytest.mark.parametrize("case", COVERING, ids=_case_id)
def test_grads_match_oracle(case, monkeypatch):
    _check_case(case, monkeypatch)


@pytest.mark.full
@pytest.mark.parametrize("case", FULL_PRODUCT, ids=_case_id)
def test_grads_match_oracle_full(case, monkeypatch):
    _check_case(case, monkeypatch)


def test_covering_set_covers_every_pair():
    """Every pair of values appears, except the long length's pairs with the sizes it shrinks."""
    names = list(FACTORS)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            seen = {(repr(c[a]), repr(c[b])) for c in COVERING}
            for va, vb in itertools.product(FACTORS[a], FACTORS[b]):
                if _long_exempt(a, va, b, vb):
                    continue
                assert (repr(va), repr(vb)) in seen, (a, va, b, vb)


def test_transposed_lists_match_dense_states():
    gen = torch.Generator().manual_seed(3)
    state = torch.randint(0, 3, (2, 3, 5, 7), generator=gen).to(torch.int8)
    q_count, q_index = bwd._transposed_lists(state)
    for b, h, n in itertools.product(range(2), range(3), range(7)):
        nonempty = [m for m in range(5) if state[b, h, m, n] != EMPTY]
        assert q_count[b, h, n].item() == len(nonempty)
        assert q_index[b, h, n, : len(nonempty)].tolist() == nonempty
    assert {EMPTY, PARTIAL, FULL} == set(state.unique().tolist())


def test_bias_grad_written_in_skipped_tiles(monkeypatch):
    """A windowed float mask: the bias gradient of the tiles the kernels skip is written (zero), not left NaN."""
    monkeypatch.setenv("FASTATTN_POISON", "1")
    case = dict(kind="float", length=129, lk="same", heads=(2, 1), head_dim=(16, 16), dtype=torch.float32, blocks=None)
    q, k, v, _, _, _, grad_out, _ = _setup(case, seed=11)
    bias = torch.randn(1, 2, 129, 129)
    params, q, k, v = validate(q, k, v, bias, 0.0, False, None, True, (6, 6), 0)
    assert (params.tile_summary(32, 32).state == EMPTY).any()
    out, lse = oracle.attention_forward(q, k, v, params)
    dmask = _run(q, k, v, params, out, lse, grad_out, None, True)[3]
    truth = oracle.attention_backward(grad_out.double(), q.double(), k.double(), v.double(), params)[3]
    assert_close(dmask, truth, name="dmask")


def test_deterministic_bit_identical():
    """Same inputs, same bits: GQA (the group reduction) and a bias gradient, run twice."""
    case = dict(kind="float", length=65, lk="other", heads=(4, 1), head_dim=(16, 16), dtype=torch.float16, blocks=None)
    q, k, v, params, out, lse, grad_out, blocks = _setup(case, seed=5)
    first = _run(q, k, v, params, out, lse, grad_out, blocks, True)
    second = _run(q, k, v, params, out, lse, grad_out, blocks, True)
    for a, b in zip(first, second):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


class _OracleForwardTritonBackward(Backend):
    """The oracle's forward with the Triton backward: checks the backward alone through autograd."""

    name = "oracle-fwd-triton-bwd"

    def forward(self, q, k, v, params, philox):
        return oracle.attention_forward(q, k, v, params)

    def backward(self, grad_out, q, k, v, out, lse, params, philox, need_mask_grad):
        return bwd.attn_bwd(grad_out, q, k, v, out, lse, params, philox, need_mask_grad)


def _hybrid(q, k, v, attn_mask=None, is_causal=False, window=None, q_offset=0):
    params, q4, k4, v4 = validate(q, k, v, attn_mask, 0.0, is_causal, None, True, window, q_offset)
    out, _ = AttentionFunction.apply(q4, k4, v4, params.mask, None, _OracleForwardTritonBackward(), params)
    return out


@pytest.mark.parametrize("bias_shape", [(1, 2, 5, 7), (2, 1, 1, 7), (5, 7)], ids=["per-head", "key", "2d"])
def test_gradcheck_float64(bias_shape):
    """Numerical gradients of q, k, v and a learned bias (reduced over its broadcast dims) in float64."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = random_qkv(2, 2, 1, 5, 7, 4, 3, torch.float64, requires_grad=True, generator=gen)
    bias = torch.randn(bias_shape, generator=gen, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v, bias: _hybrid(q, k, v, bias, is_causal=True, q_offset=2)
    # fast_mode: a few random vector-Jacobian products instead of one backward per output element.
    assert torch.autograd.gradcheck(fn, (q, k, v, bias), atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_end_to_end_matches_plain_autograd(dtype):
    """``backend="triton"`` forward and backward vs plain autograd through the oracle, learned bias included."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = random_qkv(2, 4, 2, 33, 40, 16, 16, dtype, generator=gen)
    bias = torch.randn(2, 1, 33, 40, generator=gen).to(dtype)
    leaves = [t.detach().clone().to(DEVICE).requires_grad_() for t in (q, k, v, bias)]
    out = fastattn.scaled_dot_product_attention(
        *leaves[:3], leaves[3], is_causal=True, enable_gqa=True, window=(9, -1), backend="triton"
    )
    grad_out = torch.randn(out.shape, generator=gen).to(dtype)
    out.backward(grad_out.to(DEVICE))

    def plain(compute):
        ref = [t.detach().to(compute).requires_grad_() for t in (q, k, v, bias)]
        o = oracle.attention(*ref[:3], ref[3], is_causal=True, enable_gqa=True, window=(9, -1), compute_dtype=compute)
        o.backward(grad_out.to(compute))
        return [t.grad for t in ref]

    truth = plain(torch.float64)
    base = plain(dtype) if dtype != torch.float32 else [None] * 4
    for name, leaf, ref, bl in zip(("dq", "dk", "dv", "dbias"), leaves, truth, base):
        assert leaf.grad.shape == ref.shape
        assert_close(leaf.grad, ref, bl, factor=3, name=name)


def test_dropout_replays_the_forward_keep_mask():
    """The backward regenerates exactly the forward's keep-mask; grads equal the oracle's with that mask."""
    from fastattn.backends.triton import fwd

    gen = torch.Generator().manual_seed(4)
    p = 0.3
    q, k, v = random_qkv(2, 4, 2, 45, 70, 16, 16, torch.float32, generator=gen)
    params, q, k, v = validate(q, k, v, None, p, True, None, True, None, 25)
    philox = philox_seed_offset("cpu")
    out, lse = fwd.forward(q, k, v, params, philox)
    grad_out = torch.randn(out.shape, generator=gen)
    dq, dk, dv, _, keep = bwd.attn_bwd_debug(grad_out, q, k, v, out, lse, params, philox)
    assert torch.equal(keep, dropout_keep_mask(philox, 2, 4, 45, 70, p))
    # The forward used the same mask: its output is the oracle's with it.
    ref_out, _ = oracle.attention_forward(q.double(), k.double(), v.double(), params, keep)
    assert_close(out, ref_out, name="out")
    truth = oracle.attention_backward(grad_out.double(), q.double(), k.double(), v.double(), params, keep)
    for name, got, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), truth):
        assert_close(got, ref, factor=3, name=name)
    # The training path (no debug output) computes the same gradients, bit for bit.
    plain = bwd.attn_bwd(grad_out, q, k, v, out, lse, params, philox, False)
    for a, b in zip(plain[:3], (dq, dk, dv)):
        assert torch.equal(a, b)


def test_reference_fallback_replays_the_dropout_mask(monkeypatch):
    """Where ``bwd_config`` has no kernel (sm_75 beyond fp16 at head dim <= 64), the registry runs the backward on
    another backend (here the reference) with the call's dropout seed: the same gradients as the kernels."""
    gen = torch.Generator().manual_seed(21)
    q, k, v = random_qkv(1, 4, 2, 29, 37, 16, 16, torch.float32, generator=gen)
    bias = torch.randn(1, 1, 29, 37, generator=gen)

    def step(fallback):
        monkeypatch.setattr(bwd, "fallback_reason", lambda *a: "test" if fallback else None)
        leaves = [t.detach().clone().to(DEVICE).requires_grad_() for t in (q, k, v, bias)]
        torch.manual_seed(3)
        out = fastattn.scaled_dot_product_attention(
            *leaves[:3], leaves[3], dropout_p=0.25, is_causal=True, enable_gqa=True, backend="triton"
        )
        out.backward(torch.ones_like(out))
        return [t.grad for t in leaves]

    kernels, reference = step(False), step(True)
    for name, got, ref in zip(("dq", "dk", "dv", "dbias"), reference, kernels):
        assert_close(got, ref, factor=3, name=name)


def test_bwd_config_table():
    """Every (arch, dtype, head dim, mask/dropout) has a config, except sm_75 beyond fp16 at head dim <= 64."""
    for arch, dtype, d, heavy in itertools.product(
        (90, 80, 86, 75), (torch.float16, torch.bfloat16, torch.float32), (16, 24, 64, 80, 128, 256), (False, True)
    ):
        if arch == 75 and dtype == torch.bfloat16:
            continue  # refused by the backend below sm_80
        config = bwd.bwd_config(d, d, dtype, arch, heavy)
        if arch == 75 and (dtype == torch.float32 or d > 64):
            assert config is None
            continue
        assert config is not None, (arch, dtype, d, heavy)
        for bm, bn, warps, stages in config:
            assert bm >= 16 and bn >= 16 and warps in (1, 2, 4, 8) and stages in (1, 2, 3)
    assert bwd.bwd_config(64, 128, torch.float16, 80, False) == bwd.bwd_config(128, 128, torch.float16, 80, False)
    assert bwd.bwd_config(64, 64, torch.float16, None, True) == ((32, 32, 4, 1), (32, 32, 4, 1))
    # sm_86/sm_89 (99 KB of shared memory) take their own entries where sm_80's need more; sm_87 too.
    for arch in (86, 87, 89):
        assert bwd.bwd_config(256, 256, torch.bfloat16, arch) != bwd.bwd_config(256, 256, torch.bfloat16, 80)
        assert bwd.bwd_config(64, 64, torch.bfloat16, arch) == bwd.bwd_config(64, 64, torch.bfloat16, 80)


def test_dropout_same_seed_same_gradients():
    """Through ``backend="triton"``: the same torch seed gives the same output and gradients, another seed not."""
    gen = torch.Generator().manual_seed(12)
    q, k, v = random_qkv(1, 2, 2, 20, 20, 16, 16, torch.float32, generator=gen)

    def step(seed):
        leaves = [t.detach().clone().to(DEVICE).requires_grad_() for t in (q, k, v)]
        torch.manual_seed(seed)
        out = fastattn.scaled_dot_product_attention(*leaves, dropout_p=0.4, backend="triton")
        out.sum().backward()
        return [out.detach()] + [t.grad for t in leaves]

    first, again, other = step(5), step(5), step(6)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(torch.isfinite(t).all() for t in first)
    assert not torch.equal(first[1], other[1])


def test_dropout_statistics():
    """Keep rate ~ 1 - p, and 1/(1-p) scaling is unbiased: the mean dV over seeds is the no-dropout dV."""
    p, draws = 0.25, 24
    gen = torch.Generator().manual_seed(6)
    q, k, v = random_qkv(1, 2, 2, 32, 32, 16, 16, torch.float32, generator=gen)
    params, q, k, v = validate(q, k, v, None, p, False, None, False, None, 0)
    out, lse = oracle.attention_forward(q, k, v, params)
    grad_out = torch.randn(out.shape, generator=gen)
    dv_ref = oracle.attention_backward(grad_out, q, k, v, params)[2]
    torch.manual_seed(123)
    samples, kept = [], []
    for _ in range(draws):
        _, _, dv, _, keep = bwd.attn_bwd_debug(grad_out, q, k, v, out, lse, params, philox_seed_offset(DEVICE))
        samples.append(dv)
        kept.append(keep)
    keep = torch.stack(kept).float()
    n = keep.numel()
    assert abs(keep.mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    assert not torch.equal(kept[0], kept[1])  # fresh seeds draw fresh masks
    dvs = torch.stack(samples)
    sem = dvs.std(0) / draws**0.5
    assert ((dvs.mean(0) - dv_ref).abs() <= 5 * sem + 1e-6).float().mean() > 0.999


def test_bad_inputs_are_refused():
    q, k, v = random_qkv(1, 2, 2, 8, 8, 16)
    params, q, k, v = validate(q, k, v, torch.ones(8, 8, dtype=torch.bool), 0.0, False, None, False, None, 0)
    out, lse = oracle.attention_forward(q, k, v, params)
    with pytest.raises(ValueError, match="need_mask_grad"):
        bwd.attn_bwd(out, q, k, v, out, lse, params, None, True)
    with pytest.raises(ValueError, match="philox"):
        bwd.attn_bwd(out, q, k, v, out, lse, params.replace(dropout_p=0.1), None, False)


def _opcheck_args(mask_kind: str):
    gen = torch.Generator().manual_seed(7)
    q, k, v = random_qkv(1, 2, 1, 20, 24, 16, 16, torch.float32, generator=gen)
    mask = torch.randn(1, 2, 20, 24, generator=gen) if mask_kind == "float" else None
    params, q, k, v = validate(q, k, v, mask, 0.0, True, None, True, None, 4)
    out, lse = oracle.attention_forward(q, k, v, params)
    grad_out = torch.randn(out.shape, generator=gen)
    blocks = list(bwd.block_sizes(16, q.dtype, q.device, 24))
    return (
        grad_out, q, k, v, out, lse, params.mask, None,
        [params.tile_summary(blocks[0], blocks[1]).state, params.tile_summary(blocks[2], blocks[3]).state], None,
        params.scale, 0.0, params.variant_scalars.pack(), blocks, mask_kind == "float",
    )  # fmt: skip


@pytest.mark.parametrize("mask_kind", ["none", "float"])
def test_opcheck_backward_op(mask_kind):
    torch.library.opcheck(torch.ops.fastattn.triton_attn_bwd.default, _opcheck_args(mask_kind))


def _loss(model_params, x, bias):
    wq, wk, wv = model_params
    q, k, v = (torch.einsum("bhld,de->bhle", x, w) for w in (wq, wk, wv))
    out = fastattn.scaled_dot_product_attention(q, k, v, bias, is_causal=True, backend="triton")
    return out.float().square().mean()


def _compiled_step_matches_eager(backend: str, monkeypatch):
    calls = []
    launch = bwd._launch
    monkeypatch.setattr(bwd, "_launch", lambda *a, **kw: calls.append(1) or launch(*a, **kw))
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(1, 2, 24, 16, generator=gen)
    params = [torch.randn(16, 16, generator=gen) * 0.3 for _ in range(3)]
    bias = torch.randn(1, 2, 24, 24, generator=gen)

    def run(loss_fn):
        # One training step: the compiled graph holds forward and (through AOT autograd) backward.
        leaves = [p.clone().requires_grad_() for p in params] + [bias.clone().requires_grad_()]
        loss = loss_fn(leaves[:3], x, leaves[3])
        loss.backward()
        return loss.detach(), [t.grad for t in leaves]

    torch._dynamo.reset()
    ref_loss, ref_grads = run(_loss)
    calls.clear()
    loss, grads = run(torch.compile(_loss, backend=backend, fullgraph=True))
    assert calls, "the compiled step never ran the Triton backward"
    torch.testing.assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_compile_training_step_aot_eager(monkeypatch):
    _compiled_step_matches_eager("aot_eager", monkeypatch)


@pytest.mark.slow
def test_compile_training_step_inductor(monkeypatch):
    _compiled_step_matches_eager("inductor", monkeypatch)


def test_memory_no_lq_by_lk_without_bias_grad():
    """Forward + backward allocate nothing of Lq x Lk elements; with a bias gradient, exactly that appears."""
    seqlen = 320  # Lq*Lk bytes = 100 KiB, far above any (L, D) tensor here (20 KiB)
    gen = torch.Generator().manual_seed(9)

    def peak_alloc(bias_requires_grad: bool) -> int:
        q, k, v = (t.requires_grad_() for t in random_qkv(1, 1, 1, seqlen, seqlen, 16, generator=gen))
        mask = torch.rand(1, 1, 1, seqlen, generator=gen) > 0.2  # key padding: broadcast, never expanded
        if bias_requires_grad:
            mask = torch.randn(1, 1, 1, seqlen, generator=gen).requires_grad_()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fastattn.scaled_dot_product_attention(q, k, v, mask, is_causal=True, backend="triton")
            out.sum().backward()
        sizes = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
        assert sizes, "the profiler recorded no allocation: the check would be vacuous"
        return max(sizes)

    assert peak_alloc(False) < seqlen * seqlen
    assert peak_alloc(True) >= seqlen * seqlen * 4  # the detector sees the one allowed Lq x Lk buffer


@pytest.mark.full
@pytest.mark.slow
@pytest.mark.parametrize("arch,dtype", [(90, "bf16"), (80, "fp16"), (80, "fp32")])
def test_kernels_compile_for_gpu(arch, dtype):
    """The real compiler (no GPU needed) builds both kernels at head dim 128, every mask variant of
    ``fastattn compile-check --all`` and its packed builds: no spills, tensor cores (``make test`` checks the
    default pair)."""
    from fastattn.backends.triton import compile_check as cc

    vs = [v for v in cc.variants([arch], True, head_dims=(128,), dtypes=(dtype,)) if v.kernel in cc.BWD_KERNELS]
    assert len(vs) == 2 * (len(cc.ALL_MASKS) + len(cc.PACKED_MASKS))
    results = [cc.assess(r) for r in cc._run_all(vs, jobs=2)]
    assert all(r.ok for r in results), [(r.variant.label, r.problems) for r in results if not r.ok]
