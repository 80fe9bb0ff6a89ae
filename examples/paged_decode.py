"""Continuous batching over a paged key/value cache with ``fastattn.kvcache_attention``.

A small serving loop on the reference Transformer (``fastattn.models.Transformer``): requests (a source
sequence and a token budget) arrive in a queue, at most ``--max-batch`` decode together, and every step runs
the decoder on the newest token of each active request. The decoder's self-attention keys and values live in
one pool of pages per layer, ``(num_pages, heads, page_size, head_dim)``: a request takes a page from the free
list when its length crosses a page boundary, its block-table row names its pages in order, and when it
finishes (EOS or budget) its pages go back to the free list, to be reused by the requests that join next.
``kvcache_attention`` appends the step's key and value into the pages in place and attends bottom-right; the
cross-attention reads each request's encoder keys (computed once, when it joins) through the same call, as a
contiguous cache padded to the longest source with ``cache_seqlens`` = the source lengths, non-causal.

Each request's tokens are checked against ``Transformer.generate`` run on that request alone.

    python examples/paged_decode.py                 # CPU, the default backend
    python examples/paged_decode.py --backend reference --requests 12 --page-size 4
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastattn  # noqa: E402
from fastattn.models import Transformer  # noqa: E402
from fastattn.models.transformer import sinusoidal_positions  # noqa: E402

BOS, EOS, PAD = 1, 2, 0


@dataclass
class Request:
    rid: int
    src: torch.Tensor  # (Ls,) token ids
    budget: int  # new tokens at most
    tokens: list = field(default_factory=list)  # BOS, then the generated tokens (the last is the next input)
    pages: list = field(default_factory=list)  # pool pages, in order
    memory_k: list = field(default_factory=list)  # per layer (H, Ls, D): the cross-attention's keys
    memory_v: list = field(default_factory=list)
    length: int = 0  # positions in the self-attention cache

    @property
    def done(self) -> bool:
        return len(self.tokens) - 1 >= self.budget or (len(self.tokens) > 1 and self.tokens[-1] == EOS)


class PagePool:
    """Per layer, key and value pages ``(num_pages, H, page_size, D)``, and one free list for all layers."""

    def __init__(self, model: Transformer, num_pages: int, page_size: int) -> None:
        layer = model.decoder_layers[0].self_attn
        heads, head_dim = layer.num_heads, layer.head_dim
        dtype = next(model.parameters()).dtype
        shape = (num_pages, heads, page_size, head_dim)
        self.keys = [torch.randn(shape, dtype=dtype) for _ in model.decoder_layers]  # never zeros: a misread shows
        self.values = [torch.randn(shape, dtype=dtype) for _ in model.decoder_layers]
        self.page_size = page_size
        self.free = list(range(num_pages - 1, -1, -1))  # a stack: freed pages are the next ones handed out
        self.reused = 0  # pages handed out again after a request freed them
        self._ever = set()

    def take(self) -> int:
        if not self.free:
            raise RuntimeError("page pool exhausted: raise --pages or lower --max-batch")
        page = self.free.pop()
        self.reused += page in self._ever
        self._ever.add(page)
        return page

    def give_back(self, pages: list) -> None:
        self.free.extend(pages)


def join(model: Transformer, req: Request) -> None:
    """Encodes the request's source and caches its cross-attention keys/values per layer."""
    memory, _ = model.encode(req.src.unsqueeze(0))
    for layer in model.decoder_layers:
        _, k, v = layer.cross_attn.project(None, memory, memory)
        req.memory_k.append(k[0])
        req.memory_v.append(v[0])
    req.tokens.append(BOS)


def _pad_stack(rows: list, length: int) -> torch.Tensor:
    """``(B, H, length, D)`` from ``(H, L_b, D)`` rows, padded with noise (never read: cache_seqlens stops before)."""
    out = torch.randn(len(rows), rows[0].shape[0], length, rows[0].shape[2], dtype=rows[0].dtype)
    for b, row in enumerate(rows):
        out[b, :, : row.shape[1]] = row
    return out


def _out_proj(attn, out: torch.Tensor) -> torch.Tensor:
    # (B, H, 1, D) → (B, 1, H, D) → (B, 1, E)
    return F.linear(out.transpose(1, 2).flatten(-2), attn.out_proj.weight, attn.out_proj.bias)


def self_attention(layer, x: torch.Tensor, pages: tuple, backend) -> torch.Tensor:
    """The step's key and value appended into the request's pages, its query attending them (causal)."""
    key_pages, value_pages, seqlens, table = pages
    q, k, v = layer.self_attn.project(x, x, x)
    out = fastattn.kvcache_attention(
        q, key_pages, value_pages, seqlens, key=k, value=v, block_table=table, backend=backend
    )
    return _out_proj(layer.self_attn, out)


