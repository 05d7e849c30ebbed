//! Where a chat's engine gets what it asks for: expert weights from the
//! relay's store (`/chat`), or expert outputs (`/chat/distributed`) from
//! peers through [`ExpertCompute`], one layer's jobs in parallel, with the
//! relay's own computation as the fallback.
//!
//! Layer: handlers (a part of [`super`]'s). May import: `chat`, `compute`,
//! `http`, `store`, and [`super`].

use std::collections::BTreeMap;
use std::sync::Arc;

use web_node::model::reference::expert_forward;
use web_node::model::{ExpertId, ExpertJob, ExpertWeights, ModelError, Supply};
use web_node::net::api::{codes, ApiError};
use web_node::net::chat::{ComputedBy, Failover, RELAY};
use web_node::net::peer::PeerId;

use crate::chat::LoadedModel;
use crate::compute::ExpertCompute;
use crate::http::HttpError;
use crate::store::RelayStore;

/// Threads of a local fallback computation (it runs on the request's own
/// blocking thread; the products of the default model are below the size
/// that splits them anyway).
const FALLBACK_THREADS: usize = 1;

/// Remote computation settings and what happened.
pub(super) struct Remote {
    compute: Arc<dyn ExpertCompute>,
    local_fallback: bool,
    /// (layer, expert, by) → (block hex, calls, rows).
    computed: BTreeMap<(usize, usize, String), (String, u64, u64)>,
    /// (layer, expert, peer) → (count, last reason).
    failovers: BTreeMap<(usize, usize, String), (u64, String)>,
    /// Why the request must answer 503 (no peer, no fallback).
    unavailable: Option<String>,
}

impl Remote {
    pub(super) fn new(compute: Arc<dyn ExpertCompute>, local_fallback: bool) -> Self {
        Self {
            compute,
            local_fallback,
            computed: BTreeMap::new(),
            failovers: BTreeMap::new(),
            unavailable: None,
        }
    }

    fn computed(&mut self, id: ExpertId, block: String, by: String, rows: usize) {
        let e = self
            .computed
            .entry((id.layer, id.expert, by))
            .or_insert((block, 0, 0));
        e.1 += 1;
        e.2 += rows as u64;
    }

    fn failed(&mut self, id: ExpertId, failed: &[(PeerId, String)]) {
        for (peer, why) in failed {
            let e = self
                .failovers
                .entry((id.layer, id.expert, hex::encode(peer)))
                .or_insert((0, String::new()));
            e.0 += 1;
            e.1.clone_from(why);
        }
    }
}

/// The [`Supply`] of one chat request.
pub(super) struct ChatSupply {
    model: Arc<LoadedModel>,
    store: Arc<dyn RelayStore>,
    remote: Option<Remote>,
}

impl ChatSupply {
    pub(super) fn new(
        model: Arc<LoadedModel>,
        store: Arc<dyn RelayStore>,
        remote: Option<Remote>,
    ) -> Self {
        Self {
            model,
            store,
            remote,
        }
    }

    /// The HTTP error of a failed generation.
    pub(super) fn error_of(&self, e: ModelError) -> HttpError {
        if let Some(why) = self.remote.as_ref().and_then(|r| r.unavailable.as_deref()) {
            return super::no_peer(why);
        }
        match e {
            ModelError::Input(m) => ApiError::malformed(m).into(),
            e => {
                tracing::error!(error = %e, "chat generation failed");
                ApiError::new(codes::INTERNAL, format!("generation failed: {e}")).into()
            }
        }
    }

    /// `computed_by` and `failovers` of a distributed request.
    pub(super) fn report(&self) -> (Option<Vec<ComputedBy>>, Option<Vec<Failover>>) {
        let Some(r) = &self.remote else {
            return (None, None);
        };
        let by = r
            .computed
            .iter()
            .map(|((layer, expert, by), (block, calls, rows))| ComputedBy {
                layer: *layer,
                expert: *expert,
                block: block.clone(),
                by: by.clone(),
                calls: *calls,
                rows: *rows,
            })
            .collect();
        let fo = r
            .failovers
            .iter()
            .map(|((layer, expert, peer), (count, reason))| Failover {
                layer: *layer,
                expert: *expert,
                peer: peer.clone(),
                reason: reason.clone(),
                count: *count,
            })
            .collect();
        (Some(by), Some(fo))
    }

