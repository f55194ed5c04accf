//! The Redis read store, for standalone Redis or Redis Cluster, over one multiplexed connection.
//!
//! Key layout (`<prefix>` is [`RedisConfig::prefix`]):
//!
//! | what | key | type |
//! |---|---|---|
//! | document | `<prefix>:<projection>:{<doc_id>}` | hash, `_v` = version |
//! | derived target's entries | `<prefix>:<projection>:{<target>}:e` | hash, source id → entry |
//! | index | `<prefix>:<projection>:idx:<index>` | sorted set, every score 0 |
//! | checkpoint | `<prefix>:cp:<name>` | string |
//! | lease | `<prefix>:lease:<name>` | string (owner) with an expiry |
//! | generation record | `<prefix>:gen:<projection>` | string (JSON, see [`crate::generations`]) |
//!
//! `<projection>` in document and index keys is a namespace: `<name>:g<n>` for generation `n`
//! of a projection, or the bare name for the layout from before generations.
//!
//! The `{…}` hash tag puts every key of one aggregate in one Cluster slot, so the fenced apply is
//! one Lua script on one key (`apply.lua`, invoked by SHA). Index keys live in other slots: their
//! changes follow the script in one pipeline per node, and are idempotent. Document ids and index
//! names must not contain `{` or `}`.
//!
//! Every round trip is bounded by [`RedisConfig::timeout`]; connection failures and timeouts are
//! [`ReadError::Unavailable`], everything else [`ReadError::Internal`].

use crate::notify::{AppliedFeed, Watch};
use crate::{Doc, ReadError, ReadStore, Replication};
use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClient;
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use ::redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, Script, ServerErrorKind, Value};
use esq_domain::derived::{Column, Contribution};
use esq_domain::projection::{ApplyOutcome, Batch, FieldOp, INDEX_PENDING_FIELD};
use futures::StreamExt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const APPLY_LUA: &str = include_str!("apply.lua");

/// The fenced apply script (`apply.lua`) the store runs by SHA, for programs that must send
/// exactly the store's work without the store (the benchmark's raw baselines).
pub const APPLY_SCRIPT: &str = APPLY_LUA;
const CONTRIBUTE_LUA: &str = include_str!("contribute.lua");

/// Takes the lease if free, renews it if already ours. ARGV: owner, ttl in ms.
const ACQUIRE_LUA: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

/// Deletes the lease only if it is ours. ARGV: owner.
const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Clears a document's pending-index marker if it still holds the given value.
const CLEAR_PENDING_LUA: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
";

/// Replaces a value if it still is the expected one. ARGV: "1" if a value is expected (else
/// none must exist), the expected value, the new value.
const SWAP_LUA: &str = r"
local current = redis.call('GET', KEYS[1])
if (ARGV[1] == '0' and current == false) or (ARGV[1] == '1' and current == ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[3])
  return 1
end
return 0
";

/// Keys handed to one `SCAN` round and deleted per batch.
const SCAN_BATCH: usize = 500;

/// How to reach Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://host:port` (or `rediss://` for TLS) URLs: one for a standalone server, or the
    /// seed nodes of a Cluster. An ACL user and password may be given as userinfo
    /// (`redis://user:password@host:port`); [`RedisConfig::access`] overrides them.
    pub urls: Vec<String>,
    /// Whether `urls` are Redis Cluster nodes.
    pub cluster: bool,
    /// First part of every key name, so that several deployments (or tests) can share a server.
    pub prefix: String,
    /// Upper bound on each round trip (and on connecting); past it a call is `Unavailable`.
    pub timeout: Duration,
    /// Credentials and TLS of every connection (commands, pub/sub).
    pub access: RedisAccess,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            urls: vec!["redis://127.0.0.1:6379".to_owned()],
            cluster: false,
            prefix: "esq".to_owned(),
            timeout: Duration::from_secs(2),
            access: RedisAccess::default(),
        }
    }
}

/// Credentials and TLS settings shared by every connection esq opens to one Redis deployment:
/// the store's command connection, its pub/sub subscriptions, and the nudge publisher and
/// subscriber. `Debug` never shows the password or the client key.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RedisAccess {
    /// ACL user (`AUTH <user> <password>`); without it, `AUTH <password>` logs in as `default`.
    pub username: Option<String>,
    /// ACL password; never printed.
    pub password: Option<String>,
    /// Certificates for `rediss://` URLs; `None` trusts the system's roots.
    pub tls: Option<RedisTls>,
}

/// PEM contents for TLS connections to Redis (read from files at start).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// CA certificates the servers' certificates must chain to (instead of the system roots).
    pub ca_pem: Option<Vec<u8>>,
    /// This client's certificate chain and key, for servers with `tls-auth-clients yes`.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for RedisAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisAccess")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .finish()
    }
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca_pem", &self.ca_pem.as_ref().map(Vec::len))
            .field(
                "client",
                &self
                    .client
                    .as_ref()
                    .map(|_| "<certificate and redacted key>"),
            )
            .finish()
    }
}

impl RedisAccess {
    /// A client for one server at `url` with these credentials and certificates. Fails
    /// (`InvalidClientConfig`) for a malformed URL, for certificates with a plain `redis://`
    /// URL, or for PEM that does not parse.
    pub fn client(&self, url: &str) -> ::redis::RedisResult<::redis::Client> {
        let info = self.connection_info(url)?;
        match self.certificates() {
            Some(certs) => ::redis::Client::build_with_tls(info, certs),
            None => ::redis::Client::open(info),
        }
    }

    /// A Cluster client builder for the seed nodes `urls` with these credentials and
    /// certificates.
    pub fn cluster_builder(
        &self,
        urls: &[String],
    ) -> ::redis::RedisResult<::redis::cluster::ClusterClientBuilder> {
        let infos = urls
            .iter()
            .map(|url| self.connection_info(url))
            .collect::<::redis::RedisResult<Vec<_>>>()?;
        let mut builder = ClusterClient::builder(infos);
        if let Some(certs) = self.certificates() {
            builder = builder.certs(certs);
        }
        Ok(builder)
    }