def cross_attention(layer, x: torch.Tensor, memory: tuple, backend) -> torch.Tensor:
    """The query attending its request's encoder keys: a contiguous cache, lengths = the source lengths."""
    memory_k, memory_v, src_lengths = memory
    q, _, _ = layer.cross_attn.project(x)
    out = fastattn.kvcache_attention(q, memory_k, memory_v, src_lengths, is_causal=False, backend=backend)
    return _out_proj(layer.cross_attn, out)


def step(model: Transformer, pool: PagePool, active: list, backend) -> None:
    """One decoder step for every active request: append each one's newest position, pick its next token."""
    for req in active:  # a page for the position about to be written, when the last one is full
        if req.length == len(req.pages) * pool.page_size:
            req.pages.append(pool.take())
    width = max(len(r.pages) for r in active)
    # (B, pages_per_seq) int32: row b names request b's pages in order; entries past its pages are never read.
    table = torch.tensor([r.pages + [0] * (width - len(r.pages)) for r in active], dtype=torch.int32)
    seqlens = torch.tensor([r.length for r in active], dtype=torch.int32)
    src_lengths = torch.tensor([r.src.shape[0] for r in active], dtype=torch.int32)
    tokens = torch.tensor([[r.tokens[-1]] for r in active])
    positions = seqlens.long()
    y = model.tgt_embed(tokens) * math.sqrt(model.d_model)
    y = y + sinusoidal_positions(positions, model.d_model, y.dtype).unsqueeze(1)  # (B, 1, E)
    for i, layer in enumerate(model.decoder_layers):
        memory = (
            _pad_stack([r.memory_k[i] for r in active], int(src_lengths.max())),
            _pad_stack([r.memory_v[i] for r in active], int(src_lengths.max())),
            src_lengths,
        )
        pages = (pool.keys[i], pool.values[i], seqlens, table)
        if layer.norm_first:
            y = y + self_attention(layer, layer.norm1(y), pages, backend)
            y = y + cross_attention(layer, layer.norm2(y), memory, backend)
            y = y + layer.ff(layer.norm3(y))
        else:
            y = layer.norm1(y + self_attention(layer, y, pages, backend))
            y = layer.norm2(y + cross_attention(layer, y, memory, backend))
            y = layer.norm3(y + layer.ff(y))
    logits = model.generator(model.decoder_norm(y))[:, -1]
    for req, nxt in zip(active, logits.argmax(-1).tolist()):
        req.length += 1
        req.tokens.append(nxt)


def serve(model: Transformer, requests: list, pool: PagePool, max_batch: int, backend) -> int:
    """Runs the queue to the end; returns the number of steps."""
    queue, active, steps = deque(requests), [], 0
    while queue or active:
        while queue and len(active) < max_batch:  # requests join as slots free up
            req = queue.popleft()
            join(model, req)
            active.append(req)
        step(model, pool, active, backend)
        steps += 1
        for req in [r for r in active if r.done]:  # requests leave; their pages are reused
            pool.give_back(req.pages)
            req.pages = []
            active.remove(req)
    return steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--pages", type=int, default=24)
    ap.add_argument("--max-new", type=int, default=40)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    model = Transformer(32, d_model=64, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=128,
                        dropout=0.0, pad_id=PAD, backend=args.backend).eval()  # fmt: skip
    g = torch.Generator().manual_seed(args.seed)
    requests = []
    for rid in range(args.requests):
        length = int(torch.randint(3, 20, (1,), generator=g))
        src = torch.randint(3, 32, (length,), generator=g)
        budget = int(torch.randint(args.max_new // 4, args.max_new + 1, (1,), generator=g))
        requests.append(Request(rid, src, budget))
    pool = PagePool(model, args.pages, args.page_size)
    with torch.inference_mode():
        steps = serve(model, requests, pool, args.max_batch, args.backend)
        mismatched = 0
        for req in requests:
            alone = model.generate(req.src.unsqueeze(0), bos_id=BOS, eos_id=EOS, max_new_tokens=req.budget)[0].tolist()
            got = req.tokens[1:]
            if EOS in alone:
                alone = alone[: alone.index(EOS) + 1]
            if got != alone:
                mismatched += 1
                print(f"request {req.rid}: batched {got} != alone {alone}")
    print(
        f"{len(requests)} requests, {steps} steps, max batch {args.max_batch}, {args.pages} pages of "
        f"{args.page_size}: {pool.reused} page reuses, {len(pool.free)} pages free at the end; "
        f"{len(requests) - mismatched} of {len(requests)} match generate() run alone"
    )
    reuse_expected = len(requests) > args.max_batch
    return 1 if mismatched or len(pool.free) != args.pages or (reuse_expected and not pool.reused) else 0


if __name__ == "__main__":
    sys.exit(main())
