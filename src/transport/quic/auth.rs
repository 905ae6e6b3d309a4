//! Authentication by the cluster secret (see the module docs of [`super`]): the TLS
//! exporter of a connection, the HMAC proofs both ends exchange over it, and the
//! server-certificate verifier that leaves authentication to those proofs.

use std::sync::Arc;

use hmac::{Hmac, Mac};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::Sha256;

use super::{QuicConfig, QuicError};

const MAGIC: &[u8; 4] = b"PHX1";
const EXPORTER_LABEL: &[u8] = b"EXPORTER-phalanx-auth-v1";
pub(super) const CLIENT_LABEL: &[u8] = b"phalanx/1 client";
pub(super) const SERVER_LABEL: &[u8] = b"phalanx/1 server";
pub(super) const PROOF_LEN: usize = 32;

impl QuicConfig {
    /// HMAC-SHA256 keyed with the secret (the empty key without one).
    pub(super) fn mac(&self) -> Result<Hmac<Sha256>, QuicError> {
        let secret: &[u8] = self.secret.as_deref().unwrap_or(&[]);
        Hmac::<Sha256>::new_from_slice(secret).map_err(|_| QuicError::Setup("HMAC rejected the secret".into()))
    }
}

/// The exporter-derived value both ends of one TLS session, and only they, know.
pub(super) fn exporter(conn: &quinn::Connection) -> Result<[u8; 32], QuicError> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, b"")
        .map_err(|_| QuicError::Setup("TLS exporter unavailable".into()))?;
    Ok(out)
}

pub(super) fn proof(mut mac: Hmac<Sha256>, role: &[u8], exported: &[u8; 32]) -> [u8; 4 + PROOF_LEN] {
    mac.update(role);
    mac.update(exported);
    let mut out = [0u8; 4 + PROOF_LEN];
    out[..4].copy_from_slice(MAGIC);
    out[4..].copy_from_slice(&mac.finalize().into_bytes());
    out
}

/// Checks a peer's `PHX1` + proof in constant time (the magic is public).
pub(super) fn verify_proof(mut mac: Hmac<Sha256>, role: &[u8], exported: &[u8; 32], got: &[u8; 4 + PROOF_LEN]) -> bool {
    mac.update(role);
    mac.update(exported);
    &got[..4] == MAGIC && mac.verify_slice(&got[4..]).is_ok()
}

/// Accepts any server certificate, but still checks the TLS 1.3 handshake signature
/// with the certificate's key. Sound only together with the secret proof over the TLS
/// exporter, which authenticates both ends (see the [module docs](super)).
#[derive(Debug)]
pub(super) struct SecretAuthenticated {
    pub(super) provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SecretAuthenticated {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered.
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use crate::transport::quic::tests::{bounded, frame, localhost, pair, secret_config};
    use crate::transport::quic::{QuicConfig, QuicEndpoint, QuicError};
    use crate::transport::Link;

    /// Strangers are refused with a clear error and the server goes on serving.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn strangers_are_refused_and_honest_peers_served() {
        bounded(async {
            let server = QuicEndpoint::bind(localhost(), secret_config()).unwrap();
            let addr = server.local_addr().unwrap();

            let wrong = QuicEndpoint::bind(localhost(), QuicConfig::with_secret("guess")).unwrap();
            let err = wrong.connect(addr, Bytes::from_static(b"evil")).await.unwrap_err();
            assert!(matches!(err, QuicError::Auth(_)), "{err}");
            assert!(err.to_string().contains("secret"), "{err}");

            let none = QuicEndpoint::bind(localhost(), QuicConfig::default()).unwrap();
            let err = none.connect(addr, Bytes::from_static(b"evil")).await.unwrap_err();
            assert!(matches!(err, QuicError::Auth(_)), "{err}");

            let honest = QuicEndpoint::bind(localhost(), secret_config()).unwrap();
            let (a, accepted) = tokio::join!(honest.connect(addr, Bytes::from_static(b"honest")), server.accept());
            let (a, (b, hello)) = (a.unwrap(), accepted.unwrap());
            // The strangers never reached `accept`.
            assert_eq!(hello, "honest");
            b.send(frame(1, 10)).await.unwrap();
            assert_eq!(a.recv().await.unwrap(), frame(1, 10));
        })
        .await;
    }

    /// A client with a secret refuses a server that cannot prove it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn client_refuses_server_without_secret() {
        bounded(async {
            let server = QuicEndpoint::bind(localhost(), QuicConfig::default()).unwrap();
            let client = QuicEndpoint::bind(localhost(), secret_config()).unwrap();
            let addr = server.local_addr().unwrap();
            let err = client.connect(addr, Bytes::new()).await.unwrap_err();
            assert!(matches!(err, QuicError::Auth(_)), "{err}");
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_secret_on_either_side_connects() {
        bounded(async {
            let (a, b, _) = pair(QuicConfig::default(), QuicConfig::default()).await;
            a.send(frame(0, 1)).await.unwrap();
            assert_eq!(b.recv().await.unwrap(), frame(0, 1));
        })
        .await;
    }
}
