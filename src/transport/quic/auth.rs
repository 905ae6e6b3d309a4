//! Authentication by the cluster secret (see the module docs of [`super`]): the TLS
//! exporter of a QUIC connection; the HMAC proofs both ends exchange over it and the
//! server-certificate verifier live in [`crate::transport::auth`], shared with TCP.

use hmac::Hmac;
use sha2::Sha256;

use crate::transport::auth::EXPORTER_LABEL;
pub(super) use crate::transport::auth::{proof, verify_proof, CLIENT_LABEL, PROOF_LEN, SERVER_LABEL};

use super::{QuicConfig, QuicError};

impl QuicConfig {
    /// HMAC-SHA256 keyed with the secret (the empty key without one).
    pub(super) fn mac(&self) -> Result<Hmac<Sha256>, QuicError> {
        crate::transport::auth::mac(self.secret.as_deref())
            .ok_or_else(|| QuicError::Setup("HMAC rejected the secret".into()))
    }
}

/// The exporter-derived value both ends of one TLS session, and only they, know.
pub(super) fn exporter(conn: &quinn::Connection) -> Result<[u8; 32], QuicError> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, b"")
        .map_err(|_| QuicError::Setup("TLS exporter unavailable".into()))?;
    Ok(out)
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
