// expert_up for q4_0 pools, four intermediate rows per invocation
// (inter % 4 == 0, always for a quantized pool): the four rows' words of a column group are consecutive,
// read as one vec4<u32> (and their f16 scales as one pair of words), a
// quarter of the weight loads, which is what software adapters pay for
// (SwiftShader). The engine picks it for every pool of this format.
// q4_0 experts (no shader-f16 needed): the weights are read packed, eight
// 4-bit values per u32 with shifts and masks; value = d * (q - 8), one f16
// scale d per group of 32 weights along a row, two per u32, read with
// unpack2x16float. A group is 16 bytes (4 words): byte b holds weight b in
// its low nibble and weight b + 16 in its high nibble (ggml's order).
// SwiGLU expert, first half, for every (token, routed slot, intermediate row):
// act[t][slot][j] = silu(w1_e[j] . xn) * (w3_e[j] . xn), xn = RMSNorm(x[t])
// (post-attention norm fused), e = route[t][slot].id.
// One expert's w13 in the pool (rows = 2 * inter: w1's rows, then w3's;
// cols = hidden, a multiple of 32), in u32 words:
//   values: word (r, w) at w * rows + r, w < hidden / 8 (bytes 4w..4w+3 of
//           row r: neighbouring invocations read neighbouring words)
//   scales: after the values; group gi of row r in the low (r even) or high
//           (r odd) half of word gi * ceil(rows / 2) + r / 2.
// The pool holds n_slots experts of that size; slots[e] is where expert e of
// this layer lives (the engine keeps the table; eviction never rebinds).

struct Step { pos0: u32, n_tok: u32, top_k: u32, renorm: u32 }
struct Params { hidden: u32, inter: u32, n_experts: u32, eps: f32, n_slots: u32, route_in: u32, n_part: u32, save_x: u32 }

override WG: u32 = 64u;
// At most this many workgroups per token (0: one per WG units of four
// rows); the engine sets it for software adapters (see main).
override GROUPS: u32 = 0u;

@group(0) @binding(0) var<uniform> s: Step;
@group(0) @binding(1) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> w13: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
// The norm weight as vec4s (hidden % 32 == 0 for quantized experts).
@group(0) @binding(4) var<storage, read> g: array<vec4<f32>>;
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
// As vec4s: the main loop reads four columns per load (software adapters
// pay per load).
var<workgroup> xs: array<vec4<f32>, 512>;

fn xin(xb: u32, c: u32) -> f32 {
    if (p.hidden <= MAX_HIDDEN) { return xs[c >> 2u][c & 3u]; }
    return x[xb + c];
}

fn gw(c: u32) -> f32 {
    return g[c >> 2u][c & 3u];
}

fn stage_x(t: u32, lid: u32) {
    var ss = 0.0;
    if (p.hidden <= MAX_HIDDEN) {
        for (var c4 = lid; c4 < p.hidden / 4u; c4 += WG) {
            let c = 4u * c4;
            let b = t * p.hidden + c;
            var v = vec4<f32>(x[b], x[b + 1u], x[b + 2u], x[b + 3u]);
            for (var hh = 0u; hh < p.n_part; hh++) {
                let pb = hh * p.hidden + c;
                v += vec4<f32>(part[pb], part[pb + 1u], part[pb + 2u], part[pb + 3u]);
            }
            xs[c4] = v;
            ss += dot(v, v);
        }
    } else {
        for (var c = lid; c < p.hidden; c += WG) {
            let v = x[t * p.hidden + c];
            ss += v * v;
        }
    }
    // Each invocation's share of the squares (the RMSNorm), summed by norm_inv.
    r_red[lid] = ss;
    workgroupBarrier();
}

// Invocation 0: the token's RMSNorm factor into r_inv (after stage_x's
// barrier; the caller's next barrier publishes it).
fn norm_inv(lid: u32) {
    if (lid == 0u) {
        var tot = 0.0;
        for (var i = 0u; i < WG; i++) { tot += r_red[i]; }
        r_inv = 1.0 / sqrt(tot / f32(p.hidden) + p.eps);
    }
}

// The staged row normalised in place, xs = x * g * inv (each invocation
// the entries it staged, so no barrier before), then one barrier: the
// rows below read xs as the normalised input, once per workgroup instead
// of once per row.
fn normalize_x(lid: u32) {
    if (p.hidden <= MAX_HIDDEN) {
        let inv = r_inv;
        for (var c4 = lid; c4 < p.hidden / 4u; c4 += WG) {
            xs[c4] = xs[c4] * g[c4] * inv;
        }
    }
    workgroupBarrier();
}

