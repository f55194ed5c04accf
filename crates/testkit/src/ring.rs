//! A multi-node Cassandra ring for system tests of node loss: the ring `scripts/cassandra.sh
//! ring-start` started (node i in `DIR/node<i>`, CQL on `127.0.0.<i>`), named by
//! `ESQ_TEST_CASSANDRA_RING` (the comma list for `--cql-nodes`) and `ESQ_TEST_CASSANDRA_RING_DIR`.
//!
//! [`Ring`] kills (SIGKILL), restarts and waits for single nodes through the same script, so a
//! test exercises exactly what an operator's node loss looks like to esq. Tests that kill nodes
//! hold [`Ring::lock`] (one fault scenario at a time per test binary) and a [`RingGuard`], which
//! brings every killed node back even when the test fails, so the next user finds all nodes up.

use crate::cluster::Backends;
use anyhow::Context as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The ring's script (`scripts/cassandra.sh` of this workspace).
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/cassandra.sh")
}

/// A running Cassandra ring started by `scripts/cassandra.sh ring-start`.
#[derive(Debug, Clone)]
pub struct Ring {
    nodes: String,
    dir: PathBuf,
    count: usize,
}

impl Ring {
    /// The ring named by the environment; `None` (with a note on stderr) only when the run opted
    /// out with `ESQ_SKIP_REAL_BACKENDS=1`. Panics naming `ESQ_TEST_CASSANDRA_RING` otherwise.
    pub fn from_env(test: &str) -> Option<Self> {
        if crate::real_backends_skipped(test) {
            return None;
        }
        let how = "run scripts/test, or `eval \"$(scripts/cassandra.sh ring-start DIR PORT)\"` \
                   and export ESQ_TEST_CASSANDRA_RING and ESQ_TEST_CASSANDRA_RING_DIR";
        let get = |name: &str| crate::required_env(test, name, how);
        let nodes = get("ESQ_TEST_CASSANDRA_RING");
        let dir = PathBuf::from(get("ESQ_TEST_CASSANDRA_RING_DIR"));
        let count = nodes.split(',').filter(|n| !n.trim().is_empty()).count();
        assert!(count >= 1, "{test}: ESQ_TEST_CASSANDRA_RING names no node");
        Some(Self { nodes, dir, count })
    }

    /// The comma list of CQL addresses, for `--cql-nodes` / `ESQ_CQL_NODES`.
    pub fn nodes(&self) -> &str {
        &self.nodes
    }

    /// How many nodes the ring has.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the ring has no node (never, for a ring from [`Ring::from_env`]).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The folder of node `i` (1-based, like `node<i>`).
    pub fn node_dir(&self, i: usize) -> PathBuf {
        assert!(
            (1..=self.count).contains(&i),
            "node {i} is not in a ring of {}",
            self.count
        );
        self.dir.join(format!("node{i}"))
    }

    /// The keyspace replication for this ring: NetworkTopologyStrategy with one replica per
    /// node in SimpleSnitch's `datacenter1` (RF = 3 on the 3-node ring), for
    /// `ESQ_CQL_REPLICATION`.
    pub fn replication(&self) -> String {
        format!(
            "{{'class': 'NetworkTopologyStrategy', 'datacenter1': {}}}",
            self.count
        )
    }

    /// Backends for [`crate::cluster::ClusterHarness`]: every node of the ring, and `redis`.
    pub fn backends(&self, redis: impl Into<String>) -> Backends {
        Backends {
            cassandra: self.nodes.clone(),
            redis: redis.into(),
        }
    }

    /// The per-process environment a harness on this ring needs (its keyspace replication).
    pub fn cluster_env(&self) -> Vec<(String, String)> {
        vec![("ESQ_CQL_REPLICATION".to_owned(), self.replication())]
    }

    /// Whether node `i`'s process runs (its pid file names a live, non-zombie process).
    pub fn is_running(&self, i: usize) -> bool {
        let Ok(pid) = std::fs::read_to_string(self.node_dir(i).join("pid")) else {
            return false;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())) else {
            return false;
        };
        // The state follows the parenthesised command name. A zombie main thread whose other
        // threads are still exiting (and hold the node's sockets) still counts as running.
        let zombie = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z");
        !zombie
            || std::fs::read_dir(format!("/proc/{}/task", pid.trim()))
                .is_ok_and(|tasks| tasks.count() > 1)
    }

    async fn run(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = tokio::process::Command::new(script())
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .with_context(|| format!("run scripts/cassandra.sh {}", args.join(" ")))?;
        anyhow::ensure!(
            out.status.success(),
            "scripts/cassandra.sh {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// SIGKILLs node `i` and returns once its process is gone.
    pub async fn kill(&self, i: usize) -> anyhow::Result<()> {
        let dir = self.node_dir(i);
        self.run(&["kill", &dir.to_string_lossy()]).await
    }

    /// Relaunches node `i` with its config and data (same address and ports); does not wait.
    pub async fn restart(&self, i: usize) -> anyhow::Result<()> {
        let dir = self.node_dir(i);
        self.run(&["restart", &dir.to_string_lossy()]).await
    }

    /// Waits until node `i` answers CQL and it and its running peers see each other up.
    pub async fn wait_up(&self, i: usize, within: Duration) -> anyhow::Result<()> {
        let dir = self.node_dir(i);
        let secs = within.as_secs().max(1).to_string();
        self.run(&["wait-node", &dir.to_string_lossy(), &secs])
            .await
    }

    /// Restarts every node that does not run, then waits until the whole ring is up.
    pub async fn ensure_all_up(&self, within: Duration) -> anyhow::Result<()> {
        for i in 1..=self.count {
            if !self.is_running(i) {
                self.restart(i).await?;
            }
        }
        let secs = within.as_secs().max(1).to_string();
        self.run(&["ring-wait", &self.dir.to_string_lossy(), &secs])
            .await
    }

    /// Serialises the fault scenarios of one test binary: hold the guard for the whole test.
    pub async fn lock() -> tokio::sync::MutexGuard<'static, ()> {
        static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        LOCK.lock().await
    }

    /// A guard that brings every node of the ring back when dropped (also on a failed test).
    pub fn guard(&self) -> RingGuard {
        RingGuard { ring: self.clone() }
    }
}

/// Restarts every stopped node of a [`Ring`] and waits (up to 10 minutes) for the ring when
/// dropped, so a failing test still leaves all nodes up. Dropping blocks the thread: it runs at
/// the end of a test, when nothing else of the test needs the thread.
pub struct RingGuard {
    ring: Ring,
}

impl Drop for RingGuard {
    fn drop(&mut self) {
        let ring = &self.ring;
        let mut restarted = false;
        for i in 1..=ring.count {
            if !ring.is_running(i) {
                restarted = true;
                let ok = std::process::Command::new(script())
                    .arg("restart")
                    .arg(ring.node_dir(i))
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
                    eprintln!("RingGuard: restarting node {i} of the ring failed");
                }
            }
        }
        if restarted {
            let ok = std::process::Command::new(script())
                .arg("ring-wait")
                .arg(&ring.dir)
                .arg("600")
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!("RingGuard: the ring did not come back up");
            }
        }
    }
}
