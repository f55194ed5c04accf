//! Server-wide limits on calls: load shedding and a default deadline, as one tower layer
//! ([`LimitsLayer`]) in front of every service of a gRPC server.
//!
//! - **Load shedding.** At most [`Limits::max_concurrent_calls`] calls are handled at once in
//!   the whole server (every connection together; `MAX_CONCURRENT_STREAMS` bounds one
//!   connection). A call over the limit is answered RESOURCE_EXHAUSTED at once, naming the
//!   limit — never queued, so an overloaded server answers fast and clients back off or go to
//!   another replica, instead of piling up waiting calls and their memory.
//! - **Default deadline.** A call that sent no `grpc-timeout` gets [`Limits::default_deadline`]:
//!   when it passes, the call ends with DEADLINE_EXCEEDED, naming the flag. A call that sent its
//!   own deadline is bounded by it (tonic), capped by nothing here.
//!
//! Health checks (`grpc.health.v1.Health`) pass untouched: they are cheap, and a probe must
//! see an overloaded server as alive.
//!
//! Both bound the time until a call's **response starts**: for a unary call that is the whole
//! call; for a server-streaming call (Subscribe, ReadStream, WatchRebuild, health Watch) it is
//! the handler's setup, until it returns its stream. A stream that has started holds no permit
//! and is not cut by the default deadline: subscriptions live for hours by design, and would
//! otherwise take the server's whole budget or be killed every 30 s. What bounds them is the
//! per-connection stream limit, the HTTP/2 keepalive and the connection age.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::Semaphore;
use tonic::codegen::http::{Request, Response};
use tonic::Status;

/// Path prefix of the health service, which no limit applies to: an overloaded server is
/// still alive, and a probe that got RESOURCE_EXHAUSTED would have it restarted or taken out
/// of rotation while it works through its load.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// Default of `--max-concurrent-calls`.
pub const DEFAULT_MAX_CONCURRENT_CALLS: usize = 1024;
/// Default of `--default-deadline`.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

/// The limits a server applies to calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most calls handled at once, server-wide (`--max-concurrent-calls`); 0 means no limit.
    pub max_concurrent_calls: usize,
    /// Deadline of a call that sent none (`--default-deadline`); `None` means no default.
    pub default_deadline: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent_calls: DEFAULT_MAX_CONCURRENT_CALLS,
            default_deadline: Some(DEFAULT_DEADLINE),
        }
    }
}

/// The layer applying [`Limits`]; one per server (its clones share the permits).
#[derive(Debug, Clone)]
pub struct LimitsLayer {
    permits: Option<Arc<Semaphore>>,
    limits: Limits,
}

impl LimitsLayer {
    /// A layer for `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            permits: (limits.max_concurrent_calls > 0)
                .then(|| Arc::new(Semaphore::new(limits.max_concurrent_calls))),
            limits,
        }
    }
}

impl<S> tower::Layer<S> for LimitsLayer {
    type Service = LimitsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        LimitsService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`LimitsLayer`].
