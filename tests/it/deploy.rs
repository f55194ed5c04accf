//! The Helm chart's pod environment on the real binaries: write-svc, the projector and read-svc
//! started as processes with the `ESQ_*` variables the chart renders when TLS (mutual TLS) and
//! tokens are on — certificate and token files, and `ESQ_HEALTH_LISTEN`, the plaintext
//! health-only port the kubelet's gRPC probes use — against the real Cassandra and Redis.
//!
//! What the probes see is checked over loopback the way the kubelet does it: a plaintext gRPC
//! health check on the health port, and nothing else served there; the main port refuses
//! plaintext and answers TLS clients.

use esq_testkit::cluster::{bin_dir, free_addr, wait_serving, Backends};
use esq_testkit::pki::TestPki;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

/// One service process started with the chart's environment.
struct Pod {
    name: &'static str,
    grpc: SocketAddr,
    health: SocketAddr,
    log: std::path::PathBuf,
    child: Child,
}

impl Pod {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The chart's environment for one component (see deploy/helm/esq/templates/_helpers.tpl),
/// with loopback addresses instead of the pod's, and this test's keyspace and prefix.
fn spawn(
    name: &'static str,
    backends: &Backends,
    keyspace: &str,
    prefix: &str,
    pki: &TestPki,
    tokens: &std::path::Path,
    logs: &std::path::Path,
) -> Pod {
    let grpc = free_addr().expect("a free port");
    let health = free_addr().expect("a free port");
    let log = logs.join(format!("{name}.log"));
    let file = std::fs::File::create(&log).expect("log file");
    let mut cmd = Command::new(bin_dir().expect("bin dir").join(name));
    cmd.env_clear()
        // The ConfigMap.
        .env("RUST_LOG", "info")
        .env("LOG_FORMAT", "plain")
        .env("ESQ_CQL_NODES", &backends.cassandra)
        .env("ESQ_CQL_KEYSPACE", keyspace)
        // The chart's default replication (NetworkTopologyStrategy, 3 replicas) needs three
        // nodes; the test's one node gets a single replica.
        .env(
            "ESQ_CQL_REPLICATION",
            "{'class': 'NetworkTopologyStrategy', 'datacenter1': 1}",
        )
        .env("ESQ_CQL_CONSISTENCY", "local-quorum")
        .env("ESQ_CQL_SERIAL_CONSISTENCY", "local-serial")
        .env("ESQ_CQL_TIMEOUT_MS", "5000")
        .env("ESQ_CONFIDENCE_WINDOW_MS", "1000")
        .env("ESQ_APPEND_DEADLINE_MS", "15000")
        .env("ESQ_SHARDS", "2")
        .env("ESQ_REDIS_URL", &backends.redis)
        .env("ESQ_REDIS_PREFIX", prefix)
        .env("ESQ_NUDGE_CHANNEL", format!("{prefix}:nudge"))
        .env("ESQ_MAX_CONCURRENT_CALLS", "1024")
        .env("ESQ_DEFAULT_DEADLINE", "30s")
        // The Deployment's own env.
        .env("ESQ_LISTEN", grpc.to_string())
        .env("ESQ_HEALTH_LISTEN", health.to_string())
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log file"))
        .stderr(file)
        .kill_on_drop(true);
    // The mounted TLS Secret, with ca.crt for mutual TLS (tls.clientCa: true), and the mounted
    // token file.
    for (k, v) in pki.server_env(true) {
        cmd.env(k, v);
    }
    cmd.env("ESQ_AUTH_TOKENS", tokens);
    match name {
        "write-svc" => {
            cmd.env("ESQ_SNAPSHOT_EVERY", "100")
                .env("ESQ_NUDGE_URL", &backends.redis);
        }
        "read-svc" => {
            cmd.env("ESQ_MAX_WAIT_MS", "5000")
                .env("ESQ_WAIT_RECHECK_MS", "1000");
        }
        "projector" => {
            cmd.env("ESQ_PROJECTOR_ID", format!("{prefix}-p0"))
                .env("ESQ_POLL_INTERVAL_MS", "250")
                .env("ESQ_LEASE_TTL_MS", "10000");
        }
        other => panic!("no such component {other}"),
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name} (cargo build --workspace --bins): {e}"));
    Pod {
        name,
        grpc,
        health,
        log,
        child,
    }
}

/// A plaintext health check, as the kubelet's gRPC probe makes it.
async fn probe(addr: SocketAddr) -> Result<ServingStatus, String> {
    let channel = esq_testkit::channel(addr)
        .await
        .map_err(|e| format!("connect: {e:#}"))?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|e| format!("check: {e}"))?
        .into_inner()
        .status();
    Ok(status)
}

