//! Setting up a TCP link on both sides: the preamble that names the mode, the TLS
//! handshake (or the plaintext nonces), the cluster-secret proofs over the session
//! binding, and the hello.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::sealed::{self, SealedReader, SealedWriter};
use super::{TcpConfig, TcpError, TcpLink, TcpSecurity, SERVER_NAME};
use crate::transport::auth::{self, Proof, CLIENT_LABEL, EXPORTER_LABEL, PROOF_LEN, SERVER_LABEL};

/// Preamble: magic, version, mode byte.
const PREAMBLE_MAGIC: &[u8; 4] = b"PHXT";
const VERSION: u8 = 1;
const PREAMBLE_LEN: usize = 6;
/// Sent instead of a proof by a server that refused the client's.
const REFUSED: &[u8; 4] = b"PHXN";
/// Binds the plaintext proofs to both ends' nonces.
const PLAIN_LABEL: &[u8] = b"phalanx-tcp/1 plaintext binding";
const NONCE_LEN: usize = 32;
const ACK: u8 = 1;
const NACK: u8 = 0;

/// What both sides of a setup need from the endpoint.
pub(super) struct Context {
    pub(super) config: TcpConfig,
    pub(super) provider: Arc<CryptoProvider>,
    pub(super) connector: tokio_rustls::TlsConnector,
    pub(super) acceptor: tokio_rustls::TlsAcceptor,
}

fn preamble(security: TcpSecurity) -> [u8; PREAMBLE_LEN] {
    let mut p = [0u8; PREAMBLE_LEN];
    p[..4].copy_from_slice(PREAMBLE_MAGIC);
    p[4] = VERSION;
    p[5] = security.wire();
    p
}

/// The peer's mode from its preamble, or why it is not one.
fn parse_preamble(p: &[u8; PREAMBLE_LEN], peer: SocketAddr) -> Result<TcpSecurity, TcpError> {
    if &p[..4] != PREAMBLE_MAGIC || p[4] != VERSION {
        return Err(TcpError::Protocol(format!("{peer} is not a phalanx TCP endpoint (version {VERSION})")));
    }
    TcpSecurity::from_wire(p[5]).ok_or_else(|| TcpError::Protocol(format!("{peer} named an unknown security mode")))
}

fn io(peer: SocketAddr) -> impl Fn(std::io::Error) -> TcpError {
    move |e| TcpError::Connect { addr: peer, reason: e.to_string() }
}

impl Context {
    fn mac(&self) -> Result<hmac::Hmac<Sha256>, TcpError> {
        auth::mac(self.config.secret.as_deref()).ok_or_else(|| TcpError::Setup("HMAC rejected the secret".into()))
    }

    fn nonce(&self) -> Result<[u8; NONCE_LEN], TcpError> {
        let mut n = [0u8; NONCE_LEN];
        self.provider.secure_random.fill(&mut n).map_err(|_| TcpError::Setup("no system randomness".into()))?;
        Ok(n)
    }

