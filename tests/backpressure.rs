//! Backpressure at the link level and end to end: a receiver that does not read bounds
//! what its sender can hand to the link, to the link's buffering, over QUIC and over
//! the in-memory transport; a peer of a group that does not receive bounds how many
//! point-to-point messages its sender gets out, to the link's buffering plus the
//! receiver's per-tag queue (`transport::demux`, "Backpressure"). Once the receiver
//! reads, everything arrives, in order, and the sender goes on.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{cluster, net_group, with_timeout};
use phalanx::collective::DEFAULT_CHUNK_BYTES;
use phalanx::comm::DEFAULT_QUEUE_FRAMES;
use phalanx::comm::{ConnectOptions, DataTransport, RetryPolicy};
use phalanx::membership::master::MasterConfig;
use phalanx::transport::quic::{QuicConfig, QuicEndpoint};
use phalanx::transport::{mem, Frame, Header, Link};
use phalanx::Communicator;
use phalanx::MasterServer;

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
    let config = quic_config();
    tokio::time::timeout(LIMIT, async {
        let localhost = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let server = QuicEndpoint::bind(localhost, config.clone()).unwrap();
        let client = QuicEndpoint::bind(localhost, config.clone()).unwrap();
        let addr = server.local_addr().unwrap();
        let (a, accepted) = tokio::join!(client.connect(addr, Bytes::from_static(b"sender")), server.accept());
        let (a, (b, _)) = (a.unwrap(), accepted.unwrap());
        // The receiver's windows as it sized them from the round trip it measured: the
        // 2 MiB floor on loopback, up to the configured ceiling on a slow machine.
        let sizing = b.sizing();
        assert!(sizing.receive_window >= config.min_window && sizing.receive_window <= config.receive_window);
        let bound = quic_link_bound(b.stripes(), sizing.receive_window);
        eprintln!("QUIC link: {sizing:?}, at most {bound} bytes held");
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

const SECRET: &str = "test secret: 32 random bytes in real life";

/// The QUIC settings of these tests: the defaults (windows sized from the round trip,
/// BBR), with one connection per link and a ceiling of 8 MiB per window, so that the
/// bound stays far below [`UNBOUNDED`] however slowly a loaded machine answers the
/// handshake (a slow answer looks like a long path, which would mean more connections
/// and larger windows).
fn quic_config() -> QuicConfig {
    QuicConfig { connections_per_link: Some(1), receive_window: 8 << 20, ..QuicConfig::with_secret(SECRET) }
}

/// Payload bytes a QUIC link of `stripes` connections, each with a receive window of
/// `window` bytes, holds for a receiver that reads nothing.
fn quic_link_bound(stripes: usize, window: u64) -> usize {
    // A QUIC link buffers per stripe (see `transport::quic`, "Flow control and
    // buffering"): the receiver's connection window of unread bytes, plus one frame
    // queued in the one-frame channel and one being written on the sending side, and one
    // queued and one being read on the receiving side. One more frame of slack: the
    // window's edge may cut a frame in two.
    const CHANNEL_FRAMES: usize = 1;
    let per_stripe = window as usize + 2 * (CHANNEL_FRAMES + 1) * (Header::LEN + 8 + FRAME);
    stripes * per_stripe + FRAME
}

/// Point-to-point messages the end-to-end tests send: [`MESSAGES`] of [`MESSAGE`] bytes.
const MESSAGE: usize = 1 << 20;
const MESSAGES: usize = 64;
const TAG: u32 = 7;

/// Message `i`: every element says which message and where in it, so that a lost,
/// reordered or torn message shows.
fn message(i: usize) -> Vec<u64> {
    (0..MESSAGE / 8).map(|j| (i as u64) << 32 | j as u64).collect()
}

/// Rank 0 of `comms` sends [`MESSAGES`] messages to rank 1, which receives none until
/// the sender has made no progress for [`BLOCKED`]; the messages the sender got out by
/// then must fit in `bound` bytes (what the link and the receiver's queue hold). Then
/// rank 1 receives them all, intact and in order. Returns how many went out before.
fn slow_peer_bounds_sender(comms: &mut [Communicator], bound: usize) -> usize {
    assert!(bound * 4 <= MESSAGES * MESSAGE, "the bound of {bound} bytes is not far below what is sent");
    let sent = AtomicUsize::new(0);
    let (sender, receiver) = comms.split_at_mut(1);
    let (sender, receiver) = (&mut sender[0], &mut receiver[0]);
    // One message first, so the data link is open: the peer with the larger id waits
    // for the other to open it (see `comm::p2p`), which would look like a stall.
    std::thread::scope(|s| {
        s.spawn(|| sender.send(1, TAG + 1, &[1u64]).expect("send"));
        receiver.recv(0, TAG + 1, &mut [0u64]).expect("recv");
    });
    std::thread::scope(|s| {
        let sent = &sent;
        let sending = s.spawn(move || {
            for i in 0..MESSAGES {
                sender.send(1, TAG, &message(i)).expect("send");
                sent.fetch_add(1, Ordering::SeqCst);
            }
        });
        // Wait until the sender has made no progress for BLOCKED (or is done: a failure).
        let (mut last, mut since) = (sent.load(Ordering::SeqCst), Instant::now());
        while since.elapsed() < BLOCKED {
            std::thread::sleep(Duration::from_millis(20));
            let now = sent.load(Ordering::SeqCst);
            if now != last {
                (last, since) = (now, Instant::now());
            }
        }
        assert!(last > 0, "the sender got no message out at all");
        assert!(last < MESSAGES, "all {MESSAGES} messages went out to a peer that receives none");
        let held = last * MESSAGE;
        assert!(held <= bound, "{last} messages ({held} bytes) went out to a peer that receives none; bound {bound}");
        let mut buf = vec![0u64; MESSAGE / 8];
        for i in 0..MESSAGES {
            receiver.recv(0, TAG, &mut buf).expect("recv");
            assert!(buf == message(i), "message {i} arrived torn or out of order");
        }
        sending.join().expect("sender thread");
        last
    })
}

/// What the receiving peer holds beyond its link: a full queue of the tag and the frame
/// in the hand of the demux's read task.
const QUEUED: usize = (DEFAULT_QUEUE_FRAMES + 1) * DEFAULT_CHUNK_BYTES;

#[test]
fn slow_peer_bounds_sender_memory_mem() {
    with_timeout(120, || {
        let c = cluster();
        let mut comms = net_group(&c, 2, RetryPolicy::Never);
        // The cluster's in-memory links hold 16 frames each.
        let bound = 16 * DEFAULT_CHUNK_BYTES + QUEUED;
        let out = slow_peer_bounds_sender(&mut comms, bound);
        eprintln!("in-memory group: {out} messages of {MESSAGE} bytes went out before the sender blocked");
    });
}

#[test]
fn slow_peer_bounds_sender_memory_quic() {
    with_timeout(120, || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let config = quic_config();
        let master = rt.block_on(async {
            let ep = QuicEndpoint::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config.clone()).unwrap();
            MasterServer::spawn(Arc::new(ep), MasterConfig { initial_peers: 2, ..MasterConfig::default() })
        });
        let addr = master.addr();
        let mut comms: Vec<Communicator> = std::thread::scope(|s| {
            let joins: Vec<_> = (1..=2u64)
                .map(|id| {
                    // The bound below is QUIC's: data links over QUIC (TCP's are bounded by
                    // the kernel's buffers; see `transport::tcp`'s conformance tests).
                    let options = ConnectOptions::new()
                        .secret(SECRET)
                        .peer_id(id)
                        .quic(config.clone())
                        .data_transport(DataTransport::Quic);
                    s.spawn(move || Communicator::connect(addr, options).expect("connect"))
                })
                .collect();
            joins.into_iter().map(|j| j.join().expect("join thread")).collect()
        });
        comms.sort_by_key(|c| c.rank());
        // The windows' ceiling: the peers' links are out of reach here.
        let bound = quic_link_bound(1, config.receive_window) + QUEUED;
        let out = slow_peer_bounds_sender(&mut comms, bound);
        eprintln!("QUIC group: {out} messages of {MESSAGE} bytes went out before the sender blocked");
    });
}
