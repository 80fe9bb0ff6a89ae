"""Packaging of fastattn: the metadata lives in pyproject.toml; this file adds the C++/CUDA sources.

pip builds a package in an isolated environment that holds only the build requirements
(``setuptools``), not torch, so nothing here imports torch unless the ahead-of-time CUDA build runs.
A plain ``pip install .``, ``pip wheel .``, ``pip install -e .`` or ``python -m build`` therefore makes a
pure-Python package whose C++/CUDA libraries are JIT-built (and cached) on first use, or by
``fastattn build``:

* ``csrc/`` travels with every form: the sdist carries it (``MANIFEST.in``) and every non-editable
  build copies it into the package (``fastattn/_ext/csrc``), where the JIT build of an installed
  fastattn finds it. An editable install reads the checkout's own ``csrc/``.
* The ahead-of-time CUDA build (``fastattn/_ext/_cuda*.so`` from ``csrc/bindings.cpp`` + ``csrc/cuda/*.cu``,
  recorded in ``fastattn/_ext/_aot.json`` with its sources hash, size and sha256) runs when
  ``FASTATTN_BUILD_CUDA=1`` (then torch must be importable here, so pass ``--no-build-isolation``, and
  nvcc must exist: a missing one is an error, since the build was asked for), or, with the variable
  unset, automatically when torch is importable here, sees a GPU and nvcc is found. It never runs on
  a machine without a GPU unless asked: that is a long nvcc build of a library nothing there can run.
  ``FASTATTN_BUILD_CUDA=0`` (or the older ``FASTATTN_SKIP_CUDA_BUILD=1``) turns it off.
* ``FASTATTN_CUDA_ARCHS="8.0;9.0"``: the archs (default: the visible GPU's, else ``TORCH_CUDA_ARCH_LIST``,
  else 8.0 and 9.0). ``MAX_JOBS`` (default: the CPU count) sets ninja's parallel jobs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _standalone(name: str):
    """Import fastattn/_ext/<name>.py without importing fastattn (which needs torch)."""
    spec = importlib.util.spec_from_file_location(f"_fastattn_setup_{name}", ROOT / "fastattn" / "_ext" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _say(message: str) -> None:
    print(f"fastattn setup.py: {message}", file=sys.stderr, flush=True)


class BuildPyWithCsrc(build_py):
    """Also places csrc/ inside the built package, for the JIT build of an installed fastattn."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads the checkout's csrc/ in place
            return
        target = Path(self.build_lib) / "fastattn" / "_ext" / "csrc"
        shutil.copytree(
            ROOT / "csrc", target, ignore=shutil.ignore_patterns(".build", "*.o", "*.so"), dirs_exist_ok=True
        )


def _aot_requested() -> bool:
    """Whether to build the CUDA library now (see the module docstring for the rule)."""
    flag = os.environ.get("FASTATTN_BUILD_CUDA", "").strip()
    if os.environ.get("FASTATTN_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        flag = flag or "0"
    if flag not in ("", "0", "1"):
        raise RuntimeError(f"fastattn setup.py: FASTATTN_BUILD_CUDA: expected 0, 1 or unset, got {flag!r}")
    if flag == "0":
        return False
    if flag == "1":
        if importlib.util.find_spec("torch") is None:
            raise RuntimeError(
                "fastattn setup.py: FASTATTN_BUILD_CUDA=1 needs torch in the build environment; pip's build "
                "isolation hides it: pip install --no-build-isolation ..."
            )
        return True
    if importlib.util.find_spec("torch") is None:  # pip's isolated build: JIT build on first use
        return False
    import torch

    if not torch.cuda.is_available() or torch.version.cuda is None:
        _say("no CUDA GPU visible: no ahead-of-time CUDA build (FASTATTN_BUILD_CUDA=1 forces one)")
        return False
    if _standalone("_toolchain").find_cuda_home() is None:
        _say("a GPU is visible but nvcc is not found: the CUDA library will be JIT-built on first use")
        return False
    return True


def _file_record(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def _cuda_extension():
    """(ext_modules, cmdclass additions) for the AOT CUDA build, or ([], {}) when it does not run."""
    if not _aot_requested():
        return [], {}
    sources_mod = _standalone("_sources")
    toolchain = _standalone("_toolchain")
    cuda_home = toolchain.find_cuda_home()
    if cuda_home is None:
        raise RuntimeError(
            "fastattn setup.py: FASTATTN_BUILD_CUDA=1 but nvcc is not found; install the CUDA toolkit or set "
            "CUDA_HOME, or leave FASTATTN_BUILD_CUDA unset (the extension is then built on first use)"
        )
    os.environ["CUDA_HOME"] = cuda_home  # before torch's cpp_extension reads it
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs_text = os.environ.get("FASTATTN_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")
    if torch.cuda.is_available() and not os.environ.get("FASTATTN_CUDA_ARCHS"):
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        archs_text = ";".join(f"{a}.{b}" for a, b in caps)
    archs = sources_mod.parse_arch_list(archs_text) if archs_text else list(sources_mod.DEFAULT_ARCHS)
    csrc = ROOT / "csrc"
    sources = [str(p.relative_to(ROOT)) for p in sources_mod.sources("cuda", csrc)]
    ext = CUDAExtension(
        name="fastattn._ext._cuda",
        sources=sources,
        include_dirs=[str(csrc), *toolchain.cuda_include_paths()],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-std=c++17", "-lineinfo", *sources_mod.gencode_flags(archs)],
        },
    )
    sources_hash = sources_mod.sources_hash("cuda", csrc)

    class BuildExtRecordingKey(BuildExtension):
        """Writes _aot.json beside the library: the key under which fastattn._ext trusts it, and its size and hash."""

        def run(self):
            super().run()
            library = Path(self.get_ext_fullpath(ext.name))
            meta = {
                "library": library.name,
                "sources_hash": sources_hash,
                "torch": torch.__version__,
                "archs": archs,
                **_file_record(library),
            }
            library.with_name("_aot.json").write_text(json.dumps(meta))

    return [ext], {"build_ext": BuildExtRecordingKey.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithCsrc, **cmdclass})
