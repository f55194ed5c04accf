//! The health-only listener (`--health-listen`, `ESQ_HEALTH_LISTEN`): a second, plaintext and
//! unauthenticated port serving `grpc.health.v1.Health` and nothing else, for probes that cannot
//! speak TLS or send a bearer token — above all the kubelet's built-in gRPC probes, which the
//! Helm chart points at it when TLS is on.
//!
//! It answers exactly what the main port's health service answers (the two share one health
//! reporter in [`crate::serve_grpc`]): SERVING while the server's readiness holds, NOT_SERVING
//! once shutdown began. It exposes nothing else: no esq API, no reflection, no data — only
//! whether the process is up and ready, which is what a liveness check is for. It is bound only
//! while the main server runs and closes, connections and all, when that returns.

use crate::incoming::{ConnLimits, Incoming};
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic_health::pb::health_server::{Health, HealthServer};

/// A running health-only server; dropping it stops it: the listener closes at once, open
/// connections get GOAWAY and are closed by force [`crate::HARD_STOP_WAIT`] later (a `Watch`
/// stream never ends by itself), so a status written just before, such as NOT_SERVING on
/// shutdown, still reaches its watchers.
#[derive(Debug)]
pub(crate) struct HealthOnly {
    _stop: DropGuard,
}

impl HealthOnly {
    /// Serves `health` alone on `listener` until the returned guard is dropped.
    pub(crate) fn spawn<H: Health>(listener: TcpListener, health: HealthServer<H>) -> Self {
        let stop = CancellationToken::new();
        let hard_stop = CancellationToken::new();
        tracing::info!(
            addr = ?listener.local_addr().ok(),
            "health-only listener (plaintext, grpc.health.v1 only)"
        );
        let incoming = Incoming::new(
            listener,
            ConnLimits {
                idle_read_timeout: crate::IDLE_READ_TIMEOUT,
                hard_stop: hard_stop.clone(),
            },
        );
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(crate::HTTP2_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(crate::HTTP2_KEEPALIVE_TIMEOUT))
            .max_concurrent_streams(crate::MAX_CONCURRENT_STREAMS)
            .add_service(health)
            .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
        let stopped = stop.clone();
        tokio::spawn(async move {
            // Whatever way this ends, no connection outlives it.
            let _close_all = hard_stop.clone().drop_guard();
            tokio::pin!(server);
            let outcome = tokio::select! {
                outcome = &mut server => outcome,
                () = async {
                    stopped.cancelled().await;
                    tokio::time::sleep(crate::HARD_STOP_WAIT).await;
                } => {
                    hard_stop.cancel();
                    match tokio::time::timeout(crate::HARD_STOP_WAIT, server).await {
                        Ok(outcome) => outcome,
                        Err(_) => {
                            tracing::warn!("health-only connections still open after the hard stop");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(e) = outcome {
                tracing::error!(error = %e, "health-only listener failed");
            }
        });
        Self {
            _stop: stop.drop_guard(),
        }
    }
}
