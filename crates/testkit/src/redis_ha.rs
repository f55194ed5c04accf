//! A Redis Cluster of three masters and three replicas for failover tests: started by
//! `scripts/redis.sh start-cluster-ha` (which `scripts/test` runs), named by
//! `ESQ_TEST_REDIS_CLUSTER_HA` (the six `redis://` URLs) and `ESQ_TEST_REDIS_CLUSTER_HA_DIR`
//! (its folder, for `kill` and `restart`). [`RedisHa`] kills a node with SIGKILL, restarts
//! it, and waits on the cluster's own view of itself (CLUSTER NODES, CLUSTER INFO) for a
//! failover or for full health — conditions, never fixed sleeps.

use anyhow::Context as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One line of CLUSTER NODES.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node id.
    pub id: String,
    /// Its client port.
    pub port: u16,
    /// Whether it is a master (flag `master`).
    pub master: bool,
    /// Whether the cluster considers it failed (`fail`, or `fail?` as seen by this node).
    pub failed: bool,
    /// The id of its master, for a replica.
    pub master_id: Option<String>,
    /// Whether its link is `connected`.
    pub connected: bool,
    /// How many hash slots it serves.
    pub slots: u32,
}

/// Parses the text of CLUSTER NODES.
pub fn parse_cluster_nodes(text: &str) -> anyhow::Result<Vec<NodeInfo>> {
    let mut nodes = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        anyhow::ensure!(f.len() >= 8, "short CLUSTER NODES line: {line}");
        let hostport = f[1].split('@').next().unwrap_or_default();
        let port = hostport
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("no port in CLUSTER NODES line: {line}"))?;
        let flags: Vec<&str> = f[2].split(',').collect();
        let mut slots = 0;
        for range in &f[8..] {
            if range.starts_with('[') {
                continue; // a slot being migrated or imported
            }
            let (a, b) = match range.split_once('-') {
                Some((a, b)) => (a.parse::<u32>()?, b.parse::<u32>()?),
                None => (range.parse::<u32>()?, range.parse::<u32>()?),
            };
            slots += b - a + 1;
        }
        nodes.push(NodeInfo {
            id: f[0].to_owned(),
            port,
            master: flags.contains(&"master"),
            failed: flags.iter().any(|x| *x == "fail" || *x == "fail?"),
            master_id: (f[3] != "-").then(|| f[3].to_owned()),
            connected: f[7] == "connected",
            slots,
        });
    }
    Ok(nodes)
}

/// The HA cluster of the environment.
#[derive(Debug, Clone)]
pub struct RedisHa {
    urls: String,
    dir: PathBuf,
    ports: Vec<u16>,
}

impl RedisHa {
    /// The cluster named by the environment; `None` (with a note on stderr) only when the run
    /// opted out with `ESQ_SKIP_REAL_BACKENDS=1`. Panics with instructions otherwise.
    pub fn from_env(test: &str) -> Option<Self> {
        if crate::real_backends_skipped(test) {
            return None;
        }
        let how = "run scripts/test (which starts the HA Redis Cluster: \
                   scripts/redis.sh start-cluster-ha)";
        let get = |name: &str| crate::required_env(test, name, how);
        let urls = get("ESQ_TEST_REDIS_CLUSTER_HA");
        let dir = PathBuf::from(get("ESQ_TEST_REDIS_CLUSTER_HA_DIR"));
        let ports = urls
            .split(',')
            .map(|u| {
                u.rsplit(':')
                    .next()
                    .and_then(|p| p.trim_end_matches('/').parse().ok())
                    .unwrap_or_else(|| panic!("{test}: no port in Redis URL {u}"))
            })
            .collect();
        Some(Self { urls, dir, ports })
    }

    /// All six URLs, comma-separated (what `--redis-url` takes for a Cluster).
    pub fn urls(&self) -> &str {
        &self.urls
    }

