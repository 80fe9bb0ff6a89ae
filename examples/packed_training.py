"""Padding-free training: fastattn's reference Transformer trained on packed documents, on the CPU.

    python examples/packed_training.py --task reverse --steps 600

Each batch's documents (sources and targets of 2..max-len tokens) are laid end to end with ``cu_seqlens``
offsets instead of being padded to the longest: every attention runs ``fastattn.varlen_attention`` (the
encoder's and the decoder's self-attention within each document, the cross-attention from each target to its
own source), so no padding is computed and no document sees another. The trained model then decodes
ordinary padded batches with ``generate()``; the accuracy printed is measured that way on fresh sequences.
"""

from __future__ import annotations

import argparse
import time

import torch

from fastattn.models import Transformer
from fastattn.models.toy import evaluate, loss_fn, make_batch, pack, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=["copy", "reverse"], default="reverse")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--min-len", type=int, default=2)
    p.add_argument("--max-len", type=int, default=8)
    p.add_argument("--vocab", type=int, default=13, help="vocabulary size including PAD, BOS, EOS")
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny models run best on one)")
    p.add_argument("--backend", default=None, help="a name from fastattn.backends.names() (default: automatic)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = Transformer(
        args.vocab,
        d_model=args.d_model,
        nhead=args.heads,
        num_encoder_layers=args.layers,
        num_decoder_layers=args.layers,
        dim_feedforward=4 * args.d_model,
        dropout=0.0,
        backend=args.backend,
    )

    # The packed and the padded form of one batch give the same loss: packing changes the layout, not the model.
    batch = make_batch(args.task, 8, args.min_len, args.max_len, args.vocab, torch.Generator().manual_seed(5))
    packed = pack(batch)
    with torch.no_grad():
        padded_loss, packed_loss = loss_fn(model, batch).item(), loss_fn(model, packed).item()
    tokens = batch.tgt_in.numel() + batch.src.numel()
    print(f"one batch: padded loss {padded_loss:.6f}, packed loss {packed_loss:.6f}")
    print(f"tokens computed: padded {tokens}, packed {packed.tgt_in.numel() + packed.src.numel()}")

    start = time.perf_counter()
    losses = train(
        model,
        args.task,
        args.steps,
        args.batch,
        args.min_len,
        args.max_len,
        args.vocab,
        lr=args.lr,
        seed=args.seed,
        log_every=max(1, args.steps // 10),
        packed=True,
    )
    elapsed = time.perf_counter() - start
    token_acc, seq_acc = evaluate(model, args.task, 512, args.min_len, args.max_len, args.vocab)
    print(f"task {args.task}: {args.steps} packed steps in {elapsed:.1f} s, final loss {losses[-1]:.4f}")
    print(f"greedy decoding accuracy: tokens {token_acc:.3f}, whole sequences {seq_acc:.3f}")


if __name__ == "__main__":
    main()
