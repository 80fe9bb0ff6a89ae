"""The GPU correctness suite: every fused backend against the float64 oracle on the device it is meant for.

Run by ``make gpu-check`` on a GPU machine (``FASTATTN_TEST_DEVICE=cuda``, ``TRITON_INTERPRET`` unset; the
conftest leaves the interpreter off then), and as a dry run of the same flow on the CPU
(``FASTATTN_TEST_DEVICE=cpu``: Triton under the interpreter, CUDA under the emulator), which proves the
suite itself, not the hardware. Without either it is skipped: the rest of the test suite covers the CPU.

Every case asserts the device its results came from and, on ``cuda``, that neither the interpreter nor
the emulator was active; ``test_kernels_ran_on_the_gpu`` reads the profiler's CUDA kernel names. With
``FASTATTN_GPU_RECORD=FILE`` each case appends ``{case, backend, device, interpreted}`` to FILE, which
``benchmarks/gpu_check.sh`` checks (``python -m benchmarks.gpu_record``): a suite that ran on the wrong
device fails the check even if every comparison passed.

Cases form a covering set, not a product: each mask kind and variant, GQA, odd lengths (1, 17, 65, 129,
1000+), every dtype and the head dims the kernels instantiate, forward and all gradients (the float
mask's included), dropout against the oracle given the kernels' own keep-mask, and determinism.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Optional

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.testing import assert_close

DEVICE = os.environ.get("FASTATTN_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
DRY_RUN = DEVICE == "cpu"
BACKENDS = ("triton", "cuda")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE not in ("cuda", "cpu"),
        reason="no CUDA device (FASTATTN_TEST_DEVICE=cpu runs this suite as a dry run on the CPU)",
    ),
]


@dataclass(frozen=True)
class Case:
    """One attention call: shapes, dtype and the mask features it combines."""

    name: str
    batch: int = 2
    heads_q: int = 4
    heads_kv: int = 4
    seqlen_q: int = 129
    seqlen_k: int = 129
    head_dim: int = 64
    head_dim_v: Optional[int] = None
    dtype: torch.dtype = torch.bfloat16
    causal: bool = False
    window: Optional[tuple[int, int]] = None
    q_offset: int = 0
    mask: str = "none"  # none | bool | float | bias (float, requires grad) | pad | empty_rows
    layout: str = "bhld"  # bhld | blhd (strided views) | 3d

    @property
    def dv(self) -> int:
        return self.head_dim if self.head_dim_v is None else self.head_dim_v


CASES = [
    Case("dense-bf16-d64-L1000", seqlen_q=1000, seqlen_k=1000),
    Case("causal-bf16-d128-L1031", heads_q=8, heads_kv=2, seqlen_q=1031, seqlen_k=1031, head_dim=128, causal=True),
    Case("causal-bottom-right-fp16-d64", seqlen_q=65, seqlen_k=129, dtype=torch.float16, causal=True, q_offset=64),
    Case("window-causal-bf16-d128", seqlen_q=1500, seqlen_k=1500, head_dim=128, causal=True, window=(255, 0)),
    Case("window-two-sided-fp16-d96", seqlen_q=300, seqlen_k=333, head_dim=96, dtype=torch.float16, window=(17, 33)),
    Case("bool-block-sparse-bf16-d64", seqlen_q=129, seqlen_k=257, mask="bool"),
    Case(
        "pad-causal-gqa-bf16-d128",
        heads_q=8,
        heads_kv=2,
        seqlen_q=1000,
        seqlen_k=1000,
        head_dim=128,
        causal=True,
        mask="pad",
    ),  # fmt: skip
    Case("float-mask-fp16-d64", seqlen_q=65, seqlen_k=200, dtype=torch.float16, mask="float"),
    Case("bias-grad-bf16-d64", seqlen_q=129, seqlen_k=129, mask="bias", causal=True),
    Case("empty-rows-fp16-d64", seqlen_q=65, seqlen_k=65, dtype=torch.float16, mask="empty_rows"),
    Case("fp32-d64-L17", seqlen_q=17, seqlen_k=17, dtype=torch.float32, causal=True),
    Case("fp32-d128-window", seqlen_q=257, seqlen_k=257, head_dim=128, dtype=torch.float32, window=(64, 64)),
    Case("d256-bf16-causal", seqlen_q=513, seqlen_k=513, head_dim=256, causal=True),
    Case("d32-fp16-L1", seqlen_q=1, seqlen_k=1, head_dim=32, dtype=torch.float16),
    Case("dv-differs-bf16-d40-dv72", seqlen_q=65, seqlen_k=100, head_dim=40, head_dim_v=72),
    Case(
        "decode-gqa-bf16-d128",
        batch=3,
        heads_q=16,
        heads_kv=2,
        seqlen_q=1,
        seqlen_k=4097,
        head_dim=128,
        causal=True,
        q_offset=4096,
    ),  # fmt: skip
    Case("strided-blhd-fp16-d64", seqlen_q=129, seqlen_k=129, dtype=torch.float16, causal=True, layout="blhd"),
    Case("three-d-bf16-d128", seqlen_q=65, seqlen_k=65, head_dim=128, layout="3d"),
]

# The dry run on the CPU keeps a few small cases (the interpreter and the emulator are slow): enough to
# run every code path of the suite, not to cover the kernels (the CPU tests do that).
DRY_CASES = ("causal-bottom-right-fp16-d64", "bias-grad-bf16-d64", "empty-rows-fp16-d64", "strided-blhd-fp16-d64")


def _cases():
    return [c for c in CASES if not DRY_RUN or c.name in DRY_CASES]


@pytest.fixture(autouse=True)
def _device_environment(monkeypatch):
    """On ``cuda``: no interpreter, no emulator. On the CPU dry run: both, as the CPU tests run them.

    Outputs and gradients are allocated NaN-poisoned by every backend (``FASTATTN_POISON=1``).
    """
    monkeypatch.setenv("FASTATTN_POISON", "1")
    if DRY_RUN:
        assert os.environ.get("TRITON_INTERPRET") == "1", "the dry run needs TRITON_INTERPRET=1 (set by conftest)"
        monkeypatch.setenv("FASTATTN_CUDA_EMULATE", "1")
    else:
        assert os.environ.get("TRITON_INTERPRET") != "1", "TRITON_INTERPRET=1 on a GPU run: kernels would not run"
        monkeypatch.delenv("FASTATTN_CUDA_EMULATE", raising=False)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 cases test IEEE fp32 (tf32 has its own floor)


def _record(case: str, backend: str, out: torch.Tensor) -> None:
    """Checked after the run by ``benchmarks/gpu_record.py``: where each case really ran."""
    path = os.environ.get("FASTATTN_GPU_RECORD")
    assert out.device.type == DEVICE, f"{case}/{backend}: result on {out.device}, expected {DEVICE}"
    if not DRY_RUN:
        assert os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("FASTATTN_CUDA_EMULATE") != "1"
    if path:
        entry = {
            "case": case,
            "backend": backend,
            "device": out.device.type,
            "interpreted": os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("FASTATTN_CUDA_EMULATE") == "1",
        }
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def _inputs(case: Case, gen: torch.Generator):
    """Fresh standard-normal q, k, v, grad_out and the case's mask, in the case's layout, on DEVICE."""
    b, hq, hk, lq, lk = case.batch, case.heads_q, case.heads_kv, case.seqlen_q, case.seqlen_k

    def draw(*shape):
        return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=case.dtype)

    if case.layout == "blhd":  # (B, L, H, D) storage seen as (B, H, L, D): non-contiguous strides
        q, k, v = (draw(b, l_, h, d).transpose(1, 2) for l_, h, d in ((lq, hq, case.head_dim),
                   (lk, hk, case.head_dim), (lk, hk, case.dv)))  # fmt: skip
    else:
        q, k, v = draw(b, hq, lq, case.head_dim), draw(b, hk, lk, case.head_dim), draw(b, hk, lk, case.dv)
    grad_out = draw(b, hq, lq, case.dv)
    mask = None
    if case.mask == "bool":  # block-sparse, 16 x 16 blocks, about a third kept, plus the diagonal blocks
        blocks = torch.rand(b, 1, -(-lq // 16), -(-lk // 16), generator=gen) < 0.35
        blocks |= torch.eye(blocks.shape[-2], blocks.shape[-1], dtype=torch.bool)
        mask = blocks.repeat_interleave(16, -2).repeat_interleave(16, -1)[..., :lq, :lk]
    elif case.mask in ("float", "bias"):
        mask = torch.randn(1, hq, lq, lk, generator=gen) * 2.0
        mask[..., ::7] = float("-inf") if case.mask == "float" else 0.0
    elif case.mask == "pad":  # key padding (True = attend): a different valid length per batch row
        lengths = torch.tensor([lk - 37 * (i + 1) for i in range(b)])
        mask = (torch.arange(lk) < lengths[:, None]).view(b, 1, 1, lk)
    elif case.mask == "empty_rows":  # rows 3 and 40 attend nothing: zeros out, zero gradients
        mask = torch.rand(1, 1, lq, lk, generator=gen) < 0.8
        mask[..., [3, 40], :] = False
    if mask is not None:
        mask = mask.to(DEVICE)
        if mask.dtype != torch.bool:
            mask = mask.to(case.dtype)
    if case.layout == "3d":
        q, k, v, grad_out = (t[0] for t in (q, k, v, grad_out))
        mask = None if mask is None else mask[0]
    return q, k, v, grad_out, mask


def _kwargs(case: Case, mask) -> dict:
    kw = dict(attn_mask=mask, is_causal=case.causal, window=case.window, q_offset=case.q_offset)
    if case.heads_q != case.heads_kv:
        kw["enable_gqa"] = True
    return kw


def _run(fn, q, k, v, grad_out, mask, grad_mask: bool):
    """``fn`` forward and backward: ``(out, dq, dk, dv[, dmask])`` with fresh leaf copies of the inputs."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    inputs = [q, k, v]
    if grad_mask:
        mask = mask.detach().clone().requires_grad_()
        inputs.append(mask)
    out = fn(q, k, v, mask)
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    return (out, *grads)


