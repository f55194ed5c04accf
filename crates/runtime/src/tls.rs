//! Server-side TLS for our gRPC servers: a rustls configuration built from PEM files (ring
//! provider, ALPN `h2`, TLS 1.2 and 1.3), optional client authentication (mTLS) against a CA,
//! and reloading when the files change.
//!
//! - [`ServerTls::load`] reads `--tls-cert` (the chain, leaf first), `--tls-key` and, when given,
//!   `--tls-client-ca`: with it, every client must present a certificate signed by that CA, or
//!   the handshake fails.
//! - [`ServerTls::spawn_reloader`] re-reads the files every [`DEFAULT_RELOAD_INTERVAL`] and,
//!   when their contents changed, swaps the configuration used by new handshakes; connections
//!   already open keep the one they were made with. A new set that does not load (a key that
//!   does not match its certificate, a half-written file) keeps the old configuration and is
//!   logged as an error; the next change is tried again.
//! - Handshakes run in their own tasks (see [`accept_tls`]), never in the accept loop, each bounded
//!   by [`ServerTls::handshake_timeout`], and at most [`ServerTls::max_handshakes`] at once:
//!   a client that connects and says nothing cannot stall accepting, nor hold resources for
//!   long. Failed handshakes are logged at debug (they are the client's business).
//!
//! The files are read with `tokio::fs`, never blocking a runtime thread.

use crate::incoming::{Conn, Incoming};
use anyhow::Context as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// How often the files are checked for changes, by default.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// Longest a TLS handshake may take before the connection is dropped, by default.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most TLS handshakes in flight at once, by default; connections beyond it are closed at once
/// (a flood of silent connections costs descriptors for at most the handshake timeout).
pub const DEFAULT_MAX_HANDSHAKES: usize = 1024;
/// Handshaken connections waiting for the server to take them.
const READY_QUEUE: usize = 64;

/// Where the PEM files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain (`--tls-cert`), leaf first.
    pub cert: PathBuf,
    /// The server's private key (`--tls-key`): PKCS#8, PKCS#1 or SEC1.
    pub key: PathBuf,
    /// CA certificates that sign client certificates (`--tls-client-ca`); when set, clients
    /// must present one (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// The files' contents, as last loaded: a reload only builds a configuration when they differ.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

/// Reloadable server TLS. Cloning shares the configuration.
#[derive(Clone)]
pub struct ServerTls {
    files: Arc<TlsFiles>,
    current: Arc<RwLock<Arc<ServerConfig>>>,
    loaded: Arc<Mutex<Contents>>,
    /// How often [`ServerTls::spawn_reloader`] checks the files.
    pub reload_interval: Duration,
    /// Longest a handshake may take.
    pub handshake_timeout: Duration,
    /// Most handshakes in flight at once.
    pub max_handshakes: usize,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .field("reload_interval", &self.reload_interval)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("max_handshakes", &self.max_handshakes)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the files; the error names the flag and the file that is wrong.
    pub async fn load(files: TlsFiles) -> anyhow::Result<Self> {
        let contents = read(&files).await?;
        let config = build(&files, &contents)?;
        Ok(Self {
            files: Arc::new(files),
            current: Arc::new(RwLock::new(config)),
            loaded: Arc::new(Mutex::new(contents)),
            reload_interval: DEFAULT_RELOAD_INTERVAL,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
        })
    }

    /// The files this configuration comes from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The configuration new handshakes use.
    pub fn config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Re-reads the files; when their contents changed and load, new handshakes use them.
    /// Returns whether the configuration changed; on error the old one stays.
    pub async fn reload(&self) -> anyhow::Result<bool> {
        let contents = read(&self.files).await?;
        if *self.loaded.lock().unwrap_or_else(|e| e.into_inner()) == contents {
            return Ok(false);
        }
        let config = build(&self.files, &contents)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        *self.loaded.lock().unwrap_or_else(|e| e.into_inner()) = contents;
        Ok(true)
    }

    /// Spawns the task that reloads the files every [`ServerTls::reload_interval`] until
    /// `shutdown`; a change is logged at info, a file that does not load at error (once per
    /// distinct error, so a lasting mistake does not flood the log).
    pub fn spawn_reloader(&self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let tls = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(tls.reload_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            let mut last_error = None;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = shutdown.cancelled() => return,
                }
                match tls.reload().await {
                    Ok(true) => {
                        last_error = None;
                        tracing::info!(cert = %tls.files.cert.display(), "TLS files changed: new connections use them");
                    }
                    Ok(false) => last_error = None,
                    Err(e) => {
                        let message = format!("{e:#}");
                        if last_error.as_ref() != Some(&message) {
                            tracing::error!(error = %message, "TLS files changed but do not load: keeping the previous certificate");
                            last_error = Some(message);
                        }
                    }
                }
            }
        })
    }
}

