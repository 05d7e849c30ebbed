// A random Mixtral checkpoint of any shape, written by node (Hugging Face
// layout: config.json, model.safetensors in F32 with the HF tensor names,
// the default model's tokenizer.json), streamed tensor by tensor: the test
// and the benchmark of tests/e2e/scale.mjs serve it as a relay's genesis.
// The same scales as web_node::model::random (embeddings ±1, routers
// ±3/√fan_in, matrices ±√3/√fan_in, norms 1 ± 0.1), from a seeded PRNG.

import fs from 'node:fs';
import path from 'node:path';

import { REPO } from './lib.mjs';

/** mulberry32: a small deterministic PRNG, uniform in [-1, 1). */
function rng(seed) {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (((t ^ (t >>> 14)) >>> 0) / 2147483648) - 1;
  };
}

/**
 * Write the model into `dir`. Resolves { dir, config, bytes (safetensors
 * size), expertBytes (one expert's F32 bytes), blocks (chain-B blocks) }.
 */
export function writeRandomMixtral(dir, { layers = 16, experts = 64, topK = 8, hidden = 16, inter = 32, heads = 4, kvHeads = 2, seed = 1 } = {}) {
  const tok = path.join(REPO, 'models', 'default', 'tokenizer.json');
  const vocab = 512; // the default model's tokenizer
  const headDim = hidden / heads;
  if (!Number.isInteger(headDim) || headDim % 2) throw new Error(`hidden ${hidden} must split into ${heads} heads of an even size`);
  fs.mkdirSync(dir, { recursive: true });
  const config = {
    architectures: ['MixtralForCausalLM'],
    bos_token_id: 0,
    eos_token_id: 1,
    head_dim: headDim,
    hidden_act: 'silu',
    hidden_size: hidden,
    intermediate_size: inter,
    max_position_embeddings: 256,
    model_type: 'mixtral',
    num_attention_heads: heads,
    num_experts_per_tok: topK,
    num_hidden_layers: layers,
    num_key_value_heads: kvHeads,
    num_local_experts: experts,
    rms_norm_eps: 1e-5,
    rope_theta: 10000.0,
    sliding_window: null,
    tie_word_embeddings: false,
    torch_dtype: 'float32',
    vocab_size: vocab,
  };
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(config, null, 2));
  fs.copyFileSync(tok, path.join(dir, 'tokenizer.json'));

  // Tensors: [name, shape, kind] in slot order.
  const q = heads * headDim;
  const kv = kvHeads * headDim;
  const tensors = [['model.embed_tokens.weight', [vocab, hidden], 'embed']];
  for (let l = 0; l < layers; l++) {
    const p = `model.layers.${l}`;
    tensors.push([`${p}.input_layernorm.weight`, [hidden], 'norm']);
    tensors.push([`${p}.post_attention_layernorm.weight`, [hidden], 'norm']);
    tensors.push([`${p}.self_attn.q_proj.weight`, [q, hidden], 'mat']);
    tensors.push([`${p}.self_attn.k_proj.weight`, [kv, hidden], 'mat']);
    tensors.push([`${p}.self_attn.v_proj.weight`, [kv, hidden], 'mat']);
    tensors.push([`${p}.self_attn.o_proj.weight`, [hidden, q], 'mat']);
  }
  tensors.push(['model.norm.weight', [hidden], 'norm']);
  tensors.push(['lm_head.weight', [vocab, hidden], 'mat']);
  for (let l = 0; l < layers; l++) {
    const p = `model.layers.${l}.block_sparse_moe`;
    tensors.push([`${p}.gate.weight`, [experts, hidden], 'router']);
    for (let e = 0; e < experts; e++) {
      tensors.push([`${p}.experts.${e}.w1.weight`, [inter, hidden], 'mat']);
      tensors.push([`${p}.experts.${e}.w2.weight`, [hidden, inter], 'mat']);
      tensors.push([`${p}.experts.${e}.w3.weight`, [inter, hidden], 'mat']);
    }
  }
  const header = {};
  let at = 0;
  for (const [name, shape] of tensors) {
    const n = shape.reduce((a, b) => a * b, 1) * 4;
    header[name] = { dtype: 'F32', shape, data_offsets: [at, at + n] };
    at += n;
  }
  let json = JSON.stringify(header);
  while ((8 + json.length) % 8) json += ' ';
  const fd = fs.openSync(path.join(dir, 'model.safetensors'), 'w');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  fs.writeSync(fd, len);
  fs.writeSync(fd, Buffer.from(json));
  const r = rng(seed);
  for (const [, shape, kind] of tensors) {
    const n = shape.reduce((a, b) => a * b, 1);
    const fanIn = shape.length > 1 ? shape[1] : 1;
    const scale = kind === 'embed' ? 1 : kind === 'router' ? 3 / Math.sqrt(fanIn) : Math.sqrt(3) / Math.sqrt(fanIn);
    const a = new Float32Array(n);
    for (let i = 0; i < n; i++) a[i] = kind === 'norm' ? 1 + 0.1 * r() : scale * r();
    fs.writeSync(fd, Buffer.from(a.buffer));
  }
  fs.closeSync(fd);
  return { dir, config, bytes: 8 + json.length + at, expertBytes: 3 * hidden * inter * 4, blocks: 1 + layers * (1 + experts) };
}
