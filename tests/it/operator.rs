//! The operator's tools end to end: the real `esq` binary (`--json`) against the dev stack and
//! the cluster, and the statuses of `esq.v1.Projections`.
//!
//! The `esq` binary comes from the target folder (like the cluster tests' binaries): build it
//! first with `cargo build -p esq-cli` (or `cargo build --workspace --bins`).

use crate::suite::{add, checkout, remove, unique};
use esq::pb::cart::v1 as cart;
use esq::pb::v1 as pb;
use esq::pb::v1::projections_client::ProjectionsClient;
use esq_testkit::cluster::{bin_dir, Backends, ClusterHarness, ClusterOptions};
use esq_testkit::{Clients, DevHarness};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;

/// The `esq` binary pointed at one deployment.
pub struct Esq {
    write_url: String,
    projector_url: String,
}

/// What one run of `esq` came to.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Esq {
    pub fn new(write: SocketAddr, projector: SocketAddr) -> Self {
        Self {
            write_url: format!("http://{write}"),
            projector_url: format!("http://{projector}"),
        }
    }

    /// Runs `esq args…` (bounded: a hung command fails the test).
    pub async fn run(&self, args: &[&str]) -> Run {
        let bin = bin_dir().expect("target folder").join("esq");
        assert!(
            bin.exists(),
            "{} is missing: build it first (cargo build -p esq-cli)",
            bin.display()
        );
        let out = tokio::time::timeout(
            Duration::from_secs(300),
            tokio::process::Command::new(&bin)
                .args(args)
                .env("ESQ_WRITE_URL", &self.write_url)
                .env("ESQ_PROJECTOR_URL", &self.projector_url)
                .env("RUST_LOG", "warn")
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("esq {args:?} did not finish within 300 s"))
        .expect("run esq");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs `esq --json args…`, expecting exit code `code`, and parses its output.
    pub async fn json(&self, code: i32, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let r = self.run(&all).await;
        assert_eq!(
            r.code, code,
            "esq {all:?}: exit code {} (stdout {:?}, stderr {:?})",
            r.code, r.stdout, r.stderr
        );
        serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("esq {all:?}: not JSON ({e}): {:?}", r.stdout))
    }

    /// Runs `esq args…`, expecting it to fail with exit code 2 and `needle` in its error.
    pub async fn fails(&self, args: &[&str], needle: &str) {
        let r = self.run(args).await;
        assert_eq!(r.code, 2, "esq {args:?} should fail: {:?}", r.stderr);
        assert!(
            r.stderr.contains(needle),
            "esq {args:?}: {needle:?} not in {:?}",
            r.stderr
        );
    }
}

/// A cart with three events (add apple, add pear, remove apple), in the read model.
async fn three_event_cart(c: &Clients) -> String {
    let id = unique("opcart");
    let mut carts = c.carts.clone();
    carts
        .add_item(add(&id, "apple", 2, 150))
        .await
        .expect("add");
    carts.add_item(add(&id, "pear", 1, 300)).await.expect("add");
    let v = carts
        .remove_item(remove(&id, "apple", 1))
        .await
        .expect("remove")
        .into_inner()
        .version;
    assert_eq!(v, 3);
    c.cart_queries
        .clone()
        .get_cart(cart::GetCartRequest {
            cart_id: id.clone(),
            min_version: v,
        })
        .await
        .expect("cart in the read model");
    id
}

fn versions(lines: &str) -> Vec<u64> {
    lines
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}"));
            v["version"].as_u64().expect("version")
        })
        .collect()
}