    /// `url` parsed, with this access's credentials (over any userinfo in it).
    fn connection_info(&self, url: &str) -> ::redis::RedisResult<::redis::ConnectionInfo> {
        use ::redis::IntoConnectionInfo as _;
        let info = url.into_connection_info()?;
        let tls_url = matches!(info.addr(), ::redis::ConnectionAddr::TcpTls { .. });
        if tls_url {
            install_crypto_provider();
        } else if self.tls.is_some() {
            return Err(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "TLS certificates are configured for Redis but the URL is not rediss://",
                redact_url(url),
            )));
        }
        let mut settings = info.redis_settings().clone();
        if let Some(username) = &self.username {
            settings = settings.set_username(username);
        }
        if let Some(password) = &self.password {
            settings = settings.set_password(password);
        }
        Ok(info.set_redis_settings(settings))
    }

    fn certificates(&self) -> Option<::redis::TlsCertificates> {
        let tls = self.tls.as_ref()?;
        Some(::redis::TlsCertificates {
            client_tls: tls
                .client
                .as_ref()
                .map(|(cert, key)| ::redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: tls.ca_pem.clone(),
        })
    }
}

/// Makes `ring` the process's rustls crypto provider unless one is installed already: the
/// Redis driver builds its TLS configuration with the process default, and with several
/// providers compiled in (the CQL driver brings another) rustls cannot pick one by itself.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Another thread may have won the race: either provider is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// `url` with any password in its userinfo replaced by `***`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    let shown = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_owned(),
    };
    format!("{scheme}://{shown}{}", &rest[at..])
}

/// A [`ReadStore`] in Redis or Redis Cluster. Cloning is cheap and clones share the connection.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    shared: Arc<Shared>,
}

/// What every clone shares and never changes.
struct Shared {
    prefix: String,
    /// The URLs connected to (the subscription of [`RedisStore::follow_applies`] uses them).
    urls: Vec<String>,
    /// Their credentials and certificates.
    access: RedisAccess,
    /// Where the apply script publishes what it applied: `<prefix>:applied`.
    applied_channel: String,
    /// The waiters on document versions, live while [`RedisStore::follow_applies`] is subscribed.
    feed: Arc<AppliedFeed>,
    timeout: Duration,
    apply: Script,
    acquire: Script,
    release: Script,
    clear_pending: Script,
    contribute: Script,
    swap: Script,
    /// The primaries as last seen by [`ReadStore::wait_replicated`] (address and run id of
    /// each, sorted): `None` until first seen.
    topology: Mutex<Option<String>>,
    /// Bumped whenever `topology` changes (see [`ReadStore::replication_epoch`]).
    epoch: AtomicU64,
}

/// The longest a `WAIT` blocks: every other call on that node's connection queues behind it,
/// so it is short; replicas on a live link acknowledge within milliseconds.
const WAIT_TIMEOUT_MS: u64 = 250;

/// One primary as `INFO server replication` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Primary {
    address: String,
    run_id: String,
    replicas: u32,
}

/// Parses the `INFO` text of `address`: its run id and connected replicas.
fn parse_primary(address: &str, info: &str) -> Result<Primary, ReadError> {
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
            .map(str::to_owned)
    };
    let run_id = field("run_id")
        .ok_or_else(|| ReadError::Internal(format!("INFO of {address} has no run_id")))?;
    if field("role").as_deref() != Some("master") {
        // A node the client still takes for a primary was demoted: the topology is moving.
        return Err(ReadError::Unavailable(format!(
            "{address} is no longer a primary"
        )));
    }
    let replicas = field("connected_slaves")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Ok(Primary {
        address: address.to_owned(),
        run_id,
        replicas,
    })
}

/// The topology fingerprint of `primaries`: who they are and which process runs each.
fn fingerprint(primaries: &[Primary]) -> String {
    let mut parts: Vec<String> = primaries
        .iter()
        .map(|p| format!("{}/{}", p.address, p.run_id))
        .collect();
    parts.sort();
    parts.join(",")
}

/// The one multiplexed connection; both variants reconnect by themselves.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("cluster", &matches!(self.conn, Conn::Cluster(_)))
            .field("prefix", &self.shared.prefix)
            .finish_non_exhaustive()
    }
}

/// Translates a driver error: connection trouble is `Unavailable`, the rest `Internal`.
fn translate(err: RedisError) -> ReadError {
    if refused(&err) {
        return ReadError::Internal(format!(
            "Redis refused the credentials or the TLS handshake (check the user, password and \
             certificates): {err}"
        ));
    }
    let unavailable = err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
        || matches!(
            err.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                )
        );
    if unavailable {
        ReadError::Unavailable(err.to_string())
    } else {
        ReadError::Internal(err.to_string())
    }
}

/// Whether `err` is a refusal no retry cures: a wrong or missing password, or a TLS handshake
/// that failed on a certificate. The Cluster client reports a failure to reach any seed as an
/// I/O error carrying the nodes' error as text, so that text is checked too.
fn refused(err: &RedisError) -> bool {
    const MARKS: [&str; 6] = [
        "AuthenticationFailed",
        "WRONGPASS",
        "NOAUTH",
        "NOPERM",
        "invalid peer certificate",
        "received fatal alert",
    ];
    if err.kind() == ErrorKind::AuthenticationFailed {
        return true;
    }
    let text = err.to_string();
    MARKS.iter().any(|mark| text.contains(mark))
}

/// Awaits `fut` for at most `timeout`, translating errors.
async fn bounded<T>(
    timeout: Duration,
    fut: impl Future<Output = ::redis::RedisResult<T>>,
) -> Result<T, ReadError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(result) => result.map_err(translate),
        Err(_) => Err(ReadError::Unavailable(format!(
            "Redis did not answer within {timeout:?}"
        ))),
    }
}

