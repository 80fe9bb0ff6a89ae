"""``fastattn compile-check`` on a small subset: real compiles for sm_90/sm_80/sm_75, the table and exit codes.

The variants compile once (module fixture, in a spawned worker without ``TRITON_INTERPRET``); the
exit-code cases re-assess those results with a patched limit, a synthetic spill and a variant that
cannot compile, so the whole file stays near a minute on a loaded 2-core machine.
"""

from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("triton")

from fastattn.backends.triton import compile_check as cc  # noqa: E402


def _variant(arch, dtype="fp16", mask="none", block_n=32, warps=4, stages=2):
    return cc.Variant("_attn_fwd_kernel", arch, dtype, 16, mask, 64, block_n, warps, stages)


@pytest.fixture(scope="module")
def compiled():
    # The variants users get at head dim 16 (first autotune config), and block_n=8, below tl.dot's
    # minimum of 16: a genuine compile failure.
    real = [cc.variants([arch], False, head_dims=(16,), dtypes=("fp16",))[0] for arch in (90, 80, 75)]
    assert all(v.mask == "none" for v in real)
    # The backward kernels users get at sm_90, bf16, head dim 64, no mask: dK/dV and dQ.
    bwd = [v for v in cc.variants([90], False, head_dims=(64,), dtypes=("bf16",)) if v.kernel in cc.BWD_KERNELS]
    vs = [*real, _variant(80, block_n=8), *(v for v in bwd if v.mask == "none")]
    return cc._run_all(vs, jobs=1)


