"""``fastattn compile-check``: compile the Triton kernels for sm_75/80/86/90 with no GPU and audit them.

Each variant (kernel × dtype × head dim × mask variant × autotune config) is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``. Registers and spill bytes
come from the cubin through the ``cuobjdump -res-usage`` that Triton ships (``STACK``/``LOCAL``
bytes: ptxas spills to the stack frame), shared memory from the compiled metadata (Triton's
dynamic shared memory, which ``triton.compile`` does not check against the arch), and the MMA
instruction from the PTX (``wgmma`` on sm_90, ``mma.sync`` on sm_80; Triton 3.8 emits FMA on
sm_75). Exit status 1 on a compile failure, any spill, or shared memory above the arch's limit.

By default: every autotune config of the forward and the one config (``bwd.bwd_config``) of each
backward kernel (dK/dV, dQ), for every dtype × head dim, with the simplest ("none") and the most
complex ("float+window+dropout") mask variant, and "window" for the backward; from sm_80 on, the two
packed builds (``PACKED_MASKS``) of the forward and both backward kernels at ``PACKED_DEFAULT_HEAD_DIMS``.
The backward is compiled as a real launch specialises it: unit last-dim and mask-key strides, 16-aligned
pointers and row strides. ``--packed``: the packed builds at every head dim. ``--all``: the full product of
mask kind × causal (plus dropout) per config, and the packed builds at every head dim.

The default set is not a cover of ``--all``: ptxas allocates each mask kind's build on its own, and a tile at
the 255-register cap can spill with causal while "none" and "window" do not. ``make gpu-preflight`` runs
``--all`` for sm_90 under the GPU image's Triton; after a change of the tiles, run ``--all`` for every arch
under both Tritons (on 2026-12-05 that found sm_75/80/86 builds spilling 8-72 bytes with causal, a mask or
dropout that the default set passes; sm_90 is clean under both).

Variants compile in worker processes (``--jobs``) that run
without ``TRITON_INTERPRET`` (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Optional

__all__ = [
    "BWD_KERNELS",
    "add_compile_check_parser",
    "run_compile_check",
    "variants",
    "compile_variant",
    "assess",
    "report",
    "main",
]

# Shared memory per block that a kernel may use (opt-in maximum), bytes.
SMEM_LIMIT = {90: 227 * 1024, 86: 99 * 1024, 80: 163 * 1024, 75: 64 * 1024}  # sm_86 stands for sm_86/sm_89
HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)
DTYPES = ("fp16", "bf16", "fp32")
# Mask variant → (MASK_KIND, HAS_LEFT, HAS_RIGHT, DROPOUT).
MASK_VARIANTS = {
    "none": (0, False, False, False),
    "causal": (0, False, True, False),
    "window": (0, True, True, False),
    "bool": (1, False, False, False),
    "bool+causal": (1, False, True, False),
    "float": (2, False, False, False),
    "float+causal": (2, False, True, False),
    "window+causal": (0, True, True, False),
    "dropout": (0, False, False, True),
    "float+window+dropout": (2, True, True, True),
}
# The variants (softcap, ALiBi, sinks, chunk) all on: a mask name with this suffix. Launches with any of them
# take the heavy tiles (``fwd.is_heavy``), so one build per arch, dtype and head dim, everything on with the
# heavy tiles, stands for every variant launch.
VARIANTS = "+variants"
MASK_VARIANTS["float+window+dropout" + VARIANTS] = MASK_VARIANTS["float+window+dropout"]
# Packed sequences (``varlen_attention``): the same kernels with ``PACKED`` (per-sequence starts and lengths read
# from the offsets, the tile schedule), no mask tensor, on the tiles the packed launches take (``packed=True`` in
# ``fwd.fwd_tiles``/``fwd_configs`` and ``bwd.bwd_config``: the dense choice, or tiles of their own where that
# spills with ``PACKED``). Two builds stand for every packed launch: the light tiles with a window (both band
# bounds), and the heavy ones with dropout and every variant. On the dense tiles 54 of the 380 packed builds
# (sm_80/86/90, every dtype and head dim) spilled 8-392 bytes under Triton 3.8, mostly the dK/dV pass, at every
# head dim; on the packed tables' tiles 0 of 380 (Triton 3.8). The default run (``make test``) compiles them from
# sm_80 on at ``PACKED_DEFAULT_HEAD_DIMS`` only: 128, the common head dim, whose tiles serve 80 and 96 too. At 64,
# 128 and 256 they were 164 builds and 204 s with 2 jobs here, which would take a cold ``make test`` (17.5 min)
# past its 20 minutes; the whole matrix, 380 builds, stays behind ``--packed`` (and ``--all``), to be run after a
# change of the packed tables.
PACKED = "+packed"
MASK_VARIANTS["window" + PACKED] = MASK_VARIANTS["window"]
MASK_VARIANTS["window+dropout" + VARIANTS + PACKED] = (0, True, True, True)
PACKED_MASKS = ("window" + PACKED, "window+dropout" + VARIANTS + PACKED)
PACKED_DEFAULT_HEAD_DIMS = (128,)
DEFAULT_MASKS = ("none", "float+window+dropout", "float+window+dropout+variants")
# The backward also compiles "window": its non-mask config serves causal and windows too.
BWD_DEFAULT_MASKS = ("none", "window", "float+window+dropout", "float+window+dropout+variants")
ALL_MASKS = ("none", "causal", "window", "bool", "bool+causal", "float", "float+causal", "dropout",
             "float+window+dropout")  # fmt: skip


@dataclass
class Variant:
    kernel: str
    arch: int
    dtype: str
    head_dim: int
    mask: str
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    @property
    def label(self) -> str:
        return (
            f"{self.dtype} d{self.head_dim} {self.mask} "
            f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}"
        )


@dataclass
class Result:
    variant: Variant
    ok: bool
    registers: Optional[int] = None
    spill_bytes: Optional[int] = None
    shared_bytes: Optional[int] = None
    mma: str = ""
    seconds: float = 0.0
    problems: list = field(default_factory=list)


def _torch_dtype(name: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def variants(
    archs: list[int], all_masks: bool, head_dims=HEAD_DIMS, dtypes=DTYPES, packed=False, masks=None
) -> list[Variant]:
    """Every variant to compile, per arch (bf16 needs sm_80+): dtype × head dim × mask × (the forward's
    autotune configs, the dK/dV and dQ kernels' one config each).

    ``masks`` (names of ``MASK_VARIANTS``): only these builds, forward and backward, and no decode builds; a
    packed name only from sm_80 on. Re-checking one family after a tile change then costs its builds alone."""
    from . import bwd, decode, fwd

    out = []
    for arch in archs:
        for dtype in dtypes:
            if dtype == "bf16" and arch < 80:
                continue  # the backend refuses bf16 below sm_80
            for d in head_dims:
                tdt = _torch_dtype(dtype)
                fwd_masks = _default(ALL_MASKS if all_masks else DEFAULT_MASKS, arch, d, packed or all_masks)
                bwd_masks = _default(ALL_MASKS if all_masks else BWD_DEFAULT_MASKS, arch, d, packed or all_masks)
                if masks is not None:
                    fwd_masks = bwd_masks = tuple(m for m in masks if arch >= 80 or not m.endswith(PACKED))
                for mask in fwd_masks:
                    kind, _, _, dropout = MASK_VARIANTS[mask]
                    var, packs = _has_variants(mask), mask.endswith(PACKED)
                    heavy = bool(kind) or dropout or var
                    bm, bn = fwd.fwd_tiles(d, d, tdt, arch, heavy, var, packs)
                    for w, s in fwd.fwd_configs(bm, d, d, tdt, arch, heavy, var, packs):
                        out.append(Variant("_attn_fwd_kernel", arch, dtype, d, mask, bm, bn, w, s))
                for mask in bwd_masks:
                    kind, _, _, dropout = MASK_VARIANTS[mask]
                    # None: no spill-free config, the backend runs the reference backward instead.
                    var = _has_variants(mask)
                    fam = bwd.VARIANTS_FAMILY if var else None
                    heavy = bool(kind) or dropout or var
                    config = bwd.bwd_config(d, d, tdt, arch, heavy, fam, mask.endswith(PACKED)) or ()
                    for name, (bm, bn, w, s) in zip(BWD_KERNELS, config):
                        out.append(Variant(name, arch, dtype, d, mask, bm, bn, w, s))
                for mask, br, bn, w, s in () if masks is not None else decode.compile_variants(tdt, d, arch):
                    out.append(Variant(DECODE_KERNEL, arch, dtype, d, mask, br, bn, w, s))
                merge = decode.merge_config(d)
                for mask in () if masks is not None else decode.MERGE_MASKS:
                    out.append(Variant(MERGE_KERNEL, arch, dtype, d, mask, 1, merge["BLOCK_DV"], merge["num_warps"], 1))
    return out


BWD_KERNELS = ("_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
DECODE_KERNEL = "_decode_kernel"  # kvcache_attention's split-KV kernel (decode.py), block_m = its row tile
MERGE_KERNEL = "_merge_kernel"  # its merge of the splits (decode.py), block_n = BLOCK_DV; no matmul


def _default(masks: tuple[str, ...], arch: int, head_dim: int, packed: bool) -> tuple[str, ...]:
    """The masks of an arch and head dim, with the packed builds from sm_80 on (sm_75's were never checked): at
    ``PACKED_DEFAULT_HEAD_DIMS``, or at every head dim when asked (``packed``)."""
    if arch >= 80 and (packed or head_dim in PACKED_DEFAULT_HEAD_DIMS):
        return masks + PACKED_MASKS
    return masks


def _has_variants(mask: str) -> bool:
    return mask.removesuffix(PACKED).endswith(VARIANTS)


def _score_flags(variants: bool) -> tuple[bool, ...]:
    """The kernels' ``SCORE`` flags of a build: every score rule on for a "+variants" build, else none."""
    from ._common import SCORE_ALL

    return SCORE_ALL if variants else tuple(False for _ in SCORE_ALL)


# The tile grids ``--candidates`` compiles for ``benchmarks/tune.py``: (BLOCK_M, BLOCK_N, warps, stages).
# The dK/dV pass keeps BLOCK_N keys resident and streams BLOCK_M query rows; the dQ pass the reverse.
CANDIDATE_GRIDS = {
    "_attn_fwd_kernel": [(m, n, w, s) for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)],
    "_attn_bwd_dkdv_kernel": [(m, n, w, s) for m in (16, 32, 64) for n in (64, 128) for w in (4, 8) for s in (1, 2)],
    "_attn_bwd_dq_kernel": [(m, n, w, s) for m in (64, 128) for n in (32, 64) for w in (4, 8) for s in (1, 2)],
}
# One compile stands for a tuning family: "window" (both band bounds) for none/causal/window, the heaviest
# variant for the mask family, so a candidate that is clean here is clean for every launch it serves.
CANDIDATE_MASKS = {False: "window", True: "float+window+dropout"}
CANDIDATE_HEAD_DIMS = (64, 128, 256)


def candidate_variants(archs: list[int], head_dims=CANDIDATE_HEAD_DIMS, dtypes=("bf16",)) -> list[Variant]:
    """Every tile of ``CANDIDATE_GRIDS`` per arch, dtype, head dim and heavy-or-not (fp16 shares bf16's)."""
    out = []
    for arch in archs:
        for dtype in dtypes:
            for d in head_dims:
                for mask in CANDIDATE_MASKS.values():
                    for kernel, grid in CANDIDATE_GRIDS.items():
                        out.extend(Variant(kernel, arch, dtype, d, mask, *cfg) for cfg in grid)
    return out


def write_candidates(results: list[Result], path: str) -> int:
    """The clean candidates as ``{"sm<arch>/<kernel>/<dtype>/d<dim>/<heavy|light>": [[m, n, w, s], ...]}``.

    Returns how many there are."""
    import triton

    table: dict[str, list] = {}
    if os.path.exists(path):  # a run for other head dims or archs adds to the file
        with open(path) as f:
            table = json.load(f)["candidates"]
    fresh: dict[str, list] = {}
    for r in results:
        if r.ok:
            v = r.variant
            kernel = {"_attn_fwd_kernel": "fwd", "_attn_bwd_dkdv_kernel": "dkdv", "_attn_bwd_dq_kernel": "dq"}[v.kernel]
            weight = "heavy" if v.mask == CANDIDATE_MASKS[True] else "light"
            key = f"sm{v.arch}/{kernel}/{v.dtype}/d{v.head_dim}/{weight}"
            fresh.setdefault(key, []).append([v.block_m, v.block_n, v.num_warps, v.num_stages])
    table.update(fresh)
    with open(path, "w") as f:
        json.dump({"triton": triton.__version__, "candidates": table}, f, indent=0, sort_keys=True)
    return sum(len(x) for x in fresh.values())


def _bwd_signature(v: Variant):
    """The backward kernels as a real launch specialises them: unit last-dim and mask-key strides
    (constexpr 1, what the JIT makes of a stride equal to 1), 16-aligned pointers and row strides."""
    from . import bwd
    from ._common import aot_signature

    fn = getattr(bwd, v.kernel)
    mask_kind, has_left, has_right, dropout = MASK_VARIANTS[v.mask]
    variants = _has_variants(v.mask)
    elt = "*" + v.dtype
    pointers = {
        **dict.fromkeys(("CuQ", "CuK", "Schedule"), "*i32"),
        **dict.fromkeys(("Q", "K", "V", "DO", "DK", "DV", "DQ", "DS"), elt),
        "Mask": {0: elt, 1: "*u8", 2: elt}[mask_kind],
        **dict.fromkeys(("Lse", "Delta", "Alibi"), "*fp32"),
        **dict.fromkeys(("State", "KeepOut"), "*i8"),
        **dict.fromkeys(("QCount", "QIndex", "KVCount", "KVIndex"), "*i32"),
        "Philox": "*i64",
    }
    consts = {
        "HEAD_DIM": v.head_dim,
        "HEAD_DIM_V": v.head_dim,
        "BLOCK_M": v.block_m,
        "BLOCK_N": v.block_n,
        "BLOCK_D": bwd._pow2_dim(v.head_dim),
        "BLOCK_DV": bwd._pow2_dim(v.head_dim),
        "MASK_KIND": mask_kind,
        "HAS_LEFT": has_left,
        "HAS_RIGHT": has_right,
        "HAS_CHUNK": variants,
        "SCORE": _score_flags(variants),
        "DROPOUT": dropout,
        "WRITE_DS": False,
        "WRITE_KEEP": False,
        "DOT_PRECISION": "tf32" if v.dtype == "fp32" else "ieee",
        "ACC": bwd.tl.float32,
        "PACKED": v.mask.endswith(PACKED),
        "stride_mn": 1,
    }
    aligned = {"stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh", "stride_kn", "stride_vb", "stride_vh",
               "stride_vn", "stride_dob", "stride_doh", "stride_dom", "stride_dkb", "stride_dkh", "stride_dkn",
               "stride_dvb", "stride_dvh", "stride_dvn", "stride_dqb", "stride_dqh", "stride_dqm"}  # fmt: skip
    floats = ("scale", "qk_scale2", "dropout_p", "dropout_scale")
    return aot_signature(fn, consts, pointers, floats=floats, aligned=aligned)


def _signature(v: Variant):
    if v.kernel in BWD_KERNELS:
        return _bwd_signature(v)
    if v.kernel == DECODE_KERNEL:
        from .decode import compile_signature

        return compile_signature(v.mask, v.dtype, v.head_dim, v.block_m, v.block_n)
    if v.kernel == MERGE_KERNEL:
        from .decode import merge_compile_signature

        return merge_compile_signature(v.mask, v.dtype, v.head_dim)
    from . import fwd
    from ._common import aot_signature

    fn = fwd._attn_fwd_kernel
    mask_kind, has_left, has_right, dropout = MASK_VARIANTS[v.mask]
    variants = _has_variants(v.mask)
    elt = "*" + v.dtype
    pointers = {
        "Q": elt,
        "K": elt,
        "V": elt,
        "Out": elt,
        "Lse": "*fp32",
        "Mask": {0: elt, 1: "*u8", 2: elt}[mask_kind],
        "TileState": "*i8" if mask_kind else "*i64",
        "KvCount": "*i32" if mask_kind else "*i64",
        "KvIndex": "*i32" if mask_kind else "*i64",
        "Philox": "*i64",
        "Alibi": "*fp32",
        "Sinks": "*fp32",
        "Visited": "*i64",
        "CuQ": "*i32",
        "CuK": "*i32",
        "Schedule": "*i32",
    }
    consts = {
        "HEAD_DIM": v.head_dim,
        "HEAD_DIM_V": v.head_dim,
        "BLOCK_M": v.block_m,
        "BLOCK_N": v.block_n,
        "BLOCK_D": fwd._pow2_dim(v.head_dim),
        "BLOCK_DV": fwd._pow2_dim(v.head_dim),
        "MASK_KIND": mask_kind,
        "HAS_LEFT": has_left,
        "HAS_RIGHT": has_right,
        "HAS_CHUNK": variants,
        "SCORE": _score_flags(variants),
        "HAS_SINKS": variants,
        "DROPOUT": dropout,
        "COUNT_VISITED": False,
        "DOT_PRECISION": "tf32",
        "PACKED": v.mask.endswith(PACKED),
    }
    # What the JIT specialises on a real launch: 16-aligned pointers and row strides of q/k/v/out.
    aligned = {f"stride_{t}{s}" for t in "qkvo" for s in "bhmn"}
    return aot_signature(fn, consts, pointers, floats=("qk_scale", "dropout_p"), aligned=aligned)


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _mma(ptx: str) -> str:
    for name, pattern in (("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync"), ("fma", "fma.rn")):
        n = ptx.count(pattern)
        if n:
            return f"{name} x{n}"
    return "none"


def compile_variant(v: Variant) -> Result:
    """Compile one variant and read its resources (runs in a worker without TRITON_INTERPRET)."""
    os.environ.pop("TRITON_INTERPRET", None)
    start = time.perf_counter()
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.compiler import compile as triton_compile

        fn, sig, constexprs, attrs = _signature(v)
        kernel = triton_compile(
            ASTSource(fn, sig, constexprs, attrs),
            target=GPUTarget("cuda", v.arch, 32),
            options={"num_warps": v.num_warps, "num_stages": v.num_stages},
        )
    except Exception as exc:  # any compiler failure is a result to report, not a crash
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # The first line naming an error (ptxas crashes, frontend errors), else the last one.
        msg = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else type(exc).__name__)
        return Result(v, False, seconds=time.perf_counter() - start, problems=[f"compile failed: {msg[:200]}"])
    res = Result(v, True, shared_bytes=int(kernel.metadata.shared), mma=_mma(kernel.asm["ptx"]))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", usage)
    if m:
        res.registers = int(m.group(1))
        res.spill_bytes = int(m.group(2)) + int(m.group(4))
        res.shared_bytes += int(m.group(3))
    else:
        res.problems.append("cuobjdump -res-usage gave no resource line")
    res.seconds = time.perf_counter() - start
    return res