/// Every component started with the chart's TLS environment answers the kubelet's plaintext
/// probe on its health-only port, serves nothing else there, and serves TLS (not plaintext)
/// on its gRPC port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_chart_environment_probes_the_health_port_with_tls() {
    let Some(backends) =
        Backends::from_env("cluster_chart_environment_probes_the_health_port_with_tls")
    else {
        return;
    };
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let keyspace = format!("esq_t{}", &tag[..16]);
    let prefix = format!("esqt{}", &tag[..16]);
    let logs = std::env::temp_dir().join("esq-test-logs").join(&keyspace);
    std::fs::create_dir_all(&logs).expect("log folder");
    let pki = TestPki::generate().expect("a loopback PKI");
    // A token file in the contract's format (`<role> <sha256-hex> <name>`); the hash is of no
    // token anyone holds: probes need none, health being open.
    let tokens = logs.join("tokens");
    std::fs::write(
        &tokens,
        format!(
            "# the chart's auth Secret\nreader {}1 nobody\n",
            "0".repeat(63)
        ),
    )
    .expect("token file");

    // write-svc creates the schema; the others start once it serves.
    let mut pods = vec![spawn(
        "write-svc",
        &backends,
        &keyspace,
        &prefix,
        &pki,
        &tokens,
        &logs,
    )];
    let ready = wait_serving(pods[0].health, Duration::from_secs(120)).await;
    assert!(ready.is_ok(), "{ready:?}\n{}", pods[0].log());
    for name in ["projector", "read-svc"] {
        pods.push(spawn(
            name, &backends, &keyspace, &prefix, &pki, &tokens, &logs,
        ));
    }
    for pod in &pods {
        let ready = wait_serving(pod.health, Duration::from_secs(120)).await;
        assert!(ready.is_ok(), "{}: {ready:?}\n{}", pod.name, pod.log());
    }

    let client = pki.client();
    for pod in &pods {
        let name = pod.name;
        // The probe's view: SERVING, in plaintext, without a client certificate or token.
        assert_eq!(
            probe(pod.health).await.expect("plaintext probe"),
            ServingStatus::Serving,
            "{name}"
        );
        // The health port serves health alone: no reflection, no esq API.
        let channel = esq_testkit::channel(pod.health).await.expect("connect");
        let reflection = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter([
                tonic_reflection::pb::v1::ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(
                        tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                            String::new(),
                        ),
                    ),
                },
            ]))
            .await
            .expect_err("no reflection on the health port");
        assert_eq!(
            reflection.code(),
            tonic::Code::Unimplemented,
            "{name}: {reflection:?}"
        );
        // The gRPC port refuses plaintext ...
        let plain = tokio::time::timeout(Duration::from_secs(20), probe(pod.grpc))
            .await
            .expect("a plaintext attempt on the TLS port ends");
        assert!(
            plain.is_err(),
            "{name}: plaintext health on the TLS port: {plain:?}"
        );
        // ... and answers a TLS client with the CA's client certificate (mutual TLS).
        let tls = esq_testkit::tls_channel(pod.grpc, &client)
            .await
            .expect("TLS connect");
        let status = HealthClient::new(tls)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health over TLS")
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{name}");
    }
    for mut pod in pods {
        let _ = pod.child.start_kill();
        let _ = pod.child.wait().await;
    }
}
