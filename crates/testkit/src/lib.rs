//! esq testkit: starts esq in-process on loopback port 0 for system tests, and connects typed
//! gRPC clients to it. Each harness has its own data folder, so tests never share state.

use esq::pb::bookshop::v1::{
    book_commands_client::BookCommandsClient, book_queries_client::BookQueriesClient,
};
use esq::pb::cart::v1::{
    cart_commands_client::CartCommandsClient, cart_queries_client::CartQueriesClient,
};
use esq::pb::v1::{event_store_client::EventStoreClient, state_queries_client::StateQueriesClient};
pub mod auth;
pub mod cluster;
pub mod fuzz;
pub mod metrics;
pub mod pki;
pub mod redis_ha;
pub mod ring;

use esq_cli::dev::{DevConfig, DevStack};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

/// Typed clients of both services of one esq deployment, over plain channels (`C` =
/// [`Channel`]) or channels that send a bearer token ([`auth::TokenChannel`],
/// [`Clients::connect_with_token`]).
#[derive(Clone)]
pub struct Clients<C = Channel> {
    /// `esq.v1.EventStore` on write-svc.
    pub events: EventStoreClient<C>,
    /// `esq.cart.v1.CartCommands` on write-svc.
    pub carts: CartCommandsClient<C>,
    /// `esq.bookshop.v1.BookCommands` on write-svc.
    pub books: BookCommandsClient<C>,
    /// `esq.cart.v1.CartQueries` on read-svc.
    pub cart_queries: CartQueriesClient<C>,
    /// `esq.bookshop.v1.BookQueries` on read-svc.
    pub book_queries: BookQueriesClient<C>,
    /// `esq.v1.StateQueries` on read-svc.
    pub state: StateQueriesClient<C>,
    /// The raw write-svc channel (health checks).
    pub write_channel: Channel,
    /// The raw read-svc channel (health checks).
    pub read_channel: Channel,
}

/// Connects to a gRPC server on loopback, retrying briefly while it starts.
pub async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    connect_endpoint(addr, endpoint(addr, None)?).await
}

/// Connects over TLS to a gRPC server on loopback (verified against `tls`'s CA, with its client
/// certificate if it has one), retrying briefly while it starts.
pub async fn tls_channel(addr: SocketAddr, tls: &pki::ClientTls) -> anyhow::Result<Channel> {
    connect_endpoint(addr, endpoint(addr, Some(tls))?).await
}

/// Whether the run opted out of the real backends (`ESQ_SKIP_REAL_BACKENDS=1`); if so, says on
/// stderr that `test` is skipped by request.
pub fn real_backends_skipped(test: &str) -> bool {
    let skipped = std::env::var("ESQ_SKIP_REAL_BACKENDS").as_deref() == Ok("1");
    if skipped {
        eprintln!("{test}: SKIPPED by request (ESQ_SKIP_REAL_BACKENDS=1)");
    }
    skipped
}

/// The non-empty environment variable `name` that `test` needs. Panics otherwise, naming it,
/// `how` to get it, and the explicit opt-out: a test never skips silently.
pub fn required_env(test: &str, name: &str, how: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| {
            panic!(
                "{test} needs {name}; {how}, or set ESQ_SKIP_REAL_BACKENDS=1 to skip the \
                 real-backend tests explicitly"
            )
        })
}

/// The endpoint of a server on loopback: plaintext, or TLS with `tls`.
pub fn endpoint(addr: SocketAddr, tls: Option<&pki::ClientTls>) -> anyhow::Result<Endpoint> {
    let endpoint = match tls {
        None => Endpoint::from_shared(format!("http://{addr}"))?,
        Some(tls) => Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls.config())?,
    };
    Ok(endpoint
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(30)))
}

