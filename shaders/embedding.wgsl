// x[t][c] = E[tokens[t]][c], reading the table stored transposed
// ([hidden][vocab], the layout the tied lm_head uses). Out-of-range ids are
// rejected on the CPU before they get here; the clamp only keeps reads in bounds.

struct Step { pos0: u32, n_tok: u32, top_k: u32, renorm: u32 }
struct Params { hidden: u32, vocab: u32, _p0: u32, _p1: u32 }

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> s: Step;
@group(0) @binding(1) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> table: array<f32>;
@group(0) @binding(3) var<storage, read> tokens: array<u32>;
@group(0) @binding(4) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let gid = (wid.y * nwg.x + wid.x) * WG + lid;
    if (gid >= s.n_tok * p.hidden) { return; }
    let t = gid / p.hidden;
    let c = gid % p.hidden;
    let tok = min(tokens[t], p.vocab - 1u);
    x[gid] = table[c * p.vocab + tok];
}
