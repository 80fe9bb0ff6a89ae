"""The CPU backend's packed ops against the per-sequence oracle; the packed training step compiled; memory.

Each sequence runs through the dense kernels on views of its own rows (``csrc/cpu/attn_cpu.cpp``, "packed
sequences"): these tests check every variant and dtype on lengths with 0, 1, 17, 65, 129 and > 1000 (the
catalogue's "self" and "cross"), Lq_b != Lk_b and GQA, every gradient (``check_varlen``), outputs poisoned.
"""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn import _validate, testing
from fastattn.backends import registry

pytestmark = pytest.mark.usefixtures("cpu_built", "poisoned")


@pytest.fixture(scope="module")
def cpu_built():
    if registry.get("cpu").unavailable_reason() is not None:
        pytest.skip(registry.get("cpu").unavailable_reason())


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setenv("FASTATTN_POISON", "1")


# The default run: every band, variant and dtype once on "cross" (0, 1, 65, 130, 1100, Lq_b != Lk_b) with GQA, and
# "self" (1030 on both sides) once; the full pairwise set of lengths × dtype × band × variant × GQA is in ``full``.
_COVERING = [
    {"lengths": "cross", "dtype": torch.float32, "mask": "none", "variant": "plain", "gqa": 2},
    {"lengths": "cross", "dtype": torch.bfloat16, "mask": "causal", "variant": "softcap", "gqa": 2},
    {"lengths": "cross", "dtype": torch.float32, "mask": "window", "variant": "alibi", "gqa": 2},
    {"lengths": "cross", "dtype": torch.bfloat16, "mask": "causal_window", "variant": "sinks", "gqa": 2},
    {"lengths": "cross", "dtype": torch.float32, "mask": "causal", "variant": "chunk", "gqa": 1},
    {"lengths": "self", "dtype": torch.bfloat16, "mask": "causal", "variant": "all", "gqa": 2},
]
_PAIRWISE = testing.pairwise(
    {
        "lengths": ["self", "cross", "short", "single"],
        "dtype": [torch.float32, torch.bfloat16],
        "mask": list(testing.PACKED_MASK_KINDS),
        "variant": ["plain", "softcap", "alibi", "sinks", "chunk", "all"],
        "gqa": [1, 2],
    }
)


def _id(case):
    return "-".join(str(v) for v in case.values())


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=_id(c)) for c in _COVERING]
    + [pytest.param(c, id=_id(c), marks=pytest.mark.full) for c in _PAIRWISE],
)
def test_against_the_oracle(case):
    g = torch.Generator().manual_seed(11)
    lq, lk = testing.packed_lengths(case["lengths"], g)
    hq = 4
    q, k, v, cu_q, cu_k, max_q, max_k = testing.random_packed(
        lq, lk, hq, hq // case["gqa"], 32, 16, dtype=case["dtype"], generator=g
    )
    kw = {**testing.packed_mask_kwargs(case["mask"], max_k), "enable_gqa": case["gqa"] > 1}
    kw.update(testing.variant_kwargs(case["variant"], len(lq), hq, max_q, max_k, g))
    testing.check_varlen("cpu", q, k, v, cu_q, cu_k, max_q, max_k, kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float32, marks=pytest.mark.full)])
def test_dropout_against_the_oracle(dtype):
    """Sequence b draws row b of the contract's numbers for the batch padded to the maxima, forward and backward."""
    g = torch.Generator().manual_seed(12)
    lq, lk = testing.packed_lengths("cross", g)
    q, k, v, cu_q, cu_k, max_q, max_k = testing.random_packed(lq, lk, 4, 2, 16, dtype=dtype, generator=g)
    kw = {"dropout_p": 0.25, "is_causal": True, "enable_gqa": True, "sinks": torch.randn(4, generator=g)}
    testing.check_varlen("cpu", q, k, v, cu_q, cu_k, max_q, max_k, kw)


def test_auto_choice_takes_the_cpu_kernels():
    params, *_ = _validate.validate_packed(*testing.random_packed([3, 4], [5, 0], 2, 2, 8))
    assert registry.get("cpu").unsupported_reason(params) is None
    assert registry.choose(None, params).name in ("cpu", "triton", "cuda")  # interpreter/emulator come first


def test_opcheck_packed_ops():
    lq, lk = [3, 0, 6, 1], [4, 2, 0, 5]  # an empty sequence on either side, Lq_b != Lk_b
    q, k, v, cu_q, cu_k, max_q, max_k = testing.random_packed(lq, lk, 4, 2, 16, 8)
    # (total, H, D) → (1, H, total, D)
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    layout = (cu_q, cu_k, max_q, max_k)
    philox = torch.tensor([123, 456], dtype=torch.int64)
    scalars = (0.25, 0.2, [3.0, 0.0, 0.0, 0.0, 2.0], [64, 64])
    args = (q4, k4, v4, None, torch.rand(len(lq), 4), torch.randn(4), [], philox, *scalars, *layout)
    torch.library.opcheck(torch.ops.fastattn.cpu_attn_fwd.default, args)
    out, lse = torch.ops.fastattn.cpu_attn_fwd(*args)
    bargs = (torch.randn_like(out), q4, k4, v4, out, lse, None, args[4], [], philox, *scalars, False, *layout)
    torch.library.opcheck(torch.ops.fastattn.cpu_attn_bwd.default, bargs)


def test_compile_fullgraph_training_step():
    """A packed training step on the CPU kernels: one graph (no ``.item()``, no break), the same loss and grads."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(13)
    lq, _ = testing.packed_lengths("self", g)
    q, k, v, cu, _, max_len, _ = testing.random_packed(lq, lq, 4, 2, 16, generator=g)
    proj = torch.nn.Linear(16, 16)

    def step(q, k, v):
        out = fastattn.varlen_attention(
            proj(q), k, v, cu, cu, max_len, max_len, is_causal=True, enable_gqa=True, backend="cpu"
        )
        return out.square().mean()

    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v)
    grads = torch.autograd.grad(loss, [proj.weight, proj.bias])
    expected = step(q, k, v)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grads, torch.autograd.grad(expected, [proj.weight, proj.bias]))


def test_no_total_by_total_or_padded_tensor_is_allocated():
    """Forward and backward of 8 documents (4096 tokens): the largest allocation is of the order of the inputs
    (``total·H·D``, 2 MiB here), far below one ``total × total`` fp32 tensor (64 MiB) or a padded ``B·H·max²``
    score tensor (128 MiB), measured by the profiler."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(14)
    lengths = [1024, 64, 1000, 17, 900, 1, 600, 490]
    q, k, v, cu, _, max_len, _ = testing.random_packed(lengths, lengths, 4, 4, 32, generator=g)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    total = sum(lengths)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fastattn.varlen_attention(q, k, v, cu, cu, max_len, max_len, is_causal=True, backend="cpu")
        out.sum().backward()
    largest = max(e.cpu_memory_usage for e in prof.events())
    one_head_square = total * total * 4
    padded_scores = len(lengths) * 4 * max_len * max_len * 4
    inputs = q.numel() * q.element_size()
    assert 4 * inputs <= min(one_head_square, padded_scores) / 8  # the sizes tell the two apart
    assert 0 < largest <= 4 * inputs, (largest, inputs, one_head_square)
