// Residual / elementwise add: y[i] = a[i] + b[i] for i < n_tok * cols.
// The engine fuses its residual adds into matvec (flag 1) and expert_down.

struct Step { pos0: u32, n_tok: u32, top_k: u32, renorm: u32 }
struct Params { cols: u32, _p0: u32, _p1: u32, _p2: u32 }

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> s: Step;
@group(0) @binding(1) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let gid = (wid.y * nwg.x + wid.x) * WG + lid;
    if (gid >= s.n_tok * p.cols) { return; }
    y[gid] = a[gid] + b[gid];
}
