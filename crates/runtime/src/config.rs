//! Command-line and environment configuration shared by the binaries: every flag also reads an
//! `ESQ_…` variable. Parsed once in `main`; libraries receive plain config values.

use crate::limits::Limits;
use crate::tls::{ServerTls, TlsFiles};
use anyhow::Context as _;
use esq_eventstore::cql::{
    CqlConfig, CqlCredentials, CqlStore, CqlTls, FeedKind, QuorumLevel, SerialLevel,
};
use esq_readstore::redis::{RedisAccess, RedisConfig, RedisStore, RedisTls};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Logging flags.
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryArgs {
    /// Log filter, RUST_LOG syntax.
    #[arg(long = "log", env = "RUST_LOG", default_value = "info")]
    pub filter: String,
    /// Log format: plain or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "plain")]
    pub log_format: crate::LogFormat,
}

impl TelemetryArgs {
    /// Installs the subscriber these flags describe.
    pub fn init(&self) {
        crate::init_telemetry(&self.filter, self.log_format);
    }
}

/// Default of `--shutdown-grace`: long enough for ordinary calls to finish, short enough to
/// stay within Kubernetes' default 30 s termination grace period.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Flags of every gRPC server.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Longest drain on SIGTERM before open connections are closed (e.g. `20s`, `500ms`; a bare
    /// number is seconds).
    #[arg(long, env = "ESQ_SHUTDOWN_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Also serve gRPC health (grpc.health.v1 only) on this address, plaintext and without
    /// authentication, for probes that cannot speak TLS (the kubelet's gRPC probes), e.g.
    /// `0.0.0.0:8086`. It tells only whether the server is up and ready.
    #[arg(long, env = "ESQ_HEALTH_LISTEN")]
    pub health_listen: Option<std::net::SocketAddr>,
    /// Transport security.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Call limits.
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Who may call (bearer tokens).
    #[command(flatten)]
    pub auth: AuthArgs,
}

impl ServerArgs {
    /// The authentication these flags describe ([`AuthArgs::load`] under `--insecure`).
    pub async fn auth(
        &self,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<crate::auth::Authenticator>> {
        self.auth.load(self.tls.insecure, shutdown).await
    }
}

/// Transport security of a gRPC server. A server refuses to start without `--tls-cert` and
/// `--tls-key` unless `--insecure` is set.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// Server certificate chain, PEM, leaf first. Re-read when it changes.
    #[arg(long, env = "ESQ_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key, PEM (PKCS#8, PKCS#1 or SEC1). Re-read when it changes.
    #[arg(long, env = "ESQ_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate(s), PEM: when set, clients must present a certificate signed by one
    /// (mutual TLS).
    #[arg(long, env = "ESQ_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// How often the TLS files are checked for changes (e.g. `2s`).
    #[arg(long, env = "ESQ_TLS_RELOAD_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub tls_reload_interval: Duration,
    /// Allow serving plaintext and without authentication: for local development and tests
    /// only. Without it a server needs `--tls-cert`/`--tls-key` (and `--auth-tokens`). TLS
    /// files and `--auth-tokens` given with it are still used.
    #[arg(long, env = "ESQ_INSECURE", default_value_t = false)]
    pub insecure: bool,
}

/// Who may call a gRPC server: bearer tokens and their roles (see [`crate::auth`]).
#[derive(Debug, Clone, clap::Args)]
pub struct AuthArgs {
    /// Token file: one `<role> <sha256-hex-of-token> <name>` per line (`esq token new` makes
    /// them). Calls need `authorization: Bearer <token>`. Re-read when it changes. Required
    /// unless `--insecure`.
    #[arg(long, env = "ESQ_AUTH_TOKENS")]
    pub auth_tokens: Option<PathBuf>,
    /// Put server reflection behind a token too (any role); by default it is open.
    #[arg(long, env = "ESQ_AUTH_REFLECTION", default_value_t = false)]
    pub auth_reflection: bool,
    /// How often the token file is checked for changes (e.g. `2s`).
    #[arg(long, env = "ESQ_AUTH_RELOAD_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub auth_reload_interval: Duration,
}

