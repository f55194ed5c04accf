//! What Cassandra itself did during a run: per-table operation counts from the node's metric
//! virtual tables (`system_views.local_read_latency`, `local_write_latency`,
//! `local_scan_latency`), read before and after and subtracted. Divided by the operations a
//! side completed, they say which storage work each esq request costs against its baseline —
//! including the Paxos state (`system.paxos`) an LWT reads and writes, and the reads of the
//! projector reacting to the appends. A single node counts every operation once; on a ring the
//! figures are the contacted node's only.

use crate::load::Run;
use scylla::client::session::Session;
use scylla::value::{CqlValue, Row};
use std::collections::BTreeMap;

/// The metric tables read, and the letter each is shown with.
const TABLES: [(&str, &str); 3] = [
    ("local_read_latency", "r"),
    ("local_write_latency", "w"),
    ("local_scan_latency", "scan"),
];

/// Operation counts of one moment: `(table, kind) -> count`, tables as `keyspace.table`
/// except that the stack's keyspace is left out of the name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CqlOps(BTreeMap<(String, &'static str), i64>);

impl CqlOps {
    /// The node's counters now, for the tables of `keyspace` and of the system keyspaces. A node
    /// without the virtual tables (older than 4.1) gives empty counts, not an error: the
    /// figures are for reading, never asserted.
    pub async fn snapshot(session: &Session, keyspace: &str) -> Self {
        let mut counts = BTreeMap::new();
        for (table, kind) in TABLES {
            let query =
                format!("SELECT keyspace_name, table_name, count FROM system_views.{table}");
            let Ok(result) = session.query_unpaged(query, ()).await else {
                continue;
            };
            let Ok(rows) = result.into_rows_result() else {
                continue;
            };
            let Ok(rows) = rows.rows::<Row>() else {
                continue;
            };
            for row in rows.flatten() {
                let text = |i: usize| match row.columns.get(i) {
                    Some(Some(CqlValue::Text(s))) => Some(s.clone()),
                    _ => None,
                };
                let count = match row.columns.get(2) {
                    Some(Some(CqlValue::BigInt(n))) => *n,
                    Some(Some(CqlValue::Int(n))) => i64::from(*n),
                    _ => continue,
                };
                let (Some(ks), Some(name)) = (text(0), text(1)) else {
                    continue;
                };
                // Other keyspaces' tables too (the Paxos state, the system tables a driver
                // reads for its metadata), named with their keyspace; other runs' keyspaces
                // of the harness are not this side's work.
                let name = if ks == keyspace {
                    name
                } else if ks.starts_with("system") {
                    format!("{ks}.{name}")
                } else {
                    continue;
                };
                counts.insert((name, kind), count);
            }
        }
        Self(counts)
    }

    /// The counts of `self` minus those of `before`.
    pub fn since(&self, before: &CqlOps) -> CqlOps {
        let mut d = BTreeMap::new();
        for (key, n) in &self.0 {
            let diff = n - before.0.get(key).copied().unwrap_or(0);
            if diff > 0 {
                d.insert(key.clone(), diff);
            }
        }
        CqlOps(d)
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &CqlOps) {
        for (key, n) in &other.0 {
            *self.0.entry(key.clone()).or_default() += n;
        }
    }

    /// `events r 0.02 w 2.00, changes w 1.00` — operations per one of `ops` requests, tables
    /// in name order, figures under 0.005 left out; empty when nothing was counted.
    pub fn per(&self, ops: u64) -> String {
        if ops == 0 {
            return String::new();
        }
        let mut by_table: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for ((table, kind), n) in &self.0 {
            let each = *n as f64 / ops as f64;
            if each >= 0.005 {
                by_table
                    .entry(table)
                    .or_default()
                    .push(format!("{kind} {each:.2}"));
            }
        }
        by_table
            .into_iter()
            .map(|(table, kinds)| format!("{table} {}", kinds.join(" ")))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What Cassandra did over the runs of one side, and the calls those runs made.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    ops: CqlOps,
    calls: u64,
}

impl Tally {
    /// Runs `side`, adding the node's operations meanwhile (and the run's calls) to the tally.
    pub async fn around(
        &mut self,
        session: &Session,
        keyspace: &str,
        side: impl std::future::Future<Output = anyhow::Result<Run>>,
    ) -> anyhow::Result<Run> {
        let before = CqlOps::snapshot(session, keyspace).await;
        let run = side.await?;
        let after = CqlOps::snapshot(session, keyspace).await;
        self.ops.add(&after.since(&before));
        self.calls += run.calls;
        Ok(run)
    }

    /// Operations per call, as [`CqlOps::per`] writes them.
    pub fn per_call(&self) -> String {
        self.ops.per(self.calls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(pairs: &[(&str, &'static str, i64)]) -> CqlOps {
        CqlOps(
            pairs
                .iter()
                .map(|(t, k, n)| (((*t).to_owned(), *k), *n))
                .collect(),
        )
    }

    #[test]
    fn deltas_are_per_request_and_drop_what_did_not_move() {
        let before = ops(&[("events", "w", 10), ("changes", "w", 5), ("heads", "r", 7)]);
        let after = ops(&[
            ("events", "w", 210),
            ("changes", "w", 105),
            ("heads", "r", 7),
        ]);
        let d = after.since(&before);
        assert_eq!(d.per(100), "changes w 1.00, events w 2.00");
        let mut sum = d.clone();
        sum.add(&d);
        assert_eq!(sum.per(100), "changes w 2.00, events w 4.00");
        assert_eq!(d.per(0), "");
    }
}
