//! The Mixtral forward pass on the GPU.
//!
//! Weights and the KV cache live in GPU buffers. A step (one decoded token,
//! or up to `max_batch` prompt tokens at once) is one command encoder:
//!
//! ```text
//! embedding                                   1 dispatch
//! per layer: qkv_rope (norm+q/k/v+RoPE+cache)  1
//!            attention                        1
//!            matvec o_proj (+ residual)       1
//!            router (norm+gate+softmax+top-k) 1
//!            expert_up (norm+w1/w3+silu*mul)  1
//!            expert_down (w2+weights+resid.)  1
//! lm_head (final norm fused), argmax          2
//! ```
//!
//! = `6 * layers + 3` dispatches per token, and the only readback is the
//! sampled token id (4 bytes), or the logits when asked for them. While a
//! layer still has experts that are not resident, the step is split after
//! that layer's router: the routed ids are read back, the missing experts
//! are fetched from the [`ExpertSource`] (each once) and uploaded, and the
//! step continues. With `use_moe = false` every expert runs (dense
//! mixture), so all of them are loaded up front.

use std::sync::Arc;

use super::argmax::{self, Argmax};
use super::attention::{self, Attention};
use super::context::{GpuContext, GpuError};
use super::expert::{self, pack_w13, pack_w2, ExpertDown, ExpertUp};
use super::kernel::{f32_bytes, transpose, Kernel, Step, WeightFormat};
use super::matvec::{self, Matvec};
use super::qkv_rope::{self, pack_qkv, QkvRope};
use super::router::Router;
use crate::model::{
    Config, ExpertSource, ExpertWeights, Mat, ModelError, RouterWeights, RunOptions, SharedWeights,
};

/// The expert source the engine owns (`Send` natively so the engine can
/// move between threads; the browser's wgpu types are not `Send` anyway).
#[cfg(not(target_arch = "wasm32"))]
pub type DynSource = Box<dyn ExpertSource + Send>;
#[cfg(target_arch = "wasm32")]
pub type DynSource = Box<dyn ExpertSource>;

/// Sizes the engine allocates for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// KV-cache capacity in tokens (capped by `max_position_embeddings`).
    pub max_seq: usize,
    /// Most prompt tokens run together in one step (longer prompts are
    /// split into steps of this size).
    pub max_batch: usize,
    /// Storage of the large matrices (attention, experts, lm_head); the
    /// router, norms and embedding lookup stay f32.
    pub weights: WeightFormat,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_seq: 2048,
            max_batch: 64,
            weights: WeightFormat::F32,
        }
    }
}

/// Counters since the engine was built (or [`Engine::reset_stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Tokens run through the layers.
    pub tokens: u64,
    /// Steps (command encoders that ran a batch of tokens).
    pub steps: u64,
    pub dispatches: u64,
    /// Queue submissions (1 per step, plus 1 per routing readback).
    pub submissions: u64,
    /// Buffers mapped for reading (sampled token, logits, routed ids).
    pub readbacks: u64,
    pub readback_bytes: u64,
    /// Experts fetched from the source and uploaded.
    pub experts_loaded: u64,
    pub expert_bytes_uploaded: u64,
}

#[derive(Debug)]
struct Kernels {
    embed: Kernel,
    qkv: QkvRope,
    attn: Attention,
    mv: Matvec,
    router: Router,
    up: ExpertUp,
    down: ExpertDown,
    argmax: Argmax,
}

#[derive(Debug)]
struct Layer {
    bg_qkv: wgpu::BindGroup,
    bg_attn: wgpu::BindGroup,
    bg_o: wgpu::BindGroup,
    bg_router: wgpu::BindGroup,
    bg_up: wgpu::BindGroup,
    bg_down: wgpu::BindGroup,
    w13: wgpu::Buffer,
    w2: wgpu::Buffer,
    resident: Vec<bool>,
}

