//! Command-line and environment configuration shared by the binaries: every flag also reads an
//! `ESQ_…` variable. Parsed once in `main`; libraries receive plain config values.

use crate::limits::Limits;
use crate::tls::{ServerTls, TlsFiles};
use anyhow::Context as _;
use esq_eventstore::cql::{CqlConfig, CqlStore, FeedKind};
use esq_readstore::redis::{RedisConfig, RedisStore};
use std::net::SocketAddr;
use std::path::PathBuf;
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
    /// Transport security.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Call limits.
    #[command(flatten)]
    pub limits: LimitArgs,
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
            tracing::warn!(%listen, "insecure mode: plaintext, no authentication");
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
}

impl CqlArgs {
    /// The store configuration these flags describe.
    pub fn config(&self) -> CqlConfig {
        let mut c = CqlConfig::new(self.cql_nodes.clone(), self.cql_keyspace.clone());
        c.replication = self.cql_replication.clone();
        c.request_timeout = Duration::from_millis(self.cql_timeout_ms);
        c.feed = match self.change_feed {
            ChangeFeedArg::Table => FeedKind::ChangesTable,
            ChangeFeedArg::ScyllaCdc => FeedKind::ScyllaCdc,
        };
        c.shard_count = self.shards;
        c.confidence_window = Duration::from_millis(self.confidence_window_ms);
        c.change_ttl = Duration::from_secs(self.change_ttl_secs);
        c.append_deadline = Duration::from_millis(self.append_deadline_ms);
        c
    }

    /// Connects (creating the schema if needed), retrying while the cluster is unavailable;
    /// `Ok(None)` on shutdown, an error at once for a bad configuration.
    pub async fn connect(&self, shutdown: &CancellationToken) -> anyhow::Result<Option<CqlStore>> {
        let config = self.config();
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
}

impl RedisArgs {
    /// The read-store configuration these flags describe.
    pub fn config(&self) -> RedisConfig {
        RedisConfig {
            urls: self.redis_url.clone(),
            cluster: self.redis_cluster,
            prefix: self.redis_prefix.clone(),
            timeout: Duration::from_millis(self.redis_timeout_ms),
        }
    }

    /// Connects, retrying while Redis is unavailable; `Ok(None)` on shutdown, an error at once
    /// for a bad configuration.
    pub async fn connect(
        &self,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<RedisStore>> {
        let config = self.config();
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
