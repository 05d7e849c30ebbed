// SwiGLU expert, first half, for every (token, routed slot, intermediate row):
// act[t][slot][j] = silu(w1_e[j] . xn) * (w3_e[j] . xn), xn = RMSNorm(x[t])
// (post-attention norm fused), e = route[t][slot].id. Per expert, w1 and w3
// are stored transposed side by side: w13[e][c][0..inter] = w1, [inter..2 inter] = w3,
// in the expert pool: w13 holds n_slots experts, slots[e] is where expert e of
// this layer lives (the engine keeps the table; eviction never rebinds).

struct Step { pos0: u32, n_tok: u32, top_k: u32, renorm: u32 }
struct Params { hidden: u32, inter: u32, n_experts: u32, eps: f32, n_slots: u32, _p0: u32, _p1: u32, _p2: u32 }

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> s: Step;
@group(0) @binding(1) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> w13: array<f32>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read> g: array<f32>;
@group(0) @binding(5) var<storage, read> route: array<u32>;
@group(0) @binding(6) var<storage, read_write> act: array<f32>;
@group(0) @binding(7) var<storage, read> slots: array<u32>;

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
    let two_i = 2u * p.inter;
    let wb = min(slots[e], p.n_slots - 1u) * p.hidden * two_i;
    let xb = t * p.hidden;
    var ss = 0.0;
    var a = 0.0;
    var b = 0.0;
    for (var c = 0u; c < p.hidden; c++) {
        let xv = x[xb + c];
        ss += xv * xv;
        let xn = xv * g[c];
        let row = wb + c * two_i;
        a += w13[row + j] * xn;
        b += w13[row + p.inter + j] * xn;
    }
    let inv = 1.0 / sqrt(ss / f32(p.hidden) + p.eps);
    a = a * inv;
    b = b * inv;
    act[(t * p.n_experts + slot) * p.inter + j] = a / (1.0 + exp(-a)) * b;
}