/// What a step reads back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Only the argmax of the last position's logits.
    Token,
    /// The last position's logits.
    Logits,
    /// Every position's logits.
    AllLogits,
}

enum Output {
    Token(u32),
    Logits(Vec<f32>),
    All(Vec<Vec<f32>>),
}

/// Mixtral on wgpu. See the module docs for the per-step schedule.
pub struct Engine {
    ctx: Arc<GpuContext>,
    cfg: Config,
    opts: EngineOptions,
    k: Kernels,
    layers: Vec<Layer>,
    step: wgpu::Buffer,
    tokens: wgpu::Buffer,
    route: wgpu::Buffer,
    logits_last: wgpu::Buffer,
    logits_all: wgpu::Buffer,
    argmax_out: wgpu::Buffer,
    readback: wgpu::Buffer,
    bg_embed: wgpu::BindGroup,
    bg_head_last: wgpu::BindGroup,
    bg_head_all: wgpu::BindGroup,
    bg_argmax: wgpu::BindGroup,
    p_qkv: qkv_rope::Params,
    p_attn: attention::Params,
    p_o: matvec::Params,
    p_head_last: matvec::Params,
    p_head_all: matvec::Params,
    p_exp: expert::Params,
    source: DynSource,
    pos: usize,
    stats: EngineStats,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("adapter", &self.ctx.info.name)
            .field("pos", &self.pos)
            .field("opts", &self.opts)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn tensor_err(name: String, reason: String) -> ModelError {
    ModelError::Tensor { name, reason }
}

fn check_mat(name: &str, m: &Mat, rows: usize, cols: usize) -> Result<(), ModelError> {
    if m.rows != rows || m.cols != cols || m.data.len() != rows * cols {
        return Err(tensor_err(
            name.into(),
            format!("shape [{}, {}], expected [{rows}, {cols}]", m.rows, m.cols),
        ));
    }
    Ok(())
}

fn check_vec(name: &str, v: &[f32], n: usize) -> Result<(), ModelError> {
    if v.len() != n {
        return Err(tensor_err(
            name.into(),
            format!("length {}, expected {n}", v.len()),
        ));
    }
    Ok(())
}

/// Check an expert's shapes against the config.
pub fn check_expert(cfg: &Config, w: &ExpertWeights) -> Result<(), ModelError> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    check_mat("w1", &w.w1, i, h)?;
    check_mat("w2", &w.w2, h, i)?;
    check_mat("w3", &w.w3, i, h)
}

impl Engine {
    /// Upload the shared weights and routers and allocate the KV cache and
    /// the (empty) expert slots. Experts come from `source` when first
    /// routed. Nothing here awaits: the async part is [`GpuContext::new`].
    pub fn new(
        ctx: Arc<GpuContext>,
        cfg: &Config,
        shared: &SharedWeights,
        routers: &[RouterWeights],
        source: DynSource,
    ) -> Result<Self, ModelError> {
        Self::with_options(ctx, cfg, shared, routers, source, EngineOptions::default())
    }

