"""Backends: the registry, the reference backend, and every optional backend present.

Each backend module registers itself on import and imports its heavy dependencies (triton, the
compiled extension) lazily, so importing one is cheap and never fails for a missing optional
dependency; whether it can run is its ``unavailable_reason()``.
"""

import importlib
import importlib.util

from . import reference  # noqa: F401  (registers "reference")
from .registry import Backend, SlowPathWarning, UnsupportedError, choose, get, names, register

_OPTIONAL = ("triton", "cpu", "cuda")

for _name in _OPTIONAL:
    if importlib.util.find_spec(f"{__name__}.{_name}") is not None:
        importlib.import_module(f"{__name__}.{_name}")

__all__ = ["Backend", "SlowPathWarning", "UnsupportedError", "choose", "get", "names", "register"]
