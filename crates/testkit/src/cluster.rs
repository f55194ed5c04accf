//! The distributed deployment for system tests: write-svc, projector and read-svc as separate
//! processes (the real binaries) against a real Cassandra node and a real Redis, each harness
//! in its own keyspace and Redis key prefix.
//!
//! The backends are named by `ESQ_TEST_CASSANDRA` (`host:port`) and `ESQ_TEST_REDIS`
//! (`redis://host:port`), which `scripts/test` sets after starting them. When they are missing
//! the tests fail loudly, unless the run opts out with `ESQ_SKIP_REAL_BACKENDS=1`.

use crate::pki::{ClientTls, TestPki};
use crate::{endpoint, Clients};
use anyhow::Context as _;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

/// Addresses of the real backends.
#[derive(Debug, Clone)]
pub struct Backends {
    /// Cassandra's CQL address, `host:port`.
    pub cassandra: String,
    /// Redis URL.
    pub redis: String,
}

impl Backends {
    /// The backends named by the environment; `None` (with a note on stderr) only when the run
    /// opted out with `ESQ_SKIP_REAL_BACKENDS=1`. Panics with instructions otherwise.
    pub fn from_env(test: &str) -> Option<Self> {
        if crate::real_backends_skipped(test) {
            return None;
        }
        let how = "run scripts/test (which starts Cassandra and Redis)";
        let get = |name: &str| crate::required_env(test, name, how);
        Some(Self {
            cassandra: get("ESQ_TEST_CASSANDRA"),
            redis: get("ESQ_TEST_REDIS"),
        })
    }
}

/// How many of each process to run, and their tunables.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// write-svc processes.
    pub write_services: usize,
    /// Projector processes.
    pub projectors: usize,
    /// Change-log shards.
    pub shards: u32,
    /// Whether write-svc nudges projectors through Redis pub/sub (the fast path); without it
    /// every change reaches the read model through the change log alone.
    pub nudges: bool,
    /// Whether the processes serve TLS and require client certificates (a throwaway PKI
    /// made for the harness); otherwise they serve plaintext. Both run with
    /// `ESQ_INSECURE=true` (no authentication required).
    pub tls: bool,
    /// Extra environment for every process.
    pub env: Vec<(String, String)>,
    /// How long each process may take to answer SERVING when the harness starts. The first
    /// write-svc creates the keyspace and tables first: on a Cassandra ring each statement
    /// waits for the nodes to agree on the schema, which took over 120 s on a loaded 2-core
    /// machine (a fresh-clone CI run, 2026-12-02: 12 s agreement timeouts, retried, for the
    /// keyspace and each table).
    pub serving_within: Duration,
}

impl ClusterOptions {
    /// These options with the processes pointed at a Redis Cluster (`ESQ_REDIS_CLUSTER=true`):
    /// for `Backends::redis` holding the comma list of its seed URLs.
    pub fn redis_cluster(mut self) -> Self {
        self.env
            .push(("ESQ_REDIS_CLUSTER".to_owned(), "true".to_owned()));
        self
    }
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            write_services: 1,
            projectors: 1,
            shards: 4,
            nudges: true,
            tls: false,
            env: Vec::new(),
            serving_within: Duration::from_secs(120),
        }
    }
}

/// One service process.
pub struct Proc {
    /// Binary name.
    pub name: String,
    /// Its gRPC address.
    pub addr: SocketAddr,
    /// Where it serves Prometheus metrics.
    pub metrics_addr: SocketAddr,
    child: Child,
}

impl Proc {
    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Kills the process with SIGKILL (no chance to clean up) and reaps it.
    pub async fn kill9(mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }
}

/// The kinds of process a harness runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A write-svc.
    Writer,
    /// A projector.
    Projector,
    /// The read-svc.
    Reader,
}

impl Role {
    /// The binary of this role.
    pub fn binary(self) -> &'static str {
        match self {
            Role::Writer => "write-svc",
            Role::Projector => "projector",
            Role::Reader => "read-svc",
        }
    }
}

