"""An attention computation independent of fastattn's oracle: numpy, float64, one row at a time."""

from __future__ import annotations

import math

import numpy as np
import torch


def row_by_row(q, k, v, scale, causal, window, q_offset, bool_mask, float_mask):
    """Each output row from an explicit list of the keys it may see (numpy, float64, loops)."""
    q, k, v = (t.numpy() for t in (q, k, v))
    lq, lk = q.shape[0], k.shape[0]
    out = np.zeros((lq, v.shape[1]))
    lse = np.full(lq, -math.inf)
    left, right = window
    for i in range(lq):
        pos = i + q_offset
        keys = [
            j
            for j in range(lk)
            if (not causal or j <= pos)
            and (left < 0 or j >= pos - left)
            and (right < 0 or j <= pos + right)
            and (bool_mask is None or bool(bool_mask[i, j]))
        ]
        if not keys:
            continue
        s = np.array([q[i] @ k[j] * scale + (0.0 if float_mask is None else float(float_mask[i, j])) for j in keys])
        m = s.max()
        lse[i] = m + math.log(np.exp(s - m).sum())
        p = np.exp(s - lse[i])
        out[i] = sum(p_j * v[j] for p_j, j in zip(p, keys))
    return torch.from_numpy(out), torch.from_numpy(lse)
