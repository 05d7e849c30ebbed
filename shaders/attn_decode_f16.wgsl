// f16 weights: W and Wo packed two halves per u32 (rows = q_dim + 2 kv_dim
// is even; Wo's rows padded to even, wo_stride), read with unpack2x16float
// (no shader-f16 needed). Otherwise as attn_decode.wgsl.
// One decoded token's attention block in one dispatch, one workgroup per
// QPW query heads of one kv head (QPW divides n_heads / n_kv; the engine
// writes it into the source, AttnDecode::with_format: all of a kv group's
// heads where the workgroup memory holds them, else 1, a workgroup per
// query head): RMSNorm(x) -> these heads' q and their kv head's k and v
// (W = [Wq; Wk; Wv] stored transposed, [hidden][q_dim + 2 kv_dim]) -> RoPE
// (rotate-half) on q and k -> k and v appended to the KV cache at position
// pos0 -> causal attention over positions 0..=pos0 (the scores kept in
// part's tail, part[n_heads * hidden + head * max_seq + j]) -> each head's
// share of the output projection: part[head][r] = sum_e Wo[r][head *
// head_dim + e] * o[e] (Wo stored transposed, [q_dim][wo_stride], wo_stride
// = hidden, or hidden rounded up to even for f16). The next kernels add x +
// sum over heads of part (expert_up for its input, expert_down for the
// residual), so the o_proj needs no dispatch of its own.
// A kv head's k and v rows are computed once per workgroup: once per kv
// head when QPW is the whole group. Where a group has several workgroups
// they each compute (and write) the same k and v row; a workgroup reads
// the cache only at positions < pos0 (written by earlier dispatches) and
// its own k/v row from workgroup memory, so the identical writes never
// race a read. Decode only (n_tok = 1): a batch's later tokens would read
// cache rows other workgroups write in the same dispatch.
// Limits: hidden <= MAX_HIDDEN, head_dim <= MAX_HEAD_DIM and even, WG <= 256
// (4 * (QPW * (MAX_HEAD_DIM + 2 RED + 1) + 2 MAX_HEAD_DIM) bytes of
// workgroup memory). k_cache is [kv_dim][max_seq], v_cache
// [max_seq][kv_dim], as the unfused kernels.

struct Step { pos0: u32, n_tok: u32, top_k: u32, renorm: u32 }
struct Params { hidden: u32, n_heads: u32, n_kv: u32, head_dim: u32, max_seq: u32, eps: f32, scale: f32, wo_stride: u32 }

const MAX_HIDDEN: u32 = 2048u;
const MAX_HEAD_DIM: u32 = 256u;
// Query heads per workgroup.
const QPW: u32 = 1u;
// Per-invocation shares of one head's softmax sum and weighted v: at most
// max(head_dim, WG) <= 256 of them.
const RED: u32 = 256u;
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

// The heads' q rows ([QPW][head_dim]), then their attention outputs.
var<workgroup> qs: array<f32, QPW * MAX_HEAD_DIM>;
var<workgroup> ks: array<f32, MAX_HEAD_DIM>;
var<workgroup> vs: array<f32, MAX_HEAD_DIM>;
var<workgroup> red_l: array<f32, QPW * RED>;
var<workgroup> red_a: array<f32, QPW * RED>;
// Each head's max score as ordered bits.
var<workgroup> m_bits: array<atomic<i32>, QPW>;