    /// Client side: sets up a link over `tcp` to `peer`, handing it `hello`.
    pub(super) async fn client(
        &self,
        mut tcp: TcpStream,
        peer: SocketAddr,
        hello: &Bytes,
    ) -> Result<TcpLink, TcpError> {
        let cfg = &self.config;
        tcp.write_all(&preamble(cfg.security)).await.map_err(io(peer))?;
        let mut theirs = [0u8; PREAMBLE_LEN];
        tcp.read_exact(&mut theirs).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                TcpError::Protocol(format!("{peer} closed the connection: not a phalanx TCP endpoint"))
            }
            _ => io(peer)(e),
        })?;
        let theirs = parse_preamble(&theirs, peer)?;
        if theirs != cfg.security {
            return Err(TcpError::ModeMismatch { addr: peer, ours: cfg.security, theirs });
        }
        match cfg.security {
            TcpSecurity::Tls => {
                let name = ServerName::try_from(SERVER_NAME).map_err(|e| TcpError::Setup(e.to_string()))?;
                let mut tls = self.connector.connect(name, tcp).await.map_err(io(peer))?;
                let binding = exporter(&tls.get_ref().1.export_keying_material([0u8; 32], EXPORTER_LABEL, None))?;
                self.client_auth(&mut tls, peer, &binding, hello).await?;
                // The server sent nothing since its proof and sends nothing more through
                // rustls: its records from here on are sealed by the link (`sealed`).
                let (tcp, conn) = tls.into_inner();
                let (sealer, opener) = sealed::keys(conn.dangerous_extract_secrets().map_err(extract)?)?;
                let (read, write) = tcp.into_split();
                let mut read = SealedReader::new(read, opener);
                let ack = read.record(1).await.map_err(|e| TcpError::Protocol(format!("{peer}: {e}")))?;
                check_ack(&ack, peer)?;
                Ok(TcpLink::start(read, write, Some(sealer), cfg.max_frame_bytes, peer, cfg.security))
            }
            TcpSecurity::Plaintext => {
                let ours = self.nonce()?;
                tcp.write_all(&ours).await.map_err(io(peer))?;
                let mut server = [0u8; NONCE_LEN];
                tcp.read_exact(&mut server).await.map_err(io(peer))?;
                let binding = plain_binding(&ours, &server);
                self.client_auth(&mut tcp, peer, &binding, hello).await?;
                let mut ack = [0u8; 1];
                tcp.read_exact(&mut ack).await.map_err(io(peer))?;
                check_ack(&ack, peer)?;
                let (read, write) = tcp.into_split();
                Ok(TcpLink::new(read, write, cfg.max_frame_bytes, peer, cfg.security))
            }
        }
    }

    async fn client_auth<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        s: &mut S,
        peer: SocketAddr,
        binding: &[u8; 32],
        hello: &Bytes,
    ) -> Result<(), TcpError> {
        let mac = self.mac()?;
        s.write_all(&auth::proof(mac.clone(), CLIENT_LABEL, binding)).await.map_err(io(peer))?;
        s.flush().await.map_err(io(peer))?;
        let mut server_proof: Proof = [0u8; 4 + PROOF_LEN];
        s.read_exact(&mut server_proof).await.map_err(io(peer))?;
        if &server_proof[..4] == REFUSED {
            return Err(TcpError::Auth(format!("{peer} refused us: wrong or missing cluster secret")));
        }
        if !auth::verify_proof(mac, SERVER_LABEL, binding, &server_proof) {
            return Err(TcpError::Auth(format!("{peer} could not prove it knows the cluster secret")));
        }
        let mut head = Vec::with_capacity(4 + hello.len());
        head.extend_from_slice(&(hello.len() as u32).to_le_bytes());
        head.extend_from_slice(hello);
        s.write_all(&head).await.map_err(io(peer))?;
        s.flush().await.map_err(io(peer))
    }

    /// Server side: sets up the link a client opened over `tcp`; returns it with the
    /// client's hello.
    pub(super) async fn server(&self, mut tcp: TcpStream, peer: SocketAddr) -> Result<(TcpLink, Bytes), TcpError> {
        let cfg = &self.config;
        let mut theirs = [0u8; PREAMBLE_LEN];
        tcp.read_exact(&mut theirs).await.map_err(io(peer))?;
        let theirs = parse_preamble(&theirs, peer)?;
        // Always answer with our mode, so that a client in the other mode learns why.
        tcp.write_all(&preamble(cfg.security)).await.map_err(io(peer))?;
        if theirs != cfg.security {
            return Err(TcpError::ModeMismatch { addr: peer, ours: cfg.security, theirs });
        }
        match cfg.security {
            TcpSecurity::Tls => {
                let mut tls = self.acceptor.accept(tcp).await.map_err(io(peer))?;
                let binding = exporter(&tls.get_ref().1.export_keying_material([0u8; 32], EXPORTER_LABEL, None))?;
                let hello = self.server_auth(&mut tls, peer, &binding).await?;
                // The client sent nothing after its hello and waits for the sealed answer.
                let (tcp, conn) = tls.into_inner();
                let (sealer, opener) = sealed::keys(conn.dangerous_extract_secrets().map_err(extract)?)?;
                let (read, write) = tcp.into_split();
                let mut write = SealedWriter::new(write, sealer);
                let _ = write.send(&[if hello.is_ok() { ACK } else { NACK }]).await;
                let hello = hello.map_err(|len| too_large(peer, len))?;
                let read = SealedReader::new(read, opener);
                let (write, sealer) = write.into_parts();
                Ok((TcpLink::start(read, write, Some(sealer), cfg.max_frame_bytes, peer, cfg.security), hello))
            }
            TcpSecurity::Plaintext => {
                let mut client = [0u8; NONCE_LEN];
                tcp.read_exact(&mut client).await.map_err(io(peer))?;
                let ours = self.nonce()?;
                tcp.write_all(&ours).await.map_err(io(peer))?;
                let binding = plain_binding(&client, &ours);
                let hello = self.server_auth(&mut tcp, peer, &binding).await?;
                let _ = tcp.write_all(&[if hello.is_ok() { ACK } else { NACK }]).await;
                let hello = hello.map_err(|len| too_large(peer, len))?;
                let (read, write) = tcp.into_split();
                Ok((TcpLink::new(read, write, cfg.max_frame_bytes, peer, cfg.security), hello))
            }
        }
    }

    /// Checks the client's proof, sends ours and reads the hello: `Err(len)` inside when
    /// the hello is larger than the limit (the caller answers NACK in its mode).
    async fn server_auth<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        s: &mut S,
        peer: SocketAddr,
        binding: &[u8; 32],
    ) -> Result<Result<Bytes, usize>, TcpError> {
        let mac = self.mac()?;
        let mut client_proof: Proof = [0u8; 4 + PROOF_LEN];
        s.read_exact(&mut client_proof).await.map_err(io(peer))?;
        if !auth::verify_proof(mac.clone(), CLIENT_LABEL, binding, &client_proof) {
            // A refusal tells the client why and nothing about the secret.
            let mut refused: Proof = [0u8; 4 + PROOF_LEN];
            refused[..4].copy_from_slice(REFUSED);
            let _ = s.write_all(&refused).await;
            let _ = s.flush().await;
            return Err(TcpError::Auth(format!("{peer} did not prove the cluster secret")));
        }
        s.write_all(&auth::proof(mac, SERVER_LABEL, binding)).await.map_err(io(peer))?;
        s.flush().await.map_err(io(peer))?;
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await.map_err(io(peer))?;
        let len = u32::from_le_bytes(len) as usize;
        if len > self.config.max_hello_bytes {
            return Ok(Err(len));
        }
        let mut hello = vec![0u8; len];
        s.read_exact(&mut hello).await.map_err(io(peer))?;
        Ok(Ok(Bytes::from(hello)))
    }
}

fn too_large(peer: SocketAddr, len: usize) -> TcpError {
    TcpError::Protocol(format!("{peer}: hello of {len} bytes too large"))
}

/// The server's answer to the hello.
fn check_ack(ack: &[u8], peer: SocketAddr) -> Result<(), TcpError> {
    if ack != [ACK] {
        return Err(TcpError::Protocol(format!("{peer} refused the hello (larger than its limit?)")));
    }
    Ok(())
}

fn extract(e: rustls::Error) -> TcpError {
    TcpError::Setup(format!("the TLS session's keys could not be taken over: {e}"))
}

fn exporter(got: &Result<[u8; 32], rustls::Error>) -> Result<[u8; 32], TcpError> {
    got.as_ref().copied().map_err(|e| TcpError::Setup(format!("TLS exporter unavailable: {e}")))
}

/// The plaintext stand-in for the TLS exporter: both ends' fresh nonces, so a proof
/// is good for this connection only (no replay). It binds nothing else: see the module
/// docs on what plaintext mode does not protect against.
fn plain_binding(client: &[u8; NONCE_LEN], server: &[u8; NONCE_LEN]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(PLAIN_LABEL);
    h.update(client);
    h.update(server);
    h.finalize().into()
}
