"""Node classification with a two-layer GATv2 on fastattn's fused graph attention (no download).

    python examples/graph_node_classification.py [--nodes 3000] [--classes 5] [--epochs 100] [--backend cpu]

The graph is synthetic: a stochastic block model (each node's class is its community; an edge joins two
nodes of the same class with probability ``--p-in`` and of different classes with ``--p-out``), and
node features are weak class signals under noise, so that a layer must pool its neighbours to classify
well. ``fastattn.nn.GATv2Conv`` takes PyTorch Geometric's arguments and parameter names (its
``state_dict`` loads into PyG's ``GATv2Conv``), and PyG is not needed. The graph's layout is built on the
first step and reused on every later one (the same ``edge_index`` tensor).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from fastattn.nn import GATv2Conv


def synthetic_graph(nodes: int, classes: int, p_in: float, p_out: float, features: int, seed: int):
    """``(x (N, F), edge_index (2, E), y (N,))``: a stochastic block model with noisy class features."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (nodes,), generator=gen)
    # Sample edges block by block without an N x N matrix: expected counts, then uniform endpoints.
    src, dst = [], []
    members = [torch.nonzero(y == c).flatten() for c in range(classes)]
    for a in range(classes):
        for b in range(classes):
            p = p_in if a == b else p_out
            count = int(torch.poisson(torch.tensor(p * len(members[a]) * len(members[b])), generator=gen))
            src.append(members[a][torch.randint(0, len(members[a]), (count,), generator=gen)])
            dst.append(members[b][torch.randint(0, len(members[b]), (count,), generator=gen)])
    edge_index = torch.stack([torch.cat(src), torch.cat(dst)])
    centers = torch.randn(classes, features, generator=gen)
    x = 0.4 * centers[y] + torch.randn(nodes, features, generator=gen)
    return x, edge_index, y


class GATv2(nn.Module):
    """Two GATv2 layers (Brody et al.): 8 heads of 8 channels, then one head per class."""

    def __init__(
        self, features: int, classes: int, hidden: int = 8, heads: int = 8, dropout: float = 0.5, backend=None
    ):
        super().__init__()
        self.dropout = dropout
        self.conv1 = GATv2Conv(features, hidden, heads=heads, dropout=dropout, backend=backend)
        self.conv2 = GATv2Conv(hidden * heads, classes, heads=1, concat=False, dropout=dropout, backend=backend)

    def forward(self, x, edge_index):
        x = F.dropout(x, self.dropout, self.training)
        x = F.elu(self.conv1(x, edge_index))
        x = F.dropout(x, self.dropout, self.training)
        return self.conv2(x, edge_index)


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3000)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--p-in", type=float, default=0.01)
    parser.add_argument("--p-out", type=float, default=0.001)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--backend", default=None, help="graph backend: cpu, triton or reference (default: automatic)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    x, edge_index, y = synthetic_graph(args.nodes, args.classes, args.p_in, args.p_out, args.features, args.seed)
    perm = torch.randperm(args.nodes)
    train, val, test = perm[: args.nodes // 5], perm[args.nodes // 5 : args.nodes // 2], perm[args.nodes // 2 :]
    sizes = f"train/val/test {len(train)}/{len(val)}/{len(test)}"
    print(f"{args.nodes} nodes, {edge_index.shape[1]} edges, {args.classes} classes; {sizes}")

    model = GATv2(args.features, args.classes, backend=args.backend)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.005, weight_decay=5e-4)

    def accuracy(logits, idx):
        return float((logits[idx].argmax(-1) == y[idx]).float().mean())

    best_val, test_at_best = 0.0, 0.0
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x, edge_index)[train], y[train])
        loss.backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            logits = model(x, edge_index)
        val_acc, test_acc = accuracy(logits, val), accuracy(logits, test)
        if val_acc > best_val:
            best_val, test_at_best = val_acc, test_acc
        if epoch % 10 == 0 or epoch == 1:
            train_acc = accuracy(logits, train)
            accs = f"train {train_acc:.3f}  val {val_acc:.3f}  test {test_acc:.3f}"
            print(f"epoch {epoch:3d}  loss {loss.item():.3f}  {accs}")
    seconds = time.perf_counter() - start
    print(f"best val {best_val:.3f}, test there {test_at_best:.3f}; {seconds / args.epochs * 1e3:.1f} ms per epoch")
    return test_at_best


if __name__ == "__main__":
    main()
