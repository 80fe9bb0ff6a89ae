"""A toy sequence task (copy or reverse) and a short training loop for ``fastattn.models.Transformer``.

Shared by ``examples/train_copy.py`` and the tests so that both run the same code. Token ids:
0 = PAD, 1 = BOS, 2 = EOS, 3.. = symbols. A source of length ``n`` maps to its copy (or reverse)
followed by EOS; sources are right-padded, so lengths give the padding masks. ``pack`` lays the same
documents end to end instead (``cu_seqlens`` offsets, no padding), for padding-free training
(``train(..., packed=True)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .transformer import Transformer

__all__ = ["PAD", "BOS", "EOS", "Batch", "PackedBatch", "make_batch", "pack", "train", "evaluate"]

PAD, BOS, EOS = 0, 1, 2


@dataclass
class Batch:
    src: Tensor  # (B, Ls) right-padded symbols
    src_lengths: Tensor  # (B,)
    tgt_in: Tensor  # (B, Lt) BOS + target, right-padded
    tgt_out: Tensor  # (B, Lt) target + EOS, right-padded with PAD (ignored by the loss)
    tgt_lengths: Tensor  # (B,)


def make_batch(
    task: str, batch: int, min_len: int, max_len: int, vocab_size: int, generator: Optional[torch.Generator] = None
) -> Batch:
    """Random sources of ``min_len..max_len`` symbols drawn from ``3..vocab_size-1``."""
    if task not in ("copy", "reverse"):
        raise ValueError(f"task: expected 'copy' or 'reverse', got {task!r}")
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=generator)
    symbols = torch.randint(3, vocab_size, (batch, max_len), generator=generator)
    src = torch.full((batch, max_len), PAD, dtype=torch.long)
    tgt_in = torch.full((batch, max_len + 1), PAD, dtype=torch.long)
    tgt_out = torch.full((batch, max_len + 1), PAD, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        seq = symbols[b, :n]
        target = seq.flip(0) if task == "reverse" else seq
        src[b, :n] = seq
        tgt_in[b, 0] = BOS
        tgt_in[b, 1 : n + 1] = target
        tgt_out[b, :n] = target
        tgt_out[b, n] = EOS
    return Batch(src, lengths, tgt_in, tgt_out, lengths + 1)


@dataclass
class PackedBatch:
    src: Tensor  # (total_s,) every source end to end
    src_cu_seqlens: Tensor  # (B + 1,) int32 offsets
    tgt_in: Tensor  # (total_t,) BOS + target of every document
    tgt_out: Tensor  # (total_t,) target + EOS of every document
    tgt_cu_seqlens: Tensor  # (B + 1,)
    src_max_seqlen: int
    tgt_max_seqlen: int


def pack(b: Batch) -> PackedBatch:
    """The documents of a padded batch end to end, without their padding."""

    def offsets(lengths: Tensor) -> Tensor:
        return F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))

    src_keep = torch.arange(b.src.shape[1]) < b.src_lengths.unsqueeze(1)
    tgt_keep = torch.arange(b.tgt_in.shape[1]) < b.tgt_lengths.unsqueeze(1)
    return PackedBatch(
        b.src[src_keep],
        offsets(b.src_lengths),
        b.tgt_in[tgt_keep],
        b.tgt_out[tgt_keep],
        offsets(b.tgt_lengths),
        int(b.src_lengths.max()),
        int(b.tgt_lengths.max()),
    )


def loss_fn(model: Transformer, b: Batch | PackedBatch) -> Tensor:
    if isinstance(b, PackedBatch):
        logits = model(
            b.src, b.tgt_in, src_cu_seqlens=b.src_cu_seqlens, tgt_cu_seqlens=b.tgt_cu_seqlens,
            src_max_seqlen=b.src_max_seqlen, tgt_max_seqlen=b.tgt_max_seqlen,
        )  # fmt: skip
        return F.cross_entropy(logits, b.tgt_out)
    logits = model(b.src, b.tgt_in, b.src_lengths, b.tgt_lengths)
    return F.cross_entropy(logits.flatten(0, 1), b.tgt_out.flatten(), ignore_index=PAD)


def train(
    model: Transformer,
    task: str,
    steps: int,
    batch: int,
    min_len: int,
    max_len: int,
    vocab_size: int,
    lr: float = 3e-3,
    seed: int = 0,
    log_every: int = 0,
    packed: bool = False,
) -> list[float]:
    """Adam with a short linear warm-up; returns the loss of every step. ``packed``: padding-free batches."""
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    losses = []
    for step in range(steps):
        b = make_batch(task, batch, min_len, max_len, vocab_size, generator)
        loss = loss_fn(model, pack(b) if packed else b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1:5d}  loss {losses[-1]:.4f}")
    return losses


@torch.no_grad()
def evaluate(
    model: Transformer, task: str, batch: int, min_len: int, max_len: int, vocab_size: int, seed: int = 1234
) -> tuple[float, float]:
    """Greedy decoding (with the key/value cache) on fresh sequences: (token accuracy, sequence accuracy).

    Token accuracy counts positions of target + EOS predicted right; a sequence counts when all are.
    """
    model.eval()
    b = make_batch(task, batch, min_len, max_len, vocab_size, torch.Generator().manual_seed(seed))
    out = model.generate(b.src, b.src_lengths, bos_id=BOS, eos_id=EOS, max_new_tokens=max_len + 1)
    pred = torch.full_like(b.tgt_out, PAD)
    pred[:, : out.shape[1]] = out[:, : pred.shape[1]]
    valid = b.tgt_out != PAD
    correct = (pred == b.tgt_out) & valid
    token_acc = float(correct.sum()) / float(valid.sum())
    seq_acc = float((correct | ~valid).all(dim=1).float().mean())
    return token_acc, seq_acc
