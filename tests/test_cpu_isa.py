"""The CPU backend's instruction-set builds, each forced through ``FASTATTN_CPU_ISA``.

Every build this CPU can run (``avx512``, ``avx2``, ``default``; ``fastattn.backends.cpu.available_isas()``)
against the float64 oracle in float32, bfloat16 and float16: output, lse and every gradient, outputs and
scratch poisoned inside the op (``FASTATTN_POISON=1``), odd lengths, GQA, masks and strided layouts; the
op's dispatch counters prove the forced build is the one that ran. Then the errors a demanding user meets:
an unknown value and an ISA the CPU lacks (``FASTATTN_CPU_HIDE_FEATURES`` hides features for the test, so
that path runs on any machine), each naming the variable, what it accepts and what it got.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastattn
from fastattn import reference as oracle
from fastattn._ext import unavailable_reason
from fastattn._validate import validate
from fastattn.backends import cpu as cpu_backend
from fastattn.testing import assert_close

pytestmark = pytest.mark.skipif(unavailable_reason("cpu") is not None, reason=str(unavailable_reason("cpu")))

ROOT = Path(__file__).resolve().parents[1]
ISAS = cpu_backend.ISAS
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
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


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("FASTATTN_CPU_ISA", "FASTATTN_CPU_HIDE_FEATURES", "FASTATTN_CPU_GEMM"):
        monkeypatch.delenv(var, raising=False)


def _runnable(isa: str) -> None:
    if isa not in cpu_backend.available_isas():
        pytest.skip(f"this CPU cannot run the {isa} build (it runs {cpu_backend.available_isas()})")


def _mask(kind: str, b: int, h: int, lq: int, lk: int, gen: torch.Generator) -> dict:
    if kind == "none":
        return {}
    if kind == "causal":
        return {"is_causal": True}
    if kind == "bool":  # with a row that attends nothing
        keep = torch.rand(b, h, lq, lk, generator=gen) > 0.3
        keep[0, 0, lq // 2] = False
        return {"attn_mask": keep}
    if kind == "float":  # additive, broadcast over batch, with -inf entries
        bias = torch.randn(1, h, lq, lk, generator=gen)
        return {"attn_mask": bias.masked_fill(torch.rand(1, h, lq, lk, generator=gen) < 0.15, float("-inf"))}
    if kind == "window_offset":
        return {"is_causal": True, "window": (max(2, lk // 3), -1), "q_offset": 7}
    raise ValueError(kind)


def _check(b, hq, hkv, lq, lk, d, dv, dtype, mask_kind, transposed=False, seed=0):
    """fastattn's CPU forward and backward against the float64 oracle (2x / 3x plain PyTorch's error)."""
    gen = torch.Generator().manual_seed(seed)

    def draw(h, seqlen, dim):
        if transposed:  # (B, L, H, D) storage: no unit stride on the sequence
            return torch.randn(b, seqlen, h, dim, generator=gen).transpose(1, 2).to(dtype).requires_grad_(True)
        return torch.randn(b, h, seqlen, dim, generator=gen).to(dtype).requires_grad_(True)

    q, k, v = draw(hq, lq, d), draw(hkv, lk, d), draw(hkv, lk, dv)
    kw = _mask(mask_kind, b, hq, lq, lk, gen)
    gqa = hq != hkv
    out, lse = sdpa(q, k, v, enable_gqa=gqa, backend="cpu", return_lse=True, **kw)
    assert out.dtype == dtype and lse.dtype == torch.float32
    grad = torch.randn(out.shape, generator=gen).to(dtype)
    out.backward(grad)

    def oracle_run(tensors, kwargs, compute_dtype):
        params, q4, k4, v4 = validate(*tensors, enable_gqa=gqa, **kwargs)
        o, lse_ = oracle.attention_forward(q4, k4, v4, params, compute_dtype=compute_dtype)
        g = grad.to(compute_dtype)
        grads = oracle.attention_backward(g, q4, k4, v4, params, compute_dtype=compute_dtype)
        return o, lse_, grads[:3]

    kw64 = {key: (t.double() if torch.is_tensor(t) and t.dtype.is_floating_point else t) for key, t in kw.items()}
    ref, ref_lse, ref_grads = oracle_run([t.detach().double() for t in (q, k, v)], kw64, torch.float64)
    base_out, base_grads = None, [None, None, None]
    if dtype != torch.float32:  # plain PyTorch in the low precision: the error budget
        base_out, _, base_grads = oracle_run([t.detach() for t in (q, k, v)], kw, dtype)
    assert_close(out, ref, base_out, name="out")
    assert_close(lse, ref_lse, None, name="lse")
    for name, got, want, base in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), ref_grads, base_grads):
        assert_close(got, want, base, factor=3.0, name=name)


# (B, Hq, Hkv, Lq, Lk, D, Dv, mask, transposed): odd lengths past a tile, GQA, a head dim off every
# vector width (33: the micro-kernels' edge panels), Dv != D, masks of each kind, a strided layout.
CASES = [
    (1, 4, 2, 77, 130, 64, 64, "none", False),
    (2, 2, 1, 65, 300, 33, 33, "causal", True),
    (1, 4, 4, 129, 67, 40, 24, "bool", False),
    (2, 4, 2, 33, 257, 64, 48, "float", True),
    (1, 2, 1, 150, 150, 16, 16, "window_offset", False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("isa", ISAS)
def test_each_isa_build_against_the_oracle(isa, dtype, monkeypatch):
    _runnable(isa)
    monkeypatch.setenv("FASTATTN_CPU_ISA", isa)
    assert cpu_backend.isa() == isa
    before = cpu_backend.dispatch_counts()
    for case in CASES:
        _check(*case[:7], dtype, *case[7:])
    after = cpu_backend.dispatch_counts()
    for name in ISAS:  # the forced build ran every forward and backward, no other build ran at all
        ran = {d: after[name][d] - before[name][d] for d in ("fwd", "bwd")}
        assert ran == ({"fwd": len(CASES), "bwd": len(CASES)} if name == isa else {"fwd": 0, "bwd": 0}), (name, ran)


FULL = list(
    itertools.product(
        ISAS, DTYPES, ["none", "causal", "bool", "float", "window_offset"], [(1, 1), (17, 65), (130, 129), (1030, 1030)]
    )
)


@pytest.mark.full
@pytest.mark.parametrize("isa,dtype,mask,lens", FULL)
def test_each_isa_build_against_the_oracle_full(isa, dtype, mask, lens, monkeypatch):
    _runnable(isa)
    monkeypatch.setenv("FASTATTN_CPU_ISA", isa)
    _check(1, 4, 2, lens[0], lens[1], 64, 64, dtype, mask)
    _check(1, 2, 2, lens[0], lens[1], 33, 33, dtype, mask, transposed=True)


# The variants through each build's micro-kernels (csrc/attn_rules.h's rules inside the per-ISA tiles): every
# variant kind with each dtype somewhere, under a mask kind that cuts tiles, GQA and odd lengths.
# (variant, mask, dtype, (Lq, Lk), (Hq, Hkv), D)
VARIANT_CASES = [
    ("softcap", "causal", torch.float32, (65, 129), (4, 2), 40),
    ("alibi", "float", torch.bfloat16, (129, 65), (2, 2), 64),
    ("sinks", "bool", torch.float16, (17, 300), (3, 1), 16),
    ("chunk", "window", torch.float32, (130, 129), (2, 1), 33),
    ("all", "q_offset", torch.bfloat16, (100, 300), (4, 2), 64),
    ("all", "none", torch.float16, (257, 257), (2, 2), 64),
]
# A chunk that is a multiple of 256 keeps the dense 64 x 256 tiles (cpu.block_sizes): every tile all in or out.
ALIGNED_CHUNK = {"chunk": 256, "q_offset": 64}


@pytest.mark.parametrize("isa", ISAS)
def test_each_isa_build_runs_the_variants_against_the_oracle(isa, monkeypatch):
    """softcap, ALiBi, sinks, chunk (and all four) on each build: output, lse and every gradient (dsinks, the
    float mask's) against the float64 oracle (fastattn.testing.check_backend), the forced build the one that ran."""
    from fastattn import testing

    _runnable(isa)
    monkeypatch.setenv("FASTATTN_CPU_ISA", isa)
    before = cpu_backend.dispatch_counts()[isa]
    for n, (variant, mask, dtype, (lq, lk), (hq, hkv), d) in enumerate(VARIANT_CASES):
        g = torch.Generator().manual_seed(n)
        q, k, v = testing.random_qkv(2, hq, hkv, lq, lk, d, dtype=dtype, generator=g)
        kw = testing.case_kwargs(mask, variant, 2, hq, lq, lk, dtype, g)
        testing.check_backend("cpu", q, k, v, {**kw, "enable_gqa": hq != hkv})
    g = torch.Generator().manual_seed(99)
    q, k, v = testing.random_qkv(1, 2, 1, 300, 700, 64, dtype=torch.float32, generator=g)
    params, *_ = validate(q, k, v, enable_gqa=True, **ALIGNED_CHUNK)
    assert cpu_backend.block_sizes(params, 700) == (64, 256)
    testing.check_backend("cpu", q, k, v, {**ALIGNED_CHUNK, "enable_gqa": True})
    after = cpu_backend.dispatch_counts()[isa]
    assert after["fwd"] - before["fwd"] > len(VARIANT_CASES) and after["bwd"] - before["bwd"] > len(VARIANT_CASES)


@pytest.mark.parametrize("isa", ISAS)
def test_each_isa_build_agrees_with_the_others(isa, monkeypatch):
    """Same inputs, every build: fp32 results within rounding of each other (one kernel source, per-ISA code)."""
    _runnable(isa)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 100, 64, generator=gen) for _ in range(3))
    monkeypatch.setenv("FASTATTN_CPU_ISA", isa)
    got = sdpa(q, k, v, is_causal=True, backend="cpu")
    monkeypatch.setenv("FASTATTN_CPU_ISA", "default")
    base = sdpa(q, k, v, is_causal=True, backend="cpu")
    torch.testing.assert_close(got, base, rtol=2e-5, atol=2e-6)


