//! The CQL adapter: [`EventStore`] and [`ChangeFeed`] on ScyllaDB or Apache Cassandra 5,
//! through the `scylla` driver.
//!
//! # Schema (created or migrated by [`CqlStore::connect`])
//!
//! ```text
//! events          PRIMARY KEY ((stream_type, stream_id, bucket), version)
//!                 static head bigint (the stream's version), static created_at / updated_at
//!                 bigint µs, event_id uuid, event_type text, schema_version int,
//!                 content_type text, data blob, metadata map<text, text>, recorded_at bigint µs
//! changes         PRIMARY KEY ((shard, bucket), id timeuuid), stream_type, stream_id,
//!                 first_version, last_version — TTL'd, time-window compaction
//! change_buckets  PRIMARY KEY ((shard), bucket) — which time buckets of a shard hold
//!                 notifications, so polls skip empty ones
//! ```
//!
//! One partition per stream. `bucket` is always 0 for now: it is in the key so that very long
//! streams can later be split over several partitions without changing the API.
//!
//! # Appends
//! One conditional batch inside the partition: `UPDATE … SET head = :new IF head = :expected`
//! (`IF head = NULL` for a stream's first append: on Cassandra 5 that holds for a missing
//! partition, `IF head = 0` does not) plus one INSERT per event. `Any` and `StreamExists` read
//! the head first and condition on it, retrying lost races until the append deadline.
//!
//! Idempotency (the rule of [`EventStore::append`]) uses a window, not an index: the read that
//! returns the head also returns the ids of the stream's newest [`CqlConfig::id_window`] events
//! with the bounds of the appends that wrote them; an append that is exactly one of those
//! appends, with the same contents, returns the original result, any other use of a known id is
//! [`StoreError::EventIdReused`]. That read is one bounded, exact, single-partition slice — no
//! index lag, nothing to keep in step — at the price that an `Any` retry arriving after more
//! than `id_window` newer events of its stream is not recognised. `Exact` retries are
//! recognised wherever they are: the batch finds the head moved, and the rows at the expected
//! positions are read back linearizably and compared.
//!
//! A per-process tail cache lets appends skip the head/window read where this process
//! already knows the head (the batch's condition checks the guess; see `append.rs`).
//!
//! With [`FeedKind::ChangesTable`] the notification row is written *before* the batch (group
//! committed: concurrent appends' rows share one unlogged batch), so a committed append always
//! has one; a notification whose batch never commits is an orphan the
//! projector recognises after the append deadline. For that to hold, the batch is sent only
//! if the notification was acknowledged within half the confidence window of its timeuuid and
//! the batch can end before the append deadline (see [`CqlConfig::confidence_window`] and
//! [`CqlConfig::append_deadline`]); otherwise the append fails with
//! [`StoreError::Unavailable`].
//!
//! # Engines
//! The engine is detected at connect. ScyllaDB gets its keyspace with tablets disabled and, with
//! [`FeedKind::ScyllaCdc`], CDC on the events table; Apache Cassandra rejects both options and
//! gets neither. LWT results are read as untyped rows because the engines shape them
//! differently. The Scylla-only paths (tablets DDL, the CDC feed) cannot run in this project's
//! test environment, which has Cassandra only; they are kept small and unit-tested.
//!
//! # Credentials and TLS
//! [`CqlConfig::credentials`] logs in with the cluster's password authenticator and
//! [`CqlConfig::tls`] wraps every connection in TLS (rustls, trusting only the given CA,
//! optionally presenting a client certificate). A session that cannot open because the cluster
//! refused the credentials or a certificate fails with [`StoreError::Internal`] at once: no
//! retry cures it, so the process stops with the reason instead of retrying forever.
//!
//! # Failures
//! Every request carries [`CqlConfig::request_timeout`] (in the driver and around the call), and
//! driver errors are translated at this boundary: no reachable node, broken connections and
//! timeouts become [`StoreError::Unavailable`], promptly. The same store serves again once the
//! cluster is back: the driver reconnects by itself, and when a request finds no connection at
//! all while a node accepts TCP again, the store opens a new session at once rather than wait
//! out the driver's reconnect backoff (up to 10 s). A batch that got no answer (timeout, lost
//! connection) may have committed: it is resolved by linearizable reads of the stream before
//! the append answers, or reported as [`StoreError::OutcomeUnknown`].

mod append;
mod cdc;
mod changes;
mod error;
mod read;
mod schema;
mod security;
mod snapshots;
mod statements;

pub use changes::shard_of;
pub use security::{CqlCredentials, CqlTls};

use crate::{ChangeFeed, ChangePage, EventStore, ReadRequest, StoreError, StreamPage};
use esq_domain::{AppendResult, ExpectedVersion, NewEvent, RecordedEvent, StreamId, StreamInfo};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::ExecutionError;
use scylla::statement::{Consistency, SerialConsistency};
use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Which change feed the store writes and serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FeedKind {
    /// The portable `changes` table: a notification row per append, written before it.
    /// Works on both engines; positions are exact checkpoints.
    #[default]
    ChangesTable,
    /// ScyllaDB's native CDC log of the events table, read with the `scylla-cdc` crate; appends
    /// write no notification. ScyllaDB only: [`CqlStore::connect`] refuses it on Cassandra.
    ///
    /// One log reader per store starts at the first poll, from `now - change_ttl`, and feeds
    /// per-shard bounded queues. Each shard keeps the changes it served until a poll
    /// acknowledges them (by passing, as `after`, the position of the last change fully
    /// processed), so a projector that stops partway through a page gets the rest again.
    /// Positions are meaningful only within the process: after a restart the reader replays
    /// from `now - change_ttl` and delivery is at least once.
    ///
    /// **Supports a single projector replica**: the acknowledgements are the process's own
    /// state, and the process must poll every shard, because the reader waits while any
    /// shard's buffer is full; replicas sharing shards need [`FeedKind::ChangesTable`].
    /// Untested against a real ScyllaDB here: the conversion of CDC rows into changes and the
    /// per-shard buffer are unit-tested.
    ScyllaCdc,
}

/// The CQL engine behind the store, detected at connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// ScyllaDB.
    Scylla,
    /// Apache Cassandra.
    Cassandra,
}

/// Consistency level of every plain read and write: the change-log notification, the events'
/// commit phase of an append, stream and change-log reads, snapshots.
///
/// Only quorum levels are offered: an acknowledged append is then on a majority of the
/// replicas, and every later quorum read meets at least one of them, so the projector, the
/// verifier and every read that decides see every acknowledged append. `ONE`, `TWO` or `ANY`
/// could acknowledge an append a later read does not see (the projector would skip its
/// notification as an orphan), and `ALL` gives up the tolerance of a node loss.
/// See ARCHITECTURE.md, "Consistency levels".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuorumLevel {
    /// `LOCAL_QUORUM`: a majority of the replicas in the coordinator's datacenter. On one
    /// datacenter the same as `QUORUM`; on several, each datacenter's clients see their own
    /// datacenter's writes at once and others' after replication.
    #[default]
    LocalQuorum,
    /// `QUORUM`: a majority of all replicas, across datacenters: every read sees every
    /// acknowledged write wherever it was made, at the price of cross-datacenter round trips.
    Quorum,
}

impl QuorumLevel {
    pub(crate) fn driver(self) -> Consistency {
        match self {
            Self::LocalQuorum => Consistency::LocalQuorum,
            Self::Quorum => Consistency::Quorum,
        }
    }
}

/// Consistency level of the Paxos phase of an append (the lightweight transaction that checks
/// the expected version) and of the reads that settle an append's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SerialLevel {
    /// `LOCAL_SERIAL`: Paxos among the local datacenter's replicas. Linearizable per stream as
    /// long as every writer of a stream is in one datacenter.
    #[default]
    LocalSerial,
    /// `SERIAL`: Paxos among all replicas: linearizable per stream even with writers in
    /// several datacenters, at the price of cross-datacenter round trips per append.
    Serial,
}

impl SerialLevel {
    pub(crate) fn driver(self) -> SerialConsistency {
        match self {
            Self::LocalSerial => SerialConsistency::LocalSerial,
            Self::Serial => SerialConsistency::Serial,
        }
    }

    /// The level of a read that must see (or complete) every Paxos round before it.
    pub(crate) fn as_read(self) -> Consistency {
        match self {
            Self::LocalSerial => Consistency::LocalSerial,
            Self::Serial => Consistency::Serial,
        }
    }
}

/// How to reach the cluster and lay out the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CqlConfig {
    /// Contact points, `host:port`.
    pub nodes: Vec<String>,
    /// Keyspace holding the tables: `[A-Za-z0-9_]`, at most 48 characters.
    pub keyspace: String,
    /// CQL replication map used when the keyspace is created, e.g.
    /// `{'class': 'NetworkTopologyStrategy', 'dc1': 3}`.
    pub replication: String,
    /// Consistency level of plain reads and writes ([`QuorumLevel`]).
    pub consistency: QuorumLevel,
    /// Consistency level of appends' Paxos phase and of the reads settling an append
    /// ([`SerialLevel`]).
    pub serial_consistency: SerialLevel,
    /// Longest wait for any one request (and for each connection attempt; opening the session
    /// at connect waits at most twice this); past it the call fails with
    /// [`StoreError::Unavailable`]. The cluster's own write and CAS timeouts should not be
    /// longer, so that a batch the client gave up on does not commit later on the server.
    pub request_timeout: Duration,
    /// Longest an append may keep retrying lost races (`Any`, `StreamExists`). Projectors treat
    /// a notification whose events are missing this long after it was noted as an orphan.
    ///
    /// So that no orphan is ever wrongly skipped, an append commits or gives up before this
    /// deadline: it sends a batch only while `now - noted_at + request_timeout <
    /// append_deadline` (`noted_at` being the time in its notification's timeuuid), and fails
    /// with [`StoreError::Unavailable`] otherwise. At least `2 × request_timeout` (checked at
    /// connect): room for the notification write and the batch.
    pub append_deadline: Duration,
    /// Number of change-feed shards. Part of the stored layout: changing it for a keyspace that
    /// already holds notifications moves streams between shards.
    pub shard_count: u32,
    /// How far behind now a poll reads, so that notifications noted earlier but landing later
    /// are not skipped. At least 100 ms (checked at connect).
    ///
    /// The rule that makes this hold: an append whose notification write is acknowledged more
    /// than half this window after the notification's `noted_at` does not send its batch; it
    /// fails with [`StoreError::Unavailable`] (nothing is appended, a retry is safe) and the
    /// late row is a harmless orphan. So every committed append's notification was visible
    /// before any poll could read past it.
    ///
    /// Clock assumption: `noted_at` comes from the write service's clock and the cutoff from the
    /// projector's, so their clocks must agree to well within the window (NTP); the other half
    /// of the window is that margin. Skew beyond it can make a projector pass a row over.
    pub confidence_window: Duration,
    /// How long notifications live; a projector may be down this long without a rebuild.
    pub change_ttl: Duration,
    /// Width of a change-log time bucket (at least a second). Part of the stored layout.
    pub change_bucket: Duration,
    /// Which change feed appends write and polls read.
    pub feed: FeedKind,
    /// How many of a stream's newest events an append checks for its event ids (idempotent
    /// retries and reused ids are recognised within this window).
    pub id_window: u32,
    /// Whether `Exact` appends check the idempotency window too (in parallel with the
    /// notification write, so it adds a read but no latency). Without it a retried `Exact`
    /// append is still recognised by the lost-race read-back, but an id reused in a later
    /// `Exact` append at the right version is stored again instead of being refused with
    /// [`StoreError::EventIdReused`], as the [`EventStore`] contract requires. Turn it off
    /// only where clients never reuse ids.
    pub check_ids_on_exact: bool,
    /// Username and password for the cluster's password authenticator; `None` logs in
    /// anonymously (`AllowAllAuthenticator`).
    pub credentials: Option<CqlCredentials>,
    /// Client TLS towards the nodes; `None` is plaintext.
    pub tls: Option<CqlTls>,
}

impl CqlConfig {
    /// A configuration for `nodes` and `keyspace` with defaults for the rest: replication
    /// factor 1 (SimpleStrategy), `LOCAL_QUORUM` and `LOCAL_SERIAL`, 5 s requests, a 15 s append deadline, 16 shards, a 2 s
    /// confidence window, notifications kept 7 days in one-minute buckets, the changes-table
    /// feed, and a 100-event idempotency window checked by every append.
    pub fn new(nodes: Vec<String>, keyspace: impl Into<String>) -> Self {
        Self {
            nodes,
            keyspace: keyspace.into(),
            replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
            consistency: QuorumLevel::default(),
            serial_consistency: SerialLevel::default(),
            request_timeout: Duration::from_secs(5),
            append_deadline: Duration::from_secs(15),
            shard_count: 16,
            confidence_window: Duration::from_secs(2),
            change_ttl: Duration::from_secs(7 * 24 * 3600),
            change_bucket: Duration::from_secs(60),
            feed: FeedKind::ChangesTable,
            id_window: 100,
            check_ids_on_exact: true,
            credentials: None,
            tls: None,
        }
    }

    fn validate(&self) -> Result<(), StoreError> {
        schema::validate_keyspace(&self.keyspace)?;
        let bad = |what: &str| {
            Err(StoreError::Internal(format!(
                "bad CQL configuration: {what}"
            )))
        };
        if self.nodes.is_empty() {
            return bad("no contact nodes");
        }
        if self.shard_count == 0 {
            return bad("shard_count must be at least 1");
        }
        if self.request_timeout.is_zero() {
            return bad("request_timeout must be positive");
        }
        if self.change_bucket < Duration::from_secs(1) {
            return bad("change_bucket must be at least a second");
        }
        if self.change_ttl < Duration::from_secs(1) {
            return bad("change_ttl must be at least a second");
        }
        if self.append_deadline < self.request_timeout * 2 + self.confidence_window {
            return Err(StoreError::Internal(format!(
                "bad CQL configuration: append_deadline ({} ms) must be at least twice \
                 request_timeout ({} ms) plus confidence_window ({} ms), so that an append can \
                 write its notification and its batch, with a margin for clock skew, before \
                 the deadline after which projectors skip the notification",
                self.append_deadline.as_millis(),
                self.request_timeout.as_millis(),
                self.confidence_window.as_millis()
            )));
        }
        if self.confidence_window < Duration::from_millis(100) {
            return Err(StoreError::Internal(format!(
                "bad CQL configuration: confidence_window ({} ms) must be at least 100 ms: \
                 appends whose notification takes more than half of it to write are refused",
                self.confidence_window.as_millis()
            )));
        }
        Ok(())
    }
}

/// The event store and change feed on a CQL cluster. Cheap to clone: clones share one session
/// (connection pool) and its prepared statements.
#[derive(Clone)]
pub struct CqlStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CqlStore")
            .field("keyspace", &self.inner.config.keyspace)
            .field("engine", &self.inner.engine)
            .field("feed", &self.inner.config.feed)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    /// The current session; replaced by [`Inner::revive_if_stuck`] after an outage.
    session: RwLock<Arc<Session>>,
    /// When a revival was last considered, so that it is tried at most once per
    /// [`REVIVE_INTERVAL`].
    revived_at: Mutex<Option<Instant>>,
    config: CqlConfig,
    engine: Engine,
    stmts: statements::Statements,
    snapshots: snapshots::SnapshotStatements,
    clock: changes::TimeuuidClock,
    indexed: Mutex<HashSet<(i32, i64)>>,
    /// Group commit of change-log notifications ([`Inner::note_change`]).
    notifier: changes::Notifier,
    /// What this process knows of streams' heads and newest events
    /// ([`append::TailCache`]), so that appends need not read them first.
    tails: append::TailCache,
    /// Per-stream turns of this process's appends ([`append::Turns`]).
    turns: append::Turns,
    cdc: Option<cdc::CdcFeed>,
}

impl CqlStore {
    /// Connects, detects the engine, creates or migrates the keyspace and tables, and prepares
    /// the statements. Fails with [`StoreError::Unavailable`] if the cluster cannot be reached
    /// within the request timeout, [`StoreError::Internal`] for a bad configuration.
    pub async fn connect(config: CqlConfig) -> Result<Self, StoreError> {
        config.validate()?;
        let session = open_session(&config).await?;
        let engine = schema::detect_engine(&session).await?;
        if config.feed == FeedKind::ScyllaCdc && engine != Engine::Scylla {
            return Err(StoreError::Internal(
                "the ScyllaCdc feed needs ScyllaDB; use the ChangesTable feed on Cassandra".into(),
            ));
        }
        schema::ensure(&session, &config, engine).await?;
        let (stmts, snapshots) = futures::try_join!(
            statements::Statements::prepare(&session, &config.keyspace, config.serial_consistency),
            snapshots::SnapshotStatements::prepare(&session, &config.keyspace),
        )?;
        // The Scylla CDC feed keeps this first session for its reader even if a later one
        // replaces it for requests.
        let session = Arc::new(session);
        let cdc = (config.feed == FeedKind::ScyllaCdc).then(|| {
            cdc::CdcFeed::new(
                Arc::clone(&session),
                config.keyspace.clone(),
                config.shard_count,
                config.confidence_window,
                config.change_ttl,
            )
        });
        tracing::info!(keyspace = %config.keyspace, ?engine, feed = ?config.feed, "CQL event store ready");
        Ok(Self {
            inner: Arc::new(Inner {
                session: RwLock::new(session),
                revived_at: Mutex::new(None),
                config,
                engine,
                stmts,
                snapshots,
                clock: changes::TimeuuidClock::new(),
                indexed: Mutex::new(HashSet::new()),
                notifier: changes::Notifier::default(),
                tails: append::TailCache::new(TAIL_CACHE_EVENTS),
                turns: append::Turns::default(),
                cdc,
            }),
        })
    }

    /// The engine detected at connect.
    pub fn engine(&self) -> Engine {
        self.inner.engine
    }

    /// The configuration the store runs with.
    pub fn config(&self) -> &CqlConfig {
        &self.inner.config
    }

    /// The shard of `stream` in this store's change feed.
    pub fn shard_of(&self, stream: &StreamId) -> u32 {
        shard_of(stream, self.inner.config.shard_count)
    }
}

/// Opens a driver session on `config`'s nodes with its timeouts and consistency levels.
async fn open_session(config: &CqlConfig) -> Result<Session, StoreError> {
    let profile = ExecutionProfile::builder()
        .request_timeout(Some(config.request_timeout))
        .consistency(config.consistency.driver())
        .serial_consistency(Some(config.serial_consistency.driver()))
        .build();
    let mut builder = SessionBuilder::new()
        .known_nodes(&config.nodes)
        .connection_timeout(config.request_timeout)
        .default_execution_profile_handle(profile.into_handle())
        .keyspaces_to_fetch([config.keyspace.clone()])
        .schema_agreement_timeout(config.request_timeout * 6);
    if let Some(credentials) = &config.credentials {
        builder = builder.user(&credentials.username, &credentials.password);
    }
    if let Some(tls) = &config.tls {
        let client = tls
            .client_config()
            .map_err(|e| StoreError::Internal(format!("bad CQL TLS configuration: {e}")))?;
        builder = builder.tls_context(Some(client));
    }
    let connect = builder.build();
    match tokio::time::timeout(config.request_timeout * 2, connect).await {
        Ok(session) => session.map_err(|e| security::session_error(e, error::new_session)),
        Err(_) => Err(StoreError::Unavailable(format!(
            "no CQL node of {:?} answered within {:?}",
            config.nodes,
            config.request_timeout * 2
        ))),
    }
}

/// How often a store without any connection checks whether the cluster answers again.
const REVIVE_INTERVAL: Duration = Duration::from_millis(500);

/// Events the tail cache holds at most, over all streams (about 64 bytes each).
const TAIL_CACHE_EVENTS: usize = 65_536;

impl Inner {
    /// The current driver session.
    fn session(&self) -> Arc<Session> {
        match self.session.read() {
            Ok(session) => Arc::clone(&session),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Runs one driver call under the request timeout and translates its error.
    async fn timed<T>(
        &self,
        call: impl Future<Output = Result<T, ExecutionError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.config.request_timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                if error::no_connection(&e) {
                    // Boxed: opening a session is a large future, and every request's future
                    // would otherwise carry it (deep async stacks overflow in debug builds).
                    Box::pin(self.revive_if_stuck()).await;
                }
                Err(error::execution(e))
            }
            Err(_) => Err(StoreError::Unavailable(format!(
                "no answer within {} ms",
                self.config.request_timeout.as_millis()
            ))),
        }
    }

    /// Replaces the session when it has no connection left but a contact point accepts
    /// connections again.
    ///
    /// Why: the driver refills a lost pool with exponential backoff up to 10 s (not
    /// configurable in its stable API), so after an outage of some seconds a process could go
    /// on failing for up to ~11 s after the cluster is back. A new session connects at once.
    /// Checked at most once per [`REVIVE_INTERVAL`], only after a request failed for want of a
    /// connection; the probe is a plain TCP connect, refused at once while the node is down.
    async fn revive_if_stuck(&self) {
        {
            let Ok(mut last) = self.revived_at.lock() else {
                return;
            };
            if last.is_some_and(|at| at.elapsed() < REVIVE_INTERVAL) {
                return;
            }
            *last = Some(Instant::now());
        }
        let session = self.session();
        let state = session.get_cluster_state();
        if state
            .get_nodes_info()
            .iter()
            .any(|node| node.is_connected())
        {
            return;
        }
        let probe = Duration::from_millis(500).min(self.config.request_timeout);
        let mut reachable = false;
        for node in &self.config.nodes {
            let connect = tokio::net::TcpStream::connect(node.as_str());
            if let Ok(Ok(_)) = tokio::time::timeout(probe, connect).await {
                reachable = true;
                break;
            }
        }
        if !reachable {
            return;
        }
        match open_session(&self.config).await {
            Ok(fresh) => {
                tracing::info!(
                    "CQL connections lost and a node answers again: opened a new session \
                     rather than wait for the driver's reconnect backoff"
                );
                if let Ok(mut current) = self.session.write() {
                    *current = Arc::new(fresh);
                }
            }
            Err(e) => tracing::debug!(error = %e, "a node accepts connections but no session yet"),
        }
    }
}

impl EventStore for CqlStore {
    fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> impl Future<Output = Result<AppendResult, StoreError>> + Send {
        self.inner.append(stream, expected, events)
    }

    fn read(
        &self,
        stream: &StreamId,
        request: ReadRequest,
    ) -> impl Future<Output = Result<Vec<RecordedEvent>, StoreError>> + Send {
        self.inner.read(stream, request)
    }

    fn stream_info(
        &self,
        stream: &StreamId,
    ) -> impl Future<Output = Result<Option<StreamInfo>, StoreError>> + Send {
        self.inner.stream_info(stream)
    }

    fn list_streams(
        &self,
        cursor: Option<String>,
        limit: u32,
    ) -> impl Future<Output = Result<StreamPage, StoreError>> + Send {
        self.inner.list_streams(cursor, limit)
    }
}

impl ChangeFeed for CqlStore {
    fn shard_of(&self, stream: &StreamId) -> u32 {
        CqlStore::shard_of(self, stream)
    }

    fn shard_count(&self) -> u32 {
        self.inner.config.shard_count
    }

    async fn poll(
        &self,
        shard: u32,
        after: Option<&str>,
        limit: u32,
    ) -> Result<ChangePage, StoreError> {
        match &self.inner.cdc {
            Some(feed) => feed.poll(shard, after, limit).await,
            None => self.inner.poll_changes(shard, after, limit).await,
        }
    }

    fn append_deadline(&self) -> Duration {
        self.inner.config.append_deadline
    }

    /// The confidence window (the CDC feed's own lag is not known here).
    fn visibility_lag(&self) -> Duration {
        self.inner.config.confidence_window
    }

    fn retention(&self) -> Option<Duration> {
        Some(self.inner.config.change_ttl)
    }

    /// The Scylla CDC feed's positions are this process's acknowledgements.
    fn shared_positions(&self) -> bool {
        self.inner.cdc.is_none()
    }

    /// Just before every notification noted at or after `time_us − append_deadline`: an append
    /// noted earlier than that cannot commit at or after `time_us`.
    async fn position_before(
        &self,
        shard: u32,
        time_us: i64,
    ) -> Result<Option<String>, StoreError> {
        let from = time_us - self.inner.config.append_deadline.as_micros() as i64;
        let _ = shard;
        Ok(Some(self.inner.position_before(from)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(config: &CqlConfig) -> String {
        match config.validate() {
            Err(StoreError::Internal(text)) => text,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn defaults_and_the_system_test_settings_are_valid() {
        let mut config = CqlConfig::new(vec!["127.0.0.1:9042".into()], "ks");
        assert_eq!(config.validate(), Ok(()));
        config.request_timeout = Duration::from_millis(2000);
        config.confidence_window = Duration::from_millis(1000);
        config.append_deadline = Duration::from_millis(6000);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn the_append_deadline_must_cover_two_requests() {
        let mut config = CqlConfig::new(vec!["127.0.0.1:9042".into()], "ks");
        config.request_timeout = Duration::from_millis(3000);
        config.confidence_window = Duration::from_millis(1000);
        config.append_deadline = Duration::from_millis(6999);
        let text = refused(&config);
        assert!(text.contains("append_deadline (6999 ms)"), "{text}");
        assert!(text.contains("request_timeout (3000 ms)"), "{text}");
        config.append_deadline = Duration::from_millis(7000);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn the_confidence_window_has_a_floor() {
        let mut config = CqlConfig::new(vec!["127.0.0.1:9042".into()], "ks");
        config.confidence_window = Duration::from_millis(99);
        let text = refused(&config);
        assert!(text.contains("confidence_window (99 ms)"), "{text}");
        config.confidence_window = Duration::from_millis(100);
        assert_eq!(config.validate(), Ok(()));
    }
}
