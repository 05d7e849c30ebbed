// q8_0 experts (no shader-f16 needed): the weights are read packed, four i8
// per u32, sign-extended with shifts; one f16 scale per group of 32 weights
// along a row, two per u32, read with unpack2x16float.
// SwiGLU expert, first half, for every (token, routed slot, intermediate row):
// act[t][slot][j] = silu(w1_e[j] . xn) * (w3_e[j] . xn), xn = RMSNorm(x[t])
// (post-attention norm fused), e = route[t][slot].id.
// One expert's w13 in the pool (rows = 2 * inter: w1's rows, then w3's;
// cols = hidden, a multiple of 32), in u32 words:
//   values: word (r, w) at w * rows + r, w < hidden / 4 (bytes 4w..4w+3 of
//           row r: neighbouring invocations read neighbouring words)
//   scales: after the values; group gi of row r in the low (r even) or high
//           (r odd) half of word gi * ceil(rows / 2) + r / 2.
// The pool holds n_slots experts of that size; slots[e] is where expert e of
// this layer lives (the engine keeps the table; eviction never rebinds).

struct Step { pos0: u32, n_tok: u32, top_k: u32, renorm: u32 }
struct Params { hidden: u32, inter: u32, n_experts: u32, eps: f32, n_slots: u32, _p0: u32, _p1: u32, _p2: u32 }

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> s: Step;
@group(0) @binding(1) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> w13: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read> g: array<f32>;
@group(0) @binding(5) var<storage, read> route: array<u32>;
@group(0) @binding(6) var<storage, read_write> act: array<f32>;
@group(0) @binding(7) var<storage, read> slots: array<u32>;

// Four signed bytes of a word (byte 0 first) as f32.
fn q8(w: u32) -> vec4<f32> {
    return vec4<f32>(
        f32(bitcast<i32>(w << 24u) >> 24u),
        f32(bitcast<i32>(w << 16u) >> 24u),
        f32(bitcast<i32>(w << 8u) >> 24u),
        f32(bitcast<i32>(w) >> 24u));
}

// The f16 scale of row r of group gi (scales start at word sb, rh words per group).
fn scale(sb: u32, rh: u32, gi: u32, r: u32) -> f32 {
    let v = unpack2x16float(w13[sb + gi * rh + (r >> 1u)]);
    return select(v.x, v.y, (r & 1u) == 1u);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let gid = (wid.y * nwg.x + wid.x) * WG + lid;
    let k = min(s.top_k, p.n_experts);
    if (gid >= s.n_tok * k * p.inter) { return; }
    let j = gid % p.inter;
    let ts = gid / p.inter;
    let t = ts / k;
    let slot = ts % k;
    let e = min(route[(t * p.n_experts + slot) * 2u], p.n_experts - 1u);
    let rows = 2u * p.inter;
    let ng = p.hidden / 32u;
    let rh = (rows + 1u) / 2u;
    let base = min(slots[e], p.n_slots - 1u) * (rows * (p.hidden / 4u) + ng * rh);
    let sb = base + rows * (p.hidden / 4u);
    let xb = t * p.hidden;
    var ss = 0.0;
    var a = 0.0;
    var b = 0.0;
    for (var gi = 0u; gi < ng; gi++) {
        var ga = 0.0;
        var gb = 0.0;
        for (var m = 0u; m < 8u; m++) {
            let c = gi * 32u + m * 4u;
            let xv = vec4<f32>(x[xb + c], x[xb + c + 1u], x[xb + c + 2u], x[xb + c + 3u]);
            ss += dot(xv, xv);
            let xn = xv * vec4<f32>(g[c], g[c + 1u], g[c + 2u], g[c + 3u]);
            let wi = base + (gi * 8u + m) * rows + j;
            ga += dot(q8(w13[wi]), xn);
            gb += dot(q8(w13[wi + p.inter]), xn);
        }
        a += ga * scale(sb, rh, gi, j);
        b += gb * scale(sb, rh, gi, p.inter + j);
    }
    let inv = 1.0 / sqrt(ss / f32(p.hidden) + p.eps);
    a = a * inv;
    b = b * inv;
    act[(t * p.n_experts + slot) * p.inter + j] = a / (1.0 + exp(-a)) * b;
}