impl RedisStore {
    /// Connects (within `config.timeout`) and loads the scripts.
    pub async fn connect(config: RedisConfig) -> Result<Self, ReadError> {
        if config.urls.is_empty() {
            return Err(ReadError::Internal("no Redis URL configured".to_owned()));
        }
        if !config.cluster && config.urls.len() > 1 {
            return Err(ReadError::Internal(
                "several Redis URLs need cluster mode".to_owned(),
            ));
        }
        if config.prefix.contains(['{', '}']) {
            return Err(ReadError::Internal(
                "the Redis key prefix must not contain '{' or '}'".to_owned(),
            ));
        }
        let timeout = config.timeout;
        let conn = if config.cluster {
            let client = config
                .access
                .cluster_builder(&config.urls)
                .map_err(translate)?
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .build()
                .map_err(translate)?;
            Conn::Cluster(bounded(timeout, client.get_async_connection()).await?)
        } else {
            let client = config.access.client(&config.urls[0]).map_err(translate)?;
            let manager_config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_secs(1));
            Conn::Single(
                bounded(
                    timeout,
                    ConnectionManager::new_with_config(client, manager_config),
                )
                .await?,
            )
        };
        let store = Self {
            conn,
            shared: Arc::new(Shared {
                applied_channel: format!("{}:applied", config.prefix),
                prefix: config.prefix,
                urls: config.urls,
                access: config.access,
                feed: Arc::new(AppliedFeed::new(AppliedFeed::DEFAULT_CAPACITY, false)),
                timeout,
                apply: Script::new(APPLY_LUA),
                acquire: Script::new(ACQUIRE_LUA),
                release: Script::new(RELEASE_LUA),
                clear_pending: Script::new(CLEAR_PENDING_LUA),
                contribute: Script::new(CONTRIBUTE_LUA),
                swap: Script::new(SWAP_LUA),
                topology: Mutex::new(None),
                epoch: AtomicU64::new(0),
            }),
        };
        // The topology the store starts from (best effort: a failure leaves it unknown, and
        // the first wait then counts as a change).
        if let Ok(primaries) = store.primaries().await {
            *store.shared.topology.lock().expect("topology") = Some(fingerprint(&primaries));
        }
        // Load once up front (to every primary in a Cluster); a server that restarts and forgets
        // them gets them again on the first NOSCRIPT.
        for script in [
            &store.shared.apply,
            &store.shared.acquire,
            &store.shared.release,
            &store.shared.clear_pending,
            &store.shared.contribute,
            &store.shared.swap,
        ] {
            let mut conn = store.conn.clone();
            bounded(timeout, script.load_async(&mut conn)).await?;
        }
        Ok(store)
    }

    /// Every primary (the server itself on a standalone connection) with its run id and
    /// connected replicas: `INFO server replication`, which the Cluster client sends to every
    /// primary of its slot map and answers per address.
    async fn primaries(&self) -> Result<Vec<Primary>, ReadError> {
        let mut cmd = ::redis::cmd("INFO");
        cmd.arg("server").arg("replication");
        let value: Value = self.query(&cmd).await?;
        let text = |v: Value| -> Result<String, ReadError> {
            match v {
                Value::ServerError(e) => Err(translate(e.into())),
                v => ::redis::from_redis_value(v).map_err(|e| ReadError::Internal(e.to_string())),
            }
        };
        match value {
            Value::Map(entries) => entries
                .into_iter()
                .map(|(address, info)| parse_primary(&text(address)?, &text(info)?))
                .collect(),
            other => Ok(vec![parse_primary("server", &text(other)?)?]),
        }
    }

    /// Records `primaries` as the topology seen now; bumps the epoch if it differs from the
    /// one seen before (or none was). Returns the epoch.
    fn observe_topology(&self, primaries: &[Primary]) -> u64 {
        let now = fingerprint(primaries);
        let mut seen = self.shared.topology.lock().expect("topology");
        if seen.as_deref() != Some(now.as_str()) {
            if let Some(before) = seen.as_deref() {
                tracing::warn!(before, now = %now, "Redis primaries changed (a failover or restart)");
            }
            *seen = Some(now);
            self.shared.epoch.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            self.shared.epoch.load(Ordering::SeqCst)
        }
    }

    /// Publishes `message` on pub/sub `channel` (used verbatim, not prefixed). Best effort: a
    /// failure is logged at debug level and otherwise ignored, since the change log is the
    /// guarantee and the nudge only makes it faster.
    pub async fn publish_nudge(&self, channel: &str, message: &str) {
        let mut cmd = ::redis::cmd("PUBLISH");
        cmd.arg(channel).arg(message);
        if let Err(err) = self.query::<i64>(&cmd).await {
            tracing::debug!(channel, error = %err, "nudge not published");
        }
    }

    /// The pub/sub channel the apply script announces every applied batch on, as
    /// `<last version> <document key>` (see [`crate::notify`]).
    pub fn applied_channel(&self) -> &str {
        &self.shared.applied_channel
    }

    /// The waiters on document versions ([`ReadStore::watch`] registers them here).
    pub fn applied_feed(&self) -> &Arc<AppliedFeed> {
        &self.shared.feed
    }

    /// Follows the apply notifications until `shutdown`: one pub/sub connection (to the
    /// configured URLs in turn; on a Cluster any node hears every `PUBLISH`), whose messages
    /// wake the waiters of [`ReadStore::watch`]. The feed is live while subscribed; going live
    /// again after a loss wakes every waiter, so a message missed meanwhile costs nothing but a
    /// re-read. Until this runs, `watch` returns `None` and waits poll.
    pub async fn follow_applies(self, shutdown: CancellationToken) {
        let feed = Arc::clone(&self.shared.feed);
        subscribe(
            &self.shared.urls,
            &self.shared.access,
            &self.shared.applied_channel,
            |event| match event {
                Subscription::Up => feed.set_live(true),
                Subscription::Message(m) => feed.notify_message(m),
                Subscription::Down => feed.set_live(false),
            },
            shutdown,
        )
        .await;
        self.shared.feed.set_live(false);
    }

    fn doc_key(&self, projection: &str, doc_id: &str) -> String {
        let prefix = &self.shared.prefix;
        format!("{prefix}:{projection}:{{{doc_id}}}")
    }

    fn index_key(&self, projection: &str, index: &str) -> String {
        let prefix = &self.shared.prefix;
        format!("{prefix}:{projection}:idx:{index}")
    }

    fn generations_key(&self, projection: &str) -> String {
        let prefix = &self.shared.prefix;
        format!("{prefix}:gen:{projection}")
    }

    /// `SCAN MATCH` patterns of the document keys and of the index keys of `namespace`.
    fn namespace_patterns(&self, namespace: &str) -> [String; 2] {
        let base = glob_escape(&format!("{}:{namespace}:", self.shared.prefix));
        [format!("{base}{{*"), format!("{base}idx:*")]
    }

    /// The nodes a `SCAN` must visit: the server itself, or every primary of a Cluster (as
    /// `host:port`, sorted, so that a cursor naming a node by position stays meaningful).
    async fn scan_nodes(&self) -> Result<Vec<Option<(String, u16)>>, ReadError> {
        let Conn::Cluster(conn) = &self.conn else {
            return Ok(vec![None]);
        };
        let mut conn = conn.clone();
        let mut cmd = ::redis::cmd("CLUSTER");
        cmd.arg("NODES");
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
        let value = bounded(self.shared.timeout, conn.route_command(cmd, routing)).await?;
        let text: String =
            ::redis::from_redis_value(value).map_err(|e| ReadError::Internal(e.to_string()))?;
        let mut nodes: Vec<(String, u16)> = text
            .lines()
            .filter_map(|line| {
                let mut fields = line.split(' ');
                let address = fields.nth(1)?;
                let flags = fields.next()?;
                if !flags.split(',').any(|f| f == "master") || flags.contains("fail") {
                    return None;
                }
                let host_port = address.split(['@', ',']).next()?;
                let (host, port) = host_port.rsplit_once(':')?;
                Some((host.to_owned(), port.parse().ok()?))
            })
            .collect();
        nodes.sort();
        Ok(nodes.into_iter().map(Some).collect())
    }

    /// One `SCAN` round on `node` (`None`: the standalone server).
    async fn scan_on(
        &self,
        node: &Option<(String, u16)>,
        cursor: u64,
        pattern: &str,
        count: usize,
    ) -> Result<(u64, Vec<String>), ReadError> {
        let mut cmd = ::redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(count);
        match (node, &self.conn) {
            (Some((host, port)), Conn::Cluster(conn)) => {
                let mut conn = conn.clone();
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                let value = bounded(self.shared.timeout, conn.route_command(cmd, routing)).await?;
                ::redis::from_redis_value(value).map_err(|e| ReadError::Internal(e.to_string()))
            }
            _ => self.query(&cmd).await,
        }
    }

    /// Unlinks `keys` (freed by Redis in the background): one command on a standalone server,
    /// one per key on a Cluster (they live in different slots), sent concurrently.
    async fn unlink(&self, keys: &[String]) -> Result<u64, ReadError> {
        if keys.is_empty() {
            return Ok(0);
        }
        match &self.conn {
            Conn::Single(_) => {
                let mut cmd = ::redis::cmd("UNLINK");
                cmd.arg(keys);
                self.query(&cmd).await
            }
            Conn::Cluster(_) => {
                let sends = keys.iter().map(|key| {
                    let mut cmd = ::redis::cmd("UNLINK");
                    cmd.arg(key);
                    async move { self.query::<u64>(&cmd).await }
                });
                Ok(futures::future::try_join_all(sends).await?.iter().sum())
            }
        }
    }

    fn checkpoint_key(&self, name: &str) -> String {
        let prefix = &self.shared.prefix;
        format!("{prefix}:cp:{name}")
    }

    /// A record set: a hash of the records and a sorted set of their keys (for paging in key
    /// order), in one Cluster slot by the `{set}` hash tag.
    fn record_keys(&self, set: &str) -> (String, String) {
        let prefix = &self.shared.prefix;
        (
            format!("{prefix}:rec:{{{set}}}"),
            format!("{prefix}:reckeys:{{{set}}}"),
        )
    }

    fn members_key(&self, group: &str) -> String {
        let prefix = &self.shared.prefix;
        format!("{prefix}:members:{group}")
    }

    fn lease_key(&self, name: &str) -> String {
        let prefix = &self.shared.prefix;
        format!("{prefix}:lease:{name}")
    }

    async fn query<T: ::redis::FromRedisValue>(&self, cmd: &Cmd) -> Result<T, ReadError> {
        let mut conn = self.conn.clone();
        bounded(self.shared.timeout, cmd.query_async(&mut conn)).await
    }

    /// Runs an `EVALSHA` of `script` built by the caller (one buffer for all arguments, rather
    /// than one allocation per argument), loading the script on `NOSCRIPT` and retrying once.
    async fn eval<T: ::redis::FromRedisValue>(
        &self,
        script: &Script,
        evalsha: &Cmd,
    ) -> Result<T, ReadError> {
        let mut conn = self.conn.clone();
        let timeout = self.shared.timeout;
        match tokio::time::timeout(timeout, evalsha.query_async(&mut conn)).await {
            Ok(Err(err)) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                tracing::debug!("Redis lost the esq scripts; loading them again");
                bounded(timeout, script.load_async(&mut conn)).await?;
                bounded(timeout, evalsha.query_async(&mut conn)).await
            }
            Ok(result) => result.map_err(translate),
            Err(_) => Err(ReadError::Unavailable(format!(
                "Redis did not answer within {timeout:?}"
            ))),
        }
    }

    /// Index changes of one document: one pipeline on a standalone server; on a Cluster one
    /// per index key (they live in different slots), sent concurrently.
    async fn apply_indexes(
        &self,
        projection: &str,
        doc_id: &str,
        add: &[String],
        remove: &[String],
    ) -> Result<(), ReadError> {
        let timeout = self.shared.timeout;
        let ops = remove
            .iter()
            .map(|i| ("ZREM", i))
            .chain(add.iter().map(|i| ("ZADD", i)));
        let push = |pipe: &mut Pipeline, (cmd, index): (&str, &String)| {
            let key = self.index_key(projection, index);
            match cmd {
                "ZADD" => pipe.cmd("ZADD").arg(key).arg(0).arg(doc_id).ignore(),
                _ => pipe.cmd("ZREM").arg(key).arg(doc_id).ignore(),
            };
        };
        match &self.conn {
            Conn::Single(_) => {
                let mut pipe = ::redis::pipe();
                ops.for_each(|op| push(&mut pipe, op));
                if pipe.is_empty() {
                    return Ok(());
                }
                let mut conn = self.conn.clone();
                bounded(timeout, pipe.exec_async(&mut conn)).await
            }
            Conn::Cluster(_) => {
                let sends = ops.map(|op| {
                    let mut pipe = ::redis::pipe();
                    push(&mut pipe, op);
                    let mut conn = self.conn.clone();
                    async move { bounded(timeout, pipe.exec_async(&mut conn)).await }
                });
                futures::future::try_join_all(sends).await.map(|_| ())
            }
        }
    }
}

