// q8_0 experts (no shader-f16 needed): w2 read packed, four i8 per u32,
// sign-extended with shifts; one f16 scale per group of 32 weights along a
// row, two per u32, read with unpack2x16float.
// SwiGLU expert, second half, fused with the weighted sum over the routed
// experts and the residual add: x[t][i] += sum_slot weight * (w2_e[i] . act[t][slot]).
// One expert's w2 in the pool (rows = hidden, cols = inter, a multiple of
// 32), in u32 words:
//   values: word (r, w) at w * hidden + r, w < inter / 4 (bytes 4w..4w+3 of
//           row r: neighbouring invocations read neighbouring words)
//   scales: after the values; group gi of row r in the low (r even) or high
//           (r odd) half of word gi * ceil(hidden / 2) + r / 2.
// The pool holds n_slots experts of that size; slots[e] is where expert e of
// this layer lives (the engine keeps the table; eviction never rebinds).

struct Step { pos0: u32, n_tok: u32, top_k: u32, renorm: u32 }
struct Params { hidden: u32, inter: u32, n_experts: u32, eps: f32, n_slots: u32, route_in: u32, n_part: u32, save_x: u32 }

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> s: Step;
@group(0) @binding(1) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> w2: array<u32>;
@group(0) @binding(3) var<storage, read> act: array<f32>;
@group(0) @binding(4) var<storage, read> route: array<u32>;
@group(0) @binding(5) var<storage, read_write> x: array<f32>;
@group(0) @binding(6) var<storage, read> slots: array<u32>;
// After the fused decode attention (n_part > 0, n_tok = 1): its heads'
// o_proj shares, part[head][i], added to the residual here.
@group(0) @binding(7) var<storage, read> part: array<f32>;

// Four signed bytes of a word (byte 0 first) as f32.
fn q8(w: u32) -> vec4<f32> {
    return vec4<f32>(
        f32(bitcast<i32>(w << 24u) >> 24u),
        f32(bitcast<i32>(w << 16u) >> 24u),
        f32(bitcast<i32>(w << 8u) >> 24u),
        f32(bitcast<i32>(w) >> 24u));
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let gid = (wid.y * nwg.x + wid.x) * WG + lid;
    if (gid >= s.n_tok * p.hidden) { return; }
    let t = gid / p.hidden;
    let i = gid % p.hidden;
    let k = min(s.top_k, p.n_experts);
    let ng = p.inter / 32u;
    let rh = (p.hidden + 1u) / 2u;
    let vals = p.hidden * (p.inter / 4u);
    var total = 0.0;
    for (var slot = 0u; slot < k; slot++) {
        let ri = (t * p.n_experts + slot) * 2u;
        let e = min(route[ri], p.n_experts - 1u);
        let wt = bitcast<f32>(route[ri + 1u]);
        let base = min(slots[e], p.n_slots - 1u) * (vals + ng * rh);
        let sb = base + vals + (i >> 1u);
        let ab = (t * p.n_experts + slot) * p.inter;
        var acc = 0.0;
        for (var gi = 0u; gi < ng; gi++) {
            var ga = 0.0;
            for (var m = 0u; m < 8u; m++) {
                let c = ab + gi * 32u + m * 4u;
                let av = vec4<f32>(act[c], act[c + 1u], act[c + 2u], act[c + 3u]);
                ga += dot(q8(w2[base + (gi * 8u + m) * p.hidden + i]), av);
            }
            let d = unpack2x16float(w2[sb + gi * rh]);
            acc += ga * select(d.x, d.y, (i & 1u) == 1u);
        }
        total += wt * acc;
    }
    var o = 0.0;
    for (var hh = 0u; hh < p.n_part; hh++) { o += part[hh * p.hidden + i]; }
    x[gid] = x[gid] + o + total;
}
