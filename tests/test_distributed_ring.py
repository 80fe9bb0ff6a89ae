"""Ring attention over gloo with 2 and 4 CPU processes, against single-process attention from the oracle."""

from __future__ import annotations

import json
import os
import tempfile
import time
import weakref
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _dist_support import leave_together

from fastattn import reference
from fastattn.distributed import ring, ring_attention, shard_sequence, unshard_sequence

CASES = [
    # (name, heads_q, heads_kv, chunk, is_causal, window, padding)
    ("dense", 2, 2, 5, False, None, False),
    ("causal", 2, 2, 3, True, None, False),
    ("gqa_causal", 4, 2, 3, True, None, False),
    ("padding", 2, 2, 4, False, None, True),
    ("causal_padding_gqa", 4, 1, 3, True, None, True),
    ("window", 2, 2, 4, True, (5, 0), False),
    ("window_two_sided", 2, 2, 4, False, (3, 2), True),
]


def _init(rank, world, path, timeout_s=60):
    dist.init_process_group(
        "gloo", init_method=f"file://{path}", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )


def _case_inputs(heads_q, heads_kv, length, padding, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads_q, length, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, heads_kv, length, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, heads_kv, length, 6, generator=g, dtype=torch.float64)
    grad = torch.randn(2, heads_q, length, 6, generator=g, dtype=torch.float64)
    mask = None
    if padding:
        lengths = torch.tensor([length - 3, length])
        mask = (torch.arange(length) < lengths[:, None]).view(2, 1, 1, length)
    return q, k, v, grad, mask


def _check_cases(rank, world, path):
    _init(rank, world, path)
    try:
        for i, (name, hq, hkv, chunk, causal, window, padding) in enumerate(CASES):
            length = chunk * world * (2 if causal else 1)
            q, k, v, grad, mask = _case_inputs(hq, hkv, length, padding, seed=100 + i)
            kw = {"is_causal": causal, "window": window, "enable_gqa": hq != hkv}
            for t in (q, k, v):
                t.requires_grad_()
            expected = reference.attention(q, k, v, mask, **kw)
            expected_grads = torch.autograd.grad(expected, (q, k, v), grad)

            def shard(t, dim=-2, causal=causal):
                return shard_sequence(t.detach(), is_causal=causal, dim=dim)

            ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
            ml = shard(mask, dim=-1) if mask is not None else None
            out = ring_attention(ql, kl, vl, attn_mask=ml, backend="reference", **kw)
            torch.testing.assert_close(out, shard(expected), rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
            grads = torch.autograd.grad(out, (ql, kl, vl), shard(grad))
            for what, got, want in zip("qkv", grads, expected_grads):
                torch.testing.assert_close(
                    got, shard(want), rtol=1e-9, atol=1e-9, msg=lambda m, n=name, w=what: f"{n} d{w}: {m}"
                )
            whole = unshard_sequence(out.detach(), is_causal=causal)
            torch.testing.assert_close(whole, expected.detach(), rtol=1e-10, atol=1e-10)
        leave_together()
    finally:
        dist.destroy_process_group()


def _run(fn, world, *args):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(fn, args=(world, os.path.join(tmp, "store"), *args), nprocs=world, join=True)


@pytest.mark.parametrize("world", [2, 4])
def test_ring_matches_single_process_oracle(world):
    _run(_check_cases, world)


def _check_errors_and_memory(rank, world, path):
    _init(rank, world, path)
    try:
        q = torch.randn(1, 2, 5, 8)
        with pytest.raises(ValueError, match=r"query: expected a sequence length divisible by 4 \(2 × world size 2"):
            ring_attention(q, q, q, is_causal=True)
        with pytest.raises(ValueError, match=r"shard_sequence: expected a sequence length divisible by 2"):
            shard_sequence(torch.randn(1, 2, 7, 8))
        with pytest.raises(ValueError, match="attn_mask: expected this rank's shard of a key-padding mask"):
            ring_attention(q, q, q, attn_mask=torch.ones(1, 1, 5, 5, dtype=torch.bool))

        # Receive buffers alive at once: the shard arriving plus the one in hand, never more.
        live, peak = [0], [0]
        original = ring._Ring.alloc

        def release(nbytes):
            live[0] -= nbytes

        def counting_alloc(self, like):
            t = original(self, like)
            nbytes = t.numel() * t.element_size()
            live[0] += nbytes
            peak[0] = max(peak[0], live[0])
            weakref.finalize(t, release, nbytes)
            return t

        ring._Ring.alloc = counting_alloc
        try:
            length = 2 * world * 16
            q, k, v = (torch.randn(1, 2, length // world, 32) for _ in range(3))
            ring_attention(q, k, v, is_causal=True, backend="reference")
        finally:
            ring._Ring.alloc = original
        shard_bytes = (k.numel() + v.numel()) * k.element_size()
        assert peak[0] <= 2 * shard_bytes, (peak[0], shard_bytes)
        assert peak[0] >= shard_bytes  # the ring did move shards
        leave_together()
    finally:
        dist.destroy_process_group()


def test_errors_and_keys_in_flight_per_rank():
    _run(_check_errors_and_memory, 2)


def _failing_rank(rank, world, path, report):
    _init(rank, world, path, timeout_s=10)
    if rank == 1:
        os._exit(0)  # dies before its first ring step
    start = time.monotonic()
    try:
        q = torch.randn(1, 2, 8, 8)
        ring_attention(q, q, q, backend="reference")
        outcome = {"error": None}
    except RuntimeError as err:
        outcome = {"error": str(err)}
    outcome["seconds"] = time.monotonic() - start
    with open(report, "w") as f:
        json.dump(outcome, f)


def test_a_failed_rank_fails_the_others_instead_of_hanging(tmp_path):
    report = tmp_path / "rank0.json"
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.spawn(_failing_rank, args=(2, os.path.join(tmp, "store"), str(report)), nprocs=2, join=False)
        deadline = time.monotonic() + 90
        while not report.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in ctx.processes:
            p.join(10)
            if p.is_alive():
                p.kill()
    outcome = json.loads(report.read_text())
    assert outcome["error"] is not None and "lost its ring neighbours" in outcome["error"], outcome
    assert outcome["seconds"] < 60


def _strided_shards(rank, world, path):
    _init(rank, world, path)
    try:
        torch.manual_seed(0)
        # (B, L, H, D) storage seen as (B, H, L, D): the layout modules produce; not contiguous.
        q, k, v = (torch.randn(2, 4 * world, 2, 8, dtype=torch.float64).transpose(1, 2) for _ in range(3))
        expected = reference.attention(q, k, v, is_causal=True)
        shards = [shard_sequence(t, is_causal=True).transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
        assert not shards[1].is_contiguous()
        out = ring_attention(*shards, is_causal=True, backend="reference")
        torch.testing.assert_close(out, shard_sequence(expected, is_causal=True), rtol=1e-10, atol=1e-10)
        leave_together()
    finally:
        dist.destroy_process_group()


def test_non_contiguous_shards():
    _run(_strided_shards, 2)
