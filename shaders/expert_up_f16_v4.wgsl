// expert_up_f16.wgsl with eight intermediate rows per invocation
// (inter % 8 == 0; four when inter % 8 == 4, hidden % 4 == 0): w13 read
// eight halves at a time (one vec4<u32> per load), the token's row staged
// in workgroup memory already multiplied by the norm weight, its RMS taken
// once per workgroup. Software adapters (lavapipe, SwiftShader) pay per
// load and per operation of every invocation, not per byte: wide loads and
// few invocations are what makes this kernel cheap there. The engine picks
// it when inter % 4 == 0 and hidden % 4 == 0.
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
@group(0) @binding(2) var<storage, read> w13: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read> g: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> route: array<u32>;
@group(0) @binding(6) var<storage, read_write> act: array<f32>;
@group(0) @binding(7) var<storage, read> slots: array<u32>;
@group(0) @binding(8) var<storage, read> gate: array<f32>;
@group(0) @binding(9) var<storage, read> part: array<f32>;

// The token's input row in workgroup memory (hidden <= MAX_HIDDEN), times
// the norm weight: x[t] plus, after the fused decode attention, its n_part
// heads' o_proj shares part[head][c] (n_tok = 1), and r_inv its RMSNorm
// scale; larger rows are read from x directly (n_part = 0 then).
const MAX_HIDDEN: u32 = 2048u;
var<workgroup> xs: array<vec4<f32>, 512>;
var<workgroup> r_inv: f32;

fn staged() -> bool {
    return p.hidden <= MAX_HIDDEN;
}

// The token's input row (with the o_proj shares), from x and part.
fn x_row4(t: u32, c4: u32) -> vec4<f32> {
    let c = 4u * c4;
    let b = t * p.hidden + c;
    var v = vec4<f32>(x[b], x[b + 1u], x[b + 2u], x[b + 3u]);
    for (var hh = 0u; hh < p.n_part; hh++) {
        let pb = hh * p.hidden + c;
        v += vec4<f32>(part[pb], part[pb + 1u], part[pb + 2u], part[pb + 3u]);
    }
    return v;
}

// Columns 4 c4 .. 4 c4 + 3 of the token's input row times the norm weight.
fn xg4(t: u32, c4: u32) -> vec4<f32> {
    if (staged()) { return xs[c4]; }
    return x_row4(t, c4) * g[c4];
}

fn xg(t: u32, c: u32) -> f32 {
    if (staged()) { return xs[c >> 2u][c & 3u]; }
    return xg4(t, c >> 2u)[c & 3u];
}

// The router's reduction scratch (also the staged row's squares).
const MAX_EXPERTS: u32 = 256u;
var<workgroup> r_red: array<f32, 256>;

fn stage_x(t: u32, lid: u32) {
    if (staged()) {
        var ss = 0.0;
        for (var c4 = lid; c4 < p.hidden / 4u; c4 += WG) {
            let v = x_row4(t, c4);
            ss += dot(v, v);
            xs[c4] = v * g[c4];
        }
        r_red[lid] = ss;
        workgroupBarrier();
        // With the router fused, its first invocation takes the scale
        // (one barrier fewer).
        if (p.route_in == 0u) {
            if (lid == 0u) { r_inv = staged_inv(); }
            workgroupBarrier();
        }
    }
}

// The staged row's RMSNorm scale from the invocations' sums of squares.
fn staged_inv() -> f32 {
    var tot = 0.0;
    for (var i = 0u; i < min(WG, p.hidden / 4u); i++) { tot += r_red[i]; }
    return 1.0 / sqrt(tot / f32(p.hidden) + p.eps);
}

// The RMSNorm scale of the token's row, each invocation by itself (rows
// too large to stage).
fn row_inv(t: u32) -> f32 {
    var ss = 0.0;
    for (var c4 = 0u; c4 < p.hidden / 4u; c4++) {
        let v = x_row4(t, c4);
        ss += dot(v, v);
    }
    return 1.0 / sqrt(ss / f32(p.hidden) + p.eps);
}


// The router, fused (route_in = 1): each workgroup holds one token's
// columns and routes that token itself (RMSNorm, gate [hidden][n_experts],
// softmax, top-k largest first with the lower index on ties, renormalised
// when s.renorm, as router.wgsl); the token's first workgroup writes
// route[t] for expert_down and the pool's readback. n_experts <= 256.
var<workgroup> r_part: array<f32, MAX_EXPERTS>;
var<workgroup> r_prob: array<f32, MAX_EXPERTS>;
var<workgroup> r_id: array<u32, MAX_EXPERTS>;
var<workgroup> r_wt: array<f32, MAX_EXPERTS>;

fn route_token(t: u32, lid: u32, write: bool) {
    let ne = p.n_experts;
    if (!staged()) {
        var ss = 0.0;
        for (var c4 = lid; c4 < p.hidden / 4u; c4 += WG) {
            let v = x_row4(t, c4);
            ss += dot(v, v);
        }
        r_red[lid] = ss;
    }
    // Gate logits: `parts` invocations per expert, each a strided share of the columns.
    let parts = max(1u, WG / ne);
    for (var u = lid; u < ne * parts; u += WG) {
        let e = u / parts;
        var acc = 0.0;
        for (var c = u % parts; c < p.hidden; c += parts) {
            acc += gate[c * ne + e] * xg(t, c);
        }
        r_part[u] = acc;
    }
    workgroupBarrier();
    if (lid == 0u) {
        var inv = 0.0;
        if (staged()) {
            inv = staged_inv();
            r_inv = inv;
        } else {
            var tot = 0.0;
            for (var i = 0u; i < WG; i++) { tot += r_red[i]; }
            inv = 1.0 / sqrt(tot / f32(p.hidden) + p.eps);
        }
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
    for (var c4 = lid; c4 < p.hidden / 4u; c4 += WG) {
        let v = x_row4(t, c4);
        let b = p.save_x + t * p.hidden + 4u * c4;
        route[b] = bitcast<u32>(v.x);
        route[b + 1u] = bitcast<u32>(v.y);
        route[b + 2u] = bitcast<u32>(v.z);
        route[b + 3u] = bitcast<u32>(v.w);
    }
}

// The first and the last four of eight halves (unpack2x16float: no
// shader-f16 needed).
fn lo4(v: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(v.x), unpack2x16float(v.y));
}