impl AuthArgs {
    /// The authenticator of `--auth-tokens`, re-reading the file until `shutdown`; `None`
    /// without a token file when `insecure` (every call admitted), an error — naming the flag,
    /// and the file and line when it is the file — otherwise.
    pub async fn load(
        &self,
        insecure: bool,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<crate::auth::Authenticator>> {
        let Some(path) = &self.auth_tokens else {
            anyhow::ensure!(
                insecure,
                "no token file: give --auth-tokens FILE (ESQ_AUTH_TOKENS; make tokens with \
                 `esq token new`), or --insecure (ESQ_INSECURE=true) to serve without \
                 authentication (development only)"
            );
            tracing::warn!("insecure mode: no authentication (every call admitted)");
            return Ok(None);
        };
        self.load_file(path, shutdown).await.map(Some)
    }

    /// The authenticator of `--auth-tokens` if given (`esq dev`, where it is optional).
    pub async fn load_optional(
        &self,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<crate::auth::Authenticator>> {
        match &self.auth_tokens {
            Some(path) => self.load_file(path, shutdown).await.map(Some),
            None => Ok(None),
        }
    }

    async fn load_file(
        &self,
        path: &std::path::Path,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<crate::auth::Authenticator> {
        let auth = crate::auth::Authenticator::load(path)
            .await?
            .protect_reflection(self.auth_reflection);
        let tokens = auth.tokens().len();
        if tokens == 0 {
            tracing::warn!(file = %path.display(), "the token file lists no token: every call but health checks is refused");
        } else {
            tracing::info!(file = %path.display(), tokens, "bearer-token authentication on");
        }
        let every = self.auth_reload_interval.max(Duration::from_millis(100));
        auth.watch(path.to_owned(), every, shutdown.clone());
        Ok(auth)
    }
}

impl TlsArgs {
    /// The server TLS these flags describe: `Some` with `--tls-cert`/`--tls-key`, `None` with
    /// `--insecure` alone (logged as a warning naming `listen`), and an error — naming the flags
    /// or the file that is wrong — otherwise.
    pub async fn load(&self, listen: SocketAddr) -> anyhow::Result<Option<ServerTls>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            anyhow::ensure!(
                self.insecure,
                "no TLS certificate: give --tls-cert and --tls-key (ESQ_TLS_CERT, ESQ_TLS_KEY), \
                 or --insecure (ESQ_INSECURE=true) to serve plaintext without authentication \
                 (development only)"
            );
            // Whether calls are authenticated is AuthArgs' to say (tokens given with --insecure
            // are still enforced).
            tracing::warn!(%listen, "insecure mode: plaintext (no TLS)");
            return Ok(None);
        };
        let mut tls = ServerTls::load(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: self.tls_client_ca.clone(),
        })
        .await?;
        tls.reload_interval = self.tls_reload_interval.max(Duration::from_millis(100));
        Ok(Some(tls))
    }
}

/// Server-wide call limits (see [`crate::limits`]).
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Most calls handled at once by the whole server; calls over it are answered
    /// RESOURCE_EXHAUSTED at once. 0: no limit.
    #[arg(long, env = "ESQ_MAX_CONCURRENT_CALLS", default_value_t = crate::limits::DEFAULT_MAX_CONCURRENT_CALLS)]
    pub max_concurrent_calls: usize,
    /// Deadline of a call whose client sent none (e.g. `30s`; `0` for none); past it the call
    /// is answered DEADLINE_EXCEEDED.
    #[arg(long, env = "ESQ_DEFAULT_DEADLINE", default_value = "30s", value_parser = parse_duration)]
    pub default_deadline: Duration,
}

