"""A small Llama under ``attn_implementation="fastattn"``, checked against "eager" and "sdpa".

Builds the model from a config (random weights, no download), runs a left-padded batch under the
three implementations with the same weights, and prints the largest logit difference at the
non-padding positions, then checks that greedy generation picks the same tokens.

    pip install -e ".[transformers]"   # or PYTHONPATH=. from a checkout
    python examples/transformers_llama.py
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import fastattn.integrations.transformers as fastattn_hf  # noqa: E402


def main() -> None:
    fastattn_hf.register()  # "fastattn" is now an attn_implementation
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,  # GQA: 4 query heads per key/value head
        max_position_embeddings=512,
    )
    models = {}
    for name in ("eager", "sdpa", "fastattn"):
        # _from_config stores the implementation in the config it gets: give each model its own copy.
        models[name] = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation=name).eval()
        if name != "eager":
            models[name].load_state_dict(models["eager"].state_dict())

    batch, seqlen = 4, 77
    input_ids = torch.randint(1, config.vocab_size, (batch, seqlen))
    attention_mask = torch.ones_like(input_ids)
    for row in range(batch):
        attention_mask[row, : 9 * row] = 0  # left padding: 0, 9, 18, 27 tokens
    keep = attention_mask.bool()

    with torch.no_grad():
        logits = {name: m(input_ids=input_ids, attention_mask=attention_mask).logits for name, m in models.items()}
    print(f"Llama, {config.num_hidden_layers} layers, {batch} x {seqlen} tokens (left-padded), float32")
    print(f"logits scale: {logits['eager'][keep].abs().max():.3f}")
    for ref in ("eager", "sdpa"):
        diff = (logits["fastattn"][keep] - logits[ref][keep]).abs().max()
        print(f"largest |fastattn - {ref}| logit difference: {diff:.3e}")
    print(
        f"largest |sdpa - eager| logit difference:     {(logits['sdpa'][keep] - logits['eager'][keep]).abs().max():.3e}"
    )

    args = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False)
    same = torch.equal(models["fastattn"].generate(**args), models["eager"].generate(**args))
    print(f"greedy generate, 8 new tokens with the key/value cache: {'same tokens' if same else 'DIFFERENT tokens'}")


if __name__ == "__main__":
    main()