/// write-svc(s), projector(s) and read-svc as processes over one keyspace and key prefix.
pub struct ClusterHarness {
    /// The backends.
    pub backends: Backends,
    /// This harness's keyspace.
    pub keyspace: String,
    /// This harness's Redis key prefix.
    pub prefix: String,
    options: ClusterOptions,
    logs: PathBuf,
    /// The write-svc processes.
    pub writers: Vec<Proc>,
    /// The projector processes.
    pub projectors: Vec<Proc>,
    /// The read-svc process.
    pub reader: Option<Proc>,
    /// Clients to the first write-svc and the read-svc.
    pub clients: Clients,
    /// The PKI of a TLS harness.
    pub pki: Option<TestPki>,
}

/// A free loopback address for a process to listen on. The port is drawn at random below
/// Linux's ephemeral range (32768 and up): a port the kernel handed out (port 0) is free only
/// until the process binds it, and meanwhile any outgoing connection (to Cassandra, Redis, a
/// service) may take it as its local port; below that range only another listener can.
///
/// A port is handed out at most once per test process: tests run concurrently, and two of them
/// drawing the same port before either process binds it left one service unable to listen
/// while the health check of the other answered for it (a read-svc "serving" as a projector).
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    const FIRST: u128 = 22_000;
    const COUNT: u128 = 10_000;
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    if given.len() > COUNT as usize / 2 {
        // A very long run: forget the oldest half (their processes are long gone).
        given.drain(..COUNT as usize / 4);
    }
    for _ in 0..1000 {
        let port = (FIRST + uuid::Uuid::new_v4().as_u128() % COUNT) as u16;
        if given.contains(&port) {
            continue;
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if TcpListener::bind(addr).is_ok() {
            given.push(port);
            return Ok(addr);
        }
    }
    anyhow::bail!(
        "no free loopback port between {FIRST} and {}",
        FIRST + COUNT
    )
}

/// The folder holding the workspace's binaries (next to this test executable's `deps/`).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test executable has no target folder")?;
    Ok(dir.to_path_buf())
}

/// Waits until the gRPC health check at `addr` answers SERVING.
pub async fn wait_serving(addr: SocketAddr, within: Duration) -> anyhow::Result<()> {
    wait_serving_with(addr, within, None).await
}

