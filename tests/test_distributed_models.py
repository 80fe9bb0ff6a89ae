"""Context parallelism through the modules: MultiheadAttention and the reference Transformer, 2 gloo processes."""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _dist_support import leave_together

import fastattn
from fastattn.distributed import shard_sequence
from fastattn.models import Transformer


def _modules(rank, world, path):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # fmt: skip
    try:
        group = dist.group.WORLD
        torch.manual_seed(0)  # the same weights and inputs on every rank

        # MultiheadAttention: key padding, batch-first and not, against the same module unsharded.
        mha = fastattn.MultiheadAttention(16, 4, batch_first=True, backend="reference", dtype=torch.float64)
        cp = fastattn.MultiheadAttention(
            16, 4, batch_first=True, backend="reference", dtype=torch.float64, context_parallel_group=group
        )
        cp.load_state_dict(mha.state_dict())
        x = torch.randn(2, 12, 16, dtype=torch.float64)
        pad = torch.arange(12) >= torch.tensor([9, 12])[:, None]  # torch convention: True = ignore
        full, _ = mha(x, x, x, key_padding_mask=pad, need_weights=False)
        local, _ = cp(shard_sequence(x, dim=1), shard_sequence(x, dim=1), shard_sequence(x, dim=1),
                      key_padding_mask=shard_sequence(pad, dim=1), need_weights=False)  # fmt: skip
        torch.testing.assert_close(local, shard_sequence(full, dim=1), rtol=1e-10, atol=1e-10)
        with pytest.raises(ValueError, match="need_weights: attention weights need the whole sequence"):
            cp(x, x, x)

        # The reference Transformer: logits and parameter gradients equal the single-process model's.
        kw = dict(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32, dropout=0.0)
        model = Transformer(11, backend="reference", dtype=torch.float64, **kw)
        cp_model = Transformer(11, backend="reference", dtype=torch.float64, context_parallel_group=group, **kw)
        cp_model.load_state_dict(model.state_dict())
        src, tgt = torch.randint(1, 11, (2, 10)), torch.randint(1, 11, (2, 8))
        src_len, tgt_len = torch.tensor([7, 10]), torch.tensor([8, 5])
        weights = torch.randn(2, 8, 11, dtype=torch.float64)

        logits = model(src, tgt, src_len, tgt_len)
        (logits * weights).sum().backward()
        local = cp_model(shard_sequence(src, dim=1), shard_sequence(tgt, is_causal=True, dim=1), src_len, tgt_len)
        torch.testing.assert_close(local, shard_sequence(logits, is_causal=True, dim=1), rtol=1e-9, atol=1e-9)
        (local * shard_sequence(weights, is_causal=True, dim=1)).sum().backward()
        for (name, p), q in zip(cp_model.named_parameters(), model.parameters()):
            grad = p.grad.clone()
            dist.all_reduce(grad)  # each rank's loss covers its shard: the sum is the whole loss's gradient
            torch.testing.assert_close(grad, q.grad, rtol=1e-8, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}")
        with pytest.raises(ValueError, match="generate: not supported with context_parallel_group"):
            cp_model.generate(src, bos_id=1)
        leave_together()
    finally:
        dist.destroy_process_group()


def test_context_parallel_modules_match_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_modules, args=(2, os.path.join(tmp, "store")), nprocs=2, join=True)
