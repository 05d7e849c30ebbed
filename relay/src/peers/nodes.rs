//! The `POST /p2p/register` registry: registered nodes and the per-IP
//! registration rate, held by [`super::Peers`]; the handlers are in
//! [`super::p2p`].
//!
//! Layer: peer core. Imports only [`crate::limits`] (rate tables).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::limits::{Rate, RateTable};

/// Registrations per client IP in a burst, and sustained per minute.
pub const REGISTER_BURST: u32 = 30;
pub const REGISTER_PER_MINUTE: u32 = 60;
/// IPs the registration rate table tracks at most.
pub const REGISTER_RATE_TABLE: usize = 4096;

/// One registered node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RegisteredNode {
    pub node_id: String,
    pub host: String,
    pub port: u16,
    pub available_experts: Vec<String>,
    /// Hex key the id is bound to, if it was registered signed.
    pub owner: Option<String>,
    /// Unix ms of the first registration and of the last one.
    pub registered_at_ms: u64,
    pub updated_at_ms: u64,
    #[serde(skip)]
    pub(crate) owner_key: Option<[u8; 32]>,
}

/// Registered nodes, per-IP registration rate.
pub struct Registry {
    pub(crate) nodes: Mutex<BTreeMap<String, RegisteredNode>>,
    pub(crate) rate: RateTable<IpAddr>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            nodes: Mutex::new(BTreeMap::new()),
            rate: RateTable::new(
                Rate {
                    burst: REGISTER_BURST,
                    per_minute: REGISTER_PER_MINUTE,
                },
                REGISTER_RATE_TABLE,
            ),
        }
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    /// Registered nodes now.
    pub fn len(&self) -> usize {
        self.nodes.lock().map(|n| n.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, id: &str) -> Option<RegisteredNode> {
        self.nodes.lock().ok()?.get(id).cloned()
    }
}
