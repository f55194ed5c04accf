//! A throwaway PKI for loopback and development use: a fresh CA, a server certificate for
//! `localhost`, `127.0.0.1` and `::1`, and a client certificate, all made at run time (rcgen,
//! ECDSA P-256). `esq tls generate` writes one to a folder, and tests make their own, so no
//! certificate or key is ever stored in the repository.
//!
//! It is not for production: the certificates never expire and the CA key is only kept in
//! memory (or in the folder `esq tls generate` writes); use your own PKI or cert-manager there.

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// A certificate and its private key, PEM-encoded.
#[derive(Clone)]
pub struct CertPair {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PEM, PKCS#8).
    pub key_pem: String,
    /// The certificate (DER), to compare with what a peer presents.
    pub cert_der: Vec<u8>,
}

/// A CA that issues certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (PEM): what clients trust, or what `--tls-client-ca` names.
    pub cert_pem: String,
}

impl Ca {
    /// A new CA named `name`.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::new()).context("CA parameters")?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        let key = KeyPair::generate().context("CA key")?;
        let cert = params.self_signed(&key).context("CA certificate")?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A server certificate for `localhost`, `127.0.0.1` and `::1`, with common name `name`.
    pub fn server(&self, name: &str) -> anyhow::Result<CertPair> {
        self.leaf(
            name,
            &["localhost", "127.0.0.1", "::1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate with common name `name`.
    pub fn client(&self, name: &str) -> anyhow::Result<CertPair> {
        self.leaf(name, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn leaf(
        &self,
        name: &str,
        sans: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> anyhow::Result<CertPair> {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).context("certificate parameters")?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().context("key")?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing a certificate")?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
        })
    }
}

/// The files of a loopback PKI, as [`LoopbackPki::write`] names them.
#[derive(Debug, Clone)]
pub struct PkiFiles {
    /// `ca.pem`: the CA certificate (clients' `--ca-cert`, servers' `--tls-client-ca`).
    pub ca: PathBuf,
    /// `server.pem`: the server certificate (`--tls-cert`).
    pub server_cert: PathBuf,
    /// `server-key.pem`: its key (`--tls-key`).
    pub server_key: PathBuf,
    /// `client.pem`: a client certificate (clients' `--client-cert`).
    pub client_cert: PathBuf,
    /// `client-key.pem`: its key (clients' `--client-key`).
    pub client_key: PathBuf,
}

/// A CA with one server and one client certificate.
pub struct LoopbackPki {
    /// The CA.
    pub ca: Ca,
    /// The server certificate, for loopback names.
    pub server: CertPair,
    /// The client certificate (common name `esq-client`).
    pub client: CertPair,
}

impl LoopbackPki {
    /// Makes a fresh one.
    pub fn generate() -> anyhow::Result<Self> {
        let ca = Ca::new("esq loopback CA")?;
        let server = ca.server("esq-server")?;
        let client = ca.client("esq-client")?;
        Ok(Self { ca, server, client })
    }

    /// Writes `ca.pem`, `server.pem`, `server-key.pem`, `client.pem` and `client-key.pem` to
    /// `dir` (created if missing); keys are readable by their owner only (on Unix).
    pub fn write(&self, dir: &Path) -> anyhow::Result<PkiFiles> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let files = PkiFiles {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        };
        write(&files.ca, &self.ca.cert_pem, false)?;
        write(&files.server_cert, &self.server.cert_pem, false)?;
        write(&files.server_key, &self.server.key_pem, true)?;
        write(&files.client_cert, &self.client.cert_pem, false)?;
        write(&files.client_key, &self.client.key_pem, true)?;
        Ok(files)
    }
}

/// Writes `contents` to `path` (a key: owner-only permissions, set before the key is written).
pub fn write(path: &Path, contents: &str, secret: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}
