// f16 weights: W and Wo packed two halves per u32 (rows = q_dim + 2 kv_dim
// is even; Wo's rows padded to even, wo_stride), read with unpack2x16float
// (no shader-f16 needed). Otherwise as attn_decode.wgsl.
// One decoded token's attention block in one dispatch, one workgroup per
// query head: RMSNorm(x) -> this head's q and its kv head's k and v
// (W = [Wq; Wk; Wv] stored transposed, [hidden][q_dim + 2 kv_dim]) -> RoPE
// (rotate-half) on q and k -> k and v appended to the KV cache at position
// pos0 -> causal attention over positions 0..=pos0 (online softmax over
// tiles of WG positions in workgroup memory) -> this head's share of the
// output projection: part[head][r] = sum_e Wo[r][head * head_dim + e] * o[e]
// (Wo stored transposed, [q_dim][wo_stride], wo_stride = hidden, or hidden
// rounded up to even for f16). The next kernels add x + sum over heads of
// part (expert_up for its input, expert_down for the residual), so the
// o_proj needs no dispatch of its own.
// The heads of one kv group each compute (and write) the same k and v row;
// a workgroup reads the cache only at positions < pos0 (written by earlier
// dispatches) and its own k/v row from workgroup memory, so the identical
// writes never race a read. Decode only (n_tok = 1): a batch's later tokens
// would read cache rows other workgroups write in the same dispatch.
// Limits: hidden <= MAX_HIDDEN, head_dim <= MAX_HEAD_DIM and even, WG <= 256
// (about 14 KiB of workgroup memory). k_cache is [kv_dim][max_seq], v_cache
// [max_seq][kv_dim], as the unfused kernels.

struct Step { pos0: u32, n_tok: u32, top_k: u32, renorm: u32 }
struct Params { hidden: u32, n_heads: u32, n_kv: u32, head_dim: u32, max_seq: u32, eps: f32, scale: f32, wo_stride: u32 }

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
@group(0) @binding(8) var<storage, read> wo: array<u32>;
@group(0) @binding(9) var<storage, read_write> part: array<f32>;

var<workgroup> xn: array<f32, MAX_HIDDEN>;
var<workgroup> qs: array<f32, MAX_HEAD_DIM>;
var<workgroup> ks: array<f32, MAX_HEAD_DIM>;
var<workgroup> vs: array<f32, MAX_HEAD_DIM>;
var<workgroup> acc_s: array<f32, MAX_HEAD_DIM>;
var<workgroup> red: array<f32, 256>;
var<workgroup> tile: array<f32, 256>;

fn wf(i: u32) -> f32 {
    let v = unpack2x16float(w[i >> 1u]);
    return select(v.x, v.y, (i & 1u) == 1u);
}

fn wof(i: u32) -> f32 {
    let v = unpack2x16float(wo[i >> 1u]);
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
        let part_i = u / hd;
        let i = u % hd;
        var r = h * hd + i;
        if (part_i == 1u) { r = q_dim + kvh * hd + i; }
        if (part_i == 2u) { r = q_dim + kv_dim + kvh * hd + i; }
        var a = 0.0;
        for (var c = 0u; c < p.hidden; c++) {
            a += wf(c * rows + r) * xn[c];
        }
        a = a * inv;
        if (part_i == 0u) { qs[i] = a; } else if (part_i == 1u) { ks[i] = a; } else { vs[i] = a; }
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
        acc_s[i] = 0.0;
    }

    // Attention over positions 0..=pos in tiles of WG scores (the new
    // position's k and v from workgroup memory), softmax kept online:
    // running max m and sum l, acc_s rescaled when the max grows.
    let len = pos + 1u;
    var m = -3.0e38;
    var l = 0.0;
    for (var base = 0u; base < len; base += WG) {
        let j = base + lid;
        if (j < len) {
            var d = 0.0;
            if (j == pos) {
                for (var e = 0u; e < hd; e++) { d += qs[e] * ks[e]; }
            } else {
                for (var e = 0u; e < hd; e++) { d += qs[e] * k_cache[(kb + e) * p.max_seq + j]; }
            }
            tile[lid] = d * p.scale;
        }
        workgroupBarrier();
        let cnt = min(WG, len - base);
        var tm = m;
        for (var i = 0u; i < cnt; i++) { tm = max(tm, tile[i]); }
        let corr = exp(m - tm);
        var ts = 0.0;
        for (var i = 0u; i < cnt; i++) { ts += exp(tile[i] - tm); }
        l = l * corr + ts;
        for (var e = lid; e < hd; e += WG) {
            var a = acc_s[e] * corr;
            for (var i = 0u; i < cnt; i++) {
                let jj = base + i;
                var vv = vs[e];
                if (jj != pos) { vv = v_cache[jj * kv_dim + kb + e]; }
                a += exp(tile[i] - tm) * vv;
            }
            acc_s[e] = a;
        }
        m = tm;
        workgroupBarrier();
    }
    for (var e = lid; e < hd; e += WG) {
        acc_s[e] = acc_s[e] / l;
    }
    workgroupBarrier();

    // This head's share of the output projection.
    for (var r = lid; r < p.hidden; r += WG) {
        var a = 0.0;
        for (var e = 0u; e < hd; e++) {
            a += wof((h * hd + e) * p.wo_stride + r) * acc_s[e];
        }
        part[h * p.hidden + r] = a;
    }
}
