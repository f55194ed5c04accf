//! The accept loop of our gRPC servers, written here because tonic ignores its own socket
//! options (`tcp_nodelay`, `tcp_keepalive`) when it is handed an incoming stream.
//!
//! Every accepted socket gets TCP_NODELAY (gRPC writes small frames that must not wait for
//! Nagle's algorithm) and TCP keepalive (so a peer that vanished without a FIN is noticed by the
//! kernel even on a connection HTTP/2 does not ping). Accept errors never make the loop spin:
//! per-connection failures (the peer reset before we accepted) are skipped, and everything else
//! — typically EMFILE, ENFILE, ENOBUFS or ENOMEM, which would fail again at once — pauses
//! accepting with a backoff from [`BACKOFF_MIN`] to [`BACKOFF_MAX`], logged once per burst.
//!
//! Accepted connections are wrapped in [`Conn`], which the server can close by force (after the
//! shutdown grace period), and which is closed when nothing at all is read from it for an idle
//! bound: a live HTTP/2 peer always answers our keepalive pings, so only silent or half-open
//! sockets (including ones that never sent the HTTP/2 preface) reach it.
//!
//! With TLS ([`crate::tls`]) the handshake runs over a [`Conn`], so TLS connections keep every
//! one of these behaviours; tonic is handed a [`ServerConn`], plain or TLS.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// First pause after an accept error that is about the process, not one connection.
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest pause between accept attempts while such errors last.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Idle time before the kernel starts TCP keepalive probes on an accepted socket.
const TCP_KEEPALIVE_TIME: Duration = Duration::from_secs(60);
/// Interval between TCP keepalive probes.
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// What an accept error means for the accept loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptErrorClass {
    /// Only this connection failed (aborted or reset before we took it): accept the next one.
    Connection,
    /// The process or the system is short of something (descriptors, buffers, memory):
    /// retrying at once would fail again, so pause.
    Resource,
}

impl AcceptErrorClass {
    /// Classifies an accept error. Unknown errors count as [`AcceptErrorClass::Resource`], so
    /// that an error we did not foresee slows the loop down rather than spinning it.
    pub fn of(e: &io::Error) -> Self {
        use io::ErrorKind::*;
        match e.kind() {
            ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock
            | TimedOut | PermissionDenied => Self::Connection,
            _ => Self::Resource,
        }
    }
}

/// What the accept loop does next, decided by [`AcceptBackoff`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptAction {
    /// Accept again at once.
    Retry,
    /// Pause for this long before accepting again; `log` is true for the first pause of a burst
    /// of errors, so a long outage writes one line rather than one per attempt.
    Pause {
        /// How long to wait.
        delay: Duration,
        /// Whether this pause starts a burst (and should be logged).
        log: bool,
    },
}

/// The accept backoff as a pure state machine, so its policy is unit-tested without sockets.
#[derive(Debug, Default, Clone)]
pub struct AcceptBackoff {
    /// The next pause, while a burst of resource errors lasts.
    next: Option<Duration>,
    /// Resource errors in the current burst.
    errors: u64,
}

impl AcceptBackoff {
    /// The decision after an accept error of class `class`.
    pub fn on_error(&mut self, class: AcceptErrorClass) -> AcceptAction {
        match class {
            AcceptErrorClass::Connection => AcceptAction::Retry,
            AcceptErrorClass::Resource => {
                self.errors += 1;
                let log = self.next.is_none();
                let delay = self.next.unwrap_or(BACKOFF_MIN);
                self.next = Some((delay * 2).min(BACKOFF_MAX));
                AcceptAction::Pause { delay, log }
            }
        }
    }

    /// Records a successful accept; returns how many resource errors the burst it ends had
    /// (0 when there was none), so the recovery can be logged once.
    pub fn on_success(&mut self) -> u64 {
        self.next = None;
        std::mem::take(&mut self.errors)
    }
}

/// How accepted connections are bounded.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// A connection from which nothing is read for this long is closed.
    pub idle_read_timeout: Duration,
    /// Cancelled to close every accepted connection at once, in-flight calls included.
    pub hard_stop: CancellationToken,
}

/// The stream of accepted connections handed to tonic. It never yields an error: errors are
/// handled here (tonic would retry at once, spinning on EMFILE).
pub struct Incoming {
    listener: TcpListener,
    limits: ConnLimits,
    backoff: AcceptBackoff,
    pause: Option<Pin<Box<Sleep>>>,
}

impl Incoming {
    /// Accepts on `listener`, bounding connections by `limits`.
    pub fn new(listener: TcpListener, limits: ConnLimits) -> Self {
        Self {
            listener,
            limits,
            backoff: AcceptBackoff::default(),
            pause: None,
        }
    }
}

