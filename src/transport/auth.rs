//! Authentication by the cluster secret, shared by the QUIC and TCP transports: the HMAC
//! proofs both ends of a link exchange over a value only the two of them know (the TLS
//! exporter of their session; see the [`quic`](super::quic) module docs for why this is
//! sound), and the server-certificate verifier that leaves authentication to those
//! proofs.

use std::sync::Arc;

use hmac::{Hmac, Mac};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::Sha256;

const MAGIC: &[u8; 4] = b"PHX1";
/// The TLS exporter label both transports derive the session binding with.
pub(crate) const EXPORTER_LABEL: &[u8] = b"EXPORTER-phalanx-auth-v1";
/// Role label of the connecting end's proof.
pub(crate) const CLIENT_LABEL: &[u8] = b"phalanx/1 client";
/// Role label of the accepting end's proof.
pub(crate) const SERVER_LABEL: &[u8] = b"phalanx/1 server";
/// Length of an HMAC-SHA256 proof.
pub(crate) const PROOF_LEN: usize = 32;
/// A proof on the wire: `PHX1` and the HMAC.
pub(crate) type Proof = [u8; 4 + PROOF_LEN];

/// HMAC-SHA256 keyed with `secret` (the empty key without one); `None` only if the HMAC
/// implementation refused the key, which it does for no length.
pub(crate) fn mac(secret: Option<&[u8]>) -> Option<Hmac<Sha256>> {
    Hmac::<Sha256>::new_from_slice(secret.unwrap_or(&[])).ok()
}

/// `PHX1` + HMAC(role || binding): what one end sends to prove the secret.
pub(crate) fn proof(mut mac: Hmac<Sha256>, role: &[u8], binding: &[u8; 32]) -> Proof {
    mac.update(role);
    mac.update(binding);
    let mut out = [0u8; 4 + PROOF_LEN];
    out[..4].copy_from_slice(MAGIC);
    out[4..].copy_from_slice(&mac.finalize().into_bytes());
    out
}

/// Checks a peer's `PHX1` + proof in constant time (the magic is public).
pub(crate) fn verify_proof(mut mac: Hmac<Sha256>, role: &[u8], binding: &[u8; 32], got: &Proof) -> bool {
    mac.update(role);
    mac.update(binding);
    &got[..4] == MAGIC && mac.verify_slice(&got[4..]).is_ok()
}

/// Accepts any server certificate, but still checks the TLS 1.3 handshake signature
/// with the certificate's key. Sound only together with the secret proof over the TLS
/// exporter, which authenticates both ends (see the [`quic`](super::quic) module docs).
#[derive(Debug)]
pub(crate) struct SecretAuthenticated {
    pub(crate) provider: Arc<CryptoProvider>,
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

/// The TLS 1.3 server and client configurations of an endpoint: a fresh self-signed
/// certificate for `server_name` (TLS needs one; the cluster-secret proofs over the
/// exporter authenticate), the [`SecretAuthenticated`] verifier, `alpn`, and no session
/// resumption (every connection does a full handshake, so every one is proven). On
/// failure, what could not be set up and why.
pub(crate) fn tls_configs(
    provider: Arc<CryptoProvider>,
    server_name: &str,
    alpn: &[u8],
) -> Result<(rustls::ServerConfig, rustls::ClientConfig), (&'static str, String)> {
    let certified = rcgen::generate_simple_self_signed(vec![server_name.to_string()])
        .map_err(|e| ("certificate generation", e.to_string()))?;
    let cert = certified.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        certified.key_pair.serialize_der(),
    ));
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ("TLS server config", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(|e| ("TLS server certificate", e.to_string()))?;
    server.alpn_protocols = vec![alpn.to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ("TLS client config", e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SecretAuthenticated { provider }))
        .with_no_client_auth();
    client.alpn_protocols = vec![alpn.to_vec()];
    client.resumption = rustls::client::Resumption::disabled();
    Ok((server, client))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_with_the_same_secret_role_and_binding() {
        let good = mac(Some(b"s3cret")).unwrap();
        let p = proof(good.clone(), CLIENT_LABEL, &[7; 32]);
        assert!(verify_proof(good.clone(), CLIENT_LABEL, &[7; 32], &p));
        assert!(!verify_proof(good.clone(), SERVER_LABEL, &[7; 32], &p), "reflected");
        assert!(!verify_proof(good, CLIENT_LABEL, &[8; 32], &p), "other session");
        assert!(!verify_proof(mac(Some(b"guess")).unwrap(), CLIENT_LABEL, &[7; 32], &p), "other secret");
        assert!(!verify_proof(mac(None).unwrap(), CLIENT_LABEL, &[7; 32], &p), "no secret");
    }
}
