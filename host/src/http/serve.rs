//! Serving connections with hyper directly: header-read, keep-alive idle and write timeouts,
//! a connection cap, and connection tracking for graceful shutdown.
//!
//! `axum::serve` runs hyper without a timer and without a handle on its connections, so a
//! client sending half its headers, or never reading its reply, would hold a connection
//! forever. Here every connection is driven by a small loop that knows, from its I/O and its
//! requests, whether it is reading a header, idle between requests, or busy with one.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Sleep;
use tower::ServiceExt;

use crate::config::ServerConfig;

/// The connection-level limits of `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// From a request's first byte to the end of its header.
    pub header_read: Duration,
    /// A kept-alive connection with no request in flight is closed after this.
    pub keepalive: Duration,
    /// A write the client does not take for this long closes the connection.
    pub write: Duration,
    /// Connections open at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Header fields per request.
    pub max_headers: usize,
    /// Bytes of request line and header section.
    pub max_header_bytes: usize,
}

impl ConnectionLimits {
    /// The limits configured in `[server]`.
    pub fn of(server: &ServerConfig) -> Self {
        Self {
            header_read: server.header_read_timeout,
            keepalive: server.keepalive_timeout,
            write: server.write_timeout,
            max_connections: server.max_connections,
            max_headers: server.max_headers,
            // hyper refuses a buffer under 8 KiB; the config check does too.
            max_header_bytes: server.max_header_bytes.max(8192),
        }
    }
}

/// What one connection's I/O and requests tell its driver. Times are milliseconds since
/// `epoch`, plus one, so that zero means "not set".
struct ConnState {
    epoch: Instant,
    inflight: AtomicUsize,
    last_activity: AtomicU64,
    header_started: AtomicU64,
    /// Wakes the driver when a deadline may have moved earlier.
    wake: Notify,
}

impl ConnState {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            inflight: AtomicUsize::new(0),
            last_activity: AtomicU64::new(1),
            header_started: AtomicU64::new(0),
            wake: Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn at(&self, stamp: u64, after: Duration) -> Instant {
        self.epoch + Duration::from_millis(stamp - 1) + after
    }

    fn read_some(&self) {
        let now = self.now();
        self.last_activity.store(now, Ordering::Relaxed);
        // Bytes with no request in flight begin the next request's header.
        if self.inflight.load(Ordering::Acquire) == 0
            && self
                .header_started
                .compare_exchange(0, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.wake.notify_one();
        }
    }

    fn request_started(&self) {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        self.header_started.store(0, Ordering::Release);
    }

    fn request_ended(&self) {
        self.last_activity.store(self.now(), Ordering::Relaxed);
        if self.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.wake.notify_one();
        }
    }

    /// The next moment something must be checked, and what.
    fn next(&self, limits: &ConnectionLimits) -> Option<(Instant, Expiry)> {
        let header = self.header_started.load(Ordering::Acquire);
        if header != 0 {
            return Some((self.at(header, limits.header_read), Expiry::Header));
        }
        if self.inflight.load(Ordering::Acquire) == 0 {
            let last = self.last_activity.load(Ordering::Relaxed);
            return Some((self.at(last, limits.keepalive), Expiry::Idle));
        }
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    Header,
    Idle,
}

