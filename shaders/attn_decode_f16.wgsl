// f16 weights: W packed two halves per u32 (rows = q_dim + 2 kv_dim is even),
// read with unpack2x16float (no shader-f16 needed). Otherwise as attn_decode.wgsl.
// One decoded token's whole attention input and attention in one dispatch,
// one workgroup per query head: RMSNorm(x) -> this head's q and its kv
// head's k and v (W = [Wq; Wk; Wv] stored transposed, [hidden][q_dim + 2 kv_dim])
// -> RoPE (rotate-half) on q and k -> k and v appended to the KV cache at
// position pos0 -> causal attention over positions 0..=pos0 -> out[head].
// The heads of one kv group each compute (and write) the same k and v row;
// a workgroup reads the cache only at positions < pos0 (written by earlier
// dispatches) and its own k/v row from workgroup memory, so the identical
// writes never race a read. Decode only (n_tok = 1): a batch's later tokens
// would read cache rows other workgroups write in the same dispatch.
// Limits: hidden <= MAX_HIDDEN, head_dim <= MAX_HEAD_DIM and even, WG <= 256
// (12 KiB of workgroup memory). k_cache is [kv_dim][max_seq], v_cache
// [max_seq][kv_dim], scores [n_heads][max_seq] scratch, as the unfused kernels.

struct Step { pos0: u32, n_tok: u32, top_k: u32, renorm: u32 }
struct Params { hidden: u32, n_heads: u32, n_kv: u32, head_dim: u32, max_seq: u32, eps: f32, scale: f32, _p0: u32 }

const MAX_HIDDEN: u32 = 2048u;
const MAX_HEAD_DIM: u32 = 256u;
override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> s: Step;
@group(0) @binding(1) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read> g: array<f32>;
@group(0) @binding(5) var<storage, read> rope: array<f32>;
@group(0) @binding(6) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(7) var<storage, read_write> v_cache: array<f32>;
@group(0) @binding(8) var<storage, read_write> scores: array<f32>;
@group(0) @binding(9) var<storage, read_write> out: array<f32>;

var<workgroup> xn: array<f32, MAX_HIDDEN>;
var<workgroup> qs: array<f32, MAX_HEAD_DIM>;
var<workgroup> ks: array<f32, MAX_HEAD_DIM>;
var<workgroup> vs: array<f32, MAX_HEAD_DIM>;
var<workgroup> red: array<f32, 256>;

fn wf(i: u32) -> f32 {
    let v = unpack2x16float(w[i >> 1u]);
    return select(v.x, v.y, (i & 1u) == 1u);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let h = wid.y * nwg.x + wid.x;
    // Uniform across the workgroup, so the early return keeps barriers uniform.
    if (h >= p.n_heads) { return; }
    let hd = p.head_dim;
    let half = hd / 2u;
    let kvh = h / (p.n_heads / p.n_kv);
    let q_dim = p.n_heads * hd;
    let kv_dim = p.n_kv * hd;
    let rows = q_dim + 2u * kv_dim;
    let pos = s.pos0;

    // RMSNorm: partial sums of squares, then every invocation adds them up.
    var ss = 0.0;
    for (var c = lid; c < p.hidden; c += WG) {
        let v = x[c];
        ss += v * v;
        xn[c] = v * g[c];
    }
    red[lid] = ss;
    workgroupBarrier();
    var tot = 0.0;
    for (var i = 0u; i < WG; i++) { tot += red[i]; }
    let inv = 1.0 / sqrt(tot / f32(p.hidden) + p.eps);

    // This head's q rows and its kv head's k and v rows.
    for (var u = lid; u < 3u * hd; u += WG) {
        let part = u / hd;
        let i = u % hd;
        var r = h * hd + i;
        if (part == 1u) { r = q_dim + kvh * hd + i; }
        if (part == 2u) { r = q_dim + kv_dim + kvh * hd + i; }
        var a = 0.0;
        for (var c = 0u; c < p.hidden; c++) {
            a += wf(c * rows + r) * xn[c];
        }
        a = a * inv;
        if (part == 0u) { qs[i] = a; } else if (part == 1u) { ks[i] = a; } else { vs[i] = a; }
    }
    workgroupBarrier();

    // RoPE on q and k, one rotation pair per invocation.
    for (var i = lid; i < half; i += WG) {
        let ri = (pos * half + i) * 2u;
        let cs = rope[ri];
        let sn = rope[ri + 1u];
        let qa = qs[i];
        let qb = qs[i + half];
        qs[i] = qa * cs - qb * sn;
        qs[i + half] = qb * cs + qa * sn;
        let ka = ks[i];
        let kb = ks[i + half];
        ks[i] = ka * cs - kb * sn;
        ks[i + half] = kb * cs + ka * sn;
    }
    workgroupBarrier();

    // Append to the cache.
    let kb = kvh * hd;
    for (var i = lid; i < hd; i += WG) {
        k_cache[(kb + i) * p.max_seq + pos] = ks[i];
        v_cache[pos * kv_dim + kb + i] = vs[i];
    }

    // Scores over positions 0..=pos (the new one from workgroup memory).
    let len = pos + 1u;
    let sb = h * p.max_seq;
    for (var j = lid; j < len; j += WG) {
        var d = 0.0;
        if (j == pos) {
            for (var e = 0u; e < hd; e++) { d += qs[e] * ks[e]; }
        } else {
            for (var e = 0u; e < hd; e++) { d += qs[e] * k_cache[(kb + e) * p.max_seq + j]; }
        }
        scores[sb + j] = d * p.scale;
    }
    storageBarrier();

    // Softmax statistics (each invocation, as attention.wgsl), then the
    // weighted sum of v, one head dimension per invocation.
    var m = scores[sb];
    for (var j = 1u; j < len; j++) { m = max(m, scores[sb + j]); }
    var sum = 0.0;
    for (var j = 0u; j < len; j++) { sum += exp(scores[sb + j] - m); }
    for (var e = lid; e < hd; e += WG) {
        var acc = 0.0;
        for (var j = 0u; j < pos; j++) {
            acc += exp(scores[sb + j] - m) * v_cache[j * kv_dim + kb + e];
        }
        acc += exp(scores[sb + pos] - m) * vs[e];
        out[h * hd + e] = acc / sum;
    }
}
