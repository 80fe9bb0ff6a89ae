"""Build and load fastattn's C++/CUDA extension libraries: the one place that knows about nvcc.

Three kinds of library, each registering ops in the ``fastattn`` torch namespace:

* ``"cuda"``: ``csrc/bindings.cpp`` + ``csrc/cuda/*.cu`` compiled with nvcc, for CUDA tensors.
* ``"cuda_emulate"``: the same sources compiled as host C++ with ``FASTATTN_EMULATE`` (the kernels run
  on CPU tensors through the emulator in ``csrc/emulate``); chosen by ``FASTATTN_CUDA_EMULATE=1``,
  see :func:`cuda_kind`. It registers the same op names as ``"cuda"``, so a process loads one of them.
* ``"cpu"``: ``csrc/cpu/*.cpp`` with the plain C++ compiler (no CUDA toolkit), for the CPU backend.

Libraries are JIT-built with ``torch.utils.cpp_extension.load`` and ninja into a per-user cache
(``$FASTATTN_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastattn/ext``, else ``~/.cache/fastattn/ext``), one folder
per kind and key; the key hashes the sources, the torch version, the compiler flags and, for ``"cuda"``,
the arch list. The build runs in a child Python process so that its full compiler output (ptxas's
resource report included) is captured into ``build.log`` and nothing is loaded into the caller as a
side effect; :func:`load` then loads the library with ``torch.ops.load_library``. A library built ahead
of time by ``setup.py`` is used instead when its recorded key matches.

A damaged cache never reaches ``dlopen``: a truncated library (a build killed mid-link, a full disk) is
mapped past its end and kills the process with SIGBUS. So ninja links in a staging folder, the library
is renamed into place only when complete, ``build.json`` beside it records its size and sha256 (and is
itself written by rename), and both are checked before every load; a library that disagrees is rebuilt,
with one line on stderr saying why.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from ._sources import DEFAULT_ARCHS, KINDS, check_kind, csrc_root, gencode_flags, parse_arch_list
from ._sources import sources as _kind_sources
from ._sources import sources_hash as _sources_hash
from ._toolchain import cuda_include_paths, find_cuda_home

__all__ = [
    "KINDS",
    "build",
    "load",
    "library_path",
    "unavailable_reason",
    "cuda_kind",
    "arch_list",
    "find_cuda_home",
    "cuda_include_paths",
    "build_log",
    "cached_library",
]

# (kind, explicit sources or None) -> path of the library loaded into this process
_loaded: dict[tuple[str, Optional[tuple[str, ...]]], str] = {}


# ----------------------------------------------------------------------------------------------
# Toolchain discovery
# ----------------------------------------------------------------------------------------------
def _cxx() -> Optional[str]:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def unavailable_reason(kind: str) -> Optional[str]:
    """Why ``kind`` cannot be built here (with what to install or set), or None if it can."""
    check_kind(kind)
    # (torch.utils.cpp_extension is imported only in the build's child process: importing it here would
    # warn about CUDA_HOME before find_cuda_home() has had its say.)
    if shutil.which("ninja") is None and not (Path(sys.executable).parent / "ninja").is_file():
        return "ninja is not installed: pip install ninja"
    if _cxx() is None:
        return "no C++ compiler found ($CXX, c++, g++ or clang++): install one (e.g. apt-get install g++) or set CXX"
    if kind == "cpu":
        if not _kind_sources("cpu"):
            return f"no CPU backend sources in {csrc_root() / 'cpu'}"
        return None
    if kind == "cuda_emulate":
        if not sys.platform.startswith("linux"):
            return f"the CUDA emulator needs Linux (ucontext fibers), this is {sys.platform}"
        return None
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build: install a CUDA build of torch to build the CUDA backend"
    if find_cuda_home() is None:
        return (
            "nvcc not found: install the CUDA toolkit (nvcc) and put its bin/ on PATH, "
            "or set CUDA_HOME to the toolkit folder (the one holding bin/nvcc and lib64/libcudart.so)"
        )
    return None


# ----------------------------------------------------------------------------------------------
# Keys, folders, flags
# ----------------------------------------------------------------------------------------------
def arch_list(arch: Optional[str | Sequence[str]] = None) -> list[str]:
    """CUDA archs to build for: ``arch`` if given, else the visible GPUs', else ``$TORCH_CUDA_ARCH_LIST``,
    else sm_80 and sm_90."""
    if arch:
        return parse_arch_list(arch if isinstance(arch, str) else ";".join(arch))
    import torch

    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return [f"{major}.{minor}" for major, minor in sorted(caps)]
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return parse_arch_list(env)
    return list(DEFAULT_ARCHS)


def _cache_root() -> Path:
    env = os.environ.get("FASTATTN_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fastattn" / "ext"


class _Spec:
    """Everything one build needs, and the key derived from it."""

    def __init__(self, kind: str, arch=None, sources: Optional[Sequence[str | os.PathLike]] = None, extra_cflags=()):
        check_kind(kind)
        import torch

        self.kind = kind
        self.root = csrc_root()
        given = tuple(Path(s).resolve() for s in sources) if sources else ()
        self.sources = list(given) if given else _kind_sources(kind, self.root)
        self.archs = arch_list(arch) if kind == "cuda" else []
        include = [str(self.root)]
        self.cflags = ["-O3"]
        self.cuda_cflags: list[str] = []
        self.ldflags: list[str] = []
        if kind == "cuda":
            include += cuda_include_paths()
            self.cuda_cflags = ["-O3", "-std=c++17", "-lineinfo", "-Xptxas=-v", *gencode_flags(self.archs)]
        elif kind == "cuda_emulate":
            self.cflags = ["-O2", "-DFASTATTN_EMULATE"]
        else:
            self.cflags = ["-O3", "-fopenmp", *os.environ.get("FASTATTN_CPU_CFLAGS", "").split()]
            self.ldflags = ["-fopenmp"]
        self.cflags += list(extra_cflags)
        self.include = include
        h = hashlib.sha256()
        for part in (
            kind,
            torch.__version__,
            ";".join(self.archs),
            " ".join(self.cflags + self.cuda_cflags + self.ldflags + include),
            _sources_hash(kind, self.root, given),
            str(self.root),
            os.environ.get("CXX", ""),
        ):
            h.update(part.encode() + b"\0")
        self.key = h.hexdigest()[:16]
        self.name = f"fastattn_{kind}_{self.key[:8]}"
        self.build_dir = _cache_root() / f"{kind}-{self.key}"
        self.library = self.build_dir / f"{self.name}.so"
        self.stamp = self.build_dir / "build.json"
        self.staging = self.build_dir / "ninja"  # ninja's objects and its link output, never loaded from

    def damage(self) -> Optional[str]:
        """Why the cached library cannot be loaded (not built, or damaged), or None when it checks out."""
        return _damage(self.library, self.stamp)

    def built(self) -> bool:
        return self.damage() is None


def _file_record(path: Path) -> dict:
    """``{"size", "sha256"}`` of a file: what a library's record holds and what is checked before loading it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