def assess(res: Result) -> Result:
    """Fills ``problems``/``ok``: spills, shared memory over the arch's limit, the wrong MMA instruction."""
    v = res.variant
    if res.registers is not None:
        if res.spill_bytes:
            res.problems.append(f"spills {res.spill_bytes} bytes")
        if res.shared_bytes > SMEM_LIMIT[v.arch]:
            res.problems.append(f"shared memory {res.shared_bytes} > sm_{v.arch} limit {SMEM_LIMIT[v.arch]}")
        if v.dtype in ("fp16", "bf16") and v.arch >= 80 and v.kernel != MERGE_KERNEL:
            # wgmma needs 64 rows per warpgroup: the matmuls' row dim is the dK/dV pass's resident key
            # tile (BLOCK_N), every other kernel's query tile (BLOCK_M); below 64 Triton uses mma.sync.
            rows = v.block_n if v.kernel == "_attn_bwd_dkdv_kernel" else v.block_m
            want = "wgmma" if v.arch >= 90 and rows >= 64 else "mma.sync"
            if not res.mma.startswith(want):
                res.problems.append(f"expected {want}, got {res.mma}")
    res.ok = not res.problems
    return res


def _run_all(vs: list[Variant], jobs: int) -> list[Result]:
    import multiprocessing as mp

    saved = os.environ.pop("TRITON_INTERPRET", None)  # spawned workers inherit the environment at start
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            return list(pool.map(compile_variant, vs, chunksize=1))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def _parse_archs(text: str) -> list[int]:
    archs = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*sm_?(\d+)\s*", part)
        if not m or int(m.group(1)) not in SMEM_LIMIT:
            raise argparse.ArgumentTypeError(
                f"--arch: expected a comma-separated list of sm_75, sm_80, sm_86, sm_90, got {text!r}"
            )
        archs.append(int(m.group(1)))
    return archs


