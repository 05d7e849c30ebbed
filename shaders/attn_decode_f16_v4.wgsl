// attn_decode_f16.wgsl (f16 weights) with the loads four at a time
// (head_dim % 8 == 0, hidden % 4 == 0): W and Wo read four halves at a time
// (two u32s), the v rows four entries at a time. The q/k/v projection gives
// each invocation four consecutive rows (four RoPE pairs of q or k, or four
// v rows), the o_proj share four consecutive outputs, and the attention
// weights each score's v row four entries at a time: software adapters
// (lavapipe, SwiftShader) pay per load and per operation of every
// invocation of a vector, active or not, much more than per byte. The
// engine picks it when the shape allows.
// One decoded token's attention block in one dispatch, one workgroup per
// query head: RMSNorm(x) -> this head's q and its kv head's k and v
// (W = [Wq; Wk; Wv] stored transposed, [hidden][q_dim + 2 kv_dim]) -> RoPE
// (rotate-half) on q and k -> k and v appended to the KV cache at position
// pos0 -> causal attention over positions 0..=pos0 (the scores kept in
// part's tail, part[n_heads * hidden + head * max_seq + j]) -> this head's share of the
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
@group(0) @binding(2) var<storage, read> w: array<vec2<u32>>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read> g: array<f32>;
@group(0) @binding(5) var<storage, read> rope: array<f32>;
@group(0) @binding(6) var<storage, read_write> k_cache: array<f32>;
// Four entries of a row at a time (kv_dim % 4 == 0).
@group(0) @binding(7) var<storage, read_write> v_cache: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read> wo: array<vec2<u32>>;
@group(0) @binding(9) var<storage, read_write> part: array<f32>;

var<workgroup> qs: array<f32, MAX_HEAD_DIM>;
var<workgroup> ks: array<f32, MAX_HEAD_DIM>;
var<workgroup> vs: array<f32, MAX_HEAD_DIM>;
var<workgroup> acc_s: array<f32, MAX_HEAD_DIM>;
// Per-invocation shares of the softmax sum and of the weighted v rows (at
// most RED of them, each four head-dimension entries), and the scores' max
// as ordered bits.
const RED: u32 = 64u;
var<workgroup> red_l: array<f32, RED>;
var<workgroup> red_a: array<vec4<f32>, RED>;
var<workgroup> m_bits: atomic<i32>;

// f32 bits as an i32 that orders like the f32 (for atomicMax).
fn ordered(v: f32) -> i32 {
    let b = bitcast<i32>(v);
    return select(b, b ^ 0x7fffffff, b < 0);
}

// The vec4s at vec4 index i.
// (Four halves: two u32s, unpack2x16float, no shader-f16 needed.)
fn wf(i: u32) -> vec4<f32> {
    let v = w[i];
    return vec4<f32>(unpack2x16float(v.x), unpack2x16float(v.y));
}

