//! What a row gets to work with: the run's size and rounds, the backends (Cassandra, Redis),
//! the folder of the release binaries, and helpers that start the services as real processes —
//! the cluster stack (write-svc, projector, read-svc over Cassandra + Redis, started once per
//! run and shared by the rows) and `esq dev` (a fresh one per call).

use crate::load::Load;
use crate::sys::{pid_listening_on, Watched};
use anyhow::Context as _;
use esq::pb::cart::v1::{
    cart_commands_client::CartCommandsClient, cart_queries_client::CartQueriesClient,
};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint};

/// How big a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Size {
    /// Tiny: every row once, in seconds, so the test command can prove the harness works.
    /// Its figures mean nothing.
    Smoke,
    /// The real measurement that `BENCHMARKS.md` reports.
    Full,
}

impl Size {
    /// `smoke` or `full`.
    pub fn name(self) -> &'static str {
        match self {
            Size::Smoke => "smoke",
            Size::Full => "full",
        }
    }
}

/// Where the real backends are.
#[derive(Debug, Clone)]
pub struct Backends {
    /// Cassandra's CQL address, `host:port`.
    pub cassandra: String,
    /// Redis URL, `redis://host:port`.
    pub redis: String,
}

impl Backends {
    /// A new multiplexed Redis connection; its I/O task runs on the runtime of the caller.
    pub async fn redis(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.redis.as_str())?;
        // The crate's default 500 ms response timeout fails a baseline on a busy machine (a
        // SCAN or a pipeline waiting behind the load); latencies are measured, not bounded.
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(30)));
        Ok(client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }

    /// A new raw `scylla` driver session to Cassandra (for the raw-driver baselines; prepare
    /// statements on it, as esq does); its connections' tasks run on the runtime of the caller.
    pub async fn scylla(&self) -> anyhow::Result<scylla::client::session::Session> {
        Ok(scylla::client::session_builder::SessionBuilder::new()
            .known_node(&self.cassandra)
            .build()
            .await?)
    }

    /// Redis's `(host, port)` from its URL.
    pub fn redis_host_port(&self) -> anyhow::Result<(String, u16)> {
        let rest = self
            .redis
            .strip_prefix("redis://")
            .context("the Redis URL must start with redis://")?;
        let rest = rest.rsplit('@').next().unwrap_or(rest);
        let rest = rest.split('/').next().unwrap_or(rest);
        let (host, port) = rest
            .rsplit_once(':')
            .map_or((rest, "6379"), |(h, p)| (h, p));
        Ok((host.to_owned(), port.parse().context("Redis port")?))
    }

    /// Cassandra's CQL port.
    pub fn cassandra_port(&self) -> anyhow::Result<u16> {
        self.cassandra
            .rsplit_once(':')
            .context("Cassandra address must be host:port")?
            .1
            .parse()
            .context("Cassandra port")
    }
}

/// Everything a row needs. One per run, shared by every row.
pub struct Ctx {
    size: Size,
    rounds: usize,
    backends: Backends,
    bin_dir: PathBuf,
    work: tempfile::TempDir,
    cluster: tokio::sync::OnceCell<Cluster>,
}

