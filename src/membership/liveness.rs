//! Fast failure detection where the operating system can tell: each peer holds a TCP
//! connection to the master's address (the TCP port with the number of the master's
//! QUIC port) that carries nothing after a short handshake. When a peer's process dies,
//! its kernel closes the connection at once, and the master removes the peer then,
//! instead of one heartbeat timeout later. Heartbeats stay the rule for everything the
//! kernel cannot see: a frozen process, a partition, a host that lost power.
//!
//! The handshake binds the connection to a peer id: the master sends a fresh nonce,
//! the peer answers with its id and HMAC-SHA256 over (label, nonce, id) keyed with the
//! cluster secret, so nobody without the secret can open one for another peer and
//! close it to have that peer removed. A connection that fails the handshake or takes
//! longer than [`HANDSHAKE_TIMEOUT`] is dropped and reports nothing.
//!
//! Without a TCP listener (another process holds the port, a relay in between that
//! forwards only UDP) the peer's connect fails and it goes on with heartbeats alone.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::PeerId;

const LABEL: &[u8] = b"phalanx-liveness/1";
const NONCE_LEN: usize = 32;
const TAG_LEN: usize = 32;

/// How long a peer has to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

fn mac(secret: Option<&[u8]>, nonce: &[u8; NONCE_LEN], id: PeerId) -> Hmac<Sha256> {
    // The empty key without a secret.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.unwrap_or(&[])).expect("HMAC accepts any key length"); // ok: HMAC takes keys of any length
    mac.update(LABEL);
    mac.update(nonce);
    mac.update(&id.to_le_bytes());
    mac
}

/// A nonce no earlier connection to this process got: a hash of the process's start,
/// its id and a counter (unique is what stops a replayed answer; the secret does the
/// rest).
fn nonce() -> [u8; NONCE_LEN] {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let start = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let mut h = blake3::Hasher::new();
    h.update(LABEL);
    h.update(&start.as_nanos().to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    *h.finalize().as_bytes()
}

/// The master's side: accepts liveness connections on `listener` forever and sends the
/// id of each authenticated peer whose connection closes to `gone`.
pub(crate) async fn serve(listener: TcpListener, secret: Option<Arc<[u8]>>, gone: mpsc::UnboundedSender<PeerId>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (secret, gone) = (secret.clone(), gone.clone());
        tokio::spawn(async move {
            let Ok(Ok((mut stream, id))) = tokio::time::timeout(HANDSHAKE_TIMEOUT, accept(stream, secret)).await else {
                return; // a stranger, a wrong secret or a stalled peer: nothing to report
            };
            // Nothing more is sent; a read returns at EOF (the process died or let go)
            // or on a reset.
            let mut sink = [0u8; 64];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            tracing::debug!(peer = id, "liveness connection closed");
            let _ = gone.send(id);
        });
    }
}

async fn accept(mut stream: TcpStream, secret: Option<Arc<[u8]>>) -> std::io::Result<(TcpStream, PeerId)> {
    let nonce = nonce();
    stream.write_all(&nonce).await?;
    let mut answer = [0u8; 8 + TAG_LEN];
    stream.read_exact(&mut answer).await?;
    let mut id = [0u8; 8];
    id.copy_from_slice(&answer[..8]);
    let id = PeerId::from_le_bytes(id);
    mac(secret.as_deref(), &nonce, id)
        .verify_slice(&answer[8..])
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::PermissionDenied, "wrong liveness proof"))?;
    Ok((stream, id))
}

/// The peer's side: opens the liveness connection for peer `id` to the master at
/// `master` and returns it; the caller keeps it open for as long as it is a member.
pub(crate) async fn register(master: SocketAddr, id: PeerId, secret: Option<&[u8]>) -> std::io::Result<TcpStream> {
    let handshake = async {
        let mut stream = TcpStream::connect(master).await?;
        stream.set_nodelay(true)?;
        let mut nonce = [0u8; NONCE_LEN];
        stream.read_exact(&mut nonce).await?;
        let mut answer = [0u8; 8 + TAG_LEN];
        answer[..8].copy_from_slice(&id.to_le_bytes());
        answer[8..].copy_from_slice(&mac(secret, &nonce, id).finalize().into_bytes());
        stream.write_all(&answer).await?;
        Ok(stream)
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "liveness handshake timed out"))?
}

/// Keeps a liveness connection to the master the peer follows: `held` to the first,
/// and a new one each time `masters` names the master followed after a takeover (the
/// old one is dropped). It works both ways: when the master's process dies, its kernel
/// closes the connection, and `master_gone` is called at once, long before the peer's
/// master timeout would notice the silence. A master that takes no liveness
/// connections leaves the peer to heartbeats.
pub(crate) async fn follow(
    mut held: Option<TcpStream>,
    mut masters: tokio::sync::watch::Receiver<SocketAddr>,
    id: PeerId,
    secret: Option<Arc<[u8]>>,
    master_gone: impl Fn(),
) {
    loop {
        let closed = async {
            match held.as_mut() {
                // The master never writes: any return means the connection ended.
                Some(stream) => {
                    let mut byte = [0u8; 1];
                    let _ = stream.read(&mut byte).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = masters.changed() => {
                if changed.is_err() {
                    return;
                }
                let master = *masters.borrow_and_update();
                drop(held.take());
                held = register(master, id, secret.as_deref())
                    .await
                    .inspect_err(|e| tracing::debug!(peer = id, %master, "no liveness connection ({e}): heartbeats only"))
                    .ok();
            }
            () = closed => {
                held = None;
                master_gone();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn master(secret: Option<&[u8]>) -> (SocketAddr, mpsc::UnboundedReceiver<PeerId>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(serve(listener, secret.map(Arc::from), tx));
        (addr, rx)
    }

    #[tokio::test]
    async fn a_closed_connection_reports_its_peer_and_only_then() {
        let (addr, mut gone) = master(Some(b"s3cret")).await;
        let a = register(addr, 7, Some(b"s3cret")).await.unwrap();
        let b = register(addr, 8, Some(b"s3cret")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(gone.try_recv().is_err(), "nobody is gone while the connections stay open");
        drop(b);
        assert_eq!(gone.recv().await, Some(8));
        drop(a);
        assert_eq!(gone.recv().await, Some(7));
    }

    #[tokio::test]
    async fn a_wrong_secret_or_a_silent_stranger_reports_nothing() {
        let (addr, mut gone) = master(Some(b"s3cret")).await;
        // The master drops a wrong proof; the peer sees its connection end.
        let wrong = register(addr, 9, Some(b"guess")).await.unwrap();
        let mut s = wrong;
        let mut byte = [0u8; 1];
        assert_eq!(s.read(&mut byte).await.unwrap(), 0, "the master closed it");
        // A stranger that connects and says nothing is dropped after the timeout.
        let stranger = TcpStream::connect(addr).await.unwrap();
        drop(stranger);
        let honest = register(addr, 10, Some(b"s3cret")).await.unwrap();
        drop(honest);
        assert_eq!(gone.recv().await, Some(10), "only the authenticated peer is reported");
    }
}
