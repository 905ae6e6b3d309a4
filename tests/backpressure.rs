//! Backpressure at the link level: a receiver that does not read bounds what its sender
//! can hand to the link, to the link's buffering, over QUIC and over the in-memory
//! transport; once the receiver reads, every frame arrives, in order, and the sender
//! goes on.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use phalanx::transport::quic::{QuicConfig, QuicEndpoint};
use phalanx::transport::{mem, Frame, Header, Link};

/// Payload bytes of every frame.
const FRAME: usize = 256 << 10;
/// What a sender without backpressure would have queued by the time the loop gives up.
const UNBOUNDED: usize = 64 << 20;
/// A `send` that does not complete within this long counts as blocked.
const BLOCKED: Duration = Duration::from_millis(500);
/// Bound on a whole test, so that a broken link fails it instead of hanging it.
const LIMIT: Duration = Duration::from_secs(120);

/// Frame `i`: its index in the header and in the first payload bytes, so that a lost,
/// reordered or torn frame shows.
fn frame(i: u64) -> Frame {
    let mut payload = vec![i as u8; FRAME];
    payload[..8].copy_from_slice(&i.to_le_bytes());
    Frame { header: Header { epoch: 1, seq: 2, call: 3, index: i }, payload: Bytes::from(payload) }
}

/// Sends frames on `a` until one `send` stays blocked for [`BLOCKED`] (it is then
/// cancelled, which queues nothing), or [`UNBOUNDED`] bytes went in; returns how many
/// frames the link accepted.
async fn fill(a: &dyn Link) -> u64 {
    let mut accepted = 0u64;
    while (accepted as usize) * FRAME < UNBOUNDED {
        match tokio::time::timeout(BLOCKED, a.send(frame(accepted))).await {
            Ok(sent) => sent.expect("send to a live link"),
            Err(_) => break,
        }
        accepted += 1;
    }
    accepted
}

/// The test over one connected pair whose buffers hold at most `bound` payload bytes
/// that the receiver `b` has not read.
async fn slow_receiver_bounds_sender(a: &dyn Link, b: &dyn Link, bound: usize) {
    assert!(bound * 4 <= UNBOUNDED, "the bound of {bound} bytes is not far below {UNBOUNDED}");
    let accepted = fill(a).await;
    let held = accepted as usize * FRAME;
    assert!(accepted > 0, "the link accepted no frame at all");
    assert!(
        held <= bound,
        "the link accepted {accepted} frames ({held} bytes) for a receiver that reads nothing; \
         its buffers hold {bound} bytes"
    );
    // The receiver reads: what was accepted arrives in order, and the sender, no longer
    // blocked, sends as many frames again.
    let total = 2 * accepted;
    let send = async {
        for i in accepted..total {
            a.send(frame(i)).await.expect("send once the receiver reads");
        }
    };
    let recv = async {
        for i in 0..total {
            let got = b.recv().await.expect("recv");
            assert_eq!(got.header, frame(i).header, "frame {i} out of order");
            assert!(got == frame(i), "frame {i} arrived torn");
        }
    };
    tokio::join!(send, recv);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_receiver_bounds_sender_memory_quic() {
    let config = QuicConfig::with_secret("test secret: 32 random bytes in real life");
    // A QUIC link buffers per stripe (see `transport::quic`, "Flow control and
    // buffering"): the receiver's stream window of unread bytes (the connection window
    // caps it too), plus one frame queued in the one-frame channel and one being written
    // on the sending side, and one queued and one being read on the receiving side. One
    // more frame of slack: the window's edge may cut a frame in two.
    const CHANNEL_FRAMES: usize = 1;
    let per_stripe = config.stream_receive_window.min(config.receive_window) as usize
        + 2 * (CHANNEL_FRAMES + 1) * (Header::LEN + 8 + FRAME);
    let bound = config.connections_per_link * per_stripe + FRAME;
    tokio::time::timeout(LIMIT, async {
        let localhost = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let server = QuicEndpoint::bind(localhost, config.clone()).unwrap();
        let client = QuicEndpoint::bind(localhost, config.clone()).unwrap();
        let addr = server.local_addr().unwrap();
        let (a, accepted) = tokio::join!(client.connect(addr, Bytes::from_static(b"sender")), server.accept());
        let (a, (b, _)) = (a.unwrap(), accepted.unwrap());
        slow_receiver_bounds_sender(&a, &b, bound).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_receiver_bounds_sender_memory_mem() {
    // An in-memory link buffers `capacity` frames, and no more.
    const CAPACITY: usize = 8;
    tokio::time::timeout(LIMIT, async {
        let (a, b) = mem::pair(CAPACITY);
        slow_receiver_bounds_sender(&a, &b, CAPACITY * FRAME).await;
    })
    .await
    .expect("test timed out");
}
