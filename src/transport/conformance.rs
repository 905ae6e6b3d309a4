//! The tests every [`Link`] implementation must pass.
//!
//! Each function takes a freshly connected pair of ends and panics on a violation; a
//! transport's test module calls them all (see the tests of [`super::mem`]). Public so
//! that transports outside this crate can run them too.

use std::time::Duration;

use bytes::Bytes;

use super::{Frame, Header, Link, LinkError};

fn frame(i: u32, len: usize) -> Frame {
    let payload: Vec<u8> = (0..len).map(|b| (b as u32).wrapping_mul(31).wrapping_add(i) as u8).collect();
    Frame { header: Header { epoch: 1, seq: 2, call: 3, index: i as u64 * 7 }, payload: Bytes::from(payload) }
}

/// Frames arrive in order with headers and payloads intact, both ways at once,
/// including empty payloads and payloads of `big` bytes, whether sent as frames or as
/// slices ([`Link::send_slice`], every third frame).
pub async fn ordered_both_ways(a: &dyn Link, b: &dyn Link, big: usize) {
    // Two large frames in a row, then small ones: a reader may read differently after a
    // large frame (`tcp::frames::ReadAhead`).
    let sizes = [0usize, 1, 7, 4096, big, big, 4096];
    let count = 64u32;
    async fn send_all(l: &dyn Link, sizes: &[usize], count: u32) {
        for i in 0..count {
            let f = frame(i, sizes[i as usize % sizes.len()]);
            // A conformance test panics on a violation.
            let sent = if i % 3 == 1 { l.send_slice(f.header, &f.payload).await } else { l.send(f).await };
            sent.expect("send"); // ok: a test's check
        }
    }
    async fn recv_all(l: &dyn Link, sizes: &[usize], count: u32) {
        for i in 0..count {
            let got = l.recv().await.expect("recv"); // ok: a conformance test panics on a violation
            assert_eq!(got, frame(i, sizes[i as usize % sizes.len()]), "frame {i}");
        }
    }
    tokio::join!(
        send_all(a, &sizes, count),
        recv_all(b, &sizes, count),
        send_all(b, &sizes, count),
        recv_all(a, &sizes, count)
    );
}

/// A sender blocks once the link's buffer is full instead of queueing without bound;
/// `at_most` frames of `len` bytes may be accepted before it does.
pub async fn bounded(a: &dyn Link, b: &dyn Link, at_most: usize, len: usize) {
    let mut sent = 0;
    loop {
        match tokio::time::timeout(Duration::from_millis(200), a.send(frame(sent as u32, len))).await {
            Ok(r) => r.expect("send"), // ok: a conformance test panics on a violation
            Err(_) => break,
        }
        sent += 1;
        assert!(sent <= at_most, "link accepted {sent} unreceived frames of {len} bytes");
    }
    // The peer still receives what was accepted, in order.
    for i in 0..sent {
        assert_eq!(b.recv().await.expect("recv").header.index, i as u64 * 7); // ok: a conformance test panics on a violation
    }
}

/// Closing one end fails the other end's pending receive and later sends.
pub async fn close_is_seen(a: &dyn Link, b: &dyn Link) {
    let pending = async { b.recv().await };
    let closer = async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        a.close();
    };
    let (got, ()) = tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(pending, closer) })
        .await
        .expect("a pending recv must end when the peer closes"); // ok: a conformance test panics on a violation
    assert!(matches!(got, Err(LinkError::Closed(_))), "got {got:?}");
    let mut failed = false;
    for i in 0..1000 {
        // A transport may accept a few frames into its buffer before it notices.
        let r = tokio::time::timeout(Duration::from_secs(5), b.send(frame(i, 8))).await.expect("send must not hang"); // ok: a conformance test panics on a violation
        if r.is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "sends to a closed peer kept succeeding");
    assert!(a.recv().await.is_err(), "the closed end's own recv fails");
}

/// Cancelled calls lose nothing: receives cancelled on an idle link, then sends of
/// `frame(i, 16 KiB)` until one blocks and is cancelled; every frame sent arrives whole
/// and in order, the cancelled one whole or not at all, and the link still carries a
/// frame after.
pub async fn cancel_safe(a: &dyn Link, b: &dyn Link, frame: impl Fn(u64, usize) -> Frame) {
    for _ in 0..3 {
        assert!(tokio::time::timeout(Duration::from_millis(20), b.recv()).await.is_err());
    }
    let mut sent = 0u64;
    while tokio::time::timeout(Duration::from_millis(200), a.send(frame(sent, 16 << 10))).await.is_ok() {
        sent += 1;
    }
    for i in 0..sent {
        assert_eq!(b.recv().await.unwrap(), frame(i, 16 << 10)); // ok: a suite that panics on a violation
    }
    a.send(frame(sent, 3)).await.unwrap(); // ok: a suite that panics on a violation
                                           // The cancelled send handed over its whole frame (it had begun writing it) or none.
    let next = b.recv().await.unwrap(); // ok: a suite that panics on a violation
    if next != frame(sent, 3) {
        assert!(next == frame(sent, 16 << 10), "a cancelled send delivered part of its frame: {:?}", next.header);
        assert_eq!(b.recv().await.unwrap(), frame(sent, 3)); // ok: a suite that panics on a violation
    }
}
