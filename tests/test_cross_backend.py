"""The same inputs through every fused backend: each agrees with the oracle, and they agree with each other.

Triton runs under the interpreter, CUDA under the emulator, the CPU backend natively: outputs and
all three gradients, fp16/bf16 (what the CUDA kernels take), GQA, causal with key padding.
"""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn import _ext, reference
from fastattn.testing import assert_close, random_qkv, runnable_backends

BACKENDS = ("triton", "cuda", "cpu")


@pytest.fixture(scope="module", autouse=True)
def emulate():
    if _ext.unavailable_reason("cuda_emulate") is not None:
        pytest.skip(f"cuda emulation cannot be built here: {_ext.unavailable_reason('cuda_emulate')}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTATTN_CUDA_EMULATE", "1")
        yield


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_backends_agree_forward_and_backward(dtype):
    torch.manual_seed(0)
    q, k, v = random_qkv(2, 4, 2, 37, 45, 64, dtype=dtype)
    pad = (torch.arange(45) < torch.tensor([40, 45])[:, None]).view(2, 1, 1, 45)
    kw = dict(attn_mask=pad, is_causal=True, q_offset=8, enable_gqa=True)
    grad_out = torch.randn(2, 4, 37, 64).to(dtype)

    def run(backend, q, k, v, compute_dtype=None):
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        if backend == "oracle":
            out = reference.attention(q, k, v, compute_dtype=compute_dtype, **kw)
        else:
            out = fastattn.scaled_dot_product_attention(q, k, v, backend=backend, **kw)
        grads = torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))
        return (out, *grads)

    names = [b for b in BACKENDS if b in runnable_backends(q, k, v, **kw)]
    assert {"triton", "cuda"} <= set(names), names  # both GPU backends run here (interpreter, emulator)
    truth = run("oracle", q.double(), k.double(), v.double())
    baseline = run("oracle", q, k, v, compute_dtype=dtype)  # plain PyTorch's own error in this dtype
    results = {name: run(name, q, k, v) for name in names}
    labels = ("out", "dq", "dk", "dv")
    for name, got in results.items():
        for label, g, t, b, factor in zip(labels, got, truth, baseline, (2, 3, 3, 3)):
            assert_close(g, t, b, factor=factor, name=f"{name} {label}")
    # Pairwise: two backends within the sum of their allowed errors of each other.
    first, *others = names
    for name in others:
        for label, a, c, t, b, factor in zip(labels, results[first], results[name], truth, baseline, (2, 3, 3, 3)):
            err = float((b.detach().double() - t.detach()).abs().max())
            assert_close(c, a.double(), atol=max(2 * factor * err, 2e-3), name=f"{name} vs {first} {label}")


def test_triton_and_cuda_dropout_agree():
    """Dropout: the same torch seed gives Triton and CUDA the same philox, hence the same keep-mask (one
    contract). Each matches the oracle given Triton's mask, and they agree with each other, gradients included."""
    from fastattn.backends.triton.dropout import dropout_keep_mask, philox_seed_offset

    dtype, p = torch.float16, 0.3
    q, k, v = random_qkv(1, 4, 2, 37, 45, 64, dtype=dtype, generator=torch.Generator().manual_seed(1))
    pad = (torch.arange(45) < 40).view(1, 1, 1, 45)
    kw = dict(attn_mask=pad, is_causal=True, q_offset=8, enable_gqa=True, dropout_p=p)
    grad_out = torch.randn(1, 4, 37, 64).to(dtype)
    assert {"triton", "cuda"} <= set(runnable_backends(q, k, v, **kw))
    torch.manual_seed(7)
    keep = dropout_keep_mask(philox_seed_offset("cpu"), 1, 4, 37, 45, p)

    def run(backend, q, k, v, compute_dtype=None):
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        if backend == "oracle":
            out = reference.attention(q, k, v, keep_mask=keep, compute_dtype=compute_dtype, **kw)
        else:
            torch.manual_seed(7)  # the forward's first draw is its philox
            out = fastattn.scaled_dot_product_attention(q, k, v, backend=backend, **kw)
        return (out, *torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype)))

    truth = run("oracle", q.double(), k.double(), v.double())
    baseline = run("oracle", q, k, v, compute_dtype=dtype)
    results = {name: run(name, q, k, v) for name in ("triton", "cuda")}
    labels, factors = ("out", "dq", "dk", "dv"), (2, 3, 3, 3)
    for name, got in results.items():
        for label, g, t, b, factor in zip(labels, got, truth, baseline, factors):
            assert_close(g, t, b, factor=factor, name=f"{name} {label}")
    for label, a, c, t, b, factor in zip(labels, results["triton"], results["cuda"], truth, baseline, factors):
        err = float((b.detach().double() - t.detach()).abs().max())
        assert_close(c, a.double(), atol=max(2 * factor * err, 2e-3), name=f"cuda vs triton {label}")
    # Not vacuous: without dropout the output is far from these.
    plain = reference.attention(q.double(), k.double(), v.double(), **{**kw, "dropout_p": 0.0})
    assert (plain - truth[0]).abs().max() > 0.1
