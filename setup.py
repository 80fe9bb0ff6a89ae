"""Ahead-of-time build of fastattn's CUDA extension; the package metadata lives in pyproject.toml.

* ``pip install .`` (with torch installed and ``--no-build-isolation``) builds ``fastattn/_ext/_cuda*.so``
  from ``csrc/bindings.cpp`` + ``csrc/cuda/*.cu`` with nvcc, the same sources the JIT build
  (``fastattn build``) uses, and records their hash in ``fastattn/_ext/_aot.json`` so that
  ``fastattn._ext.load("cuda")`` uses this library only while it matches the installed sources.
* ``FASTATTN_SKIP_CUDA_BUILD=1``: a pure-Python install (the extension is then JIT-built on first use).
* ``FASTATTN_CUDA_ARCHS="8.0;9.0"``: the archs (default: the visible GPU's, else ``TORCH_CUDA_ARCH_LIST``,
  else 8.0 and 9.0). ``MAX_JOBS`` (default: the CPU count) sets ninja's parallel jobs.
* Every install copies ``csrc/`` into the package (``fastattn/_ext/csrc``), so that a non-editable
  install can JIT-build the ``cuda``, ``cuda_emulate`` and ``cpu`` libraries.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _standalone(name: str):
    """Import fastattn/_ext/<name>.py without importing fastattn (which needs its dependencies)."""
    spec = importlib.util.spec_from_file_location(f"_fastattn_setup_{name}", ROOT / "fastattn" / "_ext" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithCsrc(build_py):
    """Also places csrc/ inside the built package, for the JIT build of an installed fastattn."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "fastattn" / "_ext" / "csrc"
        shutil.copytree(ROOT / "csrc", target, ignore=shutil.ignore_patterns(".build", "*.o"), dirs_exist_ok=True)


def _cuda_extension():
    """(ext_modules, cmdclass additions) for the AOT CUDA build, or ([], {}) when skipped."""
    if os.environ.get("FASTATTN_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return [], {}
    sources_mod = _standalone("_sources")
    toolchain = _standalone("_toolchain")
    cuda_home = toolchain.find_cuda_home()
    if cuda_home is None:
        raise RuntimeError(
            "fastattn setup.py: nvcc not found; install the CUDA toolkit or set CUDA_HOME, or set "
            "FASTATTN_SKIP_CUDA_BUILD=1 for a pure-Python install (the extension is then built on first use)"
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
        """Writes _aot.json beside the library: the key under which fastattn._ext trusts it."""

        def run(self):
            super().run()
            library = Path(self.get_ext_fullpath(ext.name))
            meta = {"library": library.name, "sources_hash": sources_hash, "torch": torch.__version__, "archs": archs}
            library.with_name("_aot.json").write_text(json.dumps(meta))

    return [ext], {"build_ext": BuildExtRecordingKey.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithCsrc, **cmdclass})