// f32 bits as an i32 that orders like the f32 (for atomicMax).
fn ordered(v: f32) -> i32 {
    let b = bitcast<i32>(v);
    return select(b, b ^ 0x7fffffff, b < 0);
}

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
    // The workgroup's first query head.
    let h0 = (wid.y * nwg.x + wid.x) * QPW;
    // Uniform across the workgroup, so the early return keeps barriers uniform.
    if (h0 >= p.n_heads) { return; }
    let hd = p.head_dim;
    let half = hd / 2u;
    let kvh = h0 / (p.n_heads / p.n_kv);
    let q_dim = p.n_heads * hd;
    let kv_dim = p.n_kv * hd;
    let rows = q_dim + 2u * kv_dim;
    let pos = s.pos0;

    // Barriers are few on purpose (slow on software adapters): none for
    // the norm (each invocation sums the squares itself, as qkv_rope.wgsl),
    // RoPE applied by the invocation that owns both rows of a pair.
    // Units: the heads' q pairs (QPW * half), k pairs (half), v rows
    // (head_dim).
    let qp = QPW * half;
    for (var u = lid; u < qp + 3u * half; u += WG) {
        var r1 = 0u;
        var pair = true;
        var i = u;
        if (u < qp) {
            r1 = h0 * hd + (u / half) * hd + u % half;
        } else if (u < qp + half) {
            i = u - qp;
            r1 = q_dim + kvh * hd + i;
        } else {
            i = u - qp - half;
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
            let ip = u % half;
            let ri = (pos * half + ip) * 2u;
            let cs = rope[ri];
            let sn = rope[ri + 1u];
            let o1 = a * cs - b * sn;
            let o2 = b * cs + a * sn;
            if (u < qp) {
                let qb = (u / half) * hd;
                qs[qb + ip] = o1;
                qs[qb + ip + half] = o2;
            } else {
                ks[i] = o1;
                ks[i + half] = o2;
            }
        }
    }
    for (var t = lid; t < QPW; t += WG) { atomicStore(&m_bits[t], ordered(-3.0e38)); }
    workgroupBarrier();

    // Append to the cache.
    let kb = kvh * hd;
    for (var i = lid; i < hd; i += WG) {
        k_cache[(kb + i) * p.max_seq + pos] = ks[i];
        v_cache[pos * kv_dim + kb + i] = vs[i];
    }

    // Attention over positions 0..=pos (the new position's k and v from
    // workgroup memory). Written for software adapters, where every
    // invocation's memory access is costly and a loop costs as much in
    // every invocation of a vector: no barrier inside a loop, and no
    // phase where most invocations idle through a long loop. Scores go to
    // each head's row after the o_proj shares in `part` ([n_heads][max_seq]
    // from n_heads * hidden on), the max through a workgroup atomic per
    // head (f32 bits mapped to ordered i32), then every invocation sums
    // exp(score - max) and its weighted v for one head and head-dimension
    // entry over a strided share of the positions; the shares are added
    // after one barrier (none when each entry has one share: its
    // invocation writes the output itself).
    // Units: (head, position).
    let len = pos + 1u;
    let sb = p.n_heads * p.hidden + h0 * p.max_seq;
    var mine = -3.0e38;
    var mt = lid / len;
    for (var u = lid; u < QPW * len; u += WG) {
        let t = u / len;
        let j = u % len;
        if (t != mt) {
            atomicMax(&m_bits[mt], ordered(mine));
            mine = -3.0e38;
            mt = t;
        }
        let qb = t * hd;
        var d = 0.0;
        if (j == pos) {
            for (var e = 0u; e < hd; e++) { d += qs[qb + e] * ks[e]; }
        } else {
            for (var e = 0u; e < hd; e++) { d += qs[qb + e] * k_cache[(kb + e) * p.max_seq + j]; }
        }
        d = d * p.scale;
        part[sb + t * p.max_seq + j] = d;
        mine = max(mine, d);
    }
    if (mt < QPW) { atomicMax(&m_bits[mt], ordered(mine)); }
    storageBarrier();
    workgroupBarrier();
    // `shares` invocations per head-dimension entry of each head.
    let shares = max(1u, min(WG, RED) / hd);
    let per = hd * shares;
    for (var u = lid; u < QPW * per; u += WG) {
        let t = u / per;
        let ut = u % per;
        let e = ut % hd;
        let mb = atomicLoad(&m_bits[t]);
        let m = bitcast<f32>(select(mb, mb ^ 0x7fffffff, mb < 0));
        let st = sb + t * p.max_seq;
        var l = 0.0;
        var a = 0.0;
        for (var j = ut / hd; j < len; j += shares) {
            let pe = exp(part[st + j] - m);
            var vv = vs[e];
            if (j != pos) { vv = v_cache[j * kv_dim + kb + e]; }
            l += pe;
            a += pe * vv;
        }
        if (shares == 1u) {
            // q is no longer read (the scores are behind the barrier).
            qs[t * hd + e] = a / l;
        } else {
            red_l[t * RED + ut] = l;
            red_a[t * RED + ut] = a;
        }
    }
    if (shares > 1u) {
        workgroupBarrier();
        for (var u = lid; u < QPW * hd; u += WG) {
            let t = u / hd;
            let e = u % hd;
            var l = 0.0;
            var a = 0.0;
            for (var q = 0u; q < shares; q++) {
                l += red_l[t * RED + q * hd + e];
                a += red_a[t * RED + q * hd + e];
            }
            qs[u] = a / l;
        }
    }
    workgroupBarrier();

    // The heads' shares of the output projection.
    for (var u = lid; u < QPW * p.hidden; u += WG) {
        let t = u / p.hidden;
        let r = u % p.hidden;
        let h = h0 + t;
        var a = 0.0;
        for (var e = 0u; e < hd; e++) {
            a += wof((h * hd + e) * p.wo_stride + r) * qs[t * hd + e];
        }
        part[h * p.hidden + r] = a;
    }
}