async fn connect_endpoint(addr: SocketAddr, endpoint: Endpoint) -> anyhow::Result<Channel> {
    let mut last = None;
    for _ in 0..100 {
        match endpoint.connect().await {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(anyhow::anyhow!("cannot connect to {addr}: {last:?}"))
}

impl Clients {
    /// Clients that are not connected anywhere yet (calls fail until replaced).
    pub fn placeholder() -> Self {
        let c = Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        Self {
            events: EventStoreClient::new(c.clone()),
            carts: CartCommandsClient::new(c.clone()),
            books: BookCommandsClient::new(c.clone()),
            cart_queries: CartQueriesClient::new(c.clone()),
            book_queries: BookQueriesClient::new(c.clone()),
            state: StateQueriesClient::new(c.clone()),
            write_channel: c.clone(),
            read_channel: c,
        }
    }

    /// Clients for write-svc at `write` and read-svc at `read`.
    pub async fn connect(write: SocketAddr, read: SocketAddr) -> anyhow::Result<Self> {
        Ok(Self::over(channel(write).await?, channel(read).await?))
    }

    /// Clients over TLS (see [`tls_channel`]) for write-svc at `write` and read-svc at `read`.
    pub async fn connect_tls(
        write: SocketAddr,
        read: SocketAddr,
        tls: &pki::ClientTls,
    ) -> anyhow::Result<Self> {
        Ok(Self::over(
            tls_channel(write, tls).await?,
            tls_channel(read, tls).await?,
        ))
    }

    /// Clients over the channels `w` (write-svc) and `r` (read-svc).
    pub fn over(w: Channel, r: Channel) -> Self {
        Self {
            events: EventStoreClient::new(w.clone()),
            carts: CartCommandsClient::new(w.clone()),
            books: BookCommandsClient::new(w.clone()),
            cart_queries: CartQueriesClient::new(r.clone()),
            book_queries: BookQueriesClient::new(r.clone()),
            state: StateQueriesClient::new(r.clone()),
            write_channel: w,
            read_channel: r,
        }
    }
}

impl Clients<auth::TokenChannel> {
    /// Clients for write-svc at `write` and read-svc at `read` whose every call carries
    /// `authorization: Bearer <token>` (the raw channels carry none).
    pub async fn connect_with_token(
        write: SocketAddr,
        read: SocketAddr,
        token: &str,
    ) -> anyhow::Result<Self> {
        let w = channel(write).await?;
        let r = channel(read).await?;
        let (tw, tr) = (
            auth::with_token(w.clone(), token),
            auth::with_token(r.clone(), token),
        );
        Ok(Self {
            events: EventStoreClient::new(tw.clone()),
            carts: CartCommandsClient::new(tw.clone()),
            books: BookCommandsClient::new(tw),
            cart_queries: CartQueriesClient::new(tr.clone()),
            book_queries: BookQueriesClient::new(tr.clone()),
            state: StateQueriesClient::new(tr),
            write_channel: w,
            read_channel: r,
        })
    }
}

/// The embedded dev stack on port 0 over a data folder.
pub struct DevHarness {
    stack: Option<DevStack>,
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    /// Clients connected to the running stack.
    pub clients: Clients,
}

impl DevHarness {
    /// Starts a stack over a fresh temporary folder.
    pub async fn start() -> anyhow::Result<Self> {
        let temp = tempfile::tempdir()?;
        let dir = temp.path().to_path_buf();
        let mut h = Self::start_in(&dir).await?;
        h._temp = Some(temp);
        Ok(h)
    }

    /// Starts a stack over a fresh temporary folder, with `configure` applied to its config.
    pub async fn start_with(configure: impl FnOnce(&mut DevConfig)) -> anyhow::Result<Self> {
        let temp = tempfile::tempdir()?;
        let dir = temp.path().to_path_buf();
        let mut h = Self::start_configured(&dir, configure).await?;
        h._temp = Some(temp);
        Ok(h)
    }

    /// Starts a stack over `dir` (kept after the harness is dropped).
    pub async fn start_in(dir: &Path) -> anyhow::Result<Self> {
        Self::start_configured(dir, |_| {}).await
    }

    /// Starts a stack over a fresh temporary folder serving TLS with `tls` (both services),
    /// `configure` applied to its config; the clients connect with `client`.
    pub async fn start_tls(
        tls: esq_runtime::tls::ServerTls,
        client: &pki::ClientTls,
        configure: impl FnOnce(&mut DevConfig),
    ) -> anyhow::Result<Self> {
        let temp = tempfile::tempdir()?;
        let dir = temp.path().to_path_buf();
        let mut config = Self::config(&dir);
        config.tls = Some(tls);
        configure(&mut config);
        let stack = DevStack::start(config, CancellationToken::new()).await?;
        let clients = Clients::connect_tls(stack.write_addr, stack.read_addr, client).await?;
        Ok(Self {
            stack: Some(stack),
            dir,
            _temp: Some(temp),
            clients,
        })
    }

    fn config(dir: &Path) -> DevConfig {
        let mut config = DevConfig::new(dir);
        config.write_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        config.read_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        config.projector.poll_interval = Duration::from_millis(50);
        config
    }

    /// Where write-svc listens.
    pub fn write_addr(&self) -> Option<SocketAddr> {
        self.stack.as_ref().map(|s| s.write_addr)
    }

    /// Where read-svc (and `esq.v1.Projections`) listens.
    pub fn read_addr(&self) -> Option<SocketAddr> {
        self.stack.as_ref().map(|s| s.read_addr)
    }

    async fn start_configured(
        dir: &Path,
        configure: impl FnOnce(&mut DevConfig),
    ) -> anyhow::Result<Self> {
        let mut config = Self::config(dir);
        configure(&mut config);
        let stack = DevStack::start(config, CancellationToken::new()).await?;
        let clients = Clients::connect(stack.write_addr, stack.read_addr).await?;
        Ok(Self {
            stack: Some(stack),
            dir: dir.to_path_buf(),
            _temp: None,
            clients,
        })
    }

    /// Stops the stack and starts a new one over the same folder (new ports, fresh read model).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(stack) = self.stack.take() {
            stack.stop().await?;
        }
        let next = Self::start_in(&self.dir).await?;
        self.clients = next.clients.clone();
        self.stack = next.into_stack();
        Ok(())
    }

    fn into_stack(mut self) -> Option<DevStack> {
        self.stack.take()
    }

    /// Stops the stack.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        match self.stack.take() {
            Some(stack) => stack.stop().await,
            None => Ok(()),
        }
    }
}