    /// [`Engine::new`] with explicit sizes.
    pub fn with_options(
        ctx: Arc<GpuContext>,
        cfg: &Config,
        shared: &SharedWeights,
        routers: &[RouterWeights],
        source: DynSource,
        opts: EngineOptions,
    ) -> Result<Self, ModelError> {
        cfg.validate()?;
        let (h, v, i, ne) = (
            cfg.hidden_size,
            cfg.vocab_size,
            cfg.intermediate_size,
            cfg.num_local_experts,
        );
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let nl = cfg.num_hidden_layers;
        let eps = cfg.rms_norm_eps as f32;
        let max_seq = opts.max_seq.min(cfg.max_position_embeddings).max(1);
        let max_batch = opts.max_batch.clamp(1, max_seq);
        let opts = EngineOptions {
            max_seq,
            max_batch,
            weights: opts.weights,
        };
        let fmt = opts.weights;

        check_mat("model.embed_tokens.weight", &shared.embed_tokens, v, h)?;
        check_vec("model.norm.weight", &shared.norm, h)?;
        if shared.layers.len() != nl {
            return Err(tensor_err(
                "model.layers".into(),
                format!("{} layers, expected {nl}", shared.layers.len()),
            ));
        }
        if routers.len() != nl {
            return Err(tensor_err(
                "block_sparse_moe.gate".into(),
                format!("{} routers, expected {nl}", routers.len()),
            ));
        }
        if let Some(head) = &shared.lm_head {
            check_mat("lm_head.weight", head, v, h)?;
        }
        for (l, la) in shared.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            check_vec(
                &format!("{p}.input_layernorm.weight"),
                &la.input_layernorm,
                h,
            )?;
            check_vec(
                &format!("{p}.post_attention_layernorm.weight"),
                &la.post_attention_layernorm,
                h,
            )?;
            check_mat(&format!("{p}.self_attn.q_proj.weight"), &la.q_proj, qd, h)?;
            check_mat(&format!("{p}.self_attn.k_proj.weight"), &la.k_proj, kvd, h)?;
            check_mat(&format!("{p}.self_attn.v_proj.weight"), &la.v_proj, kvd, h)?;
            check_mat(&format!("{p}.self_attn.o_proj.weight"), &la.o_proj, h, qd)?;
            check_mat(
                &format!("{p}.block_sparse_moe.gate.weight"),
                &routers[l].gate,
                ne,
                h,
            )?;
        }

        // Every binding must fit the adapter.
        let max_binding = ctx.max_binding();
        let big: [(&str, u64); 6] = [
            ("embedding table", (v * h * 4) as u64),
            (
                "expert w1/w3 of one layer",
                (ne * fmt.matrix_bytes(h, 2 * i)) as u64,
            ),
            (
                "expert w2 of one layer",
                (ne * fmt.matrix_bytes(i, h)) as u64,
            ),
            ("attention scores", (max_batch * nh * max_seq * 4) as u64),
            ("KV cache of one layer", (max_seq * kvd * 4) as u64),
            ("expert activations", (max_batch * ne * i * 4) as u64),
        ];
        for (what, bytes) in big {
            if bytes > max_binding {
                return Err(GpuError::Limit(format!(
                    "{what} needs {bytes} bytes, adapter binds at most {max_binding}"
                ))
                .into());
            }
        }

        let c = &*ctx;
        let k = Kernels {
            embed: Kernel::new(c, "embedding", super::embedding::SOURCE, None),
            qkv: QkvRope::with_format(c, fmt),
            attn: Attention::new(c),
            mv: Matvec::with_format(c, fmt),
            router: Router::new(c),
            up: ExpertUp::with_format(c, fmt),
            down: ExpertDown::with_format(c, fmt),
            argmax: Argmax::new(c),
        };