impl LimitArgs {
    /// The limits these flags describe.
    pub fn limits(&self) -> Limits {
        Limits {
            max_concurrent_calls: self.max_concurrent_calls,
            default_deadline: (!self.default_deadline.is_zero()).then_some(self.default_deadline),
        }
    }
}

/// Parses `500ms`, `20s`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: use e.g. 500ms, 20s or 2m"))?;
    match unit.trim() {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        other => Err(format!("unknown duration unit {other:?}: use ms, s or m")),
    }
}

/// Which change feed a CQL store writes and serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ChangeFeedArg {
    /// The portable `changes` table (ScyllaDB and Cassandra).
    Table,
    /// ScyllaDB native CDC (ScyllaDB only).
    ScyllaCdc,
}

/// Consistency level of a CQL store's plain reads and writes (see ARCHITECTURE.md,
/// "Consistency levels"); only quorum levels, so every read sees every acknowledged append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConsistencyArg {
    /// LOCAL_QUORUM: a majority of the replicas in the local datacenter.
    LocalQuorum,
    /// QUORUM: a majority of all replicas, across datacenters.
    Quorum,
}

/// Consistency level of a CQL store's appends (their Paxos phase) and of the reads that settle
/// an append's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SerialConsistencyArg {
    /// LOCAL_SERIAL: linearizable per stream while each stream's writers are in one datacenter.
    LocalSerial,
    /// SERIAL: linearizable per stream across datacenters.
    Serial,
}

/// Where the event store is: a ScyllaDB or Apache Cassandra cluster.
#[derive(Debug, Clone, clap::Args)]
pub struct CqlArgs {
    /// Contact points, comma-separated host:port.
    #[arg(long, env = "ESQ_CQL_NODES", value_delimiter = ',', required = true)]
    pub cql_nodes: Vec<String>,
    /// Keyspace (created with its tables at start if missing).
    #[arg(long, env = "ESQ_CQL_KEYSPACE", default_value = "esq")]
    pub cql_keyspace: String,
    /// Replication map used when creating the keyspace.
    #[arg(
        long,
        env = "ESQ_CQL_REPLICATION",
        default_value = "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    )]
    pub cql_replication: String,
    /// Consistency level of plain reads and writes (change-log rows, the commit of an append,
    /// stream and change-log reads). Use `quorum` when the keyspace spans datacenters and
    /// readers must see writes made in another datacenter at once.
    #[arg(
        long,
        env = "ESQ_CQL_CONSISTENCY",
        value_enum,
        default_value = "local-quorum"
    )]
    pub cql_consistency: ConsistencyArg,
    /// Consistency level of an append's lightweight transaction (the expected-version check)
    /// and of the reads settling its outcome. Use `serial` when one stream may be written from
    /// several datacenters.
    #[arg(
        long,
        env = "ESQ_CQL_SERIAL_CONSISTENCY",
        value_enum,
        default_value = "local-serial"
    )]
    pub cql_serial_consistency: SerialConsistencyArg,
    /// Timeout of every CQL request, in milliseconds.
    #[arg(long, env = "ESQ_CQL_TIMEOUT_MS", default_value_t = 5000)]
    pub cql_timeout_ms: u64,
    /// Change feed: the portable changes table, or ScyllaDB native CDC.
    #[arg(long, env = "ESQ_CHANGE_FEED", value_enum, default_value = "table")]
    pub change_feed: ChangeFeedArg,
    /// Number of change-log shards (part of the stored layout: keep it fixed per keyspace).
    #[arg(long, env = "ESQ_SHARDS", default_value_t = 16)]
    pub shards: u32,
    /// How far behind now the change log is read, in milliseconds (late writes land there).
    #[arg(long, env = "ESQ_CONFIDENCE_WINDOW_MS", default_value_t = 2000)]
    pub confidence_window_ms: u64,
    /// How long change-log rows live, in seconds (a projector outage longer than this needs a
    /// rebuild, which the projector does by itself when the read model is empty).
    #[arg(long, env = "ESQ_CHANGE_TTL_SECS", default_value_t = 7 * 24 * 3600)]
    pub change_ttl_secs: u64,
    /// Longest an append may take, in milliseconds; a change-log row whose events are still
    /// missing after this is an orphan and is skipped.
    #[arg(long, env = "ESQ_APPEND_DEADLINE_MS", default_value_t = 15_000)]
    pub append_deadline_ms: u64,
    /// Role to log in as with the cluster's password authenticator (needs a password too).
    #[arg(long, env = "ESQ_CQL_USERNAME")]
    pub cql_username: Option<String>,
    /// Password of --cql-username. Prefer --cql-password-file: a value here is visible in the
    /// process list.
    #[arg(
        long,
        env = "ESQ_CQL_PASSWORD",
        hide_env_values = true,
        conflicts_with = "cql_password_file"
    )]
    pub cql_password: Option<Secret>,
    /// File holding the password of --cql-username (one line; a trailing newline is ignored).
    #[arg(long, env = "ESQ_CQL_PASSWORD_FILE")]
    pub cql_password_file: Option<PathBuf>,
    /// PEM file of the CA the nodes' certificates must chain to: connects with TLS (node
    /// certificates need the nodes' IP addresses as subject alternative names).
    #[arg(long, env = "ESQ_CQL_TLS_CA")]
    pub cql_tls_ca: Option<PathBuf>,
    /// PEM client certificate chain for nodes that require client certificates (with
    /// --cql-tls-key).
    #[arg(long, env = "ESQ_CQL_TLS_CERT", requires = "cql_tls_key")]
    pub cql_tls_cert: Option<PathBuf>,
    /// PEM private key of --cql-tls-cert.
    #[arg(long, env = "ESQ_CQL_TLS_KEY", requires = "cql_tls_cert")]
    pub cql_tls_key: Option<PathBuf>,
}

