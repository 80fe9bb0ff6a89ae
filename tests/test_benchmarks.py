"""The benchmark suite's own logic: FLOP counts, every mask kind against the oracle's semantics,
the JSON schema, skip/oom handling and a tiny end-to-end run (``benchmarks/run.py``)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn._validate import validate
from fastattn.backends.registry import _REGISTRY, Backend

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import _measure  # noqa: E402
import _points  # noqa: E402
import _report  # noqa: E402
import _runners  # noqa: E402


def _load_run():
    params = importlib.util.spec_from_file_location("fastattn_bench_run", os.path.join(BENCH, "run.py"))
    module = importlib.util.module_from_spec(params)
    params.loader.exec_module(module)
    return module


bench_run = _load_run()

TINY = ["--device", "cpu", "--quick", "--seqlens", "17,64", "--tokens", "64", "--heads", "2", "--head-dims", "16"]
TINY += ["--rep-seconds", "0.005"]


def _shape(mask="none", causal=False, b=2, h=3, lq=65, lk=None, d=8, **kw):
    return _points.Shape("float32", b, h, lq, lk or lq, d, causal, mask, **kw)


def _oracle_allowed(shape, maskin):
    """The oracle's (B, H, Lq, Lk) attended set for the same call fastattn receives."""
    q = torch.randn(shape.batch, shape.heads, shape.seqlen, shape.head_dim)
    k = torch.randn(shape.batch, shape.heads, shape.seqlen_k, shape.head_dim)
    kw = maskin.fastattn_kwargs()
    params, *_ = validate(q, k, k, kw["attn_mask"], 0.0, kw["is_causal"], None, False, kw["window"], 0)
    allowed, bias = reference.allowed_and_bias(params, "cpu", torch.float64)
    assert bias is None
    return allowed.expand(shape.batch, shape.heads, shape.seqlen, shape.seqlen_k), params


def _flex_allowed(shape, maskin):
    """FlexAttention's mask_mod evaluated densely over (B, H, Lq, Lk) index grids (no compile)."""
    mod = _runners.flex_mask_mod(maskin)
    full = (shape.batch, shape.heads, shape.seqlen, shape.seqlen_k)
    if mod is None:
        return torch.ones(full, dtype=torch.bool)
    b = torch.arange(shape.batch).view(-1, 1, 1, 1)
    h = torch.arange(shape.heads).view(1, -1, 1, 1)
    qi = torch.arange(shape.seqlen).view(1, 1, -1, 1)
    kv = torch.arange(shape.seqlen_k).view(1, 1, 1, -1)
    return mod(b, h, qi, kv).expand(full)


def _sdpa_allowed(shape, maskin):
    dense = maskin.dense(shape.seqlen, shape.seqlen_k, "cpu")
    full = (shape.batch, shape.heads, shape.seqlen, shape.seqlen_k)
    if dense is None:
        ones = torch.ones(shape.seqlen, shape.seqlen_k, dtype=torch.bool)
        return (ones.tril() if maskin.causal else ones).expand(full)
    return dense.expand(full)


# Every mask kind with and without causal; odd lengths, Lk != Lq, a window wider than the sequence.
MASK_CASES = [
    ("none", False, 65, 65, 256),
    ("none", True, 17, 17, 256),
    ("padding", False, 65, 65, 256),
    ("padding", True, 33, 47, 256),
    ("boolean", False, 129, 129, 256),
    ("boolean", True, 100, 130, 256),
    ("window", True, 129, 129, 16),
    ("window", False, 65, 65, 9),
    ("window", True, 17, 17, 256),
]


@pytest.mark.parametrize("mask,causal,lq,lk,window", MASK_CASES)
def test_every_backend_form_of_a_mask_is_the_oracles(mask, causal, lq, lk, window):
    shape = _shape(mask, causal, lq=lq, lk=lk, window=window, block=16, density=0.3)
    maskin = _points.build_mask(shape, "cpu")
    allowed, params = _oracle_allowed(shape, maskin)
    assert torch.equal(_sdpa_allowed(shape, maskin), allowed)
    assert torch.equal(_flex_allowed(shape, maskin), allowed)
    # The FLOP count's pair count is the oracle's, without expanding to B·H·Lq·Lk.
    assert _points.attended_pairs(shape, maskin) == params.attended_pairs(shape.batch, shape.heads)
    assert _points.attended_pairs(shape, maskin) == int(allowed.sum())


