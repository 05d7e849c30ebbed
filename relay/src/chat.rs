//! `POST /chat` and `POST /chat/distributed`: the engine run by the relay.

use axum::Router;

use crate::server::SharedState;

/// Chat state: the loaded model, generation limits.
#[derive(Debug, Default)]
pub struct ChatRuntime {}

/// `/chat` and `/chat/distributed`.
pub fn routes() -> Router<SharedState> {
    Router::new()
}
