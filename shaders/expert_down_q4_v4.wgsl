// expert_down_q4.wgsl with four outputs per invocation (hidden % 4 == 0 and
// an expert's words a multiple of 4, ExpertDown::for_pool): the four rows'
// words of a column step read as one vec4<u32> (neighbouring rows are
// neighbouring words) and the token's act as vec4s, a tenth of the loads,
// which is what software adapters pay for (SwiftShader); the same
// arithmetic per output as expert_down_q4.wgsl.
// q4_0 experts (no shader-f16 needed): w2 read packed, eight 4-bit values
// per u32 with shifts and masks; value = d * (q - 8), one f16 scale d per
// group of 32 weights along a row, two per u32, read with unpack2x16float.
// A group is 16 bytes (4 words): byte b holds weight b in its low nibble and
// weight b + 16 in its high nibble (ggml's order).
// SwiGLU expert, second half, fused with the weighted sum over the routed
// experts and the residual add: x[t][i] += sum_slot weight * (w2_e[i] . act[t][slot]).
// One expert's w2 in the pool (rows = hidden, cols = inter, a multiple of
// 32), in u32 words:
//   values: word (r, w) at w * hidden + r, w < inter / 8 (bytes 4w..4w+3 of
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
@group(0) @binding(2) var<storage, read> w2: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> act: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> route: array<u32>;
@group(0) @binding(5) var<storage, read_write> x: array<f32>;
@group(0) @binding(6) var<storage, read> slots: array<u32>;
// After the fused decode attention (n_part > 0, n_tok = 1): its heads'
// o_proj shares, part[head][i], added to the residual here.
@group(0) @binding(7) var<storage, read> part: array<f32>;

// The low nibbles of a word's four bytes (byte 0 first), minus 8, as f32
// (the high nibbles: q4(w >> 4u)). Converted as i32 (the same values):
// a software adapter on x86 converts signed integers in one instruction,
// unsigned ones in several (SwiftShader: expert_up_q4_v4 ~0.88x the time).
fn q4(w: u32) -> vec4<f32> {
    let v = bitcast<vec4<i32>>(vec4<u32>(w, w >> 8u, w >> 16u, w >> 24u) & vec4<u32>(15u));
    return vec4<f32>(v) - vec4<f32>(8.0);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let gid = (wid.y * nwg.x + wid.x) * WG + lid;
    let h4 = p.hidden / 4u;
    if (gid >= s.n_tok * h4) { return; }
    let t = gid / h4;
    // Outputs 4 i4 .. 4 i4 + 3.
    let i4 = gid % h4;
    let k = min(s.top_k, p.n_experts);
    let ng = p.inter / 32u;
    let rh = (p.hidden + 1u) / 2u;
    let vals = p.hidden * (p.inter / 8u);
    // In vec4s (the engine checks that an expert's words divide by 4).
    let per = (vals + ng * rh) / 4u;
    var total = vec4<f32>(0.0);
    for (var slot = 0u; slot < k; slot++) {
        let ri = (t * p.n_experts + slot) * 2u;
        let e = min(route[ri], p.n_experts - 1u);
        let wt = bitcast<f32>(route[ri + 1u]);
        let base = min(slots[e], p.n_slots - 1u) * per;
        let ab = (t * p.n_experts + slot) * (p.inter / 4u);
        var acc = vec4<f32>(0.0);
        for (var gi = 0u; gi < ng; gi++) {
            var ga = vec4<f32>(0.0);
            for (var m = 0u; m < 4u; m++) {
                // Word m of the group: weights 4m..4m+3 (low nibbles) and 4m+16..4m+19 (high).
                let lo = act[ab + gi * 8u + m];
                let hi = act[ab + gi * 8u + m + 4u];
                let w = w2[base + (gi * 4u + m) * h4 + i4];
                ga += vec4<f32>(
                    dot(q4(w.x), lo) + dot(q4(w.x >> 4u), hi),
                    dot(q4(w.y), lo) + dot(q4(w.y >> 4u), hi),
                    dot(q4(w.z), lo) + dot(q4(w.z >> 4u), hi),
                    dot(q4(w.w), lo) + dot(q4(w.w >> 4u), hi));
            }
            // Rows 4 i4 and 4 i4 + 1 share a scale word, the next two the
            // next word: both in one vec4 (the word index is even).
            let sw = 4u * base + vals + gi * rh + 2u * i4;
            let sv = w2[sw / 4u];
            let pair = select(sv.xy, sv.zw, (sw & 3u) == 2u);
            let d01 = unpack2x16float(pair.x);
            let d23 = unpack2x16float(pair.y);
            acc += ga * vec4<f32>(d01.x, d01.y, d23.x, d23.y);
        }
        total += wt * acc;
    }
    let xb = t * p.hidden + 4u * i4;
    var o = vec4<f32>(0.0);
    for (var hh = 0u; hh < p.n_part; hh++) {
        let pb = hh * p.hidden + 4u * i4;
        o += vec4<f32>(part[pb], part[pb + 1u], part[pb + 2u], part[pb + 3u]);
    }
    x[xb] = x[xb] + o.x + total.x;
    x[xb + 1u] = x[xb + 1u] + o.y + total.y;
    x[xb + 2u] = x[xb + 2u] + o.z + total.z;
    x[xb + 3u] = x[xb + 3u] + o.w + total.w;
}