impl CqlArgs {
    /// The store configuration these flags describe, with the password and certificate files
    /// read; an error names the flag and the file.
    pub async fn config(&self) -> anyhow::Result<CqlConfig> {
        let mut c = CqlConfig::new(self.cql_nodes.clone(), self.cql_keyspace.clone());
        c.replication = self.cql_replication.clone();
        c.consistency = match self.cql_consistency {
            ConsistencyArg::LocalQuorum => QuorumLevel::LocalQuorum,
            ConsistencyArg::Quorum => QuorumLevel::Quorum,
        };
        c.serial_consistency = match self.cql_serial_consistency {
            SerialConsistencyArg::LocalSerial => SerialLevel::LocalSerial,
            SerialConsistencyArg::Serial => SerialLevel::Serial,
        };
        c.request_timeout = Duration::from_millis(self.cql_timeout_ms);
        c.feed = match self.change_feed {
            ChangeFeedArg::Table => FeedKind::ChangesTable,
            ChangeFeedArg::ScyllaCdc => FeedKind::ScyllaCdc,
        };
        c.shard_count = self.shards;
        c.confidence_window = Duration::from_millis(self.confidence_window_ms);
        c.change_ttl = Duration::from_secs(self.change_ttl_secs);
        c.append_deadline = Duration::from_millis(self.append_deadline_ms);
        let password = secret(
            self.cql_password.as_ref().map(Secret::expose),
            self.cql_password_file.as_deref(),
            "--cql-password-file",
        )
        .await?;
        c.credentials = match (&self.cql_username, password) {
            (Some(username), Some(password)) => Some(CqlCredentials {
                username: username.clone(),
                password,
            }),
            (None, None) => None,
            (Some(_), None) => anyhow::bail!(
                "--cql-username (ESQ_CQL_USERNAME) needs --cql-password or --cql-password-file"
            ),
            (None, Some(_)) => {
                anyhow::bail!("a CQL password is set but no --cql-username (ESQ_CQL_USERNAME)")
            }
        };
        c.tls = match &self.cql_tls_ca {
            Some(ca) => Some(CqlTls {
                ca_pem: read_pem(ca, "--cql-tls-ca").await?,
                client: client_pair(
                    self.cql_tls_cert.as_deref(),
                    self.cql_tls_key.as_deref(),
                    "--cql-tls",
                )
                .await?,
            }),
            None if self.cql_tls_cert.is_some() => {
                anyhow::bail!("--cql-tls-cert needs --cql-tls-ca (ESQ_CQL_TLS_CA)")
            }
            None => None,
        };
        Ok(c)
    }