/// `text` with the glob characters of `SCAN MATCH` escaped.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Encodes `batch` as an `EVALSHA` of `apply.lua` (SHA `sha`, see [`APPLY_SCRIPT`]) on `key`
/// (see the script for the layout), publishing the applied version on `channel`: the command
/// [`RedisStore`]'s apply sends. It answers `[outcome, current]` (0 applied, 1 duplicate, 2
/// stale).
pub fn apply_cmd(sha: &str, key: &str, channel: &str, batch: &Batch) -> Cmd {
    let ops = &batch.changes.fields;
    let mut cmd = Cmd::with_capacity(7 + 3 * ops.len(), 160 + 32 * ops.len());
    cmd.arg("EVALSHA").arg(sha).arg(1).arg(key);
    match batch.first_version.checked_sub(1) {
        Some(previous) => cmd.arg(previous),
        None => cmd.arg(""),
    };
    cmd.arg(batch.last_version).arg(channel);
    for op in ops {
        match op {
            FieldOp::Set(field, value) => cmd.arg("S").arg(field).arg(value),
            FieldOp::Del(field) => cmd.arg("D").arg(field),
            FieldOp::Incr(field, by) => cmd.arg("I").arg(field).arg(*by),
            FieldOp::Adjust(field, by) => cmd.arg("A").arg(field).arg(*by),
            FieldOp::Tombstone => cmd.arg("T"),
        };
    }
    cmd
}

