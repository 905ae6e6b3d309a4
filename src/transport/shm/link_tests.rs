//! Tests of [`super::ShmLink`]: the conformance suite on heap-backed pairs, and what
//! only a shared-memory link does (`send_slice` cancelled mid-frame, a close while
//! it waits for room).

use bytes::Bytes;

use super::*;
use crate::transport::conformance;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn frame(i: u64, len: usize) -> Frame {
    Frame { header: Header { index: i, ..Header::default() }, payload: Bytes::from(vec![i as u8; len]) }
}

#[test]
fn conformance_ordered_both_ways() {
    let (a, b) = heap_pair(64 << 10, 8 << 20);
    rt().block_on(conformance::ordered_both_ways(&a, &b, 1 << 20));
}

#[test]
fn a_cancelled_send_slice_still_sends_its_frame_whole() {
    let (a, b) = heap_pair(64 << 10, 8 << 20);
    rt().block_on(async {
        // Larger than the ring: the call waits for room once part of it is written.
        let big = frame(1, 200 << 10);
        let cancelled = tokio::time::timeout(Duration::from_millis(50), a.send_slice(big.header, &big.payload)).await;
        assert!(cancelled.is_err(), "the ring cannot hold the frame before the peer reads");
        let small = frame(2, 10);
        let send = async { a.send_slice(small.header, &small.payload).await.unwrap() };
        let recv = async { (b.recv().await.unwrap(), b.recv().await.unwrap()) };
        let ((), got) =
            tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(send, recv) }).await.unwrap();
        assert_eq!(got, (big, small));
    });
}

#[test]
fn a_send_slice_waiting_for_room_fails_when_the_peer_closes() {
    let (a, b) = heap_pair(64 << 10, 8 << 20);
    rt().block_on(async {
        let big = frame(1, 200 << 10);
        let closer = async {
            tokio::time::sleep(Duration::from_millis(30)).await;
            b.close();
        };
        let (sent, ()) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(a.send_slice(big.header, &big.payload), closer)
        })
        .await
        .expect("a send_slice waiting for room must end when the peer closes");
        assert!(matches!(sent, Err(LinkError::Closed(_))), "{sent:?}");
    });
}

#[test]
fn conformance_bounded() {
    let (a, b) = heap_pair(64 << 10, 8 << 20);
    // 64 KiB of ring holds 3 frames of 16 KiB (with their prefixes) and part of a
    // fourth; one more waits in the writer thread and one in the channel, and the
    // reader thread holds one and the receive channel another.
    rt().block_on(conformance::bounded(&a, &b, 8, 16 << 10));
}

#[test]
fn conformance_close_is_seen() {
    let (a, b) = heap_pair(64 << 10, 8 << 20);
    rt().block_on(conformance::close_is_seen(&a, &b));
    let (a, b) = heap_pair(64 << 10, 8 << 20);
    rt().block_on(conformance::close_is_seen(&b, &a));
}

#[test]
fn frames_over_the_limit_are_refused_on_send() {
    let (a, b) = heap_pair(4096, Header::LEN + 100);
    rt().block_on(async {
        let err = a.send(frame(0, 101)).await.unwrap_err();
        assert_eq!(err, LinkError::FrameTooLarge { len: Header::LEN + 101, limit: Header::LEN + 100 });
        a.send(frame(1, 100)).await.unwrap();
        assert_eq!(b.recv().await.unwrap(), frame(1, 100));
    });
}

#[test]
fn a_full_ring_blocks_the_sender_until_the_receiver_reads() {
    let (a, b) = heap_pair(4096, 1 << 20);
    rt().block_on(async {
        // A 100 KiB frame through a 4 KiB ring: `send` leaves most of it to the
        // writer thread, which waits for room 25 times while the receiver reads.
        a.send(frame(0, 100 << 10)).await.unwrap();
        // The next frame has to wait for the first: a cancelled send hands over
        // nothing.
        let blocked = tokio::time::timeout(Duration::from_millis(300), a.send(frame(9, 100 << 10))).await;
        assert!(blocked.is_err(), "a full link must block the sender");
        assert_eq!(b.recv().await.unwrap(), frame(0, 100 << 10));
        assert!(tokio::time::timeout(Duration::from_millis(100), b.recv()).await.is_err(), "frame 9 was sent");
        // Both ways at once, many frames larger than the ring.
        let sending = async {
            for i in 1..20 {
                a.send(frame(i, 10_000 + i as usize)).await.unwrap();
            }
        };
        let receiving = async {
            for i in 1..20 {
                assert_eq!(b.recv().await.unwrap(), frame(i, 10_000 + i as usize));
            }
        };
        tokio::join!(sending, receiving);
    });
}

#[test]
fn many_senders_at_once_all_get_through() {
    // Non-blocking sends on many tags share one link: several `send`s wait at once
    // for the writer thread to finish a large frame, and every one of them must be
    // woken (one wake-up per finished frame left all but the first waiting forever
    // once that one's small frame fitted in the ring at once).
    let (a, b) = heap_pair(4096, 1 << 20);
    let a = Arc::new(a);
    rt().block_on(async {
        a.send(frame(999, 100 << 10)).await.unwrap(); // left to the writer thread
        let senders: Vec<_> = (0..8u64)
            .map(|t| {
                let a = a.clone();
                tokio::spawn(async move {
                    for i in 0..5 {
                        a.send(frame(t * 100 + i, if i % 2 == 0 { 64 } else { 10_000 })).await.unwrap();
                    }
                })
            })
            .collect();
        // Let every sender wait behind the large frame before reading.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(b.recv().await.unwrap().header.index, 999);
        let mut next = [0u64; 8];
        for _ in 0..8 * 5 {
            let f = tokio::time::timeout(Duration::from_secs(5), b.recv()).await.expect("a sender was never woken");
            let i = f.unwrap().header.index;
            // Each sender's frames arrive in its order.
            assert_eq!(i % 100, next[(i / 100) as usize]);
            next[(i / 100) as usize] += 1;
        }
        for s in senders {
            s.await.unwrap();
        }
    });
}

#[test]
fn frames_published_before_a_close_are_delivered() {
    let (a, b) = heap_pair(64 << 10, 1 << 20);
    rt().block_on(async {
        a.send(frame(1, 10)).await.unwrap();
        // The frame is in the ring once the writer thread has taken the next one.
        a.send(frame(2, 10)).await.unwrap();
        assert_eq!(b.recv().await.unwrap(), frame(1, 10));
        a.close();
        // Frame 2 may or may not have made it before the close; then Closed.
        let next = b.recv().await;
        let next = if next.is_ok() { b.recv().await } else { next };
        assert!(matches!(next, Err(LinkError::Closed(ref why)) if why.contains("peer")), "{next:?}");
    });
}

#[test]
fn a_failure_ends_a_pending_recv_and_later_sends() {
    let (a, _b) = heap_pair(4096, 1 << 20);
    let a = Arc::new(a);
    rt().block_on(async {
        let waiting = a.clone();
        let pending = tokio::spawn(async move { waiting.recv().await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        a.shared().fail("the peer process exited".into());
        let r = tokio::time::timeout(Duration::from_secs(5), pending).await.unwrap().unwrap();
        assert!(matches!(r, Err(LinkError::Closed(ref why)) if why.contains("exited")), "{r:?}");
        assert!(a.send(frame(0, 1)).await.is_err(), "a failed link refuses sends");
    });
}