impl Ctx {
    /// A context for a run of `size` with `rounds` rounds per row, using `backends` and the
    /// binaries in `bin_dir`.
    pub fn new(
        size: Size,
        rounds: usize,
        backends: Backends,
        bin_dir: PathBuf,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            size,
            rounds: rounds.max(1),
            backends,
            bin_dir,
            work: tempfile::Builder::new().prefix("esq-bench.").tempdir()?,
            cluster: tokio::sync::OnceCell::new(),
        })
    }

    /// The run's size.
    pub fn size(&self) -> Size {
        self.size
    }

    /// `smoke` in a smoke run, `full` in a full one: `ctx.pick(20, 2_000)`.
    pub fn pick<T>(&self, smoke: T, full: T) -> T {
        match self.size {
            Size::Smoke => smoke,
            Size::Full => full,
        }
    }

    /// How many interleaved rounds each row runs (its esq side, then its baseline, per round).
    pub fn rounds(&self) -> usize {
        self.rounds
    }

    /// The measured interval of one side of one round (0.5 s smoke, 4 s full).
    pub fn duration(&self) -> Duration {
        self.pick(Duration::from_millis(500), Duration::from_secs(4))
    }

    /// A closed-loop [`Load`] of `concurrency` workers for [`Ctx::duration`], with a warm-up of
    /// 0.1 s (smoke) or 1 s (full).
    pub fn load(&self, concurrency: usize) -> Load {
        Load::new(concurrency, self.duration())
            .warmup(self.pick(Duration::from_millis(100), Duration::from_secs(1)))
    }

    /// The backends.
    pub fn backends(&self) -> &Backends {
        &self.backends
    }

    /// The folder holding `write-svc`, `read-svc`, `projector` and `esq`.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// A scratch folder of this run (removed at the end).
    pub fn work_dir(&self) -> &Path {
        self.work.path()
    }

    /// The Redis server's process (for CPU sampling), if visible on this machine.
    pub fn redis_proc(&self) -> Option<Watched> {
        let (_, port) = self.backends.redis_host_port().ok()?;
        pid_listening_on(port).map(|pid| Watched::new("redis", pid))
    }

    /// The Cassandra node's process (for CPU sampling), if visible on this machine.
    pub fn cassandra_proc(&self) -> Option<Watched> {
        let port = self.backends.cassandra_port().ok()?;
        pid_listening_on(port).map(|pid| Watched::new("cassandra", pid))
    }

    /// A new multiplexed Redis connection (see [`Backends::redis`]).
    pub async fn redis(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        self.backends.redis().await
    }

    /// A new raw `scylla` driver session to Cassandra (see [`Backends::scylla`]).
    pub async fn scylla(&self) -> anyhow::Result<scylla::client::session::Session> {
        self.backends.scylla().await
    }

    /// The shared cluster stack (write-svc, projector, read-svc as processes over Cassandra +
    /// Redis, in a keyspace and key prefix of this run), started on first use and reused by
    /// every row after. Rows that need a stack of their own use [`Ctx::start_cluster`].
    pub async fn cluster(&self) -> anyhow::Result<&Cluster> {
        self.cluster
            .get_or_try_init(|| self.start_cluster(Vec::new()))
            .await
    }

    /// A cluster stack of its own (own keyspace and prefix), with `env` added to every
    /// process's environment (e.g. `("ESQ_SHARDS", "4")`). Stopped when dropped.
    pub async fn start_cluster(&self, env: Vec<(String, String)>) -> anyhow::Result<Cluster> {
        Cluster::start(self, env).await
    }

    /// A fresh `esq dev` process over a new data folder, serving write and read on loopback.
    /// Killed when the returned [`Dev`] is dropped.
    pub async fn dev(&self) -> anyhow::Result<Dev> {
        Dev::start(self, &[]).await
    }

    /// [`Ctx::dev`] with `env` added to the process's environment (e.g.
    /// `("ESQ_GROUP_COMMIT_MAX", "1")`).
    pub async fn dev_with(&self, env: &[(String, String)]) -> anyhow::Result<Dev> {
        Dev::start(self, env).await
    }

    /// Cleans what the run left in the backends (the shared stack's keyspace and keys).
    pub async fn finish(&self) -> anyhow::Result<()> {
        if let Some(cluster) = self.cluster.get() {
            cluster.cleanup(self).await?;
        }
        Ok(())
    }
}

/// A free loopback address, drawn below Linux's ephemeral range (see `free_port` in
/// scripts/test) from 20000–29999.
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    for _ in 0..1000 {
        let port = 20_000 + (uuid::Uuid::new_v4().as_u128() % 10_000) as u16;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if TcpListener::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    anyhow::bail!("no free loopback port between 20000 and 29999")
}

/// A gRPC channel to `addr`, retrying for a while as the server starts.
pub async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(30))
        .tcp_nodelay(true);
    let mut last = None;
    for _ in 0..300 {
        match endpoint.connect().await {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(anyhow::anyhow!("cannot connect to {addr}: {last:?}"))
}

/// Waits until the gRPC health check at `addr` answers SERVING.
pub async fn wait_serving(addr: SocketAddr, within: Duration) -> anyhow::Result<()> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let ok = async {
            let ch = channel(addr).await?;
            let r = HealthClient::new(ch)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await?;
            anyhow::Ok(r.into_inner().status == 1)
        };
        if let Ok(Ok(true)) = tokio::time::timeout(Duration::from_secs(3), ok).await {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{addr} did not become SERVING within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One service process started by the harness (killed when dropped).
pub struct Proc {
    /// Binary name (`write-svc`, `projector`, `read-svc`, `esq`).
    pub name: String,
    /// Its gRPC address.
    pub addr: SocketAddr,
    /// Its log file.
    pub log: PathBuf,
    child: Child,
}

impl Proc {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// The process as a [`Watched`] for CPU and memory sampling.
    pub fn watched(&self) -> Watched {
        Watched::new(self.name.clone(), self.pid())
    }

    /// Stops the process the way an orchestrator does: SIGTERM (it drains and gives up its
    /// leases), SIGKILL if it is still there after 20 s; then reaps it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
            if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
                .await
                .is_ok()
            {
                return Ok(());
            }
        }
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }
}

