"""Shared test set-up: Triton's interpreter, its bf16 dot shim, a fixed seed per test.

``TRITON_INTERPRET=1`` must be set before any ``@triton.jit`` function is defined (triton reads it
at decoration time), so it is set here, first, for the whole session: Triton kernels then run on
CPU tensors, and the automatic backend choice on CPU prefers "triton", as it does for users.
Tests that must stay fast name their backend.

``FASTATTN_TEST_DEVICE=cuda`` (the GPU suite, ``tests/test_gpu.py``, under ``make gpu-check``) leaves
the interpreter off, so that Triton compiles for the GPU and the kernels run on it.
"""

from __future__ import annotations

import os

if os.environ.get("FASTATTN_TEST_DEVICE") != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


def _install_bf16_dot_shim() -> None:
    """Widen bf16 ``tl.dot`` operands to float32 under ``TRITON_INTERPRET=1``.

    The interpreter stores bf16 as uint16 and its ``create_dot`` multiplies those bit patterns
    (results around 1e10); upstream declined to fix it (triton-lang/triton#11584). Widening is
    exact (bf16 is the top half of a float32), so tests see what tensor cores compute: bf16
    products accumulated in fp32. Test-only: nothing in fastattn depends on it.
    """
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_fastattn_bf16_shim", False):
        return
    original = builder.create_dot

    def widen(handle):
        if handle.dtype.scalar == tl.bfloat16:
            data = (handle.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot._fastattn_bf16_shim = True
    builder.create_dot = create_dot


_install_bf16_dot_shim()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
