//! TLS for system tests: a throwaway loopback PKI made at run time (see `esq_runtime::pki`),
//! written to a temporary folder for servers to load, and the client side of it.

use esq_runtime::pki::{CertPair, LoopbackPki, PkiFiles};
use esq_runtime::tls::{ServerTls, TlsFiles};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// What a test client trusts and presents.
#[derive(Clone)]
pub struct ClientTls {
    /// The CA certificate (PEM) the server's certificate must chain to.
    pub ca_pem: String,
    /// The client certificate and key, for servers that require one (mTLS).
    pub identity: Option<CertPair>,
}

impl ClientTls {
    /// The tonic configuration: trust only the CA, expect the name `localhost`.
    pub fn config(&self) -> ClientTlsConfig {
        let config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name("localhost");
        match &self.identity {
            Some(id) => config.identity(Identity::from_pem(&id.cert_pem, &id.key_pem)),
            None => config,
        }
    }

    /// The same, without a client certificate.
    pub fn anonymous(&self) -> Self {
        Self {
            ca_pem: self.ca_pem.clone(),
            identity: None,
        }
    }
}

/// A loopback PKI with its files in a temporary folder (removed when dropped).
pub struct TestPki {
    /// The certificates and keys.
    pub pki: LoopbackPki,
    /// Where they are written.
    pub files: PkiFiles,
    dir: tempfile::TempDir,
}

impl TestPki {
    /// Makes a fresh PKI and writes it.
    pub fn generate() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let pki = LoopbackPki::generate()?;
        let files = pki.write(dir.path())?;
        Ok(Self { pki, files, dir })
    }

    /// The folder of the files.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The server's files, with the CA as `--tls-client-ca` when `mtls`.
    pub fn server_files(&self, mtls: bool) -> TlsFiles {
        TlsFiles {
            cert: self.files.server_cert.clone(),
            key: self.files.server_key.clone(),
            client_ca: mtls.then(|| self.files.ca.clone()),
        }
    }

    /// The server TLS loaded from the files (with client authentication when `mtls`).
    pub async fn server(&self, mtls: bool) -> anyhow::Result<ServerTls> {
        ServerTls::load(self.server_files(mtls)).await
    }

    /// A client trusting the CA and presenting the client certificate.
    pub fn client(&self) -> ClientTls {
        ClientTls {
            ca_pem: self.pki.ca.cert_pem.clone(),
            identity: Some(self.pki.client.clone()),
        }
    }

    /// The environment that makes a service process serve TLS with these files (and require
    /// client certificates when `mtls`).
    pub fn server_env(&self, mtls: bool) -> Vec<(String, String)> {
        let path = |p: &std::path::Path| p.display().to_string();
        let mut env = vec![
            ("ESQ_TLS_CERT".to_owned(), path(&self.files.server_cert)),
            ("ESQ_TLS_KEY".to_owned(), path(&self.files.server_key)),
        ];
        if mtls {
            env.push(("ESQ_TLS_CLIENT_CA".to_owned(), path(&self.files.ca)));
        }
        env
    }
}
