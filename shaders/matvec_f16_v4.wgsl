// matvec_f16.wgsl with four output rows per invocation (rows % 4 == 0): W
// read four halves at a time (two u32s), a quarter of the loads, which is what software adapters pay for
// (SwiftShader). The engine uses it for the lm_head when vocab % 4 == 0.
// y[t][r] (+)= scale_t * sum_c W[c][r] * (x[t][c] * g[c]?)
// W is stored transposed ([cols][rows]) so neighbouring invocations (rows)
// read neighbouring addresses. One output row per invocation.
// flags: bit 0 = accumulate into y (residual add), bit 1 = RMS-normalise
// x[t] with weight g first (fused RMSNorm), bit 2 = only the last token of
// the step (x row n_tok-1, written to y row 0).

struct Step { pos0: u32, n_tok: u32, top_k: u32, renorm: u32 }
struct Params { rows: u32, cols: u32, flags: u32, eps: f32 }

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> s: Step;
@group(0) @binding(1) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> w: array<vec2<u32>>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read> g: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

// Four halves (two u32s, unpack2x16float); with rows % 4 == 0 the rows
// need no padding.
fn w4(i: u32) -> vec4<f32> {
    let v = w[i];
    return vec4<f32>(unpack2x16float(v.x), unpack2x16float(v.y));
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let gid = (wid.y * nwg.x + wid.x) * WG + lid;
    let last_only = (p.flags & 4u) != 0u;
    var n = s.n_tok;
    var t0 = 0u;
    if (last_only) { n = 1u; t0 = s.n_tok - 1u; }
    let r4s = p.rows / 4u;
    if (gid >= n * r4s) { return; }
    let t = gid / r4s;
    let r4 = gid % r4s;
    let xb = (t0 + t) * p.cols;
    var acc = vec4<f32>(0.0);
    if ((p.flags & 2u) != 0u) {
        var ss = 0.0;
        for (var c = 0u; c < p.cols; c++) {
            let xv = x[xb + c];
            ss += xv * xv;
            acc += w4(c * r4s + r4) * (xv * g[c]);
        }
        acc = acc / sqrt(ss / f32(p.cols) + p.eps);
    } else {
        for (var c = 0u; c < p.cols; c++) {
            acc += w4(c * r4s + r4) * x[xb + c];
        }
    }
    let yi = t * p.rows + 4u * r4;
    if ((p.flags & 1u) != 0u) {
        acc += vec4<f32>(y[yi], y[yi + 1u], y[yi + 2u], y[yi + 3u]);
    }
    y[yi] = acc.x;
    y[yi + 1u] = acc.y;
    y[yi + 2u] = acc.z;
    y[yi + 3u] = acc.w;
}