    /// Connects (creating the schema if needed), retrying while the cluster is unavailable;
    /// `Ok(None)` on shutdown, an error at once for a bad configuration.
    pub async fn connect(&self, shutdown: &CancellationToken) -> anyhow::Result<Option<CqlStore>> {
        let config = self.config().await?;
        crate::connect_with_retry("the event store", shutdown, || {
            CqlStore::connect(config.clone())
        })
        .await
        .context("cannot start with this event-store configuration")
    }
}

/// Where the read model is: a standalone Redis or a Redis Cluster.
#[derive(Debug, Clone, clap::Args)]
pub struct RedisArgs {
    /// Redis URL(s), comma-separated: one for a standalone server, the seed nodes for a Cluster.
    #[arg(long, env = "ESQ_REDIS_URL", value_delimiter = ',', required = true)]
    pub redis_url: Vec<String>,
    /// Treat the URLs as Redis Cluster seeds.
    #[arg(long, env = "ESQ_REDIS_CLUSTER", default_value_t = false)]
    pub redis_cluster: bool,
    /// Prefix of every key (one esq deployment per prefix).
    #[arg(long, env = "ESQ_REDIS_PREFIX", default_value = "esq")]
    pub redis_prefix: String,
    /// Timeout of every Redis call, in milliseconds.
    #[arg(long, env = "ESQ_REDIS_TIMEOUT_MS", default_value_t = 2000)]
    pub redis_timeout_ms: u64,
    /// Credentials and TLS.
    #[command(flatten)]
    pub access: RedisAccessArgs,
}

/// Credentials and TLS of the connections to Redis (read model, pub/sub, nudges). A user and
/// password may also be given in the URLs (`redis://user:password@host:port`); these flags win.
/// TLS is on for `rediss://` URLs.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RedisAccessArgs {
    /// ACL user to log in as (needs a password too); without it a password logs in as the
    /// `default` user.
    #[arg(long, env = "ESQ_REDIS_USERNAME")]
    pub redis_username: Option<String>,
    /// ACL password. Prefer --redis-password-file: a value here is visible in the process
    /// list.
    #[arg(
        long,
        env = "ESQ_REDIS_PASSWORD",
        hide_env_values = true,
        conflicts_with = "redis_password_file"
    )]
    pub redis_password: Option<Secret>,
    /// File holding the ACL password (one line; a trailing newline is ignored).
    #[arg(long, env = "ESQ_REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<PathBuf>,
    /// PEM file of the CA the servers' certificates must chain to (default: the system's
    /// roots). Needs rediss:// URLs.
    #[arg(long, env = "ESQ_REDIS_TLS_CA")]
    pub redis_tls_ca: Option<PathBuf>,
    /// PEM client certificate chain, for servers with `tls-auth-clients yes` (with
    /// --redis-tls-key).
    #[arg(long, env = "ESQ_REDIS_TLS_CERT", requires = "redis_tls_key")]
    pub redis_tls_cert: Option<PathBuf>,
    /// PEM private key of --redis-tls-cert.
    #[arg(long, env = "ESQ_REDIS_TLS_KEY", requires = "redis_tls_cert")]
    pub redis_tls_key: Option<PathBuf>,
}