@pytest.mark.parametrize("mask,causal", [("padding", True), ("boolean", False), ("window", True)])
def test_sdpa_with_the_dense_mask_matches_fastattn_reference(mask, causal):
    shape = _shape(mask, causal, b=2, h=2, lq=70, d=16, window=12, block=16, density=0.2)
    maskin = _points.build_mask(shape, "cpu")
    q, k, v = (torch.randn(2, 2, 70, 16, dtype=torch.float64) for _ in range(3))
    ours = fastattn.scaled_dot_product_attention(q, k, v, **maskin.fastattn_kwargs(), backend="reference")
    sdpa_fn, _ = _runners.SdpaRunner("math").make_call(shape, maskin, torch.device("cpu"))
    torch.testing.assert_close(sdpa_fn(q, k, v), ours, rtol=1e-10, atol=1e-10)


def test_mask_kinds_have_their_documented_shape():
    pad = _points.build_mask(_shape("padding", b=4, lq=100), "cpu")
    assert pad.tensor.shape == (4, 1, 1, 100)
    kept = pad.tensor.sum((1, 2, 3)).tolist()
    assert kept == _points.padding_lengths(4, 100) and all(50 <= n <= 100 for n in kept)
    assert kept == sorted(kept, reverse=True) and kept[0] < 100

    sparse = _points.block_sparse(1024, 1024, 64, 0.1, seed=0)
    tiles = sparse.view(16, 64, 16, 64).any(3).any(1)
    assert torch.equal(sparse.view(16, 64, 16, 64).all(3).all(1), tiles)  # whole 64x64 tiles only
    assert tiles.diagonal().all()
    assert 0.1 < tiles.float().mean().item() < 0.25  # ~10% plus the diagonal's 1/16

    win = _points.build_mask(_shape("window", causal=True, lq=300, window=256), "cpu")
    assert win.window == (255, 0) and win.bounds == (255, 0)  # cpu_peers' point: is_causal + (255, 0)
    rows = win.band(300, 300, "cpu").sum(1)
    assert rows[:256].tolist() == list(range(1, 257)) and (rows[256:] == 256).all()
    assert _points.build_mask(_shape("window", causal=False, window=256), "cpu").window == (128, 128)


def test_flop_counts_follow_notes():
    dense = _shape(b=2, h=3, lq=128, d=64)
    assert _points.flops(dense, "fwd") == 4 * 2 * 3 * 128 * 128 * 64
    causal = _shape(causal=True, b=2, h=3, lq=128, d=64)
    assert _points.flops(causal, "fwd") == 2 * 2 * 3 * 128 * 128 * 64
    assert _points.flops(dense, "bwd") == 2.5 * _points.flops(dense, "fwd")
    assert _points.flops(dense, "fwd+bwd") == 3.5 * _points.flops(dense, "fwd")
    win = _shape("window", causal=True, b=1, h=2, lq=100, d=32, window=10)
    pairs = _points.attended_pairs(win, _points.build_mask(win, "cpu"))
    assert pairs == 2 * (sum(range(1, 11)) + 90 * 10)
    assert _points.flops(win, "fwd+bwd", pairs) == 3.5 * 4 * 32 * pairs
    with pytest.raises(ValueError, match="pair count"):
        _points.flops(win, "fwd")
    with pytest.raises(ValueError, match="mode"):
        _points.flops(dense, "sideways")


def test_grid_uses_the_token_budget_and_aliases():
    kinds = _points.mask_kinds(["none", "causal", "window"], [False, True])
    assert kinds == [("none", False), ("none", True), ("window", False), ("window", True)]
    shapes = _points.grid(
        dtypes=["bfloat16"], seqlens=[512, 16384, 32768], head_dims=[128], masks=[("none", True)],
        tokens=16384, batch=None, heads=None, hidden=2048,
    )  # fmt: skip
    assert [(s.batch, s.heads) for s in shapes] == [(32, 16), (1, 16), (1, 16)]
    with pytest.raises(ValueError, match="--masks"):
        _points.mask_kinds(["diagonal"], [False])
    with pytest.raises(ValueError, match="--dtypes"):
        _points.parse_dtype("float8")
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--device", "cpu", "--modes", "fwd,sideways"])


