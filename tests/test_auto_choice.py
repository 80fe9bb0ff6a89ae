"""The automatic backend choice: never silently slow, and traceable by ``torch.compile`` from a cold start."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import fastattn
from fastattn._ext import unavailable_reason
from fastattn.backends import cpu as cpu_backend
from fastattn.backends import registry
from fastattn.backends.registry import SlowPathWarning

ROOT = Path(__file__).resolve().parents[1]
needs_cpu = pytest.mark.skipif(unavailable_reason("cpu") is not None, reason=str(unavailable_reason("cpu")))


@pytest.fixture
def auto_env(monkeypatch):
    """The automatic choice as a user on a CPU machine meets it (the test session sets TRITON_INTERPRET=1)."""
    for var in ("TRITON_INTERPRET", "FASTATTN_CUDA_EMULATE", "FASTATTN_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(registry, "_WARNED", set())


@needs_cpu
def test_slow_path_warns_once_naming_the_reason_and_the_fix(auto_env):
    cpu_backend.load()
    q = torch.randn(1, 2, 16, 8, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            fastattn.scaled_dot_product_attention(q, q, q)
        fastattn.scaled_dot_product_attention(q, q, q, backend="reference")  # chosen knowingly: silent
        fastattn.scaled_dot_product_attention(q.float(), q.float(), q.float())  # the fused cpu backend: silent
    slow = [w for w in caught if issubclass(w.category, SlowPathWarning)]
    assert len(slow) == 1, [str(w.message) for w in slow]
    text = str(slow[0].message)
    assert "slow reference backend" in text
    assert "cpu: dtype torch.float64 is not supported (float32, bfloat16, float16)" in text  # the reason
    assert ".float() or .bfloat16() or .half()" in text and "backend='reference'" in text  # the fixes
    assert slow[0].filename == __file__  # points at the caller's line


@needs_cpu
def test_dropout_and_supported_dtypes_take_the_fused_backend_without_warning(auto_env):
    cpu_backend.load()
    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPathWarning)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = q.detach().to(dtype).requires_grad_()
            fastattn.scaled_dot_product_attention(x, x, x, dropout_p=0.1).sum().backward()


def test_info_lists_the_slow_paths():
    out = subprocess.run(
        [sys.executable, "-c", "from fastattn.cli import main; main(['info'])"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    section = out.split("slow paths:", 1)[1]
    for name in registry.names():
        for case in registry.get(name).slow_cases:
            assert f"{name:10} {case}" in section
    assert "cpu        CPU tensors in float64: cast them to float32" in section


_COMPILE_CHILD = """
    import warnings
    import torch
    from torch._dynamo.utils import counters
    import fastattn

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.1, batch_first=True)
    fastattn.replace_attention(layer).train()
    x = torch.randn(2, 50, 64)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # no eager call before
    with warnings.catch_warnings(record=True) as caught, torch.profiler.profile() as prof:
        warnings.simplefilter("always")
        compiled(x).square().mean().backward()
    ops = {e.key for e in prof.key_averages() if e.key.startswith("fastattn::")}
    slow = [str(w.message) for w in caught if "slow reference backend" in str(w.message)]
    print("graph_breaks", sum(counters["graph_break"].values()))
    print("ops", ",".join(sorted(ops)))
    print("slow", len(slow), slow[0] if slow else "")
"""


def _compile_in_fresh_process(env_update: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTATTN_CUDA_EMULATE")}
    env.update(env_update)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_COMPILE_CHILD)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    return {**lines, "stderr": proc.stderr}


@needs_cpu
def test_compile_fullgraph_with_dropout_in_a_fresh_process():
    """A cold process (the library built on disk, no eager call) compiles a training layer with dropout in one
    graph and runs fastattn's fused CPU kernels, forward and backward."""
    cpu_backend.load()  # built in the cache, as any earlier use leaves it; the child process starts cold
    got = _compile_in_fresh_process({})
    assert got["graph_breaks"] == "0"
    assert {"fastattn::cpu_attn_fwd", "fastattn::cpu_attn_bwd"} <= set(got["ops"].split(",")), got["ops"]
    assert got["slow"].startswith("0"), got["slow"]


@needs_cpu
def test_compile_before_the_library_is_built_falls_back_in_one_graph_and_says_so(tmp_path):
    """Nothing can be built while torch.compile traces: the call runs on the reference backend, still in one
    graph, and the slow-path warning names the fix."""
    got = _compile_in_fresh_process({"FASTATTN_CACHE_DIR": str(tmp_path)})
    assert got["graph_breaks"] == "0"
    assert "fastattn::cpu_attn_fwd" not in got["ops"] and "fastattn::reference_fwd" in got["ops"], got["ops"]
    assert got["slow"].startswith("1 ") and "fastattn build --kind cpu" in got["slow"], got["slow"]
    assert "building the cpu extension" not in got["stderr"]
