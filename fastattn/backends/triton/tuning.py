"""Tile configs timed on a GPU (``benchmarks/tune.py``), used by the launchers in place of the static tables.

The static tables (``fwd.fwd_tiles``/``fwd_configs``, ``bwd.bwd_config``) were chosen from compile reports
alone: the first spill-free config in an order of preference. A tuned table records, for one GPU arch and
one Triton version, the config that ran fastest among the spill-free candidates (``compile-check
--candidates``), per kernel, dtype, padded head dim and mask family. Tables live beside this file as
``tuned/sm<arch>-triton<major>.<minor>.json``; a launch uses the one matching its device and the installed
Triton, and falls back to the static choice for anything the table lacks (another arch, Triton version,
head dim, fp32, or an entry not yet timed). ``FASTATTN_TRITON_TUNED=0`` ignores the tables (to compare).

Keys: ``"<kernel>/<dtype>/d<padded head dim>/<family>"`` with kernel ``fwd`` (value ``[BLOCK_M, BLOCK_N,
num_warps, num_stages]``) or ``bwd`` (value ``[[dK/dV ...], [dQ ...]]``); family ``none``, ``causal`` (a
band bounded on the right only), ``window`` (bounded on the left) or ``mask`` (a mask tensor or dropout,
the "heavy" kernels). fp16 and bf16 take the same tiles on tensor cores, so a table measured for one
serves the other where it has no entry of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

from ._compat import TRITON_VERSION

__all__ = ["FAMILIES", "TABLE_DIR", "family", "entry_key", "lookup", "override", "table_path", "load_table"]

FAMILIES = ("none", "causal", "window", "mask")
TABLE_DIR = Path(__file__).resolve().parent / "tuned"
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}
_TWIN = {"fp16": "bf16", "bf16": "fp16"}

Config = Union[tuple[int, int, int, int], tuple[tuple[int, int, int, int], tuple[int, int, int, int]]]

_TABLES: dict[tuple[int, tuple[int, int]], dict] = {}
_OVERRIDES: dict[str, Config] = {}


def family(has_tensor_or_dropout: bool, left: int, right: int) -> str:
    """The mask family of a launch: what decides which kernel variant and tile fit best."""
    if has_tensor_or_dropout:
        return "mask"
    if left >= 0:
        return "window"
    return "causal" if right >= 0 else "none"


def entry_key(kernel: str, dtype: Union[str, torch.dtype], padded_dim: int, fam: str) -> str:
    name = dtype if isinstance(dtype, str) else _DTYPE_NAMES.get(dtype, str(dtype))
    return f"{kernel}/{name}/d{padded_dim}/{fam}"


def table_path(arch: int, version: tuple[int, int] = TRITON_VERSION) -> Path:
    return TABLE_DIR / f"sm{arch}-triton{version[0]}.{version[1]}.json"


def load_table(arch: int, version: tuple[int, int] = TRITON_VERSION) -> dict:
    """The table's ``entries`` for this arch and Triton version (empty when none was measured)."""
    key = (arch, version)
    if key not in _TABLES:
        path = table_path(arch, version)
        entries = {}
        if path.is_file():
            with open(path) as f:
                entries = json.load(f).get("entries", {})
        _TABLES[key] = entries
    return _TABLES[key]


def _as_config(value) -> Config:
    if value and isinstance(value[0], (list, tuple)):
        return tuple(tuple(int(x) for x in part) for part in value)  # type: ignore[return-value]
    return tuple(int(x) for x in value)  # type: ignore[return-value]


def lookup(kernel: str, arch: Optional[int], dtype: torch.dtype, padded_dim: int, fam: str) -> Optional[Config]:
    """The timed config for this launch, or None (the caller then uses its static table).

    Only fp16/bf16 on a GPU are tuned; the interpreter (``arch`` None) takes the static choice unless an
    ``override`` names a config (``benchmarks/tune.py --dry-run``).
    """
    if dtype not in _DTYPE_NAMES:
        return None
    key = entry_key(kernel, dtype, padded_dim, fam)
    if key in _OVERRIDES:
        return _OVERRIDES[key]
    if arch is None or os.environ.get("FASTATTN_TRITON_TUNED", "1") == "0":
        return None
    entries = load_table(arch)
    twin = entry_key(kernel, _TWIN[_DTYPE_NAMES[dtype]], padded_dim, fam)
    for k in (key, twin):
        if k in entries:
            return _as_config(entries[k]["config"])
    return None


@contextlib.contextmanager
def override(configs: dict[str, Config]):
    """Force configs by key while the block runs (``benchmarks/tune.py`` times candidates with it)."""
    saved = dict(_OVERRIDES)
    _OVERRIDES.update({k: _as_config(v) for k, v in configs.items()})
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)
