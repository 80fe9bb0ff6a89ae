"""Where the CUDA toolkit and the CUDA library headers are. Standard library only (``setup.py`` uses it).

Kept apart from ``fastattn._ext`` so that ``setup.py`` can find nvcc before torch's cpp_extension reads
``CUDA_HOME`` at import time.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional


def _has_cudart(home: Path) -> bool:
    return any((home / lib).glob("libcudart.so*") for lib in ("lib64", "lib", "targets/x86_64-linux/lib"))


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit folder: ``$CUDA_HOME``/``$CUDA_PATH``, else the toolkit behind ``nvcc`` on PATH.

    ``nvcc`` may be a wrapper script (``exec /opt/cuda-13.0/bin/nvcc "$@"``); then the toolkit is the
    one the script runs, not the wrapper's parent (where torch would look for ``-lcudart`` and fail).
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value and (Path(value) / "bin" / "nvcc").is_file():
            return str(Path(value).resolve())
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        real = Path(os.path.realpath(nvcc))
        try:
            head = real.read_bytes()[:4096]
        except OSError:
            head = b""
        if head.startswith(b"#!"):  # a wrapper script: find the nvcc it runs
            for m in re.finditer(rb"(/[^\s\"'$;]+/bin/nvcc)\b", head):
                target = Path(os.path.realpath(m.group(1).decode()))
                if target.is_file() and target != real:
                    candidates.append(target.parent.parent)
        candidates.append(real.parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "bin" / "nvcc").is_file() and _has_cudart(home):
            return str(home.resolve())
    return None


def cuda_include_paths() -> list[str]:
    """Headers of the CUDA libraries (cublas, cusparse...) that torch's CUDA headers include.

    A minimal toolkit lacks them; pip's ``nvidia-*`` packages (``nvidia/cu13/include`` and older
    per-library layouts) have them.
    """
    try:
        import nvidia  # the namespace package of the nvidia-* wheels torch depends on
    except ImportError:
        return []
    bases = [Path(p) for p in getattr(nvidia, "__path__", [])]
    paths = [str(inc) for base in bases for inc in sorted(base.glob("cu[0-9]*/include")) if inc.is_dir()]
    if not paths:  # older wheels: one folder per library
        libs = ("cuda_runtime", "cublas", "cusparse", "cusolver", "cufft", "curand", "cuda_nvrtc")
        paths = [str(base / lib / "include") for base in bases for lib in libs if (base / lib / "include").is_dir()]
    return paths
