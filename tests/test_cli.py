"""`fastattn info` tells the truth about this machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

import fastattn
from fastattn.backends import registry


def _info() -> str:
    script = Path(sys.executable).parent / "fastattn"
    cmd = [str(script), "info"] if script.exists() else [sys.executable, "-m", "fastattn.cli", "info"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def test_console_script_is_installed():
    assert (Path(sys.executable).parent / "fastattn").exists(), "run `pip install -e .` (make test does)"


def test_info_reports_versions_and_every_backend():
    text = _info()
    assert f"torch              {torch.__version__}" in text
    assert f"fastattn           {fastattn.__version__}" in text
    gpu_line = next(line for line in text.splitlines() if line.startswith("GPU"))
    assert ("none visible" in gpu_line) == (not torch.cuda.is_available())
    for name in registry.names():
        backend = registry.get(name)
        reason = backend.unavailable_reason()
        section = text.split("backends:", 1)[1].splitlines()
        line = next(line for line in section if line.strip().startswith(name + " "))
        if reason is None:
            assert line.strip().endswith("available") and "unavailable" not in line
        else:
            assert "unavailable" in line


def test_info_runs_in_process(capsys):
    from fastattn.cli import main

    assert main(["info"]) == 0
    assert "reference" in capsys.readouterr().out


def test_info_lists_the_graph_backends():
    from fastattn import graph

    section = _info().split("graph backends", 1)[1].split("slow paths", 1)[0]
    for name in graph.backend_names():
        reason = graph.get(name).unavailable_reason()
        line = next(line for line in section.splitlines() if line.strip().startswith(name + " "))
        assert ("unavailable" in line) == (reason is not None)
