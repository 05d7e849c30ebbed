//! The MoE forward pass on the GPU (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE),
//! as a sans-IO [`crate::model::Engine`].
//!
//! Weights and the KV cache live in GPU buffers. A chunk of a step (one
//! decoded token, or up to `max_batch` prompt tokens at once) is one command
//! encoder with one compute pass and one submission (while every expert it
//! routes to is resident), bind groups made once when the engine is built.
//! A decoded token (Mixtral, with [`EngineOptions::fused_attention`]):
//!
//! ```text
//! embedding        (skipped after a greedy step: argmax_embed wrote it)  0
//! per layer: attn_decode (norm, q/k/v, RoPE, cache append, attention,
//!                         each head's o_proj share)                    1
//!            expert_up   (residual + o_proj shares, router: norm, gate,
//!                         softmax, top-k; norm, w1/w3, silu*mul for
//!                         all k experts through the pool's slot table)  1
//!            expert_down (w2, weighted sum of the k, residual + shares) 1
//! lm_head (final norm fused), argmax_embed (argmax + next embedding)   2
//! ```
//!
//! = `3 * layers + 2` dispatches per greedily decoded token (`+ 1`, the
//! embedding, for a step whose token the previous greedy step did not
//! sample), and the only readback is the sampled token id (4 bytes), or the
//! logits when asked for them. [`Engine::decode_greedy`] pipelines greedy
//! decoding: token `t + 1`'s chunk needs nothing from the CPU but its
//! position, so it is submitted before token `t` is read back (two in
//! flight), with every expert resident or with a pool that lacks some (the
//! router fused): each chunk then reads back the routes of the layers that
//! lack experts with its token (no submission more while every routed
//! expert is resident), the two tokens in flight use each layer's two route
//! buffers, and a token that missed an expert runs again from that layer
//! right behind the chunk after it, which is discarded. A prompt chunk runs `embedding`, then per
//! layer `qkv_rope`, `attention`, the o_proj matvec (+ residual),
//! `expert_up` (router fused), `expert_down`: `5 * layers + 3`.
//! The fused decode attention runs with [`EngineOptions::fused_attention`]
//! (the default); without it a decoded token runs `qkv_rope`, `attention`
//! and the o_proj matvec instead of `attn_decode`: `5 * layers + 2` per
//! greedy token.
//! Where a shape does not fit the fused kernels' workgroup memory
//! ([`super::attn_decode::fits`], [`expert::MAX_FUSED_ROUTER_EXPERTS`],
//! [`expert::MAX_STAGED_HIDDEN`]) the unfused kernels run instead, and
//! [`EngineOptions::fused`]` = false` runs the whole unfused schedule
//! (`6 * layers + 3`: the benchmark's baseline).
//!
//! The other families ([`crate::model::Family`]) change a layer as the CPU
//! engine does ([`crate::model::family`]): OLMoE, Qwen2-MoE and Qwen3-MoE
//! run the attention input as a projection (matvec, input norm fused) and
//! `qkv_post` (q/k/v biases, q/k RMSNorm over the whole projection or per
//! head, RoPE, cache append), then `attention` and the o_proj matvec (the
//! fused decode attention does not cover them): `6 * layers + 2` per
//! decoded token, three dispatches more per layer than Mixtral. Qwen2-MoE's
//! shared expert runs for every token on the ordinary expert kernels (its
//! own buffers and format, a one-expert slot table), scaled by
//! `shared_gate` (sigmoid of its gate): gate and up after the router, down
//! after the routed experts, three dispatches more per layer. Top-k without
//! renormalisation (`norm_topk_prob: false`) is the router's `renorm = 0`.
//!
//! # Asking for experts
//!
//! The engine never fetches weights. A layer that lacks experts does not
//! stop the chunk (with the router fused into `expert_up`): it runs with
//! whatever its slot table holds, `expert_up` keeps the layer's input row
//! beside its routes, and the routes of every such layer are read back with
//! the chunk's output, in the chunk's one submission. While every routed
//! expert is resident that is all a pool step costs: a few hundred bytes
//! more in the one readback. When the first checked layer routed to a
//! missing expert, [`step`](crate::model::Engine::step)
//! (or [`resume`](crate::model::Engine::resume)) returns [`Step::Need`] with the missing ids
//! (sorted, deduplicated) and keeps its place: the token chunk, the layer,
//! its saved input row (in GPU buffers) and the position (not yet
//! advanced); the chunk's output and its later layers are discarded. The
//! caller hands the experts over with
//! [`Engine::supply_expert`] and calls [`resume`](crate::model::Engine::resume), which restores
//! that layer's input and runs on from its experts (one more submission:
//! the later layers' cache rows are written again); [`cancel`](crate::model::Engine::cancel)
//! drops the step instead. A layer with fewer resident experts than
//! `top_k` misses for certain, so the chunk stops after its `expert_up`,
//! except in a pool smaller than the model (one that evicts): there the
//! chunk runs on, and a pause asks, after the paused layer's missing
//! experts, for the missing ones the later layers of that run routed to
//! (guesses, since a missing expert ran as another, but mostly right; as
//! many as the pool holds beside the paused layer's, never pinned), so
//! that a token whose experts were evicted (after a prompt, say) pauses
//! about once instead of once per layer. A pool that holds the whole
//! model asks for exactly the routed experts.
//! The unfused engine (`fused: false`, a separate router kernel) reads a
//! lacking layer's routes back before its experts run instead (one
//! submission and readback per such layer).
//! [`crate::model::run_step`] is that loop. With `use_moe = false` (dense mixture) every
//! expert runs, so a step asks for all missing experts of all layers up
//! front (or, when the pool cannot hold them all, for all of one layer at a
//! time). Calling [`step`](crate::model::Engine::step) while a step is paused is an error
//! ([`ModelError::Input`]): resume or cancel it first.
//!
//! # Expert pool
//!
//! Experts live in one pool of `N` slots (one buffer for `w1/w3`, one for
//! `w2`, each under the adapter's storage-binding limit), sized by
//! [`EngineOptions::expert_pool_bytes`] (default: every expert of the
//! model, or as many as the adapter binds). A per-layer table (expert ->
//! slot) tells the expert kernels where each expert lives, so an upload or
//! an eviction rewrites one table word, never a bind group. When the pool is
//! full, a supplied expert replaces the least recently used one, except the
//! experts the paused layer-step needs (they are pinned until it runs).
//! Work already encoded is always submitted before a step pauses, and queue
//! writes are ordered after earlier submissions, so an eviction never
//! changes weights under a running kernel. A pool smaller than a whole
//! layer's experts limits the chunk to `N / k` tokens, so one layer-step
//! never needs more experts than the pool holds. A pool that evicts keeps
//! what it evicts on the host, encoded ([`EngineOptions::host_cache_bytes`]):
//! a step that lacks only experts held there writes them back and goes on
//! without a pause ([`EngineStats::host_resumes`]).
//!
//! The pool has one design for every expert format
//! ([`EngineOptions::pool_format`]): f32 or f16 experts (transposed), or
//! `q8_0` / `q4_0` experts kept packed (values as `u32` words, f16 scales
//! two per word, see [`expert::pack_qmat`]) and read directly by the
//! quantized kernels (`shaders/expert_{up,down}_q{8,4}.wgsl`, no
//! `shader-f16` needed). Only the bytes per slot and the two expert kernels
//! differ. The format is fixed when the engine is built
//! ([`EngineOptions::expert_quant`], from the config for a quantized model)
//! and a supplied expert in another format is refused.

use std::sync::Arc;

use super::argmax::{self, Argmax, ArgmaxEmbed};
use super::attention::{self, Attention};
use super::attn_decode::{self, AttnDecode};
use super::context::{GpuContext, GpuError, Mapping};
use super::expert::{self, ExpertDown, ExpertUp, PoolFormat};
use super::family::{self as fam, QkvPost, QkvPostParams, SharedGate, SharedGateParams};
use super::kernel::{f32_bytes, transpose, Kernel, Step as StepUniform, WeightFormat};
use super::matvec::{self, Matvec};
use super::qkv_rope::{self, pack_qkv, QkvRope};
use super::router::Router;
use crate::model::{
    check_expert, check_weights, Config, ExpertId, ExpertWeights, ModelError, Output,
    RouterWeights, RunOptions, SharedWeights, Slot, Step, Want,
};
#[cfg(not(target_arch = "wasm32"))]
use crate::model::{run_step, ExpertSource, Forward, Supply};
use crate::spec::quant::QuantFormat;

/// Sizes the engine allocates for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// KV-cache capacity in tokens (capped by `max_position_embeddings`).
    pub max_seq: usize,
    /// Most prompt tokens run together in one chunk (longer prompts are
    /// split into chunks of this size).
    pub max_batch: usize,
    /// Storage of the large matrices (attention, experts, lm_head); the
    /// router, norms and embedding lookup stay f32.
    pub weights: WeightFormat,
    /// The experts' format: `None` for float experts (stored in `weights`),
    /// `Some(q8_0 | q4_0)` for quantized ones, which the pool keeps packed
    /// and the quantized kernels read directly. It must be the format of
    /// the experts the caller supplies (a supplied expert in another format
    /// is refused), and for a model whose config names a quantized format
    /// (`cfg.expert_quant()`), that one. [`Engine::new`] takes it from the
    /// config; for float checkpoints quantized on load (`--quant`, a
    /// [`crate::model::quant::QuantizingSource`]) set it to the source's format.
    pub expert_quant: Option<QuantFormat>,
    /// GPU memory for the expert pool, in bytes (a whole number of experts
    /// of [`expert_bytes`] each, at least one). `None`: every expert of the
    /// model, or as many as the adapter's binding limit allows.
    pub expert_pool_bytes: Option<u64>,
    /// The fused kernels (default): the router inside `expert_up`, and
    /// greedy sampling writing the next token's embedding (`argmax_embed`):
    /// `5 * layers + 2` dispatches per greedily decoded token, or
    /// `3 * layers + 2` with [`EngineOptions::fused_attention`]. `false` runs
    /// the unfused schedule (`qkv_rope`, `attention`, o_proj, `router`
    /// apart: `6 * layers + 3`), the benchmark's baseline.
    pub fused: bool,
    /// With `fused`: also the decode attention in one dispatch per layer
    /// ([`super::attn_decode`]: norm, q/k/v, RoPE, cache append, attention
    /// and the heads' o_proj shares), `3 * layers + 2` dispatches per
    /// greedily decoded token (default; `false`: `5 * layers + 2`, the
    /// three kernels it replaces, which the benchmark measures beside it).
    pub fused_attention: bool,
    /// In a pool that evicts, a prompt's chunk (more than one token) stops
    /// at each layer that lacks experts to read back its routes before its
    /// experts run (default; `expert_up` routing only): no expert runs on
    /// a missing one to be redone. `false`: the chunk runs on to its end
    /// and runs again from the first layer that missed (as a decoded
    /// token does), which the benchmark measures beside it.
    pub prompt_stops: bool,
    /// Host memory, in bytes, for experts the pool evicted, kept as the
    /// pool stores them (encoded, in its layout): an expert needed again
    /// is written back from there, with no [`Step::Need`] pause and no
    /// reload, revalidation or re-encoding by the supply (least recently
    /// evicted dropped first). Only a pool that evicts uses it, and it then
    /// also keeps a host copy of every resident expert (to have it when it
    /// is evicted): host memory is the pool's bytes plus this. `None`: the
    /// pool's own size. `Some(0)`: off.
    pub host_cache_bytes: Option<u64>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_seq: 2048,
            max_batch: 64,
            weights: WeightFormat::F32,
            expert_quant: None,
            expert_pool_bytes: None,
            fused: true,
            fused_attention: true,
            prompt_stops: true,
            host_cache_bytes: None,
        }
    }
}

/// Bytes one float expert takes in the pool (`w1/w3` plus `w2`) in `fmt`.
pub fn expert_bytes(cfg: &Config, fmt: WeightFormat) -> u64 {
    pool_expert_bytes(cfg, PoolFormat::Float(fmt))
}

/// Bytes one expert takes in a pool of `fmt` (float or quantized).
pub fn pool_expert_bytes(cfg: &Config, fmt: PoolFormat) -> u64 {
    let (h, i) = (cfg.hidden_size, cfg.expert_intermediate_size());
    (fmt.w13_bytes(h, i) + fmt.w2_bytes(h, i)) as u64
}

