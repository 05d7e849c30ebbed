// SwiGLU expert, first half, for every (token, routed slot, intermediate row):
// act[t][slot][j] = silu(w1_e[j] . xn) * (w3_e[j] . xn), xn = RMSNorm(x[t])
// (post-attention norm fused), e = route[t][slot].id. Per expert, w1 and w3
// are stored transposed side by side: w13[e][c][0..inter] = w1, [inter..2 inter] = w3,
// in the expert pool: w13 holds n_slots experts, slots[e] is where expert e of
// this layer lives (the engine keeps the table; eviction never rebinds).

struct Step { pos0: u32, n_tok: u32, top_k: u32, renorm: u32 }
struct Params { hidden: u32, inter: u32, n_experts: u32, eps: f32, n_slots: u32, route_in: u32, n_part: u32, save_x: u32 }

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> s: Step;
@group(0) @binding(1) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> w13: array<f32>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read> g: array<f32>;
@group(0) @binding(5) var<storage, read_write> route: array<u32>;
@group(0) @binding(6) var<storage, read_write> act: array<f32>;
@group(0) @binding(7) var<storage, read> slots: array<u32>;
@group(0) @binding(8) var<storage, read> gate: array<f32>;
@group(0) @binding(9) var<storage, read> part: array<f32>;

// The token's input row in workgroup memory (hidden <= MAX_HIDDEN):
// x[t] plus, after the fused decode attention, its n_part heads' o_proj
// shares part[head][c] (n_tok = 1); larger rows are read from x directly
// (n_part = 0 then).
const MAX_HIDDEN: u32 = 2048u;
var<workgroup> xs: array<f32, MAX_HIDDEN>;

fn xin(xb: u32, c: u32) -> f32 {
    if (p.hidden <= MAX_HIDDEN) { return xs[c]; }
    return x[xb + c];
}

fn stage_x(t: u32, lid: u32) {
    if (p.hidden <= MAX_HIDDEN) {
        for (var c = lid; c < p.hidden; c += WG) {
            var v = x[t * p.hidden + c];
            for (var hh = 0u; hh < p.n_part; hh++) { v += part[hh * p.hidden + c]; }
            xs[c] = v;
        }
        workgroupBarrier();
    }
}


// The router, fused (route_in = 1): each workgroup holds one token's
// columns and routes that token itself (RMSNorm, gate [hidden][n_experts],
// softmax, top-k largest first with the lower index on ties, renormalised
// when s.renorm, as router.wgsl); the token's first workgroup writes
// route[t] for expert_down and the pool's readback. n_experts <= 256.
const MAX_EXPERTS: u32 = 256u;
var<workgroup> r_red: array<f32, 256>;
var<workgroup> r_part: array<f32, MAX_EXPERTS>;
var<workgroup> r_prob: array<f32, MAX_EXPERTS>;
var<workgroup> r_id: array<u32, MAX_EXPERTS>;
var<workgroup> r_wt: array<f32, MAX_EXPERTS>;

fn route_token(t: u32, lid: u32, write: bool) {
    let ne = p.n_experts;
    let xb = t * p.hidden;
    var ss = 0.0;
    for (var c = lid; c < p.hidden; c += WG) {
        let xv = xin(xb, c);
        ss += xv * xv;
    }
    r_red[lid] = ss;
    // Gate logits: `parts` invocations per expert, each a strided share of the columns.
    let parts = max(1u, WG / ne);
    for (var u = lid; u < ne * parts; u += WG) {
        let e = u / parts;
        var acc = 0.0;
        for (var c = u % parts; c < p.hidden; c += parts) {
            acc += gate[c * ne + e] * (xin(xb, c) * g[c]);
        }
        r_part[u] = acc;
    }
    workgroupBarrier();
    if (lid == 0u) {
        var tot = 0.0;
        for (var i = 0u; i < WG; i++) { tot += r_red[i]; }
        let inv = 1.0 / sqrt(tot / f32(p.hidden) + p.eps);
        var m = -3.0e38;
        for (var e = 0u; e < ne; e++) {
            var acc = 0.0;
            for (var i = 0u; i < parts; i++) { acc += r_part[e * parts + i]; }
            r_prob[e] = acc * inv;
            m = max(m, r_prob[e]);
        }
        var sum = 0.0;
        for (var e = 0u; e < ne; e++) {
            let v = exp(r_prob[e] - m);
            r_prob[e] = v;
            sum += v;
        }
        for (var e = 0u; e < ne; e++) { r_prob[e] = r_prob[e] / sum; }
        let k = min(s.top_k, ne);
        var chosen = 0.0;
        for (var slot = 0u; slot < k; slot++) {
            var bi = 0u;
            var bv = -1.0;
            for (var e = 0u; e < ne; e++) {
                let v = r_prob[e];
                if (v > bv) { bv = v; bi = e; }
            }
            r_prob[bi] = -2.0;
            chosen += bv;
            r_id[slot] = bi;
            r_wt[slot] = bv;
        }
        for (var slot = 0u; slot < k; slot++) {
            if (s.renorm != 0u) { r_wt[slot] = r_wt[slot] / chosen; }
            if (write) {
                let ri = (t * ne + slot) * 2u;
                route[ri] = r_id[slot];
                route[ri + 1u] = bitcast<u32>(r_wt[slot]);
            }
        }
    }
    workgroupBarrier();
}

// With the expert pool partly resident (save_x > 0): the token's first
// workgroup keeps the layer's input row (x plus the o_proj shares) at
// route[save_x + t * hidden ..], from where the engine restores x when it
// runs this layer's experts again after a missing one was supplied.
fn save_row(t: u32, lid: u32) {
    for (var c = lid; c < p.hidden; c += WG) {
        route[p.save_x + t * p.hidden + c] = bitcast<u32>(xin(t * p.hidden, c));
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    // One token per workgroup: `per_wg` workgroups cover its k * inter rows.
    let k = min(s.top_k, p.n_experts);
    let per_tok = k * p.inter;
    var per_wg = (per_tok + WG - 1u) / WG;
    // Routes only (route_in = 2): one workgroup per token.
    if (p.route_in == 2u) { per_wg = 1u; }
    let grp = wid.y * nwg.x + wid.x;
    let t = grp / per_wg;
    // Uniform across the workgroup, so the early return keeps barriers uniform.
    if (t >= s.n_tok) { return; }
    stage_x(t, lid);
    if (p.route_in != 0u) { route_token(t, lid, grp % per_wg == 0u); }
    if (p.save_x != 0u && grp % per_wg == 0u) { save_row(t, lid); }
    // Routes only: a prompt's chunk stops here to read them back before
    // any expert runs (uniform across the workgroup).
    if (p.route_in == 2u) { return; }
    let li = (grp % per_wg) * WG + lid;
    if (li >= per_tok) { return; }
    let j = li % p.inter;
    let slot = li / p.inter;
    var e = 0u;
    if (p.route_in != 0u) {
        e = r_id[slot];
    } else {
        e = min(route[(t * p.n_experts + slot) * 2u], p.n_experts - 1u);
    }
    let two_i = 2u * p.inter;
    let wb = min(slots[e], p.n_slots - 1u) * p.hidden * two_i;
    let xb = t * p.hidden;
    var ss = 0.0;
    var a = 0.0;
    var b = 0.0;
    for (var c = 0u; c < p.hidden; c++) {
        let xv = xin(xb, c);
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
