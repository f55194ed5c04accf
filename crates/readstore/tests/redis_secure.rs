//! The Redis adapter against servers that require credentials and TLS: standalone
//! (`ESQ_TEST_REDIS_SECURE`, a `rediss://esq:<password>@127.0.0.1:<port>` URL) and a Cluster
//! (`ESQ_TEST_REDIS_CLUSTER_SECURE`, comma-separated seed URLs of the same form), both with
//! client certificates required, and `ESQ_TEST_REDIS_TLS_DIR` holding `ca.pem`, `client.pem`
//! and `client-key.pem`. `scripts/redis.sh start-secure` / `start-cluster-secure` start them
//! and print the variables. A missing variable fails the test unless
//! `ESQ_SKIP_REAL_BACKENDS=1`, which skips it and says so.
//!
//! What is shown, for both: the store's commands, its applied-feed subscription and the
//! nudge publisher/subscriber all log in and speak TLS; credentials from the URL or from
//! [`RedisAccess`] both work; a wrong password, a missing client certificate and an untrusted
//! server are refused — a wrong password as a configuration error (not retried), never as
//! "unavailable".

#![allow(clippy::unwrap_used)]

use esq_domain::projection::{ApplyOutcome, Batch, Changes, FieldOp};
use esq_readstore::redis::{subscribe_nudges, RedisAccess, RedisConfig, RedisStore, RedisTls};
use esq_readstore::{ReadError, ReadStore};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Generous bound on every wait (a busy 2-core machine).
const WAIT: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Standalone,
    Cluster,
}

/// What a test needs to reach one secure deployment.
struct Secure {
    urls: Vec<String>,
    cluster: bool,
    /// The certificates and key the servers expect, PEM.
    tls: RedisTls,
}

fn var(name: &str, test: &str, script: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => Some(v.trim().to_owned()),
        _ if std::env::var("ESQ_SKIP_REAL_BACKENDS").as_deref() == Ok("1") => {
            eprintln!("{test}: SKIPPED by request (ESQ_SKIP_REAL_BACKENDS=1)");
            None
        }
        _ => panic!(
            "{test} needs a Redis with ACL and TLS: set {name} (scripts/redis.sh {script} prints \
             it), or ESQ_SKIP_REAL_BACKENDS=1 to skip"
        ),
    }
}

impl Backend {
    fn secure(self, test: &str) -> Option<Secure> {
        let (name, script) = match self {
            Backend::Standalone => ("ESQ_TEST_REDIS_SECURE", "start-secure"),
            Backend::Cluster => ("ESQ_TEST_REDIS_CLUSTER_SECURE", "start-cluster-secure"),
        };
        let urls = var(name, test, script)?;
        let dir = std::path::PathBuf::from(var("ESQ_TEST_REDIS_TLS_DIR", test, script)?);
        let read = |file: &str| {
            std::fs::read(dir.join(file))
                .unwrap_or_else(|e| panic!("{test}: cannot read {}: {e}", dir.join(file).display()))
        };
        Some(Secure {
            urls: urls.split(',').map(|u| u.trim().to_owned()).collect(),
            cluster: self == Backend::Cluster,
            tls: RedisTls {
                ca_pem: Some(read("ca.pem")),
                client: Some((read("client.pem"), read("client-key.pem"))),
            },
        })
    }
}

impl Secure {
    fn config(&self, test: &str, access: RedisAccess, urls: Vec<String>) -> RedisConfig {
        RedisConfig {
            urls,
            cluster: self.cluster,
            prefix: unique(test),
            timeout: Duration::from_secs(5),
            access,
        }
    }

    /// The URLs' credentials, with the CA and client certificate.
    fn access(&self) -> RedisAccess {
        RedisAccess {
            tls: Some(self.tls.clone()),
            ..RedisAccess::default()
        }
    }
}

fn unique(test: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("esqtest-{test}-{nanos}")
}

/// `rediss://user:password@host:port` split into the URL without userinfo, the user and the
/// password.
fn split_credentials(url: &str) -> (String, String, String) {
    let rest = url.strip_prefix("rediss://").expect("a rediss:// URL");
    let (userinfo, host) = rest.split_once('@').expect("credentials in the URL");
    let (user, password) = userinfo.split_once(':').expect("user:password");
    (
        format!("rediss://{host}"),
        user.to_owned(),
        password.to_owned(),
    )
}

fn one_set(first_version: u64, last_version: u64) -> Batch {
    Batch {
        first_version,
        last_version,
        changes: Changes {
            fields: vec![FieldOp::Set("n".into(), last_version.to_string())],
        },
    }
}

/// Commands, the applied feed and nudges, all over TLS with the ACL user.
async fn round_trip(backend: Backend, test: &str) {
    let Some(secure) = backend.secure(test) else {
        return;
    };
    let store = RedisStore::connect(secure.config(test, secure.access(), secure.urls.clone()))
        .await
        .unwrap_or_else(|e| panic!("{test}: cannot connect: {e}"));

    // The applied feed: its own pub/sub connection, logged in and over TLS.
    let shutdown = CancellationToken::new();
    let follower = tokio::spawn(store.clone().follow_applies(shutdown.clone()));
    let deadline = Instant::now() + WAIT;
    while !store.applied_feed().is_live() {
        assert!(Instant::now() < deadline, "{test}: apply feed not live");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let waiter = store.watch("cart", "a", 1).expect("live feed");
    assert_eq!(
        store.apply("cart", "a", &one_set(1, 1)).await.unwrap(),
        ApplyOutcome::Applied
    );
    tokio::time::timeout(WAIT, waiter.woken())
        .await
        .expect("the apply wakes its waiter through the secure subscription");
    let doc = store.get("cart", "a").await.unwrap().expect("applied");
    assert_eq!(doc.get("n").map(String::as_str), Some("1"), "{doc:?}");
    assert_eq!(store.version("cart", "a").await.unwrap(), 1);

    // Nudges: a subscriber on the last seed node, credentials given separately this time.
    let (url, username, password) = split_credentials(secure.urls.last().unwrap());
    let access = RedisAccess {
        username: Some(username),
        password: Some(password),
        tls: Some(secure.tls.clone()),
    };
    let channel = format!("{}:nudge", unique(test));
    let notify = Arc::new(Notify::new());
    let task = tokio::spawn({
        let (channel, notify, shutdown) = (channel.clone(), notify.clone(), shutdown.clone());
        async move {
            let got = move |m: Option<&str>| {
                if m.is_none() || m == Some("cart/1@7") {
                    notify.notify_one();
                }
            };
            subscribe_nudges(&[url], &access, &channel, got, shutdown).await
        }
    });
    tokio::time::timeout(WAIT, notify.notified())
        .await
        .expect("subscribed");
    store.publish_nudge(&channel, "cart/1@7").await;
    tokio::time::timeout(WAIT, notify.notified())
        .await
        .expect("nudge received over TLS");
    shutdown.cancel();
    for handle in [follower, task] {
        tokio::time::timeout(WAIT, handle)
            .await
            .expect("stops on shutdown")
            .expect("no panic");
    }
}

#[tokio::test]
async fn secure_standalone_round_trip() {
    round_trip(Backend::Standalone, "secure_standalone_round_trip").await;
}

#[tokio::test]
async fn secure_cluster_round_trip() {
    round_trip(Backend::Cluster, "secure_cluster_round_trip").await;
}

/// The credentials given apart from the URL log in as well.
async fn credentials_apart_from_the_url(backend: Backend, test: &str) {
    let Some(secure) = backend.secure(test) else {
        return;
    };
    let mut urls = Vec::new();
    let mut access = secure.access();
    for url in &secure.urls {
        let (bare, user, password) = split_credentials(url);
        urls.push(bare);
        access.username = Some(user);
        access.password = Some(password);
    }
    let store = RedisStore::connect(secure.config(test, access, urls))
        .await
        .unwrap_or_else(|e| panic!("{test}: cannot connect: {e}"));
    store.apply("cart", "b", &one_set(1, 1)).await.unwrap();
    assert_eq!(store.version("cart", "b").await.unwrap(), 1);
}

#[tokio::test]
async fn secure_standalone_credentials_apart_from_the_url() {
    credentials_apart_from_the_url(
        Backend::Standalone,
        "secure_standalone_credentials_apart_from_the_url",
    )
    .await;
}

#[tokio::test]
async fn secure_cluster_credentials_apart_from_the_url() {
    credentials_apart_from_the_url(
        Backend::Cluster,
        "secure_cluster_credentials_apart_from_the_url",
    )
    .await;
}

/// A wrong password is a configuration error (`Internal`: the services stop with it rather
/// than retry), and names the refusal.
async fn wrong_password_is_refused(backend: Backend, test: &str) {
    let Some(secure) = backend.secure(test) else {
        return;
    };
    let mut access = secure.access();
    access.password = Some("not-the-password".into());
    let result = RedisStore::connect(secure.config(test, access, secure.urls.clone())).await;
    match result {
        Err(ReadError::Internal(message)) => assert!(
            message.to_ascii_lowercase().contains("auth")
                || message.contains("WRONGPASS")
                || message.contains("invalid username-password"),
            "{test}: the error names the refusal: {message}"
        ),
        Err(other) => panic!("{test}: a wrong password must not look transient: {other}"),
        Ok(_) => panic!("{test}: connected with a wrong password"),
    }
}

#[tokio::test]
async fn secure_standalone_wrong_password_is_refused() {
    wrong_password_is_refused(
        Backend::Standalone,
        "secure_standalone_wrong_password_is_refused",
    )
    .await;
}

#[tokio::test]
async fn secure_cluster_wrong_password_is_refused() {
    wrong_password_is_refused(Backend::Cluster, "secure_cluster_wrong_password_is_refused").await;
}

/// Without the client certificate, or trusting another CA, no connection is made.
#[tokio::test]
async fn secure_standalone_tls_is_enforced() {
    let test = "secure_standalone_tls_is_enforced";
    let Some(secure) = Backend::Standalone.secure(test) else {
        return;
    };
    let mut no_client_cert = secure.access();
    if let Some(tls) = no_client_cert.tls.as_mut() {
        tls.client = None;
    }
    let result =
        RedisStore::connect(secure.config(test, no_client_cert, secure.urls.clone())).await;
    assert!(
        result.is_err(),
        "{test}: the server requires a client certificate"
    );

    // Trusting only a CA that did not sign the server's certificate (the client
    // certificate stands in for one).
    let mut other_ca = secure.access();
    if let Some(tls) = other_ca.tls.as_mut() {
        tls.ca_pem = tls.client.as_ref().map(|(cert, _)| cert.clone());
    }
    let result = RedisStore::connect(secure.config(test, other_ca, secure.urls.clone())).await;
    assert!(
        result.is_err(),
        "{test}: an untrusted server certificate is refused"
    );

    // Certificates with a plain redis:// URL are a configuration error, named.
    let plain = secure.urls[0].replacen("rediss://", "redis://", 1);
    let result = RedisStore::connect(secure.config(test, secure.access(), vec![plain])).await;
    match result {
        Err(ReadError::Internal(message)) => {
            assert!(message.contains("rediss://"), "{test}: {message}");
            assert!(
                !message.contains(&split_credentials(&secure.urls[0]).2),
                "{test}: the password is not in the error: {message}"
            );
        }
        Err(other) => panic!("{test}: expected a configuration error, got {other}"),
        Ok(_) => panic!("{test}: connected in plaintext to a TLS-only server"),
    }
}
