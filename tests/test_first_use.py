"""What a new user meets first: a quiet import, a build command that builds what the machine runs,
clear errors for a missing optional dependency and for tensors in the wrong layout."""

from __future__ import annotations

import argparse
import builtins
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastattn
from fastattn._ext import cli as build_cli
from fastattn._ext import find_cuda_home, unavailable_reason

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only machine's import")
@pytest.mark.skipif(unavailable_reason("cpu") is not None, reason=str(unavailable_reason("cpu")))
def test_import_and_first_cpu_call_print_nothing_about_cuda():
    """torch's cpp_extension warns 'No CUDA runtime is found' when imported where CUDA_HOME exists and no GPU
    does; nothing on fastattn's import or CPU path may import it in the user's process."""
    from fastattn.backends import cpu

    cpu.load()  # built in the cache: the child's call must not build
    code = """
        import sys, torch, fastattn
        q = torch.randn(1, 2, 16, 8)
        fastattn.scaled_dot_product_attention(q, q, q, dropout_p=0.1)
        assert "torch.utils.cpp_extension" not in sys.modules
        print("ok")
    """
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTATTN_CUDA_EMULATE")}
    env["CUDA_HOME"] = find_cuda_home() or env.get("CUDA_HOME", "")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok" and proc.stderr == "", proc.stderr


def test_build_defaults_to_what_the_machine_runs(monkeypatch):
    monkeypatch.delenv("FASTATTN_CUDA_EMULATE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert build_cli.default_kind() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert build_cli.default_kind() == "cuda"
    monkeypatch.setenv("FASTATTN_CUDA_EMULATE", "1")
    assert build_cli.default_kind() == "cuda_emulate"


def test_build_help_documents_kind():
    parser = argparse.ArgumentParser(prog="fastattn")
    build_cli.add_build_parser(parser.add_subparsers(dest="command"))
    text = parser._subparsers._group_actions[0].choices["build"].format_help()
    assert "--kind {cuda,cuda_emulate,cpu}" in text and "else cpu" in text


def test_transformers_register_without_transformers_says_how_to_install(monkeypatch):
    import fastattn.integrations.transformers as fa_hf

    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(ImportError, match=r"transformers is not installed; pip install 'transformers>=5.23,<6'"):
        fa_hf.register()


@pytest.mark.parametrize(
    "shapes,kw,names",
    [
        # (batch, seqlen, heads, head_dim) passed for all three: a decode step, and GQA.
        (((1, 64, 8, 32), (1, 4, 8, 32), (1, 4, 8, 32)), {}, "query.transpose(-3, -2), key.transpose(-3, -2)"),
        (((1, 100, 8, 32), (1, 120, 2, 32), (1, 120, 2, 32)), {"enable_gqa": True}, "value.transpose(-3, -2)"),
        # Only value in the wrong layout.
        (((1, 8, 100, 32), (1, 8, 120, 32), (1, 120, 8, 32)), {}, "so pass value.transpose(-3, -2)"),
    ],
)
def test_transposed_layout_gets_a_hint(shapes, kw, names):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=r"look like \(batch, seqlen, heads, head_dim\)") as info:
        fastattn.scaled_dot_product_attention(q, k, v, **kw)
    assert names in str(info.value)


@pytest.mark.parametrize(
    "shapes",
    [
        ((1, 8, 100, 32), (1, 8, 120, 32), (1, 8, 121, 32)),  # a real length mismatch
        ((1, 8, 100, 32), (1, 6, 100, 32), (1, 6, 100, 32)),  # a real head-count mismatch
    ],
)
def test_real_mismatches_get_no_layout_hint(shapes):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError) as info:
        fastattn.scaled_dot_product_attention(q, k, v)
    assert "transpose" not in str(info.value)
