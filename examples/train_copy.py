"""Train fastattn's reference Transformer on a toy copy/reverse task on the CPU and print its accuracy.

    python examples/train_copy.py --task reverse --steps 800

Accuracy is measured by greedy decoding with the key/value cache on fresh sequences.
"""

from __future__ import annotations

import argparse
import time

import torch

from fastattn.models import Transformer
from fastattn.models.toy import evaluate, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=["copy", "reverse"], default="reverse")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--min-len", type=int, default=2)
    p.add_argument("--max-len", type=int, default=8)
    p.add_argument("--vocab", type=int, default=13, help="vocabulary size including PAD, BOS, EOS")
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny models run best on one)")
    p.add_argument("--post-norm", action="store_true", help="post-norm layers (default: pre-norm)")
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
        norm_first=not args.post_norm,
        backend=args.backend,
    )
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
    )
    elapsed = time.perf_counter() - start
    token_acc, seq_acc = evaluate(model, args.task, 512, args.min_len, args.max_len, args.vocab)
    print(f"task {args.task}: {args.steps} steps in {elapsed:.1f} s, final loss {losses[-1]:.4f}")
    print(f"greedy decoding accuracy: tokens {token_acc:.3f}, whole sequences {seq_acc:.3f}")


if __name__ == "__main__":
    main()
