"""The CUDA backend's kernel source run on the CPU by the emulator (``load("cuda_emulate")``).

The test GEMM (csrc/cuda/test_gemm.cu: cp.async -> ldmatrix -> mma, double-buffered, shuffle
epilogue) against torch in float64, in every fiber order; the bindings' argument errors. The
emulator's per-primitive layout tests and the broken-variant tests are in the native binary
(``make test-ext-emulate``).
"""

from __future__ import annotations

import pytest
import torch

from fastattn import _ext

pytestmark = pytest.mark.skipif(
    _ext.unavailable_reason("cuda_emulate") is not None, reason=str(_ext.unavailable_reason("cuda_emulate"))
)


@pytest.fixture(scope="module")
def emulate():
    return _ext.load("cuda_emulate")


def gemm(a, b):
    return torch.ops.fastattn.cuda_test_gemm(a, b)


def check_gemm(a, b, c):
    """fp32 accumulation of exact 16-bit products: error far below 1e-5 of sum |a||b| per element."""
    ref = a.double() @ b.double()
    bound = 1e-5 * (a.double().abs() @ b.double().abs())
    assert c.dtype == torch.float32 and c.shape == ref.shape
    assert torch.isfinite(c).all()
    assert ((c.double() - ref).abs() <= bound).all(), (c.double() - ref).abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, n, k", [(64, 64, 32), (128, 192, 96), (192, 64, 64)])
def test_gemm_matches_torch(emulate, dtype, m, n, k):
    a = torch.randn(m, k, dtype=dtype)
    b = torch.randn(k, n, dtype=dtype)
    check_gemm(a, b, gemm(a, b))


def test_gemm_same_answer_in_every_fiber_order(emulate, monkeypatch):
    """A correct kernel gives bit-identical output whichever thread the emulator runs first."""
    a = torch.randn(128, 96, dtype=torch.bfloat16)
    b = torch.randn(96, 128, dtype=torch.bfloat16)
    outs = []
    for order in ("forward", "reversed", "random:1", "random:7"):
        monkeypatch.setenv("FASTATTN_EMULATE_ORDER", order)
        outs.append(gemm(a, b))
    check_gemm(a, b, outs[0])
    for c in outs[1:]:
        assert torch.equal(c, outs[0])


def test_bad_order_is_named(emulate, monkeypatch):
    monkeypatch.setenv("FASTATTN_EMULATE_ORDER", "sideways")
    a = torch.randn(64, 32, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="FASTATTN_EMULATE_ORDER must be forward, reversed, random"):
        gemm(a, torch.randn(32, 64, dtype=torch.float16))


@pytest.mark.parametrize(
    "a, b, message",
    [
        (
            torch.randn(64, 32),
            torch.randn(32, 64),
            r"argument 'a' must have dtype torch.float16 or torch.bfloat16, got torch.float32",
        ),
        (
            torch.randn(64, 32, dtype=torch.float16),
            torch.randn(32, 64, dtype=torch.bfloat16),
            r"argument 'b' must have dtype torch.float16 like 'a', got torch.bfloat16",
        ),
        (
            torch.randn(100, 32, dtype=torch.float16),
            torch.randn(32, 64, dtype=torch.float16),
            r"m \(a.size\(0\)\) must be a multiple of 64, got 100",
        ),
        (
            torch.randn(64, 32, dtype=torch.float16),
            torch.randn(48, 64, dtype=torch.float16),
            r"a \(m, k\) @ b \(k, n\) needs a.size\(1\) == b.size\(0\), got shapes \[64, 32\] and \[48, 64\]",
        ),
        (
            torch.randn(64, 32, dtype=torch.float16),
            torch.randn(64, 32, dtype=torch.float16).t(),
            r"argument 'b' must be contiguous, got strides \[1, 32\]",
        ),
        (
            torch.randn(2, 64, 32, dtype=torch.float16),
            torch.randn(32, 64, dtype=torch.float16),
            r"argument 'a' must have 2 dimensions, got shape \[2, 64, 32\]",
        ),
    ],
)
def test_argument_errors_name_argument_expected_and_received(emulate, a, b, message):
    with pytest.raises(RuntimeError, match=r"fastattn::cuda_test_gemm: " + message):
        gemm(a, b)


def test_load_is_cached_and_silent(emulate, capfd):
    assert torch.ops.fastattn.cuda_ext_info() == "emulate"
    assert _ext.load("cuda_emulate") == emulate
    assert _ext.library_path("cuda_emulate") == emulate
    assert capfd.readouterr().err == ""


def test_real_and_emulated_libraries_do_not_mix(emulate):
    with pytest.raises(RuntimeError, match="cuda_emulate extension is already loaded"):
        _ext.load("cuda")