/// `esq streams read|info` print what the event store holds; errors exit 2 naming the problem.
pub async fn streams_read_and_info(c: &Clients, esq: &Esq) {
    let id = three_event_cart(c).await;
    let name = format!("cart/{id}");
    let stored = crate::suite::read_all(c, "cart", &id).await;

    let r = esq.run(&["--json", "streams", "read", &name]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 3);
    for (line, e) in lines.iter().zip(&stored) {
        assert_eq!(line["stream"], name.as_str());
        assert_eq!(line["version"], e.version);
        assert_eq!(line["event_id"], e.event_id.as_str());
        assert_eq!(line["type"], e.r#type.as_str());
    }
    assert_eq!(lines[0]["payload"]["sku"], "apple");
    assert_eq!(lines[2]["type"], "ItemRemoved");

    let r = esq
        .run(&[
            "--json",
            "streams",
            "read",
            &name,
            "--backwards",
            "--limit",
            "2",
        ])
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(versions(&r.stdout), [3, 2]);
    let r = esq
        .run(&["--json", "streams", "read", &name, "--from", "2"])
        .await;
    assert_eq!(versions(&r.stdout), [2, 3]);

    // Human output: one line per event.
    let r = esq.run(&["streams", "read", &name]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.lines().count(), 3);
    assert!(r.stdout.contains("ItemAdded"), "{}", r.stdout);

    let info = esq.json(0, &["streams", "info", &name]).await;
    assert_eq!(info["stream"], name.as_str());
    assert_eq!(info["version"], 3);
    assert_eq!(info["event_count"], 3);
    assert_eq!(info["created_at"], lines[0]["recorded_at"]);
    assert_eq!(info["last_appended_at"], lines[2]["recorded_at"]);

    esq.fails(
        &["streams", "info", &format!("cart/{}", unique("none"))],
        "NOT_FOUND",
    )
    .await;
    esq.fails(&["streams", "read", "Cart/x"], "stream.type")
        .await;
    esq.fails(&["streams", "read", "no-slash"], "type/id").await;

    // TLS settings are checked: a CA certificate needs https://, must be readable, and TLS to
    // a plaintext server fails to connect (exit 2) instead of hanging.
    let https = esq.write_url.replacen("http://", "https://", 1);
    esq.fails(
        &["streams", "info", &name, "--ca-cert", "/nonexistent.pem"],
        "https://",
    )
    .await;
    esq.fails(
        &[
            "streams",
            "info",
            &name,
            "--write-url",
            &https,
            "--ca-cert",
            "/nonexistent.pem",
        ],
        "cannot read the CA certificate",
    )
    .await;
    esq.fails(
        &["streams", "info", &name, "--write-url", &https],
        "cannot connect",
    )
    .await;
}

fn code_of<T>(r: Result<T, tonic::Status>) -> (Code, String) {
    match r {
        Ok(_) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_owned()),
    }
}

/// `esq.v1.Projections` answers bad requests with statuses naming the problem, before doing
/// anything; it is health-checked and reflected where it is served.
pub async fn projections_admin_statuses(channel: Channel, esq: &Esq) {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "esq.v1.Projections".into(),
        })
        .await
        .expect("health of esq.v1.Projections")
        .into_inner();
    assert_eq!(
        health.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    let mut p = ProjectionsClient::new(channel);
    let cart_ref = Some(pb::StreamRef {
        r#type: "cart".into(),
        id: "c1".into(),
    });
    let cases: Vec<(&str, (Code, String), Code, &str)> = vec![
        (
            "GetProjection empty",
            code_of(p.get_projection(pb::GetProjectionRequest::default()).await),
            Code::InvalidArgument,
            "projection",
        ),
        (
            "GetProjection unknown",
            code_of(
                p.get_projection(pb::GetProjectionRequest {
                    projection: "nope".into(),
                })
                .await,
            ),
            Code::NotFound,
            "nope",
        ),
        (
            "Rebuild unknown",
            code_of(
                p.rebuild(pb::RebuildRequest {
                    projection: "nope".into(),
                })
                .await,
            ),
            Code::NotFound,
            "nope",
        ),
        (
            "WatchRebuild unknown",
            code_of(
                p.watch_rebuild(pb::WatchRebuildRequest {
                    projection: "nope".into(),
                    generation: 0,
                })
                .await,
            ),
            Code::NotFound,
            "nope",
        ),
        (
            "Verify unknown",
            code_of(
                p.verify(pb::VerifyRequest {
                    projection: "nope".into(),
                    ..Default::default()
                })
                .await,
            ),
            Code::NotFound,
            "nope",
        ),
        (
            "Verify too many examples",
            code_of(
                p.verify(pb::VerifyRequest {
                    projection: "cart2".into(),
                    examples: 1001,
                    repair: false,
                })
                .await,
            ),
            Code::InvalidArgument,
            "examples",
        ),
        (
            "ListParked unknown",
            code_of(
                p.list_parked(pb::ListParkedRequest {
                    projection: "nope".into(),
                    limit: 0,
                })
                .await,
            ),
            Code::NotFound,
            "nope",
        ),
        (
            "ListParked limit",
            code_of(
                p.list_parked(pb::ListParkedRequest {
                    projection: String::new(),
                    limit: 1001,
                })
                .await,
            ),
            Code::InvalidArgument,
            "limit",
        ),
        (
            "RetryParked no stream",
            code_of(
                p.retry_parked(pb::RetryParkedRequest {
                    projection: "cart2".into(),
                    stream: None,
                })
                .await,
            ),
            Code::InvalidArgument,
            "stream",
        ),
        (
            "RetryParked bad stream",
            code_of(
                p.retry_parked(pb::RetryParkedRequest {
                    projection: "cart2".into(),
                    stream: Some(pb::StreamRef {
                        r#type: "Cart".into(),
                        id: "c1".into(),
                    }),
                })
                .await,
            ),
            Code::InvalidArgument,
            "stream.type",
        ),
        (
            "SkipParked no reason",
            code_of(
                p.skip_parked(pb::SkipParkedRequest {
                    projection: "cart2".into(),
                    stream: cart_ref.clone(),
                    version: 1,
                    reason: "  ".into(),
                })
                .await,
            ),
            Code::InvalidArgument,
            "reason",
        ),
        (
            "SkipParked no version",
            code_of(
                p.skip_parked(pb::SkipParkedRequest {
                    projection: "cart2".into(),
                    stream: cart_ref,
                    version: 0,
                    reason: "bad data".into(),
                })
                .await,
            ),
            Code::InvalidArgument,
            "version",
        ),
    ];
    for (what, (code, message), want, needle) in cases {
        assert_eq!(code, want, "{what}: {message}");
        assert!(
            message.contains(needle),
            "{what}: {needle:?} not in {message:?}"
        );
    }

    // The CLI reports them and exits 2.
    esq.fails(&["projections", "status", "nope"], "NOT_FOUND")
        .await;
    esq.fails(
        &[
            "projections",
            "skip",
            "cart2",
            "cart/c1",
            "--version",
            "1",
            "--reason",
            "",
        ],
        "INVALID_ARGUMENT: reason",
    )
    .await;
    esq.fails(
        &["projections", "verify", "cart2", "--examples", "5000"],
        "examples",
    )
    .await;
}

/// The projections through the CLI: listed with their generations, status with shard
/// freshness, a rebuild followed to its end while queries keep answering, a clean verify, no
/// parked streams. Needs the generations and parked-stream modules of the projector.
pub async fn projections_list_status_rebuild_verify(c: &Clients, esq: &Esq) {
    let mut carts = Vec::new();
    for _ in 0..5 {
        carts.push(three_event_cart(c).await);
    }
    let last = carts.last().expect("carts").clone();
    c.carts
        .clone()
        .checkout(checkout(&last))
        .await
        .expect("checkout");

    let list = esq.json(0, &["projections", "list"]).await;
    let all = list["projections"].as_array().expect("projections");
    let names: Vec<&str> = all.iter().filter_map(|p| p["name"].as_str()).collect();
    for name in ["cart2", "book", "state"] {
        assert!(names.contains(&name), "{name} not in {names:?}");
    }
    let cart2 = all.iter().find(|p| p["name"] == "cart2").expect("cart2");
    let before = cart2["active_generation"]
        .as_u64()
        .expect("cart2 has an active generation");
    assert_eq!(cart2["parked"], 0);

    // The human forms say the same.
    let r = esq.run(&["projections", "list"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.lines().any(|l| l.starts_with("cart2 ")),
        "{}",
        r.stdout
    );
    let r = esq.run(&["projections", "status", "cart2"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("active generation  "), "{}", r.stdout);

    let status = esq.json(0, &["projections", "status", "cart2"]).await;
    assert_eq!(status["projection"]["name"], "cart2");
    let shards = status["shards"].as_array().expect("shards");
    assert!(!shards.is_empty(), "no shard status: {status}");
    for s in shards {
        assert!(s["shard"].is_u64(), "{s}");
        assert!(s["changes_behind"].is_u64(), "{s}");
    }

    // A rebuild followed to its end, with a query answering all along.
    let stop = Arc::new(AtomicBool::new(false));
    let query = {
        let (c, id, stop) = (c.clone(), carts[0].clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut answered = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let got = c
                    .cart_queries
                    .clone()
                    .get_cart(cart::GetCartRequest {
                        cart_id: id.clone(),
                        min_version: 0,
                    })
                    .await
                    .expect("the cart answers during the rebuild")
                    .into_inner();
                assert_eq!(got.version, 3, "the cart went back during the rebuild");
                answered += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            answered
        })
    };
    let done = esq
        .json(0, &["projections", "rebuild", "cart2", "--wait"])
        .await;
    assert_eq!(done["state"], "done", "{done}");
    let generation = done["generation"].as_u64().expect("generation");
    assert!(
        generation > before,
        "rebuilt into {generation}, was {before}"
    );
    stop.store(true, Ordering::Relaxed);
    let answered = query
        .await
        .expect("queries answered throughout the rebuild");
    assert!(answered > 0);

    let list = esq.json(0, &["projections", "list"]).await;
    let cart2 = list["projections"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == "cart2"))
        .expect("cart2")
        .clone();
    assert_eq!(cart2["active_generation"], generation);
    assert_eq!(cart2["rebuild"]["state"], "done");

    let report = esq.json(0, &["projections", "verify", "cart2"]).await;
    assert_eq!(report["clean"], true, "{report}");
    assert_eq!(report["generation"], generation);
    assert!(
        report["streams_checked"].as_u64().expect("streams") >= carts.len() as u64,
        "{report}"
    );
    for kind in ["missing", "extra", "different"] {
        assert_eq!(report[kind], 0, "{report}");
    }
    // The derived projections are verified against their sources, in the generation the source
    // serves; they are rebuilt with their source, not by their own name.
    for derived in ["authors", "sku_sales"] {
        let report = esq.json(0, &["projections", "verify", derived]).await;
        assert_eq!(report["clean"], true, "{report}");
    }
    esq.fails(
        &["projections", "rebuild", "sku_sales"],
        "FAILED_PRECONDITION: sku_sales is derived from cart2",
    )
    .await;

    let parked = esq.json(0, &["projections", "parked"]).await;
    assert_eq!(parked["parked"], serde_json::json!([]), "{parked}");
    esq.fails(
        &[
            "projections",
            "retry",
            "cart2",
            &format!("cart/{}", carts[0]),
        ],
        "NOT_FOUND",
    )
    .await;
}

macro_rules! dev_operator_tests {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let h = DevHarness::start().await.expect("start dev stack");
            let read = h.read_addr().expect("running");
            let esq = Esq::new(h.write_addr().expect("running"), read);
            dev::$name(&h, read, &esq).await;
            h.stop().await.expect("stop dev stack");
        }
    )*};
}

/// Adapters from the dev harness to the scenarios.
mod dev {
    use super::*;

    pub async fn streams_read_and_info_on_dev(h: &DevHarness, _read: SocketAddr, esq: &Esq) {
        super::streams_read_and_info(&h.clients, esq).await;
    }

    pub async fn projections_admin_statuses_on_dev(_h: &DevHarness, read: SocketAddr, esq: &Esq) {
        let channel = esq_testkit::channel(read).await.expect("connect");
        super::projections_admin_statuses(channel, esq).await;
    }

    pub async fn projections_operated_on_dev(h: &DevHarness, _read: SocketAddr, esq: &Esq) {
        super::projections_list_status_rebuild_verify(&h.clients, esq).await;
    }
}

dev_operator_tests!(
    streams_read_and_info_on_dev,
    projections_admin_statuses_on_dev,
    projections_operated_on_dev,
);

async fn cluster(test: &str) -> Option<(ClusterHarness, Esq)> {
    let backends = Backends::from_env(test)?;
    let h = ClusterHarness::start(backends, ClusterOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{test}: cannot start the deployment: {e:#}"));
    eprintln!("logs in {}", h.logs().display());
    let esq = Esq::new(h.writers[0].addr, h.projectors[0].addr);
    Some((h, esq))
}

/// The CLI's stream commands and the admin statuses against the processes on Cassandra and
/// Redis (esq.v1.Projections on the projector's --listen port).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_tools_on_cassandra_and_redis() {
    let Some((h, esq)) = cluster("operator_tools_on_cassandra_and_redis").await else {
        return;
    };
    streams_read_and_info(&h.clients, &esq).await;
    let channel = esq_testkit::channel(h.projectors[0].addr)
        .await
        .expect("connect to the projector");
    projections_admin_statuses(channel, &esq).await;
}

/// The projections operated through the CLI against the processes on Cassandra and Redis, then
/// a difference planted in Redis: verify finds it (exit 1), `--repair` repairs it, verify is
/// clean again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projections_operated_on_cassandra_and_redis() {
    let Some((h, esq)) = cluster("projections_operated_on_cassandra_and_redis").await else {
        return;
    };
    projections_list_status_rebuild_verify(&h.clients, &esq).await;

    // Plant a difference: change a field of one cart's document in Redis.
    let id = three_event_cart(&h.clients).await;
    let client = redis::Client::open(h.backends.redis.as_str()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let pattern = format!("{}:cart2*{{{id}}}*", h.prefix);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(&pattern)
        .query_async(&mut conn)
        .await
        .expect("keys");
    let mut planted = false;
    for key in &keys {
        let kind: String = redis::cmd("TYPE")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("type");
        let has_items: bool = redis::cmd("HEXISTS")
            .arg(key)
            .arg("item:apple")
            .query_async(&mut conn)
            .await
            .unwrap_or(false);
        if kind == "hash" && has_items {
            let () = redis::cmd("HSET")
                .arg(key)
                .arg("item:apple")
                .arg("99")
                .query_async(&mut conn)
                .await
                .expect("hset");
            planted = true;
        }
    }
    assert!(planted, "no document of cart {id} among {keys:?}");

    let report = esq
        .json(1, &["projections", "verify", "cart2", "--examples", "5"])
        .await;
    assert_eq!(report["clean"], false, "{report}");
    assert!(
        report["different"].as_u64().expect("different") >= 1,
        "{report}"
    );
    let examples = report["examples"].as_array().expect("examples");
    assert!(
        examples
            .iter()
            .any(|d| d["doc_id"].as_str().is_some_and(|d| d.contains(&id))),
        "{report}"
    );
    let repaired = esq
        .json(1, &["projections", "verify", "cart2", "--repair"])
        .await;
    assert!(
        repaired["repaired"].as_u64().expect("repaired") >= 1,
        "{repaired}"
    );
    let again = esq.json(0, &["projections", "verify", "cart2"]).await;
    assert_eq!(again["clean"], true, "{again}");
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (needed to make the test certificates)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `esq` over TLS: write-svc's routes behind a certificate signed by a test CA; with
/// `--ca-cert` naming that CA the call gets through (and is answered), without it the server is
/// not trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_over_tls() {
    use tonic::transport::{Identity, Server, ServerTlsConfig};
    // tonic's server TLS takes rustls' process-wide provider, and this process has two
    // compiled in (the CQL driver brings aws-lc-rs): name one, as esq's own servers do.
    esq_readstore::redis::install_crypto_provider();
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=esq test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .expect("write ext");
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.pem",
        ],
    );
    let identity = Identity::from_pem(
        std::fs::read(d.join("server.pem")).expect("cert"),
        std::fs::read(d.join("server.key")).expect("key"),
    );

    let store = std::sync::Arc::new(
        esq_eventstore::embedded::EmbeddedStore::open(&d.join("data")).expect("store"),
    );
    let routes = esq_write_svc::routes(
        esq_write_svc::Deps { store, nudge: None },
        &esq_write_svc::Config::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = tokio::spawn(
        Server::builder()
            .tls_config(ServerTlsConfig::new().identity(identity))
            .expect("tls config")
            .add_routes(routes)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let esq = Esq::new(
        SocketAddr::from(([127, 0, 0, 1], 9)),
        SocketAddr::from(([127, 0, 0, 1], 9)),
    );
    let url = format!("https://localhost:{port}");
    let ca = d.join("ca.pem");
    let ca = ca.to_str().expect("utf-8 path");
    // Trusted: the call reaches write-svc, which answers (the stream has no events).
    esq.fails(
        &[
            "streams",
            "info",
            "cart/tls",
            "--write-url",
            &url,
            "--ca-cert",
            ca,
        ],
        "NOT_FOUND: stream cart/tls has no events",
    )
    .await;
    // Not trusted without the CA.
    esq.fails(
        &["streams", "info", "cart/tls", "--write-url", &url],
        "cannot connect",
    )
    .await;
    server.abort();
}
