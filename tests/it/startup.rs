//! How the service binaries start: a bad configuration stops them at once with its reason, an
//! unreachable store is waited for. No backend is needed: the configuration is checked before
//! anything is connected, and the unreachable store is a closed port.

use esq_testkit::cluster::bin_dir;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// A loopback address nothing listens on.
fn closed_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

fn service(name: &str, timeout_ms: u64, deadline_ms: u64) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(bin_dir().expect("bin dir").join(name));
    cmd.env_clear()
        .env("ESQ_INSECURE", "true")
        .env("ESQ_CQL_NODES", closed_addr())
        .env("ESQ_CQL_TIMEOUT_MS", timeout_ms.to_string())
        .env("ESQ_CONFIDENCE_WINDOW_MS", "1000")
        .env("ESQ_APPEND_DEADLINE_MS", deadline_ms.to_string())
        .env("ESQ_REDIS_URL", "redis://127.0.0.1:1")
        .env("ESQ_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// An append deadline that breaks the timing rule (≥ 2 × request timeout + confidence window)
/// makes write-svc and the projector exit non-zero at once, saying why on stderr — not retry
/// forever as if the cluster were down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_exits_at_once_with_the_reason() {
    for name in ["write-svc", "projector"] {
        let mut child = service(name, 5000, 6000).spawn().expect("start the binary");
        let mut stderr = child.stderr.take().expect("stderr");
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .unwrap_or_else(|_| panic!("{name} with a bad append deadline is still running"))
            .expect("wait");
        let mut text = String::new();
        stderr.read_to_string(&mut text).await.expect("read stderr");
        assert!(!status.success(), "{name} exited with {status}: {text}");
        assert!(
            text.contains("append_deadline (6000 ms)") && text.contains("request_timeout"),
            "{name}: the reason is on stderr: {text}"
        );
        assert!(
            !text.contains("cannot connect"),
            "{name}: a bad configuration is not retried: {text}"
        );
    }
}

/// With a valid configuration and the cluster unreachable, write-svc keeps trying to connect
/// (it may start before its store) instead of exiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_is_waited_for() {
    let mut child = service("write-svc", 1000, 3000)
        .spawn()
        .expect("start write-svc");
    let mut stderr = child.stderr.take().expect("stderr");
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        // Two failed attempts logged, so it did retry.
        while text.matches("cannot connect to the event store").count() < 2 {
            let n = stderr.read(&mut buf).await.expect("read stderr");
            assert!(n > 0, "write-svc exited: {text}");
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await;
    assert!(waited.is_ok(), "no retry logged within 60 s: {text}");
    assert!(
        text.contains("insecure mode: plaintext (no TLS)")
            && text.contains("insecure mode: no authentication"),
        "--insecure is logged: {text}"
    );
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "still running"
    );
    child.kill().await.expect("kill write-svc");
}

/// Runs `cmd` to its end (bounded), returning whether it succeeded and its stderr.
async fn exit_of(name: &str, mut cmd: tokio::process::Command) -> (bool, String) {
    let mut child = cmd.spawn().expect("start the binary");
    let mut stderr = child.stderr.take().expect("stderr");
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .unwrap_or_else(|_| panic!("{name} is still running"))
        .expect("wait");
    let mut text = String::new();
    stderr.read_to_string(&mut text).await.expect("read stderr");
    (status.success(), text)
}

/// Without TLS files and without `--insecure` no server starts: each exits non-zero at once,
/// naming the flags; a TLS file that cannot be read stops it too, naming the flag and the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_refuse_to_start_without_tls_unless_insecure() {
    for name in ["write-svc", "read-svc", "projector"] {
        let mut cmd = service(name, 1000, 3000);
        cmd.env_remove("ESQ_INSECURE");
        let (ok, text) = exit_of(name, cmd).await;
        assert!(!ok, "{name} started without TLS: {text}");
        assert!(
            text.contains("--tls-cert") && text.contains("--insecure"),
            "{name}: the flags are named: {text}"
        );
        assert!(!text.contains("cannot connect"), "{name}: {text}");

        let mut cmd = service(name, 1000, 3000);
        cmd.env_remove("ESQ_INSECURE")
            .env("ESQ_TLS_CERT", "/nonexistent/esq-cert.pem")
            .env("ESQ_TLS_KEY", "/nonexistent/esq-key.pem");
        let (ok, text) = exit_of(name, cmd).await;
        assert!(!ok, "{name} started with a missing certificate: {text}");
        assert!(
            text.contains("--tls-cert") && text.contains("/nonexistent/esq-cert.pem"),
            "{name}: the flag and the file are named: {text}"
        );
    }
}
