#!/usr/bin/env python3
"""Hugging Face transformers' CPU decode rate on a checkpoint, for the scale
benchmark (issue 22) to print beside `aiblock chat`'s. Not part of any test.

    python3 scripts/bench_transformers.py MODEL_DIR [--tokens 16] [--threads 2]
        [--warmup 4] [--prompt "The chain"] [--dtype float32]

Loads the directory with AutoModelForCausalLM (Mixtral or OLMoE layout),
sets torch's thread count, prefills the prompt, runs --warmup (default 4)
untimed decode steps, then greedy-decodes exactly --tokens more tokens
(EOS ignored) and prints one line:

    RESULT transformers decode_tok_per_s=... prefill_ms=... tokens=N threads=T dtype=...
"""

import argparse
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=4, help="untimed decode steps first")
    ap.add_argument("--prompt", default="The chain")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    a = ap.parse_args()
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        print(f"transformers not available: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=dtype)
    model.eval()
    load_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(a.model)
    ids = tok(a.prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        # Prefill and the first token.
        t1 = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill_ms = (time.perf_counter() - t1) * 1000
        past = out.past_key_values
        nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
        # Warm-up decode steps, untimed: torch's first single-token calls
        # (the experts' grouped matmuls among them) are several times
        # slower than the steady state and would dominate a short run.
        for _ in range(a.warmup):
            out = model(nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
        t2 = time.perf_counter()
        for _ in range(a.tokens):
            out = model(nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
        dt = time.perf_counter() - t2
    print(
        f"RESULT transformers decode_tok_per_s={a.tokens / dt:.2f} prefill_ms={prefill_ms:.1f} "
        f"tokens={a.tokens} warmup={a.warmup} threads={a.threads} dtype={a.dtype} load_s={load_s:.1f} "
        f"torch={torch.__version__}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
