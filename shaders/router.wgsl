// MoE router for one token per invocation: RMSNorm(x) -> gate logits
// (gate stored transposed, [hidden][n_experts]) -> softmax -> top-k (largest
// first, lowest index on ties) -> weights renormalised over the chosen k
// (renorm = 1) or left as the softmax (renorm = 0, dense mixture with k = all).
// route[t][slot] = (expert id, bitcast weight); probs is scratch [n_tok][n_experts].

struct Step { pos0: u32, n_tok: u32, top_k: u32, renorm: u32 }
struct Params { hidden: u32, n_experts: u32, eps: f32, _p0: u32 }

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> s: Step;
@group(0) @binding(1) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read> g: array<f32>;
@group(0) @binding(5) var<storage, read_write> probs: array<f32>;
@group(0) @binding(6) var<storage, read_write> route: array<u32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let t = (wid.y * nwg.x + wid.x) * WG + lid;
    if (t >= s.n_tok) { return; }
    let ne = p.n_experts;
    let xb = t * p.hidden;
    let pb = t * ne;
    var ss = 0.0;
    for (var c = 0u; c < p.hidden; c++) {
        let xv = x[xb + c];
        ss += xv * xv;
    }
    let inv = 1.0 / sqrt(ss / f32(p.hidden) + p.eps);
    for (var e = 0u; e < ne; e++) {
        var acc = 0.0;
        for (var c = 0u; c < p.hidden; c++) {
            acc += w[c * ne + e] * (x[xb + c] * g[c]);
        }
        probs[pb + e] = acc * inv;
    }
    var m = probs[pb];
    for (var e = 1u; e < ne; e++) { m = max(m, probs[pb + e]); }
    var sum = 0.0;
    for (var e = 0u; e < ne; e++) {
        let v = exp(probs[pb + e] - m);
        probs[pb + e] = v;
        sum += v;
    }
    for (var e = 0u; e < ne; e++) { probs[pb + e] = probs[pb + e] / sum; }

    let k = min(s.top_k, ne);
    var chosen = 0.0;
    for (var slot = 0u; slot < k; slot++) {
        var bi = 0u;
        var bv = -1.0;
        for (var e = 0u; e < ne; e++) {
            let v = probs[pb + e];
            if (v > bv) { bv = v; bi = e; }
        }
        probs[pb + bi] = -2.0;
        chosen += bv;
        route[(pb + slot) * 2u] = bi;
        route[(pb + slot) * 2u + 1u] = bitcast<u32>(bv);
    }
    if (s.renorm != 0u) {
        for (var slot = 0u; slot < k; slot++) {
            let i = (pb + slot) * 2u + 1u;
            route[i] = bitcast<u32>(bitcast<f32>(route[i]) / chosen);
        }
    }
}