def _parse_masks(text: str) -> tuple[str, ...]:
    masks = tuple(m.strip() for m in text.split(","))
    unknown = [m for m in masks if m not in MASK_VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"--masks: unknown {unknown}; expected names of {sorted(MASK_VARIANTS)}")
    return masks


def add_compile_check_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the ``compile-check`` subcommand to ``fastattn``'s CLI (``subparsers`` from ``add_subparsers``)."""
    p = subparsers.add_parser(
        "compile-check",
        help="compile the Triton kernels for sm_75/80/86/90 without a GPU; report registers, spills, shared, MMA",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--arch", type=_parse_archs, default=[75, 80, 86, 90], help="e.g. sm_75,sm_80,sm_86,sm_90 (default)")
    p.add_argument(
        "--all", action="store_true", help="the full product: every mask kind × causal per config, packed builds too"
    )
    p.add_argument("--packed", action="store_true", help="the packed (varlen) builds at every head dim (default: 128)")
    p.add_argument(
        "--masks",
        type=_parse_masks,
        help="only the builds of these mask variants (comma-separated, e.g. window+packed), forward and backward",
    )
    p.add_argument("--json", metavar="PATH", help="also write the table as JSON (for the benchmark report)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: CPU count)")
    p.add_argument(
        "--head-dims",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        default=HEAD_DIMS,
        help="comma-separated head dims (default: %(default)s)",
    )
    p.add_argument("--dtypes", type=lambda s: tuple(s.split(",")), default=DTYPES, help="fp16,bf16,fp32 (default: all)")
    p.add_argument(
        "--candidates",
        metavar="PATH",
        help="compile the tuning grids instead (bf16, head dims 64/128/256) and write the clean tiles to PATH "
        "for benchmarks/tune.py; a failing candidate is dropped, not an error",
    )
    p.set_defaults(func=run_compile_check)
    return p


def run_compile_check(args) -> int:
    """Compiles, prints the table, writes JSON if asked; returns 0 if all variants are clean, else 1."""
    for d in args.dtypes:
        if d not in DTYPES:
            print(f"--dtypes: expected a subset of {','.join(DTYPES)}, got {d!r}", file=sys.stderr)
            return 2
    if args.candidates:
        head_dims = CANDIDATE_HEAD_DIMS if args.head_dims == HEAD_DIMS else args.head_dims
        dtypes = ("bf16",) if args.dtypes == DTYPES else args.dtypes
        start = time.perf_counter()
        results = [assess(r) for r in _run_all(candidate_variants(args.arch, head_dims, dtypes), max(1, args.jobs))]
        n = write_candidates(results, args.candidates)
        print(f"{n} of {len(results)} candidates clean in {time.perf_counter() - start:.1f} s; wrote {args.candidates}")
        return 0
    vs = variants(
        args.arch, args.all, args.head_dims, args.dtypes, getattr(args, "packed", False), getattr(args, "masks", None)
    )
    start = time.perf_counter()
    results = _run_all(vs, max(1, args.jobs))
    return report(results, time.perf_counter() - start, args.jobs, args.json)


def report(results: list[Result], elapsed: float, jobs: int, json_path: Optional[str] = None) -> int:
    """Prints the table (and writes JSON); 0 when every variant compiled clean, else 1."""
    results = [assess(copy.deepcopy(r)) for r in results]
    header = ("kernel", "variant", "arch", "regs", "spill B", "shared B", "mma", "status")
    rows = [
        (
            r.variant.kernel,
            r.variant.label,
            f"sm_{r.variant.arch}",
            "-" if r.registers is None else str(r.registers),
            "-" if r.spill_bytes is None else str(r.spill_bytes),
            "-" if r.shared_bytes is None else str(r.shared_bytes),
            r.mma or "-",
            "ok" if r.ok else "FAIL: " + "; ".join(r.problems),
        )
        for r in results
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
    failed = sum(not r.ok for r in results)
    print(f"\n{len(results)} variants compiled in {elapsed:.1f} s with {jobs} jobs; {failed} failed")
    if json_path:
        table = [{**asdict(r.variant), **{k: v for k, v in asdict(r).items() if k != "variant"}} for r in results]
        with open(json_path, "w") as f:
            json.dump({"elapsed_s": elapsed, "jobs": jobs, "results": table}, f, indent=1)
    return 1 if failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    """Standalone entry: ``python -m fastattn.backends.triton.compile_check --arch sm_80``."""
    parser = argparse.ArgumentParser(prog="fastattn")
    sub = parser.add_subparsers(dest="command", required=True)
    add_compile_check_parser(sub)
    args = parser.parse_args(["compile-check", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
