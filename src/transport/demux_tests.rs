//! Tests of [`Demux`](super::demux::Demux): frames reach their collectives, stale ones
//! are dropped, queues push back on the sender, and a link's end reaches every reader.

use std::sync::Arc;

use super::demux::*;
use super::{Frame, Link, LinkError};
use crate::transport::{mem, Header};
use bytes::Bytes;

fn frame(epoch: u64, seq: u64, index: u64) -> Frame {
    Frame { header: Header { epoch, seq, call: 0, index }, payload: Bytes::new() }
}

#[tokio::test]
async fn frames_reach_their_collective_and_stale_ones_are_dropped() {
    let (a, b) = mem::pair(16);
    let demux = Demux::new(Arc::new(b));
    let early = demux.op((1, 1));
    demux.finish((1, 0));
    for f in [frame(1, 0, 0), frame(1, 2, 0), frame(1, 1, 0), frame(0, 9, 0), frame(1, 1, 1)] {
        a.send(f).await.expect("send");
    }
    assert_eq!(early.recv().await.expect("recv").header.index, 0);
    assert_eq!(early.recv().await.expect("recv").header.index, 1);
    // Seq 2 arrived before anyone asked for it; it waits.
    let late = demux.op((1, 2));
    assert_eq!(late.recv().await.expect("recv").header.seq, 2);
    demux.raise_floor(2);
    a.send(frame(1, 3, 0)).await.expect("send");
    a.send(frame(2, 0, 0)).await.expect("send");
    assert_eq!(demux.op((2, 0)).recv().await.expect("recv").header.epoch, 2);
}

#[tokio::test]
async fn counters_see_every_frame_both_ways() {
    let (a, b) = mem::pair(16);
    let counters = Arc::new(LinkCounters::default());
    let (a, b) = (Demux::counted(Arc::new(a), 4, Arc::default()), Demux::counted(Arc::new(b), 4, counters.clone()));
    let payload =
        |n: usize| Frame { header: Header { epoch: 1, seq: 1, call: 0, index: 0 }, payload: Bytes::from(vec![7u8; n]) };
    let op = b.op((1, 1));
    op.send(payload(10)).await.expect("send");
    b.op((1, 2)).send(payload(0)).await.expect("send");
    a.op((1, 1)).send(payload(5)).await.expect("send");
    assert_eq!(op.recv().await.expect("recv").payload.len(), 5);
    assert_eq!(counters.load(), (2, 10, 1, 5));
}

#[tokio::test]
async fn closure_reaches_every_collective() {
    let (a, b) = mem::pair(16);
    let demux = Demux::new(Arc::new(b));
    let op = demux.op((0, 1));
    drop(a);
    assert!(matches!(op.recv().await, Err(LinkError::Closed(_))));
    assert!(demux.is_closed());
}

/// Sends frames of `key` on `a` until one `send` stays blocked for 200 ms; returns
/// how many went in.
async fn fill(a: &dyn Link, key: OpKey, limit: u64) -> u64 {
    let mut sent = 0;
    while sent < limit {
        let send = a.send(frame(key.0, key.1, sent));
        if tokio::time::timeout(std::time::Duration::from_millis(200), send).await.is_err() {
            break;
        }
        sent += 1;
    }
    sent
}

const LIMIT: std::time::Duration = std::time::Duration::from_secs(20);

