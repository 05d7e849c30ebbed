// f16 weights: W packed two halves per u32 ([cols][rows rounded up to even]),
// read with unpack2x16float (no shader-f16 needed). Otherwise as matvec.wgsl.
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
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read> g: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;


fn wh(i: u32) -> f32 {
    let v = unpack2x16float(w[i >> 1u]);
    return select(v.x, v.y, (i & 1u) == 1u);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let gid = (wid.y * nwg.x + wid.x) * WG + lid;
    let last_only = (p.flags & 4u) != 0u;
    var n = s.n_tok;
    var t0 = 0u;
    if (last_only) { n = 1u; t0 = s.n_tok - 1u; }
    if (gid >= n * p.rows) { return; }
    let t = gid / p.rows;
    let r = gid % p.rows;
    let rp = (p.rows + 1u) & ~1u;
    let xb = (t0 + t) * p.cols;
    var acc = 0.0;
    if ((p.flags & 2u) != 0u) {
        var ss = 0.0;
        for (var c = 0u; c < p.cols; c++) {
            let xv = x[xb + c];
            ss += xv * xv;
            acc += wh(c * rp + r) * (xv * g[c]);
        }
        acc = acc / sqrt(ss / f32(p.cols) + p.eps);
    } else {
        for (var c = 0u; c < p.cols; c++) {
            acc += wh(c * rp + r) * x[xb + c];
        }
    }
    let yi = t * p.rows + r;
    if ((p.flags & 1u) != 0u) {
        y[yi] = y[yi] + acc;
    } else {
        y[yi] = acc;
    }
}
