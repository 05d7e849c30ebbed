// The shared expert's gate (Qwen2-MoE), one token per invocation:
// route[t] = (0, sigmoid(gate . RMSNorm(x[t]))) with the post-attention norm
// fused, the routing word pair the expert kernels read for a one-expert
// "layer" (the shared expert runs for every token, scaled by its gate).

struct Step { pos0: u32, n_tok: u32, top_k: u32, renorm: u32 }
struct Params { hidden: u32, eps: f32, _p0: u32, _p1: u32 }

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> s: Step;
@group(0) @binding(1) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> gate: array<f32>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read> g: array<f32>;
@group(0) @binding(5) var<storage, read_write> route: array<u32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let t = (wid.y * nwg.x + wid.x) * WG + lid;
    if (t >= s.n_tok) { return; }
    let xb = t * p.hidden;
    var ss = 0.0;
    var acc = 0.0;
    for (var c = 0u; c < p.hidden; c++) {
        let xv = x[xb + c];
        ss += xv * xv;
        acc += gate[c] * (xv * g[c]);
    }
    let z = acc / sqrt(ss / f32(p.hidden) + p.eps);
    route[t * 2u] = 0u;
    route[t * 2u + 1u] = bitcast<u32>(1.0 / (1.0 + exp(-z)));
}
