"""Backends: the registry and every backend that registers itself on import."""

from . import reference  # noqa: F401  (registers "reference")
from .registry import Backend, UnsupportedError, choose, get, names, register

__all__ = ["Backend", "UnsupportedError", "choose", "get", "names", "register"]
