//! Tagged point-to-point messages on local groups and on networked groups (in-memory
//! network): several tags out of order, same-tag order, large messages, length
//! mismatches, interleaving with collectives, and a lost peer.

mod common;

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

fn message(tag: u32, len: usize) -> Vec<f32> {
    (0..len).map(|i| (tag as usize * 7919 + i) as f32).collect()
}

/// Rank 0 sends tags 1, 2, 3 (the last several chunks long) and tag 5 twice; rank 1
/// receives 3, 5, 1, 5, 2. Ranks 2.. stay out of it.
fn tags_out_of_order(comms: &mut [Communicator]) {
    let lens = [(1u32, 10usize), (2, 0), (3, 1_000_000)];
    let out = each(comms, |r, c| match r {
        0 => {
            for &(tag, len) in &lens {
                c.send(1, tag, &message(tag, len)).unwrap();
            }
            c.send(1, 5, &[1u64, 2]).unwrap();
            c.send(1, 5, &[3u64, 4]).unwrap();
            None
        }
        1 => {
            let mut got = Vec::new();
            for tag in [3, 1, 2] {
                let mut buf = vec![-1f32; lens[tag as usize - 1].1];
                c.recv(0, tag, &mut buf).unwrap();
                got.push((tag, buf));
            }
            let mut first = [0u64; 2];
            c.recv(0, 5, &mut first).unwrap();
            let mut second = [0u64; 2];
            c.recv(0, 5, &mut second).unwrap();
            Some((got, first, second))
        }
        _ => None,
    });
    let (got, first, second) = out[1].clone().unwrap();
    for (tag, buf) in got {
        assert_eq!(buf, message(tag, lens[tag as usize - 1].1), "tag {tag}");
    }
    assert_eq!((first, second), ([1, 2], [3, 4]), "same-tag messages keep their order");
}

/// Both directions at once, interleaved with a whole-group all-reduce.
fn both_ways_around_a_collective(comms: &mut [Communicator]) {
    let n = comms.len();
    let out = each(comms, |r, c| {
        let peer = r ^ 1;
        if peer < n {
            c.send(peer, 9, &vec![r as i16; 300_000]).unwrap();
        }
        let mut x = vec![1u32; 50];
        c.all_reduce(&mut x, ReduceOp::Sum).unwrap();
        let mut got = vec![0i16; 300_000];
        if peer < n {
            c.recv(peer, 9, &mut got).unwrap();
        }
        (x, got.first().copied(), got.last().copied())
    });
    for (r, (x, first, last)) in out.iter().enumerate() {
        assert!(x.iter().all(|&v| v == n as u32));
        if r ^ 1 < n {
            assert_eq!((*first, *last), (Some((r ^ 1) as i16), Some((r ^ 1) as i16)));
        }
    }
}

/// A receive of the wrong length or type fails with `Mismatch`, leaves the buffer as it
/// was, and consumes the message: the next one on the tag is received intact.
fn mismatches(comms: &mut [Communicator]) {
    let out = each(comms, |r, c| match r {
        0 => {
            c.send(1, 4, &message(4, 700_000)).unwrap();
            c.send(1, 4, &[1.5f64]).unwrap();
            c.send(1, 4, &message(4, 3)).unwrap();
            None
        }
        1 => {
            let mut short = vec![9f32; 5];
            let e1 = c.recv(0, 4, &mut short).unwrap_err();
            assert_eq!(short, vec![9f32; 5]);
            let mut wrong_type = [0u64; 1];
            let e2 = c.recv(0, 4, &mut wrong_type).unwrap_err();
            let mut ok = vec![0f32; 3];
            c.recv(0, 4, &mut ok).unwrap();
            Some((e1, e2, ok))
        }
        _ => None,
    });
    let (e1, e2, ok) = out[1].clone().unwrap();
    assert!(matches!(e1, Error::Mismatch { .. }), "{e1}");
    assert!(matches!(e2, Error::Mismatch { .. }), "{e2}");
    assert_eq!(ok, message(4, 3));
}

fn bad_peers(comms: &mut [Communicator]) {
    let c = &mut comms[0];
    assert!(matches!(c.send(0, 1, &[1u8]), Err(Error::InvalidArgument(_))));
    assert!(matches!(c.recv(5, 1, &mut [1u8]), Err(Error::InvalidArgument(_))));
}

/// Rank 1 waits for a message rank 0 never sends: rank 0 dies instead. Rank 1 gets
/// `PeerLost` with its buffer as before, without hanging.
fn a_lost_peer(mut comms: Vec<Communicator>) {
    let _bystanders = comms.split_off(2); // alive throughout
    let out: Vec<Option<(Error, Vec<u8>)>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(r, mut c)| {
                s.spawn(move || match r {
                    0 => {
                        // One message arrives; the second never does.
                        c.send(1, 1, &[7u8; 5]).unwrap();
                        std::thread::sleep(Duration::from_millis(300));
                        drop(c);
                        None
                    }
                    1 => {
                        let mut first = [0u8; 5];
                        c.recv(0, 1, &mut first).unwrap();
                        assert_eq!(first, [7; 5]);
                        let mut buf = vec![3u8; 1 << 20];
                        let e = c.recv(0, 1, &mut buf).unwrap_err();
                        Some((e, buf))
                    }
                    _ => None,
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (e, buf) = out[1].clone().unwrap();
    assert!(matches!(e, Error::PeerLost { rank: 0, .. }), "{e}");
    assert!(buf.iter().all(|&b| b == 3));
}

#[test]
fn local_tags_out_of_order() {
    with_timeout(60, || tags_out_of_order(&mut group(false, 3).1));
}

#[test]
fn local_tags_out_of_order_in_small_chunks() {
    let config = Config { tuning: Tuning { chunk_bytes: 4096, ..Tuning::default() }, link_capacity: 4 };
    with_timeout(60, || tags_out_of_order(&mut Communicator::local_group(2, config).unwrap()));
}

#[test]
fn net_tags_out_of_order() {
    with_timeout(60, || {
        let (_c, mut comms) = group(true, 3);
        tags_out_of_order(&mut comms);
        tags_out_of_order(&mut comms);
    });
}

#[test]
fn local_both_ways_around_a_collective() {
    with_timeout(60, || both_ways_around_a_collective(&mut group(false, 3).1));
}

#[test]
fn net_both_ways_around_a_collective() {
    with_timeout(60, || both_ways_around_a_collective(&mut group(true, 4).1));
}

#[test]
fn local_mismatches() {
    with_timeout(60, || mismatches(&mut group(false, 2).1));
}

#[test]
fn net_mismatches() {
    with_timeout(60, || mismatches(&mut group(true, 2).1));
}

#[test]
fn bad_peer_ranks() {
    bad_peers(&mut group(false, 2).1);
    with_timeout(60, || bad_peers(&mut group(true, 2).1));
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