def test_table_and_exit_zero(compiled, capsys, tmp_path):
    path = tmp_path / "cc.json"
    assert cc.report(compiled[:3], 1.0, 1, str(path)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["kernel", "variant", "arch"]
    by_arch = {a: next(line for line in lines[1:4] if f" {a} " in line) for a in ("sm_90", "sm_80", "sm_75")}
    assert "wgmma" in by_arch["sm_90"] and "mma.sync" in by_arch["sm_80"] and "fma" in by_arch["sm_75"]
    assert all(line.rstrip().endswith("ok") for line in lines[1:4])
    table = json.loads(path.read_text())["results"]
    assert [r["arch"] for r in table] == [90, 80, 75]
    for r in table:
        assert r["ok"] and r["registers"] > 0 and r["spill_bytes"] == 0 and 0 < r["shared_bytes"] < 64 * 1024


def test_backward_kernels_compile_clean(compiled, capsys):
    bwd = compiled[4:]
    assert [r.variant.kernel for r in bwd] == list(cc.BWD_KERNELS)
    assert cc.report(bwd, 1.0, 1) == 0
    for r in bwd:
        assert r.ok and r.registers > 0 and r.spill_bytes == 0 and r.mma.startswith("wgmma")
    out = capsys.readouterr().out
    assert "_attn_bwd_dkdv_kernel" in out and "_attn_bwd_dq_kernel" in out


def test_compile_failure_exits_nonzero(compiled, capsys):
    assert not compiled[3].ok
    assert cc.report(compiled[:4], 1.0, 1) == 1
    assert "compile failed" in capsys.readouterr().out


def test_shared_memory_limit_and_spill_exit_nonzero(compiled, capsys, monkeypatch):
    monkeypatch.setitem(cc.SMEM_LIMIT, 80, 1024)
    assert cc.report(compiled[1:2], 1.0, 1) == 1
    assert "> sm_80 limit 1024" in capsys.readouterr().out
    monkeypatch.undo()
    spilled = cc.Result(compiled[0].variant, True, 128, 16, compiled[0].shared_bytes, compiled[0].mma)
    assert cc.report([spilled], 1.0, 1) == 1
    assert "spills 16 bytes" in capsys.readouterr().out


def test_wrong_mma_is_flagged(compiled, capsys):
    fake = cc.Result(compiled[0].variant, True, 128, 0, 1024, "fma x10")
    assert cc.report([fake], 1.0, 1) == 1
    assert "expected wgmma" in capsys.readouterr().out


def test_parser_and_variant_sets():
    parser = argparse.ArgumentParser()
    cc.add_compile_check_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compile-check", "--arch", "sm_80,sm_86,sm_90", "--json", "x.json"])
    assert args.arch == [80, 86, 90] and args.json == "x.json" and args.func is cc.run_compile_check
    with pytest.raises(SystemExit):
        parser.parse_args(["compile-check", "--arch", "sm_70"])
    default = cc.variants([75, 80, 86, 90], all_masks=False)
    full = cc.variants([75, 80, 86, 90], all_masks=True)
    fwd_default = [v for v in default if v.kernel == "_attn_fwd_kernel"]
    attention_full = [v for v in full if v.kernel not in (cc.DECODE_KERNEL, cc.MERGE_KERNEL)]
    assert {v.mask for v in fwd_default} == set(cc.DEFAULT_MASKS + cc.PACKED_MASKS)
    assert {v.mask for v in attention_full} == set(cc.ALL_MASKS + cc.PACKED_MASKS)
    # The decode kernel: its plainest and heaviest builds on every arch, dtype and head dim.
    from fastattn.backends.triton import decode

    decode_default = [v for v in default if v.kernel == cc.DECODE_KERNEL]
    assert {v.mask for v in decode_default} == set(decode.COMPILE_MASKS)
    assert {(v.arch, v.dtype, v.head_dim) for v in decode_default} == {
        (v.arch, v.dtype, v.head_dim) for v in fwd_default
    }
    # ... and its merge of the splits, without and with the sinks.
    merge_default = {(v.arch, v.dtype, v.head_dim, v.mask) for v in default if v.kernel == cc.MERGE_KERNEL}
    arch_dtype_dim = {(v.arch, v.dtype, v.head_dim) for v in fwd_default}
    assert merge_default == {(*x, m) for x in arch_dtype_dim for m in decode.MERGE_MASKS}
    assert {v.head_dim for v in default} == set(cc.HEAD_DIMS)
    assert not any(v.dtype == "bf16" and v.arch == 75 for v in full)
    # Every (arch, dtype, head dim, mask) also compiles both backward kernels, in bwd_config's config.
    # Every (arch, dtype, head dim) with a backward config compiles both kernels for each backward mask.
    for kernel in cc.BWD_KERNELS:
        got = {(v.arch, v.dtype, v.head_dim, v.mask) for v in default if v.kernel == kernel}
        want = {(v.arch, v.dtype, v.head_dim, m) for v in fwd_default for m in cc.BWD_DEFAULT_MASKS}
        want |= {(v.arch, v.dtype, v.head_dim, v.mask) for v in fwd_default if v.mask in cc.PACKED_MASKS}
        assert got <= want and {c for c in want if c[0] >= 80} <= got
        assert (75, "fp16", 64, "window") in got and (75, "fp16", 128, "none") not in got
    assert len(full) > len(default)


def test_packed_builds_in_the_default_set():
    """Both packed builds, forward and both backward kernels, from sm_80 on, for every dtype at
    ``PACKED_DEFAULT_HEAD_DIMS``; ``--packed`` adds them at every other head dim."""
    default = cc.variants([75, 80, 86, 90], all_masks=False)
    packed = {(v.kernel, v.arch, v.dtype, v.head_dim, v.mask) for v in default if v.mask.endswith(cc.PACKED)}
    kernels = ("_attn_fwd_kernel", *cc.BWD_KERNELS)
    arch_dtype_dim = [(a, t, d) for a in (80, 86, 90) for t in cc.DTYPES for d in cc.PACKED_DEFAULT_HEAD_DIMS]
    assert packed == {(k, a, t, d, m) for k in kernels for a, t, d in arch_dtype_dim for m in cc.PACKED_MASKS}
    every = cc.variants([75, 80, 86, 90], all_masks=False, packed=True)
    assert {v.head_dim for v in every if v.mask.endswith(cc.PACKED)} == set(cc.HEAD_DIMS)
    assert not any(v.arch == 75 and v.mask.endswith(cc.PACKED) for v in every)
    assert len(every) - len(default) == sum(
        v.mask.endswith(cc.PACKED) and v.head_dim not in cc.PACKED_DEFAULT_HEAD_DIMS for v in every
    )


def test_masks_select_the_builds_of_those_masks():
    only = cc.variants([75, 90], False, head_dims=(64,), masks=cc.PACKED_MASKS)
    assert {v.arch for v in only} == {90} and {v.mask for v in only} == set(cc.PACKED_MASKS)
    assert {v.kernel for v in only} == {"_attn_fwd_kernel", *cc.BWD_KERNELS}
    parser = argparse.ArgumentParser()
    cc.add_compile_check_parser(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["compile-check", "--masks", "none,window+packed"]).masks == ("none", "window+packed")
    with pytest.raises(SystemExit):
        parser.parse_args(["compile-check", "--masks", "nope"])


def test_packed_builds_take_the_packed_tables():
    """Where a packed launch has tiles of its own, compile-check builds exactly those (the launchers ask the
    same functions with ``packed=True``), and the dense builds keep theirs."""
    import torch

    from fastattn.backends.triton import bwd, fwd

    builds = {}
    for v in cc.variants([80, 86, 90], False, packed=True):
        builds.setdefault((v.kernel, v.arch, v.dtype, v.head_dim, v.mask), []).append(
            (v.block_m, v.block_n, v.num_warps, v.num_stages)
        )
    for (arch, wide, d, heavy), config in bwd._BWD_PACKED_CONFIGS.items():
        dtype = "fp32" if wide else "bf16"
        mask = cc.PACKED_MASKS[1] if heavy else cc.PACKED_MASKS[0]
        for name, want in zip(cc.BWD_KERNELS, config):
            assert builds[(name, arch, dtype, d, mask)] == [want]
        # An entry is needed by some launch it serves: the heavy key serves mask-free dropout and every variant.
        fams = (None, bwd.VARIANTS_FAMILY) if heavy else (None,)
        dt = torch.float32 if wide else torch.bfloat16
        assert any(bwd.bwd_config(d, d, dt, arch, heavy, fam) != config for fam in fams)
    for (arch, wide, d, heavy), tile in fwd._FWD_PACKED_TILES.items():
        mask = cc.PACKED_MASKS[1] if heavy else cc.PACKED_MASKS[0]
        got = builds[("_attn_fwd_kernel", arch, "fp32" if wide else "bf16", d, mask)]
        assert {b[:2] for b in got} == {tile}
    for (arch, wide, d, heavy), stages in fwd._FWD_PACKED_STAGES.items():
        mask = cc.PACKED_MASKS[1] if heavy else cc.PACKED_MASKS[0]
        got = builds[("_attn_fwd_kernel", arch, "fp32" if wide else "bf16", d, mask)]
        assert [b[3] for b in got] == [stages]