    /// Run one expert here, on the relay's verified weights.
    fn local(&self, job: &ExpertJob) -> Result<Vec<f32>, ModelError> {
        let w = self.model.expert(&*self.store, job.id)?;
        Ok(expert_forward(&w, &job.input, job.rows, FALLBACK_THREADS))
    }
}

/// A peer's output is used only if it has the right length and is finite;
/// otherwise the expert counts as failed on that peer.
fn check_output(out: &[f32], rows: usize, hidden: usize) -> Result<(), String> {
    if out.len() != rows * hidden {
        return Err(format!(
            "answered {} values, expected {rows} × {hidden}",
            out.len()
        ));
    }
    if out.iter().any(|v| !v.is_finite()) {
        return Err("answered a value that is not finite".into());
    }
    Ok(())
}

impl Supply for ChatSupply {
    async fn experts(
        &mut self,
        need: &[ExpertId],
    ) -> Result<Vec<(ExpertId, ExpertWeights)>, ModelError> {
        // Copied once per expert per model: later requests share the cache.
        need.iter()
            .map(|&id| {
                Ok((
                    id,
                    ExpertWeights::clone(&*self.model.expert(&*self.store, id)?),
                ))
            })
            .collect()
    }

    /// One layer's jobs go out in parallel. A peer has a bounded number of
    /// computations in flight (its credits), so a job that found no free
    /// holder while others of the same wave were answered goes out again in
    /// the next wave; what no peer computes falls back to the relay (or
    /// fails the request when the fallback is off).
    async fn compute(
        &mut self,
        jobs: Vec<ExpertJob>,
    ) -> Result<Vec<(ExpertId, Vec<f32>)>, ModelError> {
        let hidden = self.model.chain.config.hidden_size;
        let outside =
            || ModelError::Source("expert outputs asked for outside /chat/distributed".into());
        let compute = self.remote.as_ref().ok_or_else(outside)?.compute.clone();
        let mut pending = Vec::with_capacity(jobs.len());
        for j in jobs {
            let block = self.model.expert_block(j.id)?;
            pending.push((j, block));
        }
        let rows_u32 = |rows: usize| u32::try_from(rows).unwrap_or(u32::MAX);
        let mut out = Vec::with_capacity(pending.len());
        while !pending.is_empty() {
            let answers = futures_util::future::join_all(
                pending
                    .iter()
                    .map(|(j, b)| compute.compute(*b, rows_u32(j.rows), j.input.clone())),
            )
            .await;
            let progress = answers.iter().any(Result::is_ok);
            let mut again = Vec::new();
            for ((job, block), answer) in pending.into_iter().zip(answers) {
                let remote = self.remote.as_mut().ok_or_else(outside)?;
                let why = match answer {
                    Ok(a) => {
                        remote.failed(job.id, &a.failed);
                        match check_output(&a.output, job.rows, hidden) {
                            Ok(()) => {
                                remote.computed(
                                    job.id,
                                    block.to_hex(),
                                    hex::encode(a.peer),
                                    job.rows,
                                );
                                out.push((job.id, a.output));
                                continue;
                            }
                            Err(why) => {
                                remote.failed(job.id, &[(a.peer, why.clone())]);
                                why
                            }
                        }
                    }
                    // Nobody was tried: holders may only be out of credits.
                    Err(f) if f.failed.is_empty() && progress => {
                        again.push((job, block));
                        continue;
                    }
                    Err(f) => {
                        remote.failed(job.id, &f.failed);
                        f.message
                    }
                };
                if !remote.local_fallback {
                    let msg = format!("{}: {why}", job.id);
                    remote.unavailable = Some(msg.clone());
                    return Err(ModelError::Source(msg));
                }
                tracing::debug!(expert = %job.id, %why, "no peer computed the expert; computing it here");
                remote.computed(job.id, block.to_hex(), RELAY.into(), job.rows);
                out.push((job.id, self.local(&job)?));
            }
            pending = again;
        }
        Ok(out)
    }
}
