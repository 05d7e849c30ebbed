// expert_down.wgsl with four outputs per invocation (hidden % 4 == 0): w2
// read as vec4s (f32 here; expert_down_f16_v4.wgsl reads four halves at a
// time), a quarter of the loads, which is what software adapters pay for
// (SwiftShader). The engine picks it when hidden % 4 == 0.
// SwiGLU expert, second half, fused with the weighted sum over the routed
// experts and the residual add: x[t][i] += sum_slot weight * (w2_e[i] . act[t][slot]).
// w2 is stored transposed per expert: w2[e][j][i] ([inter][hidden]), in the
// expert pool: w2 holds n_slots experts, slots[e] is where expert e of this
// layer lives (the engine keeps the table; eviction never rebinds).

struct Step { pos0: u32, n_tok: u32, top_k: u32, renorm: u32 }
struct Params { hidden: u32, inter: u32, n_experts: u32, eps: f32, n_slots: u32, route_in: u32, n_part: u32, save_x: u32 }

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> s: Step;
@group(0) @binding(1) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> w2: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> act: array<f32>;
@group(0) @binding(4) var<storage, read> route: array<u32>;
@group(0) @binding(5) var<storage, read_write> x: array<f32>;
@group(0) @binding(6) var<storage, read> slots: array<u32>;
// After the fused decode attention (n_part > 0, n_tok = 1): its heads'
// o_proj shares, part[head][i], added to the residual here.
@group(0) @binding(7) var<storage, read> part: array<f32>;

fn w4(i: u32) -> vec4<f32> {
    return w2[i];
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let gid = (wid.y * nwg.x + wid.x) * WG + lid;
    let h4 = p.hidden / 4u;
    if (gid >= s.n_tok * h4) { return; }
    let t = gid / h4;
    let i4 = gid % h4;
    let k = min(s.top_k, p.n_experts);
    var total = vec4<f32>(0.0);
    for (var slot = 0u; slot < k; slot++) {
        let ri = (t * p.n_experts + slot) * 2u;
        let e = min(route[ri], p.n_experts - 1u);
        let wt = bitcast<f32>(route[ri + 1u]);
        // In vec4s: an expert is inter * hidden / 4 of them.
        let wb = min(slots[e], p.n_slots - 1u) * p.inter * h4;
        let ab = (t * p.n_experts + slot) * p.inter;
        var acc = vec4<f32>(0.0);
        for (var j = 0u; j < p.inter; j++) {
            acc += w4(wb + j * h4 + i4) * act[ab + j];
        }
        total += wt * acc;
    }
    let i = 4u * i4;
    var o = vec4<f32>(0.0);
    for (var hh = 0u; hh < p.n_part; hh++) {
        let pb = hh * p.hidden + i;
        o += vec4<f32>(part[pb], part[pb + 1u], part[pb + 2u], part[pb + 3u]);
    }
    let v = o + total;
    let xb = t * p.hidden + i;
    x[xb] = x[xb] + v.x;
    x[xb + 1u] = x[xb + 1u] + v.y;
    x[xb + 2u] = x[xb + 2u] + v.z;
    x[xb + 3u] = x[xb + 3u] + v.w;
}
