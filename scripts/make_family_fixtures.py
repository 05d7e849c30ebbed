#!/usr/bin/env python3
"""Ground-truth fixtures for the non-Mixtral MoE families (OLMoE, Qwen2-MoE,
Qwen3-MoE), made with Hugging Face transformers on tiny random float32
checkpoints.

For each fixture it writes, under web-node/tests/fixtures/families/<name>/:
  config.json        the transformers config (save_pretrained)
  model.safetensors  the weights, Hugging Face tensor names (save_pretrained)
  reference.json     input ids, the last position's logits (full vector) and
                     16 greedy tokens from model.generate(do_sample=False)

The Rust test web-node/tests/it/families.rs only reads these files; CI never
needs PyTorch. Regenerate with:

  pip install torch transformers safetensors
  python3 scripts/make_family_fixtures.py
"""

import json
import math
import os
import shutil
import sys
import tempfile

import torch
import transformers
from transformers import (
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "web-node", "tests", "fixtures", "families")

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    dtype="float32",
)

FIXTURES = {
    # OLMoE: q/k norm over the whole projection, top-k without renormalisation.
    "olmoe": (
        OlmoeConfig,
        OlmoeForCausalLM,
        dict(intermediate_size=32, num_experts=8, num_experts_per_tok=4, norm_topk_prob=False),
    ),
    "olmoe_norm_topk": (
        OlmoeConfig,
        OlmoeForCausalLM,
        dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
    ),
    # Qwen2-MoE: q/k/v bias, shared expert with a sigmoid gate.
    "qwen2_moe": (
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        dict(
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
    ),
    # Qwen3-MoE: per-head q/k norm, head_dim (32) != hidden / heads (16).
    "qwen3_moe": (
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        dict(
            head_dim=32,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
    ),
    "qwen3_moe_no_norm_topk": (
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        dict(
            head_dim=32,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
    ),
}

PROMPT = [3, 17, 42, 5, 99, 7, 64, 12, 127, 0, 33]
STEPS = 16


def randomize(model, seed):
    """Weights of order one (HF's 0.02 init gives near-equal logits): norms
    1 +- 0.1, biases 0.1 N(0,1), the embedding N(0,1), routers 3/sqrt(fan_in)
    (spread routing), every other matrix N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * r)
            elif name.endswith(".bias"):
                p.copy_(0.1 * r)
            elif name == "model.embed_tokens.weight":
                p.copy_(r)
            elif name.endswith("mlp.gate.weight"):
                p.copy_(3.0 * r / math.sqrt(p.shape[-1]))
            else:
                p.copy_(r / math.sqrt(p.shape[-1]))


def make(name, cfg_cls, model_cls, extra, seed):
    torch.manual_seed(seed)
    cfg = cfg_cls(**COMMON, **extra)
    model = model_cls(cfg).eval()
    randomize(model, seed)
    out = os.path.join(OUT, name)
    if os.path.exists(out):
        shutil.rmtree(out)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        # What the Rust side reads is what was saved: reload it and take the
        # reference from the reloaded model.
        model = model_cls.from_pretrained(tmp, dtype=torch.float32).eval()
        os.makedirs(out)
        for f in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(tmp, f), os.path.join(out, f))
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = model(ids).logits[0, -1].tolist()
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=STEPS,
            min_new_tokens=STEPS,
        )
    tokens = gen[0, len(PROMPT):].tolist()
    assert len(tokens) == STEPS, tokens
    ref = {
        "model_type": cfg.model_type,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "seed": seed,
        "input_ids": PROMPT,
        "last_logits": logits,
        "greedy_tokens": tokens,
    }
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(ref, f)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"{name}: {size} bytes, greedy {tokens}", file=sys.stderr)


def main():
    torch.set_num_threads(1)
    for seed, (name, (cfg_cls, model_cls, extra)) in enumerate(FIXTURES.items()):
        make(name, cfg_cls, model_cls, extra, 1000 + seed)


if __name__ == "__main__":
    main()
