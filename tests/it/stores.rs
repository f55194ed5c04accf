//! The service processes on stores that require credentials and TLS: a Cassandra node with
//! `PasswordAuthenticator` and client TLS (`ESQ_TEST_CASSANDRA_AUTH`, its CA in
//! `ESQ_TEST_CASSANDRA_TLS_DIR`, login `cassandra`/`cassandra` unless
//! `ESQ_TEST_CASSANDRA_USER`/`_PASSWORD`), and a Redis that accepts only TLS with a client
//! certificate and the ACL user of the URL (`ESQ_TEST_REDIS_SECURE`, certificates in
//! `ESQ_TEST_REDIS_TLS_DIR`). `scripts/test` starts both. Without them the tests fail, unless
//! `ESQ_SKIP_REAL_BACKENDS=1`, which skips them and says so.

use crate::suite;
use esq_testkit::cluster::{bin_dir, Backends, ClusterHarness, ClusterOptions};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// Where the secured stores are and what opens them.
struct SecureStores {
    cassandra: String,
    cql_ca: PathBuf,
    cql_user: String,
    cql_password: String,
    /// `rediss://esq:<password>@host:port`.
    redis: String,
    redis_tls: PathBuf,
    /// Seeds of a Redis Cluster secured the same way (`ESQ_TEST_REDIS_CLUSTER_SECURE`).
    redis_cluster: String,
}