impl RedisAccessArgs {
    /// The access these flags describe, with the password and certificate files read; an error
    /// names the flag and the file.
    pub async fn load(&self) -> anyhow::Result<RedisAccess> {
        let password = secret(
            self.redis_password.as_ref().map(Secret::expose),
            self.redis_password_file.as_deref(),
            "--redis-password-file",
        )
        .await?;
        if self.redis_username.is_some() && password.is_none() {
            anyhow::bail!(
                "--redis-username (ESQ_REDIS_USERNAME) needs --redis-password or \
                 --redis-password-file"
            );
        }
        let ca_pem = match &self.redis_tls_ca {
            Some(path) => Some(read_pem(path, "--redis-tls-ca").await?),
            None => None,
        };
        let client = client_pair(
            self.redis_tls_cert.as_deref(),
            self.redis_tls_key.as_deref(),
            "--redis-tls",
        )
        .await?;
        let tls = (ca_pem.is_some() || client.is_some()).then_some(RedisTls { ca_pem, client });
        Ok(RedisAccess {
            username: self.redis_username.clone(),
            password,
            tls,
        })
    }
}

/// A password given on the command line or in the environment: `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the driver that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The secret given inline or in a file (read asynchronously, one trailing newline dropped).
async fn secret(
    inline: Option<&str>,
    file: Option<&Path>,
    flag: &str,
) -> anyhow::Result<Option<String>> {
    if let Some(value) = inline {
        return Ok(Some(value.to_owned()));
    }
    let Some(path) = file else {
        return Ok(None);
    };
    let text = tokio::fs::read_to_string(path)
        .await
        .with_context(|| format!("{flag}: cannot read {}", path.display()))?;
    let value = text
        .strip_suffix('\n')
        .map(|v| v.strip_suffix('\r').unwrap_or(v))
        .unwrap_or(&text);
    if value.is_empty() {
        anyhow::bail!("{flag}: {} is empty", path.display());
    }
    Ok(Some(value.to_owned()))
}

/// A PEM file's contents; an error if it cannot be read or holds no PEM block.
async fn read_pem(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = tokio::fs::read(path)
        .await
        .with_context(|| format!("{flag}: cannot read {}", path.display()))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        anyhow::bail!("{flag}: {} is not a PEM file", path.display());
    }
    Ok(bytes)
}

/// The client certificate and key files (`<prefix>-cert`, `<prefix>-key`), both or neither.
async fn client_pair(
    cert: Option<&Path>,
    key: Option<&Path>,
    prefix: &str,
) -> anyhow::Result<Option<(Vec<u8>, Vec<u8>)>> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some((
            read_pem(cert, &format!("{prefix}-cert")).await?,
            read_pem(key, &format!("{prefix}-key")).await?,
        ))),
        (None, None) => Ok(None),
        _ => anyhow::bail!("{prefix}-cert and {prefix}-key go together"),
    }
}

impl RedisArgs {
    /// The read-store configuration these flags describe, with the password and certificate
    /// files read; an error names the flag and the file.
    pub async fn config(&self) -> anyhow::Result<RedisConfig> {
        Ok(RedisConfig {
            urls: self.redis_url.clone(),
            cluster: self.redis_cluster,
            prefix: self.redis_prefix.clone(),
            timeout: Duration::from_millis(self.redis_timeout_ms),
            access: self.access.load().await?,
        })
    }

