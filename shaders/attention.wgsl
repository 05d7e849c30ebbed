// Causal grouped-query attention over the KV cache, one workgroup per
// (token, query head). Token t of the step sits at position pos0 + t and
// attends to positions 0..=pos0 + t. Phase 1: invocations stride over
// positions writing scaled scores to `scores`; one barrier; phase 2:
// invocations stride over the head dimension, each recomputing the softmax
// max and sum (cheap, and no reduction barriers, which are slow on software GPUs).

struct Step { pos0: u32, n_tok: u32, top_k: u32, renorm: u32 }
struct Params { n_heads: u32, n_kv: u32, head_dim: u32, max_seq: u32, scale: f32, _p0: u32, _p1: u32, _p2: u32 }

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> s: Step;
@group(0) @binding(1) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> q: array<f32>;
@group(0) @binding(3) var<storage, read> k_cache: array<f32>;
@group(0) @binding(4) var<storage, read> v_cache: array<f32>;
@group(0) @binding(5) var<storage, read_write> scores: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let group = wid.y * nwg.x + wid.x;
    // Uniform across the workgroup, so the early return keeps barriers uniform.
    if (group >= s.n_tok * p.n_heads) { return; }
    let t = group / p.n_heads;
    let h = group % p.n_heads;
    let kvh = h / (p.n_heads / p.n_kv);
    let q_dim = p.n_heads * p.head_dim;
    let kv_dim = p.n_kv * p.head_dim;
    let len = s.pos0 + t + 1u;
    let qb = t * q_dim + h * p.head_dim;
    let sb = group * p.max_seq;
    let kb = kvh * p.head_dim;

    for (var j = lid; j < len; j += WG) {
        var d = 0.0;
        for (var e = 0u; e < p.head_dim; e++) {
            d += q[qb + e] * k_cache[(kb + e) * p.max_seq + j];
        }
        scores[sb + j] = d * p.scale;
    }
    storageBarrier();

    var m = scores[sb];
    for (var j = 1u; j < len; j++) {
        m = max(m, scores[sb + j]);
    }
    var sum = 0.0;
    for (var j = 0u; j < len; j++) {
        sum += exp(scores[sb + j] - m);
    }
    for (var e = lid; e < p.head_dim; e += WG) {
        var acc = 0.0;
        for (var j = 0u; j < len; j++) {
            acc += exp(scores[sb + j] - m) * v_cache[j * kv_dim + kb + e];
        }
        out[qb + e] = acc / sum;
    }
}