/// Counters since the engine was built (or [`Engine::reset_stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Tokens run through the layers.
    pub tokens: u64,
    /// Chunks run to the end (a step of more than `max_batch` tokens runs several).
    pub steps: u64,
    pub dispatches: u64,
    /// Queue submissions (1 per chunk, plus 1 per routing readback).
    pub submissions: u64,
    /// Buffers mapped for reading (sampled token, logits, routed ids).
    pub readbacks: u64,
    pub readback_bytes: u64,
    /// Times a step paused with [`Step::Need`].
    pub pauses: u64,
    /// Times a prompt's chunk (more than one token, in a pool that evicts)
    /// stopped after a layer's `expert_up` to read back its routes before
    /// its experts ran, found them all resident and went on without a
    /// pause (each costs a submission; a stop that finds a missing expert
    /// counts as a pause).
    pub resumed_stops: u64,
    /// Experts written into the pool (supplied ones, including replacements).
    pub expert_uploads: u64,
    pub expert_bytes_uploaded: u64,
    /// Experts dropped from the pool to make room (least recently used first).
    pub expert_evictions: u64,
    /// Decoded chunks submitted and then dropped (the one behind a token
    /// that missed an expert, or behind the last token kept; not the token
    /// that missed, which runs again from that layer).
    pub discarded_chunks: u64,
    /// Of `expert_uploads`, those written back from the host cache of
    /// evicted experts ([`EngineOptions::host_cache_bytes`]), not supplied.
    pub host_cache_hits: u64,
    /// Times a step that lacked experts found every one it waited for in
    /// the host cache and went on without a pause (each after the
    /// submission that found the miss, as a pause).
    pub host_resumes: u64,
}

impl EngineOptions {
    /// How the pool stores experts under these options.
    pub fn pool_format(&self) -> PoolFormat {
        match self.expert_quant {
            Some(q) => PoolFormat::Quant(q),
            None => PoolFormat::Float(self.weights),
        }
    }
}

/// The shared expert's kernels (Qwen2-MoE): its gate, and the expert
/// kernels for its format.
#[derive(Debug)]
struct SharedKernels {
    gate: SharedGate,
    up: ExpertUp,
    down: ExpertDown,
}

#[derive(Debug)]
struct Kernels {
    embed: Kernel,
    qkv: QkvRope,
    /// Decode (one-token chunks, Mixtral): q/k/v, RoPE, cache append and
    /// attention in one kernel, when the shape fits its workgroup memory.
    attn_dec: Option<AttnDecode>,
    /// The families with q/k/v extras: biases, q/k norm, RoPE after a matvec.
    qkv_post: Option<QkvPost>,
    shared: Option<SharedKernels>,
    attn: Attention,
    mv: Matvec,
    /// The lm_head ([`Matvec::for_rows`]: four rows per invocation when
    /// `vocab % 4 == 0`).
    head: Matvec,
    router: Router,
    up: ExpertUp,
    down: ExpertDown,
    argmax: Argmax,
    /// Greedy sampling that also writes the sampled token's embedding
    /// (fused engines): the next decode step skips its embedding dispatch.
    argmax_embed: Option<ArgmaxEmbed>,
    /// The router runs inside `expert_up` (no `router` dispatch).
    route_fused: bool,
}

/// How a layer's attention input runs.
#[derive(Debug)]
enum QkvBind {
    /// Mixtral: one fused kernel (norm, projection, RoPE, cache append).
    Fused(wgpu::BindGroup),
    /// The families with q/k/v extras: the projection (matvec, norm fused),
    /// then `qkv_post` (biases, q/k norm, RoPE, cache append).
    Split {
        raw: wgpu::BindGroup,
        post: wgpu::BindGroup,
    },
}

/// A layer's shared expert (Qwen2-MoE): gate, up (both before the routed
/// experts, reading the same hidden state) and down (after them).
#[derive(Debug)]
struct SharedLayer {
    bg_gate: wgpu::BindGroup,
    bg_up: wgpu::BindGroup,
    bg_down: wgpu::BindGroup,
}

#[derive(Debug)]
struct Layer {
    qkv: QkvBind,
    shared: Option<SharedLayer>,
    bg_attn: wgpu::BindGroup,
    /// The fused decode attention (with [`Kernels::attn_dec`]).
    bg_attn_dec: Option<wgpu::BindGroup>,
    bg_o: wgpu::BindGroup,
    bg_router: wgpu::BindGroup,
    /// `expert_up`/`expert_down`, one per route buffer (`[set]`, see
    /// [`Layer::route`]).
    bg_up: [wgpu::BindGroup; 2],
    bg_down: [wgpu::BindGroup; 2],
    /// Decode with the fused attention: `expert_up`/`expert_down` adding
    /// the heads' o_proj shares (`n_part = n_heads`), per route buffer.
    bg_up_dec: Option<[wgpu::BindGroup; 2]>,
    /// `expert_up` routing only (`route_in = 2`), with the router fused:
    /// where a prompt's chunk stops to read a layer's routes back.
    bg_up_route: Option<[wgpu::BindGroup; 2]>,
    bg_down_dec: Option<[wgpu::BindGroup; 2]>,
    /// `slots[expert]`: the pool slot holding this layer's expert
    /// ([`NO_SLOT`] when it is not resident).
    table: wgpu::Buffer,
    /// The layer's routes (`[max_batch][experts][2]`: id, weight bits),
    /// read back after a chunk while the pool lacks experts, followed by
    /// the input rows `expert_up` saves (`[max_batch][hidden]`, f32 bits)
    /// to run the layer's experts again after a miss. Two of them: set 0
    /// for every step, set 1 (one token's routes and row) for every other
    /// token of a pipelined pool decode ([`Engine::decode_greedy`]), so that
    /// the token in flight after one that missed an expert does not
    /// overwrite what the missed one resumes from.
    route: [wgpu::Buffer; 2],
}

/// Table word of an expert that is not in the pool (clamped by the kernels).
const NO_SLOT: u32 = u32::MAX;

/// Which expert each pool slot holds, and when each was last used (CPU side
/// of the pool; the weights are in `w13`/`w2`).
#[derive(Debug)]
struct Pool {
    w13: wgpu::Buffer,
    w2: wgpu::Buffer,
    w13_bytes: u64,
    w2_bytes: u64,
    owner: Vec<Option<ExpertId>>,
    last_used: Vec<u64>,
    /// `[layer][expert]` -> slot.
    slot_of: Vec<Vec<Option<usize>>>,
    clock: u64,
}

impl Pool {
    fn slots(&self) -> usize {
        self.owner.len()
    }

    fn slot(&self, id: ExpertId) -> Option<usize> {
        self.slot_of
            .get(id.layer)
            .and_then(|l| l.get(id.expert))
            .copied()
            .flatten()
    }

    fn resident(&self, id: ExpertId) -> bool {
        self.slot(id).is_some()
    }

    /// Whether the pool holds fewer experts than the model has (so that
    /// supplying one may evict another).
    fn evicting(&self) -> bool {
        self.slots() < self.slot_of.iter().map(Vec::len).sum::<usize>()
    }

    fn layer_resident(&self, layer: usize) -> bool {
        self.slot_of[layer].iter().all(Option::is_some)
    }

    fn touch(&mut self, ids: impl IntoIterator<Item = ExpertId>) {
        self.clock += 1;
        for id in ids {
            if let Some(s) = self.slot(id) {
                self.last_used[s] = self.clock;
            }
        }
    }

    /// A slot for `id`: its own, a free one, or the least recently used one
    /// not in `pinned` (returned with the expert it held).
    fn claim(
        &mut self,
        id: ExpertId,
        pinned: &[ExpertId],
    ) -> Result<(usize, Option<ExpertId>), ModelError> {
        if let Some(s) = self.slot(id) {
            return Ok((s, None));
        }
        let s = match self.owner.iter().position(Option::is_none) {
            Some(s) => s,
            None => (0..self.slots())
                .filter(|&s| self.owner[s].is_some_and(|o| !pinned.contains(&o)))
                .min_by_key(|&s| self.last_used[s])
                .ok_or_else(|| {
                    ModelError::Input(format!(
                        "expert pool full: all {} slots hold experts the paused step needs, \
                         no room for {id}",
                        self.slots()
                    ))
                })?,
        };
        let old = self.owner[s].take();
        if let Some(o) = old {
            self.slot_of[o.layer][o.expert] = None;
        }
        self.owner[s] = Some(id);
        self.slot_of[id.layer][id.expert] = Some(s);
        self.clock += 1;
        self.last_used[s] = self.clock;
        Ok((s, old))
    }
}

/// Encoded experts on the host ([`EngineOptions::host_cache_bytes`]): a
/// copy of each resident expert (`resident`, by pool slot), and the
/// evicted ones (`evicted`, at most `budget` bytes, the least recently
/// evicted dropped first).
#[derive(Debug, Default)]
struct HostCache {
    budget: u64,
    resident: Vec<Option<(Vec<u8>, Vec<u8>)>>,
    evicted: std::collections::HashMap<ExpertId, (Vec<u8>, Vec<u8>, u64)>,
    evicted_bytes: u64,
    clock: u64,
}

impl HostCache {
    fn on(&self) -> bool {
        self.budget > 0
    }

    /// `slot` now holds these bytes (of `id`); `old`, the expert it held,
    /// keeps its copy among the evicted ones.
    fn place(&mut self, slot: usize, w13: Vec<u8>, w2: Vec<u8>, old: Option<ExpertId>) {
        if !self.on() {
            return;
        }
        let prev = self.resident[slot].replace((w13, w2));
        if let (Some(old), Some((a, b))) = (old, prev) {
            let n = (a.len() + b.len()) as u64;
            if n > self.budget {
                return;
            }
            self.clock += 1;
            self.evicted_bytes += n;
            if let Some((a, b, _)) = self.evicted.insert(old, (a, b, self.clock)) {
                self.evicted_bytes -= (a.len() + b.len()) as u64;
            }
            while self.evicted_bytes > self.budget {
                let Some((&lru, _)) = self.evicted.iter().min_by_key(|(_, e)| e.2) else {
                    break;
                };
                if let Some((a, b, _)) = self.evicted.remove(&lru) {
                    self.evicted_bytes -= (a.len() + b.len()) as u64;
                }
            }
        }
    }

    /// The evicted copy of `id`, taken out (it is about to be resident).
    fn take(&mut self, id: ExpertId) -> Option<(Vec<u8>, Vec<u8>)> {
        let (a, b, _) = self.evicted.remove(&id)?;
        self.evicted_bytes -= (a.len() + b.len()) as u64;
        Some((a, b))
    }
}

/// Where a step goes on from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// The start of the next chunk (embedding).
    Chunk,
    /// Layer `l`'s router ran; its experts come next.
    Experts(usize),
    /// Layer `l` routed to an expert that was missing (found after the
    /// chunk ran on): its saved input row is restored and its experts
    /// (the shared expert's too) run again, then the later layers.
    Redo(usize),
}

/// A step in progress (paused while it is stored in `Engine::paused`).
#[derive(Debug)]
struct Run {
    tokens: Vec<u32>,
    k: usize,
    use_moe: bool,
    want: Want,
    /// Most tokens per chunk (`max_batch`, or fewer for a small pool).
    cap: usize,
    /// Tokens of finished chunks.
    done: usize,
    /// Tokens of the current chunk.
    n: usize,
    at: At,
    /// Every expert the awaited layer-step (or the dense step) needs:
    /// pinned in the pool until it ran.
    need: Vec<ExpertId>,
    /// Missing experts the layers after the paused one routed to in the
    /// same run (from an input that a missing expert made inexact): asked
    /// for with `need` so that the step seldom pauses again, never pinned.
    ahead: Vec<ExpertId>,
    all: Vec<Vec<f32>>,
    /// The layers' route buffers this step uses ([`Layer::route`]): 0, or
    /// 1 for every other token of a pipelined decode.
    set: usize,
}