impl ReadStore for RedisStore {
    async fn ping(&self) -> Result<(), ReadError> {
        let _: String = self.query(&::redis::cmd("PING")).await?;
        Ok(())
    }

    async fn apply(
        &self,
        projection: &str,
        doc_id: &str,
        batch: &Batch,
    ) -> Result<ApplyOutcome, ReadError> {
        let key = self.doc_key(projection, doc_id);
        let cmd = apply_cmd(
            self.shared.apply.get_hash(),
            &key,
            &self.shared.applied_channel,
            batch,
        );
        let (code, current): (u8, u64) = self.eval(&self.shared.apply, &cmd).await?;
        let outcome = match code {
            0 => ApplyOutcome::Applied,
            1 => ApplyOutcome::Duplicate,
            2 => ApplyOutcome::Stale { current },
            other => {
                return Err(ReadError::Internal(format!(
                    "apply script returned outcome {other}"
                )))
            }
        };
        Ok(outcome)
    }

    async fn update_indexes(
        &self,
        projection: &str,
        doc_id: &str,
        add: &[String],
        remove: &[String],
        marker: &str,
    ) -> Result<(), ReadError> {
        self.apply_indexes(projection, doc_id, add, remove).await?;
        let mut cmd = ::redis::cmd("EVALSHA");
        cmd.arg(self.shared.clear_pending.get_hash())
            .arg(1)
            .arg(self.doc_key(projection, doc_id))
            .arg(INDEX_PENDING_FIELD)
            .arg(marker);
        let _: i64 = self.eval(&self.shared.clear_pending, &cmd).await?;
        Ok(())
    }

    async fn contribute(
        &self,
        namespace: &str,
        target: &str,
        columns: &[Column],
        c: &Contribution,
    ) -> Result<bool, ReadError> {
        let totals = self.doc_key(namespace, target);
        let entries = format!("{totals}:e");
        let kinds: String = columns.iter().map(|col| col.agg.code()).collect();
        let live = c.values.as_ref().filter(|v| v.len() == columns.len());
        let mut cmd = ::redis::cmd("EVALSHA");
        cmd.arg(self.shared.contribute.get_hash())
            .arg(2)
            .arg(totals)
            .arg(entries)
            .arg(&c.source)
            .arg(c.version)
            .arg(kinds);
        for col in columns {
            cmd.arg(col.name);
        }
        match live {
            Some(values) => {
                cmd.arg("1");
                for v in values {
                    cmd.arg(*v);
                }
            }
            None => {
                cmd.arg("0");
            }
        }
        let applied: i64 = self.eval(&self.shared.contribute, &cmd).await?;
        Ok(applied == 1)
    }

