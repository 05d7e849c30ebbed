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
// (about 5 KiB of workgroup memory). k_cache is [kv_dim][max_seq], v_cache
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

var<workgroup> qs: array<f32, MAX_HEAD_DIM>;
var<workgroup> ks: array<f32, MAX_HEAD_DIM>;
var<workgroup> vs: array<f32, MAX_HEAD_DIM>;
var<workgroup> acc_s: array<f32, MAX_HEAD_DIM>;
var<workgroup> tile: array<f32, 256>;
var<workgroup> tile_e: array<f32, 256>;

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

    // Barriers are few on purpose (slow on software adapters): none for
    // the norm (each invocation sums the squares itself, as qkv_rope.wgsl),
    // RoPE applied by the invocation that owns both rows of a pair.
    // Units: q pairs (half), k pairs (half), v rows (head_dim).
    for (var u = lid; u < 2u * hd; u += WG) {
        var r1 = 0u;
        var pair = true;
        var i = u;
        if (u < half) {
            r1 = h * hd + i;
        } else if (u < hd) {
            i = u - half;
            r1 = q_dim + kvh * hd + i;
        } else {
            i = u - hd;
            r1 = q_dim + kv_dim + kvh * hd + i;
            pair = false;
        }
        let r2 = r1 + half;
        var ss = 0.0;
        var a = 0.0;
        var b = 0.0;
        if (pair) {
            for (var c = 0u; c < p.hidden; c++) {
                let xv = x[c];
                ss += xv * xv;
                let xg = xv * g[c];
                a += wf(c * rows + r1) * xg;
                b += wf(c * rows + r2) * xg;
            }
        } else {
            for (var c = 0u; c < p.hidden; c++) {
                let xv = x[c];
                ss += xv * xv;
                a += wf(c * rows + r1) * (xv * g[c]);
            }
        }
        let inv = 1.0 / sqrt(ss / f32(p.hidden) + p.eps);
        a = a * inv;
        b = b * inv;
        if (!pair) {
            vs[i] = a;
        } else {
            let ri = (pos * half + i) * 2u;
            let cs = rope[ri];
            let sn = rope[ri + 1u];
            let o1 = a * cs - b * sn;
            let o2 = b * cs + a * sn;
            if (u < half) {
                qs[i] = o1;
                qs[i + half] = o2;
            } else {
                ks[i] = o1;
                ks[i + half] = o2;
            }
        }
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
        // The previous tile's readers are done before it is overwritten.
        if (base > 0u) { workgroupBarrier(); }
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
        // One exp per position (exps dominate on software adapters).
        if (lid < cnt) { tile_e[lid] = exp(tile[lid] - tm); }
        workgroupBarrier();
        let corr = exp(m - tm);
        var ts = 0.0;
        for (var i = 0u; i < cnt; i++) { ts += tile_e[i]; }
        l = l * corr + ts;
        for (var e = lid; e < hd; e += WG) {
            var a = acc_s[e] * corr;
            for (var i = 0u; i < cnt; i++) {
                let jj = base + i;
                var vv = vs[e];
                if (jj != pos) { vv = v_cache[jj * kv_dim + kb + e]; }
                a += tile_e[i] * vv;
            }
            acc_s[e] = a;
        }
        m = tm;
    }
    workgroupBarrier();

    // This head's share of the output projection (l, the softmax sum, is
    // the same in every invocation).
    let inv_l = 1.0 / l;
    for (var r = lid; r < p.hidden; r += WG) {
        var a = 0.0;
        for (var e = 0u; e < hd; e++) {
            a += wof((h * hd + e) * p.wo_stride + r) * acc_s[e];
        }
        part[h * p.hidden + r] = a * inv_l;
    }
}
