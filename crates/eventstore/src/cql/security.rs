//! Credentials and TLS for the CQL connections: what [`CqlConfig::credentials`] and
//! [`CqlConfig::tls`] hold, the rustls client configuration built from them, and the
//! recognition of refusals that no retry can cure (wrong password, untrusted certificate).
//!
//! Secrets never reach a log: the password and the client key are left out of `Debug`.
//!
//! [`CqlConfig::credentials`]: super::CqlConfig::credentials
//! [`CqlConfig::tls`]: super::CqlConfig::tls

use crate::StoreError;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use scylla::errors::{
    ConnectionError, ConnectionPoolError, ConnectionSetupRequestErrorKind, DbError, MetadataError,
    NewSessionError,
};
use std::sync::Arc;

/// A username and password for Cassandra's `PasswordAuthenticator` (or ScyllaDB's).
#[derive(Clone, PartialEq, Eq)]
pub struct CqlCredentials {
    /// The role to log in as.
    pub username: String,
    /// Its password; never printed.
    pub password: String,
}

impl std::fmt::Debug for CqlCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CqlCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Client TLS towards the cluster: the CA the nodes' certificates must chain to and, for nodes
/// that require client certificates, this client's certificate chain and key (PEM contents,
/// read from files at start). The driver checks each node's certificate against the node's IP
/// address, so node certificates need IP subject alternative names.
#[derive(Clone, PartialEq, Eq)]
pub struct CqlTls {
    /// PEM certificates of the trusted CA(s).
    pub ca_pem: Vec<u8>,
    /// PEM certificate chain and private key of this client, for mutual TLS.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for CqlTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CqlTls")
            .field("ca_pem", &format_args!("<{} bytes>", self.ca_pem.len()))
            .field(
                "client",
                &self
                    .client
                    .as_ref()
                    .map(|_| "<certificate and redacted key>"),
            )
            .finish()
    }
}

impl CqlTls {
    /// The rustls client configuration: only `ca_pem`'s certificates are trusted. Fails with
    /// a message naming what is wrong (no certificate in the CA file, a key that does not
    /// parse or does not match the certificate).
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&self.ca_pem) {
            let cert = cert.map_err(|e| format!("the CA file is not PEM: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("the CA file holds an unusable certificate: {e}"))?;
        }
        if roots.is_empty() {
            return Err("the CA file holds no certificate".into());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots);
        let config = match &self.client {
            None => builder.with_no_client_auth(),
            Some((cert_pem, key_pem)) => {
                let chain = CertificateDer::pem_slice_iter(cert_pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("the client certificate file is not PEM: {e}"))?;
                if chain.is_empty() {
                    return Err("the client certificate file holds no certificate".into());
                }
                let key = PrivateKeyDer::from_pem_slice(key_pem)
                    .map_err(|e| format!("the client key file holds no usable key: {e}"))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("the client certificate and key do not fit: {e}"))?
            }
        };
        Ok(Arc::new(config))
    }
}

/// The refusal inside a failed session opening that retrying cannot cure — the cluster
/// rejected the credentials (or wants some and none were given), or the TLS handshake failed
/// on a certificate — as a message for the operator, or `None` for anything else.
pub(crate) fn refusal(err: &NewSessionError) -> Option<String> {
    let NewSessionError::MetadataError(MetadataError::ConnectionPoolError(
        ConnectionPoolError::Broken {
            last_connection_error,
        },
    )) = err
    else {
        return None;
    };
    connection_refusal(last_connection_error)
}

/// See [`refusal`].
pub(crate) fn connection_refusal(err: &ConnectionError) -> Option<String> {
    match err {
        ConnectionError::ConnectionSetupRequestError(setup) => match setup.get_error() {
            ConnectionSetupRequestErrorKind::DbError(DbError::AuthenticationError, message) => {
                Some(format!(
                    "the CQL cluster refused the credentials (check --cql-username and the \
                     password): {message}"
                ))
            }
            ConnectionSetupRequestErrorKind::MissingAuthentication => Some(
                "the CQL cluster requires authentication: set --cql-username and \
                 --cql-password or --cql-password-file"
                    .into(),
            ),
            ConnectionSetupRequestErrorKind::StartAuthSessionError(e)
            | ConnectionSetupRequestErrorKind::AuthChallengeEvaluationError(e)
            | ConnectionSetupRequestErrorKind::AuthFinishError(e) => {
                Some(format!("CQL authentication failed: {e}"))
            }
            _ => None,
        },
        ConnectionError::IoError(io) => {
            let tls = io.get_ref()?.downcast_ref::<rustls::Error>()?;
            match tls {
                rustls::Error::InvalidCertificate(_)
                | rustls::Error::NoCertificatesPresented
                | rustls::Error::AlertReceived(_)
                | rustls::Error::PeerIncompatible(_) => Some(format!(
                    "the TLS handshake with the CQL cluster failed (check --cql-tls-ca and the \
                     client certificate): {tls}"
                )),
                _ => None,
            }
        }
        _ => None,
    }
}

/// `err` as the store error for a failed session opening: a refusal is
/// [`StoreError::Internal`] (the process stops instead of retrying), anything else goes
/// through the usual translation.
pub(crate) fn session_error(
    err: NewSessionError,
    otherwise: impl FnOnce(NewSessionError) -> StoreError,
) -> StoreError {
    match refusal(&err) {
        Some(message) => StoreError::Internal(message),
        None => otherwise(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_the_secrets() {
        let credentials = CqlCredentials {
            username: "esq".into(),
            password: "hunter2-secret".into(),
        };
        let shown = format!("{credentials:?}");
        assert!(shown.contains("esq"), "{shown}");
        assert!(!shown.contains("hunter2-secret"), "{shown}");
        let tls = CqlTls {
            ca_pem: b"-----BEGIN CERTIFICATE-----".to_vec(),
            client: Some((b"cert".to_vec(), b"PRIVATE-KEY-MATERIAL".to_vec())),
        };
        let shown = format!("{tls:?}");
        assert!(!shown.contains("PRIVATE-KEY-MATERIAL"), "{shown}");
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let tls = CqlTls {
            ca_pem: b"not a certificate".to_vec(),
            client: None,
        };
        let err = tls.client_config().expect_err("no certificate");
        assert!(err.contains("CA file"), "{err}");
    }

    #[test]
    fn certificate_failures_are_refusals_and_connection_failures_are_not() {
        let io = ConnectionError::IoError(Arc::new(std::io::Error::other(
            rustls::Error::NoCertificatesPresented,
        )));
        assert!(connection_refusal(&io).is_some());
        let plain = ConnectionError::IoError(Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert!(connection_refusal(&plain).is_none());
        assert!(connection_refusal(&ConnectionError::ConnectTimeout).is_none());
    }
}
