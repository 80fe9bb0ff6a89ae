"""``fastattn.kvcache_attention``: contiguous and paged caches, in-place append, split-KV, every backend.

The CUDA backend runs on a GPU when there is one, else its kernel source on CPU tensors through the emulator
(``FASTATTN_CUDA_EMULATE=1``, set for its tests only); it takes fp16/bf16, so the float32 rows of the covering set
run on it in a 16-bit type instead of being skipped.

Each case is checked three ways: the output and lse against the float64 oracle run on the keys gathered slot
by slot from the expected cache (written here by a plain loop, independently of the kernels' addressing),
the cache after the call against that expected cache bit for bit (appended slots hold the new keys, every
other slot is untouched), and, for bad inputs, the error's text and a cache still bit-identical.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch import Tensor

import fastattn
from fastattn import reference
from fastattn.backends._kvcache import kvcache_fwd_reference
from fastattn.backends.registry import Backend, Capabilities
from fastattn.kvcache import validate_kvcache
from fastattn.testing import alibi_slopes, assert_close

BACKENDS = ["reference", "cpu", "triton", "cuda"]


@dataclass
class Case:
    batch: int = 2
    heads_q: int = 4
    heads_kv: int = 2
    lengths: tuple = (5, 17)  # cached keys per sequence before the call
    new: int = 1  # appended keys (0: no key/value given)
    seqlen_q: int = 1
    head_dim: int = 32
    head_dim_v: Optional[int] = None
    page_size: Optional[int] = None  # None: contiguous cache
    dtype: torch.dtype = torch.float32
    causal: bool = True
    window: Optional[tuple] = None
    variant: str = "plain"  # plain, softcap, alibi, sinks, all


def build(case: Case, seed: int = 0):
    """Random caches (fresh normal numbers everywhere, never zeros), a shuffled page table when paged, inputs."""
    g = torch.Generator().manual_seed(seed)
    b, hkv, d = case.batch, case.heads_kv, case.head_dim
    dv = case.head_dim_v or d

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(case.dtype)

    capacity = max([n + case.new for n in case.lengths] + [1]) + 3
    block_table = None
    if case.page_size is None:
        kc, vc = randn(b, hkv, capacity, d), randn(b, hkv, capacity, dv)
    else:
        per_seq = math.ceil(capacity / case.page_size)
        num_pages = b * per_seq + 3
        kc, vc = randn(num_pages, hkv, case.page_size, d), randn(num_pages, hkv, case.page_size, dv)
        block_table = torch.randperm(num_pages, generator=g)[: b * per_seq].view(b, per_seq).to(torch.int32)
    query = randn(b, case.heads_q, case.seqlen_q, d)
    key = value = None
    if case.new:
        key, value = randn(b, hkv, case.new, d), randn(b, hkv, case.new, dv)
    kw = dict(is_causal=case.causal, window=case.window, enable_gqa=case.heads_q != hkv)
    if case.variant in ("softcap", "all"):
        kw["softcap"] = 2.0
    if case.variant in ("alibi", "all"):
        kw["alibi_slopes"] = alibi_slopes(case.heads_q) * (1 + torch.rand(b, 1, generator=g))
    if case.variant in ("sinks", "all"):
        kw["sinks"] = torch.randn(case.heads_q, generator=g) + 1.0
    seqlens = torch.tensor(case.lengths, dtype=torch.int32)
    return query, kc, vc, seqlens, key, value, block_table, kw


def slot(case: Case, block_table, b: int, j: int) -> tuple[int, int]:
    """(page, slot) of key position j of sequence b (page b for a contiguous cache)."""
    if block_table is None:
        return b, j
    return int(block_table[b, j // case.page_size]), j % case.page_size


def expected_caches(case: Case, kc, vc, key, value, block_table):
    """The caches as they must be after the call: a copy with the new keys written by a plain loop."""
    ek, ev = kc.clone(), vc.clone()
    for b in range(case.batch):
        for i in range(case.new):
            page, s = slot(case, block_table, b, case.lengths[b] + i)
            ek[page, :, s] = key[b, :, i]
            ev[page, :, s] = value[b, :, i]
    return ek, ev


def oracle(case: Case, query, ek, ev, block_table, kw, dtype=torch.float64):
    """Per sequence: its keys gathered slot by slot, then the oracle aligned bottom-right."""
    outs, lses = [], []
    for b in range(case.batch):
        total = case.lengths[b] + case.new
        where = [slot(case, block_table, b, j) for j in range(total)]
        k = torch.stack([ek[p, :, s] for p, s in where], 1) if total else ek.new_empty(case.heads_kv, 0, ek.shape[3])
        v = torch.stack([ev[p, :, s] for p, s in where], 1) if total else ev.new_empty(case.heads_kv, 0, ev.shape[3])
        bkw = dict(kw)
        if "alibi_slopes" in bkw:
            bkw["alibi_slopes"] = bkw["alibi_slopes"][b]
        cast = (lambda t: t.to(dtype)) if dtype == torch.float64 else (lambda t: t)
        if "sinks" in bkw:
            bkw["sinks"] = cast(bkw["sinks"])
        out, lse = reference.attention(
            cast(query[b : b + 1]), cast(k[None]), cast(v[None]), q_offset=total - case.seqlen_q, return_lse=True,
            compute_dtype=dtype, **bkw,
        )  # fmt: skip
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def check(case: Case, backend: str, num_splits=None, seed: int = 0, device: str = "cpu") -> Tensor:
    """The call on ``device`` (the GPU suite passes ``cuda``) against the float64 oracle on the CPU: the caches
    after the append slot by slot, ``cache_seqlens`` unchanged, out and lse. Returns the output (on ``device``)."""
    query, kc, vc, seqlens, key, value, block_table, kw = build(case, seed)
    ek, ev = expected_caches(case, kc, vc, key, value, block_table)

    def on(t):
        return t.to(device) if isinstance(t, Tensor) else t

    kc_d, vc_d, seqlens_d = on(kc), on(vc), on(seqlens.clone())
    out_d, lse_d = fastattn.kvcache_attention(
        on(query), kc_d, vc_d, seqlens_d, key=on(key), value=on(value), block_table=on(block_table),
        return_lse=True, num_splits=num_splits, backend=backend, **{k: on(v) for k, v in kw.items()},
    )  # fmt: skip
    assert torch.equal(kc_d.cpu(), ek), "key_cache: slots differ from the expected cache after the append"
    assert torch.equal(vc_d.cpu(), ev), "value_cache: slots differ from the expected cache after the append"
    assert torch.equal(seqlens_d.cpu(), seqlens), "cache_seqlens changed"
    out, lse = out_d.cpu(), lse_d.cpu()
    want_out, want_lse = oracle(case, query, ek, ev, block_table, kw)
    baseline = None
    if case.dtype in (torch.float16, torch.bfloat16):
        baseline, _ = oracle(case, query, ek, ev, block_table, kw, dtype=case.dtype)
    assert out.dtype == case.dtype and lse.dtype == torch.float32
    assert_close(out, want_out, baseline, name=f"out ({backend})")
    assert_close(
        lse,
        want_lse.float(),
        name=f"lse ({backend})",
        atol=1e-3
        * max(1.0, want_lse[torch.isfinite(want_lse)].abs().max().item() if torch.isfinite(want_lse).any() else 1.0),
    )
    return out_d


def _runnable(backend: str, monkeypatch) -> None:
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend runs on CPU tensors only under TRITON_INTERPRET=1")
    if backend == "cuda" and not torch.cuda.is_available():
        monkeypatch.setenv("FASTATTN_CUDA_EMULATE", "1")  # the kernel source on CPU tensors
    reason = fastattn.backends.get(backend).unavailable_reason()
    if reason:
        pytest.skip(reason)


# A covering set: each row varies several things at once (layout, page size, lengths incl. 0 and > 1000,
# Lq, appends, GQA group, head dims, band, variant, dtype), so that every value appears in some row.
CASES = [
    Case(),
    Case(batch=3, lengths=(0, 1, 64), new=0, seqlen_q=9, heads_q=8, heads_kv=1, page_size=16),  # 72 rows per group
    Case(batch=2, lengths=(1029, 300), new=3, seqlen_q=4, page_size=64, dtype=torch.bfloat16, variant="softcap"),
    Case(batch=4, lengths=(0, 129, 65, 31), new=2, seqlen_q=2, heads_q=4, heads_kv=4, page_size=32, variant="alibi"),
    Case(batch=2, lengths=(200, 17), new=16, seqlen_q=16, heads_q=6, heads_kv=3, window=(40, -1), dtype=torch.float16),
    Case(batch=1, lengths=(777,), new=1, seqlen_q=1, heads_q=8, heads_kv=2, page_size=256, variant="sinks",
         head_dim=64, dtype=torch.bfloat16),
    Case(batch=3, lengths=(33, 0, 90), new=5, seqlen_q=5, causal=False, page_size=16, variant="all", head_dim=16,
         head_dim_v=24),
    Case(batch=2, lengths=(2, 50), new=0, seqlen_q=8, window=(3, 1), heads_q=2, heads_kv=1, causal=False),
]  # fmt: skip


def _in_dtype(case: Case, backend: str, index: int) -> Case:
    """The case for a 16-bit-only backend (cuda): float32 becomes float16 or bfloat16 (alternating by index)."""
    if backend == "cuda" and case.dtype == torch.float32:
        return dataclasses.replace(case, dtype=torch.float16 if index % 2 else torch.bfloat16)
    return case


# CUDA-specific: the widest head dim (8 accumulator chunks per lane) with a narrower value head, strided (non-
# contiguous) query and caches, and a GQA group of 8 times 3 queries (24 rows: two row tiles of 16).
CUDA_CASES = [
    Case(batch=2, lengths=(70, 0), new=3, seqlen_q=3, heads_q=8, heads_kv=1, head_dim=256, head_dim_v=200,
         page_size=16, dtype=torch.bfloat16, variant="all", window=(50, 0)),
    Case(batch=1, lengths=(1100,), new=1, seqlen_q=1, heads_q=4, heads_kv=2, head_dim=128, dtype=torch.float16),
]  # fmt: skip


@pytest.mark.parametrize("index", range(len(CUDA_CASES)))
def test_kvcache_cuda_wide_and_strided(index, monkeypatch):
    """Head dims up to 256 and views with non-unit, non-contiguous strides read in place by the CUDA kernel."""
    _runnable("cuda", monkeypatch)
    case = CUDA_CASES[index]
    query, kc, vc, seqlens, key, value, block_table, kw = build(case, seed=11 + index)
    ek, ev = expected_caches(case, kc, vc, key, value, block_table)

    def strided(t: Tensor) -> Tensor:  # same values, every stride non-contiguous: (..., L, D) stored as (..., D, L)
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)

    q_view, kc_view, vc_view = strided(query), strided(kc), strided(vc)
    out, lse = fastattn.kvcache_attention(
        q_view, kc_view, vc_view, seqlens, key=key, value=value, block_table=block_table, return_lse=True,
        backend="cuda", **kw,
    )  # fmt: skip
    assert torch.equal(kc_view, ek) and torch.equal(vc_view, ev), "the strided caches differ after the append"
    want_out, want_lse = oracle(case, query, ek, ev, block_table, kw)
    baseline, _ = oracle(case, query, ek, ev, block_table, kw, dtype=case.dtype)
    assert_close(out, want_out, baseline, name="out (cuda, strided)")
    assert_close(lse, want_lse.float(), name="lse (cuda, strided)", atol=1e-3 * max(1.0, want_lse.abs().max().item()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index", range(len(CASES)))
def test_kvcache_matches_oracle(backend, index, monkeypatch):
    _runnable(backend, monkeypatch)
    case = _in_dtype(CASES[index], backend, index)
    if backend != "reference" and case.dtype not in fastattn.backends.get(backend).kvcache_capabilities.dtypes:
        pytest.skip(f"{backend} does not take {case.dtype}")
    check(case, backend, seed=index)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("num_splits", [1, 2, 4, None])
def test_kvcache_splits_agree(backend, num_splits, monkeypatch):
    _runnable(backend, monkeypatch)
    case = Case(batch=2, lengths=(300, 45), new=1, heads_q=8, heads_kv=2, page_size=32, variant="sinks")
    case = _in_dtype(case, backend, num_splits or 0)
    check(case, backend, num_splits=num_splits, seed=7)


# The CPU kernel's register tiles (4 rows by 4 keys of scores; 4 rows by 4 vectors of outputs under AVX-512, by 2
# otherwise) and their tails: head dims not a whole number of tiles (80, 144: 5 and 9 vectors of 16), GQA groups
# of 6 and 7 rows (4 + 2, 4 + 2 + 1), key counts that are no multiple of 4 (and a block of fewer keys than a tile).
CPU_TILE_CASES = [
    Case(batch=2, lengths=(131, 2), new=1, heads_q=12, heads_kv=2, head_dim=80, dtype=torch.bfloat16),
    Case(batch=1, lengths=(197,), new=2, seqlen_q=1, heads_q=7, heads_kv=1, head_dim=144, head_dim_v=80,
         page_size=48),
    Case(batch=2, lengths=(70, 1), new=1, heads_q=6, heads_kv=1, head_dim=48, head_dim_v=112, page_size=16,
         dtype=torch.float16, variant="softcap"),
    # bf16 with head dims a multiple of 32: the VDPBF16PS path on CPUs with AVX512_BF16 (q.K: rows in fours and
    # singly, keys in fours and a tail of 1-3; P.V: rows in pairs and singly, an odd number of keys in the last
    # block, value chunks of 128, 64 and 32 columns; paged or not; a group of 3 rows has no four at all)
    Case(batch=2, lengths=(133, 6), new=2, seqlen_q=3, heads_q=6, heads_kv=2, head_dim=96, head_dim_v=224,
         page_size=16, dtype=torch.bfloat16, variant="alibi"),
    Case(batch=1, lengths=(301,), new=1, heads_q=8, heads_kv=2, head_dim=128, dtype=torch.bfloat16, variant="all"),
    Case(batch=2, lengths=(77, 130), new=1, heads_q=3, heads_kv=1, head_dim=64, dtype=torch.bfloat16,
         variant="softcap"),
]  # fmt: skip


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("index", range(len(CPU_TILE_CASES)))
def test_kvcache_cpu_register_tiles(index, num_splits, monkeypatch):
    _runnable("cpu", monkeypatch)
    check(CPU_TILE_CASES[index], "cpu", num_splits=num_splits, seed=40 + index)


@pytest.mark.parametrize("index", [i for i, c in enumerate(CPU_TILE_CASES) if c.dtype == torch.bfloat16])
def test_kvcache_cpu_bf16_without_dot_instructions(index, monkeypatch):
    """bf16 through the fp32 path of the same build, as on an AVX512 CPU without AVX512_BF16."""
    _runnable("cpu", monkeypatch)
    monkeypatch.setenv("FASTATTN_CPU_HIDE_FEATURES", "avx512_bf16")
    check(CPU_TILE_CASES[index], "cpu", num_splits=2, seed=60 + index)


# Caches in pages of at most 64 keys: the CPU kernel walks a group of heads together, page by page
# (decode_head_group picks the group from the batch, the kv heads, the splits and the thread count), so a task
# owns several heads' state. Larger pages, covered by CASES, keep one head per task.
CPU_HEAD_GROUP_CASES = [
    Case(batch=3, lengths=(200, 70, 0), new=1, heads_q=16, heads_kv=8, head_dim=64, page_size=16),
    Case(batch=1, lengths=(333,), new=2, seqlen_q=2, heads_q=8, heads_kv=4, head_dim=128, page_size=32,
         dtype=torch.bfloat16, variant="all", window=(150, 0)),
]  # fmt: skip


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("index", range(len(CPU_HEAD_GROUP_CASES)))
def test_kvcache_cpu_paged_head_groups(index, threads, monkeypatch):
    _runnable("cpu", monkeypatch)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for num_splits in (1, 2):
            check(CPU_HEAD_GROUP_CASES[index], "cpu", num_splits=num_splits, seed=80 + index)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "default"])
def test_kvcache_cpu_each_isa_build(isa, monkeypatch):
    """FASTATTN_CPU_ISA forces the decode kernel's build as it does the attention and graph kernels' (cpu_isa.h):
    each build this CPU runs, against the oracle on the register-tile and head-group cases."""
    from fastattn.backends import cpu as cpu_backend

    _runnable("cpu", monkeypatch)
    if isa not in cpu_backend.available_isas():
        pytest.skip(f"this CPU cannot run the {isa} build (it runs {cpu_backend.available_isas()})")
    monkeypatch.setenv("FASTATTN_CPU_ISA", isa)
    for n, case in enumerate(CPU_TILE_CASES + CPU_HEAD_GROUP_CASES):
        check(case, "cpu", num_splits=2, seed=90 + n)
    assert torch.ops.fastattn.cpu_kvcache_info().startswith(f"isa={isa}")


def test_kvcache_cpu_bad_isa_raises_before_the_append(monkeypatch):
    """An unknown FASTATTN_CPU_ISA is an error naming the variable, raised before the cache is written."""
    _runnable("cpu", monkeypatch)
    case = Case(page_size=16, new=2)
    query, kc, vc, seqlens, key, value, block_table, kw = build(case, seed=3)
    kc0, vc0 = kc.clone(), vc.clone()
    monkeypatch.setenv("FASTATTN_CPU_ISA", "sse4")
    with pytest.raises(RuntimeError, match=r"FASTATTN_CPU_ISA: expected one of avx512, avx2, default .*got 'sse4'"):
        fastattn.kvcache_attention(
            query, kc, vc, seqlens, key=key, value=value, block_table=block_table, backend="cpu", **kw
        )
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0), "the cache changed although the call raised"


def test_kvcache_cpu_kernel_keeps_its_prefetches(monkeypatch):
    """Every instruction-set build of the CPU decode kernel contains prefetch instructions. GCC deletes a call to
    a function whose only effect is a prefetch unless it is inlined first, silently: the kernel once lost every
    prefetch that way, and with them 40% of its bandwidth on long caches (benchmarks/decode.py)."""
    objdump = shutil.which("objdump")
    if objdump is None or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("needs binutils' objdump on x86-64")
    _runnable("cpu", monkeypatch)
    from fastattn import _ext

    listing = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", "-C", _ext.load("cpu")], capture_output=True, text=True, check=True
    ).stdout
    bodies: dict[str, list[str]] = {}
    name = ""
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            name = header.group(1)
            bodies.setdefault(name, [])
        elif name:
            bodies[name].append(line)
    checked = []
    for isa in ("AVX512", "AVX2", "DEFAULT"):
        if not any(f"fastattn_cpu::{isa}::" in n and "decode_task<" in n for n in bodies) and isa != "DEFAULT":
            continue  # that build is a stub with this compiler or machine
        for dtype in ("float", "c10::BFloat16", "c10::Half"):
            # the q.K pass's prefetches sit in HeadBlock<T>'s call operator, or in decode_task<T> if inlined there
            names = [
                n for n in bodies
                if f"fastattn_cpu::{isa}::" in n and (f"decode_task<{dtype}>" in n or f"HeadBlock<{dtype}>" in n)
            ]  # fmt: skip
            assert names, f"no decode_task<{dtype}> in the {isa} build of {_ext.load('cpu')}"
            count = sum("prefetch" in line for n in names for line in bodies[n])
            assert count > 0, f"{isa} decode_task<{dtype}>: no prefetch instruction in the built kernel"
        # bf16 caches on AVX512_BF16 CPUs take their own functions for q.K (dot_*_bf16) and P.V (accumulate*_bf16)
        for part in ("dot_", "accumulate"):
            names = [n for n in bodies if f"fastattn_cpu::{isa}::" in n and f"::{part}" in n and "_bf16<" in n]
            if names:
                count = sum("prefetch" in line for n in names for line in bodies[n])
                assert count > 0, f"{isa} {part}*_bf16: no prefetch instruction in {names}"
        checked.append(isa)
    assert "DEFAULT" in checked


# ---------------------------------------------------------------------------------------------- bad inputs


def _bad_cases():
    """(name, change to the call's arguments, text the error must contain)."""
    return [
        ("page out of range", lambda a: a["block_table"].__setitem__((1, 0), 99), "block_table"),
        ("negative page", lambda a: a["block_table"].__setitem__((1, 2), -1), "block_table"),
        ("append past capacity", lambda a: a["cache_seqlens"].__setitem__(1, 6 * 16 - 1), "capacity"),
        ("negative seqlen", lambda a: a["cache_seqlens"].__setitem__(0, -1), "cache_seqlens"),
        # int32 cache_seqlens + Lnew wraps around to a negative total unless the check widens first
        ("seqlen wraps int32", lambda a: a["cache_seqlens"].__setitem__(1, 2**31 - 2), "capacity"),
        ("seqlens int64", lambda a: a.__setitem__("cache_seqlens", a["cache_seqlens"].long()), "cache_seqlens"),
        ("seqlens shape", lambda a: a.__setitem__("cache_seqlens", a["cache_seqlens"][:1]), "cache_seqlens"),
        ("table int64", lambda a: a.__setitem__("block_table", a["block_table"].long()), "block_table"),
        ("table shape", lambda a: a.__setitem__("block_table", a["block_table"][:1]), "block_table"),
        ("table 1-D", lambda a: a.__setitem__("block_table", a["block_table"].flatten()), "block_table"),
        ("key without value", lambda a: a.__setitem__("value", None), "value"),
        ("value without key", lambda a: a.__setitem__("key", None), "key"),
        ("key shape", lambda a: a.__setitem__("key", a["key"][:, :1]), "key"),
        ("key dtype", lambda a: a.__setitem__("key", a["key"].double()), "key"),
        ("cache dtype", lambda a: a.__setitem__("value_cache", a["value_cache"].half()), "value_cache"),
        ("gqa not enabled", lambda a: a.__setitem__("enable_gqa", False), "enable_gqa"),
        ("num_splits 0", lambda a: a.__setitem__("num_splits", 0), "num_splits"),
        ("window", lambda a: a.__setitem__("window", (-2, 0)), "window"),
        ("check_values not bool", lambda a: a.__setitem__("check_values", "no"), "check_values"),
    ]


@pytest.mark.parametrize("check", ["walk", "screen"])
@pytest.mark.parametrize("name,change,text", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_kvcache_bad_input_leaves_cache_unchanged(name, change, text, check, monkeypatch):
    """Every bad input raises naming it and leaves both caches bit-identical, whether the values are walked in
    Python (small tables on the CPU) or screened in tensor ops first (large ones, and every GPU call)."""
    if check == "screen":
        monkeypatch.setattr(fastattn.kvcache, "_WALK_ENTRIES", -1)
    case = Case(batch=2, lengths=(10, 40), new=3, heads_q=4, heads_kv=2, page_size=16)
    query, kc, vc, seqlens, key, value, block_table, kw = build(case)
    args = dict(query=query, key_cache=kc, value_cache=vc, cache_seqlens=seqlens, key=key, value=value,
                block_table=block_table, **kw)  # fmt: skip
    change(args)
    k0, v0 = kc.clone(), vc.clone()
    with pytest.raises((ValueError, TypeError)) as err:
        fastattn.kvcache_attention(args.pop("query"), args.pop("key_cache"), args.pop("value_cache"),
                                   args.pop("cache_seqlens"), backend="reference", **args)  # fmt: skip
    assert text in str(err.value)
    assert torch.equal(kc, k0) and torch.equal(vc, v0), f"{name}: the cache changed although the call raised"


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_kvcache_table_past_used_pages_is_never_read(backend, monkeypatch):
    """Entries of a block table past the pages a sequence uses may hold anything (vLLM pads rows with -1): the
    check passes them, and the output and caches are those of the call with a well-formed table."""
    _runnable(backend, monkeypatch)
    case = Case(batch=3, lengths=(3, 40, 0), new=2, heads_q=4, heads_kv=2, page_size=16)
    query, kc, vc, seqlens, key, value, block_table, kw = build(case)
    padded = block_table.clone()
    for b, n in enumerate(case.lengths):
        used = -(-(n + case.new) // case.page_size)
        padded[b, used:] = torch.tensor([-1, 10**9, kc.shape[0]], dtype=torch.int32)[: padded.shape[1] - used]
    assert not torch.equal(padded, block_table), "the case leaves no entry past a sequence's pages"
    kc2, vc2 = kc.clone(), vc.clone()
    out = fastattn.kvcache_attention(query, kc, vc, seqlens, key=key, value=value, block_table=block_table,
                                     backend=backend, **kw)  # fmt: skip
    out2 = fastattn.kvcache_attention(query, kc2, vc2, seqlens, key=key, value=value, block_table=padded,
                                      backend=backend, **kw)  # fmt: skip
    assert torch.equal(out, out2) and torch.equal(kc, kc2) and torch.equal(vc, vc2)


def test_kvcache_check_values_false_skips_only_the_value_check(monkeypatch):
    """``check_values=False`` gives the same output and caches without reading the values on the host; the
    default reads them (and raises on a bad one)."""
    import fastattn.kvcache as kvmod

    case = Case(batch=2, lengths=(10, 40), new=3, heads_q=4, heads_kv=2, page_size=16)
    query, kc, vc, seqlens, key, value, block_table, kw = build(case)
    kc2, vc2 = kc.clone(), vc.clone()
    want = fastattn.kvcache_attention(query, kc, vc, seqlens, key=key, value=value, block_table=block_table,
                                      backend="cpu", **kw)  # fmt: skip

    def refuse(*args):
        raise RuntimeError("the values were read on the host")

    monkeypatch.setattr(kvmod, "_check_values", refuse)  # the walk and the screen both start there
    got = fastattn.kvcache_attention(query, kc2, vc2, seqlens, key=key, value=value, block_table=block_table,
                                     backend="cpu", check_values=False, **kw)  # fmt: skip
    assert torch.equal(got, want) and torch.equal(kc2, kc) and torch.equal(vc2, vc)
    with pytest.raises(RuntimeError, match="read on the host"):
        fastattn.kvcache_attention(query, kc2.clone(), vc2.clone(), seqlens, block_table=block_table, **kw)


def test_kvcache_values_unread_during_cuda_graph_capture(monkeypatch):
    """While a CUDA stream is captured the host cannot read the values (a sync there is an error, and the replays
    bring other values): the check is skipped for CUDA tensors then, and only for them."""
    from fastattn.kvcache import _host_can_read

    assert _host_can_read(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not _host_can_read(torch.device("cuda"))
    assert _host_can_read(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert _host_can_read(torch.device("cuda"))


@pytest.mark.parametrize("splits,sinks", [(1, False), (5, False), (5, True)])
def test_triton_merge_kernel_is_merge_splits(splits, sinks, monkeypatch):
    """The Triton decode's one-launch merge against ``fastattn.kvcache.merge_splits``, the formula in torch ops,
    on partials with an empty split (lse -inf), a row no split attended, a head dim short of its power of two,
    and sinks; the output comes back in the input dtype."""
    _runnable("triton", monkeypatch)
    from fastattn.backends.triton.decode import merge
    from fastattn.kvcache import merge_splits

    g = torch.Generator().manual_seed(0)
    part_out = torch.randn(splits, 2, 3, 2, 40, generator=g)  # (S, B, Hq, Lq, Dv)
    part_lse = torch.randn(splits, 2, 3, 2, generator=g) * 3
    if splits > 1:
        part_lse[1] = float("-inf")  # a split without keys
    part_lse[:, 1, 2, 0] = float("-inf")  # a row no split attended
    sink = torch.randn(3, generator=g) if sinks else None
    want_out, want_lse = merge_splits(part_out, part_lse, sink)
    got_out, got_lse = merge(part_out, part_lse, sink, torch.bfloat16)
    assert got_out.dtype == torch.bfloat16 and got_lse.dtype == torch.float32
    torch.testing.assert_close(got_out.float(), want_out.to(torch.bfloat16).float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got_lse, want_lse, atol=1e-5, rtol=1e-5)
    assert bool(torch.isneginf(got_lse[1, 2, 0])) == (not sinks)  # only a sink gives that row a denominator


def test_kvcache_forward_only():
    case = Case()
    query, kc, vc, seqlens, key, value, block_table, kw = build(case)
    with pytest.raises(ValueError, match="forward only"):
        fastattn.kvcache_attention(query.requires_grad_(), kc, vc, seqlens, key=key, value=value, **kw)


def test_kvcache_backend_refusal_names_feature():
    """A backend without decode kernels refuses through its capability table, naming the feature."""
    case = Case(page_size=16)
    query, kc, vc, seqlens, key, value, block_table, kw = build(case)
    params, _ = validate_kvcache(query, kc, vc, seqlens, block_table=block_table, enable_gqa=True)
    assert params.features >= {"kvcache", "paged", "gqa"}

    class NoDecode(Backend):
        name = "no-decode"
        capabilities = Capabilities(devices=None, dtypes=(torch.float32,))

    reason = NoDecode().unsupported_reason(params)
    assert reason is not None and "key/value-cache attention" in reason


# ---------------------------------------------------------------------------------------------- torch.library


def test_kvcache_opcheck_reference():
    case = Case(page_size=16, new=2, variant="all")
    query, kc, vc, seqlens, key, value, block_table, kw = build(case)
    variant = [-1.0, 0.0, 0.0, 0.0, 2.0]  # window (-1, 0), q_offset 0, no chunk, softcap 2
    args = (query, kc, vc, seqlens, key, value, block_table, kw["alibi_slopes"], kw["sinks"], 0.3, variant, 0)
    torch.library.opcheck(kvcache_fwd_reference, args)


def test_kvcache_opcheck_cuda(monkeypatch):
    """The CUDA op's schema, fake and mutation declaration (torch.library.opcheck), on the emulator without a GPU."""
    _runnable("cuda", monkeypatch)
    from fastattn.backends.cuda import kvcache_fwd_cuda

    case = Case(page_size=16, new=2, variant="all", dtype=torch.bfloat16)
    query, kc, vc, seqlens, key, value, block_table, kw = build(case)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    variant = [-1.0, 0.0, 0.0, 0.0, 2.0]  # window (-1, 0), q_offset 0, no chunk, softcap 2
    args = (query, kc, vc, seqlens, key, value, block_table, kw["alibi_slopes"], kw["sinks"], 0.3, variant, 2)
    torch.library.opcheck(kvcache_fwd_cuda, tuple(t.to(device) if isinstance(t, Tensor) else t for t in args))


def test_every_kvcache_op_takes_one_schema_and_declares_its_writes():
    """One argument order across backends; the caches (and nothing else) are declared written."""
    from fastattn.backends._kvcache import KVCACHE_OP_ARGS

    for name in ("reference", "cpu", "triton", "cuda"):
        schema = getattr(torch.ops.fastattn, f"kvcache_fwd_{name}").default._schema
        assert tuple(a.name for a in schema.arguments) == KVCACHE_OP_ARGS, name
        written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        assert written == {"key_cache", "value_cache"}, name


@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_compile(paged):
    """fullgraph compile: the same output and the same caches as eager, the append functionalised in place."""
    case = Case(page_size=16 if paged else None, new=2, lengths=(9, 20))
    query, kc, vc, seqlens, key, value, block_table, kw = build(case)
    kc2, vc2 = kc.clone(), vc.clone()

    def step(q, kc, vc, k, v):
        return fastattn.kvcache_attention(q, kc, vc, seqlens, key=k, value=v, block_table=block_table,
                                          backend="reference", **kw)  # fmt: skip

    eager = step(query, kc, vc, key, value)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(query, kc2, vc2, key, value)
    torch.testing.assert_close(compiled, eager)
    assert torch.equal(kc2, kc) and torch.equal(vc2, vc)


# ---------------------------------------------------------------------------------------------- users


def test_paged_decode_example_matches_generate():
    """examples/paged_decode.py: requests join and leave, pages are freed and reused, tokens equal generate()."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "paged_decode.py"
    spec = importlib.util.spec_from_file_location("paged_decode", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    argv = ["--requests", "4", "--max-batch", "2", "--page-size", "4", "--pages", "16", "--max-new", "8"]
    assert module.main(argv + ["--backend", "cpu"]) == 0


# ---------------------------------------------------------------------------------------------- full matrix


@pytest.mark.full
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [None, 16, 48, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["plain", "softcap", "alibi", "sinks", "all"])
def test_kvcache_full_matrix(backend, page_size, dtype, variant, monkeypatch):
    _runnable(backend, monkeypatch)
    if dtype not in fastattn.backends.get(backend).kvcache_capabilities.dtypes:
        pytest.skip(f"{backend} does not take {dtype}")
    for i, (lengths, new, lq, hq, hkv, window) in enumerate(
        [((0, 1, 300), 1, 1, 8, 1, None), ((2000, 17), 4, 4, 8, 2, (100, 0)), ((65, 129), 16, 16, 4, 4, None)]
    ):
        case = Case(batch=len(lengths), lengths=lengths, new=new, seqlen_q=lq, heads_q=hq, heads_kv=hkv,
                    page_size=page_size, dtype=dtype, variant=variant, window=window)  # fmt: skip
        for splits in (1, 3, None):
            check(case, backend, num_splits=splits, seed=i)