/// The MoE families on wgpu, a [`crate::model::Engine`]. See the module docs for the
/// per-chunk schedule, pausing and the expert pool.
pub struct Engine {
    ctx: Arc<GpuContext>,
    cfg: Config,
    opts: EngineOptions,
    k: Kernels,
    layers: Vec<Layer>,
    pool: Pool,
    host: HostCache,
    pool_format: PoolFormat,
    /// The shared expert's format (Qwen2-MoE), if the model has one.
    shared_format: Option<PoolFormat>,
    step: wgpu::Buffer,
    tokens: wgpu::Buffer,
    /// The hidden state (`[max_batch][hidden]`).
    x: wgpu::Buffer,
    /// The heads' o_proj shares of a decoded token (fused attention).
    part: wgpu::Buffer,
    logits_last: wgpu::Buffer,
    logits_all: wgpu::Buffer,
    argmax_out: wgpu::Buffer,
    readback: wgpu::Buffer,
    /// The sampled ids of the two decoded tokens in flight in
    /// [`Engine::decode_greedy`] (4 bytes each), each followed by the
    /// routes of the layers that lack experts.
    pipe_rb: [wgpu::Buffer; 2],
    bg_embed: wgpu::BindGroup,
    bg_head_last: wgpu::BindGroup,
    bg_head_all: wgpu::BindGroup,
    bg_argmax: wgpu::BindGroup,
    bg_argmax_embed: Option<wgpu::BindGroup>,
    /// The token whose embedding row `x` holds, written by `argmax_embed`
    /// at the end of the last greedy step (taken by the next chunk).
    embedded: Option<u32>,
    p_qkv: qkv_rope::Params,
    p_qkv_raw: matvec::Params,
    p_qkv_post: QkvPostParams,
    p_shared: expert::Params,
    p_attn: attention::Params,
    p_attn_dec: attn_decode::Params,
    p_o: matvec::Params,
    p_head_last: matvec::Params,
    p_head_all: matvec::Params,
    p_exp: expert::Params,
    pos: usize,
    paused: Option<Run>,
    stats: EngineStats,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("adapter", &self.ctx.info.name)
            .field("pos", &self.pos)
            .field("opts", &self.opts)
            .field("pool_slots", &self.pool.slots())
            .field("paused", &self.paused.as_ref().map(|r| r.at))
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Upload the shared weights and routers and allocate the KV cache and
    /// the (empty) expert pool. Experts are supplied when a step asks for
    /// them. Nothing here awaits: the async part is [`GpuContext::new`].
    /// The pool holds experts in the config's format (`cfg.expert_quant()`:
    /// float, or the quantized format of a quantized model).
    pub fn new(
        ctx: Arc<GpuContext>,
        cfg: &Config,
        shared: &SharedWeights,
        routers: &[RouterWeights],
    ) -> Result<Self, ModelError> {
        let opts = EngineOptions {
            expert_quant: cfg
                .expert_quant()
                .map_err(|e| ModelError::Config(e.to_string()))?,
            ..EngineOptions::default()
        };
        Self::with_options(ctx, cfg, shared, routers, opts)
    }