/// Sets the options every accepted socket gets; failures are logged, the connection is kept.
fn configure(stream: &TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::warn!(error = %e, "cannot set TCP_NODELAY on an accepted socket");
    }
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_TIME)
        .with_interval(TCP_KEEPALIVE_INTERVAL);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::warn!(error = %e, "cannot set TCP keepalive on an accepted socket");
    }
}

impl tokio_stream::Stream for Incoming {
    type Item = Result<Conn, io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(pause) = this.pause.as_mut() {
                ready!(pause.as_mut().poll(cx));
                this.pause = None;
            }
            match ready!(this.listener.poll_accept(cx)) {
                Ok((stream, _peer)) => {
                    let errors = this.backoff.on_success();
                    if errors > 0 {
                        tracing::info!(errors, "accepting connections again");
                    }
                    configure(&stream);
                    return Poll::Ready(Some(Ok(Conn::new(stream, &this.limits))));
                }
                Err(e) => match this.backoff.on_error(AcceptErrorClass::of(&e)) {
                    AcceptAction::Retry => {
                        tracing::debug!(error = %e, "accept failed for one connection");
                    }
                    AcceptAction::Pause { delay, log } => {
                        if log {
                            tracing::warn!(error = %e, retry_in = ?delay, "cannot accept connections; backing off");
                        }
                        this.pause = Some(Box::pin(tokio::time::sleep(delay)));
                    }
                },
            }
        }
    }
}

/// An accepted connection: a [`TcpStream`] that fails its IO once the server's hard stop is
/// cancelled or once nothing was read for the idle bound, so the HTTP/2 connection task ends.
pub struct Conn {
    inner: TcpStream,
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
    idle_timeout: Duration,
    last_read: Instant,
    idle: Pin<Box<Sleep>>,
}

impl Conn {
    fn new(inner: TcpStream, limits: &ConnLimits) -> Self {
        let now = Instant::now();
        Self {
            inner,
            stop: Box::pin(limits.hard_stop.clone().cancelled_owned()),
            idle_timeout: limits.idle_read_timeout,
            last_read: now,
            idle: Box::pin(tokio::time::sleep_until(now + limits.idle_read_timeout)),
        }
    }

    /// The stream under the wrapper (tests check its socket options).
    pub fn tcp(&self) -> &TcpStream {
        &self.inner
    }

