"""Graph attention without per-edge tensors: fused GAT, GATv2 and graph-transformer attention.

Each target node runs an online softmax over its incoming edges (a CSR of ``edge_index``, built once
per ``edge_index`` tensor and cached), for every head in one pass, forward and backward; only
edges × heads scalars are ever stored per edge. Backends: ``cpu`` (native C++), ``triton`` (GPU, or
CPU tensors under ``TRITON_INTERPRET=1``) and ``reference`` (the float64 per-edge oracle); see
``fastattn.graph.backend_names()``. Modules with PyTorch Geometric's arguments and parameter names:
``fastattn.nn.GATConv``, ``GATv2Conv``, ``TransformerConv``.
"""

from . import _cpu, _triton  # noqa: F401  (register the "cpu" and "triton" backends; nothing is built yet)
from ._backends import choose, get, names
from ._structure import Graph, clear_cache
from .functional import dot_attention, gat_attention, gatv2_attention, self_loop_attr

backend_names = names

__all__ = [
    "Graph",
    "backend_names",
    "choose",
    "clear_cache",
    "dot_attention",
    "gat_attention",
    "gatv2_attention",
    "get",
    "self_loop_attr",
]
