//! The accept loop: HTTP/1.1 connections with limits.
//!
//! * At most `max_connections` open connections (lowered to stay
//!   [`FD_RESERVE`](super::limits::FD_RESERVE) descriptors under the
//!   process's limit) and `max_connections_per_ip` per client IP; a
//!   connection over a limit gets an immediate 503 with Retry-After.
//! * A request header must arrive within `header_timeout` of the connection's
//!   start or the previous response (hyper's header-read timer: slowloris).
//! * A connection with no request in flight and no bytes moving for
//!   `keepalive_timeout` is closed; so is one whose response writes make no
//!   progress for `write_timeout` (a client that stops reading). Upload bodies
//!   have their own idle timeout (`RelayOptions::body_idle_timeout`).
//! * A connection upgraded to a WebSocket (`/ws`, status 101) leaves these
//!   limits: hyper hands its socket to the peer layer, which releases the
//!   HTTP connection's slot and applies its own caps, idle timeout (pings)
//!   and write timeout; the keep-alive idle timer no longer applies to it.
//! * Running out of descriptors (EMFILE) pauses accepting briefly instead of
//!   spinning; connections already open keep being served.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt as _;

use crate::limits::{
    effective_max_connections, ServeOptions, ACCEPT_PAUSE, EMFILE_LOG_EVERY, MAX_REFUSING,
    REFUSE_TIMEOUT,
};

/// Bind a listener with an explicit backlog (tokio's default is 1024; the
/// kernel caps it at `net.core.somaxconn`).
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let s = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(backlog)
}

/// Per-IP connection counts; an entry lives while its IP has a connection.
#[derive(Default)]
struct PerIp {
    counts: Mutex<HashMap<IpAddr, usize>>,
}

struct IpSlot {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    fn acquire(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut t = self.counts.lock().ok()?;
        let n = t.entry(ip).or_insert(0);
        if *n >= max {
            if *n == 0 {
                t.remove(&ip);
            }
            return None;
        }
        *n += 1;
        Some(IpSlot {
            table: self.clone(),
            ip,
        })
    }

    fn len(&self) -> usize {
        self.counts.lock().map(|t| t.len()).unwrap_or(0)
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        if let Ok(mut t) = self.table.counts.lock() {
            if let Some(n) = t.get_mut(&self.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    t.remove(&self.ip);
                }
            }
        }
    }
}