    async fn clear_field_if(
        &self,
        namespace: &str,
        doc_id: &str,
        field: &str,
        value: &str,
    ) -> Result<(), ReadError> {
        let mut cmd = ::redis::cmd("EVALSHA");
        cmd.arg(self.shared.clear_pending.get_hash())
            .arg(1)
            .arg(self.doc_key(namespace, doc_id))
            .arg(field)
            .arg(value);
        let _: i64 = self.eval(&self.shared.clear_pending, &cmd).await?;
        Ok(())
    }

    async fn get(&self, projection: &str, doc_id: &str) -> Result<Option<Doc>, ReadError> {
        let mut cmd = ::redis::cmd("HGETALL");
        cmd.arg(self.doc_key(projection, doc_id));
        let doc: Doc = self.query(&cmd).await?;
        Ok(if doc.is_empty() { None } else { Some(doc) })
    }

    fn watch(&self, namespace: &str, doc_id: &str, min_version: u64) -> Option<Watch> {
        let feed = &self.shared.feed;
        if !feed.is_live() {
            return None;
        }
        feed.watch(self.doc_key(namespace, doc_id), min_version)
    }

    async fn version(&self, projection: &str, doc_id: &str) -> Result<u64, ReadError> {
        let mut cmd = ::redis::cmd("HGET");
        cmd.arg(self.doc_key(projection, doc_id))
            .arg(esq_domain::projection::VERSION_FIELD);
        let version: Option<String> = self.query(&cmd).await?;
        // Same reading as `doc_version`: absent or unreadable is 0.
        Ok(version.and_then(|v| v.parse().ok()).unwrap_or(0))
    }

    async fn index_page(
        &self,
        projection: &str,
        index: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, ReadError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut cmd = ::redis::cmd("ZRANGE");
        cmd.arg(self.index_key(projection, index));
        match after {
            // "(x" is the exclusive lexicographic bound just above x; "-" is below everything.
            Some(after) => cmd.arg(format!("({after}")),
            None => cmd.arg("-"),
        };
        cmd.arg("+")
            .arg("BYLEX")
            .arg("LIMIT")
            .arg(0)
            .arg(i64::try_from(limit).unwrap_or(i64::MAX));
        self.query(&cmd).await
    }

    async fn generations(&self, projection: &str) -> Result<Option<String>, ReadError> {
        let mut cmd = ::redis::cmd("GET");
        cmd.arg(self.generations_key(projection));
        self.query(&cmd).await
    }

    async fn swap_generations(
        &self,
        projection: &str,
        expected: Option<&str>,
        new: &str,
    ) -> Result<bool, ReadError> {
        let mut cmd = ::redis::cmd("EVALSHA");
        cmd.arg(self.shared.swap.get_hash())
            .arg(1)
            .arg(self.generations_key(projection))
            .arg(if expected.is_some() { "1" } else { "0" })
            .arg(expected.unwrap_or(""))
            .arg(new);
        let swapped: i64 = self.eval(&self.shared.swap, &cmd).await?;
        Ok(swapped == 1)
    }

    /// `SCAN MATCH` over every primary, `UNLINK` per batch of keys found.
    async fn delete_namespace(&self, namespace: &str) -> Result<u64, ReadError> {
        let mut deleted = 0;
        for node in self.scan_nodes().await? {
            for pattern in self.namespace_patterns(namespace) {
                let mut cursor = 0;
                loop {
                    let (next, keys) = self.scan_on(&node, cursor, &pattern, SCAN_BATCH).await?;
                    deleted += self.unlink(&keys).await?;
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
        }
        Ok(deleted)
    }

    async fn delete_doc(&self, namespace: &str, doc_id: &str) -> Result<(), ReadError> {
        let mut cmd = ::redis::cmd("UNLINK");
        cmd.arg(self.doc_key(namespace, doc_id));
        self.query::<i64>(&cmd).await.map(|_| ())
    }

    async fn index_contains(
        &self,
        namespace: &str,
        index: &str,
        doc_id: &str,
    ) -> Result<bool, ReadError> {
        let mut cmd = ::redis::cmd("ZSCORE");
        cmd.arg(self.index_key(namespace, index)).arg(doc_id);
        let score: Option<f64> = self.query(&cmd).await?;
        Ok(score.is_some())
    }

    /// The cursor is `<node>:<SCAN cursor>`, the node by its position among the primaries.
    async fn doc_ids_page(
        &self,
        namespace: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<String>, Option<String>), ReadError> {
        let (mut node, mut scan) = match cursor {
            None => (0usize, 0u64),
            Some(c) => c
                .split_once(':')
                .and_then(|(n, s)| Some((n.parse().ok()?, s.parse().ok()?)))
                .ok_or_else(|| ReadError::Internal(format!("bad namespace cursor {c:?}")))?,
        };
        let nodes = self.scan_nodes().await?;
        let [pattern, _] = self.namespace_patterns(namespace);
        let strip = format!("{}:{namespace}:{{", self.shared.prefix);
        let mut ids = Vec::new();
        while node < nodes.len() && ids.len() < limit.max(1) {
            let (next, keys) = self
                .scan_on(&nodes[node], scan, &pattern, limit.max(1))
                .await?;
            ids.extend(
                keys.iter()
                    .filter_map(|k| Some(k.strip_prefix(&strip)?.strip_suffix('}')?.to_owned())),
            );
            if next == 0 {
                node += 1;
                scan = 0;
            } else {
                scan = next;
            }
        }
        let next = (node < nodes.len()).then(|| format!("{node}:{scan}"));
        Ok((ids, next))
    }

    async fn checkpoint(&self, name: &str) -> Result<Option<String>, ReadError> {
        let mut cmd = ::redis::cmd("GET");
        cmd.arg(self.checkpoint_key(name));
        self.query(&cmd).await
    }

    async fn save_checkpoint(&self, name: &str, position: &str) -> Result<(), ReadError> {
        let mut cmd = ::redis::cmd("SET");
        cmd.arg(self.checkpoint_key(name)).arg(position);
        self.query(&cmd).await
    }

    fn replication_epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::SeqCst)
    }