    /// The ports of all six nodes.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// The cluster's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// CLUSTER NODES as seen by the first node that answers (never one in `except`).
    pub async fn nodes_except(&self, except: &[u16]) -> anyhow::Result<Vec<NodeInfo>> {
        let mut last = None;
        for port in self.ports.iter().filter(|p| !except.contains(p)) {
            match node_query(*port, &["CLUSTER", "NODES"]).await {
                Ok(text) => return parse_cluster_nodes(&text),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no node to ask")))
    }

    /// CLUSTER NODES as seen by the first node that answers.
    pub async fn nodes(&self) -> anyhow::Result<Vec<NodeInfo>> {
        self.nodes_except(&[]).await
    }

    /// The ports of the current masters serving slots (not failed), sorted.
    pub async fn masters(&self) -> anyhow::Result<Vec<u16>> {
        let mut ports: Vec<u16> = self
            .nodes()
            .await?
            .into_iter()
            .filter(|n| n.master && !n.failed && n.slots > 0)
            .map(|n| n.port)
            .collect();
        ports.sort_unstable();
        Ok(ports)
    }

    /// Kills the node on `port` with SIGKILL (`scripts/redis.sh kill`).
    pub async fn kill(&self, port: u16) -> anyhow::Result<()> {
        self.script("kill", port).await
    }

    /// Relaunches the node on `port` with its nodes.conf and data (`scripts/redis.sh
    /// restart`); it rejoins, as a replica if another node took over its slots.
    pub async fn restart(&self, port: u16) -> anyhow::Result<()> {
        self.script("restart", port).await
    }

    async fn script(&self, command: &str, port: u16) -> anyhow::Result<()> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/redis.sh");
        let out = tokio::process::Command::new("bash")
            .arg(&script)
            .arg(command)
            .arg(&self.dir)
            .arg(port.to_string())
            .output()
            .await
            .with_context(|| format!("cannot run {}", script.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "redis.sh {command} {port} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Waits until a replica took over every slot of the killed master on `killed_port` and
    /// every live node reports `cluster_state:ok`.
    pub async fn wait_failover(&self, killed_port: u16, within: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let last = match self.failover_done(killed_port).await {
                Ok(None) => return Ok(()),
                Ok(Some(why)) => why,
                Err(e) => format!("{e:#}"),
            };
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("no failover of {killed_port} within {within:?}: {last}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `None` when the failover is complete, or what is still missing.
    async fn failover_done(&self, killed: u16) -> anyhow::Result<Option<String>> {
        let live: Vec<u16> = self
            .ports
            .iter()
            .copied()
            .filter(|p| *p != killed)
            .collect();
        for port in &live {
            let nodes = parse_cluster_nodes(&node_query(*port, &["CLUSTER", "NODES"]).await?)?;
            let served: u32 = nodes
                .iter()
                .filter(|n| n.master && !n.failed && n.port != killed)
                .map(|n| n.slots)
                .sum();
            if served != 16384 {
                return Ok(Some(format!(
                    "node {port} sees {served} of 16384 slots on live masters"
                )));
            }
            if !self.state_ok(*port).await? {
                return Ok(Some(format!("node {port} is not cluster_state:ok")));
            }
        }
        Ok(None)
    }

    async fn state_ok(&self, port: u16) -> anyhow::Result<bool> {
        let info = node_query(port, &["CLUSTER", "INFO"]).await?;
        Ok(info.lines().any(|l| l.trim() == "cluster_state:ok"))
    }

    /// Waits until all six nodes answer, every one reports `cluster_state:ok`, and there are
    /// three masters serving all slots, each with a connected replica whose replication link
    /// is up (what the cluster looked like when it was started; the soak runs on it after the
    /// failover tests).
    pub async fn wait_healthy(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let last = match self.healthy().await {
                Ok(None) => return Ok(()),
                Ok(Some(why)) => why,
                Err(e) => format!("{e:#}"),
            };
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("the HA cluster is not healthy within {within:?}: {last}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn healthy(&self) -> anyhow::Result<Option<String>> {
        for port in &self.ports {
            if !self.state_ok(*port).await? {
                return Ok(Some(format!("node {port} is not cluster_state:ok")));
            }
            let nodes = parse_cluster_nodes(&node_query(*port, &["CLUSTER", "NODES"]).await?)?;
            let masters: Vec<&NodeInfo> = nodes
                .iter()
                .filter(|n| n.master && !n.failed && n.slots > 0)
                .collect();
            if masters.len() != 3 || masters.iter().map(|m| m.slots).sum::<u32>() != 16384 {
                return Ok(Some(format!("node {port} sees masters {masters:?}")));
            }
            for m in &masters {
                let replicas = nodes
                    .iter()
                    .filter(|n| {
                        !n.master
                            && !n.failed
                            && n.connected
                            && n.master_id.as_deref() == Some(&m.id)
                    })
                    .count();
                if replicas == 0 {
                    return Ok(Some(format!(
                        "node {port} sees no replica of master {}",
                        m.port
                    )));
                }
            }
            let repl = node_query(*port, &["INFO", "replication"]).await?;
            if repl.contains("role:slave") && !repl.contains("master_link_status:up") {
                return Ok(Some(format!(
                    "replica {port} is not synced with its master"
                )));
            }
        }
        Ok(None)
    }
}

/// One command to one node (a plain connection, no cluster redirection), as text.
async fn node_query(port: u16, args: &[&str]) -> anyhow::Result<String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let io = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        let text: String = cmd.query_async(&mut conn).await?;
        anyhow::Ok(text)
    };
    tokio::time::timeout(Duration::from_secs(3), io)
        .await
        .with_context(|| format!("redis {port}: no answer to {args:?} within 3s"))?
        .with_context(|| format!("redis {port}: {args:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cluster_nodes() {
        let text = "\
978f 127.0.0.1:11206@21206 master - 0 1 7 connected 0-5460
a999 127.0.0.1:11201@21201 slave 978f 0 1 7 connected
d9eb 127.0.0.1:11202@21202 myself,master - 0 1 2 connected 5461-10922 [5461->-abc]
f42e 127.0.0.1:11203@21203 master,fail - 0 1 3 disconnected 10923-16383 77
";
        let n = parse_cluster_nodes(text).unwrap();
        assert_eq!(n.len(), 4);
        assert_eq!((n[0].port, n[0].master, n[0].slots), (11206, true, 5461));
        assert_eq!(n[1].master_id.as_deref(), Some("978f"));
        assert!(!n[1].master && n[1].connected);
        assert_eq!(n[2].slots, 5462);
        assert!(n[3].failed && !n[3].connected);
        assert_eq!(n[3].slots, 5461 + 1);
    }
}
