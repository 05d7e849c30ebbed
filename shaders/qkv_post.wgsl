// Attention input of the families with q/k/v extras (OLMoE, Qwen2-MoE,
// Qwen3-MoE), after the projection (matvec with the input RMSNorm fused
// wrote raw[t] = [q | k | v], q_dim + 2 kv_dim wide): per head,
// + bias (Qwen2-MoE; zeros otherwise), then q/k RMSNorm (norm_mode 1:
// over the whole q or k projection, OLMoE; 2: per head with one weight of
// head_dim, Qwen3-MoE; 0: none), then RoPE (rotate-half, table of (cos, sin)
// per (position, i)) -> q to `q`, k and v appended to the KV cache at
// position pos0 + t (k_cache transposed [kv_dim][max_seq], v_cache
// [max_seq][kv_dim]), as qkv_rope.wgsl does for Mixtral.
// One invocation per (token, head): n_heads q heads, then n_kv k heads, then
// n_kv v heads. qk_norm holds the q weight (q_norm_len values) then the k weight.

struct Step { pos0: u32, n_tok: u32, top_k: u32, renorm: u32 }
struct Params { n_heads: u32, n_kv: u32, head_dim: u32, max_seq: u32, eps: f32, norm_mode: u32, q_norm_len: u32, _p0: u32 }

override WG: u32 = 64u;

@group(0) @binding(0) var<uniform> s: Step;
@group(0) @binding(1) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> raw: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read> qk_norm: array<f32>;
@group(0) @binding(5) var<storage, read> rope: array<f32>;
@group(0) @binding(6) var<storage, read_write> q: array<f32>;
@group(0) @binding(7) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(8) var<storage, read_write> v_cache: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let gid = (wid.y * nwg.x + wid.x) * WG + lid;
    let hd = p.head_dim;
    let half = hd / 2u;
    let q_dim = p.n_heads * hd;
    let kv_dim = p.n_kv * hd;
    let units = p.n_heads + 2u * p.n_kv;
    if (gid >= s.n_tok * units) { return; }
    let t = gid / units;
    let u = gid % units;
    let pos = s.pos0 + t;
    let rb = t * (q_dim + 2u * kv_dim);

    if (u >= p.n_heads + p.n_kv) {
        // v head: bias only.
        let r0 = q_dim + kv_dim + (u - p.n_heads - p.n_kv) * hd;
        for (var d = 0u; d < hd; d++) {
            v_cache[pos * kv_dim + (r0 - q_dim - kv_dim) + d] = raw[rb + r0 + d] + bias[r0 + d];
        }
        return;
    }
    let is_q = u < p.n_heads;
    var seg0 = 0u;        // first row of this projection (q or k)
    var seg_len = q_dim;
    var head = u;
    var w0 = 0u;          // first norm weight of this projection
    if (!is_q) {
        seg0 = q_dim;
        seg_len = kv_dim;
        head = u - p.n_heads;
        w0 = p.q_norm_len;
    }
    let r0 = seg0 + head * hd;

    var inv = 1.0;
    if (p.norm_mode == 1u) {
        var ss = 0.0;
        for (var c = 0u; c < seg_len; c++) {
            let v = raw[rb + seg0 + c] + bias[seg0 + c];
            ss += v * v;
        }
        inv = 1.0 / sqrt(ss / f32(seg_len) + p.eps);
    } else if (p.norm_mode == 2u) {
        var ss = 0.0;
        for (var d = 0u; d < hd; d++) {
            let v = raw[rb + r0 + d] + bias[r0 + d];
            ss += v * v;
        }
        inv = 1.0 / sqrt(ss / f32(hd) + p.eps);
    }

    for (var i = 0u; i < half; i++) {
        var a = raw[rb + r0 + i] + bias[r0 + i];
        var b = raw[rb + r0 + i + half] + bias[r0 + i + half];
        if (p.norm_mode == 1u) {
            a = qk_norm[w0 + head * hd + i] * (a * inv);
            b = qk_norm[w0 + head * hd + i + half] * (b * inv);
        } else if (p.norm_mode == 2u) {
            a = qk_norm[w0 + i] * (a * inv);
            b = qk_norm[w0 + i + half] * (b * inv);
        }
        let ri = (pos * half + i) * 2u;
        let cs = rope[ri];
        let sn = rope[ri + 1u];
        let o1 = a * cs - b * sn;
        let o2 = b * cs + a * sn;
        if (is_q) {
            q[t * q_dim + r0 + i] = o1;
            q[t * q_dim + r0 + i + half] = o2;
        } else {
            let kc = r0 - q_dim + i;
            k_cache[kc * p.max_seq + pos] = o1;
            k_cache[(kc + half) * p.max_seq + pos] = o2;
        }
    }
}
