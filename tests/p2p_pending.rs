//! Non-blocking point-to-point messages (`isend`/`irecv`) on local groups and on
//! networked groups (in-memory network): both directions at once, many in flight out
//! of order, ordering with blocking calls, a lost peer, dropped handles.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::{cluster, each, net_group, with_timeout, Cluster};
use phalanx::collective::Tuning;
use phalanx::comm::RetryPolicy;
use phalanx::{Communicator, Config, Error, ReduceOp};

fn group(networked: bool, n: u16) -> (Option<Cluster>, Vec<Communicator>) {
    if networked {
        let c = cluster();
        let comms = net_group(&c, n, RetryPolicy::Never);
        (Some(c), comms)
    } else {
        (None, Communicator::local_group(n as usize, Default::default()).unwrap())
    }
}

/// Small chunks and links of two frames: a large message far exceeds what the
/// transport buffers, so two blocking sends towards each other would both block.
fn tight() -> Vec<Communicator> {
    let config = Config { tuning: Tuning { chunk_bytes: 4096, ..Tuning::default() }, link_capacity: 2 };
    Communicator::local_group(2, config).unwrap()
}

fn message(tag: u32, len: usize) -> Vec<f32> {
    (0..len).map(|i| (tag as usize * 7919 + i) as f32).collect()
}

/// Every rank of a pair sends a large message to the other first, then receives.
fn both_ways_at_once(comms: &mut [Communicator]) {
    const LEN: usize = 1 << 20; // 4 MiB of f32
    let out = each(comms, |r, c| {
        if r > 1 {
            return None;
        }
        let peer = 1 - r;
        let send = c.isend(peer, 4, message(r as u32, LEN)).unwrap();
        let recv = c.irecv(peer, 4, vec![-1f32; LEN]).unwrap();
        let (sent, data) = send.wait();
        sent.unwrap();
        assert_eq!(data, message(r as u32, LEN), "a send gives its data back");
        let (received, buf) = recv.wait();
        received.unwrap();
        Some(buf)
    });
    assert_eq!(out[0].as_deref(), Some(&message(1, LEN)[..]));
    assert_eq!(out[1].as_deref(), Some(&message(0, LEN)[..]));
}

/// Rank 0 starts 32 sends on distinct tags (and two on one tag) at once; rank 1
/// starts the receives in reverse tag order and waits on them in yet another order.
fn many_out_of_order(comms: &mut [Communicator]) {
    const TAGS: u32 = 32;
    let len = |tag: u32| (tag as usize % 5) * 100; // one chunk each, some empty
    let out = each(comms, |r, c| match r {
        0 => {
            let sends: Vec<_> = (0..TAGS).map(|t| c.isend(1, t, message(t, len(t))).unwrap()).collect();
            let same = [c.isend(1, 100, vec![1u64, 2]).unwrap(), c.isend(1, 100, vec![3u64, 4]).unwrap()];
            for s in sends {
                s.wait().0.unwrap();
            }
            for s in same {
                s.wait().0.unwrap();
            }
            None
        }
        1 => {
            let recvs: Vec<_> = (0..TAGS).rev().map(|t| (t, c.irecv(0, t, vec![-1f32; len(t)]).unwrap())).collect();
            let first = c.irecv(0, 100, vec![0u64; 2]).unwrap();
            let second = c.irecv(0, 100, vec![0u64; 2]).unwrap();
            // Wait on the later same-tag receive first: it still gets the later message.
            let (r2, b2) = second.wait();
            let (r1, b1) = first.wait();
            r2.unwrap();
            r1.unwrap();
            let mut got = Vec::new();
            // Even tags, then odd ones.
            let (even, odd): (Vec<_>, Vec<_>) = recvs.into_iter().partition(|(t, _)| t % 2 == 0);
            for (t, h) in even.into_iter().chain(odd) {
                let (res, buf) = h.wait();
                res.unwrap();
                got.push((t, buf));
            }
            Some((got, b1, b2))
        }
        _ => None,
    });
    let (got, b1, b2) = out[1].clone().unwrap();
    assert_eq!(got.len(), TAGS as usize);
    for (t, buf) in got {
        assert_eq!(buf, message(t, len(t)), "tag {t}");
    }
    assert_eq!((b1, b2), (vec![1, 2], vec![3, 4]), "same-tag messages keep their call order");
}

