//! `relay serve --addr 127.0.0.1:8080 --data ./data --web dist --model models/default`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use relay::server::ServeConfig;

#[derive(Parser)]
#[command(
    name = "relay",
    about = "AI-Block relay: stores the chain, serves the REST API and the web app"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the chain, the REST API and the web app.
    Serve {
        /// Address to listen on (port 0 picks a free port; the URL is printed).
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: SocketAddr,
        /// Data directory: block files, index, operator key.
        #[arg(long, default_value = "./data")]
        data: PathBuf,
        /// Static files of the web app (trunk's dist/).
        #[arg(long, default_value = "dist")]
        web: PathBuf,
        /// Genesis model (Hugging Face dir) used when the chain is empty.
        #[arg(long, default_value = "models/default")]
        model: PathBuf,
        /// Acceptance gate for new versions of a slot: `quality` recomputes the
        /// public-eval loss (see relay::quality); `accept-all` only validates.
        #[arg(long, default_value = "quality", value_parser = ["quality", "accept-all"])]
        gate: String,
    },
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_http=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let Cli {
        cmd:
            Cmd::Serve {
                addr,
                data,
                web,
                model,
                gate,
            },
    } = Cli::parse();
    let cfg = ServeConfig {
        data_dir: data.clone(),
        web_dir: Some(web.clone()),
        model_dir: Some(model),
    };
    if !web.join("index.html").is_file() {
        tracing::warn!(web = %web.display(), "no index.html in the web dir (build the web app with trunk)");
    }
    let state = tokio::task::spawn_blocking(move || relay::open_relay(&cfg))
        .await?
        .with_context(|| format!("opening the relay data in {}", data.display()))?;
    let state = if gate == "quality" {
        state.with_gate(Arc::new(relay::quality::QualityGate::default()))
    } else {
        tracing::warn!("quality gate off: every valid block is accepted");
        state
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;
    println!("relay listening on http://{local}");
    tracing::info!(%local, "listening");
    axum::serve(listener, relay::app(Arc::new(state)))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}
