//! The suite against the embedded single-process stack (`esq dev`), plus restart durability.

use crate::{bus, core, derived, history, replay, suite};
use esq_testkit::DevHarness;

macro_rules! dev_tests {
    ($module:ident: $($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let h = DevHarness::start().await.expect("start dev stack");
            $module::$name(&h.clients).await;
            h.stop().await.expect("stop dev stack");
        }
    )*};
}

dev_tests!(
    suite: append_then_query_with_min_version,
    min_version_wait_is_bounded,
    concurrent_writers_one_winner_per_version,
    retried_append_is_idempotent,
    bad_input_is_rejected_and_changes_nothing,
    cart_rules_and_conflicts,
    bookshop_commands_and_queries,
    read_stream_directions_and_bounds,
    health_is_serving,
    reflection_lists_services,
    schema_upgrades_are_read_through_upcasters,
);

dev_tests!(
    history: state_at_versions_and_exact_times,
    cart_at_versions_and_times,
    book_at_after_update_and_delete,
    list_books_at_shows_the_old_catalogue,
    sales_report_over_checked_out_carts,
    cart_at_every_version_is_what_the_read_model_served_then,
);

dev_tests!(derived: derived_queries_follow_the_traffic);

/// Built from history: after a restart the in-memory read store is rebuilt from the log, and
/// the derived read models with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn derived_read_models_are_rebuilt_from_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = DevHarness::start_in(dir.path()).await.expect("start");
    let (authors, skus) = derived::derived_traffic(&h.clients).await;
    derived::derived_equal_a_fold_of_the_store(&h.clients, &authors, &skus).await;
    h.restart().await.expect("restart");
    derived::derived_equal_a_fold_of_the_store(&h.clients, &authors, &skus).await;
    h.stop().await.expect("stop");
}

dev_tests!(
    bus: subscribe_catches_up_then_goes_live,
    subscribe_rejects_bad_requests,
);

/// 10,000 events by 8 concurrent writers, two disconnects (catch-up, live): no gap, no repeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_resumes_without_gap_or_duplicate() {
    let h = DevHarness::start().await.expect("start dev stack");
    bus::subscribe_resumes_without_gap_or_duplicate(&h.clients, 10_000).await;
    h.stop().await.expect("stop dev stack");
}

/// Runs [`stalled_subscribers_inner`] in a process of its own, so that no other test's
/// allocations land in the resident memory it measures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscribers_stay_flat() {
    crate::suite::run_alone("dev::stalled_subscribers_inner").await;
}

/// 50 stalled subscribers on the dev stack (this process): bounded memory each, flat while the
/// store grows. Run by [`stalled_subscribers_stay_flat`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measures this process's memory: run alone by stalled_subscribers_stay_flat"]
async fn stalled_subscribers_inner() {
    let h = DevHarness::start().await.expect("start dev stack");
    let addr = h.write_addr().expect("running");
    bus::stalled_subscribers_stay_flat(&h.clients, addr, std::process::id(), 50).await;
    h.stop().await.expect("stop dev stack");
}

dev_tests!(
    core: read_model_agrees_with_the_aggregate,
    owned_streams_honour_their_contracts,
    concurrent_commands_on_one_cart_all_succeed,
);

dev_tests!(
    replay: replay_preview_skip_move_insert_stop,
    replay_preview_validates_edits,
    saved_timelines_preview_again,
    saved_timelines_follow_the_stream_as_it_grows,
    replay_preview_of_a_free_form_stream,
);

/// The `esq dev` binary prints its addresses, serves, and exits cleanly on SIGTERM; its logs,
/// written to a pipe, carry no ANSI colour codes in either format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn esq_dev_binary_serves_and_stops_on_sigterm() {
    for format in ["plain", "json"] {
        let logs = run_esq_dev(format).await;
        assert!(logs.contains("listening"), "{format} logs: {logs}");
        assert!(
            !logs.contains('\u{1b}'),
            "{format} logs to a pipe carry escape codes: {logs:?}"
        );
    }
}

/// Runs `esq dev` with stderr piped, checks it serves and stops on SIGTERM; returns its logs.
async fn run_esq_dev(log_format: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, clients, logs) = spawn_esq_dev(dir.path(), log_format, "debug").await;
    suite::health_is_serving(&clients).await;
    // A refused call, so that warnings and error fields are logged too.
    let _ = clients
        .events
        .clone()
        .append(esq::pb::v1::AppendRequest::default())
        .await;
    let pid = child.id().expect("pid").to_string();
    let status = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill");
    assert!(status.success());
    let exit = tokio::time::timeout(std::time::Duration::from_secs(40), child.wait())
        .await
        .expect("exits after SIGTERM")
        .expect("wait");
    assert!(exit.success(), "esq dev exited with {exit:?}");
    logs.await.expect("logs")
}

/// Starts the `esq dev` binary on `data_dir` (ports picked by the system), waits for the
/// addresses it prints, connects. Its stderr (logs at `log_level`) is collected by the
/// returned task until the process ends.
async fn spawn_esq_dev(
    data_dir: &std::path::Path,
    log_format: &str,
    log_level: &str,
) -> (
    tokio::process::Child,
    esq_testkit::Clients,
    tokio::task::JoinHandle<String>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let bin = std::env::current_exe()
        .expect("test exe")
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("esq");
    assert!(
        bin.exists(),
        "{} missing: cargo build --workspace --bins",
        bin.display()
    );
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
        .arg(data_dir)
        .env("LOG_FORMAT", log_format)
        .env("RUST_LOG", log_level)
        .env_remove("NO_COLOR")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn esq dev");
    let mut stderr = child.stderr.take().expect("stderr");
    let logs = tokio::spawn(async move {
        let mut all = String::new();
        let _ = stderr.read_to_string(&mut all).await;
        all
    });
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let (mut write, mut read) = (None, None);
    while let Some(line) = lines.next_line().await.expect("read stdout") {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("write-svc"), Some(a)) => write = a.parse::<std::net::SocketAddr>().ok(),
            (Some("read-svc"), Some(a)) => read = a.parse::<std::net::SocketAddr>().ok(),
            _ => {}
        }
        if write.is_some() && read.is_some() {
            break;
        }
    }
    // Keep draining stdout so that the process never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let clients =
        esq_testkit::Clients::connect(write.expect("write addr"), read.expect("read addr"))
            .await
            .expect("connect");
    (child, clients, logs)
}

/// kill -9 of `esq dev` while 16 writers append concurrently (group commit: many appends per
/// redb transaction, two writers per cart so one group holds several appends of one stream)
/// loses no acknowledged append: after a restart on the same data every acknowledged version
/// is there with its item, the versions are contiguous, and the rebuilt read model shows
/// every acknowledged item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_concurrent_load_loses_no_acknowledged_append() {
    use esq::pb::cart::v1 as cart;
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, clients, _logs) = spawn_esq_dev(dir.path(), "plain", "warn").await;
    let carts: Vec<String> = (0..8).map(|_| suite::unique("kill9")).collect();
    let acked: Arc<Mutex<Vec<(String, u64, String)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let (mut c, acked, stop) =
                (clients.carts.clone(), Arc::clone(&acked), Arc::clone(&stop));
            let cart_id = carts[w % carts.len()].clone();
            tokio::spawn(async move {
                for i in 0.. {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        break;
                    }
                    let sku = format!("w{w}-{i}");
                    let call = c.add_item(suite::add(&cart_id, &sku, 1, 1));
                    match tokio::time::timeout(std::time::Duration::from_secs(30), call).await {
                        Ok(Ok(r)) => {
                            let version = r.into_inner().version;
                            acked.lock().unwrap().push((cart_id.clone(), version, sku));
                        }
                        // Conflicts with the other writer of the cart, and every call once
                        // the process is gone: not acknowledged.
                        Ok(Err(_)) | Err(_) => {
                            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                        }
                    }
                }
            })
        })
        .collect();
    let give_up = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    while acked.lock().unwrap().len() < 400 {
        assert!(
            tokio::time::Instant::now() < give_up,
            "the writers made too little progress"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // SIGKILL in the middle of the load: appends are queued, in a group, being synced.
    child.start_kill().expect("kill -9");
    child.wait().await.expect("reap");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in writers {
        w.await.expect("writer");
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());

    let (mut child, clients, _logs) = spawn_esq_dev(dir.path(), "plain", "warn").await;
    for id in &carts {
        let events = suite::read_all(&clients, "cart", id).await;
        let versions: Vec<u64> = events.iter().map(|e| e.version).collect();
        let contiguous: Vec<u64> = (1..=events.len() as u64).collect();
        assert_eq!(versions, contiguous, "cart {id}: versions with a gap");
        let mine: Vec<_> = acked.iter().filter(|(c, ..)| c == id).collect();
        let newest = mine.iter().map(|(_, v, _)| *v).max().unwrap_or(0);
        for (_, version, sku) in &mine {
            let e = events
                .get(*version as usize - 1)
                .unwrap_or_else(|| panic!("cart {id}: acknowledged version {version} lost"));
            let payload = match &e.payload {
                Some(esq::pb::v1::recorded_event::Payload::Json(j)) => j.clone(),
                Some(esq::pb::v1::recorded_event::Payload::Data(d)) => {
                    String::from_utf8_lossy(d).into_owned()
                }
                None => String::new(),
            };
            assert!(
                payload.contains(sku.as_str()),
                "cart {id} version {version} does not hold the acknowledged {sku}"
            );
        }
        let got = clients
            .cart_queries
            .clone()
            .get_cart(cart::GetCartRequest {
                cart_id: id.clone(),
                min_version: newest,
            })
            .await
            .expect("get cart after the restart")
            .into_inner();
        for (_, _, sku) in &mine {
            assert!(
                got.items.iter().any(|i| &i.sku == sku),
                "cart {id}: the rebuilt read model lacks the acknowledged {sku}"
            );
        }
    }
    child.start_kill().expect("stop");
    child.wait().await.expect("reap");
}

/// Stopping and restarting the stack keeps every event and rebuilds the same query results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_events_and_rebuilds_queries() {
    use esq::pb::bookshop::v1 as book;
    use esq::pb::cart::v1 as cart;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = DevHarness::start_in(dir.path()).await.expect("start");
    let mut carts = Vec::new();
    let mut last = 0;
    for i in 0..5 {
        let id = suite::unique("cart");
        for sku in ["a", "b", "c"].iter().take(i % 3 + 1) {
            last = h
                .clients
                .carts
                .clone()
                .add_item(crate::suite::add(&id, sku, i as i64 + 1, 99))
                .await
                .expect("add")
                .into_inner()
                .version;
        }
        carts.push(id);
    }
    let isbn = h
        .clients
        .books
        .clone()
        .create_book(book::CreateBookRequest {
            isbn: "0-306-40615-2".into(),
            title: "T".into(),
            author: "A".into(),
            price_cents: 5,
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner()
        .isbn;
    // Wait for the read model to catch up before taking the snapshot.
    h.clients
        .cart_queries
        .clone()
        .get_cart(cart::GetCartRequest {
            cart_id: carts[4].clone(),
            min_version: last,
        })
        .await
        .expect("caught up");
    h.clients
        .book_queries
        .clone()
        .get_book(book::GetBookRequest {
            isbn: isbn.clone(),
            min_version: 1,
        })
        .await
        .expect("caught up");
    let before = suite::snapshot(&h.clients, &carts, std::slice::from_ref(&isbn)).await;
    let events_before: Vec<_> = {
        let mut all = Vec::new();
        for id in &carts {
            all.extend(suite::read_all(&h.clients, "cart", id).await);
        }
        all
    };
    h.restart().await.expect("restart");
    let after = suite::snapshot(&h.clients, &carts, std::slice::from_ref(&isbn)).await;
    assert_eq!(before, after);
    let mut events_after = Vec::new();
    for id in &carts {
        events_after.extend(suite::read_all(&h.clients, "cart", id).await);
    }
    assert_eq!(events_before, events_after);
    h.stop().await.expect("stop");
}

/// A saved timeline survives a restart of the stack: it is an event in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saved_timelines_survive_a_restart() {
    use esq::pb::v1 as pb;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = DevHarness::start_in(dir.path()).await.expect("start");
    let id = suite::unique("order");
    h.clients
        .events
        .clone()
        .append(pb::AppendRequest {
            stream: suite::stream("order", &id),
            expected_version: suite::any(),
            events: vec![suite::json_event("Set", r#"{"a":1}"#)],
        })
        .await
        .expect("append");
    let name = suite::unique("kept");
    let edits = vec![pb::TimelineEdit {
        edit: Some(pb::timeline_edit::Edit::Skip(pb::timeline_edit::Skip {
            version: 1,
        })),
    }];
    h.clients
        .events
        .clone()
        .save_timeline(pb::SaveTimelineRequest {
            name: name.clone(),
            stream: suite::stream("order", &id),
            edits: edits.clone(),
        })
        .await
        .expect("save");
    h.restart().await.expect("restart");
    let got = h
        .clients
        .events
        .clone()
        .get_timeline(pb::GetTimelineRequest { name: name.clone() })
        .await
        .expect("get after restart")
        .into_inner();
    assert_eq!((got.edits, got.revision), (edits, 1));
    let p = h
        .clients
        .events
        .clone()
        .replay_preview(pb::ReplayPreviewRequest {
            timeline: name,
            ..Default::default()
        })
        .await
        .expect("preview after restart")
        .into_inner();
    assert!(p.timeline.is_empty() && !p.state_after.contains_key("f.a"));
    h.stop().await.expect("stop");
}
