//! esq read-svc: the query side. It serves `esq.cart.v1.CartQueries`,
//! `esq.bookshop.v1.BookQueries` and `esq.v1.StateQueries` from the read store alone.
//!
//! It never talks to the event store, so it keeps answering while the event store is down.
//! Queries carry an optional `min_version` for read-your-writes: the call waits, bounded by its
//! deadline and a server maximum, until the projection has caught up.

mod queries;
mod wait;

pub use wait::parse_grpc_timeout;

use esq::pb::bookshop::v1::book_queries_server::BookQueriesServer;
use esq::pb::cart::v1::cart_queries_server::CartQueriesServer;
use esq::pb::v1::state_queries_server::StateQueriesServer;
use esq_readstore::ReadStore;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The gRPC services read-svc reports in health checks.
pub const SERVICES: &[&str] = &[
    "esq.cart.v1.CartQueries",
    "esq.bookshop.v1.BookQueries",
    "esq.v1.StateQueries",
];

/// Tunables of read-svc.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Longest a `min_version` wait may last when the call sets no shorter deadline.
    pub max_wait: Duration,
    /// How often the read store is pinged; health reports NOT_SERVING while it does not answer.
    pub health_probe: Duration,
    /// Longest drain on shutdown before open connections are closed.
    pub shutdown_grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_wait: Duration::from_secs(5),
            health_probe: Duration::from_secs(1),
            shutdown_grace: esq_runtime::config::DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// The gRPC routes of read-svc, for embedding in a larger server.
pub fn routes<R: ReadStore>(store: Arc<R>, config: Config) -> tonic::service::Routes {
    let reader = wait::Reader::new(store, config);
    let max = esq_runtime::MAX_REQUEST_BYTES;
    tonic::service::Routes::new(
        CartQueriesServer::new(queries::CartQueriesApi(reader.clone()))
            .max_decoding_message_size(max),
    )
    .add_service(
        BookQueriesServer::new(queries::BookQueriesApi(reader.clone()))
            .max_decoding_message_size(max),
    )
    .add_service(
        StateQueriesServer::new(queries::StateQueriesApi(reader)).max_decoding_message_size(max),
    )
}

/// Serves read-svc on `listener` until `shutdown` is cancelled, then drains. Health reports
/// the query services NOT_SERVING while the read store does not answer a ping (probed every
/// `config.health_probe`), and SERVING again once it does.
pub async fn run<R: ReadStore>(
    listener: TcpListener,
    store: Arc<R>,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(addr = ?listener.local_addr().ok(), "read-svc listening");
    let mut options = esq_runtime::GrpcOptions::new(SERVICES);
    options.grace = config.shutdown_grace;
    let probe = options
        .readiness
        .probe("the read store", config.health_probe, shutdown.clone(), {
            let store = Arc::clone(&store);
            move || {
                let store = Arc::clone(&store);
                async move { store.ping().await }
            }
        });
    let served = esq_runtime::serve_grpc(listener, routes(store, config), options, shutdown).await;
    probe.abort();
    served
}
