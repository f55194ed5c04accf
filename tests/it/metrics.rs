//! Prometheus metrics scraped after known traffic: the counters move by exactly what the
//! traffic implies. On `esq dev` (the binary, in a process of its own, so no other test's calls
//! land in its counters) every family is on one endpoint; on the cluster each binary has its own.

use crate::suite::{add, unique};
use esq::pb::cart::v1 as cart;
use esq_testkit::metrics::{scrape, Scrape};
use esq_testkit::Clients;
use std::net::SocketAddr;
use std::time::Duration;
use tonic::Code;

/// Where each role serves its metrics (the same address for all of them on `esq dev`).
pub struct Endpoints {
    /// write-svc.
    pub write: SocketAddr,
    /// read-svc.
    pub read: SocketAddr,
    /// Every projector.
    pub projectors: Vec<SocketAddr>,
    /// Change-log shards, whose leases the projectors share.
    pub shards: u32,
}

async fn scrape_ok(addr: SocketAddr) -> Scrape {
    scrape(addr)
        .await
        .unwrap_or_else(|e| panic!("scraping {addr}: {e:#}"))
}

/// The sum of `name{labels}` over the projectors.
async fn projectors_sum(at: &Endpoints, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for &p in &at.projectors {
        sum += scrape_ok(p).await.sum(name, labels);
    }
    sum
}

/// `after - before` of `name{labels}`.
fn delta(before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.sum(name, labels) - before.sum(name, labels)
}

/// N AddItem, one stale AddItem (a conflict), one GetCart with a min_version that is met and
/// one whose min_version never comes: each counter moved by exactly that much.
pub async fn counters_follow_traffic(c: &Clients, at: &Endpoints) {
    const N: u64 = 5;
    const APPLIED: &str = "esq_projector_events_applied_total";
    let cart2 = [("projection", "cart2")];
    let write0 = scrape_ok(at.write).await;
    let read0 = scrape_ok(at.read).await;
    let applied0 = projectors_sum(at, APPLIED, &cart2).await;
    let read_apply = [("store", "read"), ("operation", "apply")];
    let applies0 = projectors_sum(at, "esq_store_call_duration_seconds_count", &read_apply).await;

    let id = unique("metrics-cart");
    let mut version = 0;
    for i in 0..N {
        let r = c
            .carts
            .clone()
            .add_item(add(&id, &format!("sku{i}"), 1, 100))
            .await
            .expect("add item")
            .into_inner();
        version = r.version;
    }
    assert_eq!(version, N, "one event per AddItem");
    let mut stale = add(&id, "late", 1, 100);
    stale.expected_version = Some(1);
    let refused = c.carts.clone().add_item(stale).await.expect_err("stale");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    // The projector applied every event of the cart (bounded wait; the counter only grows).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let applied = projectors_sum(at, APPLIED, &cart2).await - applied0;
        if applied >= N as f64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the projectors applied {applied} of {N} events within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Between them the projectors hold every shard's lease (once they have settled), and
    // report each one's lag and checkpoint age.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let leases = projectors_sum(at, "esq_projector_leases_owned", &[]).await;
        let mut lags = 0;
        let mut ages = 0;
        for &p in &at.projectors {
            let s = scrape_ok(p).await;
            lags += s.count("esq_projector_lag_seconds");
            ages += s.count("esq_projector_checkpoint_age_seconds");
        }
        if leases == f64::from(at.shards) && lags == at.shards as usize && ages >= 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after 120 s the projectors hold {leases} of {} shard leases and report the lag of \
             {lags} shards, the checkpoint age of {ages}",
            at.shards
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = c
        .cart_queries
        .clone()
        .get_cart(cart::GetCartRequest {
            cart_id: id.clone(),
            min_version: version,
        })
        .await
        .expect("get cart")
        .into_inner();
    assert_eq!(got.version, version);
    // A version that never comes: the server's own bound ends the wait.
    let never = c
        .cart_queries
        .clone()
        .get_cart(cart::GetCartRequest {
            cart_id: id.clone(),
            min_version: version + 100,
        })
        .await
        .expect_err("min_version never reached");
    assert_eq!(never.code(), Code::DeadlineExceeded, "{never:?}");

    let write1 = scrape_ok(at.write).await;
    let read1 = scrape_ok(at.read).await;
    let add_item = |code| {
        [
            ("service", "esq.cart.v1.CartCommands"),
            ("method", "AddItem"),
            ("code", code),
        ]
    };
    let get_cart = |code| {
        [
            ("service", "esq.cart.v1.CartQueries"),
            ("method", "GetCart"),
            ("code", code),
        ]
    };
    let checks: Vec<(&str, f64, f64)> = vec![
        (
            "AddItem OK",
            delta(&write0, &write1, "esq_grpc_requests_total", &add_item("OK")),
            N as f64,
        ),
        (
            "AddItem FAILED_PRECONDITION",
            delta(
                &write0,
                &write1,
                "esq_grpc_requests_total",
                &add_item("FAILED_PRECONDITION"),
            ),
            1.0,
        ),
        (
            "AddItem latencies observed",
            delta(
                &write0,
                &write1,
                "esq_grpc_request_duration_seconds_count",
                &[("method", "AddItem")],
            ),
            N as f64 + 1.0,
        ),
        (
            "appends ok",
            delta(
                &write0,
                &write1,
                "esq_write_appends_total",
                &[("outcome", "ok")],
            ),
            N as f64,
        ),
        (
            "events appended",
            delta(&write0, &write1, "esq_write_events_appended_total", &[]),
            N as f64,
        ),
        (
            "conflicts",
            delta(&write0, &write1, "esq_write_conflicts_total", &[]),
            1.0,
        ),
        (
            "aborted",
            delta(&write0, &write1, "esq_write_aborted_total", &[]),
            0.0,
        ),
        (
            "event-store append latencies observed",
            delta(
                &write0,
                &write1,
                "esq_store_call_duration_seconds_count",
                &[("store", "event"), ("operation", "append")],
            ),
            N as f64,
        ),
        (
            "GetCart OK",
            delta(&read0, &read1, "esq_grpc_requests_total", &get_cart("OK")),
            1.0,
        ),
        (
            "GetCart DEADLINE_EXCEEDED",
            delta(
                &read0,
                &read1,
                "esq_grpc_requests_total",
                &get_cart("DEADLINE_EXCEEDED"),
            ),
            1.0,
        ),
        (
            "min_version waits met",
            delta(
                &read0,
                &read1,
                "esq_read_min_version_waits_total",
                &[("outcome", "met")],
            ),
            1.0,
        ),
        (
            "min_version waits at the deadline",
            delta(
                &read0,
                &read1,
                "esq_read_min_version_waits_total",
                &[("outcome", "deadline")],
            ),
            1.0,
        ),
    ];
    // Read-store calls are timed too: at least one get per query (the deadline one polls
    // several times), and at least one apply by the projectors (one apply may carry several
    // events of a stream).
    let gets = delta(
        &read0,
        &read1,
        "esq_store_call_duration_seconds_count",
        &[("store", "read"), ("operation", "get")],
    );
    assert!(
        gets >= 2.0,
        "read-svc timed {gets} read-store gets for 2 queries"
    );
    let applies =
        projectors_sum(at, "esq_store_call_duration_seconds_count", &read_apply).await - applies0;
    assert!(
        applies >= 1.0,
        "the projectors timed {applies} read-store applies for {N} events"
    );
    let wrong: Vec<_> = checks.iter().filter(|(_, got, want)| got != want).collect();
    assert!(
        wrong.is_empty(),
        "metrics that did not move as the traffic implies (name, moved, expected): {wrong:?}\n\
         write-svc:\n{}\nread-svc:\n{}",
        write1.text,
        read1.text
    );
}

/// `esq dev --metrics-addr 127.0.0.1:0` prints its metrics address and serves the counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_metrics_follow_traffic() {
    use tokio::io::AsyncBufReadExt;
    let bin = esq_testkit::cluster::bin_dir()
        .expect("target dir")
        .join("esq");
    assert!(
        bin.exists(),
        "{} missing: cargo build --workspace --bins",
        bin.display()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = tokio::process::Command::new(&bin)
        .args([
            "dev",
            "--write-addr",
            "127.0.0.1:0",
            "--read-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn esq dev");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let (mut write, mut read, mut metrics) = (None, None, None);
    let started = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            let mut words = line.split_whitespace();
            let addr = |w: Option<&str>| w.and_then(|a| a.parse::<SocketAddr>().ok());
            match words.next() {
                Some("write-svc") => write = addr(words.next()),
                Some("read-svc") => read = addr(words.next()),
                Some("metrics") => metrics = addr(words.next()),
                _ => {}
            }
            if write.is_some() && read.is_some() && metrics.is_some() {
                return;
            }
        }
    })
    .await;
    assert!(
        started.is_ok(),
        "esq dev printed write {write:?}, read {read:?}, metrics {metrics:?}"
    );
    let metrics = metrics.expect("metrics addr");
    let clients = Clients::connect(write.expect("write"), read.expect("read"))
        .await
        .expect("connect");
    let at = Endpoints {
        write: metrics,
        read: metrics,
        projectors: vec![metrics],
        shards: 1,
    };
    counters_follow_traffic(&clients, &at).await;
    // Anything but GET /metrics is 404, and the port serves nothing else.
    let mut conn = tokio::net::TcpStream::connect(metrics)
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(
        &mut conn,
        b"GET /other HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("write");
    let mut response = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut conn, &mut response)
        .await
        .expect("read");
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    child.start_kill().expect("kill");
    let _ = child.wait().await;
}