def test_unknown_value_names_the_variable_what_it_accepts_and_what_it_got(monkeypatch):
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    monkeypatch.setenv("FASTATTN_CPU_ISA", "sse4")
    pattern = r"FASTATTN_CPU_ISA: expected one of avx512, avx2, default .*got 'sse4'"
    with pytest.raises(RuntimeError, match=pattern):
        sdpa(q, k, v, backend="cpu")
    with pytest.raises(RuntimeError, match=pattern):
        cpu_backend.isa()
    assert cpu_backend.describe_isa().startswith("error: FASTATTN_CPU_ISA: expected one of")
    monkeypatch.setenv("FASTATTN_CPU_ISA", "AVX2")  # case does not matter
    if "avx2" in cpu_backend.available_isas():
        assert cpu_backend.isa() == "avx2"


def test_an_isa_the_cpu_lacks_is_refused_with_what_it_lacks_and_what_it_runs(monkeypatch):
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    monkeypatch.setenv("FASTATTN_CPU_HIDE_FEATURES", "avx2,avx512f")  # an SSE-only CPU, as far as fastattn sees
    assert cpu_backend.available_isas() == ["default"]
    assert cpu_backend.isa() == "default"  # unset: the best it has
    monkeypatch.setenv("FASTATTN_CPU_ISA", "avx2")
    pattern = (
        r"FASTATTN_CPU_ISA=avx2: this CPU cannot run the avx2 kernels \(it lacks avx2\); "
        r"expected one it supports: default"
    )
    with pytest.raises(RuntimeError, match=pattern):
        sdpa(q, k, v, backend="cpu")
    monkeypatch.setenv("FASTATTN_CPU_ISA", "avx512")
    with pytest.raises(RuntimeError, match=r"lacks avx2, avx512f \(with OS support\)"):
        cpu_backend.isa()