    fn stopped(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.stop.as_mut().poll(cx).is_ready().then(|| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "server stopped: shutdown grace period over",
            )
        })
    }

    /// Whether the idle bound passed; the timer is only re-armed when it fires, not per read.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.idle.as_mut().poll(cx).is_pending() {
                return false;
            }
            let deadline = self.last_read + self.idle_timeout;
            if deadline <= Instant::now() {
                return true;
            }
            self.idle.as_mut().reset(deadline);
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.stopped(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.last_read = Instant::now();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if this.idle_expired(cx) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection idle: nothing read within the idle bound",
            ))),
            other => other,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.stopped(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.stopped(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.stopped(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A connection handed to tonic: plaintext, or TLS over a [`Conn`] (so the idle bound and the
/// hard stop hold for both).
pub enum ServerConn {
    /// Plaintext HTTP/2 (`--insecure`).
    Plain(Conn),
    /// HTTP/2 over TLS.
    Tls(Box<tokio_rustls::server::TlsStream<Conn>>),
}

impl ServerConn {
    /// The accepted connection under TLS, if any.
    pub fn conn(&self) -> &Conn {
        match self {
            Self::Plain(c) => c,
            Self::Tls(t) => t.get_ref().0,
        }
    }
}

impl Connected for ServerConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.conn().connect_info()
    }
}

impl AsyncRead for ServerConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(c) => Pin::new(c).poll_read(cx, buf),
            Self::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(c) => Pin::new(c).poll_write(cx, buf),
            Self::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(c) => Pin::new(c).poll_write_vectored(cx, bufs),
            Self::Tls(t) => Pin::new(t.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(c) => c.is_write_vectored(),
            Self::Tls(t) => t.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(c) => Pin::new(c).poll_flush(cx),
            Self::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(c) => Pin::new(c).poll_shutdown(cx),
            Self::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The stream of connections handed to tonic: accepted plaintext ones, or those whose TLS
/// handshake (run off the accept loop by [`crate::tls::accept_tls`]) succeeded.
pub enum ServerIncoming {
    /// Plaintext: the accept loop itself.
    Plain(Incoming),
    /// TLS: the handshaken connections.
    Tls(tokio::sync::mpsc::Receiver<tokio_rustls::server::TlsStream<Conn>>),
}

impl ServerIncoming {
    /// Accepts on `listener`, bounding connections by `limits`, with TLS when `tls` is given.
    pub fn new(
        listener: TcpListener,
        limits: ConnLimits,
        tls: Option<crate::tls::ServerTls>,
    ) -> Self {
        let incoming = Incoming::new(listener, limits);
        match tls {
            None => Self::Plain(incoming),
            Some(tls) => Self::Tls(crate::tls::accept_tls(incoming, tls)),
        }
    }
}

impl tokio_stream::Stream for ServerIncoming {
    type Item = Result<ServerConn, io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            Self::Plain(incoming) => Pin::new(incoming)
                .poll_next(cx)
                .map(|c| c.map(|c| c.map(ServerConn::Plain))),
            Self::Tls(rx) => rx
                .poll_recv(cx)
                .map(|c| c.map(|c| Ok(ServerConn::Tls(Box::new(c))))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio_stream::Stream;

    async fn next(incoming: &mut Incoming) -> Conn {
        poll_fn(|cx| Pin::new(&mut *incoming).poll_next(cx))
            .await
            .expect("the stream never ends")
            .expect("the stream never yields errors")
    }

    fn limits(idle: Duration) -> ConnLimits {
        ConnLimits {
            idle_read_timeout: idle,
            hard_stop: CancellationToken::new(),
        }
    }

    #[tokio::test]
    async fn accepted_sockets_have_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut incoming = Incoming::new(listener, limits(Duration::from_secs(60)));
        let _client = TcpStream::connect(addr).await.expect("connect");
        let conn = next(&mut incoming).await;
        assert!(conn.tcp().nodelay().expect("nodelay"), "TCP_NODELAY is set");
        let keepalive = socket2::SockRef::from(conn.tcp())
            .keepalive()
            .expect("keepalive");
        assert!(keepalive, "TCP keepalive is set");
    }

    #[test]
    fn resource_errors_back_off_and_connection_errors_do_not() {
        use AcceptAction::*;
        use AcceptErrorClass::*;
        let mut b = AcceptBackoff::default();
        assert_eq!(b.on_error(Connection), Retry);
        let delays: Vec<_> = (0..8).map(|_| b.on_error(Resource)).collect();
        let ms = |d: &AcceptAction| match d {
            Pause { delay, .. } => delay.as_millis(),
            Retry => 0,
        };
        assert_eq!(
            delays.iter().map(ms).collect::<Vec<_>>(),
            [50, 100, 200, 400, 800, 1000, 1000, 1000]
        );
        let logged = delays
            .iter()
            .filter(|d| matches!(d, Pause { log: true, .. }))
            .count();
        assert_eq!(logged, 1, "one log line per burst");
        assert_eq!(b.on_error(Connection), Retry, "a reset peer never pauses");
        assert_eq!(b.on_success(), 8);
        assert_eq!(
            b.on_error(Resource),
            Pause {
                delay: BACKOFF_MIN,
                log: true
            },
            "a new burst starts small and is logged again"
        );
    }

    #[test]
    fn accept_errors_are_classified() {
        let class = |e: io::Error| AcceptErrorClass::of(&e);
        // EMFILE, ENFILE, ENOBUFS and ENOMEM have no ErrorKind of their own.
        for errno in [24, 23, 105, 12] {
            assert_eq!(
                class(io::Error::from_raw_os_error(errno)),
                AcceptErrorClass::Resource,
                "errno {errno}"
            );
        }
        assert_eq!(
            class(io::ErrorKind::ConnectionAborted.into()),
            AcceptErrorClass::Connection
        );
    }

    #[tokio::test]
    async fn hard_stop_and_idle_bound_close_connections() {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let l = limits(Duration::from_millis(200));
        let stop = l.hard_stop.clone();
        let mut incoming = Incoming::new(listener, l);
        let _silent = TcpStream::connect(addr).await.expect("connect");
        let mut conn = next(&mut incoming).await;
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(20), conn.read(&mut buf))
            .await
            .expect("the idle bound ends the read");
        assert_eq!(
            read.expect_err("idle").kind(),
            io::ErrorKind::TimedOut,
            "a silent peer is cut after the idle bound"
        );

        let _other = TcpStream::connect(addr).await.expect("connect");
        let mut conn = next(&mut incoming).await;
        conn.idle_timeout = Duration::from_secs(3600);
        let pending = tokio::spawn(async move { conn.read(&mut [0u8; 16]).await });
        stop.cancel();
        let read = tokio::time::timeout(Duration::from_secs(20), pending)
            .await
            .expect("the hard stop ends the read")
            .expect("join");
        assert_eq!(
            read.expect_err("stopped").kind(),
            io::ErrorKind::ConnectionAborted
        );
    }
}
