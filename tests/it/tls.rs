//! Transport security and call limits over real gRPC: the dev stack and the distributed
//! deployment over TLS (mutual TLS), `esq dev` and `esq tls generate` as binaries, load
//! shedding and the default deadline. Certificates are made at run time.

use crate::suite;
use esq::pb::cart::v1 as cart;
use esq::pb::cart::v1::cart_queries_client::CartQueriesClient;
use esq_testkit::cluster::{bin_dir, Backends, ClusterHarness, ClusterOptions};
use esq_testkit::pki::TestPki;
use esq_testkit::DevHarness;
use std::net::SocketAddr;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

/// Bound of every wait here: generous, for a busy machine.
const WAIT: Duration = Duration::from_secs(60);

/// A health check over a fresh connection with `endpoint`.
async fn health_over(endpoint: Endpoint) -> Result<(), String> {
    let call = async {
        let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
        HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .map(|_| ())
            .map_err(|e| format!("{e:?}"))
    };
    tokio::time::timeout(WAIT, call)
        .await
        .unwrap_or_else(|_| Err("no answer".into()))
}

/// The dev stack with mutual TLS: commands and queries work end to end for a client with the
/// right certificate; one without a certificate, or speaking plaintext, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_stack_over_mutual_tls() {
    let pki = TestPki::generate().expect("pki");
    let tls = pki.server(true).await.expect("server tls");
    let h = DevHarness::start_tls(tls, &pki.client(), |_| {})
        .await
        .expect("start dev stack over TLS");
    suite::health_is_serving(&h.clients).await;
    suite::append_then_query_with_min_version(&h.clients).await;
    let addr = h.write_addr().expect("running");
    let anonymous = esq_testkit::endpoint(addr, Some(&pki.client().anonymous())).expect("ep");
    assert!(
        health_over(anonymous).await.is_err(),
        "a client without a certificate was answered"
    );
    let plain = esq_testkit::endpoint(addr, None).expect("endpoint");
    assert!(
        health_over(plain).await.is_err(),
        "a plaintext client was answered"
    );
    h.stop().await.expect("stop");
}

/// A channel to `addr` without any client-side deadline (so calls carry no `grpc-timeout`).
async fn bare_channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

/// A GetCart that waits for a version the cart does not have yet.
fn waiting_get(cart_id: &str, min_version: u64) -> cart::GetCartRequest {
    cart::GetCartRequest {
        cart_id: cart_id.into(),
        min_version,
    }
}

/// With `--max-concurrent-calls 4`, four calls that wait hold the server's budget: every call
/// of a burst on top is answered RESOURCE_EXHAUSTED at once, naming the limit, while the four
/// admitted calls succeed once their version arrives; then calls are admitted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_the_call_limit_is_shed() {
    const LIMIT: usize = 4;
    let h = DevHarness::start_with(|c| {
        c.limits.max_concurrent_calls = LIMIT;
        c.limits.default_deadline = None;
        c.read.max_wait = Duration::from_secs(600);
    })
    .await
    .expect("start");
    let id = suite::unique("cart");
    let v = h
        .clients
        .carts
        .clone()
        .add_item(suite::add(&id, "apple", 1, 100))
        .await
        .expect("add")
        .into_inner()
        .version;
    let read = bare_channel(h.read_addr().expect("running")).await;
    let queries = CartQueriesClient::new(read);
    let spawn_wait = || {
        let mut q = queries.clone();
        let req = waiting_get(&id, v + 1);
        tokio::spawn(async move { q.get_cart(req).await })
    };
    let mut waiting: Vec<_> = (0..LIMIT).map(|_| spawn_wait()).collect();
    // Once the four waiting calls are in, a probe is refused.
    let probe = || {
        let mut q = queries.clone();
        async move { q.get_cart(waiting_get("nobody", 0)).await }
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match probe().await {
            Err(e) if e.code() == Code::ResourceExhausted => break,
            other => {
                // A waiting call that ended is not what this test is about (shedding), but it
                // would keep the limit from being reached: say so and put another in its place.
                for w in waiting.iter_mut().filter(|w| w.is_finished()) {
                    let ended = std::mem::replace(w, spawn_wait()).await;
                    eprintln!("a waiting call ended before its version arrived: {ended:?}");
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the limit was never reached: last probe {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let burst: Vec<_> = (0..16).map(|_| tokio::spawn(probe())).collect();
    for call in burst {
        let err = call
            .await
            .expect("join")
            .expect_err("a call over the limit is refused");
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(err.message().contains("--max-concurrent-calls"), "{err:?}");
    }
    assert!(
        waiting.iter().all(|w| !w.is_finished()),
        "an admitted call ended early"
    );
    // The version arrives (write-svc has its own budget): the admitted calls succeed.
    h.clients
        .carts
        .clone()
        .add_item(suite::add(&id, "pear", 1, 100))
        .await
        .expect("second add");
    for call in waiting {
        let got = tokio::time::timeout(WAIT, call)
            .await
            .expect("the admitted call ends")
            .expect("join")
            .expect("the admitted call succeeds")
            .into_inner();
        assert_eq!(got.version, v + 1);
    }
    // Their permits are back.
    let after = probe().await;
    assert!(
        !matches!(&after, Err(e) if e.code() == Code::ResourceExhausted),
        "{after:?}"
    );
    h.stop().await.expect("stop");
}

/// A call without a deadline gets the server's `--default-deadline`: a min_version wait that
/// would last ten minutes ends with DEADLINE_EXCEEDED, naming the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_without_deadline_gets_the_default_one() {
    let h = DevHarness::start_with(|c| {
        c.limits.default_deadline = Some(Duration::from_millis(500));
        c.read.max_wait = Duration::from_secs(600);
    })
    .await
    .expect("start");
    let id = suite::unique("cart");
    h.clients
        .carts
        .clone()
        .add_item(suite::add(&id, "apple", 1, 100))
        .await
        .expect("add");
    let mut queries = CartQueriesClient::new(bare_channel(h.read_addr().expect("running")).await);
    let err = tokio::time::timeout(WAIT, queries.get_cart(waiting_get(&id, 99)))
        .await
        .expect("the server ends the call")
        .expect_err("the wait cannot succeed");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("--default-deadline"), "{err:?}");
    h.stop().await.expect("stop");
}

/// Runs `esq args…` to completion (bounded), returning (exit code, stdout, stderr).
async fn esq(args: &[&str]) -> (i32, String, String) {
    let bin = bin_dir().expect("target folder").join("esq");
    assert!(
        bin.exists(),
        "{} is missing: cargo build --workspace --bins",
        bin.display()
    );
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(&bin)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("esq finishes")
    .expect("run esq");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `esq tls generate` writes a PKI that `esq dev --tls-cert … --tls-client-ca …` serves, and
/// that `esq streams --ca-cert … --client-cert …` reaches; without the client certificate the
/// server refuses the CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_pki_serves_esq_dev_with_mutual_tls() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = dir.path().join("pki");
    let pki_dir = pki.to_str().expect("utf-8 path");
    let (code, out, err) = esq(&["tls", "generate", "--dir", pki_dir]).await;
    assert_eq!(code, 0, "{out}{err}");
    for file in [
        "ca.pem",
        "server.pem",
        "server-key.pem",
        "client.pem",
        "client-key.pem",
    ] {
        assert!(pki.join(file).is_file(), "{file} missing: {out}");
    }
    let path = |f: &str| pki.join(f).display().to_string();
    let mut child = tokio::process::Command::new(bin_dir().expect("bin").join("esq"))
        .args([
            "dev",
            "--write-addr",
            "127.0.0.1:0",
            "--read-addr",
            "127.0.0.1:0",
        ])
        .args(["--metrics-addr", "off", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--tls-cert", &path("server.pem")])
        .args(["--tls-key", &path("server-key.pem")])
        .args(["--tls-client-ca", &path("ca.pem")])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn esq dev");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let (mut write, mut banner) = (None, String::new());
    tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.expect("stdout") {
            banner.push_str(&line);
            banner.push('\n');
            let mut words = line.split_whitespace();
            if let (Some("write-svc"), Some(a)) = (words.next(), words.next()) {
                write = a.parse::<SocketAddr>().ok();
                break;
            }
        }
    })
    .await
    .expect("esq dev starts");
    let write = write.unwrap_or_else(|| panic!("no write-svc address in {banner}"));
    assert!(banner.contains("with TLS"), "{banner}");
    let url = format!("https://{write}");
    let ca = path("ca.pem");
    let (cert, key) = (path("client.pem"), path("client-key.pem"));
    // A stream that does not exist: the server itself answers NOT_FOUND, which needs the
    // TLS handshake to have passed.
    let base = [
        "streams",
        "--write-url",
        url.as_str(),
        "--ca-cert",
        ca.as_str(),
    ];
    let mut with_cert = base.to_vec();
    with_cert.extend(["--client-cert", cert.as_str(), "--client-key", key.as_str()]);
    with_cert.extend(["info", "cart/tls-check"]);
    let (code, out, err) = esq(&with_cert).await;
    assert!(
        err.contains("NOT_FOUND"),
        "with the client certificate: exit {code}: {out}{err}"
    );
    let mut without = base.to_vec();
    without.extend(["info", "cart/tls-check"]);
    let (code, out, err) = esq(&without).await;
    assert!(
        code != 0 && !err.contains("NOT_FOUND"),
        "without a client certificate the server must not answer: exit {code}: {out}{err}"
    );
    child.start_kill().expect("kill esq dev");
    let _ = child.wait().await;
}

/// The system suite's main path on the distributed deployment (Cassandra + Redis, separate
/// processes) with every server on mutual TLS: commands, queries with min_version, health.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_over_mutual_tls() {
    let Some(backends) = Backends::from_env("cluster_over_mutual_tls") else {
        return;
    };
    let options = ClusterOptions {
        tls: true,
        ..ClusterOptions::default()
    };
    let h = ClusterHarness::start(backends, options)
        .await
        .unwrap_or_else(|e| panic!("cannot start the TLS deployment: {e:#}"));
    eprintln!("logs in {}", h.logs().display());
    let c = &h.clients;
    suite::health_is_serving(c).await;
    suite::append_then_query_with_min_version(c).await;
    suite::bookshop_commands_and_queries(c).await;
    let tls = h.client_tls().expect("a TLS harness");
    let projector = h.projectors[0].addr;
    health_over(esq_testkit::endpoint(projector, Some(&tls)).expect("endpoint"))
        .await
        .expect("the projector serves mutual TLS");
    for addr in [h.writers[0].addr, h.read_addr(), projector] {
        let plain = esq_testkit::endpoint(addr, None).expect("endpoint");
        assert!(
            health_over(plain).await.is_err(),
            "{addr} answered plaintext"
        );
    }
}
