//! Setting up the connections ("stripes") of a link: the per-connection handshake on
//! both sides (secret proofs, link id, stripe index and count, hello), and on the
//! accepting side the assembly of a link from stripes that arrive one by one.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex as StdMutex};

use bytes::Bytes;
use quinn::{ConnectionError, ReadError, ReadExactError};
use tokio::sync::{mpsc, Semaphore};

use super::auth::{exporter, proof, verify_proof, CLIENT_LABEL, PROOF_LEN, SERVER_LABEL};
use super::{
    QuicConfig, QuicError, QuicLink, CODE_AUTH_FAILED, CODE_BUSY, CODE_PROTOCOL, MAX_PENDING_HANDSHAKES, MAX_STRIPES,
    SERVER_NAME,
};

/// Link id, stripe index, stripe count, hello length.
const LINK_HEADER_LEN: usize = 16 + 2 + 2 + 4;
const ACK: u8 = 1;

/// Accepts connections, sets each up in its own task (bounded in number and time), and
/// hands finished links to [`QuicEndpoint::accept`](super::QuicEndpoint::accept).
pub(super) async fn accept_loop(
    endpoint: quinn::Endpoint,
    config: Arc<QuicConfig>,
    tx: mpsc::Sender<(QuicLink, Bytes)>,
) {
    let permits = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    let groups: Arc<StdMutex<HashMap<[u8; 16], Group>>> = Arc::default();
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            incoming.refuse();
            continue;
        };
        let (config, tx, groups) = (config.clone(), tx.clone(), groups.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let setup = tokio::time::timeout(config.handshake_timeout, accept_stripe(incoming, &config));
            let Ok(Ok(stripe)) = setup.await else {
                return;
            };
            if let Some((link, hello)) = assemble(stripe, &config, &groups) {
                // Fails only when the endpoint is gone; dropping the link closes it.
                let _ = tx.send((link, hello)).await;
            }
        });
    }
}

/// The stripes of a link that arrived so far.
struct Group {
    count: u16,
    stripes: Vec<Option<Stripe>>,
    hello: Bytes,
}

/// Adds a stripe to its link; returns the link once all of its stripes are in.
fn assemble(
    stripe: Stripe,
    config: &Arc<QuicConfig>,
    groups: &Arc<StdMutex<HashMap<[u8; 16], Group>>>,
) -> Option<(QuicLink, Bytes)> {
    let peer = stripe.conn.remote_address();
    if stripe.count == 1 {
        let hello = stripe.hello.clone();
        return Some((link(vec![stripe], config, peer), hello));
    }
    let id = stripe.link_id;
    let mut map = groups.lock().unwrap_or_else(|p| p.into_inner());
    if !map.contains_key(&id) {
        if map.len() >= MAX_PENDING_HANDSHAKES {
            stripe.conn.close(CODE_BUSY, b"too many links being set up");
            return None;
        }
        map.insert(
            id,
            Group { count: stripe.count, stripes: (0..stripe.count).map(|_| None).collect(), hello: Bytes::new() },
        );
        // A link whose stripes do not all arrive in time is dropped, closing the rest.
        let (groups, timeout) = (groups.clone(), config.handshake_timeout);
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let stale = groups.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            for s in stale.into_iter().flat_map(|g| g.stripes).flatten() {
                s.conn.close(CODE_PROTOCOL, b"not all stripes of the link arrived");
            }
        });
    }
    let group = map.get_mut(&id)?;
    let index = stripe.index as usize;
    if stripe.count != group.count || group.stripes[index].is_some() {
        let bad = map.remove(&id);
        stripe.conn.close(CODE_PROTOCOL, b"inconsistent stripes");
        for s in bad.into_iter().flat_map(|g| g.stripes).flatten() {
            s.conn.close(CODE_PROTOCOL, b"inconsistent stripes");
        }
        return None;
    }
    if index == 0 {
        group.hello = stripe.hello.clone();
    }
    group.stripes[index] = Some(stripe);
    if group.stripes.iter().any(Option::is_none) {
        return None;
    }
    let group = map.remove(&id)?;
    let stripes: Vec<Stripe> = group.stripes.into_iter().flatten().collect();
    Some((link(stripes, config, peer), group.hello))
}