/// Waits until the gRPC health check at `addr` answers SERVING, over TLS with `tls` if given.
pub async fn wait_serving_with(
    addr: SocketAddr,
    within: Duration,
    tls: Option<&ClientTls>,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let ok = async {
            let ch = endpoint(addr, tls)?.connect().await?;
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
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("{addr} did not become SERVING within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl ClusterHarness {
    /// Starts the processes and waits until all serve.
    pub async fn start(backends: Backends, options: ClusterOptions) -> anyhow::Result<Self> {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let keyspace = format!("esq_t{}", &tag[..16]);
        let prefix = format!("esqt{}", &tag[..16]);
        let logs = std::env::temp_dir().join("esq-test-logs").join(&keyspace);
        std::fs::create_dir_all(&logs)?;
        let pki = if options.tls {
            Some(TestPki::generate()?)
        } else {
            None
        };
        let mut h = Self {
            backends,
            keyspace,
            prefix,
            options: options.clone(),
            logs,
            writers: Vec::new(),
            projectors: Vec::new(),
            reader: None,
            clients: Clients::placeholder(),
            pki,
        };
        let tls = h.client_tls();
        // The first write-svc creates the schema; the others start once it is there.
        let first = h.spawn("write-svc").await?;
        let within = options.serving_within;
        wait_serving_with(first.addr, within, tls.as_ref()).await?;
        h.writers.push(first);
        for _ in 1..options.write_services {
            let w = h.spawn("write-svc").await?;
            h.writers.push(w);
        }
        for _ in 0..options.projectors {
            let p = h.spawn("projector").await?;
            h.projectors.push(p);
        }
        let r = h.spawn("read-svc").await?;
        h.reader = Some(r);
        for p in h.writers.iter().chain(&h.projectors).chain(&h.reader) {
            wait_serving_with(p.addr, within, tls.as_ref()).await?;
        }
        h.clients = match &tls {
            Some(tls) => Clients::connect_tls(h.writers[0].addr, h.read_addr(), tls).await?,
            None => Clients::connect(h.writers[0].addr, h.read_addr()).await?,
        };
        Ok(h)
    }

    /// What a client of a TLS harness trusts and presents; `None` for a plaintext one.
    pub fn client_tls(&self) -> Option<ClientTls> {
        self.pki.as_ref().map(TestPki::client)
    }

    /// The read-svc address.
    pub fn read_addr(&self) -> SocketAddr {
        self.reader
            .as_ref()
            .map_or(([127, 0, 0, 1], 0).into(), |r| r.addr)
    }

    /// Starts one more process of `name` (`write-svc`, `projector` or `read-svc`).
    pub async fn spawn(&self, name: &str) -> anyhow::Result<Proc> {
        let bin = bin_dir()?.join(name);
        anyhow::ensure!(
            bin.exists(),
            "{} is missing: build the binaries first (cargo build --workspace --bins)",
            bin.display()
        );
        let addr = free_addr()?;
        let metrics_addr = free_addr()?;
        let n = std::fs::read_dir(&self.logs)?.count();
        let log = std::fs::File::create(self.logs.join(format!("{name}-{n}.log")))?;
        let mut cmd = Command::new(&bin);
        // Every process gets the CQL settings: write-svc and the projector for their work,
        // read-svc for the temporal queries (it reads the event store for those alone).
        cmd.env("ESQ_LISTEN", addr.to_string())
            .env("ESQ_METRICS_ADDR", metrics_addr.to_string())
            .env("ESQ_CQL_NODES", &self.backends.cassandra)
            .env("ESQ_CQL_KEYSPACE", &self.keyspace)
            .env("ESQ_CQL_TIMEOUT_MS", "2000")
            .env("ESQ_SHARDS", self.options.shards.to_string())
            .env("ESQ_CONFIDENCE_WINDOW_MS", "1000")
            .env("ESQ_APPEND_DEADLINE_MS", "6000")
            .env("ESQ_REDIS_URL", &self.backends.redis)
            .env("ESQ_REDIS_PREFIX", &self.prefix)
            .env("ESQ_NUDGE_CHANNEL", format!("{}:nudge", self.prefix))
            .env("ESQ_POLL_INTERVAL_MS", "100")
            .env("ESQ_LEASE_TTL_MS", "1500")
            .env("RUST_LOG", "info")
            .env("LOG_FORMAT", "plain")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        if self.options.nudges {
            cmd.env("ESQ_NUDGE_URL", &self.backends.redis);
        } else {
            cmd.env_remove("ESQ_NUDGE_URL");
        }
        // `--insecure` waives the TLS and authentication requirements; TLS files given are
        // still served, so a TLS harness keeps it only for the authentication it does not set.
        cmd.env("ESQ_INSECURE", "true");
        if let Some(pki) = &self.pki {
            cmd.envs(pki.server_env(true));
        }
        if name == "projector" {
            cmd.env("ESQ_PROJECTOR_ID", format!("{}-p{n}", self.prefix));
        }
        for (k, v) in &self.options.env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        Ok(Proc {
            name: name.to_owned(),
            addr,
            metrics_addr,
            child,
        })
    }

    /// Kills process `index` of `role` with SIGKILL (no chance to clean up), starts a
    /// replacement with the same settings (on new ports: a restarted pod gets a new address
    /// too, and clients must find it again) in its place, and waits until it serves. Returns
    /// the replacement's gRPC address. The read-svc has index 0. The harness's `clients` are
    /// not reconnected: a caller that restarts the process they use connects anew.
    pub async fn kill_and_restart(
        &mut self,
        role: Role,
        index: usize,
        within: Duration,
    ) -> anyhow::Result<SocketAddr> {
        let name = role.binary();
        let old = match role {
            Role::Writer => self.writers.get_mut(index),
            Role::Projector => self.projectors.get_mut(index),
            Role::Reader => self.reader.as_mut().filter(|_| index == 0),
        }
        .with_context(|| format!("no {name} #{index} in this harness"))?;
        old.child.start_kill()?;
        old.child.wait().await?;
        let fresh = self.spawn(name).await?;
        let addr = fresh.addr;
        match role {
            Role::Writer => self.writers[index] = fresh,
            Role::Projector => self.projectors[index] = fresh,
            Role::Reader => self.reader = Some(fresh),
        }
        wait_serving_with(addr, within, self.client_tls().as_ref()).await?;
        Ok(addr)
    }

    /// Every running process of the harness: `(label, pid)`, the label naming its role and
    /// index (`write-svc#0`, `projector#1`, `read-svc#0`).
    pub fn processes(&self) -> Vec<(String, u32)> {
        let named = |procs: &[Proc]| {
            procs
                .iter()
                .enumerate()
                .filter_map(|(i, p)| Some((format!("{}#{i}", p.name), p.pid()?)))
                .collect::<Vec<_>>()
        };
        let mut all = named(&self.writers);
        all.extend(named(&self.projectors));
        all.extend(named(self.reader.as_slice()));
        all
    }

    /// Whether the processes talk to a Redis Cluster (`ESQ_REDIS_CLUSTER=true` in the options'
    /// environment; `Backends::redis` is then the comma list of seed URLs).
    pub fn redis_cluster(&self) -> bool {
        self.options
            .env
            .iter()
            .any(|(k, v)| k == "ESQ_REDIS_CLUSTER" && v == "true")
    }

    /// Where the processes' logs are.
    pub fn logs(&self) -> &std::path::Path {
        &self.logs
    }

    /// The owners of the projector shard leases right now (one entry per leased shard). A
    /// standalone Redis only.
    pub async fn lease_owners(&self) -> anyhow::Result<Vec<String>> {
        anyhow::ensure!(!self.redis_cluster(), "lease_owners: standalone Redis only");
        let client = redis::Client::open(self.backends.redis.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let mut owners = Vec::new();
        for shard in 0..self.options.shards {
            let owner: Option<String> = redis::cmd("GET")
                .arg(format!("{}:lease:projector:shard:{shard}", self.prefix))
                .query_async(&mut conn)
                .await?;
            owners.extend(owner);
        }
        Ok(owners)
    }

    /// The deployment's read store (Redis, with this harness's prefix).
    pub async fn read_store(&self) -> anyhow::Result<esq_readstore::redis::RedisStore> {
        Ok(
            esq_readstore::redis::RedisStore::connect(esq_readstore::redis::RedisConfig {
                urls: self.backends.redis.split(',').map(str::to_owned).collect(),
                cluster: self.redis_cluster(),
                prefix: self.prefix.clone(),
                timeout: Duration::from_secs(5),
                access: Default::default(),
            })
            .await?,
        )
    }

    /// The generation record of `projection`.
    pub async fn generations(
        &self,
        projection: &str,
    ) -> anyhow::Result<Option<esq_readstore::generations::GenerationRecord>> {
        let store = self.read_store().await?;
        Ok(esq_readstore::generations::read_record(&store, projection)
            .await?
            .map(|(r, _)| r))
    }

    /// Asks for a rebuild of `projection` the way the operator call does: by marking it
    /// requested in its generation record, for whichever projector takes the rebuild lease.
    pub async fn request_rebuild(&self, projection: &str) -> anyhow::Result<()> {
        let store = self.read_store().await?;
        esq_readstore::generations::update_record(&store, projection, |r| {
            r.requested = true;
            true
        })
        .await?;
        Ok(())
    }

    /// The raw rebuild progress record of `projection` (JSON), if any.
    pub async fn rebuild_progress(&self, projection: &str) -> anyhow::Result<Option<String>> {
        use esq_readstore::ReadStore;
        let store = self.read_store().await?;
        Ok(store
            .checkpoint(&format!("projector:rebuild-progress:{projection}"))
            .await?)
    }

    /// Deletes every Redis key of this deployment (what a FLUSHALL does to it, without
    /// touching other tests' keys on the shared server). Returns how many keys went. A
    /// standalone Redis only.
    pub async fn flush_read_model(&self) -> anyhow::Result<usize> {
        anyhow::ensure!(
            !self.redis_cluster(),
            "flush_read_model: standalone Redis only"
        );
        let client = redis::Client::open(self.backends.redis.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let mut cursor = 0u64;
        let mut deleted = 0;
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
                let n: usize = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await?;
                deleted += n;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }
}