/// Blocking and non-blocking calls on one `(peer, tag, direction)` keep call order.
fn mixed_with_blocking(comms: &mut [Communicator]) {
    let out = each(comms, |r, c| match r {
        0 => {
            let a = c.isend(1, 6, vec![1u32; 3]).unwrap();
            c.send(1, 6, &[2u32; 3]).unwrap();
            let b = c.isend(1, 6, vec![3u32; 3]).unwrap();
            a.wait().0.unwrap();
            b.wait().0.unwrap();
            let mut x = vec![1u8; 4];
            c.all_reduce(&mut x, ReduceOp::Sum).unwrap();
            None
        }
        1 => {
            let first = c.irecv(0, 6, vec![0u32; 3]).unwrap();
            let mut second = [0u32; 3];
            c.recv(0, 6, &mut second).unwrap();
            let third = c.irecv(0, 6, vec![0u32; 3]).unwrap();
            let mut x = vec![1u8; 4];
            c.all_reduce(&mut x, ReduceOp::Sum).unwrap();
            let (r3, b3) = third.wait();
            let (r1, b1) = first.wait();
            r1.unwrap();
            r3.unwrap();
            Some((b1[0], second[0], b3[0], x[0]))
        }
        _ => {
            let mut x = vec![1u8; 4];
            c.all_reduce(&mut x, ReduceOp::Sum).unwrap();
            None
        }
    });
    assert_eq!(out[1], Some((1, 2, 3, comms.len() as u8)));
}

/// A receive of the wrong length fails with `Mismatch`, its buffer untouched, and the
/// next message on the tag arrives intact.
fn mismatch(comms: &mut [Communicator]) {
    let out = each(comms, |r, c| match r {
        0 => {
            c.isend(1, 2, vec![5u16; 10]).unwrap().wait().0.unwrap();
            c.isend(1, 2, vec![6u16; 4]).unwrap().wait().0.unwrap();
            None
        }
        1 => {
            let (e, buf) = c.irecv(0, 2, vec![9u16; 4]).unwrap().wait();
            let (ok, next) = c.irecv(0, 2, vec![0u16; 4]).unwrap().wait();
            ok.unwrap();
            Some((e.unwrap_err(), buf, next))
        }
        _ => None,
    });
    let (e, buf, next) = out[1].clone().unwrap();
    assert!(matches!(e, Error::Mismatch { .. }), "{e}");
    assert_eq!((buf, next), (vec![9; 4], vec![6; 4]));
}

/// Rank 1 waits on a receive rank 0 never sends: rank 0 drops its communicator.
/// The handle's wait gives `PeerLost`, its buffer untouched, without hanging.
fn a_lost_peer(mut comms: Vec<Communicator>) {
    let _bystanders = comms.split_off(2);
    let mut c1 = comms.pop().unwrap();
    let c0 = comms.pop().unwrap();
    let (go, started) = mpsc::channel();
    let out = std::thread::scope(|s| {
        s.spawn(move || {
            started.recv().unwrap();
            std::thread::sleep(Duration::from_millis(100));
            drop(c0);
        });
        let pending = c1.irecv(0, 1, vec![3u8; 1 << 20]).unwrap();
        assert!(!pending.is_done(), "no message was sent yet");
        go.send(()).unwrap();
        pending.wait()
    });
    let (e, buf) = out;
    let e = e.unwrap_err();
    assert!(matches!(e, Error::PeerLost { rank: 0, .. }), "{e}");
    assert_eq!(buf.len(), 1 << 20);
    assert!(buf.iter().all(|&b| b == 3), "the receive buffer is untouched");
}

/// A dropped receive handle still takes its message (the next receive on the tag gets
/// the next one), and the communicator goes on; a dropped handle that never completes
/// does not keep the communicator from being dropped.
fn dropped_handles(comms: &mut [Communicator]) {
    let (go, ready) = mpsc::channel();
    let ready = std::sync::Mutex::new(ready);
    let out = each(comms, |r, c| match r {
        0 => {
            ready.lock().unwrap().recv().unwrap();
            c.send(1, 8, &[1i32; 2]).unwrap();
            c.send(1, 8, &[2i32; 2]).unwrap();
            let mut x = vec![1.0f64; 2];
            c.all_reduce(&mut x, ReduceOp::Sum).unwrap();
            None
        }
        1 => {
            drop(c.irecv(0, 8, vec![0i32; 2]).unwrap());
            go.send(()).unwrap();
            let mut next = [0i32; 2];
            c.recv(0, 8, &mut next).unwrap();
            let mut x = vec![1.0f64; 2];
            c.all_reduce(&mut x, ReduceOp::Sum).unwrap();
            // Never matched: dropped with the communicator.
            drop(c.irecv(0, 9, vec![0u8; 16]).unwrap());
            Some(next)
        }
        _ => {
            let mut x = vec![1.0f64; 2];
            c.all_reduce(&mut x, ReduceOp::Sum).unwrap();
            None
        }
    });
    assert_eq!(out[1], Some([2, 2]), "the dropped receive took the first message");
}

#[test]
fn local_both_ways_at_once() {
    with_timeout(60, || both_ways_at_once(&mut group(false, 2).1));
}

#[test]
fn tight_links_both_ways_at_once() {
    with_timeout(60, || both_ways_at_once(&mut tight()));
}

#[test]
fn net_both_ways_at_once() {
    with_timeout(60, || both_ways_at_once(&mut group(true, 3).1));
}

#[test]
fn local_many_out_of_order() {
    with_timeout(60, || many_out_of_order(&mut group(false, 2).1));
}