fn wof(i: u32) -> vec4<f32> {
    let v = wo[i];
    return vec4<f32>(unpack2x16float(v.x), unpack2x16float(v.y));
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
    // Units of four rows: q pairs (half / 4), k pairs (half / 4), v rows
    // (head_dim / 4); indices into w in vec4s (rows % 4 == 0).
    let hq = half / 4u;
    let rows4 = rows / 4u;
    for (var u = lid; u < hd / 2u; u += WG) {
        var r1 = 0u;
        var pair = true;
        var i = u;
        if (u < hq) {
            r1 = h * hd + 4u * i;
        } else if (u < 2u * hq) {
            i = u - hq;
            r1 = q_dim + kvh * hd + 4u * i;
        } else {
            i = u - 2u * hq;
            r1 = q_dim + kv_dim + kvh * hd + 4u * i;
            pair = false;
        }
        let v1 = r1 / 4u;
        let v2 = (r1 + half) / 4u;
        var ss = 0.0;
        var a = vec4<f32>(0.0);
        var b = vec4<f32>(0.0);
        if (pair) {
            for (var c = 0u; c < p.hidden; c++) {
                let xv = x[c];
                ss += xv * xv;
                let xg = xv * g[c];
                a += wf(c * rows4 + v1) * xg;
                b += wf(c * rows4 + v2) * xg;
            }
        } else {
            for (var c = 0u; c < p.hidden; c++) {
                let xv = x[c];
                ss += xv * xv;
                a += wf(c * rows4 + v1) * (xv * g[c]);
            }
        }
        let inv = 1.0 / sqrt(ss / f32(p.hidden) + p.eps);
        a = a * inv;
        b = b * inv;
        for (var m = 0u; m < 4u; m++) {
            let im = 4u * i + m;
            if (!pair) {
                vs[im] = a[m];
            } else {
                let ri = (pos * half + im) * 2u;
                let cs = rope[ri];
                let sn = rope[ri + 1u];
                let o1 = a[m] * cs - b[m] * sn;
                let o2 = b[m] * cs + a[m] * sn;
                if (u < hq) {
                    qs[im] = o1;
                    qs[im + half] = o2;
                } else {
                    ks[im] = o1;
                    ks[im + half] = o2;
                }
            }
        }
    }
    if (lid == 0u) { atomicStore(&m_bits, ordered(-3.0e38)); }
    workgroupBarrier();

    // Append to the cache (v rows four entries at a time).
    let kb = kvh * hd;
    for (var i = lid; i < hd; i += WG) {
        k_cache[(kb + i) * p.max_seq + pos] = ks[i];
    }
    let hd4 = hd / 4u;
    let kv4 = kv_dim / 4u;
    let kb4 = kb / 4u;
    for (var e4 = lid; e4 < hd4; e4 += WG) {
        let e = 4u * e4;
        v_cache[pos * kv4 + kb4 + e4] = vec4<f32>(vs[e], vs[e + 1u], vs[e + 2u], vs[e + 3u]);
    }

    // Attention over positions 0..=pos (the new position's k and v from
    // workgroup memory). Written for software adapters, where every
    // invocation's memory access is costly and a loop costs as much in
    // every invocation of a vector: no barrier inside a loop. Scores go to
    // this head's row after the o_proj shares in `part` ([n_heads][max_seq]
    // from n_heads * hidden on), the max through a workgroup atomic (f32
    // bits mapped to ordered i32); then every invocation sums exp(score -
    // max) and the v rows they weight, four head-dimension entries at a
    // time (a quarter of the exps and loads of one entry at a time), over
    // a strided share of the positions; the shares are added after one
    // barrier.
    let len = pos + 1u;
    let sb = p.n_heads * p.hidden + h * p.max_seq;
    var mine = -3.0e38;
    for (var j = lid; j < len; j += WG) {
        var d = 0.0;
        if (j == pos) {
            for (var e = 0u; e < hd; e++) { d += qs[e] * ks[e]; }
        } else {
            for (var e = 0u; e < hd; e++) { d += qs[e] * k_cache[(kb + e) * p.max_seq + j]; }
        }
        d = d * p.scale;
        part[sb + j] = d;
        mine = max(mine, d);
    }
    atomicMax(&m_bits, ordered(mine));
    storageBarrier();
    workgroupBarrier();
    let mb = atomicLoad(&m_bits);
    let m = bitcast<f32>(select(mb, mb ^ 0x7fffffff, mb < 0));
    // `shares` invocations per four head-dimension entries.
    let shares = max(1u, min(WG, RED) / hd4);
    for (var u = lid; u < hd4 * shares; u += WG) {
        let e4 = u % hd4;
        let sh = u / hd4;
        var l = 0.0;
        var a = vec4<f32>(0.0);
        for (var j = sh; j < pos; j += shares) {
            let pe = exp(part[sb + j] - m);
            l += pe;
            a += pe * v_cache[j * kv4 + kb4 + e4];
        }
        if (sh == 0u) {
            let pe = exp(part[sb + pos] - m);
            let e = 4u * e4;
            l += pe;
            a += pe * vec4<f32>(vs[e], vs[e + 1u], vs[e + 2u], vs[e + 3u]);
        }
        red_l[u] = l;
        red_a[u] = a;
    }
    workgroupBarrier();
    for (var e4 = lid; e4 < hd4; e4 += WG) {
        var l = 0.0;
        var a = vec4<f32>(0.0);
        for (var q = 0u; q < shares; q++) {
            l += red_l[q * hd4 + e4];
            a += red_a[q * hd4 + e4];
        }
        let o = a / l;
        let e = 4u * e4;
        acc_s[e] = o.x;
        acc_s[e + 1u] = o.y;
        acc_s[e + 2u] = o.z;
        acc_s[e + 3u] = o.w;
    }
    workgroupBarrier();

    // This head's share of the output projection, four outputs per
    // invocation (wo_stride % 4 == 0; indices in fours).
    let st4 = p.wo_stride / 4u;
    for (var r4 = lid; r4 < p.hidden / 4u; r4 += WG) {
        var a = vec4<f32>(0.0);
        for (var e = 0u; e < hd; e++) {
            a += wof((h * hd + e) * st4 + r4) * acc_s[e];
        }
        let ob = h * p.hidden + 4u * r4;
        part[ob] = a.x;
        part[ob + 1u] = a.y;
        part[ob + 2u] = a.z;
        part[ob + 3u] = a.w;
    }
}
