// f16 weights: W packed two halves per u32 (rows = q_dim + 2 kv_dim is even),
// read with unpack2x16float (no shader-f16 needed). Otherwise as qkv_rope.wgsl.
// Fused attention input: RMSNorm(x) -> q/k/v projections -> RoPE (rotate-half,
// as Hugging Face Mixtral) -> q to `q`, k and v appended to the KV cache at
// position pos0 + t. W = [Wq; Wk; Wv] stored transposed ([hidden][q_dim + 2 kv_dim]).
// Each invocation owns one rotation pair (rows i and i + head_dim/2 of one
// q or k head) or one v row. `rope` holds (cos, sin) per (position, i).
// k_cache is stored transposed ([kv_dim][max_seq]) so the attention kernel reads
// it coalesced; v_cache is [max_seq][kv_dim].

struct Step { pos0: u32, n_tok: u32, top_k: u32, renorm: u32 }
struct Params { hidden: u32, n_heads: u32, n_kv: u32, head_dim: u32, max_seq: u32, eps: f32, _p0: u32, _p1: u32 }

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> s: Step;
@group(0) @binding(1) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read> g: array<f32>;
@group(0) @binding(5) var<storage, read> rope: array<f32>;
@group(0) @binding(6) var<storage, read_write> q: array<f32>;
@group(0) @binding(7) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(8) var<storage, read_write> v_cache: array<f32>;


fn wh(i: u32) -> f32 {
    let v = unpack2x16float(w[i >> 1u]);
    return select(v.x, v.y, (i & 1u) == 1u);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let gid = (wid.y * nwg.x + wid.x) * WG + lid;
    let half = p.head_dim / 2u;
    let q_dim = p.n_heads * p.head_dim;
    let kv_dim = p.n_kv * p.head_dim;
    let units = q_dim / 2u + kv_dim / 2u + kv_dim;
    if (gid >= s.n_tok * units) { return; }
    let t = gid / units;
    let u = gid % units;
    let pos = s.pos0 + t;
    let rows = q_dim + 2u * kv_dim;
    let xb = t * p.hidden;

    // Which rows this invocation computes.
    var r1 = 0u;
    var pair = true;
    var i = 0u;
    if (u < q_dim / 2u) {
        i = u % half;
        r1 = (u / half) * p.head_dim + i;
    } else if (u < q_dim / 2u + kv_dim / 2u) {
        let u2 = u - q_dim / 2u;
        i = u2 % half;
        r1 = q_dim + (u2 / half) * p.head_dim + i;
    } else {
        r1 = q_dim + kv_dim + (u - q_dim / 2u - kv_dim / 2u);
        pair = false;
    }
    let r2 = r1 + half;

    var ss = 0.0;
    var a = 0.0;
    var b = 0.0;
    if (pair) {
        for (var c = 0u; c < p.hidden; c++) {
            let xv = x[xb + c];
            ss += xv * xv;
            let xn = xv * g[c];
            a += wh(c * rows + r1) * xn;
            b += wh(c * rows + r2) * xn;
        }
    } else {
        for (var c = 0u; c < p.hidden; c++) {
            let xv = x[xb + c];
            ss += xv * xv;
            a += wh(c * rows + r1) * (xv * g[c]);
        }
    }
    let inv = 1.0 / sqrt(ss / f32(p.hidden) + p.eps);
    a = a * inv;
    b = b * inv;

    if (!pair) {
        v_cache[pos * kv_dim + (r1 - q_dim - kv_dim)] = a;
        return;
    }
    let ri = (pos * half + i) * 2u;
    let cs = rope[ri];
    let sn = rope[ri + 1u];
    let o1 = a * cs - b * sn;
    let o2 = b * cs + a * sn;
    if (r1 < q_dim) {
        q[t * q_dim + r1] = o1;
        q[t * q_dim + r2] = o2;
    } else {
        let kc = r1 - q_dim;
        k_cache[kc * p.max_seq + pos] = o1;
        k_cache[(kc + half) * p.max_seq + pos] = o2;
    }
}