// Columns c..c+3 (c % 4 == 0) of the token's normalised input row.
fn xn4(xb: u32, c: u32) -> vec4<f32> {
    if (p.hidden <= MAX_HIDDEN) { return xs[c >> 2u]; }
    let v = vec4<f32>(x[xb + c], x[xb + c + 1u], x[xb + c + 2u], x[xb + c + 3u]);
    return v * g[c >> 2u] * (r_inv);
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
var<workgroup> r_inv: f32;

fn route_token(t: u32, lid: u32, write: bool) {
    let ne = p.n_experts;
    let xb = t * p.hidden;
    // Gate logits: `parts` invocations per expert, each a strided share of the columns.
    let parts = max(1u, WG / ne);
    for (var u = lid; u < ne * parts; u += WG) {
        let e = u / parts;
        var acc = 0.0;
        for (var c = u % parts; c < p.hidden; c += parts) {
            acc += gate[c * ne + e] * (xin(xb, c) * gw(c));
        }
        r_part[u] = acc;
    }
    workgroupBarrier();
    norm_inv(lid);
    if (lid == 0u) {
        let inv = r_inv;
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

// The low nibbles of a word's four bytes (byte 0 first), minus 8, as f32
// (the high nibbles: q4(w >> 4u)). Converted as i32 (the same values):
// a software adapter on x86 converts signed integers in one instruction,
// unsigned ones in several (SwiftShader: expert_up_q4_v4 ~0.88x the time).
fn q4(w: u32) -> vec4<f32> {
    let v = bitcast<vec4<i32>>(vec4<u32>(w, w >> 8u, w >> 16u, w >> 24u) & vec4<u32>(15u));
    return vec4<f32>(v) - vec4<f32>(8.0);
}

// The f16 scales of rows r..r+3 (r % 4 == 0) of group gi (scales start at
// word sb, rh words per group; sb and rh even, so the pair is aligned).
fn scale4(sb: u32, rh: u32, gi: u32, r: u32) -> vec4<f32> {
    let i = sb + gi * rh + (r >> 1u);
    let v = w13[i >> 2u];
    var w = v.xy;
    if ((i & 2u) != 0u) { w = v.zw; }
    return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
}

// With the expert pool partly resident (save_x > 0): the token's first
// workgroup keeps the layer's input row (x plus the o_proj shares) at
// route[save_x + t * hidden ..], from where the engine restores x when it
// runs this layer's experts again after a missing one was supplied.
fn save_row(t: u32, lid: u32) {
    // The entries this invocation staged (normalize_x rewrites them next).
    for (var c4 = lid; c4 < (p.hidden + 3u) / 4u; c4 += WG) {
        for (var c = 4u * c4; c < min(4u * c4 + 4u, p.hidden); c++) {
            route[p.save_x + t * p.hidden + c] = bitcast<u32>(xin(t * p.hidden, c));
        }
    }
}

// Row sums of four words' weights (low nibbles with xl, high with xh).
fn dot4(w: vec4<u32>, xl: vec4<f32>, xh: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(
        dot(q4(w.x), xl) + dot(q4(w.x >> 4u), xh),
        dot(q4(w.y), xl) + dot(q4(w.y >> 4u), xh),
        dot(q4(w.z), xl) + dot(q4(w.z >> 4u), xh),
        dot(q4(w.w), xl) + dot(q4(w.w >> 4u), xh));
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    // One token per workgroup: `per_wg` workgroups cover its k * inter / 4
    // units of four rows, one unit per invocation, or at most GROUPS
    // workgroups (GROUPS > 0), each invocation looping over units: fewer
    // workgroups route the token and stage its row fewer times (software
    // adapters run a workgroup per CPU thread; more only repeat that work).
    let k = min(s.top_k, p.n_experts);
    let q4n = p.inter / 4u;
    let per_tok = k * q4n;
    var per_wg = (per_tok + WG - 1u) / WG;
    if (GROUPS > 0u) { per_wg = min(per_wg, GROUPS); }
    // Routes only (route_in = 2): one workgroup per token.
    if (p.route_in == 2u) { per_wg = 1u; }
    let grp = wid.y * nwg.x + wid.x;
    let t = grp / per_wg;
    // Uniform across the workgroup, so the early return keeps barriers uniform.
    if (t >= s.n_tok) { return; }
    stage_x(t, lid);
    if (p.route_in != 0u) {
        route_token(t, lid, grp % per_wg == 0u);
    } else {
        norm_inv(lid);
        workgroupBarrier();
    }
    if (p.save_x != 0u && grp % per_wg == 0u) { save_row(t, lid); }
    // Routes only: a prompt's chunk stops here to read them back before
    // any expert runs (uniform across the workgroup; no barrier follows).
    if (p.route_in == 2u) { return; }
    normalize_x(lid);
    for (var li = (grp % per_wg) * WG + lid; li < per_tok; li += per_wg * WG) {
        let j = 4u * (li % q4n);
        let slot = li / q4n;
        var e = 0u;
        if (p.route_in != 0u) {
            e = r_id[slot];
        } else {
            e = min(route[(t * p.n_experts + slot) * 2u], p.n_experts - 1u);
        }
        let rows = 2u * p.inter;
        let ng = p.hidden / 32u;
        let rh = (rows + 1u) / 2u;
        let base = min(slots[e], p.n_slots - 1u) * (rows * (p.hidden / 8u) + ng * rh);
        let sb = base + rows * (p.hidden / 8u);
        let xb = t * p.hidden;
        var a = vec4<f32>(0.0);
        var b = vec4<f32>(0.0);
        for (var gi = 0u; gi < ng; gi++) {
            var ga = vec4<f32>(0.0);
            var gb = vec4<f32>(0.0);
            for (var m = 0u; m < 4u; m++) {
                // Word m of the group: weights 4m..4m+3 (low nibbles) and 4m+16..4m+19 (high).
                let c = gi * 32u + m * 4u;
                let nl = xn4(xb, c);
                let nh = xn4(xb, c + 16u);
                // Words of rows j..j+3 (w1) and inter+j.. (w3), in vec4s.
                let wi = (base + (gi * 4u + m) * rows + j) >> 2u;
                ga += dot4(w13[wi], nl, nh);
                gb += dot4(w13[wi + q4n], nl, nh);
            }
            a += ga * scale4(sb, rh, gi, j);
            b += gb * scale4(sb, rh, gi, p.inter + j);
        }
        let o = a / (1.0 + exp(-a)) * b;
        let ob = (t * p.n_experts + slot) * p.inter + j;
        act[ob] = o.x;
        act[ob + 1u] = o.y;
        act[ob + 2u] = o.z;
        act[ob + 3u] = o.w;
    }
}
