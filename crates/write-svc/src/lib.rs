//! esq write-svc: the command side. It serves `esq.v1.EventStore` (raw appends and reads),
//! `esq.cart.v1.CartCommands` and `esq.bookshop.v1.BookCommands`, turning commands into events
//! appended to the event store with optimistic concurrency; and `EventStore/GetStateAt`, the
//! generic state of any stream as of a version or a time, folded from the event store (the
//! domain forms of that question are read-svc's, see `esq_eventstore::history`).
//!
//! It is the only writer of the event store and never touches the read model. After each
//! append it calls an optional best-effort *nudge* so projectors can pick the change up at once;
//! the change log, not the nudge, guarantees that nothing is missed.

pub mod api;
pub mod commands;
pub mod domain_api;
pub mod error;
mod subscribe;
pub mod timelines;

use esq::pb::bookshop::v1::book_commands_server::BookCommandsServer;
use esq::pb::cart::v1::cart_commands_server::CartCommandsServer;
use esq::pb::v1::event_store_server::EventStoreServer;
use esq_domain::{AppendResult, NewEvent, StreamId};
use esq_eventstore::{ChangeFeed, EventStore, Snapshots};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A best-effort notification of an append to `stream`: what it reported, and its events (so
/// a nudge can carry them, sparing the projector a read). Must not block.
pub type Nudge = Arc<dyn Fn(&StreamId, &AppendResult, &[NewEvent]) + Send + Sync>;

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

/// Tunables of write-svc.
#[derive(Debug, Clone)]
pub struct Config {
    /// How often the event store is asked whether it can serve ([`EventStore::ping`]); health
    /// reports NOT_SERVING while it cannot.
    pub health_probe: Duration,
    /// Longest drain on shutdown before open connections are closed.
    pub shutdown_grace: Duration,
    /// TLS of the gRPC server; `None` serves plaintext.
    pub tls: Option<esq_runtime::tls::ServerTls>,
    /// Load shedding and the default deadline of the gRPC server.
    pub limits: esq_runtime::limits::Limits,
    /// How often a live subscription (`EventStore/Subscribe`) polls the change feed.
    pub subscribe_poll: Duration,
    /// Aggregate snapshots: a command whose load folded this many events past its starting
    /// point writes one in the background (0: off). See [`commands::DEFAULT_SNAPSHOT_EVERY`].
    pub snapshot_every: u64,
    /// Bearer-token authentication of every call (`None`: anyone may call).
    pub auth: Option<esq_runtime::auth::Authenticator>,
    /// Where to also serve health alone, plaintext (`--health-listen`; see
    /// [`esq_runtime::GrpcOptions::health_listen`]).
    pub health_listen: Option<std::net::SocketAddr>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            health_probe: Duration::from_secs(1),
            shutdown_grace: esq_runtime::config::DEFAULT_SHUTDOWN_GRACE,
            tls: None,
            limits: esq_runtime::limits::Limits::default(),
            subscribe_poll: Duration::from_millis(100),
            snapshot_every: commands::DEFAULT_SNAPSHOT_EVERY,
            auth: None,
            health_listen: None,
        }
    }
}

/// The aggregate snapshot flag, shared by `write-svc` and `esq dev`.
#[derive(Debug, Clone, clap::Args)]
pub struct SnapshotArgs {
    /// Aggregate snapshots: a command whose load folded this many events past the stream's
    /// last snapshot writes a new one in the background, so commands on long streams fold only
    /// the events after it. 0 turns snapshots off.
    #[arg(long, env = "ESQ_SNAPSHOT_EVERY", default_value_t = commands::DEFAULT_SNAPSHOT_EVERY)]
    pub snapshot_every: u64,
}

/// The gRPC routes of write-svc, for embedding in a larger server.
pub fn routes<S: EventStore + ChangeFeed + Snapshots>(
    deps: Deps<S>,
    config: &Config,
) -> tonic::service::Routes {
    let max = esq_runtime::MAX_REQUEST_BYTES;
    let executor = commands::Executor::new(Arc::clone(&deps.store), deps.nudge.clone())
        .with_snapshot_every(config.snapshot_every);
    tonic::service::Routes::new(
        EventStoreServer::new(api::EventStoreApi::new(
            deps.store,
            deps.nudge,
            executor.clone(),
            config.subscribe_poll,
        ))
        .max_decoding_message_size(max),
    )
    .add_service(
        CartCommandsServer::new(domain_api::CartCommandsApi(executor.clone()))
            .max_decoding_message_size(max),
    )
    .add_service(
        BookCommandsServer::new(domain_api::BookCommandsApi(executor))
            .max_decoding_message_size(max),
    )
}

/// Serves write-svc on `listener` until `shutdown` is cancelled, then drains. Health reports
/// NOT_SERVING while the event store says it cannot serve.
pub async fn run<S: EventStore + ChangeFeed + Snapshots>(
    listener: TcpListener,
    deps: Deps<S>,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(addr = ?listener.local_addr().ok(), "write-svc listening");
    let mut options = esq_runtime::GrpcOptions::new(SERVICES);
    options.grace = config.shutdown_grace;
    options.auth = config.auth.clone();
    options.health_listen = config.health_listen;
    options.tls = config.tls.clone();
    options.limits = config.limits.clone();
    let probe =
        options
            .readiness
            .probe("the event store", config.health_probe, shutdown.clone(), {
                let store = Arc::clone(&deps.store);
                move || {
                    let store = Arc::clone(&store);
                    async move { store.ping().await }
                }
            });
    let served = esq_runtime::serve_grpc(listener, routes(deps, &config), options, shutdown).await;
    probe.abort();
    served
}

/// A [`Nudge`] that publishes `kind/id@version` on a Redis pub/sub channel, with the append's
/// events when they are small ([`esq_eventstore::nudge_message`]). Appends never wait
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
    Arc::new(move |stream, result, events| {
        // A backed-up queue holds plain nudges only (see `NUDGE_CARRIED_QUEUED`).
        let carried = if esq_eventstore::nudge_may_carry(tx.capacity(), tx.max_capacity()) {
            events
        } else {
            &[]
        };
        let _ = tx.try_send(esq_eventstore::nudge_message(stream, result, carried));
    })
}