        let p_qkv = qkv_rope::Params {
            hidden: h as u32,
            n_heads: nh as u32,
            n_kv: nkv as u32,
            head_dim: hd as u32,
            max_seq: max_seq as u32,
            eps,
            _p0: 0,
            _p1: 0,
        };
        let p_attn = attention::Params {
            n_heads: nh as u32,
            n_kv: nkv as u32,
            head_dim: hd as u32,
            max_seq: max_seq as u32,
            scale: 1.0 / (hd as f32).sqrt(),
            _p0: 0,
            _p1: 0,
            _p2: 0,
        };
        let p_o = matvec::Params {
            rows: h as u32,
            cols: qd as u32,
            flags: matvec::ACCUMULATE,
            eps,
        };
        let p_head_last = matvec::Params {
            rows: v as u32,
            cols: h as u32,
            flags: matvec::NORM | matvec::LAST_ONLY,
            eps,
        };
        let p_head_all = matvec::Params {
            rows: v as u32,
            cols: h as u32,
            flags: matvec::NORM,
            eps,
        };
        let p_router = super::router::Params {
            hidden: h as u32,
            n_experts: ne as u32,
            eps,
            _p0: 0,
        };
        let p_exp = expert::Params {
            hidden: h as u32,
            inter: i as u32,
            n_experts: ne as u32,
            eps,
        };
        let u = |name: &str, b: &[u8]| c.uniform_init(name, b);
        let ub_qkv = u("p_qkv", bytemuck::bytes_of(&p_qkv));
        let ub_attn = u("p_attn", bytemuck::bytes_of(&p_attn));
        let ub_o = u("p_o", bytemuck::bytes_of(&p_o));
        let ub_head_last = u("p_head_last", bytemuck::bytes_of(&p_head_last));
        let ub_head_all = u("p_head_all", bytemuck::bytes_of(&p_head_all));
        let ub_router = u("p_router", bytemuck::bytes_of(&p_router));
        let ub_exp = u("p_exp", bytemuck::bytes_of(&p_exp));
        let ub_embed = u(
            "p_embed",
            bytemuck::bytes_of(&super::embedding::Params {
                hidden: h as u32,
                vocab: v as u32,
                _p0: 0,
                _p1: 0,
            }),
        );
        let ub_argmax = u(
            "p_argmax",
            bytemuck::bytes_of(&argmax::Params {
                n: v as u32,
                _p0: 0,
                _p1: 0,
                _p2: 0,
            }),
        );

        let step = c.uniform_init(
            "step",
            Step {
                pos0: 0,
                n_tok: 0,
                top_k: 0,
                renorm: 0,
            }
            .bytes(),
        );
        let b = max_batch;
        let f = |n: usize| (n * 4) as u64;
        let tokens = c.storage_zeroed("tokens", f(b));
        let x = c.storage_zeroed("x", f(b * h));
        let q = c.storage_zeroed("q", f(b * qd));
        let attn_out = c.storage_zeroed("attn_out", f(b * qd));
        let scores = c.storage_zeroed("scores", f(b * nh * max_seq));
        let probs = c.storage_zeroed("probs", f(b * ne));
        let route = c.storage_zeroed("route", f(b * ne * 2));
        let act = c.storage_zeroed("act", f(b * ne * i));
        let logits_last = c.storage_zeroed("logits_last", f(v));
        let logits_all = c.storage_zeroed("logits_all", f(b * v));
        let argmax_out = c.storage_zeroed("argmax_out", 4);
        let readback = c.readback_buffer("readback", f((b * v).max(b * ne * 2)));
        let rope = c.storage_init("rope", f32_bytes(&rope_table(cfg, max_seq)));
        let embed_t = c.storage_init(
            "embed_t",
            f32_bytes(&transpose(v, h, &shared.embed_tokens.data)),
        );
        let head_t = match &shared.lm_head {
            Some(m) => c.storage_init("lm_head_t", &fmt.encode(&transpose(v, h, &m.data), h, v)),
            None if fmt == WeightFormat::F32 => embed_t.clone(),
            None => c.storage_init(
                "lm_head_t",
                &fmt.encode(&transpose(v, h, &shared.embed_tokens.data), h, v),
            ),
        };
        let norm = c.storage_init("norm", f32_bytes(&shared.norm));