/// Counts a request in flight on its connection until the response is ready.
struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// A TCP stream that reports activity and gives up on a write the peer does not take.
struct TimedIo {
    inner: TcpStream,
    state: Arc<ConnState>,
    write_timeout: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl TimedIo {
    fn pending_write<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let timeout = self.write_timeout;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not read the response within server.write_timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn wrote<T>(
        &mut self,
        result: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match result {
            Poll::Pending => self.pending_write(cx),
            ready => {
                self.stalled = None;
                self.state
                    .last_activity
                    .store(self.state.now(), Ordering::Relaxed);
                ready
            }
        }
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.read_some();
        }
        result
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(result, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.wrote(result, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The open connections: their tasks, and the signal that asks them to finish.
pub(crate) struct Connections {
    tasks: JoinSet<()>,
    stop: watch::Sender<bool>,
    limits: ConnectionLimits,
    permits: Arc<Semaphore>,
}

impl Connections {
    pub(crate) fn new(limits: ConnectionLimits) -> Self {
        Self {
            tasks: JoinSet::new(),
            stop: watch::channel(false).0,
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
        }
    }

    /// Accepts connections until `stop` resolves. At the connection cap it stops accepting
    /// until one closes, leaving new clients in the kernel's backlog rather than refusing them.
    pub(crate) async fn accept(
        &mut self,
        listener: &TcpListener,
        router: &Router,
        stop: impl Future<Output = ()>,
    ) {
        let mut stop = std::pin::pin!(stop);
        loop {
            // Reap finished connections so the set does not grow with the host's age.
            while self.tasks.try_join_next().is_some() {}
            let permit = tokio::select! {
                biased;
                () = &mut stop => return,
                permit = self.permits.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let stream = tokio::select! {
                biased;
                () = &mut stop => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let (router, limits, stop) = (router.clone(), self.limits, self.stop.subscribe());
            self.tasks.spawn(async move {
                drive(stream, router, limits, stop).await;
                drop(permit);
            });
        }
    }

    /// Asks every connection to finish: idle ones close now, busy ones after their response.
    /// Waits until `deadline`; returns how many were still open then (they are left running).
    pub(crate) async fn finish(&mut self, deadline: Instant) -> usize {
        let _ = self.stop.send(true);
        let all_done = async { while self.tasks.join_next().await.is_some() {} };
        match tokio::time::timeout_at(deadline.into(), all_done).await {
            Ok(()) => 0,
            Err(_) => self.tasks.len(),
        }
    }

    /// Drops every connection still open, cancelling the requests they serve.
    pub(crate) async fn abort(&mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Serves one connection until it closes, a timeout closes it, or shutdown ends it.
async fn drive(
    stream: TcpStream,
    router: Router,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<bool>,
) {
    let state = Arc::new(ConnState::new());
    let io = TimedIo {
        inner: stream,
        state: state.clone(),
        write_timeout: limits.write,
        stalled: None,
    };
    let service = {
        let state = state.clone();
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            state.request_started();
            let in_flight = InFlight(state.clone());
            let router = router.clone();
            async move {
                let response = router.oneshot(request.map(axum::body::Body::new)).await;
                drop(in_flight);
                response
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Header reads are timed by `ConnState`, which tells a slow header from an idle connection.
    builder
        .header_read_timeout(Option::<Duration>::None)
        .keep_alive(true)
        .max_buf_size(limits.max_header_bytes);
    // Above hyper's default the header array moves to the heap: set it only when asked.
    if limits.max_headers != 100 {
        builder.max_headers(limits.max_headers);
    }
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let mut stopping = *stop.borrow();
    if stopping {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        // Once asked to finish, only a late header still needs the timer.
        let next = state
            .next(&limits)
            .filter(|(_, expiry)| !stopping || *expiry == Expiry::Header);
        let far = Instant::now() + Duration::from_secs(24 * 3600);
        let at = next.map_or(far, |(at, _)| at);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            changed = stop.changed(), if !stopping => {
                stopping = true;
                if changed.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
            }
            () = state.wake.notified() => {}
            () = tokio::time::sleep_until(at.into()), if next.is_some() => {
                // The state may have moved on while sleeping; act only on what still holds.
                match state.next(&limits) {
                    Some((at, Expiry::Header)) if at <= Instant::now() => {
                        tracing::debug!("closing a connection whose request header is late (server.header_read_timeout)");
                        return;
                    }
                    Some((at, Expiry::Idle)) if at <= Instant::now() && !stopping => {
                        stopping = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    _ => {}
                }
            }
        }
    }
}