def test_really_missing_isa_is_refused(monkeypatch):
    """On a CPU that truly lacks a build (an AVX2-only machine: avx512), no hiding needed."""
    missing = [isa for isa in ISAS if isa not in cpu_backend.available_isas()]
    if not missing:
        pytest.skip("this CPU runs every build")
    monkeypatch.setenv("FASTATTN_CPU_ISA", missing[0])
    with pytest.raises(RuntimeError, match=f"FASTATTN_CPU_ISA={missing[0]}: this CPU cannot run"):
        cpu_backend.isa()


def test_unset_picks_the_best_build_the_cpu_runs():
    assert cpu_backend.isa() == cpu_backend.available_isas()[0]
    assert cpu_backend.describe_isa().split()[0] == cpu_backend.isa()


def test_info_shows_the_isa_and_the_forced_one():
    def info(env_update: dict) -> str:
        env = {k: v for k, v in os.environ.items() if k not in ("FASTATTN_CPU_ISA", "FASTATTN_CPU_HIDE_FEATURES")}
        env.update(env_update)
        cmd = [sys.executable, "-m", "fastattn.cli", "info"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return next(line for line in proc.stdout.splitlines() if line.startswith("CPU kernels ISA"))

    best = cpu_backend.available_isas()[0]
    assert re.match(rf"CPU kernels ISA\s+{best}\b", info({})), info({})
    forced = info({"FASTATTN_CPU_ISA": "default"})
    assert "default (forced by FASTATTN_CPU_ISA=default" in forced
    assert "expected one of avx512, avx2, default" in info({"FASTATTN_CPU_ISA": "fast"})


def test_benchmark_headers_carry_the_isa(monkeypatch):
    """Every benchmark JSON header (benchmarks/_report.header) says which build ran, forced or not."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _report

    head = _report.header(torch.device("cpu"), ["benchmarks/x.py"])
    assert head["cpu_isa"] == cpu_backend.isa() and head["torch_cpu_capability"]
    monkeypatch.setenv("FASTATTN_CPU_ISA", "default")
    head = _report.header(torch.device("cpu"), ["benchmarks/x.py"])
    assert head["cpu_isa"] == "default", head
    assert "forced by FASTATTN_CPU_ISA=default" in head["cpu_isa_detail"]
    assert head["isa_env"]["FASTATTN_CPU_ISA"] == "default"
    assert "fastattn default kernels" in _report.hardware(head)
