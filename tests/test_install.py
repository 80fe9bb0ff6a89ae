"""fastattn installs like any PyTorch package: sdist, wheel and editable installs with pip's build isolation.

Each test copies the checkout's files (tracked, and untracked ones git does not ignore) to a temporary
folder and installs from there into a fresh venv, as a user does, with build isolation (pip's isolated
build environment has setuptools and no torch). To stay quick, the fresh venvs reuse this interpreter's
torch through a ``.pth`` line naming a folder of links to its site-packages (fastattn itself left out),
instead of installing torch again; nothing builds CUDA.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _git_files() -> list[str]:
    proc = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True
    )
    return [f for f in proc.stdout.splitlines() if (ROOT / f).is_file()] if proc.returncode == 0 else []


FILES = _git_files()
CSRC = sorted(f for f in FILES if f.startswith("csrc/"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FILES, reason="needs a git checkout (the files to package)"),
    pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler"),
]


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _env(nvcc: bool) -> dict:
    """The environment of a user's shell; without nvcc: no CUDA toolkit on PATH and no CUDA_HOME."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "TRITON_INTERPRET", "FASTATTN_CUDA_EMULATE", "FASTATTN_BACKEND")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("FASTATTN_BUILD")}
    if not nvcc:
        env.pop("CUDA_HOME", None)
        env.pop("CUDA_PATH", None)
        env["PATH"] = os.pathsep.join(
            p for p in env.get("PATH", "").split(os.pathsep) if p and not (Path(p) / "nvcc").exists()
        )
    return env


@pytest.fixture(scope="module")
def torch_site(tmp_path_factory) -> Path:
    """Links to this interpreter's site-packages entries, fastattn's own (and .pth hooks) left out."""
    site = tmp_path_factory.mktemp("torch_site")
    seen = set()
    for key in ("purelib", "platlib"):
        base = Path(sysconfig.get_paths()[key])
        for entry in base.iterdir() if base.is_dir() else ():
            name = entry.name
            if name in seen or name.endswith(".pth") or "fastattn" in name.lower() or name.startswith("__editable__"):
                continue
            seen.add(name)
            (site / name).symlink_to(entry)
    return site


def _venv(path: Path, torch_site: Path) -> Path:
    """A fresh venv whose python sees this interpreter's torch; returns its python."""
    _run([sys.executable, "-m", "venv", str(path)], cwd=path.parent, env=_env(nvcc=True))
    python = path / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "_fastattn_test_torch.pth").write_text(f"{torch_site}\n")
    return python


def _source_copy(dest: Path) -> Path:
    """The checkout's files in a folder of their own, committed in a git repository (to see stray files)."""
    for f in FILES:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    env = _env(nvcc=True)
    git = ["git", "-c", "user.email=test@fastattn", "-c", "user.name=test"]
    _run(["git", "init", "-q"], cwd=dest, env=env)
    _run(git + ["add", "-A"], cwd=dest, env=env)
    _run(git + ["commit", "-q", "-m", "copy"], cwd=dest, env=env)
    return dest


_CALL = """
    import sys, torch, fastattn
    from fastattn._ext import _sources
    assert fastattn.__file__.startswith(sys.prefix), fastattn.__file__
    assert str(_sources.csrc_root()).startswith(sys.prefix), _sources.csrc_root()
    q, k, v = (torch.randn(2, 4, 100, 32) for _ in range(3))
    with torch.profiler.profile() as prof:
        out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)  # the automatic choice
    assert "fastattn::cpu_attn_fwd" in {e.key for e in prof.key_averages()}, "not the native cpu backend"
    want = fastattn.reference.attention(q.double(), k.double(), v.double(), is_causal=True)
    assert (out.double() - want).abs().max() < 1e-4
    print("cpu backend ok")
"""


def test_sdist_carries_csrc_and_installs_into_a_fresh_venv_without_nvcc(tmp_path, torch_site):
    src = _source_copy(tmp_path / "src")
    env = _env(nvcc=False)
    build = [sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path / "dist"), str(src)]
    _run(build, cwd=tmp_path, env=env)
    (sdist,) = (tmp_path / "dist").glob("fastattn-*.tar.gz")
    with tarfile.open(sdist) as tar:
        prefix = tar.getnames()[0].split("/")[0]
        packed = {n.removeprefix(prefix + "/") for n in tar.getnames()}
    missing = [f for f in CSRC if f not in packed]
    assert not missing, f"sources missing from the sdist: {missing}"

    python = _venv(tmp_path / "venv", torch_site)
    _run([str(python), "-m", "pip", "install", "-q", str(sdist)], cwd=tmp_path, env=env)
    env["FASTATTN_CACHE_DIR"] = str(tmp_path / "cache")
    (tmp_path / "elsewhere").mkdir()
    proc = _run([str(python), "-c", textwrap.dedent(_CALL)], cwd=tmp_path / "elsewhere", env=env)
    assert proc.stdout.strip().endswith("cpu backend ok")
    assert "fastattn: building the cpu extension" in proc.stderr  # JIT-built from the installed csrc copy


def test_wheel_with_nvcc_is_pure_python_and_editable_install_leaves_no_stray_file(tmp_path, torch_site):
    src = _source_copy(tmp_path / "src")
    env = _env(nvcc=True)  # nvcc may be on PATH here: without a GPU nothing is built ahead of time
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "whl"), str(src)],
         cwd=tmp_path, env=env, timeout=300)  # fmt: skip
    (wheel,) = (tmp_path / "whl").glob("fastattn-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    missing = [f for f in CSRC if f"fastattn/_ext/{f}" not in names]
    assert not missing, f"sources missing from the wheel: {missing}"
    assert "fastattn/_ext/_aot.json" not in names

    python = _venv(tmp_path / "venv", torch_site)
    _run([str(python), "-m", "pip", "install", "-q", "-e", str(src)], cwd=tmp_path, env=env)
    code = "import fastattn; print(fastattn.__file__)"
    out = _run([str(python), "-c", code], cwd=tmp_path, env=env).stdout.strip()
    assert out == str(src / "fastattn" / "__init__.py")
    stray = _run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=src, env=env).stdout
    assert stray == "", f"the editable install left files git does not ignore:\n{stray}"