    /// `WAIT` on every primary (the Cluster client sends it to each over the same per-node
    /// connection the writes took, and answers the smallest count), between two looks at the
    /// primaries: a primary replaced or restarted around the wait bumps the epoch, since a
    /// `WAIT` on a new connection covers none of the writes sent on the old one. A primary
    /// with fewer connected replicas than asked is not waited on (the wait could only time
    /// out while blocking that node's connection).
    async fn wait_replicated(&self, replicas: u32) -> Result<Replication, ReadError> {
        let before = self.primaries().await?;
        self.observe_topology(&before);
        let fewest = before.iter().map(|p| p.replicas).min().unwrap_or(0);
        let acked = if replicas == 0 || fewest < replicas {
            fewest
        } else {
            let mut cmd = ::redis::cmd("WAIT");
            cmd.arg(replicas).arg(WAIT_TIMEOUT_MS);
            let n: i64 = self.query(&cmd).await?;
            u32::try_from(n).unwrap_or(0)
        };
        let after = self.primaries().await?;
        let epoch = self.observe_topology(&after);
        Ok(Replication { acked, epoch })
    }

    async fn put_record(&self, set: &str, key: &str, record: &str) -> Result<(), ReadError> {
        let (records, keys) = self.record_keys(set);
        let mut cmd = ::redis::cmd("EVAL");
        cmd.arg(
            "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) \
             redis.call('ZADD', KEYS[2], 0, ARGV[1]) return 1",
        )
        .arg(2)
        .arg(records)
        .arg(keys)
        .arg(key)
        .arg(record);
        let _: i64 = self.query(&cmd).await?;
        Ok(())
    }

    async fn get_record(&self, set: &str, key: &str) -> Result<Option<String>, ReadError> {
        let mut cmd = ::redis::cmd("HGET");
        cmd.arg(self.record_keys(set).0).arg(key);
        self.query(&cmd).await
    }

    async fn delete_record(&self, set: &str, key: &str) -> Result<bool, ReadError> {
        let (records, keys) = self.record_keys(set);
        let mut cmd = ::redis::cmd("EVAL");
        cmd.arg(
            "local n = redis.call('HDEL', KEYS[1], ARGV[1]) \
             redis.call('ZREM', KEYS[2], ARGV[1]) return n",
        )
        .arg(2)
        .arg(records)
        .arg(keys)
        .arg(key);
        let removed: i64 = self.query(&cmd).await?;
        Ok(removed > 0)
    }

    async fn records_page(
        &self,
        set: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, String)>, ReadError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (records, keys) = self.record_keys(set);
        let mut cmd = ::redis::cmd("ZRANGE");
        cmd.arg(keys);
        match after {
            Some(after) => cmd.arg(format!("({after}")),
            None => cmd.arg("-"),
        };
        cmd.arg("+")
            .arg("BYLEX")
            .arg("LIMIT")
            .arg(0)
            .arg(i64::try_from(limit).unwrap_or(i64::MAX));
        let names: Vec<String> = self.query(&cmd).await?;
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = ::redis::cmd("HMGET");
        cmd.arg(records).arg(&names);
        let values: Vec<Option<String>> = self.query(&cmd).await?;
        // A record deleted between the two reads is left out.
        Ok(names
            .into_iter()
            .zip(values)
            .filter_map(|(k, v)| Some((k, v?)))
            .collect())
    }

    async fn record_count(&self, set: &str) -> Result<u64, ReadError> {
        let mut cmd = ::redis::cmd("HLEN");
        cmd.arg(self.record_keys(set).0);
        self.query(&cmd).await
    }
}

/// Calls `on_message(Some(payload))` for every message published on `channel` at one of the
/// Redis servers at `urls` (any node, for a Cluster: classic pub/sub is broadcast; tried in
/// turn, so a dead node's subscribers move to the next), until `shutdown` is cancelled.
/// `on_message` must not block.
///
/// Uses its own pub/sub connection. Best effort: when Redis goes away it reconnects with
/// backoff (100 ms doubling to 5 s), and it calls `on_message(None)` after every
/// (re)subscription because messages may have been missed meanwhile.
pub async fn subscribe_nudges(
    urls: &[String],
    access: &RedisAccess,
    channel: &str,
    on_message: impl Fn(Option<&str>) + Send,
    shutdown: CancellationToken,
) {
    let on_event = move |event: Subscription<'_>| match event {
        Subscription::Up => on_message(None),
        Subscription::Message(m) => on_message(Some(m)),
        Subscription::Down => {}
    };
    subscribe(urls, access, channel, on_event, shutdown).await;
}

/// What a pub/sub subscription reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscription<'a> {
    /// (Re)subscribed: messages arrive from now on; some may have been missed before.
    Up,
    /// A message's payload (messages that are not UTF-8 are dropped).
    Message(&'a str),
    /// The subscription was lost; it is being re-established.
    Down,
}