def test_cpu_peak_memory_sees_the_score_matrix():
    """The reference backend materialises B·H·L·L scores; torch's flash CPU kernel does not."""
    shape = _shape(b=1, h=4, lq=512, d=32)
    sets = _measure.make_inputs(shape, torch.device("cpu"), 1)
    maskin = _points.build_mask(shape, "cpu")
    scores = 4 * 512 * 512 * 4
    peaks = {}
    for name in ("reference", "sdpa"):
        runner = _runners.all_runners()[name]
        fn, _ = runner.make_call(shape, maskin, torch.device("cpu"))
        timed, mem_step, _ = _measure.steps("fwd", fn, sets)
        peaks[name] = _measure.peak_extra_cpu(mem_step)
    assert peaks["reference"] >= scores
    assert 0 < peaks["sdpa"] < scores / 2


class _Refuser(Backend):
    """A test backend: refuses tensor masks, has no backward, and runs out of memory on causal."""

    name = "bench_test_refuser"
    description = "test only"

    def unsupported_reason(self, params):
        return "takes no mask tensor" if params.mask is not None else None

    def forward(self, q, k, v, params, philox):
        if params.causal:
            raise torch.OutOfMemoryError("test: out of memory")
        return reference.attention_forward(q, k, v, params)


def test_quick_run_end_to_end_json_markdown_and_skips(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(_REGISTRY, _Refuser.name, _Refuser())
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    argv = TINY + ["--seqlens", "17", "--backends", f"reference,sdpa,efficient,{_Refuser.name}"]
    argv += ["--masks", "none,padding"]
    argv += ["--json", str(out_json), "--markdown", str(out_md), "--no-memory"]
    assert bench_run.main(argv) == 0
    data = json.loads(out_json.read_text())
    head = data["header"]
    for key in ("cpu", "gpu", "torch", "triton", "cuda", "date", "command", "wall_s"):
        assert key in head
    assert "--quick" in head["command"] and head["device"] == "cpu"
    rows = data["rows"]
    # 1 seqlen x (none, padding) x (causal, not) x 4 backends x (fwd, fwd+bwd)
    assert len(rows) == 2 * 2 * 4 * 2
    for r in rows:
        assert set(_report.ROW_FIELDS) <= set(r)
        assert r["status"] in _report.STATUSES
        assert (r["status"] == "ok") == (r["reason"] is None)
        if r["status"] == "ok":
            assert r["ms"] > 0 and r["tflops"] > 0
            assert math.isclose(r["tflops"], r["flops"] / r["ms"] / 1e9, rel_tol=1e-3)
    by = lambda **kw: [r for r in rows if all(r[k] == v for k, v in kw.items())]  # noqa: E731
    assert all(r["status"] == "ok" for r in by(backend="reference") + by(backend="sdpa"))
    assert all(r["reason"] == "SDPA's efficient kernel runs on CUDA only" for r in by(backend="efficient"))
    ref = by(backend=_Refuser.name)
    assert all(r["reason"] == "takes no mask tensor" for r in ref if r["mask"] == "padding" and r["mode"] == "fwd")
    assert all(r["status"] == "oom" for r in ref if r["mask"] == "none" and r["causal"] and r["mode"] == "fwd")
    assert all("has no backward" in r["reason"] for r in ref if r["mode"] == "fwd+bwd")
    assert all(r["status"] == "ok" for r in ref if r["mask"] == "none" and not r["causal"] and r["mode"] == "fwd")
    md = out_md.read_text()
    assert "(1.00x)" in md and "takes no mask tensor" in md and "| 17 |" in md
    captured = capsys.readouterr()
    assert "32/32" in captured.err  # the progress bar, on stderr
    assert "oom" in captured.out


def test_memory_budget_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png, out_json = tmp_path / "r.png", tmp_path / "r.json"
    argv = TINY + ["--backends", "reference,sdpa", "--modes", "fwd", "--plot", str(png), "--json", str(out_json)]
    assert bench_run.main(argv) == 0
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    rows = json.loads(out_json.read_text())["rows"]
    assert all(r["peak_mem_mb"] > 0 for r in rows)
    # The reference's L x L scores make its peak the larger one at every point.
    for r in rows:
        if r["backend"] == "reference":
            twin = next(s for s in rows if s["backend"] == "sdpa" and s["seqlen"] == r["seqlen"])
            assert r["peak_mem_mb"] > twin["peak_mem_mb"]
    # A saved run (say, from a GPU machine without matplotlib) is redrawn without running anything.
    png2, md2 = tmp_path / "again.png", tmp_path / "again.md"
    assert bench_run.main(["--from-json", str(out_json), "--plot", str(png2), "--markdown", str(md2)]) == 0
    assert png2.stat().st_size > 10_000 and "| 17 |" in md2.read_text()
    assert bench_run.main(TINY + ["--backends", "sdpa", "--max-minutes", "0", "--json", str(out_json)]) == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert rows and all(r["status"] == "skipped" and "time budget" in r["reason"] for r in rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quick_run_on_cuda(tmp_path):
    out = tmp_path / "r.json"
    argv = ["--device", "cuda", "--quick", "--seqlens", "256", "--backends", "sdpa,math,flash,reference"]
    assert bench_run.main(argv + ["--json", str(out), "--strict"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert all(r["status"] == "ok" for r in rows if r["backend"] in ("sdpa", "math"))
    assert all(r["peak_mem_mb"] > 0 for r in rows if r["status"] == "ok")


def test_cpu_peers_points_are_expressible():
    """cpu_peers.py's block-sparse layout is the suite's ``--masks boolean`` at L=4096 (same seed), and
    its window point is ``--masks window --causal true --window 256`` (is_causal + (255, 0))."""
    try:
        import cpu_peers
    except Exception as exc:  # owned elsewhere; its imports may need the CPU extension
        pytest.skip(f"benchmarks/cpu_peers.py not importable here: {exc}")
    layout = cpu_peers.block_layout(4096)
    ours = _points.block_sparse(4096, 4096, cpu_peers.BLOCK, cpu_peers.DENSITY, seed=0)
    assert torch.equal(layout.repeat_interleave(64, 0).repeat_interleave(64, 1), ours)
    shape = _shape("window", causal=True, b=1, h=8, lq=8192, d=64, window=cpu_peers.WINDOW)
    maskin = _points.build_mask(shape, "cpu")
    assert maskin.fastattn_kwargs() == {"attn_mask": None, "is_causal": True, "window": (255, 0)}
    assert _points.attended_pairs(shape, maskin) == 8 * int(cpu_peers.dense_mask("window", 8192, None).sum())


def test_bwd_mode_replays_the_same_gradients_and_runs_end_to_end(tmp_path):
    shape = _shape(b=1, h=2, lq=33, d=8)
    sets = _measure.make_inputs(shape, torch.device("cpu"), 2)
    fn, _ = _runners.SdpaRunner("sdpa").make_call(shape, _points.build_mask(shape, "cpu"), torch.device("cpu"))
    timed, mem_step, outs = _measure.steps("bwd", fn, sets)
    first, again, full = timed(1), timed(1), mem_step(1)
    assert outs[0] is None and outs[1] is not None  # one forward graph per set, built on first use
    for a, b, c in zip(first, again, full):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c)
    out = tmp_path / "r.json"
    argv = TINY + ["--backends", "sdpa,reference", "--modes", "bwd", "--no-memory", "--json", str(out)]
    assert bench_run.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["status"] == "ok" and r["mode"] == "bwd" for r in rows)
    r = rows[0]
    assert r["flops"] == 2.5 * _points.flops(_shape(b=r["batch"], h=2, lq=r["seqlen"], d=16, causal=r["causal"]), "fwd")


def _cpu_ext_reason():
    from fastattn import _ext

    return _ext.unavailable_reason("cpu")


@pytest.mark.skipif(_cpu_ext_reason() is not None, reason=str(_cpu_ext_reason()))
def test_variants_rows_end_to_end(tmp_path, monkeypatch):
    """``run.py --variants``: each variant beside its base call per (mask, dtype, mode), pairs from the oracle's
    rule, overhead per attended pair; a variant that does not change the output is an error, not a row."""
    import cpu_variants

    out = tmp_path / "v.json"
    argv = ["--device", "cpu", "--variants", "--quick", "--seqlens", "64", "--dtypes", "float32"]
    assert bench_run.main(argv + ["--json", str(out), "--markdown", str(tmp_path / "v.md")]) == 0
    data = json.loads(out.read_text())
    assert "--variants" in data["header"]["command"] and data["header"]["cpu_isa"]
    rows = data["rows"]
    # (dense, causal) x float32 x (fwd, fwd+bwd) x (base, 4 variants, chunk's split twin)
    assert len(rows) == 2 * 2 * 6
    assert {r["who"] for r in rows} == {"base", "chunk-split", *cpu_variants.VARIANTS}
    for r in rows:
        kw = {"is_causal": r["mask"] == "causal", "chunk": 16 if r["who"].startswith("chunk") else None}
        params, *_ = validate(*(torch.empty(1, 1, 64, 8) for _ in range(3)), **kw)
        assert r["pairs"] == int(reference.allowed_and_bias(params, "cpu", torch.float32)[0].sum())
        if r["who"] in ("base", "chunk-split"):
            assert r["overhead"] is None
        else:
            assert r["against"] == ("chunk-split" if r["who"] == "chunk" else "base")
            base = next(b for b in rows if b["point"] == r["point"] and b["who"] == r["against"])
            want = (r["ms"] / r["pairs"]) / (base["ms"] / base["pairs"]) - 1
            assert math.isclose(r["overhead"], want, rel_tol=1e-6) and r["bar"] == cpu_variants.BAR
    assert "overhead" in (tmp_path / "v.md").read_text()
    monkeypatch.setattr(cpu_variants, "variant_kwargs", lambda name, seqlen, gen: {})  # a variant that does nothing
    with pytest.raises(RuntimeError, match="did not take effect"):
        cpu_variants.run_group(64, False, torch.float32, "fwd", ["softcap"], reps=1, warmup=0)


@pytest.mark.skipif(_cpu_ext_reason() is not None, reason=str(_cpu_ext_reason()))
def test_variants_thread_clock(capsys):
    """``--clock thread`` times one thread's CPU time, so it takes ``--threads 1`` and says so in its header."""
    import cpu_variants

    with pytest.raises(SystemExit):
        cpu_variants.main(["--clock", "thread", "--seqlens", "64"])
    assert "--clock thread: expected --threads 1" in capsys.readouterr().err
    threads = torch.get_num_threads()
    try:
        argv = ["--clock", "thread", "--threads", "1", "--seqlens", "64", "--dtypes", "float32", "--causal", "false"]
        argv += ["--modes", "fwd", "--variants", "softcap", "--reps", "1", "--warmup", "0"]
        assert cpu_variants.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "threads 1, clock thread" in out and "softcap" in out


@pytest.mark.parametrize("padded", [False, True])
def test_varlen_benchmark_end_to_end(tmp_path, padded):
    """benchmarks/varlen.py at toy size: every contender's output checked against the first's before timing
    (a contender that disagrees is left out, so all three rows mean agreement), and the markdown's ratio."""
    spec = importlib.util.spec_from_file_location("fastattn_bench_varlen", os.path.join(BENCH, "varlen.py"))
    varlen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(varlen)
    out = tmp_path / "varlen.md"
    args = ["--docs", "3", "--shortest", "5", "--longest", "40", "--reps", "2", "--warmup", "1", "--modes", "fwd_bwd"]
    assert varlen.main(args + (["--padded-input"] if padded else []) + ["--markdown", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| fwd_bwd")]
    names = ["unpad_varlen", "compact_mask", "sdpa_padded"] if padded else ["fastattn", "sdpa_padded"]
    assert [r.split(" | ")[2] for r in rows][: len(names)] == names
    assert "x**" in rows[0]  # the subject's ratio against its best peer


def _load_decode():
    spec = importlib.util.spec_from_file_location("fastattn_bench_decode", os.path.join(BENCH, "decode.py"))
    decode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(decode)
    return decode


def test_decode_benchmark_end_to_end(tmp_path, monkeypatch):
    """benchmarks/decode.py at toy size with two backends and SDPA's kernels forced: every contender agrees with
    SDPA before it is timed, one that refuses the call (an SDPA kernel, a backend without the dtype) is left out
    and named, the main table takes the first backend that ran each point, and both tables come out."""
    monkeypatch.setenv("FASTATTN_CUDA_EMULATE", "1")  # the CUDA backend's kernels on CPU tensors: fp16/bf16 only
    decode = _load_decode()
    out = tmp_path / "decode.md"
    args = ["--points", "1:80:fp32,2:33:bf16", "--heads-kv", "2", "--head-dim", "32", "--page-size", "16"]
    args += ["--rounds", "2", "--backends", "cuda,cpu", "--sdpa-kernels", "flash,efficient", "--out", str(out)]
    assert decode.main(args) == 0
    text = out.read_text()
    fp32 = [line.split(" | ") for line in text.splitlines() if line.startswith("| 1 | 80 | fp32 |")]
    bf16 = [line.split(" | ") for line in text.splitlines() if line.startswith("| 2 | 33 | bf16 |")]
    assert len(fp32) == len(bf16) == 2  # each point in the main table and in the every-contender table
    assert fp32[0][4] == "cpu" and bf16[0][4] == "cuda"  # the CUDA backend has no fp32: cpu is the main figure
    header = next(line for line in text.splitlines() if line.startswith("| B | cache | dtype | cuda contiguous"))
    assert "cpu paged" in header and "read" in header
    assert "`cuda contiguous` refused the call" in text and "float32 is not supported" in text
    # SDPA's efficient kernel has no CPU implementation: left out, and said so
    assert "`sdpa efficient` refused the call" in text


def test_decode_benchmark_graph_bookkeeping(monkeypatch):
    """The GPU-only half of benchmarks/decode.py, with torch.cuda's streams and graphs stood in for by objects
    that run the calls on the CPU: which contenders get a ``graph`` twin, which are refused and why (a call that
    raises, a replay whose output differs from the eager call's), and which names the main table then takes."""
    decode = _load_decode()

    class Context:
        def __init__(self, *args):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())
    monkeypatch.setattr(torch.cuda, "stream", Context)
    monkeypatch.setattr(torch.cuda, "graph", Context)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(decode, "timed", lambda fn, args, device: 1e-4)  # one replay: 0.1 ms

    def refuses(s):
        raise RuntimeError("No available kernel.\nmore")

    x = torch.arange(3.0)
    fns = {
        "triton contiguous": lambda s: x * s,
        "triton paged": lambda s: x + s,
        "triton unchecked": lambda s: x * s,
        "sdpa": lambda s: x - s,
        "sdpa cudnn": refuses,
        "sdpa flash": lambda s: torch.rand(3),  # a different output each call: its replay cannot match
        "read": lambda i: x.sum() + i,
    }
    per_call = {name: [0, 1] for name in fns}
    reps = {name: 3 for name in fns}
    refused = {}
    decode.graphs(fns, per_call, reps, 2, refused)
    added = sorted(n for n in fns if n.endswith(" graph"))
    assert added == ["read graph", "sdpa graph", "triton contiguous graph", "triton paged graph"]
    assert refused["sdpa cudnn graph"] == "RuntimeError: No available kernel."
    assert "differs from the eager call" in refused["sdpa flash graph"]
    assert reps["triton contiguous graph"] == 20 and len(per_call["read graph"]) == 1
    med = {name: 1.0 for name in fns}
    assert decode.main_names(med, ["cuda", "triton"]) == (
        "triton", "triton contiguous graph", "triton paged graph", "read graph", ["sdpa graph"], "graph"
    )  # fmt: skip
    eager = {name: 1.0 for name in fns if not name.endswith(" graph") and name != "sdpa cudnn"}
    assert decode.main_names(eager, ["triton"]) == (
        "triton", "triton contiguous", "triton paged", "read", ["sdpa", "sdpa flash"], "eager"
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="none of the backends cuda ran"):
        decode.main_names(eager, ["cuda"])