        let mut layers = Vec::with_capacity(nl);
        for (l, la) in shared.layers.iter().enumerate() {
            let wqkv = c.storage_init(
                "wqkv",
                &fmt.encode(
                    &pack_qkv(&la.q_proj.data, &la.k_proj.data, &la.v_proj.data, h),
                    h,
                    qd + 2 * kvd,
                ),
            );
            let wo = c.storage_init("wo", &fmt.encode(&transpose(h, qd, &la.o_proj.data), qd, h));
            let g_in = c.storage_init("input_norm", f32_bytes(&la.input_layernorm));
            let g_post = c.storage_init("post_norm", f32_bytes(&la.post_attention_layernorm));
            let gate = c.storage_init("gate", f32_bytes(&transpose(ne, h, &routers[l].gate.data)));
            let kc = c.storage_zeroed("k_cache", f(max_seq * kvd));
            let vc = c.storage_zeroed("v_cache", f(max_seq * kvd));
            let w13 = c.storage_zeroed("w13", (ne * fmt.matrix_bytes(h, 2 * i)) as u64);
            let w2 = c.storage_zeroed("w2", (ne * fmt.matrix_bytes(i, h)) as u64);
            layers.push(Layer {
                bg_qkv: k
                    .qkv
                    .bind(c, [&step, &ub_qkv, &wqkv, &x, &g_in, &rope, &q, &kc, &vc]),
                bg_attn: k
                    .attn
                    .bind(c, [&step, &ub_attn, &q, &kc, &vc, &scores, &attn_out]),
                bg_o: k.mv.bind(c, &step, &ub_o, &wo, &attn_out, &g_in, &x),
                bg_router: k
                    .router
                    .bind(c, [&step, &ub_router, &gate, &x, &g_post, &probs, &route]),
                bg_up: k
                    .up
                    .bind(c, [&step, &ub_exp, &w13, &x, &g_post, &route, &act]),
                bg_down: k.down.bind(c, [&step, &ub_exp, &w2, &act, &route, &x]),
                w13,
                w2,
                resident: vec![false; ne],
            });
        }
        let bg_embed = k.embed.bind(c, &[&step, &ub_embed, &embed_t, &tokens, &x]);
        let bg_head_last =
            k.mv.bind(c, &step, &ub_head_last, &head_t, &x, &norm, &logits_last);
        let bg_head_all =
            k.mv.bind(c, &step, &ub_head_all, &head_t, &x, &norm, &logits_all);
        let bg_argmax = k.argmax.bind(c, &ub_argmax, &logits_last, &argmax_out);