#[test]
fn net_many_out_of_order() {
    with_timeout(60, || {
        let (_c, mut comms) = group(true, 2);
        many_out_of_order(&mut comms);
        many_out_of_order(&mut comms);
    });
}

#[test]
fn local_mixed_with_blocking() {
    with_timeout(60, || mixed_with_blocking(&mut group(false, 3).1));
}

#[test]
fn net_mixed_with_blocking() {
    with_timeout(60, || mixed_with_blocking(&mut group(true, 3).1));
}

#[test]
fn local_mismatch() {
    with_timeout(60, || mismatch(&mut group(false, 2).1));
}

#[test]
fn bad_arguments() {
    let mut comms = group(false, 2).1;
    assert!(matches!(comms[0].isend(0, 1, vec![1u8]), Err(Error::InvalidArgument(_))));
    assert!(matches!(comms[0].irecv(2, 1, vec![1u8]), Err(Error::InvalidArgument(_))));
    assert!(matches!(comms[0].isend_raw(1, 1, vec![0u8; 3], phalanx::DType::F32), Err(Error::InvalidArgument(_))));
}

#[test]
fn local_lost_peer() {
    with_timeout(60, || a_lost_peer(group(false, 3).1));
}

#[test]
fn net_lost_peer() {
    with_timeout(60, || {
        let (_c, comms) = group(true, 3);
        a_lost_peer(comms);
    });
}

#[test]
fn local_dropped_handles() {
    with_timeout(60, || {
        let mut comms = group(false, 3).1;
        dropped_handles(&mut comms);
        drop(comms);
    });
}

#[test]
fn net_dropped_handles() {
    with_timeout(60, || {
        let (_c, mut comms) = group(true, 3);
        dropped_handles(&mut comms);
        drop(comms);
    });
}

/// Every communicator of `comms` sees a member gone: its barrier fails with `PeerLost`
/// or `Aborted`, with no hang.
fn the_others_see_a_member_gone(comms: &mut [Communicator]) {
    let out = each(comms, |_, c| c.barrier());
    for (r, res) in out.into_iter().enumerate() {
        let e = res.expect_err("a member is gone");
        assert!(matches!(e, Error::PeerLost { .. } | Error::Aborted { .. }), "rank {r}: {e}");
    }
}

/// A peer that drops its communicator while one of its sends still waits for the other
/// end to open their link (the larger id waits to be connected to) is lost to the
/// others at once: the waiting task gives up with the data links instead of keeping the
/// peer's control connection, and so the peer, alive. The pipeline runner's overlapped
/// sends found this: a failed stage's neighbours waited forever.
fn a_dropped_peer_with_a_send_waiting_for_its_link(mut comms: Vec<Communicator>) {
    let mut c2 = comms.pop().unwrap();
    // Rank 1 never calls anything with rank 2, so their link is never opened.
    drop(c2.isend(1, 5, vec![7u8; 64]).unwrap());
    drop(c2);
    the_others_see_a_member_gone(&mut comms);
}

#[test]
fn local_dropped_peer_with_a_send_waiting_for_its_link() {
    with_timeout(60, || a_dropped_peer_with_a_send_waiting_for_its_link(group(false, 3).1));
}

/// A peer that drops its communicator while one of its receives, on a link already
/// open, waits for a message that will not come (its handle dropped, as a failed
/// pipeline stage leaves the receives it posted ahead) is lost to the others at once:
/// a task still running must not keep the peer's control connection, and so the peer,
/// alive (the communicator's drop stops the connection itself).
fn a_dropped_peer_with_a_receive_waiting_on_an_open_link(mut comms: Vec<Communicator>) {
    // Ranks 1 and 2 open their link with one message each way (the smaller id opens
    // it; the pipeline runner's lost stage waited on the stage after it).
    let out = each(&mut comms, |r, c| match r {
        1 => c.send(2, 1, &[1u8; 8]).and_then(|()| c.recv(2, 1, &mut [0u8; 8])),
        2 => c.recv(1, 1, &mut [0u8; 8]).and_then(|()| c.send(1, 1, &[2u8; 8])),
        _ => Ok(()),
    });
    assert!(out.iter().all(Result::is_ok), "{out:?}");
    let mut c2 = comms.remove(2);
    drop(c2.irecv(1, 9, vec![0u8; 8]).unwrap()); // never sent
    drop(c2);
    the_others_see_a_member_gone(&mut comms);
}

#[test]
fn local_dropped_peer_with_a_receive_waiting_on_an_open_link() {
    with_timeout(60, || a_dropped_peer_with_a_receive_waiting_on_an_open_link(group(false, 4).1));
}

#[test]
fn net_dropped_peer_with_a_receive_waiting_on_an_open_link() {
    with_timeout(60, || {
        let (_cluster, comms) = group(true, 4);
        a_dropped_peer_with_a_receive_waiting_on_an_open_link(comms)
    });
}