/// Serve `router` on `listener` until `shutdown` resolves; then stop
/// accepting, let requests in flight finish for up to
/// `opts.shutdown_timeout`, and cut the connections still open (their
/// handlers are dropped: an upload cut this way removes its staged file).
/// Returns when every connection task has ended. See the module docs.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let max = effective_max_connections(opts.max_connections).max(1);
    if max < opts.max_connections {
        tracing::warn!(
            configured = opts.max_connections,
            max,
            "connection limit lowered to fit the file-descriptor limit"
        );
    }
    let total = Arc::new(Semaphore::new(max));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let per_ip = Arc::new(PerIp::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut last_emfile_log: Option<Instant> = None;
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        // Reap finished connection tasks so the set stays the size of what is open.
        while tasks.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                let fd = matches!(e.raw_os_error(), Some(23 | 24));
                if fd {
                    if last_emfile_log.is_none_or(|t| t.elapsed() > EMFILE_LOG_EVERY) {
                        tracing::warn!(error = %e, "out of file descriptors: pausing accept");
                        last_emfile_log = Some(Instant::now());
                    }
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                } else {
                    tracing::debug!(error = %e, "accept failed");
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let ip = peer.ip();
        let slot = match total.clone().try_acquire_owned() {
            Ok(p) => per_ip
                .acquire(ip, opts.max_connections_per_ip)
                .map(|s| (p, s))
                .ok_or("too many connections from your address"),
            Err(_) => Err("the relay is at its connection limit"),
        };
        match slot {
            Ok((permit, ip_slot)) => {
                let router = router.clone();
                let opts = opts.clone();
                let mut stop = stop_rx.clone();
                tasks.spawn(async move {
                    serve_connection(stream, peer, router, &opts, &mut stop).await;
                    drop(ip_slot);
                    drop(permit);
                });
            }
            Err(why) => {
                tracing::debug!(%peer, why, "connection refused");
                crate::metrics::conn_refused(why);
                if let Ok(p) = refusing.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        refuse(stream, why).await;
                        drop(p);
                    });
                }
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    tracing::info!(
        open = max - total.available_permits(),
        ips = per_ip.len(),
        "draining connections"
    );
    let drained = tokio::time::timeout(opts.shutdown_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            cut = tasks.len(),
            timeout_s = opts.shutdown_timeout.as_secs_f64(),
            "shutdown timeout: cutting the connections still open"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    Ok(())
}

/// A quick 503 for a connection over a limit, then close.
async fn refuse(mut stream: TcpStream, why: &str) {
    let body = format!(r#"{{"code":"unavailable","message":"{why}; retry later"}}"#);
    let msg = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSE_TIMEOUT, async {
        stream.write_all(msg.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sent so closing does not reset the answer away.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, io::Error>(())
    })
    .await;
}

/// Decrements the in-flight count when a request's handler finishes or is dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn start(c: &Arc<AtomicUsize>) -> Self {
        c.fetch_add(1, Ordering::SeqCst);
        Self(c.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    opts: &ServeOptions,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) {
    let inflight = Arc::new(AtomicUsize::new(0));
    let upgraded = Arc::new(AtomicBool::new(false));
    let io = TokioIo::new(TimeoutIo::new(
        stream,
        opts.keepalive_timeout,
        opts.write_timeout,
        inflight.clone(),
        upgraded.clone(),
    ));
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let guard = InFlight::start(&inflight);
        let call = router.clone().oneshot(req);
        let upgraded = upgraded.clone();
        async move {
            let r = call.await;
            if r.as_ref()
                .is_ok_and(|resp| resp.status() == axum::http::StatusCode::SWITCHING_PROTOCOLS)
            {
                // A WebSocket from now on: its idle time is the peer layer's.
                upgraded.store(true, Ordering::SeqCst);
            }
            drop(guard);
            r
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_timeout)
        .keep_alive(true)
        .serve_connection(io, svc)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        }
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// A TCP stream that fails reads when the connection sits idle (no request
/// in flight, nothing read or written for `idle`, not upgraded) and writes
/// that make no progress for `write_timeout`.
struct TimeoutIo {
    inner: TcpStream,
    idle: Duration,
    write_timeout: Duration,
    inflight: Arc<AtomicUsize>,
    upgraded: Arc<AtomicBool>,
    last: Instant,
    idle_sleep: Pin<Box<Sleep>>,
    write_sleep: Option<Pin<Box<Sleep>>>,
}

impl TimeoutIo {
    fn new(
        inner: TcpStream,
        idle: Duration,
        write_timeout: Duration,
        inflight: Arc<AtomicUsize>,
        upgraded: Arc<AtomicBool>,
    ) -> Self {
        let now = Instant::now();
        Self {
            inner,
            idle,
            write_timeout,
            inflight,
            upgraded,
            last: now,
            idle_sleep: Box::pin(tokio::time::sleep_until(now + idle)),
            write_sleep: None,
        }
    }

    fn write_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let t = self.write_timeout;
        let s = self
            .write_sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(t)));
        if s.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "response write made no progress",
            )));
        }
        Poll::Pending
    }

    fn wrote(&mut self, r: &io::Result<usize>) {
        self.write_sleep = None;
        if matches!(r, Ok(n) if *n > 0) {
            self.last = Instant::now();
        }
    }
}

impl AsyncRead for TimeoutIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.last = Instant::now();
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                if this.inflight.load(Ordering::SeqCst) == 0
                    && !this.upgraded.load(Ordering::SeqCst)
                {
                    let deadline = this.last + this.idle;
                    if this.idle_sleep.deadline() != deadline {
                        this.idle_sleep.as_mut().reset(deadline);
                    }
                    if this.idle_sleep.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "idle connection closed",
                        )));
                    }
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for TimeoutIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(r) => {
                this.wrote(&r);
                Poll::Ready(r)
            }
            Poll::Pending => this.write_pending(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                this.wrote(&r);
                Poll::Ready(r)
            }
            Poll::Pending => this.write_pending(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
