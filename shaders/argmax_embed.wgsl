// Greedy sampling fused with the next step's embedding lookup: as
// argmax.wgsl (out[0] = index of the largest of v[0..n], lowest index on
// ties, NaN never wins; one workgroup of WG invocations), then
// x[c] = table[c][out[0]] for c < hidden, the embedding row of the sampled
// token (table stored transposed, [hidden][n = vocab], as embedding.wgsl),
// so that decoding that token next needs no embedding dispatch.

struct Params { n: u32, hidden: u32, _p1: u32, _p2: u32 }

// Invocations: a power of two up to 64 (the engine sets it from the
// adapter's barrier workgroup size: each barrier costs software adapters
// per invocation, SwiftShader 16).
override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> v: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;
@group(0) @binding(3) var<storage, read> table: array<f32>;
@group(0) @binding(4) var<storage, read_write> x: array<f32>;

var<workgroup> best_v: array<f32, 64>;
var<workgroup> best_i: array<u32, 64>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32) {
    var bv = 0.0;
    var bi = 0xffffffffu;
    for (var i = lid; i < p.n; i += WG) {
        let x = v[i];
        if (x == x && (bi == 0xffffffffu || x > bv)) {
            bv = x;
            bi = i;
        }
    }
    best_v[lid] = bv;
    best_i[lid] = bi;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            let ov = best_v[lid + stride];
            let oi = best_i[lid + stride];
            let mi = best_i[lid];
            if (oi != 0xffffffffu && (mi == 0xffffffffu || ov > best_v[lid] || (ov == best_v[lid] && oi < mi))) {
                best_v[lid] = ov;
                best_i[lid] = oi;
            }
        }
        workgroupBarrier();
    }
    var r = best_i[0];
    if (r == 0xffffffffu) { r = 0u; }
    if (lid == 0u) {
        out[0] = r;
    }
    for (var c = lid; c < p.hidden; c += WG) {
        x[c] = table[c * p.n + r];
    }
}
