"""Modules on fastattn's fused attention: drop-in MultiheadAttention, replace_attention, seq2seq Attention."""

from .attention import Attention
from .multihead import MultiheadAttention
from .replace import replace_attention

# One class under both spellings: torch's ``MultiheadAttention`` and the common ``MultiHeadAttention``.
MultiHeadAttention = MultiheadAttention

__all__ = ["Attention", "MultiHeadAttention", "MultiheadAttention", "replace_attention"]
