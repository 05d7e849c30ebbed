//! Blocks accepted by other relays on the same database.
//!
//! A dedicated connection (outside the pool) runs `LISTEN aiblock_blocks`;
//! each commit notifies it with the block's position ([`crate::store::pg`]).
//! On a notification, and on every (re)connect, the follower reads the
//! blocks after the last position it saw, skips the ones its chain already
//! has (its own uploads), and for each new one reads the payload (every chunk
//! checked against the chunk list), validates the block against its chain
//! (signature, hashes, DAG links, config) exactly as an upload is validated,
//! and indexes it: listed, served and announced to its peers. A block that
//! does not validate is logged and left out. No polling: a lost connection is
//! re-opened (with backoff) and the catch-up covers what was missed.

use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;
use web_node::chain::{validate_block, Block, ChainId};

use crate::auth::MetaWriters;
use crate::state::SharedCore;
use crate::store::pg::BLOCKS_CHANNEL;

/// First wait after a lost listener connection; doubles up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(250);
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Run the follower for as long as the relay runs.
pub fn spawn(state: SharedCore) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(state))
}

async fn run(state: SharedCore) {
    let Some(url) = state.pg.as_ref().map(|p| p.url().to_string()) else {
        return;
    };
    let mut last: Option<u64> = None;
    let mut backoff = FIRST_BACKOFF;
    loop {
        match listen(&state, &url, &mut last).await {
            Ok(()) => backoff = FIRST_BACKOFF,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "block follower: connection lost");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One listener connection: LISTEN, catch up, then catch up on each
/// notification until the connection ends.
async fn listen(state: &SharedCore, url: &str, last: &mut Option<u64>) -> Result<(), String> {
    let (client, mut conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| e.to_string())?;
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(_)) => {
                    // A full channel already means "catch up": one is enough.
                    let _ = tx.try_send(());
                }
                Ok(_) => {}
                Err(e) => return e.to_string(),
            }
        }
        "the server closed the connection".to_string()
    });
    client
        .batch_execute(&format!("LISTEN {BLOCKS_CHANNEL}"))
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!("block follower: listening for blocks accepted by other relays");
    catch_up(state, last).await;
    while rx.recv().await.is_some() {
        catch_up(state, last).await;
    }
    let why = driver.await.unwrap_or_else(|e| e.to_string());
    Err(why)
}

/// Index the blocks committed after `last` (see the module docs).
pub async fn catch_up(state: &SharedCore, last: &mut Option<u64>) {
    // Uploads on this relay index under the same lock: a block is either
    // indexed by its upload or found here, never half of each.
    let _commit = state.commit_lock().await;
    let store = state.store.clone();
    let after = *last;
    let blocks = match tokio::task::spawn_blocking(move || store.list_after(after)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "block follower: listing new blocks failed");
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "block follower: task failed");
            return;
        }
    };
    for (seq, b) in blocks {
        *last = Some(seq);
        if state.chain.read().await.dag.get(&b.hash).is_some() {
            continue;
        }
        match adopt(state, &b).await {
            Ok(()) => {
                tracing::info!(block = %b.hash, chain = ?b.header.chain, slot = %b.header.name, "block accepted by another relay indexed")
            }
            Err(e) => {
                tracing::error!(block = %b.hash, slot = %b.header.name, error = %e, "block from the database does not validate: not served")
            }
        }
    }
}

async fn adopt(state: &SharedCore, b: &Block) -> Result<(), String> {
    let store = state.store.clone();
    let hash = b.hash;
    let payload = tokio::task::spawn_blocking(move || store.payload(&hash))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let mut chain = state.chain.write().await;
    let v = validate_block(b, &payload, &chain.dag).map_err(|e| e.to_string())?;
    let writers = (b.header.chain == ChainId::A).then(|| MetaWriters::of(b, &payload));
    chain.insert(&v, writers);
    drop(chain);
    state.block_added(b);
    Ok(())
}
