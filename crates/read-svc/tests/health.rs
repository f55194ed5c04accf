//! read-svc health against a real Redis (`ESQ_TEST_REDIS`, e.g. `redis://127.0.0.1:6390`)
//! reached through a TCP proxy the test can cut. A missing variable fails the test unless
//! `ESQ_SKIP_REAL_BACKENDS=1`, which skips it and says so.

use esq_readstore::redis::{RedisConfig, RedisStore};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

fn redis_url(test: &str) -> Option<String> {
    match std::env::var("ESQ_TEST_REDIS") {
        Ok(v) if !v.trim().is_empty() => Some(v.trim().to_owned()),
        _ if std::env::var("ESQ_SKIP_REAL_BACKENDS").as_deref() == Ok("1") => {
            eprintln!("{test}: SKIPPED by request (ESQ_SKIP_REAL_BACKENDS=1)");
            None
        }
        _ => panic!(
            "{test} needs a real Redis: set ESQ_TEST_REDIS (scripts/redis.sh start prints it), \
             or ESQ_SKIP_REAL_BACKENDS=1 to skip"
        ),
    }
}

/// A TCP proxy that can be cut (existing connections closed, new ones refused) and restored.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    cut: Arc<Mutex<CancellationToken>>,
}

impl Proxy {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let up = Arc::new(AtomicBool::new(true));
        let cut = Arc::new(Mutex::new(CancellationToken::new()));
        let (u, c) = (Arc::clone(&up), Arc::clone(&cut));
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                if !u.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is closed at once
                }
                let token = c.lock().expect("lock").clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        () = token.cancelled() => {}
                    }
                });
            }
        });
        Self { addr, up, cut }
    }

    fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        let mut cut = self.cut.lock().expect("lock");
        cut.cancel();
        *cut = CancellationToken::new();
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

async fn wait_for(
    health: &mut HealthClient<tonic::transport::Channel>,
    want: ServingStatus,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: "esq.v1.StateQueries".into(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status();
        if status == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "health still {status:?} after {within:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Health reports NOT_SERVING while Redis is unreachable and SERVING again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_read_store() {
    let Some(url) = redis_url("health_follows_the_read_store") else {
        return;
    };
    let upstream = url
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .expect("host:port")
        .to_owned();
    let proxy = Proxy::start(upstream).await;
    let store = RedisStore::connect(RedisConfig {
        urls: vec![format!("redis://{}", proxy.addr)],
        cluster: false,
        prefix: "esq-health-test".into(),
        timeout: Duration::from_millis(500),
        access: Default::default(),
    })
    .await
    .expect("connect to Redis");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let config = esq_read_svc::Config {
        health_probe: Duration::from_millis(200),
        shutdown_grace: Duration::from_secs(2),
        ..esq_read_svc::Config::default()
    };
    let deps = esq_read_svc::Deps {
        read: Arc::new(store),
        history: None::<Arc<esq_eventstore::embedded::EmbeddedStore>>,
    };
    let server = tokio::spawn(esq_read_svc::run(listener, deps, config, shutdown.clone()));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel);
    wait_for(&mut health, ServingStatus::Serving, Duration::from_secs(20)).await;
    proxy.down();
    let took = wait_for(
        &mut health,
        ServingStatus::NotServing,
        Duration::from_secs(20),
    )
    .await;
    eprintln!("NOT_SERVING {took:?} after Redis became unreachable");
    proxy.restore();
    let took = wait_for(&mut health, ServingStatus::Serving, Duration::from_secs(60)).await;
    eprintln!("SERVING {took:?} after Redis came back");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), server)
        .await
        .expect("stops")
        .expect("join")
        .expect("serve");
}