        Ok(Self {
            ctx,
            cfg: cfg.clone(),
            opts,
            k,
            layers,
            step,
            tokens,
            route,
            logits_last,
            logits_all,
            argmax_out,
            readback,
            bg_embed,
            bg_head_last,
            bg_head_all,
            bg_argmax,
            p_qkv,
            p_attn,
            p_o,
            p_head_last,
            p_head_all,
            p_exp,
            source,
            pos: 0,
            stats: EngineStats::default(),
        })
    }

    pub fn context(&self) -> &Arc<GpuContext> {
        &self.ctx
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn options(&self) -> EngineOptions {
        self.opts
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn reset_stats(&mut self) {
        self.stats = EngineStats::default();
    }

    /// Tokens in the KV cache.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Empty the KV cache (the resident experts stay).
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Whether `layer{layer}.expert{expert}` is on the GPU.
    pub fn is_expert_resident(&self, layer: usize, expert: usize) -> bool {
        self.layers
            .get(layer)
            .and_then(|l| l.resident.get(expert))
            .copied()
            .unwrap_or(false)
    }

    /// Replace the expert source (resident experts stay).
    pub fn set_source(&mut self, source: DynSource) {
        self.source = source;
    }

    /// Upload an expert now (e.g. one the browser already fetched, or a new
    /// version of it), so the router never has to wait for it.
    pub fn insert_expert(
        &mut self,
        layer: usize,
        expert: usize,
        w: &ExpertWeights,
    ) -> Result<(), ModelError> {
        crate::model::Slot::Expert { layer, expert }.check_in_spec(&self.cfg)?;
        check_expert(&self.cfg, w)?;
        let (h, i) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        let l = &mut self.layers[layer];
        let fmt = self.opts.weights;
        let w13 = fmt.encode(&pack_w13(&w.w1.data, &w.w3.data, i, h), h, 2 * i);
        let w2 = fmt.encode(&pack_w2(&w.w2.data, i, h), i, h);
        self.ctx
            .queue
            .write_buffer(&l.w13, (expert * w13.len()) as u64, &w13);
        self.ctx
            .queue
            .write_buffer(&l.w2, (expert * w2.len()) as u64, &w2);
        l.resident[expert] = true;
        self.stats.expert_bytes_uploaded += (w13.len() + w2.len()) as u64;
        Ok(())
    }

    fn ensure_expert(&mut self, layer: usize, expert: usize) -> Result<(), ModelError> {
        if self.is_expert_resident(layer, expert) {
            return Ok(());
        }
        let w = self.source.load_expert(layer, expert)?;
        check_expert(&self.cfg, &w)
            .map_err(|e| ModelError::Source(format!("layer{layer}.expert{expert}: {e}")))?;
        self.insert_expert(layer, expert, &w)?;
        self.stats.experts_loaded += 1;
        Ok(())
    }

    /// Weight bytes one decoded token reads with `k` experts per token
    /// (attention, router, the `k` experts of every layer, final norm and head).
    pub fn weight_bytes_per_token(&self, k: usize) -> u64 {
        let c = &self.cfg;
        let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let f = self.opts.weights;
        let attn = f.matrix_bytes(h, c.q_dim() + 2 * c.kv_dim())
            + f.matrix_bytes(c.q_dim(), h)
            + 2 * h * 4;
        let moe =
            h * c.num_local_experts * 4 + k * (f.matrix_bytes(h, 2 * i) + f.matrix_bytes(i, h));
        (c.num_hidden_layers * (attn + moe) + f.matrix_bytes(h, v) + 2 * h * 4) as u64
    }

    /// Dispatches one step of `n` tokens issues (without routing splits).
    pub fn dispatches_per_step(&self) -> u64 {
        6 * self.cfg.num_hidden_layers as u64 + 3
    }

    fn check_tokens(&self, tokens: &[u32], opts: &RunOptions) -> Result<usize, ModelError> {
        opts.check_step(
            &self.cfg,
            self.pos,
            tokens,
            self.opts.max_seq,
            "KV cache capacity",
        )
    }

    async fn run(
        &mut self,
        tokens: &[u32],
        opts: &RunOptions,
        want: Want,
    ) -> Result<Output, ModelError> {
        let k = self.check_tokens(tokens, opts)?;
        let start = self.pos;
        let r = self.run_checked(tokens, k, opts.use_moe, want).await;
        if r.is_err() {
            // The cache rows written past `start` are overwritten next time.
            self.pos = start;
        }
        r
    }

    async fn run_checked(
        &mut self,
        tokens: &[u32],
        k: usize,
        use_moe: bool,
        want: Want,
    ) -> Result<Output, ModelError> {
        let ne = self.cfg.num_local_experts;
        if !use_moe {
            for l in 0..self.cfg.num_hidden_layers {
                for e in 0..ne {
                    self.ensure_expert(l, e)?;
                }
            }
        }
        let chunks: Vec<&[u32]> = tokens.chunks(self.opts.max_batch).collect();
        let mut all = Vec::new();
        let mut out = None;
        for (ci, chunk) in chunks.iter().enumerate() {
            let last = ci + 1 == chunks.len();
            let n = chunk.len();
            let step = Step {
                pos0: self.pos as u32,
                n_tok: n as u32,
                top_k: k as u32,
                renorm: u32::from(use_moe),
            };
            self.ctx.queue.write_buffer(&self.step, 0, step.bytes());
            self.ctx
                .queue
                .write_buffer(&self.tokens, 0, bytemuck::cast_slice(chunk));
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            let mut dispatches = 0u64;
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                self.k
                    .embed
                    .dispatch(&mut pass, &self.bg_embed, (n * self.cfg.hidden_size) as u64);
                dispatches += 1;
            }
            for l in 0..self.layers.len() {
                {
                    let ly = &self.layers[l];
                    let mut pass = enc.begin_compute_pass(&Default::default());
                    self.k
                        .qkv
                        .encode(&mut pass, &ly.bg_qkv, &self.p_qkv, n as u32);
                    self.k
                        .attn
                        .encode(&mut pass, &ly.bg_attn, &self.p_attn, n as u32);
                    self.k.mv.encode(&mut pass, &ly.bg_o, &self.p_o, n as u32);
                    self.k.router.encode(&mut pass, &ly.bg_router, n as u32);
                    dispatches += 4;
                }
                if use_moe && self.layers[l].resident.iter().any(|r| !r) {
                    // Read the routed ids back, load what is missing, go on.
                    let bytes = (n * ne * 2 * 4) as u64;
                    enc.copy_buffer_to_buffer(&self.route, 0, &self.readback, 0, bytes);
                    self.ctx.queue.submit([enc.finish()]);
                    self.stats.submissions += 1;
                    let words: Vec<u32> = bytemuck::pod_collect_to_vec(
                        &self.ctx.read_mapped(&self.readback, bytes).await?,
                    );
                    self.stats.readbacks += 1;
                    self.stats.readback_bytes += bytes;
                    for t in 0..n {
                        for s in 0..k {
                            let e = words[(t * ne + s) * 2] as usize;
                            if e >= ne {
                                return Err(GpuError::Readback(format!(
                                    "router returned expert {e}"
                                ))
                                .into());
                            }
                            self.ensure_expert(l, e)?;
                        }
                    }
                    enc = self.ctx.device.create_command_encoder(&Default::default());
                }
                let ly = &self.layers[l];
                let mut pass = enc.begin_compute_pass(&Default::default());
                self.k
                    .up
                    .encode(&mut pass, &ly.bg_up, &self.p_exp, n as u32, k as u32);
                self.k
                    .down
                    .encode(&mut pass, &ly.bg_down, &self.p_exp, n as u32);
                dispatches += 2;
            }
            let v = self.cfg.vocab_size;
            let read: Option<(&wgpu::Buffer, u64)> = {
                let mut pass = enc.begin_compute_pass(&Default::default());
                if want == Want::AllLogits {
                    self.k
                        .mv
                        .encode(&mut pass, &self.bg_head_all, &self.p_head_all, n as u32);
                    dispatches += 1;
                    Some((&self.logits_all, (n * v * 4) as u64))
                } else if last {
                    self.k
                        .mv
                        .encode(&mut pass, &self.bg_head_last, &self.p_head_last, n as u32);
                    dispatches += 1;
                    if want == Want::Token {
                        self.k.argmax.encode(&mut pass, &self.bg_argmax);
                        dispatches += 1;
                        Some((&self.argmax_out, 4))
                    } else {
                        Some((&self.logits_last, (v * 4) as u64))
                    }
                } else {
                    None
                }
            };
            if let Some((src, bytes)) = read {
                enc.copy_buffer_to_buffer(src, 0, &self.readback, 0, bytes);
            }
            self.ctx.queue.submit([enc.finish()]);
            self.stats.submissions += 1;
            self.stats.steps += 1;
            self.stats.dispatches += dispatches;
            if let Some((_, bytes)) = read {
                let data = self.ctx.read_mapped(&self.readback, bytes).await?;
                self.stats.readbacks += 1;
                self.stats.readback_bytes += bytes;
                match want {
                    Want::Token => {
                        out = Some(Output::Token(bytemuck::pod_read_unaligned::<u32>(
                            &data[..4],
                        )))
                    }
                    Want::Logits => out = Some(Output::Logits(bytemuck::pod_collect_to_vec(&data))),
                    Want::AllLogits => {
                        let f: Vec<f32> = bytemuck::pod_collect_to_vec(&data);
                        all.extend(f.chunks_exact(v).map(<[f32]>::to_vec));
                    }
                }
            }
            self.pos += n;
            self.stats.tokens += n as u64;
        }
        if want == Want::AllLogits {
            return Ok(Output::All(all));
        }
        out.ok_or_else(|| GpuError::Readback("no output".into()).into())
    }

    /// Append `tokens` and return the last position's logits.
    pub async fn forward_async(
        &mut self,
        tokens: &[u32],
        opts: &RunOptions,
    ) -> Result<Vec<f32>, ModelError> {
        match self.run(tokens, opts, Want::Logits).await? {
            Output::Logits(l) => Ok(l),
            _ => Err(GpuError::Readback("unexpected output".into()).into()),
        }
    }

    /// Append `tokens` and return the greedy next token (argmax on the GPU;
    /// only its id is read back).
    pub async fn next_token_async(
        &mut self,
        tokens: &[u32],
        opts: &RunOptions,
    ) -> Result<u32, ModelError> {
        match self.run(tokens, opts, Want::Token).await? {
            Output::Token(t) => Ok(t),
            _ => Err(GpuError::Readback("unexpected output".into()).into()),
        }
    }

    /// Append `tokens` and return every position's logits (tests, eval loss).
    pub async fn forward_all_logits_async(
        &mut self,
        tokens: &[u32],
        opts: &RunOptions,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        match self.run(tokens, opts, Want::AllLogits).await? {
            Output::All(a) => Ok(a),
            _ => Err(GpuError::Readback("unexpected output".into()).into()),
        }
    }

    /// Greedy decoding: feed `prompt`, then `steps` sampled tokens one at a
    /// time; `on_token` sees each one. Returns the generated ids.
    pub async fn generate_greedy_async(
        &mut self,
        prompt: &[u32],
        steps: usize,
        opts: &RunOptions,
        mut on_token: impl FnMut(u32),
    ) -> Result<Vec<u32>, ModelError> {
        let mut out = Vec::with_capacity(steps);
        if steps == 0 {
            return Ok(out);
        }
        let mut tok = self.next_token_async(prompt, opts).await?;
        loop {
            out.push(tok);
            on_token(tok);
            if out.len() == steps {
                return Ok(out);
            }
            tok = self.next_token_async(&[tok], opts).await?;
        }
    }
}

