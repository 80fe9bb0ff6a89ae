"""Modules on fastattn's fused attention: drop-in MultiheadAttention, replace_attention, seq2seq Attention,
and graph attention layers with PyTorch Geometric's arguments (GATConv, GATv2Conv, TransformerConv)."""

from .attention import Attention
from .graph import GATConv, GATv2Conv, TransformerConv
from .multihead import MultiheadAttention
from .replace import replace_attention

# One class under both spellings: torch's ``MultiheadAttention`` and the common ``MultiHeadAttention``.
MultiHeadAttention = MultiheadAttention

__all__ = [
    "Attention",
    "GATConv",
    "GATv2Conv",
    "MultiHeadAttention",
    "MultiheadAttention",
    "TransformerConv",
    "replace_attention",
]