    /// Connects, retrying while Redis is unavailable; `Ok(None)` on shutdown, an error at once
    /// for a bad configuration.
    pub async fn connect(
        &self,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<RedisStore>> {
        let config = self.config().await?;
        crate::connect_with_retry("the read store", shutdown, || {
            RedisStore::connect(config.clone())
        })
        .await
        .context("cannot start with this read-store configuration")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use clap::Parser as _;

    #[derive(clap::Parser, Debug)]
    struct Stores {
        #[command(flatten)]
        cql: CqlArgs,
        #[command(flatten)]
        redis: RedisArgs,
    }

    fn parse(args: &[&str]) -> Stores {
        let base = [
            "test",
            "--cql-nodes",
            "127.0.0.1:1",
            "--redis-url",
            "redis://127.0.0.1:1",
        ];
        Stores::try_parse_from(base.iter().chain(args)).expect("valid flags")
    }

    #[tokio::test]
    async fn consistency_levels_default_to_the_local_quorums_and_refuse_weaker_ones() {
        let defaults = parse(&[]).cql.config().await.expect("config");
        assert_eq!(defaults.consistency, QuorumLevel::LocalQuorum);
        assert_eq!(defaults.serial_consistency, SerialLevel::LocalSerial);
        let chosen = parse(&[
            "--cql-consistency",
            "quorum",
            "--cql-serial-consistency",
            "serial",
        ])
        .cql
        .config()
        .await
        .expect("config");
        assert_eq!(chosen.consistency, QuorumLevel::Quorum);
        assert_eq!(chosen.serial_consistency, SerialLevel::Serial);
        for (flag, weak) in [
            ("--cql-consistency", "one"),
            ("--cql-consistency", "local-one"),
            ("--cql-consistency", "all"),
            ("--cql-serial-consistency", "quorum"),
        ] {
            let base = [
                "test",
                "--cql-nodes",
                "127.0.0.1:1",
                "--redis-url",
                "redis://x",
            ];
            let err = Stores::try_parse_from(base.iter().chain(&[flag, weak]))
                .expect_err("a level that may miss acknowledged appends is refused");
            let text = err.to_string();
            assert!(
                text.contains(weak) && text.contains(flag),
                "the error names the flag and the value: {text}"
            );
        }
    }

    #[tokio::test]
    async fn store_passwords_come_from_files_and_never_show_in_debug() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret-from-file\n").expect("write");
        let file = file.display().to_string();
        let args = parse(&[
            "--cql-username",
            "esq",
            "--cql-password-file",
            &file,
            "--redis-username",
            "esq",
            "--redis-password",
            "inline-s3cret",
        ]);
        let shown = format!("{args:?}");
        assert!(!shown.contains("inline-s3cret"), "{shown}");
        let cql = args.cql.config().await.expect("config");
        let credentials = cql.credentials.clone().expect("credentials");
        assert_eq!(credentials.password, "s3cret-from-file");
        assert!(!format!("{cql:?}").contains("s3cret"), "{cql:?}");
        let redis = args.redis.config().await.expect("config");
        assert_eq!(redis.access.password.as_deref(), Some("inline-s3cret"));
        assert!(!format!("{redis:?}").contains("s3cret"), "{redis:?}");
    }

    #[tokio::test]
    async fn bad_store_security_flags_name_the_flag_and_the_file() {
        let err = parse(&["--cql-username", "esq"])
            .cql
            .config()
            .await
            .expect_err("no password");
        assert!(err.to_string().contains("--cql-password"), "{err}");
        let err = parse(&[
            "--cql-username",
            "esq",
            "--cql-password-file",
            "/nonexistent/pw",
        ])
        .cql
        .config()
        .await
        .expect_err("unreadable");
        assert!(
            err.to_string().contains("--cql-password-file")
                && err.to_string().contains("/nonexistent/pw"),
            "{err}"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "hello").expect("write");
        let not_pem = not_pem.display().to_string();
        let err = parse(&["--redis-tls-ca", &not_pem])
            .redis
            .config()
            .await
            .expect_err("not PEM");
        assert!(
            err.to_string().contains("--redis-tls-ca") && err.to_string().contains(&not_pem),
            "{err}"
        );
        let err = parse(&["--redis-username", "esq"])
            .redis
            .config()
            .await
            .expect_err("no password");
        assert!(err.to_string().contains("--redis-password"), "{err}");
        assert!(
            Stores::try_parse_from([
                "test",
                "--cql-nodes",
                "n:1",
                "--redis-url",
                "redis://h:1",
                "--cql-tls-cert",
                "c.pem"
            ])
            .is_err(),
            "a client certificate needs its key"
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3h").is_err());
    }
}
