//! Signing test blocks outside web-node: [`signer`], the fixed signer of
//! test chains. The signed tiny chain itself lives once, in web-node's own
//! unit tests (`web_node::test_chain`, `#[cfg(test)]`): no test outside
//! web-node uses one.

use ed25519_dalek::SigningKey;
use web_node::model::checkpoint::Signer;

/// A signer of test blocks: address `alice`, a fixed timestamp
/// (2023-11-14), 4 KiB chunks.
pub fn signer(key: &SigningKey) -> Signer<'_> {
    Signer {
        key,
        address: "alice".into(),
        timestamp_ms: 1_700_000_000_000,
        chunk_size: 4096,
    }
}
