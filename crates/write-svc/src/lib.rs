//! esq write-svc: the command side. It serves `esq.v1.EventStore` (raw appends and reads),
//! `esq.cart.v1.CartCommands` and `esq.bookshop.v1.BookCommands`, turning commands into events
//! appended to the event store with optimistic concurrency.
//!
//! It is the only writer of the event store and never touches the read model. After each
//! append it calls an optional best-effort *nudge* so projectors can pick the change up at once;
//! the change log, not the nudge, guarantees that nothing is missed.

pub mod api;
pub mod commands;
pub mod domain_api;
pub mod error;

use esq::pb::bookshop::v1::book_commands_server::BookCommandsServer;
use esq::pb::cart::v1::cart_commands_server::CartCommandsServer;
use esq::pb::v1::event_store_server::EventStoreServer;
use esq_domain::StreamId;
use esq_eventstore::EventStore;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A best-effort notification that `stream` reached a version. Must not block.
pub type Nudge = Arc<dyn Fn(&StreamId, u64) + Send + Sync>;

/// The gRPC services write-svc reports in health checks.
pub const SERVICES: &[&str] = &[
    "esq.v1.EventStore",
    "esq.cart.v1.CartCommands",
    "esq.bookshop.v1.BookCommands",
];

/// What write-svc runs on.
pub struct Deps<S> {
    /// The event store.
    pub store: Arc<S>,
    /// Called after every successful append.
    pub nudge: Option<Nudge>,
}

/// The gRPC routes of write-svc, for embedding in a larger server.
pub fn routes<S: EventStore>(deps: Deps<S>) -> tonic::service::Routes {
    let executor = commands::Executor::new(Arc::clone(&deps.store), deps.nudge.clone());
    tonic::service::Routes::new(EventStoreServer::new(api::EventStoreApi::new(
        deps.store,
        deps.nudge,
        executor.clone(),
    )))
    .add_service(CartCommandsServer::new(domain_api::CartCommandsApi(
        executor.clone(),
    )))
    .add_service(BookCommandsServer::new(domain_api::BookCommandsApi(
        executor,
    )))
}

/// Serves write-svc on `listener` until `shutdown` is cancelled, then drains.
pub async fn run<S: EventStore>(
    listener: TcpListener,
    deps: Deps<S>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(addr = ?listener.local_addr().ok(), "write-svc listening");
    esq_runtime::serve_grpc(listener, routes(deps), SERVICES, shutdown).await
}

/// A [`Nudge`] that publishes `kind/id@version` on a Redis pub/sub channel. Appends never wait
/// for it: messages go through a bounded queue to one publisher task, which connects (and
/// reconnects) in the background; messages are dropped while Redis is away or the queue is full
/// (the change log still carries every change).
pub fn redis_nudge(
    config: esq_readstore::redis::RedisConfig,
    channel: String,
    shutdown: CancellationToken,
) -> Nudge {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(4096);
    tokio::spawn(async move {
        let connect = || esq_readstore::redis::RedisStore::connect(config.clone());
        let redis =
            match esq_runtime::connect_with_retry("Redis for nudges", &shutdown, connect).await {
                Ok(Some(redis)) => redis,
                Ok(None) => return,
                Err(e) => {
                    // Nudges are an optimisation: appends go on, projectors rely on the change log.
                    tracing::error!(error = %e, "bad nudge configuration: nudges disabled");
                    return;
                }
            };
        loop {
            tokio::select! {
                message = rx.recv() => match message {
                    Some(m) => redis.publish_nudge(&channel, &m).await,
                    None => return,
                },
                _ = shutdown.cancelled() => return,
            }
        }
    });
    Arc::new(move |stream, version| {
        let _ = tx.try_send(esq_eventstore::nudge_message(stream, version));
    })
}