/// Native blocking wrappers.
#[cfg(not(target_arch = "wasm32"))]
impl Engine {
    pub fn next_token(&mut self, tokens: &[u32], opts: &RunOptions) -> Result<u32, ModelError> {
        pollster::block_on(self.next_token_async(tokens, opts))
    }

    pub fn forward_all_logits(
        &mut self,
        tokens: &[u32],
        opts: &RunOptions,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        pollster::block_on(self.forward_all_logits_async(tokens, opts))
    }

    pub fn generate_greedy(
        &mut self,
        prompt: &[u32],
        steps: usize,
        opts: &RunOptions,
        on_token: impl FnMut(u32),
    ) -> Result<Vec<u32>, ModelError> {
        pollster::block_on(self.generate_greedy_async(prompt, steps, opts, on_token))
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl crate::model::Forward for Engine {
    fn forward(&mut self, tokens: &[u32], opts: &RunOptions) -> Result<Vec<f32>, ModelError> {
        pollster::block_on(self.forward_async(tokens, opts))
    }

    fn reset(&mut self) {
        Engine::reset(self);
    }

    fn position(&self) -> usize {
        self.pos
    }

    fn config(&self) -> &Config {
        &self.cfg
    }
}

/// RoPE table for `cfg` (see [`qkv_rope::rope_table`]).
pub fn rope_table(cfg: &Config, max_seq: usize) -> Vec<f32> {
    qkv_rope::rope_table(cfg.head_dim(), cfg.rope_theta(), max_seq)
}

impl From<GpuError> for ModelError {
    fn from(e: GpuError) -> Self {
        ModelError::Gpu(e.to_string())
    }
}
