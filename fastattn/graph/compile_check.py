"""Compile the graph Triton kernels for GPU archs without a GPU, and read their registers and spills.

``python -m fastattn.graph.compile_check [--arch 80,90] [--all]`` compiles every variant (kind × edge
features × dropout × dtype; ``--all`` also the probabilities output) with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` in this process, after making sure
``TRITON_INTERPRET`` is unset, and prints one line per variant. It fails (exit 1) on a compile error or
on a spill inside a loop: a local-memory load or store (``LDL``/``STL`` in the SASS) between a backward
branch and its target. ptxas sometimes parks a value that is only needed after the edge loop on the
stack (one store before the loop, one load after it, per program: 8–16 bytes); that is reported but
allowed. The attention kernels' ``fastattn compile-check`` is the model; this one stays separate
because the graph kernels have their own signatures and variant axes.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional

__all__ = ["Variant", "variants", "compile_variant"]

_PTR_I64 = ("Rowptr", "Col", "Eid", "Colptr", "Row", "Slot", "Philox")
_PTR_F32 = ("ProjT", "Lse", "Probs", "DLse", "P", "DS", "DAtt", "DProjT")
_FLOATS = ("scale", "slope", "dropout_p")


@dataclass(frozen=True)
class Variant:
    kernel: str  # fwd, bwd_dst, bwd_src
    kind: int
    has_edge: bool
    dropout: bool
    dtype: str  # fp32 or bf16
    arch: int
    heads: int = 8
    channels: int = 16
    probs: bool = False

    def name(self) -> str:
        kind = ("dot", "gat", "gatv2")[self.kind]
        flags = (
            ("+edge" if self.has_edge else "") + ("+dropout" if self.dropout else "") + ("+probs" if self.probs else "")
        )
        return f"sm_{self.arch} {self.kernel:8s} {kind}{flags} {self.dtype} H={self.heads} C={self.channels}"


def variants(archs=(80, 90), with_probs: bool = False) -> list[Variant]:
    out = []
    for arch, kernel, kind, edge, dropout, dtype in itertools.product(
        archs, ("fwd", "bwd_dst", "bwd_src"), (0, 1, 2), (False, True), (False, True), ("fp32", "bf16")
    ):
        if kernel == "bwd_src" and dropout:
            continue  # the source pass reads stored probabilities: no dropout variant
        out.append(Variant(kernel, kind, edge, dropout, dtype, arch))
        if with_probs and kernel == "fwd":
            out.append(Variant(kernel, kind, edge, dropout, dtype, arch, probs=True))
    return out


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _signature(v: Variant):
    from . import _triton_kernels as k
    from ._triton import BLOCK_E

    fn = {"fwd": k._graph_fwd_kernel, "bwd_dst": k._graph_bwd_dst_kernel, "bwd_src": k._graph_bwd_src_kernel}[v.kernel]
    consts = {
        "KIND": v.kind,
        "HAS_EDGE": v.has_edge,
        "DROPOUT": v.dropout,
        "WRITE_PROBS": v.probs,
        "HAS_DLSE": True,
        "BLOCK_E": BLOCK_E,
        "BLOCK_H": _pow2(v.heads),
        "BLOCK_C": _pow2(v.channels),
        "BLOCK_CV": _pow2(v.channels),
    }
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            constexprs[name] = consts[name]
            continue
        if name in _PTR_I64:
            sig[name] = "*i64"
        elif name in _PTR_F32:
            sig[name] = "*fp32"
        elif name[0].isupper():  # every other pointer holds features in the inputs' dtype
            sig[name] = "*" + v.dtype
        elif name in _FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        if sig[name].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return fn, sig, constexprs, attrs


@dataclass
class Result:
    variant: Variant
    ok: bool
    registers: Optional[int] = None
    spill_bytes: Optional[int] = None
    spills_in_loops: Optional[int] = None
    error: str = ""


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def local_accesses_in_loops(sass: str) -> int:
    """``LDL``/``STL`` instructions inside a loop (between a backward branch's target and the branch)."""
    instructions = [(int(m.group(1), 16), m.group(2)) for m in _SASS_LINE.finditer(sass)]
    loops = []
    for addr, text in instructions:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    return sum(
        1
        for addr, text in instructions
        if re.search(r"\b(LDL|STL)\b", text) and any(lo <= addr <= hi for lo, hi in loops)
    )


def compile_variant(v: Variant) -> Result:
    """Compile one variant for its arch; registers and spill bytes from Triton's own ``cuobjdump``."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    from ._triton import num_warps

    try:
        fn, sig, constexprs, attrs = _signature(v)
        kernel = triton_compile(
            ASTSource(fn, sig, constexprs, attrs),
            target=GPUTarget("cuda", v.arch, 32),
            options={"num_warps": num_warps(v.kernel, v.kind, v.has_edge), "num_stages": 1},
        )
    except Exception as exc:  # a compiler failure is a result to report
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return Result(v, False, error=next((x for x in lines if "error" in x.lower()), lines[-1] if lines else "?"))
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", usage)
    if not m:
        return Result(v, False, error="cuobjdump -res-usage gave no resource line")
    spill = int(m.group(2)) + int(m.group(4))
    in_loops = local_accesses_in_loops(sass)
    ok = in_loops == 0
    return Result(
        v,
        ok,
        registers=int(m.group(1)),
        spill_bytes=spill,
        spills_in_loops=in_loops,
        error="" if ok else "spills in a loop",
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="80,90", help="compute capabilities, e.g. 80,90")
    parser.add_argument("--all", action="store_true", help="also the forward with attention probabilities")
    args = parser.parse_args(argv)
    archs = tuple(int(a) for a in args.arch.replace("sm_", "").split(","))
    failed = 0
    for v in variants(archs, with_probs=args.all):
        r = compile_variant(v)
        failed += not r.ok
        detail = r.error
        if r.registers is not None:
            detail = f"regs {r.registers:3d} stack/local {r.spill_bytes:2d} B, {r.spills_in_loops} in loops {r.error}"
        print(f"{'ok  ' if r.ok else 'FAIL'} {v.name()}  {detail}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