/// The link made of `stripes` (all set up, in order), its windows sized from the round
/// trip the first one measured during its setup.
pub(super) fn link(stripes: Vec<Stripe>, config: &QuicConfig, peer: SocketAddr) -> QuicLink {
    let rtt = stripes.first().map_or(std::time::Duration::ZERO, |s| s.conn.rtt());
    let sizing = config.sizing(rtt, stripes.len());
    let conns: Vec<quinn::Connection> = stripes.iter().map(|s| s.conn.clone()).collect();
    sizing.apply(&conns);
    QuicLink::new(stripes, config.max_frame_bytes, peer, sizing)
}

/// One authenticated connection of a link and its stream.
pub(super) struct Stripe {
    pub(super) conn: quinn::Connection,
    pub(super) send: quinn::SendStream,
    pub(super) recv: quinn::RecvStream,
    pub(super) link_id: [u8; 16],
    pub(super) index: u16,
    pub(super) count: u16,
    pub(super) hello: Bytes,
}

/// Server side of one connection's setup.
async fn accept_stripe(incoming: quinn::Incoming, config: &QuicConfig) -> Result<Stripe, QuicError> {
    let peer = incoming.remote_address();
    let fail = |e: &dyn fmt::Display| QuicError::Connect { addr: peer, reason: e.to_string() };
    let conn = incoming.await.map_err(|e| fail(&e))?;
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| fail(&e))?;
    let exported = exporter(&conn)?;
    let mac = config.mac()?;

    let mut client_proof = [0u8; 4 + PROOF_LEN];
    recv.read_exact(&mut client_proof).await.map_err(|e| fail(&e))?;
    if !verify_proof(mac.clone(), CLIENT_LABEL, &exported, &client_proof) {
        conn.close(CODE_AUTH_FAILED, b"authentication failed: wrong or missing cluster secret");
        return Err(QuicError::Auth(format!("{peer} did not prove the cluster secret")));
    }
    send.write_all(&proof(mac, SERVER_LABEL, &exported)).await.map_err(|e| fail(&e))?;

    let mut head = [0u8; LINK_HEADER_LEN];
    recv.read_exact(&mut head).await.map_err(|e| fail(&e))?;
    let mut link_id = [0u8; 16];
    link_id.copy_from_slice(&head[..16]);
    let index = u16::from_le_bytes([head[16], head[17]]);
    let count = u16::from_le_bytes([head[18], head[19]]);
    let hello_len = u32::from_le_bytes([head[20], head[21], head[22], head[23]]) as usize;
    let refuse = |why: &str| {
        conn.close(CODE_PROTOCOL, why.as_bytes());
        Err(QuicError::Protocol(format!("{peer}: {why}")))
    };
    if count == 0 || count as usize > MAX_STRIPES || index >= count {
        return refuse("bad stripe index or count");
    }
    if hello_len > config.max_hello_bytes {
        return refuse("hello too large");
    }
    let mut hello = vec![0u8; hello_len];
    recv.read_exact(&mut hello).await.map_err(|e| fail(&e))?;
    send.write_all(&[ACK]).await.map_err(|e| fail(&e))?;
    Ok(Stripe { conn, send, recv, link_id, index, count, hello: Bytes::from(hello) })
}

/// Client side of one connection's setup.
pub(super) struct StripeSetup {
    pub(super) endpoint: quinn::Endpoint,
    pub(super) client_config: quinn::ClientConfig,
    pub(super) config: Arc<QuicConfig>,
    pub(super) peer: SocketAddr,
    pub(super) link_id: [u8; 16],
    pub(super) index: u16,
    pub(super) count: u16,
    pub(super) hello: Bytes,
}