NOT_BUILT = "not built yet"


def _damage(library: Path, record: Path) -> Optional[str]:
    """Compares a library with its record (JSON with ``size`` and ``sha256``); None when they agree."""
    if not record.is_file() and not library.is_file():
        return NOT_BUILT
    try:
        info = json.loads(record.read_text())
    except (OSError, ValueError):
        return f"its record {record.name} is missing or unreadable"
    try:
        size, digest = int(info["size"]), str(info["sha256"])
    except (KeyError, TypeError, ValueError):
        return f"its record {record.name} holds no size and sha256 (an older fastattn's build)"
    try:
        actual = _file_record(library)
    except OSError:
        return f"the library {library.name} is missing"
    if actual["size"] != size:
        return f"{library.name} is {actual['size']} bytes, {size} recorded"
    if actual["sha256"] != digest:
        return f"{library.name}'s sha256 differs from the one recorded"
    return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _aot_library(kind: str) -> Optional[Path]:
    """A library ``setup.py`` built ahead of time, if its recorded sources hash and torch version match."""
    if kind != "cuda":
        return None
    meta = Path(__file__).with_name("_aot.json")
    if not meta.is_file():
        return None
    try:
        info = json.loads(meta.read_text())
        import torch

        if info.get("torch") != torch.__version__ or info.get("sources_hash") != _sources_hash("cuda"):
            return None
        lib = Path(__file__).with_name(info["library"])
        return lib if _damage(lib, meta) is None else None
    except (OSError, ValueError, KeyError):
        return None


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive lock per build folder, so parallel processes (pytest -n) build once."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _emulate_wrappers(spec: _Spec) -> list[str]:
    """For ``cuda_emulate``: one ``.cpp`` per ``.cu`` that includes it (cpp_extension sends ``.cu`` to nvcc)."""
    out = []
    wrap_dir = spec.build_dir / "emulate_src"
    wrap_dir.mkdir(parents=True, exist_ok=True)
    for src in spec.sources:
        if src.suffix == ".cu":
            wrapper = wrap_dir / f"{src.stem}.cu.cpp"
            header = "// Generated: the CUDA kernel source compiled as host C++ for the emulator.\n"
            wrapper.write_text(f'{header}#include "{src}"\n')
            out.append(str(wrapper))
        else:
            out.append(str(src))
    return out