async fn read_file(flag: &str, path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    tokio::fs::read(path)
        .await
        .with_context(|| format!("cannot read {flag} file {}", path.display()))
}

async fn read(files: &TlsFiles) -> anyhow::Result<Contents> {
    Ok(Contents {
        cert: read_file("--tls-cert", &files.cert).await?,
        key: read_file("--tls-key", &files.key).await?,
        client_ca: match &files.client_ca {
            Some(path) => Some(read_file("--tls-client-ca", path).await?),
            None => None,
        },
    })
}

fn certs(
    flag: &str,
    path: &std::path::Path,
    pem: &[u8],
) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{flag} file {} is not valid PEM", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{flag} file {} holds no certificate (expected PEM `BEGIN CERTIFICATE` blocks)",
        path.display()
    );
    Ok(certs)
}

/// Builds the rustls configuration; errors name the flag and the file.
fn build(files: &TlsFiles, contents: &Contents) -> anyhow::Result<Arc<ServerConfig>> {
    let chain = certs("--tls-cert", &files.cert, &contents.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&contents.key).with_context(|| {
        format!(
            "--tls-key file {} holds no usable private key (expected PEM PKCS#8, PKCS#1 or SEC1)",
            files.key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match (&files.client_ca, &contents.client_ca) {
        (Some(path), Some(pem)) => {
            let mut roots = RootCertStore::empty();
            for cert in certs("--tls-client-ca", path, pem)? {
                roots.add(cert).with_context(|| {
                    format!(
                        "--tls-client-ca file {} holds an unusable CA certificate",
                        path.display()
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .with_context(|| format!("--tls-client-ca file {}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).with_context(|| {
        format!(
            "--tls-key file {} does not fit the certificate in --tls-cert file {}",
            files.key.display(),
            files.cert.display()
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Turns accepted TCP connections into TLS ones: a task takes connections from `incoming` and
/// hands each to its own handshake task (bounded in time and number, see [`ServerTls`]); the
/// returned receiver yields the connections whose handshake succeeded. The accept task ends,
/// closing the listener, when the receiver is dropped.
pub fn accept_tls(mut incoming: Incoming, tls: ServerTls) -> mpsc::Receiver<TlsStream<Conn>> {
    use tokio_stream::StreamExt as _;
    let (tx, rx) = mpsc::channel(READY_QUEUE);
    let handshakes = Arc::new(Semaphore::new(tls.max_handshakes.max(1)));
    tokio::spawn(async move {
        // Whether the handshake bound is reached: logged once per episode, not per connection.
        let mut saturated = false;
        loop {
            let conn = tokio::select! {
                next = incoming.next() => match next {
                    Some(Ok(conn)) => conn,
                    // The stream never ends nor fails; stop if it ever does.
                    _ => return,
                },
                () = tx.closed() => return,
            };
            let Ok(permit) = Arc::clone(&handshakes).try_acquire_owned() else {
                if !std::mem::replace(&mut saturated, true) {
                    tracing::warn!(
                        max = tls.max_handshakes,
                        "too many TLS handshakes in flight: closing new connections"
                    );
                }
                continue;
            };
            saturated = false;
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let (tx, timeout) = (tx.clone(), tls.handshake_timeout);
            tokio::spawn(async move {
                let peer = conn.tcp().peer_addr().ok();
                match tokio::time::timeout(timeout, acceptor.accept(conn)).await {
                    Ok(Ok(stream)) => {
                        drop(permit);
                        let _ = tx.send(stream).await;
                    }
                    Ok(Err(e)) => tracing::debug!(?peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(?peer, ?timeout, "TLS handshake timed out"),
                }
            });
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, CertPair, LoopbackPki};
    use crate::{serve_grpc, GrpcOptions};
    use std::net::SocketAddr;
    use tokio::net::{TcpListener, TcpStream};
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    /// Bound of every wait in these tests: generous, for a busy machine.
    const WAIT: Duration = Duration::from_secs(60);

    struct Server {
        addr: SocketAddr,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<anyhow::Result<()>>,
    }

    impl Server {
        async fn start(tls: ServerTls) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let shutdown = CancellationToken::new();
            let mut options = GrpcOptions::new(&["test.Service"]);
            options.tls = Some(tls);
            options.grace = Duration::from_secs(1);
            let task = tokio::spawn(serve_grpc(
                listener,
                tonic::service::Routes::default(),
                options,
                shutdown.clone(),
            ));
            Self {
                addr,
                shutdown,
                task,
            }
        }

        async fn stop(self) {
            self.shutdown.cancel();
            tokio::time::timeout(WAIT, self.task)
                .await
                .expect("the server stops")
                .expect("join")
                .expect("serve");
        }
    }

    fn write_pki(dir: &std::path::Path, pki: &LoopbackPki, mtls: bool) -> TlsFiles {
        let files = pki.write(dir).expect("write the PKI");
        TlsFiles {
            cert: files.server_cert,
            key: files.server_key,
            client_ca: mtls.then_some(files.ca),
        }
    }

    fn client(ca: &Ca, identity: Option<&CertPair>) -> ClientTlsConfig {
        let config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca.cert_pem))
            .domain_name("localhost");
        match identity {
            Some(id) => config.identity(Identity::from_pem(&id.cert_pem, &id.key_pem)),
            None => config,
        }
    }

    /// A health check over a fresh connection: Ok when the server answered SERVING.
    async fn check(addr: SocketAddr, tls: Option<ClientTlsConfig>) -> Result<(), String> {
        let endpoint = match tls {
            Some(tls) => Endpoint::from_shared(format!("https://{addr}"))
                .expect("endpoint")
                .tls_config(tls)
                .expect("tls config"),
            None => Endpoint::from_shared(format!("http://{addr}")).expect("endpoint"),
        };
        let call = async {
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| format!("connect: {e:?}"))?;
            health(channel).await
        };
        tokio::time::timeout(WAIT, call)
            .await
            .unwrap_or_else(|_| Err("no answer".into()))
    }

    async fn health(channel: tonic::transport::Channel) -> Result<(), String> {
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: "test.Service".into(),
            })
            .await
            .map_err(|e| format!("call: {e:?}"))?
            .into_inner()
            .status;
        (status == 1)
            .then_some(())
            .ok_or_else(|| format!("status {status}"))
    }

    /// The certificate a new TLS connection to `addr` is shown (DER), trusting `ca`.
    async fn presented(addr: SocketAddr, ca: &Ca) -> Vec<u8> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca.cert_pem.as_bytes()) {
            roots.add(cert.expect("pem")).expect("root");
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let tls = tokio::time::timeout(WAIT, connector.connect(name, tcp))
            .await
            .expect("handshake in time")
            .expect("handshake");
        tls.get_ref().1.peer_certificates().expect("a certificate")[0].to_vec()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_calls_work_and_plaintext_clients_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = LoopbackPki::generate().expect("pki");
        let tls = ServerTls::load(write_pki(dir.path(), &pki, false))
            .await
            .expect("load");
        let server = Server::start(tls).await;
        check(server.addr, Some(client(&pki.ca, None)))
            .await
            .expect("a TLS call is answered");
        let plain = check(server.addr, None).await;
        assert!(plain.is_err(), "a plaintext client got an answer");
        // A client that does not trust the server's CA is refused too.
        let other = Ca::new("another CA").expect("ca");
        assert!(check(server.addr, Some(client(&other, None)))
            .await
            .is_err());
        // The server is unharmed by either.
        check(server.addr, Some(client(&pki.ca, None)))
            .await
            .expect("still serving TLS");
        // A stream nobody ends (a health Watch) over TLS: shutdown still returns, the TLS
        // connection closed by the hard stop after the grace period.
        let channel = Endpoint::from_shared(format!("https://{}", server.addr))
            .expect("endpoint")
            .tls_config(client(&pki.ca, None))
            .expect("tls")
            .connect()
            .await
            .expect("connect");
        let mut watch = HealthClient::new(channel)
            .watch(HealthCheckRequest {
                service: "test.Service".into(),
            })
            .await
            .expect("watch")
            .into_inner();
        watch.message().await.expect("status").expect("a status");
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mtls_requires_a_client_certificate_from_the_client_ca() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = LoopbackPki::generate().expect("pki");
        let tls = ServerTls::load(write_pki(dir.path(), &pki, true))
            .await
            .expect("load");
        let server = Server::start(tls).await;
        let none = check(server.addr, Some(client(&pki.ca, None))).await;
        assert!(none.is_err(), "no client certificate was accepted");
        let other = Ca::new("another CA").expect("ca");
        let stranger = other.client("stranger").expect("client cert");
        let foreign = check(server.addr, Some(client(&pki.ca, Some(&stranger)))).await;
        assert!(foreign.is_err(), "a certificate of another CA was accepted");
        check(server.addr, Some(client(&pki.ca, Some(&pki.client))))
            .await
            .expect("the right client certificate is accepted");
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rotated_files_are_used_by_new_connections_and_old_ones_keep_working() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = LoopbackPki::generate().expect("pki");
        let files = write_pki(dir.path(), &pki, false);
        let mut tls = ServerTls::load(files.clone()).await.expect("load");
        tls.reload_interval = Duration::from_millis(100);
        let server = Server::start(tls.clone()).await;
        assert_eq!(presented(server.addr, &pki.ca).await, pki.server.cert_der);
        let old = Endpoint::from_shared(format!("https://{}", server.addr))
            .expect("endpoint")
            .tls_config(client(&pki.ca, None))
            .expect("tls")
            .connect()
            .await
            .expect("connect");
        health(old.clone()).await.expect("old connection works");

        // A broken key keeps the old configuration.
        let before = tls.config();
        std::fs::write(&files.key, "not a key").expect("write");
        let err = tls.reload().await.expect_err("a bad key does not load");
        assert!(format!("{err:#}").contains("--tls-key"), "{err:#}");
        assert!(Arc::ptr_eq(&before, &tls.config()), "the old config stays");
        assert_eq!(presented(server.addr, &pki.ca).await, pki.server.cert_der);

        // A new certificate from the same CA: the poller picks it up.
        let next = pki.ca.server("esq-server-2").expect("next cert");
        std::fs::write(&files.cert, &next.cert_pem).expect("write");
        std::fs::write(&files.key, &next.key_pem).expect("write");
        let deadline = tokio::time::Instant::now() + WAIT;
        while presented(server.addr, &pki.ca).await != next.cert_der {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the new certificate was not served within {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        health(old)
            .await
            .expect("the connection made before the rotation still works");
        check(server.addr, Some(client(&pki.ca, None)))
            .await
            .expect("new connections work");
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_client_does_not_stall_other_handshakes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = LoopbackPki::generate().expect("pki");
        let mut tls = ServerTls::load(write_pki(dir.path(), &pki, false))
            .await
            .expect("load");
        // Far longer than the test's bound: if the silent client's handshake ran in the accept
        // loop, the next client would wait for it and the check below would time out.
        tls.handshake_timeout = Duration::from_secs(3600);
        let server = Server::start(tls).await;
        let _silent = TcpStream::connect(server.addr).await.expect("connect");
        let mut half = TcpStream::connect(server.addr).await.expect("connect");
        // Half a ClientHello record header, then nothing.
        tokio::io::AsyncWriteExt::write_all(&mut half, &[0x16, 0x03])
            .await
            .expect("write");
        check(server.addr, Some(client(&pki.ca, None)))
            .await
            .expect("answered while two handshakes hang");
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn handshakes_in_flight_are_bounded() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = LoopbackPki::generate().expect("pki");
        let mut tls = ServerTls::load(write_pki(dir.path(), &pki, false))
            .await
            .expect("load");
        tls.max_handshakes = 1;
        tls.handshake_timeout = Duration::from_secs(3600);
        let server = Server::start(tls).await;
        // Takes the only handshake slot (accepted first: it connected first).
        let silent = TcpStream::connect(server.addr).await.expect("connect");
        let refused = check(server.addr, Some(client(&pki.ca, None))).await;
        assert!(refused.is_err(), "a handshake beyond the bound was served");
        // The silent client leaves: its handshake fails at once and frees the slot.
        drop(silent);
        let deadline = tokio::time::Instant::now() + WAIT;
        while check(server.addr, Some(client(&pki.ca, None)))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the slot never came back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn bad_files_name_the_flag_and_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = LoopbackPki::generate().expect("pki");
        let files = write_pki(dir.path(), &pki, true);
        let missing = TlsFiles {
            cert: dir.path().join("nope.pem"),
            ..files.clone()
        };
        let err = format!("{:#}", ServerTls::load(missing).await.expect_err("missing"));
        assert!(
            err.contains("--tls-cert") && err.contains("nope.pem"),
            "{err}"
        );
        std::fs::write(&files.cert, "no certificate here").expect("write");
        let err = format!(
            "{:#}",
            ServerTls::load(files.clone()).await.expect_err("empty")
        );
        assert!(
            err.contains("--tls-cert") && err.contains("holds no certificate"),
            "{err}"
        );
        std::fs::write(&files.cert, &pki.server.cert_pem).expect("write");
        std::fs::write(files.client_ca.as_ref().expect("ca"), "").expect("write");
        let err = format!(
            "{:#}",
            ServerTls::load(files.clone()).await.expect_err("ca")
        );
        assert!(err.contains("--tls-client-ca"), "{err}");
        // The key of another certificate.
        std::fs::write(files.client_ca.as_ref().expect("ca"), &pki.ca.cert_pem).expect("write");
        std::fs::write(&files.key, &pki.client.key_pem).expect("write");
        let err = format!("{:#}", ServerTls::load(files).await.expect_err("mismatch"));
        assert!(err.contains("does not fit"), "{err}");
    }
}
