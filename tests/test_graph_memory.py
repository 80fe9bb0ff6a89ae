"""No tensor of edges × heads × channels: the fused CPU ops' allocations, forward and backward, seen by
``torch.profiler`` (``profile_memory=True``, every tensor torch allocates; shared/NOTES.md), stay at
the size of node tensors and per-edge scalars. The reference backend, which does materialise
per-edge rows, is measured the same way to show the measurement would catch one."""

from __future__ import annotations

import pytest
import torch
from _graph_support import OPS, make_inputs

from fastattn.graph import _backends

NODES, EDGES, HEADS, CHANNELS = 1000, 40_000, 4, 32
ROW_BYTES = EDGES * HEADS * CHANNELS * 4  # one fp32 edges x heads x channels tensor: 20.5 MB


def _peak_allocation(fn) -> tuple[int, int]:
    """(peak of live CPU allocations, largest single allocation) in bytes during ``fn``.

    Ops report allocations inclusively (a parent repeats its children's), so only leaf ops and the bare
    ``[memory]`` records (frees, and allocations outside any op) are summed, in time order.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.events() if e.cpu_memory_usage and (e.name == "[memory]" or not e.cpu_children)),
        key=lambda e: e.time_range.start,
    )
    assert events, "the profiler recorded no memory events"
    live = peak = largest = 0
    for e in events:
        live += e.cpu_memory_usage
        peak = max(peak, live)
        largest = max(largest, e.cpu_memory_usage)
    return peak, largest


def _step(kind: str, backend: str):
    gen = torch.Generator().manual_seed(0)
    ei = torch.randint(0, NODES, (2, EDGES), generator=gen)
    args, kw = make_inputs(kind, NODES, NODES, EDGES, True, torch.float32, gen, heads=HEADS, channels=CHANNELS)
    inputs = [*args, *kw.values()]

    def step():
        out = OPS[kind](*args, ei, **kw, add_self_loops=True, dropout_p=0.1, backend=backend)
        torch.autograd.grad(out.sum(), inputs)

    return step


@pytest.mark.parametrize("kind", ["dot", "gat", "gatv2"])
def test_fused_cpu_ops_allocate_no_edges_by_heads_by_channels_tensor(kind):
    b = _backends.get("cpu")
    if b.unavailable_reason():
        pytest.skip(b.unavailable_reason())
    step = _step(kind, "cpu")
    step()  # build the graph (cached) and load the library outside the measurement
    peak, largest = _peak_allocation(step)
    assert largest < ROW_BYTES / 8, (peak, largest)  # the largest tensors are node features and E x H scalars
    assert peak < ROW_BYTES / 2, (peak, largest)


def test_the_measurement_sees_a_per_edge_row_tensor():
    peak, largest = _peak_allocation(_step("gatv2", "reference"))
    assert largest >= ROW_BYTES, (peak, largest)