impl SecureStores {
    fn from_env(test: &str) -> Option<Self> {
        if esq_testkit::real_backends_skipped(test) {
            return None;
        }
        let how = "run scripts/test (which starts a Cassandra node with a login and TLS and a \
                   Redis with ACL and TLS)";
        let get = |name: &str| esq_testkit::required_env(test, name, how);
        let or = |name: &str, default: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default.to_owned())
        };
        Some(Self {
            cassandra: get("ESQ_TEST_CASSANDRA_AUTH"),
            cql_ca: PathBuf::from(get("ESQ_TEST_CASSANDRA_TLS_DIR")).join("ca.pem"),
            cql_user: or("ESQ_TEST_CASSANDRA_USER", "cassandra"),
            cql_password: or("ESQ_TEST_CASSANDRA_PASSWORD", "cassandra"),
            redis: get("ESQ_TEST_REDIS_SECURE"),
            redis_tls: PathBuf::from(get("ESQ_TEST_REDIS_TLS_DIR")),
            redis_cluster: get("ESQ_TEST_REDIS_CLUSTER_SECURE"),
        })
    }

    /// The environment that opens both stores, the CQL password in a file under `dir`.
    fn env(&self, dir: &std::path::Path, cql_password: &str) -> Vec<(String, String)> {
        let password_file = dir.join("cql-password");
        std::fs::write(&password_file, format!("{cql_password}\n")).expect("password file");
        let path = |p: PathBuf| p.display().to_string();
        [
            ("ESQ_CQL_USERNAME", self.cql_user.clone()),
            ("ESQ_CQL_PASSWORD_FILE", path(password_file)),
            ("ESQ_CQL_TLS_CA", path(self.cql_ca.clone())),
            ("ESQ_REDIS_TLS_CA", path(self.redis_tls.join("ca.pem"))),
            (
                "ESQ_REDIS_TLS_CERT",
                path(self.redis_tls.join("client.pem")),
            ),
            (
                "ESQ_REDIS_TLS_KEY",
                path(self.redis_tls.join("client-key.pem")),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

/// write-svc, projector (nudged through Redis) and read-svc as processes, every store
/// connection logged in and over TLS: a command's effect is visible to a query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_on_stores_with_credentials_and_tls() {
    let test = "cluster_on_stores_with_credentials_and_tls";
    let Some(stores) = SecureStores::from_env(test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let backends = Backends {
        cassandra: stores.cassandra.clone(),
        redis: stores.redis.clone(),
    };
    let options = ClusterOptions {
        env: stores.env(dir.path(), &stores.cql_password),
        ..ClusterOptions::default()
    };
    let h = ClusterHarness::start(backends, options)
        .await
        .unwrap_or_else(|e| panic!("{test}: cannot start the deployment: {e:#}"));
    eprintln!("logs in {}", h.logs().display());
    suite::append_then_query_with_min_version(&h.clients).await;
    suite::cart_rules_and_conflicts(&h.clients).await;
}

/// The same on a Redis Cluster: the read model, leases, the applied feed and the nudges go
/// to Cluster nodes over TLS with the ACL user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_on_stores_with_credentials_and_tls_redis_cluster() {
    let test = "cluster_on_stores_with_credentials_and_tls_redis_cluster";
    let Some(stores) = SecureStores::from_env(test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let first = stores
        .redis_cluster
        .split(',')
        .next()
        .expect("a seed")
        .to_owned();
    let backends = Backends {
        cassandra: stores.cassandra.clone(),
        redis: first.clone(),
    };
    let mut env = stores.env(dir.path(), &stores.cql_password);
    // Over the harness's standalone settings: every seed, in Cluster mode. Nudges are
    // published on one node (pub/sub is broadcast over the Cluster).
    env.push(("ESQ_REDIS_URL".into(), stores.redis_cluster.clone()));
    env.push(("ESQ_REDIS_CLUSTER".into(), "true".into()));
    env.push(("ESQ_NUDGE_URL".into(), first));
    let options = ClusterOptions {
        env,
        ..ClusterOptions::default()
    };
    let h = ClusterHarness::start(backends, options)
        .await
        .unwrap_or_else(|e| panic!("{test}: cannot start the deployment: {e:#}"));
    eprintln!("logs in {}", h.logs().display());
    suite::append_then_query_with_min_version(&h.clients).await;
    suite::cart_rules_and_conflicts(&h.clients).await;
}

/// Runs service `name` with `env` until it exits (within a generous bound); its status and
/// stderr.
async fn run_until_exit(
    name: &str,
    env: &[(String, String)],
) -> (std::process::ExitStatus, String) {
    let mut cmd = tokio::process::Command::new(bin_dir().expect("bin dir").join(name));
    cmd.env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("ESQ_LISTEN", "127.0.0.1:0")
        .env("ESQ_INSECURE", "true")
        .env("ESQ_CQL_TIMEOUT_MS", "5000")
        .env("ESQ_CONFIDENCE_WINDOW_MS", "1000")
        .env("ESQ_APPEND_DEADLINE_MS", "15000")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("start the binary");
    let mut stderr = child.stderr.take().expect("stderr");
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .unwrap_or_else(|_| panic!("{name} with refused credentials is still running"))
        .expect("wait");
    let mut text = String::new();
    stderr.read_to_string(&mut text).await.expect("read stderr");
    (status, text)
}

/// A wrong CQL password stops write-svc at once with the reason, instead of retrying as if
/// the cluster were down; the password itself is never printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_cql_password_stops_write_svc_with_the_reason() {
    let test = "a_wrong_cql_password_stops_write_svc_with_the_reason";
    let Some(stores) = SecureStores::from_env(test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut env = stores.env(dir.path(), "wrong-password-7f3a");
    env.push(("ESQ_CQL_NODES".into(), stores.cassandra.clone()));
    env.push(("ESQ_CQL_KEYSPACE".into(), "esq_wrong_password".into()));
    let (status, text) = run_until_exit("write-svc", &env).await;
    assert!(!status.success(), "write-svc exited with {status}: {text}");
    assert!(
        text.contains("refused the credentials"),
        "the reason is on stderr: {text}"
    );
    assert!(
        !text.contains("cannot connect to"),
        "a refused login is not retried: {text}"
    );
    assert!(!text.contains("wrong-password-7f3a"), "{text}");
}

/// A wrong Redis password stops read-svc at once with the reason; the password itself is
/// never printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_redis_password_stops_read_svc_with_the_reason() {
    let test = "a_wrong_redis_password_stops_read_svc_with_the_reason";
    let Some(stores) = SecureStores::from_env(test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut env = stores.env(dir.path(), &stores.cql_password);
    env.push(("ESQ_REDIS_URL".into(), stores.redis.clone()));
    env.push(("ESQ_REDIS_PASSWORD".into(), "wrong-password-9c1e".into()));
    let (status, text) = run_until_exit("read-svc", &env).await;
    assert!(!status.success(), "read-svc exited with {status}: {text}");
    assert!(
        text.contains("Redis refused"),
        "the reason is on stderr: {text}"
    );
    assert!(
        !text.contains("cannot connect to"),
        "a refused login is not retried: {text}"
    );
    assert!(!text.contains("wrong-password-9c1e"), "{text}");
}
