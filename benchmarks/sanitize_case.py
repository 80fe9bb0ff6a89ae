"""A small CUDA-backend forward and backward for ``compute-sanitizer --tool memcheck`` (``gpu_check.sh``).

Odd lengths (partial tiles at both ends), GQA, causal with a key-padding mask (the tile-summary path)
and a float mask with its gradient: the accesses most likely to stray past an edge. Exit status 0 when
the results also match the float64 oracle; the sanitizer's own exit code reports bad accesses.
``--device cpu`` runs the same case through the emulator (``FASTATTN_CUDA_EMULATE=1``), for the dry run.
"""

from __future__ import annotations

import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE)]

import torch  # noqa: E402

import fastattn  # noqa: E402
from fastattn import reference  # noqa: E402
from fastattn.testing import assert_close  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    b, hq, hkv, lq, lk, d = 2, 4, 2, 77, 93, 64

    def draw(*shape):
        return torch.randn(*shape, generator=gen).to(args.device, torch.float16)

    q, k, v, do = draw(b, hq, lq, d), draw(b, hkv, lk, d), draw(b, hkv, lk, d), draw(b, hq, lq, d)
    pad = (torch.arange(lk) < torch.tensor([80, 93])[:, None]).view(b, 1, 1, lk).to(args.device)
    bias = draw(1, hq, lq, lk)
    for kw, grad_mask in ((dict(attn_mask=pad, is_causal=True, q_offset=16), False), (dict(attn_mask=bias), True)):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        if grad_mask:
            inputs.append(bias.clone().requires_grad_())
        mask = inputs[3] if grad_mask else kw["attn_mask"]
        out = fastattn.scaled_dot_product_attention(*inputs[:3], **{**kw, "attn_mask": mask}, enable_gqa=True,
                                                    backend="cuda")  # fmt: skip
        grads = torch.autograd.grad(out, inputs, do)
        ref_in = [t.detach().double().requires_grad_() for t in inputs]
        ref_mask = ref_in[3] if grad_mask else kw["attn_mask"]
        ref = reference.attention(*ref_in[:3], **{**kw, "attn_mask": ref_mask}, enable_gqa=True)
        ref_grads = torch.autograd.grad(ref, ref_in, do.double())
        assert_close(out, ref, atol=2e-2, name="out")
        for name, g, r in zip(("dq", "dk", "dv", "dmask"), grads, ref_grads):
            assert_close(g, r, atol=3e-2 * max(1.0, float(r.abs().max())), name=name)
    if args.device == "cuda":
        torch.cuda.synchronize()
    print("sanitize_case: cuda backend forward and backward ran and match the oracle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
