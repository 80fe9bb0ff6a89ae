"""Where the extension's C++/CUDA sources are, which ones each build kind compiles, and their hash.

Standard library only, so that ``setup.py`` can use it before torch is importable.

The source table is a glob: every ``csrc/cuda/*.cu`` joins the ``cuda`` and ``cuda_emulate`` builds and
every ``csrc/cpu/*.cpp`` the ``cpu`` build, so adding a kernel file needs no change here.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Optional

KINDS = ("cuda", "cuda_emulate", "cpu")
DEFAULT_ARCHS = ("8.0", "9.0")


def csrc_root() -> Path:
    """The ``csrc`` folder: ``$FASTATTN_CSRC``, the copy installed inside the package, or the checkout's."""
    env = os.environ.get("FASTATTN_CSRC")
    if env:
        return Path(env).resolve()
    installed = Path(__file__).resolve().parent / "csrc"  # placed there by setup.py's build_py
    if (installed / "bindings.cpp").is_file():
        return installed
    return Path(__file__).resolve().parents[2] / "csrc"


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"fastattn._ext: kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")


def kernel_sources(root: Optional[Path] = None) -> list[Path]:
    """The CUDA kernel sources (``csrc/cuda/*.cu``), sorted."""
    return sorted((root or csrc_root()).glob("cuda/*.cu"))


def binding_sources(root: Optional[Path] = None) -> list[Path]:
    """The torch-facing files (``csrc/*.cpp``: ``bindings.cpp`` and one per op family), sorted."""
    return sorted((root or csrc_root()).glob("*.cpp"))


def sources(kind: str, root: Optional[Path] = None) -> list[Path]:
    """The translation units of a build kind (for ``cuda_emulate``, the .cu files are compiled as C++)."""
    check_kind(kind)
    root = root or csrc_root()
    if kind == "cuda":
        return [*binding_sources(root), *kernel_sources(root)]
    if kind == "cuda_emulate":
        return [*binding_sources(root), *sorted(root.glob("emulate/*.cpp")), *kernel_sources(root)]
    return sorted(root.glob("cpu/*.cpp"))


def hashed_files(kind: str, root: Optional[Path] = None, extra: tuple[Path, ...] = ()) -> list[Path]:
    """Every file whose content the build depends on: the sources and the headers beside them."""
    root = root or csrc_root()
    if extra:  # sources given explicitly (tests): they and the headers next to them, nothing else
        files = [h for p in extra for h in (p, *p.parent.glob("*.h")) if h.is_file()]
        return sorted({p.resolve() for p in files})
    if kind == "cpu":
        files = [p for p in root.glob("cpu/**/*") if p.is_file()]
    else:
        files = binding_sources(root)
        for sub in ("cuda", "emulate"):
            files += [p for p in (root / sub).glob("**/*") if p.is_file()]
    files += [p for p in root.glob("*.h") if p.is_file()]
    return sorted({p.resolve() for p in files})


def sources_hash(kind: str, root: Optional[Path] = None, extra: tuple[Path, ...] = ()) -> str:
    """sha256 over the (name, content) of :func:`hashed_files`."""
    root = (root or csrc_root()).resolve()
    h = hashlib.sha256()
    for p in hashed_files(kind, root, extra):
        name = str(p.relative_to(root)) if p.is_relative_to(root) else str(p)
        h.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


_ARCH_RE = re.compile(r"^(?:sm_|compute_)?(\d+)\.?(\d)?([a-z]?)(\+ptx)?$", re.IGNORECASE)


def parse_arch_list(text: str) -> list[str]:
    """``"8.0;9.0"``, ``"80,90"``, ``"sm_80 sm_90a"``, ``"8.0+PTX"`` -> ``["8.0", "9.0a", "8.0+PTX"]``."""
    out: list[str] = []
    for token in re.split(r"[;,\s]+", text.strip()):
        if not token:
            continue
        m = _ARCH_RE.match(token)
        if not m:
            raise ValueError(
                f"fastattn: cannot read CUDA arch {token!r} in {text!r}; write e.g. '8.0;9.0', '80,90' or 'sm_90'"
            )
        major, minor, suffix, ptx = m.groups()
        if minor is None:  # "80" -> 8.0, "100" -> 10.0
            major, minor = major[:-1], major[-1]
        arch = f"{int(major)}.{minor}{suffix.lower()}" + ("+PTX" if ptx else "")
        if arch not in out:
            out.append(arch)
    if not out:
        raise ValueError(f"fastattn: empty CUDA arch list {text!r}")
    return out


def gencode_flags(archs: list[str]) -> list[str]:
    """nvcc ``-gencode`` flags: SASS for each arch, plus PTX for those marked ``+PTX``."""
    flags = []
    for arch in archs:
        base = arch.removesuffix("+PTX")
        num = base.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags
