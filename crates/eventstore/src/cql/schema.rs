//! Engine detection and the keyspace's tables, created or migrated at connect.
//!
//! DDL is dialect-aware: ScyllaDB gets `tablets = {'enabled': false}` on the keyspace (LWT and
//! CDC on vnodes are the proven combination) and `cdc = {...}` on the events table when the
//! native CDC feed is chosen; Apache Cassandra rejects both options, so it gets neither. Every
//! statement is sent only once the nodes agree on the schema, and followed by a wait for
//! agreement. A statement that reached a node is never sent again: on a ring, a
//! `CREATE TABLE IF NOT EXISTS` re-sent to a node that has not yet learnt of the first one
//! creates a second table of the same name with another id, and the nodes then disagree for
//! good (Cassandra without transactional metadata). A statement that failed otherwise (DDL on
//! a busy single node can time out, and a node may still apply it) is sent again, a few
//! times, but again only once the nodes agree, so that if any node applied it, all have.

use super::{error, CqlConfig, Engine, FeedKind};
use crate::StoreError;
use scylla::client::session::Session;
use scylla::errors::{ExecutionError, SchemaAgreementError};
use std::time::Duration;

/// Attempts per DDL statement before giving up.
const DDL_ATTEMPTS: u32 = 5;
/// Waits for schema agreement (each the session's `schema_agreement_timeout`) before giving up:
/// a loaded ring may take minutes to agree, and giving up only makes the caller connect again.
const AGREEMENT_WAITS: u32 = 10;

/// Columns of the events table with their CQL types; a column missing from an existing table
/// is added at connect (the whole of what "migration" means so far).
const EVENT_COLUMNS: &[(&str, &str)] = &[
    ("head", "bigint static"),
    ("created_at", "bigint static"),
    ("updated_at", "bigint static"),
    ("event_id", "uuid"),
    ("event_type", "text"),
    ("schema_version", "int"),
    ("content_type", "text"),
    ("data", "blob"),
    ("metadata", "map<text, text>"),
    ("recorded_at", "bigint"),
    // First and last version of the append that wrote the row: a retry is recognised only as
    // the whole of one earlier append.
    ("append_first", "bigint"),
    ("append_last", "bigint"),
];

/// Whether the cluster is ScyllaDB (it has `system.scylla_local`) or Apache Cassandra.
pub(crate) async fn detect_engine(session: &Session) -> Result<Engine, StoreError> {
    let result = session
        .query_unpaged(
            "SELECT table_name FROM system_schema.tables \
             WHERE keyspace_name = 'system' AND table_name = 'scylla_local'",
            (),
        )
        .await
        .map_err(error::execution)?
        .into_rows_result()
        .map_err(error::into_rows)?;
    Ok(if result.rows_num() > 0 {
        Engine::Scylla
    } else {
        Engine::Cassandra
    })
}

/// Checks that a keyspace name is a plain CQL identifier: it is spliced into statements.
pub(crate) fn validate_keyspace(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 48
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(StoreError::Internal(format!(
            "keyspace name {name:?} must be 1..=48 characters of [A-Za-z0-9_], not starting with a digit"
        )))
    }
}

/// The DDL statements for `config` on `engine`, in order.
pub(crate) fn ddl(config: &CqlConfig, engine: Engine) -> Vec<String> {
    let ks = &config.keyspace;
    let scylla_cdc = engine == Engine::Scylla && config.feed == FeedKind::ScyllaCdc;
    let ttl = config.change_ttl.as_secs().max(1);
    let keyspace_options = match engine {
        Engine::Scylla => " AND tablets = {'enabled': false}",
        Engine::Cassandra => "",
    };
    let columns: String = EVENT_COLUMNS
        .iter()
        .map(|(name, typ)| format!("{name} {typ}, "))
        .collect();
    let cdc = if scylla_cdc {
        format!(" AND cdc = {{'enabled': true, 'ttl': {ttl}}}")
    } else {
        String::new()
    };
    vec![
        format!(
            "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {}{keyspace_options}",
            config.replication
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.events (stream_type text, stream_id text, \
             bucket int, version bigint, {columns}\
             PRIMARY KEY ((stream_type, stream_id, bucket), version)) \
             WITH CLUSTERING ORDER BY (version ASC){cdc}"
        ),
        // Notifications are an append-only, TTL'd time series read by time: time-window
        // compaction drops whole expired files instead of compacting tombstones.
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.changes (shard int, bucket bigint, id timeuuid, \
             stream_type text, stream_id text, first_version bigint, last_version bigint, \
             PRIMARY KEY ((shard, bucket), id)) WITH CLUSTERING ORDER BY (id ASC) \
             AND default_time_to_live = {ttl} AND gc_grace_seconds = 3600 \
             AND compaction = {{'class': 'TimeWindowCompactionStrategy', \
             'compaction_window_unit': 'HOURS', 'compaction_window_size': 1}}"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.change_buckets (shard int, bucket bigint, \
             PRIMARY KEY ((shard), bucket)) WITH CLUSTERING ORDER BY (bucket ASC) \
             AND gc_grace_seconds = 3600"
        ),
        // Aggregate snapshots, one row per stream, overwritten in place (a cache of the
        // events, never written in an append's batch).
        super::snapshots::ddl(ks),
    ]
}

/// Creates the keyspace and tables if needed and adds columns an older schema lacks.
pub(crate) async fn ensure(
    session: &Session,
    config: &CqlConfig,
    engine: Engine,
) -> Result<(), StoreError> {
    for statement in ddl(config, engine) {
        run_ddl(session, &statement).await?;
    }
    let ks = &config.keyspace;
    let existing = existing_columns(session, ks, "events").await?;
    for (name, typ) in EVENT_COLUMNS {
        if !existing.iter().any(|c| c == name) {
            tracing::info!(keyspace = %ks, column = name, "adding a missing events column");
            run_ddl(
                session,
                &format!("ALTER TABLE {ks}.events ADD {name} {typ}"),
            )
            .await?;
        }
    }
    if engine == Engine::Scylla && config.feed == FeedKind::ScyllaCdc {
        // A table created before the CDC feed was chosen gets it now.
        let ttl = config.change_ttl.as_secs().max(1);
        run_ddl(
            session,
            &format!("ALTER TABLE {ks}.events WITH cdc = {{'enabled': true, 'ttl': {ttl}}}"),
        )
        .await?;
    }
    Ok(())
}

async fn existing_columns(
    session: &Session,
    keyspace: &str,
    table: &str,
) -> Result<Vec<String>, StoreError> {
    let result = session
        .query_unpaged(
            "SELECT column_name FROM system_schema.columns \
             WHERE keyspace_name = ? AND table_name = ?",
            (keyspace, table),
        )
        .await
        .map_err(error::execution)?
        .into_rows_result()
        .map_err(error::into_rows)?;
    let mut names = Vec::with_capacity(result.rows_num());
    for row in result.rows::<(String,)>().map_err(error::rows)? {
        names.push(row.map_err(error::deserialize)?.0);
    }
    Ok(names)
}

async fn run_ddl(session: &Session, statement: &str) -> Result<(), StoreError> {
    let mut attempt = 1;
    loop {
        // From an agreed schema only: a node that has not yet learnt of an earlier statement
        // (this process's or another's) must not be asked to create what it already should see.
        agree(session).await?;
        match session.query_unpaged(statement, ()).await {
            Ok(_) => return agree(session).await,
            // The statement was applied; only the driver's own wait for agreement ran out.
            // Wait on: sending it again could create a conflicting table (module docs).
            Err(ExecutionError::SchemaAgreementError(SchemaAgreementError::Timeout(_))) => {
                return agree(session).await
            }
            Err(e) => match error::execution(e) {
                StoreError::Unavailable(reason) if attempt < DDL_ATTEMPTS => {
                    tracing::warn!(attempt, %reason, statement, "DDL failed, retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                    attempt += 1;
                }
                e => return Err(e),
            },
        }
    }
}

/// Waits until every node reports the same schema version, for up to [`AGREEMENT_WAITS`] of the
/// session's agreement timeouts.
async fn agree(session: &Session) -> Result<(), StoreError> {
    let mut wait = 1;
    loop {
        match session.await_schema_agreement().await {
            Ok(_) => return Ok(()),
            Err(SchemaAgreementError::Timeout(d)) if wait < AGREEMENT_WAITS => {
                tracing::warn!(
                    wait,
                    waited_ms = d.as_millis() as u64,
                    "the nodes do not agree on the schema yet; waiting on"
                );
                wait += 1;
            }
            Err(e) => return Err(error::schema_agreement(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddl_is_dialect_aware() {
        let mut config = CqlConfig::new(vec!["127.0.0.1:9042".into()], "ks");
        let cassandra = ddl(&config, Engine::Cassandra).join("\n");
        assert!(!cassandra.contains("tablets"));
        assert!(!cassandra.contains("cdc"));
        let scylla = ddl(&config, Engine::Scylla).join("\n");
        assert!(scylla.contains("tablets = {'enabled': false}"));
        assert!(!scylla.contains("cdc ="));
        config.feed = FeedKind::ScyllaCdc;
        assert!(ddl(&config, Engine::Scylla)
            .join("\n")
            .contains("cdc = {'enabled': true"));
        assert!(!ddl(&config, Engine::Cassandra).join("\n").contains("cdc ="));
    }

    #[test]
    fn keyspace_names_are_plain_identifiers() {
        assert!(validate_keyspace("esq_test_1").is_ok());
        assert!(validate_keyspace("").is_err());
        assert!(validate_keyspace("1abc").is_err());
        assert!(validate_keyspace("a; DROP").is_err());
        assert!(validate_keyspace(&"a".repeat(49)).is_err());
    }
}