fn hi4(v: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(v.z), unpack2x16float(v.w));
}

// The four halves at index i4 of w13 in fours (half of a load).
fn w4(i4: u32) -> vec4<f32> {
    let v = w13[i4 >> 1u];
    return select(lo4(v), hi4(v), (i4 & 1u) == 1u);
}

fn silu_mul(a: vec4<f32>, b: vec4<f32>) -> vec4<f32> {
    return a / (1.0 + exp(-a)) * b;
}

fn store4(i: u32, v: vec4<f32>) {
    act[i] = v.x;
    act[i + 1u] = v.y;
    act[i + 2u] = v.z;
    act[i + 3u] = v.w;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    // One token per workgroup: `per_wg` workgroups cover its k * inter / lanes
    // invocations (`lanes` rows each: eight when inter % 8 == 0, else four).
    let k = min(s.top_k, p.n_experts);
    let lanes = select(4u, 8u, p.inter % 8u == 0u);
    let units = p.inter / lanes;
    let per_tok = k * units;
    let per_wg = (per_tok + WG - 1u) / WG;
    let grp = wid.y * nwg.x + wid.x;
    let t = grp / per_wg;
    // Uniform across the workgroup, so the early return keeps barriers uniform.
    if (t >= s.n_tok) { return; }
    stage_x(t, lid);
    if (p.route_in != 0u) { route_token(t, lid, grp % per_wg == 0u); }
    if (p.save_x != 0u && grp % per_wg == 0u) { save_row(t, lid); }
    let li = (grp % per_wg) * WG + lid;
    if (li >= per_tok) { return; }
    let j = li % units;
    let slot = li / units;
    var e = 0u;
    if (p.route_in != 0u) {
        e = r_id[slot];
    } else {
        e = min(route[(t * p.n_experts + slot) * 2u], p.n_experts - 1u);
    }
    var inv = 0.0;
    if (staged()) { inv = r_inv; } else { inv = row_inv(t); }
    let es = min(slots[e], p.n_slots - 1u);
    let ob = (t * p.n_experts + slot) * p.inter + lanes * j;
    if (lanes == 8u) {
        // In vec4<u32>s (eights): a row of w13 is 2 * inter / 8 of them,
        // w3 starts inter / 8 in.
        let rq = p.inter / 4u;
        let q8 = p.inter / 8u;
        let wb = es * p.hidden * rq;
        var a0 = vec4<f32>(0.0);
        var a1 = vec4<f32>(0.0);
        var b0 = vec4<f32>(0.0);
        var b1 = vec4<f32>(0.0);
        for (var c = 0u; c < p.hidden; c += 4u) {
            let xn = xg4(t, c >> 2u);
            let row = wb + c * rq + j;
            let u0 = w13[row];
            let u1 = w13[row + rq];
            let u2 = w13[row + 2u * rq];
            let u3 = w13[row + 3u * rq];
            a0 += lo4(u0) * xn.x + lo4(u1) * xn.y + lo4(u2) * xn.z + lo4(u3) * xn.w;
            a1 += hi4(u0) * xn.x + hi4(u1) * xn.y + hi4(u2) * xn.z + hi4(u3) * xn.w;
            let row3 = row + q8;
            let v0 = w13[row3];
            let v1 = w13[row3 + rq];
            let v2 = w13[row3 + 2u * rq];
            let v3 = w13[row3 + 3u * rq];
            b0 += lo4(v0) * xn.x + lo4(v1) * xn.y + lo4(v2) * xn.z + lo4(v3) * xn.w;
            b1 += hi4(v0) * xn.x + hi4(v1) * xn.y + hi4(v2) * xn.z + hi4(v3) * xn.w;
        }
        store4(ob, silu_mul(a0 * inv, b0 * inv));
        store4(ob + 4u, silu_mul(a1 * inv, b1 * inv));
    } else {
        // In fours: a row of w13 is 2 * inter / 4 of them, w3 starts inter / 4 in.
        let two_q = p.inter / 2u;
        let q4 = p.inter / 4u;
        let wb = es * p.hidden * two_q;
        var a = vec4<f32>(0.0);
        var b = vec4<f32>(0.0);
        for (var c = 0u; c < p.hidden; c += 4u) {
            let xn = xg4(t, c >> 2u);
            let row = wb + c * two_q + j;
            a += w4(row) * xn.x + w4(row + two_q) * xn.y + w4(row + 2u * two_q) * xn.z
                + w4(row + 3u * two_q) * xn.w;
            let row3 = row + q4;
            b += w4(row3) * xn.x + w4(row3 + two_q) * xn.y + w4(row3 + 2u * two_q) * xn.z
                + w4(row3 + 3u * two_q) * xn.w;
        }
        store4(ob, silu_mul(a * inv, b * inv));
    }
}