def _oracle(case: Case, q, k, v, grad_out, mask, compute_dtype=None, **extra):
    kw = _kwargs(case, mask)
    kw.update(extra)
    if compute_dtype is None:  # float64 truth on the same device (fast on a GPU)
        q, k, v = q.double(), k.double(), v.double()
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.double()

    def fn(q_, k_, v_, m_):
        return reference.attention(q_, k_, v_, **{**kw, "attn_mask": m_}, compute_dtype=compute_dtype)

    return _run(fn, q, k, v, grad_out, mask, case.mask == "bias")


def _skip_unless_runs(backend: str, case: Case, q, k, v, mask) -> None:
    """A backend that refuses a case says why (CUDA: fp16/bf16, its head dims); never a silent pass."""
    from fastattn.testing import runnable_backends

    if backend not in runnable_backends(q, k, v, **_kwargs(case, mask)):
        from fastattn._validate import validate
        from fastattn.backends import registry

        kw = _kwargs(case, mask)
        params, *_ = validate(q, k, v, kw["attn_mask"], 0.0, case.causal, None, kw.get("enable_gqa", False),
                              case.window, case.q_offset)  # fmt: skip
        b = registry.get(backend)
        pytest.skip(f"{backend}: {b.unavailable_reason() or b.unsupported_reason(params)}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.name)
def test_forward_and_gradients_against_oracle(case: Case, backend: str):
    gen = torch.Generator().manual_seed(hash(case.name) % 2**31)
    q, k, v, grad_out, mask = _inputs(case, gen)
    _skip_unless_runs(backend, case, q, k, v, mask)
    kw = _kwargs(case, mask)

    def fused(q_, k_, v_, m_):
        return fastattn.scaled_dot_product_attention(q_, k_, v_, **{**kw, "attn_mask": m_}, backend=backend)

    got = _run(fused, q, k, v, grad_out, mask, case.mask == "bias")
    _record(case.name, backend, got[0])
    truth = _oracle(case, q, k, v, grad_out, mask)
    low = case.dtype in (torch.float16, torch.bfloat16)
    baseline = _oracle(case, q, k, v, grad_out, mask, compute_dtype=case.dtype) if low else (None,) * len(truth)
    labels = ("out", "dq", "dk", "dv", "dmask")
    for label, g, t, b in zip(labels, got, truth, baseline):
        assert_close(g, t, b, factor=2.0 if label == "out" else 3.0, name=f"{backend} {case.name} {label}")
    if case.mask == "empty_rows":
        assert torch.equal(got[0][..., [3, 40], :], torch.zeros_like(got[0][..., [3, 40], :]))
        assert torch.equal(got[1][..., [3, 40], :], torch.zeros_like(got[1][..., [3, 40], :]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_against_oracle(backend: str):
    """``return_lse``: natural log, fp32, -inf for a row that attends nothing (rows past a negative offset)."""
    case = Case("lse-causal-bf16-d64", seqlen_q=129, seqlen_k=200, causal=True, q_offset=-3, mask="pad")
    q, k, v, _, mask = _inputs(case, torch.Generator().manual_seed(5))
    _skip_unless_runs(backend, case, q, k, v, mask)
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, **_kwargs(case, mask), return_lse=True, backend=backend)
    _record(case.name, backend, out)
    _, ref_lse = reference.attention(q.double(), k.double(), v.double(), **_kwargs(case, mask), return_lse=True)
    assert lse.dtype == torch.float32 and torch.isinf(ref_lse[..., :3]).all()
    assert_close(lse, ref_lse.float(), atol=2e-2, name=f"{backend} lse")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_replay_against_oracle(backend: str):
    """Dropout: forward and backward use one keep-mask, the one Triton's ``dropout_keep_mask`` regenerates
    from the forward's philox (the seed is the forward's first draw); the oracle given that mask agrees."""
    from fastattn.backends._philox import philox_seed_offset
    from fastattn.backends.triton.dropout import dropout_keep_mask

    p = 0.2
    case = Case("dropout-causal-gqa-fp16-d64", heads_q=4, heads_kv=2, seqlen_q=129, seqlen_k=160, causal=True,
                q_offset=31, dtype=torch.float16)  # fmt: skip
    q, k, v, grad_out, mask = _inputs(case, torch.Generator().manual_seed(11))
    _skip_unless_runs(backend, case, q, k, v, mask)
    kw = _kwargs(case, mask)

    def fused(q_, k_, v_, m_):
        torch.manual_seed(7)
        return fastattn.scaled_dot_product_attention(q_, k_, v_, **kw, dropout_p=p, backend=backend)

    got = _run(fused, q, k, v, grad_out, mask, False)
    again = _run(fused, q, k, v, grad_out, mask, False)
    _record(case.name, backend, got[0])
    for a, b in zip(got, again):  # the same seed replays the same computation, bit for bit
        assert torch.equal(a, b)
    torch.manual_seed(7)
    keep = dropout_keep_mask(philox_seed_offset(q.device), case.batch, case.heads_q, case.seqlen_q, case.seqlen_k, p)
    kept = keep.float().mean().item()
    assert abs(kept - (1 - p)) < 0.01, f"keep fraction {kept:.4f}, expected {1 - p}"
    truth = _oracle(case, q, k, v, grad_out, mask, keep_mask=keep, dropout_p=p)
    baseline = _oracle(case, q, k, v, grad_out, mask, compute_dtype=case.dtype, keep_mask=keep, dropout_p=p)
    for label, g, t, b in zip(("out", "dq", "dk", "dv"), got, truth, baseline):
        assert_close(g, t, b, factor=2.0 if label == "out" else 3.0, name=f"{backend} dropout {label}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_without_dropout(backend: str):
    """Two runs on the same inputs give bit-identical outputs and gradients (no atomics in any pass)."""
    case = Case("determinism-gqa-bf16-d128", heads_q=8, heads_kv=2, seqlen_q=777, seqlen_k=777, head_dim=128,
                causal=True)  # fmt: skip
    if DRY_RUN:
        case = replace(case, seqlen_q=65, seqlen_k=65, head_dim=64, dtype=torch.float16)
    q, k, v, grad_out, mask = _inputs(case, torch.Generator().manual_seed(3))
    _skip_unless_runs(backend, case, q, k, v, mask)
    kw = _kwargs(case, mask)

    def fused(q_, k_, v_, m_):
        return fastattn.scaled_dot_product_attention(q_, k_, v_, **kw, backend=backend)

    first, second = _run(fused, q, k, v, grad_out, mask, False), _run(fused, q, k, v, grad_out, mask, False)
    _record(case.name, backend, first[0])
    for label, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{backend}: {label} differs between two identical runs"


@pytest.mark.skipif(DRY_RUN, reason="the profiler sees CUDA kernels only on a GPU")
@pytest.mark.parametrize(
    "backend, kernels",
    [
        ("triton", ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")),
        ("cuda", ("attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel")),
    ],
)
def test_kernels_ran_on_the_gpu(backend: str, kernels: tuple[str, ...]):
    """The profiler's CUDA activity names the backend's own kernels: they ran on the GPU, not a fallback."""
    from torch.profiler import ProfilerActivity, profile

    case = Case("profiled-causal-bf16-d128", seqlen_q=1000, seqlen_k=1000, head_dim=128, causal=True)
    q, k, v, grad_out, mask = _inputs(case, torch.Generator().manual_seed(9))
    kw = _kwargs(case, mask)

    def fused(q_, k_, v_, m_):
        return fastattn.scaled_dot_product_attention(q_, k_, v_, **kw, backend=backend)

    _run(fused, q, k, v, grad_out, mask, False)  # compile and load outside the profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = _run(fused, q, k, v, grad_out, mask, False)[0]
        torch.cuda.synchronize()
    _record(case.name, backend, out)
    names = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    # Triton's kernels carry their Python names ("_attn_fwd_kernel"); the extension's are C++ templates.
    own = {n for n in names if n.startswith("_attn")} if backend == "triton" else {n for n in names if "_attn" not in n}
    for kernel in kernels:
        assert any(kernel in n for n in own), f"{backend}: no CUDA kernel named like {kernel!r} in {sorted(names)}"


def _kvcache_cases() -> dict:
    """``fastattn.kvcache_attention`` on the device: a contiguous cache with GQA, an append and sinks, and a paged
    one (shuffled pages of 16) with several queries, a window and every score rule; odd lengths, 0 included."""
    from test_kvcache import Case as KvCase

    long_ = 40 if DRY_RUN else 1000
    return {
        "contiguous-gqa-sinks-bf16-d128": KvCase(batch=2, lengths=(long_, 17), new=1, heads_q=8, heads_kv=2,
                                                 head_dim=128, dtype=torch.bfloat16, variant="sinks"),
        "paged-window-all-fp16-d64": KvCase(batch=3, lengths=(long_ + 29, 0, 65), new=2, seqlen_q=3, heads_q=4,
                                            heads_kv=4, head_dim=64, page_size=16, dtype=torch.float16,
                                            window=(40, 0), variant="all"),
    }  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_splits", [None, 4])
@pytest.mark.parametrize("name", list(_kvcache_cases()))
def test_kvcache_against_oracle(name: str, num_splits: Optional[int], backend: str):
    """Decoding over a key/value cache (``tests/test_kvcache.check``: the caches slot by slot after the append,
    out and lse against the float64 oracle), with the splits chosen and forced to 4, so that the split kernel and
    its one-launch merge run on the device."""
    from test_kvcache import check

    out = check(_kvcache_cases()[name], backend, num_splits=num_splits, seed=5, device=DEVICE)
    _record(f"kvcache-{name}-splits{num_splits}", backend, out)


@pytest.mark.parametrize("kind, dtype", [("dot", torch.float32), ("gat", torch.float32), ("gatv2", torch.float32),
                                         ("gatv2", torch.bfloat16)])  # fmt: skip
def test_graph_attention_triton_against_oracle(kind: str, dtype: torch.dtype):
    """``fastattn.graph``'s Triton kernels on the device: a random graph with isolated targets, duplicate
    edges and edge features; output, lse and every gradient against the float64 per-edge oracle."""
    from _graph_support import OPS, make_inputs, oracle

    from fastattn.graph._structure import graph_for

    gen = torch.Generator().manual_seed(21)
    ns, nd, edges = (40, 40, 300) if DRY_RUN else (1500, 1500, 12000)
    ei = torch.stack([torch.randint(0, ns, (edges,), generator=gen), torch.randint(0, nd - 7, (edges,), generator=gen)])
    args, kw = make_inputs(kind, ns, nd, edges, True, dtype, gen, heads=4, channels=16, edge_dim=8)
    kw.pop("loop_alpha", None)  # no self loops added here
    inputs = [*args, *kw.values()]
    on_device = [t.detach().to(DEVICE).requires_grad_() for t in inputs]
    kw_device = dict(zip(kw, on_device[len(args) :]))
    out, lse = OPS[kind](*on_device[: len(args)], ei.to(DEVICE), **kw_device, return_lse=True, backend="triton")
    _record(f"graph-{kind}-{dtype}", "triton", out)
    grad_out = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, on_device, grad_out.to(DEVICE, out.dtype))

    def reference(compute_dtype):
        ins = [t.detach().clone().requires_grad_() for t in inputs]
        o, lse_, _ = oracle(kind, graph_for(ei, ns, nd, False), ins[: len(args)], dict(zip(kw, ins[len(args) :])),
                            compute_dtype=compute_dtype)  # fmt: skip
        return (o, lse_, *torch.autograd.grad(o, ins, grad_out.to(o.dtype)))

    truth = reference(torch.float64)
    baseline = reference(dtype) if dtype != torch.float32 else (None,) * len(truth)
    names = ("out", "lse", *(f"d{i}" for i in range(len(inputs))))
    for name, g, t, b in zip(names, (out, lse, *grads), truth, baseline):
        assert_close(g, t, b, factor=2.0 if name == "out" else 3.0, name=f"graph {kind} {name}")
