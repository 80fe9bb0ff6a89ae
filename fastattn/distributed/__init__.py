"""Context parallelism: ring attention over ``torch.distributed`` and its sequence layout helpers."""

from .ring import ring_attention, shard_sequence, unshard_sequence

__all__ = ["ring_attention", "shard_sequence", "unshard_sequence"]
