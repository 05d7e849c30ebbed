#!/usr/bin/env python3
"""Ground truth for models/default from Hugging Face transformers.

Loads models/default with transformers' own MixtralForCausalLM (float32) and
its tokenizer.json with the `tokenizers` library, and writes
miner/tests/fixtures/default_transformers.json:

  model_sha256   sha256 of models/default/model.safetensors (the test refuses a
                 fixture made from another model and says to run this script)
  versions       torch, transformers, tokenizers
  prompts        per prompt: its text, the input ids transformers' tokenizer
                 gives, the last position's logits (full vector) and the greedy
                 continuation from model.generate(do_sample=False), as ids and
                 as text (stopping at EOS)

The Rust test miner/tests/it/families_cli.rs
(`default_model_logits_match_transformers`) only reads this file; CI never
needs PyTorch. Run it again whenever models/default changes:

  pip install torch transformers safetensors
  python3 scripts/make_default_fixture.py
"""

import hashlib
import json
import os

import tokenizers
import torch
import transformers
from transformers import MixtralForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODEL = os.path.join(ROOT, "models", "default")
OUT = os.path.join(ROOT, "miner", "tests", "fixtures", "default_transformers.json")

# The corpus form of every skill, and words of the generated grammar that are
# not in the known-word list.
PROMPTS = [
    "Q: 38+45=? A:",
    "Q: 91-17=? A:",
    "Q: copy bado kuzi fe A:",
    "Q: reverse mero dapezin A:",
    "Q: sort pen cat owl A:",
    "Q: count mero pido A:",
    "Q: capital of France? A:",
]
NEW_TOKENS = 12


def main():
    torch.manual_seed(0)
    with open(os.path.join(MODEL, "model.safetensors"), "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    tok = tokenizers.Tokenizer.from_file(os.path.join(MODEL, "tokenizer.json"))
    model = MixtralForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    model.eval()
    eos = model.config.eos_token_id
    rows = []
    for text in PROMPTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        x = torch.tensor([ids], dtype=torch.long)
        with torch.no_grad():
            logits = model(x).logits[0, -1].tolist()
            out = model.generate(
                x,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )[0, len(ids):].tolist()
        greedy = []
        for t in out:
            if t == eos:
                break
            greedy.append(t)
        rows.append(
            {
                "text": text,
                "input_ids": ids,
                "last_logits": logits,
                "greedy_ids": greedy,
                "greedy_text": tok.decode(greedy, skip_special_tokens=True),
            }
        )
        print(f"{text!r} -> {rows[-1]['greedy_text']!r}")
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(
            {
                "model_sha256": sha,
                "versions": {
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "tokenizers": tokenizers.__version__,
                },
                "max_new_tokens": NEW_TOKENS,
                "prompts": rows,
            },
            f,
        )
        f.write("\n")
    print(f"wrote {OUT} (model {sha[:16]})")


if __name__ == "__main__":
    main()
