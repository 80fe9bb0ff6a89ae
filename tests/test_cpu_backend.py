"""The native CPU backend against the float64 oracle: outputs, lse and gradients.

The default run is a covering set (every dtype, mask kind, odd length, GQA shape, head dim and
stride pattern appears, most pairs too); the full product is marked ``full``. Outputs and scratch
are poisoned with NaN inside the op (``FASTATTN_POISON=1``), so an element a kernel never writes fails.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastattn
from fastattn import reference as oracle
from fastattn._ext import unavailable_reason
from fastattn._validate import validate
from fastattn.backends import cpu as cpu_backend
from fastattn.backends.registry import UnsupportedError, choose
from fastattn.testing import assert_close

pytestmark = pytest.mark.skipif(unavailable_reason("cpu") is not None, reason=str(unavailable_reason("cpu")))

ROOT = Path(__file__).resolve().parents[1]
sdpa = fastattn.scaled_dot_product_attention


@pytest.fixture(scope="module", autouse=True)
def _built():
    cpu_backend.load()
    old = os.environ.get("FASTATTN_POISON")
    os.environ["FASTATTN_POISON"] = "1"
    yield
    if old is None:
        os.environ.pop("FASTATTN_POISON", None)
    else:
        os.environ["FASTATTN_POISON"] = old


def _mask(kind: str, b: int, h: int, lq: int, lk: int, gen: torch.Generator):
    """attn_mask and keyword arguments for one mask kind."""
    if kind == "none":
        return {}
    if kind == "causal":
        return {"is_causal": True}
    if kind == "bool":
        return {"attn_mask": torch.rand(b, h, lq, lk, generator=gen) < 0.6}
    if kind == "key_padding":  # (B, 1, 1, Lk): broadcast over heads and queries
        lengths = torch.randint(1, lk + 1, (b,), generator=gen)
        return {"attn_mask": (torch.arange(lk) < lengths[:, None]).view(b, 1, 1, lk)}
    if kind == "float":  # additive, broadcast over batch, with some -inf
        bias = torch.randn(1, h, lq, lk, generator=gen)
        return {"attn_mask": bias.masked_fill(torch.rand(1, h, lq, lk, generator=gen) < 0.2, float("-inf"))}
    if kind == "window":
        return {"window": (7, 3)}
    if kind == "causal_mask":
        return {"is_causal": True, "attn_mask": torch.rand(1, 1, lq, lk, generator=gen) < 0.7}
    if kind == "q_offset":  # bottom-right causal, as KV-cache decoding aligns it
        return {"is_causal": True, "q_offset": lk - lq}
    if kind == "block_sparse":  # whole 64 x 64 tiles empty or full, plus the diagonal
        nq, nk = -(-lq // 64), -(-lk // 64)
        blocks = torch.rand(nq, nk, generator=gen) < 0.3
        blocks |= torch.eye(nq, nk, dtype=torch.bool)
        return {"attn_mask": blocks.repeat_interleave(64, 0).repeat_interleave(64, 1)[:lq, :lk]}
    raise ValueError(kind)


def _inputs(b, hq, hkv, lq, lk, d, dv, dtype, layout, gen):
    """q, k, v with the given memory layout: contiguous, (B, L, H, D) transposed, or sliced last dim."""

    def draw(h, seqlen, dim):
        if layout == "blhd":  # (B, L, H, D) storage viewed as (B, H, L, D)
            t = torch.randn(b, seqlen, h, dim, generator=gen).transpose(1, 2)
        elif layout == "sliced":  # last dim not unit-stride-packed: every other element
            t = torch.randn(b, h, seqlen, 2 * dim, generator=gen)[..., ::2]
        else:
            t = torch.randn(b, h, seqlen, dim, generator=gen)
        return t.to(dtype).requires_grad_(True)

    return draw(hq, lq, d), draw(hkv, lk, d), draw(hkv, lk, dv)


def _check(b, hq, hkv, lq, lk, d, dv, dtype, mask_kind, layout="contiguous", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _inputs(b, hq, hkv, lq, lk, d, dv, dtype, layout, gen)
    kw = _mask(mask_kind, b, hq, lq, lk, gen)
    gqa = hq != hkv
    out, lse = sdpa(q, k, v, enable_gqa=gqa, backend="cpu", return_lse=True, **kw)
    grad = torch.randn(out.shape, generator=gen).to(dtype)
    out.backward(grad)

    # The oracle's explicit forward and backward (autograd through it gives NaN on fully masked rows).
    kw64 = dict(kw)
    if "attn_mask" in kw and kw["attn_mask"].dtype.is_floating_point:
        kw64["attn_mask"] = kw["attn_mask"].double()

    def oracle_run(tensors, kwargs, compute_dtype):
        params, q4, k4, v4 = validate(*tensors, enable_gqa=gqa, **kwargs)
        o, lse_ = oracle.attention_forward(q4, k4, v4, params, compute_dtype=compute_dtype)
        g = grad.to(compute_dtype)
        grads = oracle.attention_backward(g, q4, k4, v4, params, compute_dtype=compute_dtype)[:3]
        return o, lse_, grads

    ref, ref_lse, ref_grads = oracle_run([t.detach().double() for t in (q, k, v)], kw64, torch.float64)
    low = dtype != torch.float32
    base_out, base_grads = None, [None, None, None]
    if low:  # plain PyTorch in the low precision: the error budget of the 2x/3x rule
        base_out, _, base_grads = oracle_run([t.detach() for t in (q, k, v)], kw, dtype)
    assert_close(out, ref, base_out, name="out")
    assert_close(lse, ref_lse, None, name="lse")  # fp32 softmax statistics in every dtype
    for name, got, want, base in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), ref_grads, base_grads):
        assert_close(got, want, base, factor=3.0, name=name)


# (B, Hq, Hkv, Lq, Lk, D, Dv, dtype, mask, layout): every value of every factor appears.
COVER = [
    (1, 2, 2, 1, 1, 16, 16, torch.float32, "none", "contiguous"),
    (2, 4, 2, 17, 65, 32, 32, torch.bfloat16, "causal", "blhd"),
    (1, 4, 1, 65, 17, 33, 33, torch.float32, "bool", "sliced"),
    (2, 2, 2, 129, 129, 64, 64, torch.bfloat16, "key_padding", "contiguous"),
    (1, 4, 2, 129, 65, 64, 48, torch.float32, "float", "blhd"),
    (1, 2, 1, 65, 129, 16, 16, torch.bfloat16, "window", "sliced"),
    (2, 2, 2, 17, 129, 64, 64, torch.float32, "causal_mask", "contiguous"),
    (1, 4, 2, 65, 129, 32, 32, torch.bfloat16, "q_offset", "contiguous"),
    (1, 2, 2, 1030, 1030, 64, 64, torch.float32, "block_sparse", "contiguous"),
    (1, 2, 1, 1030, 1030, 64, 64, torch.bfloat16, "causal", "contiguous"),
    (1, 2, 2, 129, 1030, 33, 33, torch.bfloat16, "bool", "contiguous"),
    (1, 2, 2, 1, 129, 64, 64, torch.float32, "window", "blhd"),
    (2, 4, 2, 65, 129, 64, 64, torch.float16, "causal_mask", "blhd"),
    (1, 2, 1, 129, 65, 33, 33, torch.float16, "float", "sliced"),
]


@pytest.mark.parametrize("case", COVER, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_against_oracle(case):
    _check(*case)


FULL = list(
    itertools.product(
        [torch.float32, torch.bfloat16, torch.float16],
        ["none", "causal", "bool", "key_padding", "float", "window", "causal_mask", "q_offset", "block_sparse"],
        [(1, 1), (17, 17), (65, 129), (129, 65), (1030, 1030)],
        [(2, 2), (4, 1)],
        [(16, 16), (33, 33), (64, 48)],
    )
)


@pytest.mark.full
@pytest.mark.parametrize("dtype,mask,lens,heads,dims", FULL)
def test_against_oracle_full(dtype, mask, lens, heads, dims):
    _check(1, heads[0], heads[1], lens[0], lens[1], dims[0], dims[1], dtype, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_masked_rows_give_zeros_and_zero_grads(dtype):
    q, k, v = (torch.randn(1, 2, 70, 32, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.rand(1, 1, 70, 70) < 0.5
    mask[..., 5, :] = False  # row 5 attends nothing
    mask[..., 64:, :] = False  # and the whole last query tile
    out, lse = sdpa(q, k, v, attn_mask=mask, backend="cpu", return_lse=True)
    out.backward(torch.randn_like(out))
    assert torch.all(out[..., 5, :] == 0) and torch.all(out[..., 64:, :] == 0)
    assert torch.all(lse[..., 5] == float("-inf")) and torch.all(lse[..., 64:] == float("-inf"))
    assert torch.all(q.grad[..., 5, :] == 0) and torch.all(q.grad[..., 64:, :] == 0)
    for t in (q.grad, k.grad, v.grad, out):
        assert torch.isfinite(t).all()


def test_float_mask_gradient():
    q, k, v = (torch.randn(2, 2, 65, 32, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, 65, 65, requires_grad=True)
    out = sdpa(q, k, v, attn_mask=bias, is_causal=True, backend="cpu")
    grad = torch.randn_like(out)
    out.backward(grad)
    bias64 = bias.detach().double().requires_grad_(True)
    ref = oracle.attention(*(t.detach().double() for t in (q, k, v)), attn_mask=bias64, is_causal=True)
    ref.backward(grad.double())
    assert_close(bias.grad, bias64.grad, name="dmask", factor=3.0)


def test_reused_mask_object_uses_its_cached_summary():
    lq = lk = 200
    blocks = torch.rand(4, 4) < 0.4
    blocks |= torch.eye(4, dtype=torch.bool)
    dense = blocks.repeat_interleave(64, 0).repeat_interleave(64, 1)[:lq, :lk]
    mask = fastattn.Mask(dense)
    q, k, v = (torch.randn(1, 2, lq, 32) for _ in range(3))
    for _ in range(2):  # the second call reuses the cached summary
        got = sdpa(q, k, v, attn_mask=mask, backend="cpu")
        assert_close(got, oracle.attention(q.double(), k.double(), v.double(), attn_mask=dense))


def test_thread_count_independence():
    gen = torch.Generator().manual_seed(3)
    q, k, v = _inputs(2, 4, 2, 300, 300, 64, 64, torch.float32, "contiguous", gen)
    mask = torch.rand(1, 1, 300, 300, generator=gen) < 0.8
    grad = torch.randn(2, 4, 300, 64, generator=gen)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
            out = sdpa(qq, kk, vv, attn_mask=mask, is_causal=True, enable_gqa=True, backend="cpu")
            out.backward(grad)
            results.append((out, qq.grad, kk.grad, vv.grad))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _allocated_bytes(seqlen: int, heads: int = 2, dim: int = 32) -> dict:
    q, k, v = (torch.randn(1, heads, seqlen, dim, requires_grad=True) for _ in range(3))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = sdpa(q, k, v, is_causal=True, backend="cpu")
        out.backward(torch.randn_like(out))
    # Bytes allocated inside each op, its outputs included (thread scratch is O(block) and untracked).
    return {e.key: e.cpu_memory_usage for e in prof.key_averages() if "cpu_attn" in e.key}


def test_memory_is_linear_in_length():
    """No Lq x Lk buffer: doubling L doubles the ops' allocations, far below one score matrix."""
    short, long = _allocated_bytes(1024), _allocated_bytes(2048)
    assert set(long) == {"fastattn::cpu_attn_fwd", "fastattn::cpu_attn_bwd"}, list(long)
    scores_bytes = 2 * 2048 * 2048 * 4
    for name in long:
        assert 0 < long[name] < scores_bytes / 2, f"{name}: {long[name]} bytes at L=2048 (scores: {scores_bytes})"
        assert long[name] < 2.5 * short[name], f"{name}: {short[name]} -> {long[name]} bytes when L doubles"