/// A client connection whose TLS handshake and secret proofs are done, waiting for its
/// link header.
pub(super) struct Authenticated {
    pub(super) conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl StripeSetup {
    pub(super) async fn run(self) -> Result<(usize, Stripe), QuicError> {
        let authenticated = self.authenticate().await?;
        self.finish(authenticated).await
    }

    /// Connects and exchanges the secret proofs: the round trips that measure the path.
    pub(super) async fn authenticate(&self) -> Result<Authenticated, QuicError> {
        let peer = self.peer;
        let lost = |e: ConnectionError| setup_error(peer, e);
        let connecting = self
            .endpoint
            .connect_with(self.client_config.clone(), peer, SERVER_NAME)
            .map_err(|e| QuicError::Connect { addr: peer, reason: e.to_string() })?;
        let conn = connecting.await.map_err(lost)?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(lost)?;
        let exported = exporter(&conn)?;
        let mac = self.config.mac()?;

        send.write_all(&proof(mac.clone(), CLIENT_LABEL, &exported)).await.map_err(|e| write_error(peer, e))?;
        let mut server_proof = [0u8; 4 + PROOF_LEN];
        recv.read_exact(&mut server_proof).await.map_err(|e| read_error(peer, e))?;
        if !verify_proof(mac, SERVER_LABEL, &exported, &server_proof) {
            conn.close(CODE_AUTH_FAILED, b"authentication failed: server did not prove the secret");
            return Err(QuicError::Auth(format!("{peer} could not prove it knows the cluster secret")));
        }
        Ok(Authenticated { conn, send, recv })
    }

    /// Sends the link header (with [`count`](Self::count)) and the hello on an
    /// authenticated connection and waits for the server's acknowledgement.
    pub(super) async fn finish(self, authenticated: Authenticated) -> Result<(usize, Stripe), QuicError> {
        let peer = self.peer;
        let Authenticated { conn, mut send, mut recv } = authenticated;
        let mut head = Vec::with_capacity(LINK_HEADER_LEN + self.hello.len());
        head.extend_from_slice(&self.link_id);
        head.extend_from_slice(&self.index.to_le_bytes());
        head.extend_from_slice(&self.count.to_le_bytes());
        head.extend_from_slice(&(self.hello.len() as u32).to_le_bytes());
        head.extend_from_slice(&self.hello);
        send.write_all(&head).await.map_err(|e| write_error(peer, e))?;
        let mut ack = [0u8; 1];
        recv.read_exact(&mut ack).await.map_err(|e| read_error(peer, e))?;
        if ack[0] != ACK {
            conn.close(CODE_PROTOCOL, b"bad acknowledgement");
            return Err(QuicError::Protocol(format!("{peer} sent a bad acknowledgement")));
        }
        Ok((
            self.index as usize,
            Stripe { conn, send, recv, link_id: self.link_id, index: self.index, count: self.count, hello: self.hello },
        ))
    }
}

/// Maps a connection failure during setup to a clear error, decoding our close codes.
fn setup_error(peer: SocketAddr, e: ConnectionError) -> QuicError {
    if let ConnectionError::ApplicationClosed(close) = &e {
        let reason = String::from_utf8_lossy(&close.reason).into_owned();
        match close.error_code {
            c if c == CODE_AUTH_FAILED => {
                return QuicError::Auth(format!("{peer} refused us: {reason}"));
            }
            c if c == CODE_BUSY => return QuicError::Busy,
            c if c == CODE_PROTOCOL => {
                return QuicError::Protocol(format!("{peer} refused the setup: {reason}"));
            }
            _ => {}
        }
    }
    QuicError::Connect { addr: peer, reason: e.to_string() }
}

fn read_error(peer: SocketAddr, e: ReadExactError) -> QuicError {
    match e {
        ReadExactError::ReadError(ReadError::ConnectionLost(c)) => setup_error(peer, c),
        other => QuicError::Connect { addr: peer, reason: other.to_string() },
    }
}

fn write_error(peer: SocketAddr, e: quinn::WriteError) -> QuicError {
    match e {
        quinn::WriteError::ConnectionLost(c) => setup_error(peer, c),
        other => QuicError::Connect { addr: peer, reason: other.to_string() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::conformance;
    use crate::transport::quic::tests::{bounded, localhost, pair, secret_config};
    use crate::transport::quic::QuicEndpoint;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_ordered_both_ways_striped() {
        bounded(async {
            let cfg = QuicConfig { connections_per_link: Some(3), ..secret_config() };
            let (a, b, hello) = pair(cfg.clone(), cfg).await;
            assert_eq!(a.stripes(), 3);
            assert_eq!(b.stripes(), 3);
            assert_eq!(hello, "rank 1 of epoch 7");
            conformance::ordered_both_ways(&a, &b, 1 << 20).await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_hello_is_refused() {
        bounded(async {
            let server = QuicEndpoint::bind(localhost(), QuicConfig { max_hello_bytes: 8, ..secret_config() }).unwrap();
            let client = QuicEndpoint::bind(localhost(), secret_config()).unwrap();
            let addr = server.local_addr().unwrap();
            let err = client.connect(addr, Bytes::from(vec![0u8; 100])).await.unwrap_err();
            assert!(matches!(err, QuicError::Protocol(_)), "{err}");
            let err = client.connect(addr, Bytes::from(vec![0u8; 100 << 10])).await.unwrap_err();
            assert!(matches!(err, QuicError::HelloTooLarge { .. }), "{err}");
        })
        .await;
    }
}