/// Follows pub/sub `channel` on one of `urls` (tried in turn after each failure) until
/// `shutdown`, reporting to `on_event` (which must not block): [`Subscription::Up`] after every
/// (re)subscription, each message, and [`Subscription::Down`] when the connection is lost.
/// Reconnects with backoff, 100 ms doubling to 5 s.
pub async fn subscribe(
    urls: &[String],
    access: &RedisAccess,
    channel: &str,
    on_event: impl Fn(Subscription<'_>) + Send,
    shutdown: CancellationToken,
) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(100);
    const MAX_BACKOFF: Duration = Duration::from_secs(5);
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 0usize;
    while !shutdown.is_cancelled() {
        let Some(raw_url) = urls.get(attempt % urls.len().max(1)) else {
            return;
        };
        // Logged without its password.
        let shown = redact_url(raw_url);
        let url = shown.as_str();
        attempt += 1;
        let subscribed = async {
            let client = access.client(raw_url)?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            Ok::<_, RedisError>(pubsub)
        };
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return,
            outcome = tokio::time::timeout(CONNECT_TIMEOUT, subscribed) => outcome,
        };
        match outcome {
            Ok(Ok(mut pubsub)) => {
                tracing::debug!(url, channel, "subscribed");
                backoff = FIRST_BACKOFF;
                attempt -= 1;
                on_event(Subscription::Up);
                let mut messages = pubsub.on_message();
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        message = messages.next() => match message {
                            Some(m) => {
                                if let Ok(text) = std::str::from_utf8(m.get_payload_bytes()) {
                                    on_event(Subscription::Message(text));
                                }
                            }
                            None => break,
                        },
                    }
                }
                on_event(Subscription::Down);
                attempt += 1;
                tracing::warn!(url, channel, "subscription lost; reconnecting");
            }
            Ok(Err(err)) => {
                tracing::warn!(url, channel, error = %err, "cannot subscribe");
            }
            Err(_) => tracing::warn!(url, channel, "subscribing timed out"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

impl crate::Coordination for RedisStore {
    async fn acquire_lease(
        &self,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<bool, ReadError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut cmd = ::redis::cmd("EVALSHA");
        cmd.arg(self.shared.acquire.get_hash())
            .arg(1)
            .arg(self.lease_key(name))
            .arg(owner)
            .arg(ttl_ms);
        let taken: i64 = self.eval(&self.shared.acquire, &cmd).await?;
        Ok(taken == 1)
    }

    async fn release_lease(&self, name: &str, owner: &str) -> Result<bool, ReadError> {
        let mut cmd = ::redis::cmd("EVALSHA");
        cmd.arg(self.shared.release.get_hash())
            .arg(1)
            .arg(self.lease_key(name))
            .arg(owner);
        let deleted: i64 = self.eval(&self.shared.release, &cmd).await?;
        Ok(deleted == 1)
    }

    /// A sorted set of members scored by expiry (ms since the epoch, by this process's clock:
    /// replicas' clocks only need to agree to well within the ttl).
    async fn heartbeat(
        &self,
        group: &str,
        member: &str,
        ttl: Duration,
    ) -> Result<usize, ReadError> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let key = self.members_key(group);
        let expiry = now_ms + u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX / 2);
        let mut add = ::redis::cmd("ZADD");
        add.arg(&key).arg(expiry).arg(member);
        self.query::<i64>(&add).await?;
        let mut prune = ::redis::cmd("ZREMRANGEBYSCORE");
        prune.arg(&key).arg("-inf").arg(now_ms);
        self.query::<i64>(&prune).await?;
        let mut count = ::redis::cmd("ZCARD");
        count.arg(&key);
        let n: u64 = self.query(&count).await?;
        Ok(n as usize)
    }

    async fn leave(&self, group: &str, member: &str) -> Result<(), ReadError> {
        let mut cmd = ::redis::cmd("ZREM");
        cmd.arg(self.members_key(group)).arg(member);
        self.query::<i64>(&cmd).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_gives_run_id_role_and_replicas() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:abc123\r\n\r\n# Replication\r\n\
                    role:master\r\nconnected_slaves:2\r\nslave0:ip=127.0.0.1,port=1\r\n";
        let p = parse_primary("127.0.0.1:1", info).unwrap();
        assert_eq!((p.run_id.as_str(), p.replicas), ("abc123", 2));
        let replica = "run_id:x\r\nrole:slave\r\nmaster_link_status:up\r\n";
        assert!(matches!(
            parse_primary("a", replica),
            Err(ReadError::Unavailable(_))
        ));
        assert!(matches!(
            parse_primary("a", "role:master\r\n"),
            Err(ReadError::Internal(_))
        ));
        let a = Primary {
            address: "b:2".into(),
            run_id: "r2".into(),
            replicas: 1,
        };
        let b = Primary {
            address: "a:1".into(),
            run_id: "r1".into(),
            replicas: 0,
        };
        assert_eq!(
            fingerprint(&[a.clone(), b.clone()]),
            fingerprint(&[b.clone(), a.clone()])
        );
        let restarted = Primary {
            run_id: "r3".into(),
            ..a.clone()
        };
        assert_ne!(fingerprint(&[a, b.clone()]), fingerprint(&[restarted, b]));
    }

    #[test]
    fn urls_are_shown_without_their_password() {
        assert_eq!(
            redact_url("rediss://esq:pa:ss@127.0.0.1:6380/0"),
            "rediss://esq:***@127.0.0.1:6380/0"
        );
        assert_eq!(redact_url("redis://secret@host:1"), "redis://***@host:1");
        assert_eq!(redact_url("redis://host:1"), "redis://host:1");
        let access = RedisAccess {
            username: Some("esq".into()),
            password: Some("hunter2".into()),
            tls: Some(RedisTls {
                ca_pem: None,
                client: Some((b"cert".to_vec(), b"KEY-MATERIAL".to_vec())),
            }),
        };
        let shown = format!("{access:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("KEY-MATERIAL"),
            "{shown}"
        );
    }

    #[test]
    fn certificates_need_a_tls_url() {
        let access = RedisAccess {
            tls: Some(RedisTls::default()),
            ..RedisAccess::default()
        };
        let err = access
            .client("redis://esq:hunter2@127.0.0.1:1")
            .expect_err("plain URL with certificates");
        assert!(err.to_string().contains("rediss://"), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        // Credentials given apart override the URL's.
        let access = RedisAccess {
            username: Some("other".into()),
            password: Some("pw".into()),
            tls: None,
        };
        let client = access
            .client("redis://esq:old@127.0.0.1:1")
            .expect("client");
        let settings = client.get_connection_info().redis_settings();
        assert_eq!(settings.username(), Some("other"));
        assert_eq!(settings.password(), Some("pw"));
    }
}