#[derive(Debug, Clone)]
pub struct LimitsService<S> {
    inner: S,
    layer: LimitsLayer,
}

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for LimitsService<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        if request.uri().path().starts_with(HEALTH_PREFIX) {
            return Box::pin(self.inner.call(request));
        }
        let permit = match &self.layer.permits {
            Some(permits) => match Arc::clone(permits).try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    let status = Status::resource_exhausted(format!(
                        "server busy: {} calls in flight, the limit (--max-concurrent-calls); \
                         retry with backoff",
                        self.layer.limits.max_concurrent_calls
                    ));
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            },
            None => None,
        };
        let deadline = self
            .layer
            .limits
            .default_deadline
            .filter(|_| !request.headers().contains_key("grpc-timeout"));
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = match deadline {
                None => response.await,
                Some(deadline) => match tokio::time::timeout(deadline, response).await {
                    Ok(response) => response,
                    Err(_) => Ok(Status::deadline_exceeded(format!(
                        "the call sent no deadline and did not finish within the server's \
                         default of {deadline:?} (--default-deadline)"
                    ))
                    .into_http()),
                },
            };
            drop(permit);
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tonic::Code;
    use tower::{Layer as _, Service as _, ServiceExt as _};

    type Body = tonic::body::Body;

    /// A service whose calls end when `release` is notified.
    fn waiting(
        release: Arc<tokio::sync::Notify>,
    ) -> impl tower::Service<
        Request<()>,
        Response = Response<Body>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
    > + Clone {
        tower::service_fn(move |_req: Request<()>| {
            let release = Arc::clone(&release);
            async move {
                release.notified().await;
                Ok::<_, Infallible>(Response::new(Body::default()))
            }
        })
    }

    fn status(response: &Response<Body>) -> Option<Code> {
        Status::from_header_map(response.headers()).map(|s| s.code())
    }

    #[tokio::test]
    async fn over_the_limit_is_refused_at_once_and_permits_come_back() {
        let release = Arc::new(tokio::sync::Notify::new());
        let layer = LimitsLayer::new(Limits {
            max_concurrent_calls: 2,
            default_deadline: None,
        });
        let mut svc = layer.layer(waiting(Arc::clone(&release)));
        let a = tokio::spawn(svc.ready().await.expect("ready").call(Request::new(())));
        let b = tokio::spawn(svc.ready().await.expect("ready").call(Request::new(())));
        let refused = svc
            .ready()
            .await
            .expect("ready")
            .call(Request::new(()))
            .await
            .expect("response");
        assert_eq!(status(&refused), Some(Code::ResourceExhausted));
        let message = Status::from_header_map(refused.headers()).expect("status");
        assert!(
            message.message().contains("--max-concurrent-calls"),
            "{message:?}"
        );
        // Both admitted calls finish normally, and their permits are free again.
        while !(a.is_finished() && b.is_finished()) {
            release.notify_waiters();
            tokio::task::yield_now().await;
        }
        for call in [a, b] {
            let response = call.await.expect("join").expect("response");
            assert_eq!(status(&response), None);
        }
        let again = svc.ready().await.expect("ready").call(Request::new(()));
        release.notify_one();
        assert_eq!(status(&again.await.expect("response")), None);
    }

    #[tokio::test]
    async fn health_checks_are_never_shed() {
        let release = Arc::new(tokio::sync::Notify::new());
        let layer = LimitsLayer::new(Limits {
            max_concurrent_calls: 1,
            default_deadline: None,
        });
        let mut svc = layer.layer(waiting(Arc::clone(&release)));
        let held = tokio::spawn(svc.ready().await.expect("ready").call(Request::new(())));
        let health = || {
            Request::builder()
                .uri("/grpc.health.v1.Health/Check")
                .body(())
                .expect("request")
        };
        let probe = svc.ready().await.expect("ready").call(health());
        let shed = svc
            .ready()
            .await
            .expect("ready")
            .call(Request::new(()))
            .await
            .expect("response");
        assert_eq!(status(&shed), Some(Code::ResourceExhausted));
        let probe = tokio::spawn(probe);
        while !(held.is_finished() && probe.is_finished()) {
            release.notify_waiters();
            tokio::task::yield_now().await;
        }
        let probe = probe.await.expect("join").expect("response");
        assert_eq!(status(&probe), None, "the health check was admitted");
    }

    #[tokio::test]
    async fn a_call_without_deadline_gets_the_default() {
        let release = Arc::new(tokio::sync::Notify::new());
        let layer = LimitsLayer::new(Limits {
            max_concurrent_calls: 0,
            default_deadline: Some(Duration::from_millis(100)),
        });
        let mut svc = layer.layer(waiting(Arc::clone(&release)));
        let response = svc
            .ready()
            .await
            .expect("ready")
            .call(Request::new(()))
            .await
            .expect("response");
        let expired = Status::from_header_map(response.headers()).expect("status");
        assert_eq!(expired.code(), Code::DeadlineExceeded);
        assert!(
            expired.message().contains("--default-deadline"),
            "{expired:?}"
        );

        // A call with its own deadline is left to it: well past the default, it still ends
        // the way its handler ends it.
        let mut request = Request::new(());
        request
            .headers_mut()
            .insert("grpc-timeout", "100S".parse().expect("header"));
        let call = tokio::spawn(svc.ready().await.expect("ready").call(request));
        tokio::time::sleep(Duration::from_secs(1)).await;
        while !call.is_finished() {
            release.notify_waiters();
            tokio::task::yield_now().await;
        }
        let response = call.await.expect("join").expect("response");
        assert_eq!(
            status(&response),
            None,
            "the default deadline cut a call that had its own"
        );
    }
}