fn spawn(
    ctx: &Ctx,
    bin: &str,
    args: &[String],
    env: &[(String, String)],
    addr: SocketAddr,
) -> anyhow::Result<Proc> {
    let path = ctx.bin_dir.join(bin);
    anyhow::ensure!(
        path.exists(),
        "{} is missing: build the binaries first (cargo build --release --workspace --bins)",
        path.display()
    );
    let logs = ctx.work.path().join("logs");
    std::fs::create_dir_all(&logs)?;
    let n = std::fs::read_dir(&logs)?.count();
    let log = logs.join(format!("{bin}-{n}.log"));
    let file = std::fs::File::create(&log)?;
    let mut cmd = Command::new(&path);
    cmd.args(args)
        .env_remove("ESQ_METRICS_ADDR")
        // Plaintext on loopback: the services refuse to start without TLS unless told so.
        .env("ESQ_INSECURE", "true")
        .env("RUST_LOG", "warn")
        .env("LOG_FORMAT", "plain")
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", path.display()))?;
    Ok(Proc {
        name: bin.to_owned(),
        addr,
        log,
        child,
    })
}

/// The cluster stack: write-svc, projector and read-svc as processes over Cassandra + Redis,
/// in a keyspace and key prefix of their own.
pub struct Cluster {
    /// The Cassandra keyspace.
    pub keyspace: String,
    /// The Redis key prefix (documents are `<prefix>:<projection>:{<id>}` hashes).
    pub prefix: String,
    /// write-svc.
    pub write: Proc,
    /// read-svc.
    pub read: Proc,
    projector: Mutex<Option<Proc>>,
    env: Vec<(String, String)>,
    /// A channel to write-svc.
    pub write_channel: Channel,
    /// A channel to read-svc.
    pub read_channel: Channel,
    watch: Vec<Watched>,
}