#[tokio::test]
async fn a_slow_consumer_bounds_what_the_demux_holds() {
    const LINK: usize = 4;
    const QUEUE: usize = 8;
    tokio::time::timeout(LIMIT, async {
        let (a, b) = mem::pair(LINK);
        let demux = Demux::with_capacity(Arc::new(b), QUEUE);
        let op = demux.op((1, 1));
        // Nobody reads: the link's buffer, the frame in the read task's hand and the
        // queue are all the sender gets to fill.
        let sent = fill(&a, (1, 1), 1000).await;
        assert!(sent as usize <= LINK + QUEUE + 1, "{sent} frames went into a link holding {LINK} + {QUEUE} + 1");
        assert!(sent as usize >= QUEUE, "only {sent} frames went in");
        assert_eq!(demux.queued_frames(), QUEUE);
        // The consumer catches up: every frame arrives in order, and the sender goes on.
        let total = sent + 3 * QUEUE as u64;
        let send = async {
            for i in sent..total {
                a.send(frame(1, 1, i)).await.expect("send");
            }
        };
        let recv = async {
            for i in 0..total {
                assert_eq!(op.recv().await.expect("recv").header.index, i);
            }
        };
        tokio::join!(send, recv);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn ending_a_full_queue_unblocks_the_link() {
    tokio::time::timeout(LIMIT, async {
        let (a, b) = mem::pair(2);
        let demux = Demux::with_capacity(Arc::new(b), 2);
        // A collective that never drains its queue (say, it aborted): the link stalls
        // behind it until it is finished, and then its frames are dropped.
        let abandoned = demux.op((1, 1));
        let sent = fill(&a, (1, 1), 100).await;
        assert!(sent <= 5, "{sent} frames went in");
        demux.finish((1, 1));
        a.send(frame(1, 2, 0)).await.expect("send once the queue is gone");
        assert_eq!(demux.op((1, 2)).recv().await.expect("recv").header.seq, 2);
        assert!(matches!(abandoned.recv().await, Err(LinkError::Closed(_))));
        // The same for frames of a collective this side never started, when a new
        // view raises the floor above their epoch.
        let sent = fill(&a, (1, 3), 100).await;
        assert!(sent <= 5, "{sent} frames went in");
        demux.raise_floor(2);
        a.send(frame(2, 0, 0)).await.expect("send once the old epoch is dropped");
        assert_eq!(demux.op((2, 0)).recv().await.expect("recv").header.epoch, 2);
        assert_eq!(demux.queued_frames(), 0);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn queued_frames_stay_readable_after_the_link_closes() {
    let (a, b) = mem::pair(4);
    let demux = Demux::new(Arc::new(b));
    a.send(frame(0, 1, 0)).await.expect("send");
    drop(a);
    tokio::time::timeout(LIMIT, async {
        while !demux.is_closed() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("closure seen");
    let op = demux.op((0, 1));
    assert_eq!(op.recv().await.expect("recv").header.index, 0);
    assert!(matches!(op.recv().await, Err(LinkError::Closed(_))));
}

/// A link that delivers frames from its own thread (shared memory): they reach their
/// collectives in order without a read task, a full queue stops the sender (through the
/// ring) until the collective reads, and the link's end reaches every collective after
/// its queued frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_delivers_from_its_own_thread_feeds_the_queues() {
    const QUEUE: usize = 2;
    tokio::time::timeout(LIMIT, async {
        let (a, b) = crate::transport::shm::link::heap_pair(4096, 1 << 20);
        let b = Arc::new(b);
        let demux = Demux::with_capacity(b.clone(), QUEUE);
        assert!(b.recv().await.is_err(), "frames go to the demultiplexer, not to recv");
        let (one, two) = (demux.op((1, 1)), demux.op((1, 2)));
        // Nobody reads collective 1: its queue and the 4 KiB ring are all the sender fills.
        let big = |seq, index| Frame {
            header: Header { epoch: 1, seq, call: 0, index },
            payload: Bytes::from(vec![index as u8; 1000]),
        };
        let mut sent = 0;
        while sent < 100 {
            match tokio::time::timeout(std::time::Duration::from_millis(200), a.send(big(1, sent))).await {
                Ok(r) => r.expect("send"),
                Err(_) => break,
            }
            sent += 1;
        }
        assert!(
            (QUEUE as u64..=QUEUE as u64 + 6).contains(&sent),
            "{sent} frames of 1000 bytes went into a queue of {QUEUE} and a 4 KiB ring"
        );
        assert_eq!(demux.queued_frames(), QUEUE);
        // Collective 2's frames wait behind the full queue; reading collective 1 lets
        // everything through, in order.
        let send = async {
            a.send(big(2, 0)).await.expect("send");
            a.send(big(1, sent)).await.expect("send");
        };
        let recv = async {
            for i in 0..=sent {
                assert_eq!(one.recv().await.expect("recv"), big(1, i));
            }
            assert_eq!(two.recv().await.expect("recv"), big(2, 0));
        };
        tokio::join!(send, recv);
        a.send(big(2, 1)).await.expect("send");
        a.close();
        assert_eq!(two.recv().await.expect("a frame sent before the close"), big(2, 1));
        assert!(matches!(two.recv().await, Err(LinkError::Closed(_))));
        assert!(matches!(one.recv().await, Err(LinkError::Closed(_))));
        assert!(demux.is_closed());
    })
    .await
    .expect("test timed out");
}
