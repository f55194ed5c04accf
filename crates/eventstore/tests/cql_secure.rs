//! The CQL adapter against a Cassandra 5 node that requires a login and TLS
//! (`ESQ_TEST_CASSANDRA_AUTH`, `host:port`; started by `scripts/test` with
//! `ESQ_CASSANDRA_AUTH=1 ESQ_CASSANDRA_TLS_DIR=… scripts/cassandra.sh start`). The node's CA is
//! `$ESQ_TEST_CASSANDRA_TLS_DIR/ca.pem`; the login is `ESQ_TEST_CASSANDRA_USER` /
//! `ESQ_TEST_CASSANDRA_PASSWORD` (default `cassandra`/`cassandra`, the superuser Cassandra
//! makes). Without the variables every test panics, unless `ESQ_SKIP_REAL_BACKENDS=1`, which
//! skips them and says so.

use esq_domain::{ExpectedVersion, NewEvent, StreamId};
use esq_eventstore::cql::{CqlConfig, CqlCredentials, CqlStore, CqlTls};
use esq_eventstore::{now_us, EventStore, ReadRequest, StoreError};
use std::collections::BTreeMap;
use std::time::Duration;
use uuid::Uuid;

struct Node {
    addr: String,
    ca_pem: Vec<u8>,
    /// A PEM certificate that is not a CA of the node (the test client certificate).
    other_pem: Option<Vec<u8>>,
    username: String,
    password: String,
}

fn node(test: &str) -> Option<Node> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let Some(addr) = var("ESQ_TEST_CASSANDRA_AUTH") else {
        if std::env::var("ESQ_SKIP_REAL_BACKENDS").as_deref() == Ok("1") {
            eprintln!("{test}: SKIPPED by request (ESQ_SKIP_REAL_BACKENDS=1)");
            return None;
        }
        panic!(
            "{test} needs a Cassandra node with PasswordAuthenticator and client TLS: set \
             ESQ_TEST_CASSANDRA_AUTH=host:port and ESQ_TEST_CASSANDRA_TLS_DIR (scripts/test \
             starts one), or ESQ_SKIP_REAL_BACKENDS=1 to skip"
        );
    };
    let dir = std::path::PathBuf::from(
        var("ESQ_TEST_CASSANDRA_TLS_DIR")
            .unwrap_or_else(|| panic!("{test}: ESQ_TEST_CASSANDRA_TLS_DIR is not set")),
    );
    let ca_pem = std::fs::read(dir.join("ca.pem"))
        .unwrap_or_else(|e| panic!("{test}: cannot read {}/ca.pem: {e}", dir.display()));
    Some(Node {
        addr: addr.trim().to_owned(),
        ca_pem,
        other_pem: std::fs::read(dir.join("client.pem")).ok(),
        username: var("ESQ_TEST_CASSANDRA_USER").unwrap_or_else(|| "cassandra".into()),
        password: var("ESQ_TEST_CASSANDRA_PASSWORD").unwrap_or_else(|| "cassandra".into()),
    })
}

impl Node {
    fn config(&self, test: &str, password: Option<&str>) -> CqlConfig {
        let run = (now_us() as u64 / 1000) % 1_000_000_000;
        let mut config = CqlConfig::new(
            vec![self.addr.clone()],
            format!("esq_{test}_{run}_{}", std::process::id() % 100_000),
        );
        config.confidence_window = Duration::from_millis(1000);
        config.request_timeout = Duration::from_secs(10);
        config.append_deadline = Duration::from_secs(25);
        config.credentials = password.map(|password| CqlCredentials {
            username: self.username.clone(),
            password: password.to_owned(),
        });
        config.tls = Some(CqlTls {
            ca_pem: self.ca_pem.clone(),
            client: None,
        });
        config
    }
}

fn event(n: u32) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "ItemAdded".into(),
        schema_version: 1,
        content_type: "application/json".into(),
        data: format!("{{\"n\":{n}}}").into_bytes(),
        metadata: BTreeMap::new(),
    }
}

/// With the right login over TLS the store creates its schema, appends and reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_and_tls_append_and_read() {
    let test = "secure_round_trip";
    let Some(node) = node(test) else {
        return;
    };
    let shown = format!("{:?}", node.config(test, Some("pw-that-must-not-show")));
    assert!(
        !shown.contains("pw-that-must-not-show") && shown.contains("<redacted>"),
        "the password is not in the configuration's Debug output: {shown}"
    );
    let config = node.config(test, Some(&node.password));
    let store = CqlStore::connect(config)
        .await
        .unwrap_or_else(|e| panic!("{test}: connect: {e}"));
    let stream = StreamId::new("cart", "secure-1").expect("valid");
    let result = store
        .append(&stream, ExpectedVersion::NoStream, &[event(1), event(2)])
        .await
        .expect("append");
    assert_eq!(result.last_version, 2);
    let read = store
        .read(&stream, ReadRequest::forwards(1, 10))
        .await
        .expect("read");
    assert_eq!(read.len(), 2);
    assert_eq!(read[1].data, br#"{"n":2}"#);
}

/// A wrong password, or none, is a configuration error (`Internal`, so the services stop
/// with it) naming the refusal, not `Unavailable` (which they would retry forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_login_is_refused_not_retried() {
    let test = "secure_wrong_login";
    let Some(node) = node(test) else {
        return;
    };
    match CqlStore::connect(node.config(test, Some("not-the-password"))).await {
        Err(StoreError::Internal(message)) => {
            assert!(message.contains("refused the credentials"), "{message}");
            assert!(!message.contains("not-the-password"), "{message}");
        }
        Err(other) => panic!("{test}: a wrong password must not look transient: {other}"),
        Ok(_) => panic!("{test}: connected with a wrong password"),
    }
    match CqlStore::connect(node.config(test, None)).await {
        Err(StoreError::Internal(message)) => {
            assert!(message.contains("requires authentication"), "{message}")
        }
        Err(other) => panic!("{test}: a missing login must not look transient: {other}"),
        Ok(_) => panic!("{test}: connected without a login"),
    }
}

/// Trusting a CA that did not sign the node's certificate fails the handshake, as a
/// configuration error naming TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_node_certificate_is_refused() {
    let test = "secure_untrusted";
    let Some(node) = node(test) else {
        return;
    };
    let other = node
        .other_pem
        .clone()
        .unwrap_or_else(|| panic!("{test}: needs client.pem next to ca.pem"));
    let mut config = node.config(test, Some(&node.password));
    config.tls = Some(CqlTls {
        ca_pem: other,
        client: None,
    });
    match CqlStore::connect(config).await {
        Err(StoreError::Internal(message)) => {
            assert!(message.contains("TLS handshake"), "{message}")
        }
        Err(other) => panic!("{test}: an untrusted certificate must not look transient: {other}"),
        Ok(_) => panic!("{test}: connected to a node signed by an untrusted CA"),
    }
}