impl Cluster {
    async fn start(ctx: &Ctx, extra: Vec<(String, String)>) -> anyhow::Result<Self> {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let keyspace = format!("esq_bench_{}", &tag[..12]);
        let prefix = format!("esqb{}", &tag[..12]);
        let b = &ctx.backends;
        let mut env: Vec<(String, String)> = [
            ("ESQ_CQL_NODES", b.cassandra.as_str()),
            ("ESQ_CQL_KEYSPACE", keyspace.as_str()),
            ("ESQ_REDIS_URL", b.redis.as_str()),
            ("ESQ_REDIS_PREFIX", prefix.as_str()),
            ("ESQ_NUDGE_URL", b.redis.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        env.push(("ESQ_NUDGE_CHANNEL".into(), format!("{prefix}:nudge")));
        env.extend(extra);
        let with_addr = |env: &[(String, String)], addr: SocketAddr| {
            let mut env = env.to_vec();
            env.push(("ESQ_LISTEN".into(), addr.to_string()));
            env
        };
        // write-svc first: it creates the schema the others read.
        let addr = free_addr()?;
        let write = spawn(ctx, "write-svc", &[], &with_addr(&env, addr), addr)?;
        wait_serving(write.addr, Duration::from_secs(180)).await?;
        let addr = free_addr()?;
        let projector = Self::spawn_projector(ctx, &env, addr)?;
        let addr = free_addr()?;
        let read = spawn(ctx, "read-svc", &[], &with_addr(&env, addr), addr)?;
        wait_serving(projector.addr, Duration::from_secs(120)).await?;
        wait_serving(read.addr, Duration::from_secs(120)).await?;
        let mut watch = vec![write.watched(), projector.watched(), read.watched()];
        watch.extend(ctx.cassandra_proc());
        watch.extend(ctx.redis_proc());
        Ok(Self {
            keyspace,
            prefix,
            write_channel: channel(write.addr).await?,
            read_channel: channel(read.addr).await?,
            write,
            read,
            projector: Mutex::new(Some(projector)),
            env,
            watch,
        })
    }

    fn spawn_projector(
        ctx: &Ctx,
        env: &[(String, String)],
        addr: SocketAddr,
    ) -> anyhow::Result<Proc> {
        let mut env = env.to_vec();
        env.push(("ESQ_LISTEN".into(), addr.to_string()));
        env.push((
            "ESQ_PROJECTOR_ID".into(),
            format!("bench-{}", uuid::Uuid::new_v4().simple()),
        ));
        spawn(ctx, "projector", &[], &env, addr)
    }

    /// A `CartCommands` client on write-svc.
    pub fn carts(&self) -> CartCommandsClient<Channel> {
        CartCommandsClient::new(self.write_channel.clone())
    }

    /// A `CartQueries` client on read-svc.
    pub fn cart_queries(&self) -> CartQueriesClient<Channel> {
        CartQueriesClient::new(self.read_channel.clone())
    }

    /// Every process of the stack and its backends, for CPU sampling: write-svc, projector,
    /// read-svc, cassandra and redis (those visible on this machine).
    pub fn watch(&self) -> Vec<Watched> {
        let mut w = self.watch.clone();
        if let Some(p) = self.projector_proc() {
            w.retain(|x| x.name != "projector");
            w.insert(1, p);
        }
        w
    }

    /// The processes named in `names` among [`Cluster::watch`].
    pub fn watch_only(&self, names: &[&str]) -> Vec<Watched> {
        self.watch()
            .into_iter()
            .filter(|w| names.contains(&w.name.as_str()))
            .collect()
    }

    /// The running projector process, if one runs.
    pub fn projector_proc(&self) -> Option<Watched> {
        self.projector.lock().ok()?.as_ref().map(|p| p.watched())
    }

    /// The running projector's gRPC address (it serves `esq.v1.Projections`), if one runs.
    pub fn projector_addr(&self) -> Option<SocketAddr> {
        self.projector.lock().ok()?.as_ref().map(|p| p.addr)
    }

    /// Stops the projector (SIGTERM, then SIGKILL after 20 s; see [`Proc::stop`]).
    pub async fn stop_projector(&self) -> anyhow::Result<()> {
        let p = self
            .projector
            .lock()
            .map_err(|_| anyhow::anyhow!("projector lock poisoned"))?
            .take();
        if let Some(p) = p {
            p.stop().await?;
        }
        Ok(())
    }

    /// Starts a projector (stopping the running one first), with `extra` environment, and
    /// waits until it serves. Returns its process for sampling.
    pub async fn start_projector(
        &self,
        ctx: &Ctx,
        extra: &[(String, String)],
    ) -> anyhow::Result<Watched> {
        self.stop_projector().await?;
        let mut env = self.env.clone();
        env.extend(extra.iter().cloned());
        let addr = free_addr()?;
        let p = Self::spawn_projector(ctx, &env, addr)?;
        wait_serving(p.addr, Duration::from_secs(120)).await?;
        let w = p.watched();
        *self
            .projector
            .lock()
            .map_err(|_| anyhow::anyhow!("projector lock poisoned"))? = Some(p);
        Ok(w)
    }

    /// The Redis key of document `id` of `projection` (`cart2` for carts).
    pub fn doc_key(&self, projection: &str, id: &str) -> String {
        format!("{}:{projection}:{{{id}}}", self.prefix)
    }

    /// Drops the keyspace and deletes the keys of this stack.
    pub async fn cleanup(&self, ctx: &Ctx) -> anyhow::Result<()> {
        self.stop_projector().await?;
        let session = ctx.scylla().await?;
        session
            .query_unpaged(format!("DROP KEYSPACE IF EXISTS {}", self.keyspace), &[])
            .await?;
        let mut conn = ctx.redis().await?;
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}:*", self.prefix))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            if !keys.is_empty() {
                let _: usize = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}

/// A running `esq dev` (one process: write-svc, projector and read-svc on embedded storage).
pub struct Dev {
    /// The process.
    pub proc: Proc,
    /// Where write-svc listens.
    pub write_addr: SocketAddr,
    /// Where read-svc listens.
    pub read_addr: SocketAddr,
    /// A channel to write-svc.
    pub write_channel: Channel,
    /// A channel to read-svc.
    pub read_channel: Channel,
    /// Its data folder.
    pub data_dir: PathBuf,
}

impl Dev {
    async fn start(ctx: &Ctx, env: &[(String, String)]) -> anyhow::Result<Self> {
        let data_dir = ctx
            .work
            .path()
            .join(format!("dev-{}", uuid::Uuid::new_v4().simple()));
        let write_addr = free_addr()?;
        let read_addr = free_addr()?;
        let args: Vec<String> = vec![
            "dev".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--write-addr".into(),
            write_addr.to_string(),
            "--read-addr".into(),
            read_addr.to_string(),
            "--metrics-addr".into(),
            "off".into(),
        ];
        let proc = spawn(ctx, "esq", &args, env, write_addr)?;
        wait_serving(write_addr, Duration::from_secs(60)).await?;
        wait_serving(read_addr, Duration::from_secs(60)).await?;
        Ok(Self {
            write_channel: channel(write_addr).await?,
            read_channel: channel(read_addr).await?,
            proc,
            write_addr,
            read_addr,
            data_dir,
        })
    }

    /// A `CartCommands` client.
    pub fn carts(&self) -> CartCommandsClient<Channel> {
        CartCommandsClient::new(self.write_channel.clone())
    }

    /// A `CartQueries` client.
    pub fn cart_queries(&self) -> CartQueriesClient<Channel> {
        CartQueriesClient::new(self.read_channel.clone())
    }

    /// The process, for CPU and memory sampling (named `esq-dev`).
    pub fn watched(&self) -> Watched {
        Watched::new("esq-dev", self.proc.pid())
    }
}
