//! The single-process dev stack behind `esq dev` (also what the system tests start).

use anyhow::Context as _;
use esq_eventstore::embedded::EmbeddedStore;
use esq_readstore::memory::MemoryStore;
use esq_runtime::metrics::Metered;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The services `esq dev` serves on its read-svc address: read-svc's and `esq.v1.Projections`.
pub fn read_services() -> &'static [&'static str] {
    static ALL: OnceLock<Vec<&'static str>> = OnceLock::new();
    ALL.get_or_init(|| {
        let mut all = esq_read_svc::SERVICES.to_vec();
        all.push(esq_projector::admin::SERVICE);
        all
    })
}

/// Where the dev stack keeps its data and listens.
#[derive(Debug, Clone)]
pub struct DevConfig {
    /// Folder of the embedded event store (created if missing).
    pub data_dir: PathBuf,
    /// Tunables of the embedded event store (group commit).
    pub store: esq_eventstore::embedded::Options,
    /// write-svc address (port 0 picks a free port).
    pub write_addr: SocketAddr,
    /// read-svc address (port 0 picks a free port).
    pub read_addr: SocketAddr,
    /// Projector tunables.
    pub projector: esq_projector::Config,
    /// read-svc tunables.
    pub read: esq_read_svc::Config,
    /// Longest drain of both servers on shutdown before open connections are closed.
    pub shutdown_grace: std::time::Duration,
    /// Where to serve Prometheus metrics (`GET /metrics`); `None` serves none.
    pub metrics_addr: Option<SocketAddr>,
    /// Aggregate snapshots every this many events (0: off), see `esq_write_svc::Config`.
    pub snapshot_every: u64,
    /// Bearer-token authentication of both servers (`None`, the default: anyone on loopback
    /// may call).
    pub auth: Option<esq_runtime::auth::Authenticator>,
    /// TLS of both servers; `None` (the default) serves plaintext on loopback.
    pub tls: Option<esq_runtime::tls::ServerTls>,
    /// Load shedding and the default deadline of both servers (each has its own budget).
    pub limits: esq_runtime::limits::Limits,
}

impl DevConfig {
    /// Defaults for a data folder: loopback, ports 50051 (write) and 50052 (read).
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            store: esq_eventstore::embedded::Options::default(),
            write_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            read_addr: SocketAddr::from(([127, 0, 0, 1], 50052)),
            // The in-process memory read store has no other projector.
            projector: esq_projector::Config {
                sole_projector: true,
                ..esq_projector::Config::default()
            },
            read: esq_read_svc::Config::default(),
            shutdown_grace: esq_runtime::config::DEFAULT_SHUTDOWN_GRACE,
            metrics_addr: None,
            snapshot_every: esq_write_svc::commands::DEFAULT_SNAPSHOT_EVERY,
            auth: None,
            tls: None,
            limits: esq_runtime::limits::Limits::default(),
        }
    }
}

/// A running dev stack.
pub struct DevStack {
    /// Where write-svc listens.
    pub write_addr: SocketAddr,
    /// Where read-svc listens.
    pub read_addr: SocketAddr,
    /// Where metrics are served, if they are.
    pub metrics_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tasks: JoinSet<anyhow::Result<()>>,
}

impl DevStack {
    /// Opens the store, rebuilds the read model from the change log, then serves both gRPC
    /// services and tails the log until `shutdown` is cancelled.
    pub async fn start(config: DevConfig, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let store = Arc::new(Metered(
            EmbeddedStore::open_with(&config.data_dir, config.store).with_context(|| {
                format!(
                    "cannot open the event store in {}",
                    config.data_dir.display()
                )
            })?,
        ));
        let read = Arc::new(MemoryStore::default());
        let projector = Arc::new(esq_projector::Projector::new(
            Arc::clone(&store),
            Arc::clone(&store),
            Arc::clone(&read),
            config.projector.clone(),
        ));
        // Catch up before serving, so the first query after a restart sees every event.
        let pages = projector
            .catch_up()
            .await
            .context("rebuilding the read model")?;
        tracing::info!(pages, "read model rebuilt from the event store");

        let write_listener = esq_runtime::bind(config.write_addr).await?;
        let read_listener = esq_runtime::bind(config.read_addr).await?;
        let metrics_addr = esq_runtime::metrics::MetricsArgs {
            metrics_addr: config.metrics_addr,
        }
        .spawn(&shutdown)
        .await?;
        let write_addr = write_listener.local_addr()?;
        let read_addr = read_listener.local_addr()?;

        let wake = Arc::new(Notify::new());
        let nudge_target = Arc::clone(&wake);
        let nudge: esq_write_svc::Nudge = Arc::new(move |_, _, _| nudge_target.notify_one());

        let mut tasks = JoinSet::new();
        let s = shutdown.clone();
        let admin = esq_projector::admin::server(Arc::clone(&projector));
        tasks.spawn(async move {
            projector.run(wake, None, s).await;
            Ok(())
        });
        let write_config = esq_write_svc::Config {
            shutdown_grace: config.shutdown_grace,
            snapshot_every: config.snapshot_every,
            auth: config.auth.clone(),
            tls: config.tls.clone(),
            limits: config.limits.clone(),
            ..esq_write_svc::Config::default()
        };
        // read-svc's temporal queries read the same embedded store, read only.
        let read_deps = esq_read_svc::Deps {
            read,
            history: Some(Arc::clone(&store)),
        };
        tasks.spawn(esq_write_svc::run(
            write_listener,
            esq_write_svc::Deps {
                store,
                nudge: Some(nudge),
            },
            write_config,
            shutdown.clone(),
        ));
        let read_config = esq_read_svc::Config {
            shutdown_grace: config.shutdown_grace,
            auth: config.auth.clone(),
            tls: config.tls.clone(),
            limits: config.limits.clone(),
            ..config.read
        };
        // The projections' operator API rides on the read-svc address.
        tasks.spawn(esq_read_svc::run_with(
            read_listener,
            read_deps,
            read_config,
            move |routes| routes.add_service(admin),
            read_services(),
            shutdown.clone(),
        ));
        Ok(Self {
            write_addr,
            read_addr,
            metrics_addr,
            shutdown,
            tasks,
        })
    }

    /// Waits until every component has stopped; the first failure cancels the others.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        while let Some(done) = self.tasks.join_next().await {
            let result = done.context("a dev-stack task panicked").and_then(|r| r);
            if let Err(e) = result {
                self.shutdown.cancel();
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Stops every component and waits for them.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }
}
