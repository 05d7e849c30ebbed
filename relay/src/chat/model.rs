//! The chat model: built from the store's current heads, cached, rebuilt
//! when a head moves; expert weights loaded from the store on first use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use web_node::chain::BlockHash;
use web_node::chain_model::{ChainModel, NodeError};
use web_node::model::reference::CpuEngine;
use web_node::model::{ExpertId, ExpertWeights, ModelError};
use web_node::net::api::{codes, ApiError};

use crate::chain_index::ChainState;
use crate::http::HttpError;
use crate::store::RelayStore;

/// The model of one set of heads, shared by every request that runs on it.
pub struct LoadedModel {
    /// Meta block, heads, config, tokenizer and the engine every request forks.
    pub chain: ChainModel,
    /// Expert weights read so far (each read once per model).
    experts: Mutex<HashMap<ExpertId, Arc<ExpertWeights>>>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("chain", &self.chain)
            .finish_non_exhaustive()
    }
}

impl LoadedModel {
    pub fn new(chain: ChainModel) -> Self {
        Self {
            chain,
            experts: Mutex::new(HashMap::new()),
        }
    }

    /// A fresh engine for one request: the shared weights and every expert
    /// loaded so far, shared (not copied); an empty KV cache.
    pub fn engine(&self) -> CpuEngine {
        let mut e = self.chain.engine.fork();
        let held: Vec<(ExpertId, Arc<ExpertWeights>)> = self
            .experts
            .lock()
            .map(|m| m.iter().map(|(k, v)| (*k, v.clone())).collect())
            .unwrap_or_default();
        for (id, w) in held {
            // Checked when first loaded; cannot fail on the same config.
            if let Err(err) = e.insert_shared_expert(id, w) {
                tracing::error!(expert = %id, error = %err, "cached expert refused");
            }
        }
        e
    }

    /// The head block of an expert slot.
    pub fn expert_block(&self, id: ExpertId) -> Result<BlockHash, ModelError> {
        self.chain
            .expert_block(id)
            .ok_or_else(|| ModelError::Source(format!("{id}: no head block")))
    }

    /// An expert's weights: cached, or read from the store (a verified read:
    /// every chunk checked against the stored chunk list) and cached.
    pub fn expert(
        &self,
        store: &dyn RelayStore,
        id: ExpertId,
    ) -> Result<Arc<ExpertWeights>, ModelError> {
        if let Some(w) = self.experts.lock().ok().and_then(|m| m.get(&id).cloned()) {
            return Ok(w);
        }
        let block = self.expert_block(id)?;
        let payload = store
            .payload(&block)
            .map_err(|e| ModelError::Source(format!("{id} (block {block}): {e}")))?;
        let w = Arc::new(self.chain.expert_weights(id, &payload)?);
        if let Ok(mut m) = self.experts.lock() {
            m.insert(id, w.clone());
        }
        Ok(w)
    }

    /// Experts whose weights are loaded.
    pub fn experts_loaded(&self) -> usize {
        self.experts.lock().map(|m| m.len()).unwrap_or(0)
    }
}

/// Models kept built at once (each caches the experts it has read).
const MODELS_KEPT: usize = 4;

/// The models of the current heads, rebuilt when their heads change; the
/// least recently used is dropped past [`MODELS_KEPT`].
#[derive(Default)]
pub(super) struct ModelCache {
    current: tokio::sync::Mutex<Vec<Arc<LoadedModel>>>,
}

impl ModelCache {
    pub(super) async fn get(
        &self,
        chain: &Arc<tokio::sync::RwLock<ChainState>>,
        store: &Arc<dyn RelayStore>,
        model: Option<&str>,
    ) -> Result<Arc<LoadedModel>, HttpError> {
        // Held while building, so concurrent requests build once.
        let mut current = self.current.lock().await;
        let meta_hash = {
            let chain = chain.read().await;
            let meta = match model {
                None => chain.dag.latest_meta().ok_or_else(no_model)?,
                Some(sel) => chain.dag.find_meta(sel).ok_or_else(|| {
                    HttpError::from(ApiError::new(
                        codes::NOT_FOUND,
                        format!(
                            "the chain has no model {sel:?} (a meta block hash or a model name)"
                        ),
                    ))
                })?,
            };
            let heads = chain.dag.slot_heads(&meta.hash);
            if let Some(i) = current
                .iter()
                .position(|m| m.chain.meta == meta.hash && m.chain.heads == heads)
            {
                let m = current.remove(i);
                current.push(m.clone());
                return Ok(m);
            }
            meta.hash
        };
        let chain = chain.clone();
        let store = store.clone();
        let built = tokio::task::spawn_blocking(move || {
            let chain = chain.blocking_read();
            ChainModel::from_verified_meta(&chain.dag, Some(meta_hash), |h| {
                match store.payload(h) {
                    Ok(p) => Some(Arc::from(p)),
                    Err(e) => {
                        tracing::error!(block = %h, error = %e, "chat model: payload unreadable");
                        None
                    }
                }
            })
        })
        .await
        .map_err(|e| HttpError::from(ApiError::internal(format!("model build failed: {e}"))))?
        .map_err(|e| match e {
            NodeError::NoModel => no_model(),
            e => HttpError::unavailable(format!("the chain's model cannot be built: {e}"), 5),
        })?;
        tracing::info!(meta = %built.meta, name = %built.name, "chat model built from the chain's heads");
        let m = Arc::new(LoadedModel::new(built));
        current.retain(|c| c.chain.meta != meta_hash);
        if current.len() >= MODELS_KEPT {
            current.remove(0);
        }
        current.push(m.clone());
        Ok(m)
    }
}

fn no_model() -> HttpError {
    HttpError::with_status(
        ApiError::new(
            codes::UNAVAILABLE,
            "the relay's chain has no model yet (no chain-A meta block)",
        ),
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
    )
}
