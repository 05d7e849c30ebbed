// expert_down_f16.wgsl with eight outputs per invocation (hidden % 8 == 0):
// w2 read eight halves at a time (one vec4<u32> per load). Software adapters (lavapipe, SwiftShader) pay per
// load and per operation of every invocation, not per byte: wide loads and
// few invocations are what makes this kernel cheap there. The engine picks
// it when hidden % 8 == 0.
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
@group(0) @binding(2) var<storage, read> w2: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> act: array<f32>;
@group(0) @binding(4) var<storage, read> route: array<u32>;
@group(0) @binding(5) var<storage, read_write> x: array<f32>;
@group(0) @binding(6) var<storage, read> slots: array<u32>;
// After the fused decode attention (n_part > 0, n_tok = 1): its heads'
// o_proj shares, part[head][i], added to the residual here.
@group(0) @binding(7) var<storage, read> part: array<f32>;

// The first and the last four of eight halves (unpack2x16float: no
// shader-f16 needed).
fn lo4(v: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(v.x), unpack2x16float(v.y));
}

fn hi4(v: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(v.z), unpack2x16float(v.w));
}

// x[t][i..i + 4] += the heads' o_proj shares + v.
fn add4(t: u32, i: u32, v: vec4<f32>) {
    var o = v;
    for (var hh = 0u; hh < p.n_part; hh++) {
        let pb = hh * p.hidden + i;
        o += vec4<f32>(part[pb], part[pb + 1u], part[pb + 2u], part[pb + 3u]);
    }
    let xb = t * p.hidden + i;
    x[xb] = x[xb] + o.x;
    x[xb + 1u] = x[xb + 1u] + o.y;
    x[xb + 2u] = x[xb + 2u] + o.z;
    x[xb + 3u] = x[xb + 3u] + o.w;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let gid = (wid.y * nwg.x + wid.x) * WG + lid;
    let h8 = p.hidden / 8u;
    if (gid >= s.n_tok * h8) { return; }
    let t = gid / h8;
    let i = gid % h8;
    let k = min(s.top_k, p.n_experts);
    var t0 = vec4<f32>(0.0);
    var t1 = vec4<f32>(0.0);
    for (var slot = 0u; slot < k; slot++) {
        let ri = (t * p.n_experts + slot) * 2u;
        let e = min(route[ri], p.n_experts - 1u);
        let wt = bitcast<f32>(route[ri + 1u]);
        // In vec4<u32>s (eights): an expert is inter * hidden / 8 of them.
        let wb = min(slots[e], p.n_slots - 1u) * p.inter * h8 + i;
        let ab = (t * p.n_experts + slot) * p.inter;
        var a0 = vec4<f32>(0.0);
        var a1 = vec4<f32>(0.0);
        for (var j = 0u; j < p.inter; j++) {
            let u = w2[wb + j * h8];
            let a = act[ab + j];
            a0 += lo4(u) * a;
            a1 += hi4(u) * a;
        }
        t0 += wt * a0;
        t1 += wt * a1;
    }
    add4(t, 8u * i, t0);
    add4(t, 8u * i + 4u, t1);
}