def test_portable_gemm_path(monkeypatch):
    """FASTATTN_CPU_GEMM=portable: bf16 in converted fp32 tiles even where brgemm has a native bf16 dot."""
    monkeypatch.setenv("FASTATTN_CPU_GEMM", "portable")
    assert "brgemm_bf16=0" in torch.ops.fastattn.cpu_attn_info()
    _check(1, 2, 1, 65, 100, 33, 33, torch.float32, "causal_mask")
    _check(1, 2, 2, 65, 100, 32, 32, torch.bfloat16, "window")


def _run_child(code: str, env_update: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k != "FASTATTN_CPU_ISA"}  # the automatic choice
    env.update(env_update)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


_CHILD = """
    import torch, fastattn
    from fastattn.backends import cpu
    cpu.load()
    print(torch.ops.fastattn.cpu_attn_info())
    q, k, v = (torch.randn(1, 2, 77, 40) for _ in range(3))
    got = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu")
    want = fastattn.reference.attention(q.double(), k.double(), v.double(), is_causal=True)
    assert (got.double() - want).abs().max() < 1e-4, (got.double() - want).abs().max()
    print("ok")
"""


def test_loads_and_runs_without_nvcc_on_the_baseline_instruction_set():
    """No CUDA toolkit needed (nvcc and CUDA_HOME hidden), and ATEN_CPU_CAPABILITY=default, which
    makes torch pick its baseline kernels, makes fastattn pick its baseline kernels too."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "CUDA_HOME": "", "CUDA_PATH": ""}
    env["ATEN_CPU_CAPABILITY"] = "default"
    out = _run_child("import shutil; assert shutil.which('nvcc') is None\n" + textwrap.dedent(_CHILD), env)
    assert "isa=default" in out and out.strip().endswith("ok"), out


@pytest.mark.full
@pytest.mark.parametrize("capability", ["avx2", "avx512"])
def test_instruction_set_chosen_at_run_time(capability):
    """Each compiled instruction set gives right answers where the CPU has it (chosen through torch's
    ATEN_CPU_CAPABILITY when FASTATTN_CPU_ISA is unset; tests/test_cpu_isa.py forces each one)."""
    if capability not in cpu_backend.available_isas():
        pytest.skip(f"this CPU cannot run {capability} (it runs {cpu_backend.available_isas()})")
    out = _run_child(_CHILD, {"ATEN_CPU_CAPABILITY": capability})
    assert f"isa={capability}" in out and out.strip().endswith("ok"), out


def test_opcheck():
    q, k, v = (torch.randn(1, 2, 70, 32) for _ in range(3))
    mask = torch.rand(1, 1, 70, 70) < 0.7
    scalars = (32**-0.5, 0.0, [-1.0, 0.0, 0.0, 0.0, 0.0], [64, 64])
    args = (q, k, v, mask, None, None, [], None, *scalars)
    torch.library.opcheck(torch.ops.fastattn.cpu_attn_fwd.default, args)
    out, lse = torch.ops.fastattn.cpu_attn_fwd(*args)
    bwd_args = (torch.randn_like(out), q, k, v, out, lse, mask, None, [], None, *scalars, False)
    torch.library.opcheck(torch.ops.fastattn.cpu_attn_bwd.default, bwd_args)


def test_torch_compile_fullgraph():
    q, k, v = (torch.randn(1, 2, 65, 32, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return sdpa(q, k, v, is_causal=True, backend="cpu").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    loss.backward()
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = oracle.attention(q64, k64, v64, is_causal=True).square().sum()
    ref.backward()
    assert_close(loss, ref)
    assert_close(q.grad, q64.grad, factor=3.0, name="dq")


def test_choice_and_refusals(monkeypatch):
    from fastattn._validate import validate

    for var in ("TRITON_INTERPRET", "FASTATTN_CUDA_EMULATE", "FASTATTN_BACKEND"):
        monkeypatch.delenv(var, raising=False)

    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    params, *_ = validate(q, k, v)
    assert choose(None, params).name == "cpu"
    assert choose(None, params.replace(dropout_p=0.1)).name == "cpu"  # dropout too (tests/test_cpu_dropout.py)
    assert choose(None, validate(q.half(), k.half(), v.half())[0]).name == "cpu"  # float16 in fp32 tiles
    assert choose(None, validate(q.double(), k.double(), v.double())[0]).name == "reference"
    with pytest.raises(UnsupportedError, match=r"dtype torch.float64 is not supported \(float32, bfloat16, float16\)"):
        sdpa(q.double(), k.double(), v.double(), backend="cpu")


def test_bad_op_arguments_name_what_was_expected():
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))

    def fwd(mask=None, summary=(), blocks=(64, 64), alibi=None, sinks=None, chunk=0, softcap=0.0, variant=None):
        variant = [-1.0, -1.0, 0.0, float(chunk), float(softcap)] if variant is None else variant
        return torch.ops.fastattn.cpu_attn_fwd(
            q, k, v, mask, alibi, sinks, list(summary), None, 1.0, 0.0, variant, list(blocks)
        )

    with pytest.raises(RuntimeError, match="mask: expected a 4-D shape broadcastable to"):
        fwd(torch.ones(1, 1, 8, 9, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="tile_state: expected int8"):
        fwd(torch.ones(8, 8, dtype=torch.bool).view(1, 1, 8, 8), [torch.zeros(1, 1, 2, 2, dtype=torch.int8)])
    with pytest.raises(RuntimeError, match="block_q, block_k: expected even sizes"):
        fwd(blocks=(63, 64))
    with pytest.raises(RuntimeError, match=r"alibi_slopes: expected a contiguous CPU float32 tensor of \(1 or 1, 2\)"):
        fwd(alibi=torch.ones(1, 3))
    with pytest.raises(RuntimeError, match=r"sinks: expected a contiguous CPU float32 tensor of \(2,\)"):
        fwd(sinks=torch.ones(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"variant: chunk must be >= 0 \(0: none\), got -2"):
        fwd(chunk=-2)
    with pytest.raises(RuntimeError, match=r"variant: chunk must be a finite integer, got 1.5"):
        fwd(chunk=1.5)
    with pytest.raises(RuntimeError, match=r"variant: softcap must be >= 0 \(0: none\), got -1"):
        fwd(softcap=-1.0)
    with pytest.raises(RuntimeError, match=r"variant: window_left and window_right must be >= -1"):
        fwd(variant=[-2.0, -1.0, 0.0, 0.0, 0.0])
    with pytest.raises(RuntimeError, match=r"variant: expected 5 numbers \(window_left, .*\), got 4"):
        fwd(variant=[-1.0, -1.0, 0.0, 0.0])