    /// [`Engine::new`] with explicit sizes.
    pub fn with_options(
        ctx: Arc<GpuContext>,
        cfg: &Config,
        shared: &SharedWeights,
        routers: &[RouterWeights],
        opts: EngineOptions,
    ) -> Result<Self, ModelError> {
        let (h, v, i, ne) = (
            cfg.hidden_size,
            cfg.vocab_size,
            cfg.expert_intermediate_size(),
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
            ..opts
        };
        let fmt = opts.weights;
        let pool_format = opts.pool_format();

        check_weights(cfg, shared, routers)?;
        let model_quant = cfg
            .expert_quant()
            .map_err(|e| ModelError::Config(e.to_string()))?;
        if let Some(q) = model_quant {
            if opts.expert_quant != Some(q) {
                return Err(ModelError::Config(format!(
                    "the model's experts are {q}; EngineOptions::expert_quant is {} \
                     (set it to Some({q}), or build the engine with Engine::new)",
                    opts.expert_quant
                        .map_or("None (float experts)", |f| f.as_str())
                )));
            }
        }
        if opts.expert_quant.is_some()
            && (h == 0
                || i == 0
                || !h.is_multiple_of(crate::spec::quant::GROUP)
                || !i.is_multiple_of(crate::spec::quant::GROUP))
        {
            return Err(ModelError::Config(format!(
                "quantized experts need hidden_size ({h}) and the expert intermediate size \
                 ({i}) to be multiples of the group size {}",
                crate::spec::quant::GROUP
            )));
        }

        // The family's pieces: q/k/v extras (split attention input) and the
        // shared expert, kept in its own format (float in `weights`, or
        // quantized as supplied) with its own kernels.
        let split_qkv = cfg.family() != crate::model::Family::Mixtral;
        let shared_fmt = match (cfg.shared_expert_intermediate_size(), routers.first()) {
            (Some(_), Some(r)) => {
                let f = |se: Option<&crate::model::SharedExpertWeights>| match se
                    .and_then(|se| se.expert.quant())
                {
                    Some(q) => PoolFormat::Quant(q),
                    None => PoolFormat::Float(fmt),
                };
                let first = f(r.shared_expert.as_ref());
                if let Some(l) = routers
                    .iter()
                    .position(|r| f(r.shared_expert.as_ref()) != first)
                {
                    return Err(ModelError::Tensor {
                        name: format!("layer{l}.shared_expert"),
                        reason: format!("not in the format of layer0's shared expert ({first})"),
                    });
                }
                Some(first)
            }
            _ => None,
        };
        let sh_i = cfg.shared_expert_intermediate_size().unwrap_or(0);

        // Every binding must fit the adapter.
        let max_binding = ctx.max_binding();
        let w13_bytes = pool_format.w13_bytes(h, i) as u64;
        let w2_bytes = pool_format.w2_bytes(h, i) as u64;
        let sh_w13_bytes = shared_fmt.map_or(0, |f| f.w13_bytes(h, sh_i)) as u64;
        let big: [(&str, u64); 8] = [
            ("q/k/v projections", ((qd + 2 * kvd) * h * 4) as u64),
            ("shared expert w1/w3", sh_w13_bytes),
            ("shared expert activations", (max_batch * sh_i * 4) as u64),
            ("embedding table", (v * h * 4) as u64),
            ("expert w1/w3", w13_bytes),
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
        // The pool: what was asked for (or every expert), within the binding limit.
        let per_expert = w13_bytes + w2_bytes;
        let fits = (max_binding / w13_bytes.max(1)) as usize;
        let asked = match opts.expert_pool_bytes {
            None => nl * ne,
            Some(b) => {
                let n = (b / per_expert.max(1)) as usize;
                if n == 0 {
                    return Err(ModelError::Input(format!(
                        "expert_pool_bytes {b} holds no expert ({per_expert} bytes each)"
                    )));
                }
                n.min(nl * ne)
            }
        };
        let n_slots = asked.min(fits).max(1);
        if n_slots < asked {
            tracing::warn!(
                asked,
                n_slots,
                max_binding,
                "expert pool limited by the adapter's storage-binding size"
            );
        }

        // The router runs inside expert_up (one dispatch less per layer)
        // unless the layer has more experts than its workgroup arrays hold.
        let route_fused = opts.fused && ne <= expert::MAX_FUSED_ROUTER_EXPERTS;
        let c = &*ctx;
        let k = Kernels {
            embed: Kernel::new(c, "embedding", super::embedding::SOURCE, None),
            qkv: QkvRope::with_format(c, fmt),
            attn_dec: (route_fused
                && opts.fused_attention
                && !split_qkv
                && h <= expert::MAX_STAGED_HIDDEN
                && attn_decode::fits(h, hd, c.barrier_workgroup_size))
            .then(|| AttnDecode::with_format(c, fmt, h, hd, nh, nkv)),
            qkv_post: split_qkv.then(|| QkvPost::new(c)),
            shared: shared_fmt.map(|f| SharedKernels {
                gate: SharedGate::new(c),
                up: ExpertUp::for_pool(c, f, h, sh_i, 1),
                down: ExpertDown::for_pool(c, f, h),
            }),
            attn: Attention::new(c),
            mv: Matvec::with_format(c, fmt),
            head: Matvec::for_rows(c, fmt, v),
            router: Router::new(c),
            up: ExpertUp::for_pool(c, pool_format, h, i, ne),
            down: ExpertDown::for_pool(c, pool_format, h),
            argmax: Argmax::new(c),
            argmax_embed: opts.fused.then(|| ArgmaxEmbed::new(c)),
            route_fused,
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
        let p_qkv_raw = matvec::Params {
            rows: (qd + 2 * kvd) as u32,
            cols: h as u32,
            flags: matvec::NORM,
            eps,
        };
        let q_norm_len = shared
            .layers
            .first()
            .and_then(|la| la.extras.q_norm.as_ref())
            .map_or(0, Vec::len);
        let p_qkv_post = QkvPostParams {
            n_heads: nh as u32,
            n_kv: nkv as u32,
            head_dim: hd as u32,
            max_seq: max_seq as u32,
            eps,
            norm_mode: fam::norm_mode(cfg.family().qk_norm()),
            q_norm_len: q_norm_len as u32,
            _p0: 0,
        };
        let p_shared = expert::Params {
            hidden: h as u32,
            inter: sh_i as u32,
            n_experts: 1,
            eps,
            n_slots: 1,
            route_in: 0,
            n_part: 0,
            save_x: 0,
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
        let p_attn_dec = attn_decode::Params {
            hidden: h as u32,
            n_heads: nh as u32,
            n_kv: nkv as u32,
            head_dim: hd as u32,
            max_seq: max_seq as u32,
            eps,
            scale: 1.0 / (hd as f32).sqrt(),
            wo_stride: attn_decode::wo_stride(fmt, h),
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
        // Words of routes at the start of a layer's route buffer (the rows
        // `expert_up` saves for a pool miss follow them).
        let route_words = (max_batch * ne * 2) as u32;
        let p_exp = expert::Params {
            hidden: h as u32,
            inter: i as u32,
            n_experts: ne as u32,
            eps,
            n_slots: n_slots as u32,
            route_in: u32::from(route_fused),
            n_part: 0,
            // Each layer's route buffer: the routes, then the saved rows.
            save_x: if route_fused { route_words } else { 0 },
        };
        let u = |name: &str, b: &[u8]| c.uniform_init(name, b);
        let ub_qkv = u("p_qkv", bytemuck::bytes_of(&p_qkv));
        let ub_attn = u("p_attn", bytemuck::bytes_of(&p_attn));
        let ub_attn_dec = u("p_attn_dec", bytemuck::bytes_of(&p_attn_dec));
        let ub_o = u("p_o", bytemuck::bytes_of(&p_o));
        let ub_head_last = u("p_head_last", bytemuck::bytes_of(&p_head_last));
        let ub_head_all = u("p_head_all", bytemuck::bytes_of(&p_head_all));
        let ub_router = u("p_router", bytemuck::bytes_of(&p_router));
        let ub_exp = u("p_exp", bytemuck::bytes_of(&p_exp));
        let ub_exp_route = u(
            "p_exp_route",
            bytemuck::bytes_of(&expert::Params {
                route_in: 2,
                ..p_exp
            }),
        );
        let ub_exp_dec = u(
            "p_exp_decode",
            bytemuck::bytes_of(&expert::Params {
                n_part: nh as u32,
                ..p_exp
            }),
        );
        let ub_qkv_raw = u("p_qkv_raw", bytemuck::bytes_of(&p_qkv_raw));
        let ub_qkv_post = u("p_qkv_post", bytemuck::bytes_of(&p_qkv_post));
        let ub_shared = u("p_shared", bytemuck::bytes_of(&p_shared));
        let ub_gate_sh = u(
            "p_shared_gate",
            bytemuck::bytes_of(&SharedGateParams {
                hidden: h as u32,
                eps,
                _p0: 0,
                _p1: 0,
            }),
        );
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
            StepUniform {
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
        let act = c.storage_zeroed("act", f(b * ne * i));
        // The heads' o_proj shares of a decoded token (fused attention).
        let part = c.storage_zeroed("o_proj_part", attn_decode::part_bytes(nh, h, max_seq));
        let qkv_raw = split_qkv.then(|| c.storage_zeroed("qkv_raw", f(b * (qd + 2 * kvd))));
        let route_sh = c.storage_zeroed("route_shared", f(b * 2));
        let act_sh = c.storage_zeroed("act_shared", f(b * sh_i.max(1)));
        let table_sh = c.storage_init("shared_slot", bytemuck::bytes_of(&0u32));
        let logits_last = c.storage_zeroed("logits_last", f(v));
        let logits_all = c.storage_zeroed("logits_all", f(b * v));
        let argmax_out = c.storage_zeroed("argmax_out", 4);
        // The output (logits or the token), then every layer's routes.
        let readback = c.readback_buffer("readback", f((b * v).max(1) + nl * b * ne * 2));
        // A decoded token's id, then the routes of the layers that lack experts.
        let pipe_bytes = f(1 + nl * ne * 2);
        let pipe_rb = [
            c.readback_buffer("token_readback_0", pipe_bytes),
            c.readback_buffer("token_readback_1", pipe_bytes),
        ];
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

        let pool = Pool {
            w13: c.storage_zeroed("expert_pool_w13", n_slots as u64 * w13_bytes),
            w2: c.storage_zeroed("expert_pool_w2", n_slots as u64 * w2_bytes),
            w13_bytes,
            w2_bytes,
            owner: vec![None; n_slots],
            last_used: vec![0; n_slots],
            slot_of: vec![vec![None; ne]; nl],
            clock: 0,
        };
        // The host copies, for a pool that evicts.
        let host = if n_slots < nl * ne {
            HostCache {
                budget: opts.host_cache_bytes.unwrap_or(n_slots as u64 * per_expert),
                resident: vec![None; n_slots],
                ..HostCache::default()
            }
        } else {
            HostCache::default()
        };
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
            let table = c.storage_init("expert_slots", bytemuck::cast_slice(&vec![NO_SLOT; ne]));
            // `[b][ne][2]` routes (id, weight bits), then `[b][h]` saved input
            // rows; the second set holds one token's (decode only).
            let route = [
                c.storage_zeroed("route", f(b * ne * 2 + b * h)),
                c.storage_zeroed("route_alt", f(b * ne * 2 + h)),
            ];
            let qkv = match (&k.qkv_post, &qkv_raw) {
                (Some(post), Some(raw)) => {
                    let ex = &la.extras;
                    let or_zeros =
                        |b: &Option<Vec<f32>>, n: usize| b.clone().unwrap_or(vec![0.0; n]);
                    let mut bias = or_zeros(&ex.q_bias, qd);
                    bias.extend(or_zeros(&ex.k_bias, kvd));
                    bias.extend(or_zeros(&ex.v_bias, kvd));
                    let mut norms = ex.q_norm.clone().unwrap_or_default();
                    if norms.len() != q_norm_len {
                        return Err(ModelError::Tensor {
                            name: format!("model.layers.{l}.self_attn.q_norm.weight"),
                            reason: format!("{} values, layer 0 has {q_norm_len}", norms.len()),
                        });
                    }
                    norms.extend(ex.k_norm.iter().flatten());
                    let bias = c.storage_init("qkv_bias", f32_bytes(&bias));
                    let norms = c.storage_init("qk_norm", f32_bytes(&norms));
                    QkvBind::Split {
                        raw: k.mv.bind(c, &step, &ub_qkv_raw, &wqkv, &x, &g_in, raw),
                        post: post.bind(
                            c,
                            [&step, &ub_qkv_post, raw, &bias, &norms, &rope, &q, &kc, &vc],
                        ),
                    }
                }
                _ => QkvBind::Fused(
                    k.qkv
                        .bind(c, [&step, &ub_qkv, &wqkv, &x, &g_in, &rope, &q, &kc, &vc]),
                ),
            };
            let shared_layer = match (&k.shared, shared_fmt, &routers[l].shared_expert) {
                (Some(sk), Some(sf), Some(se)) => {
                    let (w13, w2) = sf.encode_expert(&se.expert, h, sh_i).map_err(|reason| {
                        ModelError::Tensor {
                            name: format!("layer{l}.shared_expert"),
                            reason,
                        }
                    })?;
                    let w13 = c.storage_init("shared_w13", &w13);
                    let w2 = c.storage_init("shared_w2", &w2);
                    let gate = c.storage_init("shared_gate", f32_bytes(&se.gate));
                    Some(SharedLayer {
                        bg_gate: sk
                            .gate
                            .bind(c, [&step, &ub_gate_sh, &gate, &x, &g_post, &route_sh]),
                        bg_up: sk.up.bind(
                            c,
                            [
                                &step, &ub_shared, &w13, &x, &g_post, &route_sh, &act_sh,
                                &table_sh, &gate, &part,
                            ],
                        ),
                        bg_down: sk.down.bind(
                            c,
                            [
                                &step, &ub_shared, &w2, &act_sh, &route_sh, &x, &table_sh, &part,
                            ],
                        ),
                    })
                }
                (None, None, None) => None,
                _ => {
                    return Err(ModelError::Tensor {
                        name: format!("layer{l}.shared_expert"),
                        reason: format!(
                            "model_type {} and the supplied routers disagree on the shared expert",
                            cfg.family().model_type()
                        ),
                    })
                }
            };
            let up = |ub: &wgpu::Buffer, r: &wgpu::Buffer| {
                k.up.bind(
                    c,
                    [
                        &step, ub, &pool.w13, &x, &g_post, r, &act, &table, &gate, &part,
                    ],
                )
            };
            let down = |ub: &wgpu::Buffer, r: &wgpu::Buffer| {
                k.down
                    .bind(c, [&step, ub, &pool.w2, &act, r, &x, &table, &part])
            };
            layers.push(Layer {
                qkv,
                shared: shared_layer,
                bg_attn: k
                    .attn
                    .bind(c, [&step, &ub_attn, &q, &kc, &vc, &scores, &attn_out]),
                bg_attn_dec: k.attn_dec.as_ref().map(|kd| {
                    kd.bind(
                        c,
                        [
                            &step,
                            &ub_attn_dec,
                            &wqkv,
                            &x,
                            &g_in,
                            &rope,
                            &kc,
                            &vc,
                            &wo,
                            &part,
                        ],
                    )
                }),
                bg_o: k.mv.bind(c, &step, &ub_o, &wo, &attn_out, &g_in, &x),
                bg_router: k.router.bind(
                    c,
                    [&step, &ub_router, &gate, &x, &g_post, &probs, &route[0]],
                ),
                bg_up: route.each_ref().map(|r| up(&ub_exp, r)),
                bg_down: route.each_ref().map(|r| down(&ub_exp, r)),
                bg_up_route: route_fused.then(|| route.each_ref().map(|r| up(&ub_exp_route, r))),
                bg_up_dec: k
                    .attn_dec
                    .as_ref()
                    .map(|_| route.each_ref().map(|r| up(&ub_exp_dec, r))),
                bg_down_dec: k
                    .attn_dec
                    .as_ref()
                    .map(|_| route.each_ref().map(|r| down(&ub_exp_dec, r))),
                table,
                route,
            });
        }
        let bg_embed = k.embed.bind(c, &[&step, &ub_embed, &embed_t, &tokens, &x]);
        let bg_head_last = k
            .head
            .bind(c, &step, &ub_head_last, &head_t, &x, &norm, &logits_last);
        let bg_head_all = k
            .head
            .bind(c, &step, &ub_head_all, &head_t, &x, &norm, &logits_all);
        let bg_argmax = k.argmax.bind(c, &ub_argmax, &logits_last, &argmax_out);
        let ub_argmax_embed = u(
            "p_argmax_embed",
            bytemuck::bytes_of(&argmax::EmbedParams {
                n: v as u32,
                hidden: h as u32,
                _p1: 0,
                _p2: 0,
            }),
        );
        let bg_argmax_embed = k.argmax_embed.as_ref().map(|ke| {
            ke.bind(
                c,
                [&ub_argmax_embed, &logits_last, &argmax_out, &embed_t, &x],
            )
        });

        Ok(Self {
            ctx,
            cfg: cfg.clone(),
            opts,
            k,
            layers,
            pool,
            host,
            pool_format,
            shared_format: shared_fmt,
            step,
            tokens,
            x,
            part,
            logits_last,
            logits_all,
            argmax_out,
            readback,
            pipe_rb,
            bg_embed,
            bg_head_last,
            bg_head_all,
            bg_argmax,
            bg_argmax_embed,
            embedded: None,
            p_qkv,
            p_qkv_raw,
            p_qkv_post,
            p_shared,
            p_attn,
            p_attn_dec,
            p_o,
            p_head_last,
            p_head_all,
            p_exp,
            pos: 0,
            paused: None,
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

    /// Tokens in the KV cache (a paused step's tokens are not counted yet).
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Empty the KV cache and drop a paused step (the pool keeps its experts).
    pub fn reset(&mut self) {
        self.paused = None;
        self.pos = 0;
    }

    /// Whether a step is paused waiting for experts.
    pub fn is_paused(&self) -> bool {
        self.paused.is_some()
    }

    /// How the pool stores experts (the format a supplied expert must have).
    pub fn pool_format(&self) -> PoolFormat {
        self.pool_format
    }

    /// Bytes one expert takes in the pool.
    pub fn expert_bytes(&self) -> u64 {
        self.pool.w13_bytes + self.pool.w2_bytes
    }

    /// Experts the pool holds at most.
    pub fn pool_slots(&self) -> usize {
        self.pool.slots()
    }

    /// Experts in the pool now.
    pub fn resident_experts(&self) -> usize {
        self.pool.owner.iter().flatten().count()
    }

    /// Whether `layer{layer}.expert{expert}` is in the pool.
    pub fn is_expert_resident(&self, layer: usize, expert: usize) -> bool {
        self.pool.resident(ExpertId::new(layer, expert))
    }

    /// Upload an expert into the pool (a missing one a paused step asked
    /// for, one fetched ahead of time, or a new version of a resident one).
    /// A full pool drops its least recently used expert, never one the
    /// paused step needs.
    pub fn supply_expert(&mut self, id: ExpertId, w: ExpertWeights) -> Result<(), ModelError> {
        Slot::Expert {
            layer: id.layer,
            expert: id.expert,
        }
        .check_in_spec(&self.cfg)?;
        check_expert(&self.cfg, &w).map_err(|e| match e {
            ModelError::Tensor { name, reason } => ModelError::Tensor {
                name: format!("{id}.{name}"),
                reason,
            },
            e => e,
        })?;
        let (h, i) = (self.cfg.hidden_size, self.cfg.expert_intermediate_size());
        let (w13, w2) = self
            .pool_format
            .encode_expert(&w, h, i)
            .map_err(|reason| ModelError::Input(format!("{id}: {reason}")))?;
        if w13.len() as u64 != self.pool.w13_bytes || w2.len() as u64 != self.pool.w2_bytes {
            return Err(ModelError::Input(format!(
                "{id}: {} + {} bytes, a pool slot holds {} + {}",
                w13.len(),
                w2.len(),
                self.pool.w13_bytes,
                self.pool.w2_bytes
            )));
        }
        let pinned = self.paused.as_ref().map_or(Vec::new(), |r| r.need.clone());
        self.upload(id, w13, w2, &pinned)
    }

    /// Write `id`'s encoded weights into a pool slot (its own, a free one,
    /// or the least recently used one not in `pinned`), point its layer's
    /// table at it, and keep the host copies.
    fn upload(
        &mut self,
        id: ExpertId,
        w13: Vec<u8>,
        w2: Vec<u8>,
        pinned: &[ExpertId],
    ) -> Result<(), ModelError> {
        let (slot, evicted) = self.pool.claim(id, pinned)?;
        // A stale evicted copy (this expert supplied anew) is dropped.
        let _ = self.host.take(id);
        let q = &self.ctx.queue;
        q.write_buffer(&self.pool.w13, slot as u64 * self.pool.w13_bytes, &w13);
        q.write_buffer(&self.pool.w2, slot as u64 * self.pool.w2_bytes, &w2);
        if let Some(old) = evicted {
            q.write_buffer(
                &self.layers[old.layer].table,
                (old.expert * 4) as u64,
                bytemuck::bytes_of(&NO_SLOT),
            );
            self.stats.expert_evictions += 1;
            tracing::debug!(%old, %id, slot, "expert pool: evicted");
        }
        q.write_buffer(
            &self.layers[id.layer].table,
            (id.expert * 4) as u64,
            bytemuck::bytes_of(&(slot as u32)),
        );
        self.stats.expert_uploads += 1;
        self.stats.expert_bytes_uploaded += (w13.len() + w2.len()) as u64;
        self.host.place(slot, w13, w2, evicted);
        Ok(())
    }

    /// Write back from the host cache what `run` needs (its pinned layer
    /// experts, then the later layers' guesses) and the cache holds; true
    /// when every expert of `run.need` is then resident (the run goes on
    /// without a pause).
    fn fill_from_host(&mut self, run: &mut Run) -> Result<bool, ModelError> {
        if !self.host.on() || self.missing(&run.need).is_empty() {
            // Nothing to fill (a run with nothing missing pauses as before).
            return Ok(false);
        }
        let mut ahead = std::mem::take(&mut run.ahead);
        let want: Vec<ExpertId> = self
            .missing(&run.need)
            .into_iter()
            .chain(self.missing(&ahead))
            .collect();
        for id in want {
            if self.pool.resident(id) {
                continue;
            }
            if let Some((w13, w2)) = self.host.take(id) {
                self.upload(id, w13, w2, &run.need)?;
                self.stats.host_cache_hits += 1;
            }
        }
        ahead.retain(|&id| !self.pool.resident(id));
        run.ahead = ahead;
        Ok(self.missing(&run.need).is_empty())
    }

    /// Weight bytes one decoded token reads with `k` experts per token
    /// (attention, router, the `k` experts of every layer, final norm and head).
    pub fn weight_bytes_per_token(&self, k: usize) -> u64 {
        let c = &self.cfg;
        let (h, i, v) = (c.hidden_size, c.expert_intermediate_size(), c.vocab_size);
        let f = self.opts.weights;
        let attn = f.matrix_bytes(h, c.q_dim() + 2 * c.kv_dim())
            + f.matrix_bytes(c.q_dim(), h)
            + 2 * h * 4;
        let e = self.pool_format;
        let mut moe = h * c.num_local_experts * 4 + k * (e.w13_bytes(h, i) + e.w2_bytes(h, i));
        if let (Some(si), Some(f)) = (c.shared_expert_intermediate_size(), self.shared_format) {
            moe += h * 4 + f.w13_bytes(h, si) + f.w2_bytes(h, si);
        }
        (c.num_hidden_layers * (attn + moe) + f.matrix_bytes(h, v) + 2 * h * 4) as u64
    }

    /// Dispatches one greedy decoded token issues in steady state (a
    /// one-token step whose token the previous greedy step sampled):
    /// [`Engine::dispatches_per_chunk`]`(1)`, less the embedding when the
    /// fused argmax wrote that token's row already.
    pub fn dispatches_per_step(&self) -> u64 {
        self.dispatches_per_chunk(1) - u64::from(self.k.argmax_embed.is_some())
    }

    /// Dispatches a chunk of `n_tok` tokens issues when it ends with the
    /// head and argmax (a greedy step's last chunk), the embedding
    /// included. Mixtral: `3 * layers + 3` for one token with
    /// [`EngineOptions::fused_attention`] (the fused decode attention with
    /// the o_proj shares, when the shape fits it), `5 * layers + 3` for one
    /// token without it and for a prompt chunk (the router fused into
    /// `expert_up` either way);
    /// the families with q/k/v extras `6 * layers + 3` either way
    /// (projection, `qkv_post`, attention, o_proj: never fused), three more
    /// per layer for a shared expert; the unfused engine `6 * layers + 3`.
    pub fn dispatches_per_chunk(&self, n_tok: usize) -> u64 {
        let fused = n_tok == 1 && self.k.attn_dec.is_some();
        let per_layer = 6 - 2 * u64::from(fused) - u64::from(self.k.route_fused)
            + u64::from(self.k.qkv_post.is_some())
            + 3 * u64::from(self.k.shared.is_some());
        per_layer * self.cfg.num_hidden_layers as u64 + 3
    }

    /// Check a new step and plan its chunks.
    fn start(&mut self, tokens: &[u32], opts: &RunOptions, want: Want) -> Result<Run, ModelError> {
        if self.paused.is_some() {
            return Err(ModelError::Input(
                "a step is paused waiting for experts: resume or cancel it first".into(),
            ));
        }
        let k = opts.check_step(
            &self.cfg,
            self.pos,
            tokens,
            self.opts.max_seq,
            "KV cache capacity",
        )?;
        let (ne, slots) = (self.cfg.num_local_experts, self.pool.slots());
        let cap = if slots >= ne {
            self.opts.max_batch
        } else if !opts.use_moe {
            return Err(ModelError::Input(format!(
                "the dense mixture runs all {ne} experts of a layer at once; \
                 the expert pool holds {slots}"
            )));
        } else if slots < k {
            return Err(ModelError::Input(format!(
                "top_k {k} experts per token do not fit an expert pool of {slots}"
            )));
        } else {
            // One layer-step needs at most k distinct experts per token.
            self.opts.max_batch.min(slots / k)
        };
        Ok(Run {
            tokens: tokens.to_vec(),
            k,
            use_moe: opts.use_moe,
            want,
            cap,
            done: 0,
            n: 0,
            at: At::Chunk,
            need: Vec::new(),
            ahead: Vec::new(),
            all: Vec::new(),
            set: 0,
        })
    }

    /// Run `run` on from where it stands, until it finishes or lacks experts.
    async fn drive(&mut self, mut run: Run) -> Result<Step, ModelError> {
        loop {
            match self.advance(&mut run).await {
                Ok(Some(out)) => {
                    self.pos += run.tokens.len();
                    return Ok(Step::Done(out));
                }
                // Every expert the run waits for was in the host cache:
                // it goes on, no pause.
                Ok(None) if self.fill_from_host(&mut run)? => self.stats.host_resumes += 1,
                Ok(None) => return Ok(self.pause(run)),
                // The cache rows written past `pos` are overwritten next time.
                Err(e) => return Err(e),
            }
        }
    }

    /// Keep `run` paused for the experts it needs (`run.need`, then the
    /// guesses for later layers, `run.ahead`).
    fn pause(&mut self, mut run: Run) -> Step {
        let mut missing = self.missing(&run.need);
        // The guesses for later layers (sorted after the paused layer's).
        missing.extend(self.missing(&std::mem::take(&mut run.ahead)));
        self.stats.pauses += 1;
        self.paused = Some(run);
        Step::Need(missing)
    }

    fn missing(&self, ids: &[ExpertId]) -> Vec<ExpertId> {
        ids.iter()
            .copied()
            .filter(|&id| !self.pool.resident(id))
            .collect()
    }

    fn layer_ids(&self, layer: usize) -> impl Iterator<Item = ExpertId> {
        (0..self.cfg.num_local_experts).map(move |e| ExpertId::new(layer, e))
    }

    fn write_step(&self, run: &Run) {
        let u = StepUniform {
            pos0: (self.pos + run.done) as u32,
            n_tok: run.n as u32,
            top_k: run.k as u32,
            // Top-k weights renormalised over the chosen experts unless the
            // family keeps the softmax (`norm_topk_prob: false`); the dense
            // mixture keeps the softmax over all experts.
            renorm: u32::from(run.use_moe && self.cfg.renormalize_top_k()),
        };
        self.ctx.queue.write_buffer(&self.step, 0, u.bytes());
    }

    fn encode_experts(&mut self, pass: &mut wgpu::ComputePass<'_>, layer: usize, run: &Run) {
        self.encode_up(pass, layer, run);
        self.encode_down(pass, layer, run);
    }

    /// The routed experts' gate and up halves (and, with the router fused,
    /// the routing itself).
    fn encode_up(&mut self, pass: &mut wgpu::ComputePass<'_>, layer: usize, run: &Run) {
        let ly = &self.layers[layer];
        let bg = match (&ly.bg_up_dec, run.n) {
            (Some(bg), 1) => &bg[run.set],
            _ => &ly.bg_up[run.set],
        };
        self.k
            .up
            .encode(pass, bg, &self.p_exp, run.n as u32, run.k as u32);

        self.stats.dispatches += 1;
    }

    /// The layer's routes only (`expert_up` with `route_in = 2`), where a
    /// chunk stops to read them back.
    fn encode_routes(&mut self, pass: &mut wgpu::ComputePass<'_>, layer: usize, run: &Run) {
        let ly = &self.layers[layer];
        if let Some(bg) = &ly.bg_up_route {
            self.k.up.encode_routes(pass, &bg[run.set], run.n as u32);
            self.stats.dispatches += 1;
        }
    }

    /// The routed experts' down halves, weighted sum and residual (and the
    /// shared expert's down half).
    fn encode_down(&mut self, pass: &mut wgpu::ComputePass<'_>, layer: usize, run: &Run) {
        let ly = &self.layers[layer];
        let bg = match (&ly.bg_down_dec, run.n) {
            (Some(bg), 1) => &bg[run.set],
            _ => &ly.bg_down[run.set],
        };
        self.k.down.encode(pass, bg, &self.p_exp, run.n as u32);
        self.stats.dispatches += 1;
        // The shared expert's down half (its gate and up half ran with the router).
        if let (Some(sk), Some(sh)) = (&self.k.shared, &ly.shared) {
            sk.down
                .encode(pass, &sh.bg_down, &self.p_shared, run.n as u32);
            self.stats.dispatches += 1;
        }
    }

    /// Encode a layer's attention block and router (and the shared expert's
    /// gate and up half, which read the same hidden state as the routed
    /// experts); returns the dispatch count.
    fn encode_attention(&self, pass: &mut wgpu::ComputePass<'_>, l: usize, n: u32) -> u64 {
        let ly = &self.layers[l];
        let mut d = 3;
        if let (1, Some(kd), Some(bg)) = (n, &self.k.attn_dec, &ly.bg_attn_dec) {
            // Decode: q/k/v, RoPE, cache append, attention and the heads'
            // o_proj shares in one kernel (counted as the attention; the
            // expert kernels add the shares).
            kd.encode(pass, bg, &self.p_attn_dec);
            d -= 1;
        } else {
            self.encode_qkv(pass, l, n, &mut d);
            self.k.attn.encode(pass, &ly.bg_attn, &self.p_attn, n);
            self.k.mv.encode(pass, &ly.bg_o, &self.p_o, n);
        }
        if !self.k.route_fused {
            self.k.router.encode(pass, &ly.bg_router, n);
        } else {
            d -= 1;
        }
        d + self.encode_shared_up(pass, l, n)
    }

    /// The shared expert's gate and up half (Qwen2-MoE), reading the same
    /// hidden state as the routed experts; returns the dispatch count.
    fn encode_shared_up(&self, pass: &mut wgpu::ComputePass<'_>, l: usize, n: u32) -> u64 {
        match (&self.k.shared, &self.layers[l].shared) {
            (Some(sk), Some(sh)) => {
                sk.gate.encode(pass, &sh.bg_gate, n);
                sk.up.encode(pass, &sh.bg_up, &self.p_shared, n, 1);
                2
            }
            _ => 0,
        }
    }

    /// The attention input of a prompt chunk (or of a family with q/k/v
    /// extras): the fused `qkv_rope`, or the projection and `qkv_post`.
    fn encode_qkv(&self, pass: &mut wgpu::ComputePass<'_>, l: usize, n: u32, d: &mut u64) {
        let ly = &self.layers[l];
        match (&ly.qkv, &self.k.qkv_post) {
            (QkvBind::Split { raw, post }, Some(k)) => {
                self.k.mv.encode(pass, raw, &self.p_qkv_raw, n);
                k.encode(pass, post, &self.p_qkv_post, n);
                *d += 2;
            }
            (QkvBind::Fused(bg), _) | (QkvBind::Split { raw: bg, .. }, None) => {
                self.k.qkv.encode(pass, bg, &self.p_qkv, n);
                *d += 1;
            }
        }
    }

    fn submit(&mut self, enc: wgpu::CommandEncoder) {
        self.ctx.queue.submit([enc.finish()]);
        self.stats.submissions += 1;
    }

    /// The experts `words` (a layer's routes as read back) route the chunk's
    /// tokens to (sorted, deduplicated).
    fn route_ids(
        &self,
        words: &[u32],
        layer: usize,
        run: &Run,
    ) -> Result<Vec<ExpertId>, ModelError> {
        let ne = self.cfg.num_local_experts;
        let mut ids = Vec::with_capacity(run.n * run.k);
        for t in 0..run.n {
            for s in 0..run.k {
                let e = words[(t * ne + s) * 2] as usize;
                if e >= ne {
                    return Err(GpuError::Readback(format!("router returned expert {e}")).into());
                }
                ids.push(e);
            }
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(ids.into_iter().map(|e| ExpertId::new(layer, e)).collect())
    }

    /// Read back the experts layer `layer` routed the chunk's tokens to
    /// (sorted, deduplicated); submits `enc`.
    async fn routed(
        &mut self,
        mut enc: wgpu::CommandEncoder,
        layer: usize,
        run: &Run,
    ) -> Result<Vec<ExpertId>, ModelError> {
        let ne = self.cfg.num_local_experts;
        let bytes = (run.n * ne * 2 * 4) as u64;
        enc.copy_buffer_to_buffer(&self.layers[layer].route[0], 0, &self.readback, 0, bytes);
        self.submit(enc);
        let words: Vec<u32> =
            bytemuck::pod_collect_to_vec(&self.ctx.read_mapped(&self.readback, bytes).await?);
        self.stats.readbacks += 1;
        self.stats.readback_bytes += bytes;
        self.route_ids(&words, layer, run)
    }

    /// The experts worth asking for beside a paused layer's: those the
    /// later layers of the same run routed to (`layers`: each one's routes
    /// as read back). Their input was inexact (a missing expert ran as
    /// another), so they are guesses, though usually right: the step would
    /// otherwise pause again at each of those layers. The resident ones
    /// are marked used (so that supplying the guesses does not evict them);
    /// the missing ones are returned, as many as the pool holds beside the
    /// paused layer's experts and the resident guesses.
    fn ahead<'w>(
        &mut self,
        layers: impl Iterator<Item = (usize, &'w [u32])>,
        run: &Run,
    ) -> Result<Vec<ExpertId>, ModelError> {
        let mut guess = Vec::new();
        for (l, w) in layers {
            guess.extend(self.route_ids(w, l, run)?);
        }
        let (resident, missing): (Vec<ExpertId>, Vec<ExpertId>) =
            guess.into_iter().partition(|&id| self.pool.resident(id));
        let room = self
            .pool
            .slots()
            .saturating_sub(run.need.len() + resident.len());
        self.pool.touch(resident);
        Ok(missing.into_iter().take(room).collect())
    }

    /// After a chunk ran: the first of the `checked` layers (`words`: their
    /// routes as read back, `run.n * experts * 2` words each, in order) that
    /// routed to a missing expert is where the step resumes
    /// ([`At::Redo`]; `run.need`: its experts, `run.ahead`: the later
    /// layers' guesses in a pool that evicts): `Ok(true)`. Otherwise every
    /// routed expert counts as used: `Ok(false)`.
    fn check_routes(
        &mut self,
        run: &mut Run,
        checked: &[usize],
        words: &[u32],
    ) -> Result<bool, ModelError> {
        let per = run.n * self.cfg.num_local_experts * 2;
        for (i, &l) in checked.iter().enumerate() {
            let ids = self.route_ids(&words[i * per..(i + 1) * per], l, run)?;
            if ids.iter().any(|&id| !self.pool.resident(id)) {
                run.need = ids;
                run.at = At::Redo(l);
                if self.pool.evicting() {
                    let later = checked.iter().enumerate().skip(i + 1);
                    let later = later.map(|(j, &l)| (l, &words[j * per..(j + 1) * per]));
                    run.ahead = self.ahead(later, run)?;
                }
                return Ok(true);
            }
            self.pool.touch(ids);
        }
        Ok(false)
    }

    /// Encode and submit from `run.at` on. `Ok(None)`: paused, `run.need`
    /// says which experts the awaited layer-step needs.
    ///
    /// With the router fused into `expert_up`, a layer that lacks experts
    /// does not stop the chunk: it runs with whatever its slot table holds
    /// (`expert_up` saves its input row), and every such layer's routes are
    /// read back with the chunk's output, in the same submission. The first
    /// layer whose routes name a missing expert is where the step pauses
    /// ([`At::Redo`]): the layers before it ran on resident experts, so its
    /// input and routes are right, and what came after it is discarded
    /// (resuming restores its input row, runs its experts again and
    /// overwrites the later layers' cache rows). A layer with fewer
    /// resident experts than `top_k` misses for certain, so the chunk stops
    /// there; so does a prompt's chunk (more than one token) at each layer
    /// that lacks experts in a pool that evicts
    /// ([`EngineOptions::prompt_stops`]). A stop runs `expert_up` for the
    /// routes only (`route_in = 2`: no expert runs), reads them back and
    /// goes on with the layer's experts ([`At::Experts`]: its input row is
    /// still in `x`) once they are resident, pausing first if one is not.
    async fn advance(&mut self, run: &mut Run) -> Result<Option<Output>, ModelError> {
        let (ne, nl, h, v) = (
            self.cfg.num_local_experts,
            self.layers.len(),
            self.cfg.hidden_size,
            self.cfg.vocab_size,
        );
        let mut out = None;
        loop {
            // The first layer whose routes are checked after the chunk.
            let mut check: Option<usize> = None;
            let (mut enc, pass, first) = match run.at {
                At::Chunk => {
                    if run.done == run.tokens.len() {
                        break;
                    }
                    if !run.use_moe && self.pool.slots() >= nl * ne {
                        // Dense: every expert of every layer, asked for up front.
                        let all: Vec<ExpertId> = (0..nl).flat_map(|l| self.layer_ids(l)).collect();
                        if all.iter().any(|&id| !self.pool.resident(id)) {
                            run.need = all;
                            return Ok(None);
                        }
                        run.need.clear();
                    }
                    run.n = run.cap.min(run.tokens.len() - run.done);
                    self.write_step(run);
                    self.ctx.queue.write_buffer(
                        &self.tokens,
                        0,
                        bytemuck::cast_slice(&run.tokens[run.done..run.done + run.n]),
                    );
                    let mut enc = self.ctx.device.create_command_encoder(&Default::default());
                    let mut pass = enc
                        .begin_compute_pass(&Default::default())
                        .forget_lifetime();
                    // The last greedy step wrote this token's row already.
                    let ready = self.embedded.take();
                    if !(run.n == 1 && ready == Some(run.tokens[run.done])) {
                        self.k
                            .embed
                            .dispatch(&mut pass, &self.bg_embed, (run.n * h) as u64);
                        self.stats.dispatches += 1;
                    }
                    (enc, pass, 0)
                }
                At::Experts(l) | At::Redo(l) => {
                    if run.need.iter().any(|&id| !self.pool.resident(id)) {
                        return Ok(None);
                    }
                    let need = std::mem::take(&mut run.need);
                    self.pool.touch(need);
                    // The step uniform is unchanged since the pause; rewritten
                    // so that resuming never depends on that.
                    self.write_step(run);
                    let mut enc = self.ctx.device.create_command_encoder(&Default::default());
                    if run.at == At::Redo(l) {
                        self.restore_row(&mut enc, l, run);
                        check = Some(l);
                    }
                    let mut pass = enc
                        .begin_compute_pass(&Default::default())
                        .forget_lifetime();
                    if run.at == At::Redo(l) {
                        self.stats.dispatches += self.encode_shared_up(&mut pass, l, run.n as u32);
                    }
                    self.encode_experts(&mut pass, l, run);
                    (enc, pass, l + 1)
                }
            };
            // One compute pass for the whole chunk, ended early only where
            // the unfused router's ids must be read back, or where a layer
            // misses for certain.
            let mut pass = pass;
            let mut stop = None;
            for l in first..nl {
                let d = self.encode_attention(&mut pass, l, run.n as u32);
                self.stats.dispatches += d;
                run.at = At::Experts(l);
                if self.pool.layer_resident(l) {
                    // Nothing to ask for: no readback (every expert counts as used).
                    let ids: Vec<ExpertId> = self.layer_ids(l).collect();
                    self.pool.touch(ids);
                } else if !run.use_moe {
                    drop(pass);
                    self.submit(enc);
                    run.need = self.layer_ids(l).collect();
                    return Ok(None);
                } else if self.k.route_fused {
                    // Run on; the routes are checked after the chunk.
                    check.get_or_insert(l);
                    let resident = self.pool.slot_of[l].iter().flatten().count();
                    // A prompt (more than one token) in a pool that evicts
                    // stops here too: its tokens route to more experts
                    // than one decoded token, so a miss is likely, and
                    // redoing the chunk's later layers costs far more
                    // than one readback.
                    let certain = resident < run.k.min(ne) && !self.pool.evicting();
                    let prompt = self.opts.prompt_stops && run.n > 1 && self.pool.evicting();
                    if certain || prompt {
                        // Routes only: no expert runs before they are
                        // read back, so nothing runs twice.
                        self.encode_routes(&mut pass, l, run);
                        stop = Some(l);
                        break;
                    }
                } else {
                    // The unfused router: its ids, read back before the
                    // experts run.
                    drop(pass);
                    let ids = self.routed(enc, l, run).await?;
                    if ids.iter().any(|&id| !self.pool.resident(id)) {
                        run.need = ids;
                        return Ok(None);
                    }
                    self.pool.touch(ids);
                    enc = self.ctx.device.create_command_encoder(&Default::default());
                    pass = enc
                        .begin_compute_pass(&Default::default())
                        .forget_lifetime();
                }
                self.encode_experts(&mut pass, l, run);
            }
            let last = run.done + run.n == run.tokens.len();
            let read: Option<(&wgpu::Buffer, u64)> = {
                let n = run.n as u32;
                let mut pass = pass;
                if stop.is_some() {
                    None
                } else if run.want == Want::AllLogits {
                    self.k
                        .head
                        .encode(&mut pass, &self.bg_head_all, &self.p_head_all, n);
                    self.stats.dispatches += 1;
                    Some((&self.logits_all, (run.n * v * 4) as u64))
                } else if last && run.want == Want::Greedy {
                    self.encode_greedy_head(&mut pass, n);
                    self.stats.dispatches += 2;
                    Some((&self.argmax_out, 4))
                } else if last {
                    self.k
                        .head
                        .encode(&mut pass, &self.bg_head_last, &self.p_head_last, n);
                    self.stats.dispatches += 1;
                    Some((&self.logits_last, (v * 4) as u64))
                } else {
                    None
                }
            };
            let has_out = read.is_some();
            let out_bytes = read.map_or(0, |(src, bytes)| {
                enc.copy_buffer_to_buffer(src, 0, &self.readback, 0, bytes);
                bytes
            });
            // The checked layers' routes, after the output.
            let route_bytes = (run.n * ne * 2 * 4) as u64;
            let checked = check.map_or(0..0, |c| c..stop.map_or(nl, |s| s + 1));
            for (i, l) in checked.clone().enumerate() {
                enc.copy_buffer_to_buffer(
                    &self.layers[l].route[run.set],
                    0,
                    &self.readback,
                    out_bytes + i as u64 * route_bytes,
                    route_bytes,
                );
            }
            let bytes = out_bytes + checked.len() as u64 * route_bytes;
            self.submit(enc);
            if bytes > 0 {
                let data = self.ctx.read_mapped(&self.readback, bytes).await?;
                self.stats.readbacks += 1;
                self.stats.readback_bytes += bytes;
                // The first checked layer routed to a missing expert: pause there.
                let words: Vec<u32> = bytemuck::pod_collect_to_vec(&data[out_bytes as usize..]);
                let checked: Vec<usize> = checked.collect();
                if self.check_routes(run, &checked, &words)? {
                    // The stop layer's expert_up only routed: its input
                    // row is still in `x`, nothing to restore or redo.
                    if let Some(l) = stop.filter(|&l| run.at == At::Redo(l)) {
                        run.at = At::Experts(l);
                    }
                    return Ok(None);
                }
                if let Some(l) = stop {
                    if !self.pool.evicting() {
                        return Err(GpuError::Readback(
                            "a layer with fewer resident experts than top_k routed to resident ones"
                                .into(),
                        )
                        .into());
                    }
                    // A chunk stopped at a layer whose routed experts are
                    // all resident: its experts run next, and the chunk
                    // goes on.
                    let per = run.n * ne * 2;
                    let last = &words[(checked.len() - 1) * per..];
                    run.need = self.route_ids(last, l, run)?;
                    run.at = At::Experts(l);
                    self.stats.resumed_stops += 1;
                    continue;
                }
                let data = &data[..out_bytes as usize];
                match (has_out, run.want) {
                    (false, _) => {}
                    (true, Want::Greedy) => {
                        let t = bytemuck::pod_read_unaligned::<u32>(&data[..4]);
                        if self.k.argmax_embed.is_some() {
                            self.embedded = Some(t);
                        }
                        out = Some(Output::Token(t))
                    }
                    (true, Want::Logits) => {
                        out = Some(Output::Logits(bytemuck::pod_collect_to_vec(data)))
                    }
                    (true, Want::AllLogits) => {
                        let f: Vec<f32> = bytemuck::pod_collect_to_vec(data);
                        run.all.extend(f.chunks_exact(v).map(<[f32]>::to_vec));
                    }
                }
            }
            self.stats.steps += 1;
            run.done += run.n;
            self.stats.tokens += run.n as u64;
            run.at = At::Chunk;
        }
        if run.want == Want::AllLogits {
            return Ok(Some(Output::AllLogits(std::mem::take(&mut run.all))));
        }
        out.map(Some)
            .ok_or_else(|| GpuError::Readback("no output".into()).into())
    }
}

/// Decoded tokens [`Engine::decode_greedy`] keeps in flight: token `t + 1`'s
/// chunk is submitted before token `t` is read back.
const PIPELINE_DEPTH: usize = 2;

/// Of the last [`MISS_WINDOW`] tokens [`Engine::decode_greedy`] read back,
/// this many or more missed an expert: one token in flight at a time (each
/// miss would discard the chunk behind it, a token's work, where keeping
/// one in flight only costs the readback's round trip), until the window
/// holds fewer.
const MISSES_FOR_ONE: u32 = 2;
const MISS_WINDOW: u32 = 8;

/// A decoded token's chunk in flight in [`Engine::decode_greedy`]: its
/// step, its readback's mapping, and the layers (lacking experts) whose
/// routes follow the sampled id in that readback.
struct InFlight {
    run: Run,
    map: Mapping,
    checked: Vec<usize>,
    /// Submitted after a token that missed an expert: dropped (already
    /// rolled back) when it comes back.
    dead: bool,
}

impl Engine {
    /// Whether [`Engine::decode_greedy`] can pipeline the step that feeds
    /// `token` (with the default [`RunOptions`]): the last step sampled it
    /// greedily with `argmax_embed` (its embedding is in `x`, so the next
    /// chunk needs nothing from the CPU but its position), no step is
    /// paused, and a decoded chunk runs to its end without a readback in
    /// between: every expert of every layer resident, or, with the router
    /// fused into `expert_up`, a pool whose lacking layers are checked
    /// after the chunk (one that evicts, or one where every layer holds at
    /// least `top_k` experts).
    pub fn can_pipeline(&self, token: u32) -> bool {
        self.pipelines(token, &RunOptions::default())
    }

    fn all_resident(&self) -> bool {
        (0..self.layers.len()).all(|l| self.pool.layer_resident(l))
    }

    /// [`Engine::can_pipeline`] under `opts`.
    fn pipelines(&self, token: u32, opts: &RunOptions) -> bool {
        if self.paused.is_some() || self.k.argmax_embed.is_none() || self.embedded != Some(token) {
            return false;
        }
        if self.all_resident() {
            return true;
        }
        let Ok(k) = opts.experts_per_token(&self.cfg) else {
            return false;
        };
        // As `advance`: a layer with fewer resident experts than top_k stops
        // the chunk, unless the pool evicts.
        self.k.route_fused
            && opts.use_moe
            && self.pool.slots() >= k
            && (self.pool.evicting()
                || self
                    .pool
                    .slot_of
                    .iter()
                    .all(|l| l.iter().flatten().count() >= k))
    }

    /// Greedy decoding from `first`, the token the last greedy step
    /// returned (not yet in the KV cache): feed it, then each sampled token,
    /// until `n` tokens are sampled or `keep` (shown each sampled token in
    /// order) returns false. Returns the sampled tokens (the last one is not
    /// fed, as after [`crate::model::run_step`]); the KV cache holds `first`
    /// and every returned token but the last.
    ///
    /// Where the engine [can pipeline](Engine::can_pipeline), token `t + 1`'s
    /// chunk is encoded and submitted before token `t` is read back
    /// (`argmax_embed` writes its embedding on the GPU), so the GPU (or
    /// SwiftShader's threads) runs it while the readback of `t` comes back:
    /// [`PIPELINE_DEPTH`] chunks in flight, each reading back into its own
    /// buffer. With a pool that lacks experts, each chunk reads back the
    /// routes of the layers that lack one with its token (no submission
    /// more while every routed expert is resident), and the two tokens in
    /// flight use the two route buffers of each layer ([`Layer::route`]).
    /// When token `t` routed to a missing expert, the chunk after it is
    /// discarded (its cache rows lie past the position and are overwritten
    /// later), `t`'s step pauses at that layer as a single step would
    /// (`supply` is asked for its experts and the later layers' guesses,
    /// the layer's experts pinned), and `t` is submitted again from that
    /// layer's saved input row (in `t`'s route buffer, which the discarded
    /// chunk did not touch), with `t + 1` right behind it: the pipeline
    /// runs on. Where misses are frequent ([`MISSES_FOR_ONE`] of the last
    /// [`MISS_WINDOW`] tokens) one token is in flight at a time, so that a
    /// miss discards nothing. When `keep` stops early, the chunk already
    /// submitted after it is discarded too.
    /// Otherwise each token is one [`crate::model::run_step`], until the
    /// engine can pipeline. The tokens are those of one `run_step` per token
    /// either way: the same kernels run in the same order.
    pub async fn decode_greedy<S: crate::model::Supply + ?Sized>(
        &mut self,
        supply: &mut S,
        first: u32,
        n: usize,
        opts: &RunOptions,
        mut keep: impl FnMut(u32) -> bool,
    ) -> Result<Vec<u32>, ModelError> {
        let mut out = Vec::with_capacity(n);
        let mut tok = first;
        while out.len() < n {
            if self.pipelines(tok, opts) {
                self.pipelined(supply, &mut out, n, opts, &mut keep).await?;
                break;
            }
            tok = match crate::model::run_step(self, supply, &[tok], opts, Want::Greedy).await? {
                Output::Token(t) => t,
                _ => return Err(GpuError::Readback("unexpected output".into()).into()),
            };
            out.push(tok);
            if !keep(tok) {
                break;
            }
        }
        Ok(out)
    }

    /// [`Engine::decode_greedy`]'s pipelined part (the engine
    /// [`pipelines`](Engine::pipelines) the token `x` holds), until `n`
    /// tokens are out or `keep` stops.
    async fn pipelined<S: crate::model::Supply + ?Sized>(
        &mut self,
        supply: &mut S,
        out: &mut Vec<u32>,
        n: usize,
        opts: &RunOptions,
        keep: &mut impl FnMut(u32) -> bool,
    ) -> Result<(), ModelError> {
        let first = self.embedded.take().ok_or_else(|| {
            ModelError::Input("pipelined decode: no sampled token embedded".into())
        })?;
        let mut flight: std::collections::VecDeque<InFlight> = Default::default();
        let mut to_submit = n - out.len();
        let mut free = [true; PIPELINE_DEPTH];
        // Misses of the last MISS_WINDOW tokens read back (bit 0: the last).
        let mut misses = 0u32;
        // Set once the loop only drains: `keep` stopped, or an error.
        let mut stopped = false;
        let mut err: Option<ModelError> = None;
        // Whether `x` holds the embedding of `last` (the last chunk run was
        // kept).
        let mut x_last = true;
        // The token the chunk read next was fed (the one before it sampled).
        let mut last = first;
        loop {
            let depth = if (misses & ((1 << MISS_WINDOW) - 1)).count_ones() >= MISSES_FOR_ONE {
                1
            } else {
                PIPELINE_DEPTH
            };
            while to_submit > 0 && flight.len() < depth && !stopped {
                let Some(slot) = free.iter().position(|&f| f) else {
                    break;
                };
                match self.start(&[first], opts, Want::Greedy) {
                    Ok(mut run) => {
                        run.n = 1;
                        run.set = slot;
                        flight.push_back(self.launch_decoded(run, slot));
                        free[slot] = false;
                        to_submit -= 1;
                    }
                    Err(e) => {
                        err = Some(e);
                        stopped = true;
                    }
                }
            }
            let Some(InFlight {
                mut run,
                map,
                checked,
                dead,
            }) = flight.pop_front()
            else {
                break;
            };
            let slot = run.set;
            let read = self.ctx.finish_map(&self.pipe_rb[slot], map).await;
            free[slot] = true;
            if dead {
                x_last = false;
                continue;
            }
            if stopped {
                // A speculative chunk (after a stop or an error): discarded.
                self.discard_decoded();
                x_last = false;
                continue;
            }
            let b = match read {
                Ok(b) => b,
                Err(e) => {
                    self.discard_decoded();
                    x_last = false;
                    err = Some(e.into());
                    stopped = true;
                    continue;
                }
            };
            self.stats.readbacks += 1;
            self.stats.readback_bytes += b.len() as u64;
            let t = bytemuck::pod_read_unaligned::<u32>(&b[..4]);
            let words: Vec<u32> = bytemuck::pod_collect_to_vec(&b[4..]);
            run.tokens = vec![last];
            let routed = self.check_routes(&mut run, &checked, &words);
            misses = (misses << 1) | u32::from(matches!(routed, Ok(true)));
            match routed {
                Ok(false) => {
                    out.push(t);
                    last = t;
                    x_last = true;
                    stopped = !keep(t);
                }
                Ok(true) => {
                    // A miss: this chunk and the ones after it are dropped
                    // (those still running come back dead); this token runs
                    // again from the layer that missed once its experts are
                    // in, queued right behind them (the uploads are ordered
                    // after them too), and the next one behind it.
                    self.rollback_decoded();
                    for f in flight.iter_mut() {
                        f.dead = true;
                        self.discard_decoded();
                        to_submit += 1;
                    }
                    x_last = false;
                    match self.supply_missing(supply, run).await {
                        Ok(run) => {
                            flight.push_back(self.launch_decoded(run, slot));
                            free[slot] = false;
                        }
                        Err(e) => {
                            err = Some(e);
                            stopped = true;
                        }
                    }
                }
                Err(e) => {
                    self.discard_decoded();
                    x_last = false;
                    err = Some(e);
                    stopped = true;
                }
            }
        }
        if let Some(e) = err {
            return Err(e);
        }
        // `x` holds the embedding of the last token sampled, unless a
        // discarded chunk overwrote it.
        self.embedded = x_last.then_some(last);
        Ok(())
    }

    /// A pipelined token that routed to missing experts (`run.need`, and
    /// the later layers' guesses `run.ahead`): paused while `supply` hands
    /// them over (the layer's experts pinned, as for any paused step), then
    /// returned to run again from that layer. Errors (and drops the step)
    /// when the supply fails or leaves one of the layer's experts out.
    async fn supply_missing<S: crate::model::Supply + ?Sized>(
        &mut self,
        supply: &mut S,
        mut run: Run,
    ) -> Result<Run, ModelError> {
        if self.fill_from_host(&mut run)? {
            self.stats.host_resumes += 1;
            return Ok(run);
        }
        let Step::Need(ids) = self.pause(run) else {
            return Err(ModelError::Input("pipelined decode: no pause".into()));
        };
        let supplied = crate::model::supply_experts(self, supply, &ids).await;
        let run = self
            .paused
            .take()
            .ok_or_else(|| ModelError::Input("pipelined decode: the pause was lost".into()))?;
        supplied?;
        let missing = self.missing(&run.need);
        if !missing.is_empty() {
            return Err(ModelError::Source(format!(
                "the supply did not return {missing:?}"
            )));
        }
        Ok(run)
    }

    /// Before running layer `l`'s experts again for `run` (after a miss):
    /// its input rows as its `expert_up` saved them into the route buffer
    /// `run.set` (the o_proj shares included, so those are cleared).
    fn restore_row(&self, enc: &mut wgpu::CommandEncoder, l: usize, run: &Run) {
        enc.copy_buffer_to_buffer(
            &self.layers[l].route[run.set],
            u64::from(self.p_exp.save_x) * 4,
            &self.x,
            0,
            (run.n * self.cfg.hidden_size * 4) as u64,
        );
        enc.clear_buffer(&self.part, 0, None);
    }

    /// A submitted decode chunk dropped: the position rolled back (its cache
    /// rows lie past it and are overwritten later), its token not counted
    /// (its dispatches and submission are).
    fn discard_decoded(&mut self) {
        self.rollback_decoded();
        self.stats.discarded_chunks += 1;
    }

    /// Undo the position and counters of a decoded chunk that runs again
    /// (it missed an expert).
    fn rollback_decoded(&mut self) {
        self.pos -= 1;
        self.stats.tokens -= 1;
        self.stats.steps -= 1;
    }

    /// The last token's logits and its greedy pick into `argmax_out` (two
    /// dispatches): `argmax_embed` where the engine has it (it also writes
    /// the picked token's embedding for the next step), `argmax` otherwise.
    fn encode_greedy_head(&self, pass: &mut wgpu::ComputePass<'_>, n: u32) {
        self.k
            .head
            .encode(pass, &self.bg_head_last, &self.p_head_last, n);
        self.encode_pick(pass);
    }

    /// The greedy pick of the last logits into `argmax_out`: `argmax_embed`
    /// where the engine has it, `argmax` otherwise.
    fn encode_pick(&self, pass: &mut wgpu::ComputePass<'_>) {
        match (&self.k.argmax_embed, &self.bg_argmax_embed) {
            (Some(ke), Some(bg)) => ke.encode(pass, bg),
            _ => self.k.argmax.encode(pass, &self.bg_argmax),
        }
    }

    /// [`Engine::submit_decoded`] for `run` into `pipe_rb[slot]`, in flight.
    fn launch_decoded(&mut self, run: Run, slot: usize) -> InFlight {
        let (map, checked) = self.submit_decoded(&run, slot);
        InFlight {
            run,
            map,
            checked,
            dead: false,
        }
    }

    /// Encode and submit one decoded token's chunk at `self.pos` (its
    /// embedding already in `x`, or from the layer it missed an expert in,
    /// [`At::Redo`]; route buffers `run.set`), its sampled id
    /// copied into `pipe_rb[slot]`, followed by the routes of the layers
    /// that lack experts (returned), whose mapping starts; advances the
    /// position.
    fn submit_decoded(&mut self, run: &Run, slot: usize) -> (Mapping, Vec<usize>) {
        self.write_step(run);
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        let mut checked = Vec::new();
        // A token that missed an expert runs again from that layer's saved
        // input row (as `advance` resumes a paused step).
        let redo = match run.at {
            At::Redo(l) => {
                self.pool.touch(run.need.iter().copied());
                self.restore_row(&mut enc, l, run);
                Some(l)
            }
            _ => None,
        };
        {
            let mut pass = enc
                .begin_compute_pass(&Default::default())
                .forget_lifetime();
            for l in redo.unwrap_or(0)..self.layers.len() {
                if redo == Some(l) {
                    self.stats.dispatches += self.encode_shared_up(&mut pass, l, 1);
                } else {
                    self.stats.dispatches += self.encode_attention(&mut pass, l, 1);
                }
                if self.pool.layer_resident(l) {
                    let ids: Vec<ExpertId> = self.layer_ids(l).collect();
                    self.pool.touch(ids);
                } else {
                    checked.push(l);
                }
                self.encode_experts(&mut pass, l, run);
            }
            self.encode_greedy_head(&mut pass, 1);
            self.stats.dispatches += 2;
        }
        let rb = &self.pipe_rb[slot];
        enc.copy_buffer_to_buffer(&self.argmax_out, 0, rb, 0, 4);
        let route_bytes = (self.cfg.num_local_experts * 2 * 4) as u64;
        for (i, &l) in checked.iter().enumerate() {
            let at = 4 + i as u64 * route_bytes;
            enc.copy_buffer_to_buffer(&self.layers[l].route[run.set], 0, rb, at, route_bytes);
        }
        let bytes = 4 + checked.len() as u64 * route_bytes;
        let index = self.ctx.queue.submit([enc.finish()]);
        self.stats.submissions += 1;
        self.stats.steps += 1;
        self.stats.tokens += 1;
        self.pos += 1;
        (self.ctx.begin_map(rb, bytes, Some(index)), checked)
    }
}

impl crate::model::Engine for Engine {
    /// Start a step. Errors ([`ModelError::Input`]) while another step is
    /// paused: resume or cancel that one first.
    async fn step(
        &mut self,
        tokens: &[u32],
        opts: &RunOptions,
        want: Want,
    ) -> Result<Step, ModelError> {
        let run = self.start(tokens, opts, want)?;
        self.drive(run).await
    }

    async fn resume(&mut self) -> Result<Step, ModelError> {
        let run = self
            .paused
            .take()
            .ok_or_else(|| ModelError::Input("resume: no step is paused".into()))?;
        self.drive(run).await
    }

    fn supply_expert(&mut self, id: ExpertId, weights: ExpertWeights) -> Result<(), ModelError> {
        Engine::supply_expert(self, id, weights)
    }

    fn cancel(&mut self) {
        self.paused = None;
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

/// Native blocking conveniences: one [`run_step`] under `pollster`, with the
/// experts from `source` (any [`ExpertSource`] is a [`Supply`]).
#[cfg(not(target_arch = "wasm32"))]
impl Engine {
    /// Append `tokens`, return the output `want` asks for.
    pub fn run_blocking<S: Supply + ?Sized>(
        &mut self,
        source: &mut S,
        tokens: &[u32],
        opts: &RunOptions,
        want: Want,
    ) -> Result<Output, ModelError> {
        pollster::block_on(run_step(self, source, tokens, opts, want))
    }

    /// Append `tokens`, return the last position's logits.
    pub fn forward<S: Supply + ?Sized>(
        &mut self,
        source: &mut S,
        tokens: &[u32],
        opts: &RunOptions,
    ) -> Result<Vec<f32>, ModelError> {
        match self.run_blocking(source, tokens, opts, Want::Logits)? {
            Output::Logits(l) => Ok(l),
            _ => Err(GpuError::Readback("unexpected output".into()).into()),
        }
    }

    /// Append `tokens`, return the greedy next token (argmax on the GPU;
    /// only its id is read back).
    pub fn next_token<S: Supply + ?Sized>(
        &mut self,
        source: &mut S,
        tokens: &[u32],
        opts: &RunOptions,
    ) -> Result<u32, ModelError> {
        match self.run_blocking(source, tokens, opts, Want::Greedy)? {
            Output::Token(t) => Ok(t),
            _ => Err(GpuError::Readback("unexpected output".into()).into()),
        }
    }

    /// Append `tokens`, return every position's logits (tests, eval loss).
    pub fn forward_all_logits<S: Supply + ?Sized>(
        &mut self,
        source: &mut S,
        tokens: &[u32],
        opts: &RunOptions,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        match self.run_blocking(source, tokens, opts, Want::AllLogits)? {
            Output::AllLogits(a) => Ok(a),
            _ => Err(GpuError::Readback("unexpected output".into()).into()),
        }
    }

    /// Greedy decoding: feed `prompt`, then `steps` sampled tokens one at a
    /// time; `on_token` sees each one. Returns the generated ids.
    pub fn generate_greedy<S: Supply + ?Sized>(
        &mut self,
        source: &mut S,
        prompt: &[u32],
        steps: usize,
        opts: &RunOptions,
        mut on_token: impl FnMut(u32),
    ) -> Result<Vec<u32>, ModelError> {
        let mut out = Vec::with_capacity(steps);
        if steps == 0 {
            return Ok(out);
        }
        let mut tok = self.next_token(source, prompt, opts)?;
        loop {
            out.push(tok);
            on_token(tok);
            if out.len() == steps {
                return Ok(out);
            }
            tok = self.next_token(source, &[tok], opts)?;
        }
    }
}

/// The kernels of a greedily decoded token, timed one at a time
/// ([`Engine::kernel_times`]): layer 0's attention (the fused decode
/// attention, or its kernels and the router when unfused), `expert_up`,
/// `expert_down` (with the shared expert's), then the head and the argmax.
#[cfg(not(target_arch = "wasm32"))]
pub const DECODE_KERNELS: [&str; 5] =
    ["attention", "expert_up", "expert_down", "lm_head", "argmax"];

#[cfg(not(target_arch = "wasm32"))]
impl Engine {
    /// Wall seconds per dispatch of each of [`DECODE_KERNELS`], each
    /// dispatched `reps` times in one pass and one submission (after two
    /// warm-up dispatches), on whatever the buffers hold (run it after a
    /// decode, with every expert resident, so that they hold a token's data:
    /// layer 0's expert_down adds into the hidden state each time, so the
    /// engine is [`Engine::reset`] afterwards). Where a decoded token's time
    /// goes, kernel by kernel (`layers x` the first three, plus the last two,
    /// plus what a submission and its readback cost).
    pub fn kernel_times(&mut self, reps: usize) -> Vec<(&'static str, f64)> {
        let k = self.cfg.num_experts_per_tok.min(self.cfg.num_local_experts);
        let run = Run {
            tokens: vec![0],
            k,
            use_moe: true,
            want: Want::Greedy,
            cap: 1,
            done: 0,
            n: 1,
            at: At::Chunk,
            need: Vec::new(),
            ahead: Vec::new(),
            all: Vec::new(),
            set: 0,
        };
        let pos = self.pos.min(self.opts.max_seq - 1);
        self.pos = pos;
        self.write_step(&run);
        let saved = self.stats.clone();
        let mut out = Vec::new();
        for (i, name) in DECODE_KERNELS.into_iter().enumerate() {
            let mut time = |n: usize| {
                let mut enc = self.ctx.device.create_command_encoder(&Default::default());
                {
                    let mut pass = enc
                        .begin_compute_pass(&Default::default())
                        .forget_lifetime();
                    for _ in 0..n {
                        match i {
                            0 => {
                                self.encode_attention(&mut pass, 0, 1);
                            }
                            1 => self.encode_up(&mut pass, 0, &run),
                            2 => self.encode_down(&mut pass, 0, &run),
                            3 => self.k.head.encode(
                                &mut pass,
                                &self.bg_head_last,
                                &self.p_head_last,
                                1,
                            ),
                            _ => self.encode_pick(&mut pass),
                        }
                    }
                }
                let t = std::time::Instant::now();
                self.ctx.queue.submit([enc.finish()]);
                let _ = self.ctx.device.poll(wgpu::PollType::wait_indefinitely());
                t.elapsed().as_secs_f64()
            };
            time(2);
            let reps = reps.max(1);
            out.push((name, time(reps) / reps as f64));
        }
        self.stats = saved;
        self.reset();
        out
    }
}

/// The engine with an attached expert source, as a blocking
/// [`crate::model::Forward`] (native; e.g. the CLI's `--device gpu`).
#[cfg(not(target_arch = "wasm32"))]
#[derive(Debug)]
pub struct Attached<S> {
    pub engine: Engine,
    pub source: S,
}

#[cfg(not(target_arch = "wasm32"))]
impl<S: ExpertSource> Forward for Attached<S> {
    fn run(&mut self, tokens: &[u32], opts: &RunOptions, want: Want) -> Result<Output, ModelError> {
        self.engine
            .run_blocking(&mut self.source, tokens, opts, want)
    }

    fn reset(&mut self) {
        self.engine.reset();
    }

    fn position(&self) -> usize {
        self.engine.position()
    }

    fn config(&self) -> &Config {
        self.engine.config()
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

#[cfg(test)]
mod host_cache_tests {
    use super::*;

    fn id(e: usize) -> ExpertId {
        ExpertId::new(0, e)
    }

    fn bytes(n: usize) -> (Vec<u8>, Vec<u8>) {
        (vec![1; n], vec![2; n])
    }

    #[test]
    fn keeps_the_most_recently_evicted_within_its_budget() {
        let mut h = HostCache {
            budget: 40,
            resident: vec![None; 2],
            ..HostCache::default()
        };
        // Slot 0 holds experts 0, 1, 2, 3 in turn; slot 1 holds 9.
        let (a, b) = bytes(10);
        h.place(0, a, b, None);
        let (a, b) = bytes(10);
        h.place(1, a, b, None);
        assert_eq!(h.evicted_bytes, 0, "resident copies are not counted");
        for e in 1..4 {
            let (a, b) = bytes(10);
            h.place(0, a, b, Some(id(e - 1)));
            assert_eq!(h.evicted_bytes, (20 * e as u64).min(40));
        }
        // Expert 0 (evicted first) was dropped for expert 2.
        assert!(h.take(id(0)).is_none());
        assert_eq!(h.take(id(1)), Some(bytes(10)));
        assert_eq!(h.evicted_bytes, 20);
        assert!(h.take(id(1)).is_none(), "taken once");
        // Evicted again (after a write-back): one copy, counted once.
        let (a, b) = bytes(10);
        h.place(0, a, b, Some(id(2)));
        assert_eq!(h.evicted_bytes, 20);
        assert_eq!(h.evicted.len(), 1);
    }

    #[test]
    fn an_expert_larger_than_the_budget_or_a_budget_of_zero_keeps_nothing() {
        let mut h = HostCache {
            budget: 15,
            resident: vec![None; 1],
            ..HostCache::default()
        };
        let (a, b) = bytes(10);
        h.place(0, a, b, None);
        let (a, b) = bytes(10);
        h.place(0, a, b, Some(id(0)));
        assert!(h.evicted.is_empty());
        assert_eq!(h.evicted_bytes, 0);
        let mut off = HostCache::default();
        assert!(!off.on());
        off.place(0, vec![1], vec![2], Some(id(0)));
        assert!(off.take(id(0)).is_none());
    }
}
