"""Differences between the Triton versions fastattn supports (3.6 on the GPU image, 3.8 pinned here).

Kept in one place so that the kernels read the same under every version.
"""

from __future__ import annotations

import os

import triton

__all__ = ["TRITON_VERSION", "fix_interpreter_index"]

TRITON_VERSION: tuple[int, int] = tuple(int(p) for p in triton.__version__.split(".")[:2])  # type: ignore[assignment]


def fix_interpreter_index() -> None:
    """Under ``TRITON_INTERPRET=1`` with Triton < 3.7, let ``range()`` take tensor bounds.

    Triton 3.6's interpreter holds a scalar computed from kernel arguments as a numpy array of shape
    ``(1,)`` and converts it with ``int(array)``, which numpy 2 refuses ("only 0-dimensional arrays
    can be converted to Python scalars"), so every ``for i in range(lo, hi)`` whose bounds come from
    runtime arguments fails. Triton 3.7+ squeezes the array first; this applies the same conversion
    to 3.6's interpreter. Compiled kernels are unaffected.
    """
    if os.environ.get("TRITON_INTERPRET") != "1" or TRITON_VERSION >= (3, 7):
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_fastattn_index_fix", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._fastattn_index_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor
