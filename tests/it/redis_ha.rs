//! Redis Cluster failover under load: a deployment on the HA cluster (3 masters, 3 replicas;
//! `scripts/redis.sh start-cluster-ha`, named by `ESQ_TEST_REDIS_CLUSTER_HA`) with
//! `--redis-wait-replicas 1`, a master killed with SIGKILL while cart commands are being
//! projected. Nothing acknowledged may be missing from the read model afterwards, nothing may
//! be applied twice (derived totals would show it), and the same projector and read-svc
//! processes follow the new topology. The killed node is restarted at the end and the cluster
//! left healthy (3 masters with a replica each) for the tests that run on it next.

use crate::cluster::assert_read_model_equals_fold;
use crate::suite::{add, checkout, unique};
use esq::pb::cart::v1 as cart;
use esq_testkit::cluster::{wait_serving, Backends, ClusterHarness, ClusterOptions};
use esq_testkit::redis_ha::RedisHa;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::Code;

/// Commands (and read-your-writes queries) of one writer until `stop`: carts of 4 AddItems
/// and a Checkout each. Returns the carts it wrote and how the queries ended
/// (answered, failed with a clear status).
async fn writer(
    h: &esq_testkit::Clients,
    acked: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> (Vec<String>, usize, usize) {
    let mut carts = h.carts.clone();
    let mut queries = h.cart_queries.clone();
    let (mut ids, mut answered, mut failed) = (Vec::new(), 0, 0);
    while !stop.load(Ordering::Relaxed) {
        let id = unique("ha");
        ids.push(id.clone());
        for step in 0..5u64 {
            let command_id = unique("cmd");
            // Retried with the same command id: a committed original answers as success.
            let deadline = Instant::now() + Duration::from_secs(60);
            let version = loop {
                let r = if step < 4 {
                    let mut req = add(&id, &format!("sku-{}", step % 3), 1 + step as i64, 100);
                    req.command_id = command_id.clone();
                    carts.add_item(req).await
                } else {
                    let mut req = checkout(&id);
                    req.command_id = command_id.clone();
                    carts.checkout(req).await
                };
                match r {
                    Ok(r) => break r.into_inner().version,
                    Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(s) => panic!("command on {id}: {s:?}"),
                }
            };
            acked.fetch_add(1, Ordering::Relaxed);
            // Read your write: the version asked for or later, or a clear failure status;
            // never an older version.
            match queries
                .get_cart(cart::GetCartRequest {
                    cart_id: id.clone(),
                    min_version: version,
                })
                .await
            {
                Ok(c) => {
                    let c = c.into_inner();
                    assert!(
                        c.version >= version,
                        "{id}: asked for version {version}, got {}",
                        c.version
                    );
                    answered += 1;
                }
                Err(s) => {
                    assert!(
                        matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded),
                        "{id}: read-your-writes query failed with an unclear status: {s:?}"
                    );
                    failed += 1;
                }
            }
        }
    }
    (ids, answered, failed)
}

/// Whether process `pid` is alive (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_killed_under_load_loses_no_apply() {
    const TEST: &str = "master_killed_under_load_loses_no_apply";
    let Some(ha) = RedisHa::from_env(TEST) else {
        return;
    };
    let Some(backends) = Backends::from_env(TEST) else {
        return;
    };
    let started = Instant::now();
    // A previous test (or run) may have left a failover settling.
    ha.wait_healthy(Duration::from_secs(120))
        .await
        .expect("the HA cluster is healthy before the test");
    let backends = Backends {
        cassandra: backends.cassandra,
        redis: ha.urls().to_owned(),
    };
    let options = ClusterOptions {
        env: vec![("ESQ_REDIS_WAIT_REPLICAS".to_owned(), "1".to_owned())],
        ..ClusterOptions::default()
    }
    .redis_cluster();
    let h = ClusterHarness::start(backends, options)
        .await
        .unwrap_or_else(|e| panic!("{TEST}: cannot start the deployment: {e:#}"));
    eprintln!("logs in {}", h.logs().display());
    let projector_pid = h.projectors[0].pid().expect("projector pid");
    let reader_pid = h
        .reader
        .as_ref()
        .and_then(|r| r.pid())
        .expect("read-svc pid");

    let acked = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..6)
        .map(|_| {
            let (c, acked, stop) = (h.clients.clone(), Arc::clone(&acked), Arc::clone(&stop));
            tokio::spawn(async move { writer(&c, acked, stop).await })
        })
        .collect();
    let wait_acked = |n: usize| {
        let acked = Arc::clone(&acked);
        async move {
            let deadline = Instant::now() + Duration::from_secs(300);
            while acked.load(Ordering::Relaxed) < n {
                assert!(
                    Instant::now() < deadline,
                    "the load stalled below {n} commands"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_acked(150).await;
    let masters = ha.masters().await.expect("masters");
    assert_eq!(masters.len(), 3, "masters before the kill: {masters:?}");
    let victim = masters[0];
    ha.kill(victim).await.expect("kill a master");
    let killed_at = Instant::now();
    let acked_at_kill = acked.load(Ordering::Relaxed);
    ha.wait_failover(victim, Duration::from_secs(120))
        .await
        .expect("failover");
    let failover = killed_at.elapsed();
    let after = ha.masters().await.expect("masters");
    assert!(
        !after.contains(&victim),
        "{victim} still a master: {after:?}"
    );
    // The load goes on past the failover.
    let acked_at_failover = acked.load(Ordering::Relaxed);
    wait_acked(acked_at_failover + 150).await;
    stop.store(true, Ordering::Relaxed);
    let (mut carts, mut answered, mut failed) = (Vec::new(), 0, 0);
    for w in writers {
        let (ids, a, f) = w.await.expect("writer");
        carts.extend(ids);
        answered += a;
        failed += f;
    }
    let total = acked.load(Ordering::Relaxed);
    eprintln!(
        "{total} commands on {} carts; master {victim} killed after {acked_at_kill}, failover \
         in {failover:?}; read-your-writes queries: {answered} answered, {failed} failed \
         with UNAVAILABLE/DEADLINE_EXCEEDED",
        carts.len()
    );

    // Every acknowledged command is in the read model, nothing twice.
    assert_read_model_equals_fold(&h.clients, &carts).await;
    let esq = crate::operator::Esq::new(h.writers[0].addr, h.projectors[0].addr);
    for projection in ["cart2", "state", "sku_sales"] {
        let report = esq.json(0, &["projections", "verify", projection]).await;
        assert_eq!(report["clean"], true, "verify {projection}: {report}");
    }
    // The same processes followed the new topology.
    assert_eq!(h.projectors[0].pid(), Some(projector_pid));
    assert_eq!(h.reader.as_ref().and_then(|r| r.pid()), Some(reader_pid));
    assert!(alive(projector_pid), "the projector died");
    assert!(alive(reader_pid), "read-svc died");
    for addr in [h.projectors[0].addr, h.read_addr()] {
        wait_serving(addr, Duration::from_secs(60))
            .await
            .expect("serving after the failover");
    }

    // Back to 3 masters with a replica each: the killed node rejoins as a replica.
    ha.restart(victim).await.expect("restart the killed node");
    ha.wait_healthy(Duration::from_secs(120))
        .await
        .expect("the HA cluster is healthy again");
    let masters = ha.masters().await.expect("masters");
    assert!(!masters.contains(&victim), "{victim} came back as a master");
    eprintln!("{TEST}: {:?} in all", started.elapsed());
}