def _run_build(spec: _Spec, verbose: bool) -> None:
    sources = _emulate_wrappers(spec) if spec.kind == "cuda_emulate" else [str(s) for s in spec.sources]
    if not sources:
        raise RuntimeError(f"fastattn: no sources to build for kind {spec.kind!r} (looked in {spec.root})")
    job = {
        "name": spec.name,
        "sources": sources,
        "extra_cflags": spec.cflags,
        "extra_cuda_cflags": spec.cuda_cflags,
        "extra_ldflags": spec.ldflags,
        "extra_include_paths": spec.include,
        "build_directory": str(spec.staging),
        "with_cuda": spec.kind == "cuda",
    }
    spec.staging.mkdir(parents=True, exist_ok=True)
    staged = spec.staging / spec.library.name
    staged.unlink(missing_ok=True)  # always relink: ninja would take a truncated output for an up-to-date one
    env = dict(os.environ)
    env.setdefault("MAX_JOBS", str(max(1, os.cpu_count() or 1)))
    if spec.kind == "cuda":
        env["CUDA_HOME"] = find_cuda_home() or env.get("CUDA_HOME", "")
    start = time.perf_counter()
    proc = subprocess.run(  # the worker runs as a script: it needs torch, not fastattn's other modules
        [sys.executable, str(Path(__file__).with_name("_worker.py"))],
        input=json.dumps(job),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    seconds = time.perf_counter() - start
    (spec.build_dir / "build.log").write_text(proc.stdout)
    if verbose:
        sys.stdout.write(proc.stdout)
    if proc.returncode != 0 or not staged.is_file():
        tail = "\n".join(proc.stdout.splitlines()[-40:])
        raise RuntimeError(
            f"fastattn: building the {spec.kind} extension failed (log: {spec.build_dir / 'build.log'}):\n{tail}"
        )
    record = _file_record(staged)
    spec.stamp.unlink(missing_ok=True)  # from here until the new record lands, the old one cannot vouch
    os.replace(staged, spec.library)
    meta = {"kind": spec.kind, "library": spec.library.name, "archs": spec.archs, "seconds": round(seconds, 1)}
    _write_atomic(spec.stamp, json.dumps({**meta, **record}))
    _prune(spec)


_KEEP_BUILDS = 4  # completed builds kept per kind: every source edit makes a new key


def _prune(spec: _Spec) -> None:
    """Delete the oldest completed builds of ``spec.kind`` beyond :data:`_KEEP_BUILDS` (never in-progress ones).

    A library another process has loaded stays usable after its file is unlinked (Linux keeps the mapping).
    """
    done = []
    for folder in spec.build_dir.parent.glob(f"{spec.kind}-*"):  # ("cuda-*" does not match "cuda_emulate-*")
        try:
            if folder != spec.build_dir:
                done.append(((folder / "build.json").stat().st_mtime, folder))
        except OSError:  # in progress (no build.json yet), or being deleted by another process
            continue
    for _, old in sorted(done, reverse=True)[_KEEP_BUILDS - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def build(
    kind: str = "cuda",
    verbose: bool = False,
    arch: Optional[str | Sequence[str]] = None,
    *,
    sources: Optional[Sequence[str | os.PathLike]] = None,
    force: bool = False,
) -> str:
    """Build the ``kind`` library if it is not cached, and return its path (it is not loaded).

    ``verbose`` echoes the compiler output (for ``"cuda"``: ptxas's registers/spills/shared memory per
    kernel). ``arch`` overrides :func:`arch_list`. ``sources`` overrides the source list (tests).
    Raises RuntimeError with :func:`unavailable_reason`'s text when the toolchain is missing.
    """
    reason = unavailable_reason(kind) if not (kind == "cpu" and sources) else None
    if reason:
        raise RuntimeError(f"fastattn: cannot build the {kind} extension: {reason}")
    if kind == "cuda" and arch is None and sources is None and not force:
        aot = _aot_library(kind)
        if aot is not None:
            return str(aot)
    spec = _Spec(kind, arch, sources)
    with _locked(spec.build_dir):
        damage = spec.damage()
        if force or damage is not None:
            archs = f" for {', '.join('sm_' + a.replace('.', '') for a in spec.archs)}" if spec.archs else ""
            if damage in (None, NOT_BUILT):
                line = f"fastattn: building the {kind} extension{archs} (first use; cached in {spec.build_dir})"
            else:
                line = f"fastattn: the cached {kind} extension in {spec.build_dir} is damaged ({damage}); rebuilding it"
            print(line, file=sys.stderr, flush=True)
            if force:  # ninja would find its objects up to date and only relink: no compiler output in build.log
                shutil.rmtree(spec.staging, ignore_errors=True)
            _run_build(spec, verbose)
        elif verbose and (spec.build_dir / "build.log").is_file():
            sys.stdout.write((spec.build_dir / "build.log").read_text())
    return str(spec.library)


def build_log(kind: str = "cuda", arch=None, sources=None) -> str:
    """The captured compiler output of the cached build (ptxas's resource report for ``"cuda"``).

    Keyed by the current sources: for the log of a library already in hand, read ``build.log`` beside it.
    """
    spec = _Spec(kind, arch, sources)
    log = spec.build_dir / "build.log"
    return log.read_text() if log.is_file() else ""


def library_path(kind: str = "cuda", arch=None, *, sources=None) -> str:
    """Path of the built library for ``kind`` (as :func:`load` would load it); FileNotFoundError if not built."""
    if (kind, None) in _loaded and arch is None and sources is None:
        return _loaded[(kind, None)]
    if kind == "cuda" and arch is None and sources is None:
        aot = _aot_library(kind)
        if aot is not None:
            return str(aot)
    spec = _Spec(kind, arch, sources)
    if not spec.built():
        raise FileNotFoundError(
            f"fastattn: the {kind} extension is not built yet (expected {spec.library}); "
            f"run `fastattn build` or call fastattn._ext.load({kind!r})"
        )
    return str(spec.library)


def cached_library(kind: str) -> Optional[str]:
    """The library :func:`load` would load for ``kind`` if it is built and checks out, without building; else None.

    Lets a backend load an already built library when fastattn is imported, so that ``torch.compile`` finds
    its ops registered and never has to build or load anything while it traces.
    """
    if kind == "cuda":
        aot = _aot_library(kind)
        if aot is not None:
            return str(aot)
    spec = _Spec(kind)
    return str(spec.library) if spec.built() else None


def load(kind: str = "cuda", *, sources: Optional[Sequence[str | os.PathLike]] = None) -> str:
    """Build ``kind`` if needed (one line on stderr when it does), load it into torch, return its path."""
    check_kind(kind)
    key = (kind, tuple(str(Path(s).resolve()) for s in sources) if sources else None)
    if key in _loaded:
        return _loaded[key]
    other = {"cuda": "cuda_emulate", "cuda_emulate": "cuda"}.get(kind)
    if any(k == other for k, _ in _loaded):
        raise RuntimeError(
            f"fastattn: the {other} extension is already loaded in this process and registers the same ops as "
            f"{kind}; use one per process (FASTATTN_CUDA_EMULATE selects the emulated one)"
        )
    import torch

    path = build(kind, sources=sources)
    torch.ops.load_library(path)
    _loaded[key] = path
    return path


def cuda_kind() -> str:
    """``"cuda_emulate"`` when ``FASTATTN_CUDA_EMULATE=1`` (CUDA kernel source on CPU tensors), else ``"cuda"``."""
    return "cuda_emulate" if os.environ.get("FASTATTN_CUDA_EMULATE", "") not in ("", "0") else "cuda"
