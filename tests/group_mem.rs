//! A master and peers inside one process over the in-memory network: membership,
//! outcomes and retries without sockets.

use phalanx::comm::RetryPolicy;
use phalanx::state::SharedState;
use phalanx::state::SyncStrategy;
use phalanx::{Communicator, Error, ReduceOp};

mod common;
use common::{admit, cluster, group, join, with_timeout};

#[test]
fn all_reduce_across_a_joined_group() {
    with_timeout(30, || {
        let c = cluster();
        let mut comms = group(&c, 3, RetryPolicy::Never);
        let results: Vec<Vec<f32>> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter_mut()
                .map(|comm| {
                    s.spawn(move || {
                        let mut x = vec![comm.rank() as f32 + 1.0; 1000];
                        comm.all_reduce(&mut x, ReduceOp::Sum).unwrap();
                        x
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(results.iter().all(|r| r.iter().all(|&v| v == 6.0)));
    });
}

#[test]
fn a_lost_peer_aborts_then_retry_sums_the_survivors() {
    with_timeout(30, || {
        let c = cluster();
        let mut comms = group(&c, 3, RetryPolicy::OnPeerLost { max_attempts: 3 });
        let dead = comms.pop().unwrap();
        drop(dead); // its links close, as when a process dies
        let results: Vec<(Vec<f32>, usize)> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter_mut()
                .map(|comm| {
                    s.spawn(move || {
                        let id = comm.peer_id();
                        let mut x = vec![(id % 1000) as f32; 100];
                        comm.all_reduce(&mut x, ReduceOp::Sum).unwrap();
                        (x, comm.size())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let expect: f32 = comms.iter().map(|c| (c.peer_id() % 1000) as f32).sum();
        for (x, size) in &results {
            assert_eq!(*size, 2);
            assert!(x.iter().all(|&v| v == expect), "{x:?} vs {expect}");
        }
    });
}

#[test]
fn mismatched_calls_fail_everywhere() {
    with_timeout(30, || {
        let c = cluster();
        let mut comms = group(&c, 2, RetryPolicy::Never);
        let errs: Vec<Error> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter_mut()
                .enumerate()
                .map(|(i, comm)| {
                    s.spawn(move || {
                        // Rank-dependent roots: each waits for the other to send.
                        let root = 1 - comm.rank();
                        let mut x = vec![1u8; 10 + i];
                        comm.broadcast(&mut x, root).unwrap_err()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(errs.iter().all(|e| matches!(e, Error::Mismatch { .. })), "{errs:?}");
    });
}

#[test]
fn a_joiner_receives_the_shared_state() {
    with_timeout(30, || {
        let c = cluster();
        let mut comms = group(&c, 2, RetryPolicy::Never);
        let mut states: Vec<SharedState> = (0..2)
            .map(|_| {
                let mut s = SharedState::new();
                s.insert("w", (0..1000).map(|i| i as f32 * 0.5).collect::<Vec<_>>());
                s.revision = 7;
                s
            })
            .collect();
        admit(&mut comms, || join(&c, 200, RetryPolicy::Never));
        let mut fresh = SharedState::new();
        fresh.insert("w", vec![0f32; 1000]);
        states.push(fresh);
        let reports: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter_mut()
                .zip(states.iter_mut())
                .map(|(comm, st)| s.spawn(move || comm.sync_shared_state(st, SyncStrategy::EnforcePopular).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(reports[2].tensors_received, 1);
        assert!(states.iter().all(|s| s.digest() == states[0].digest() && s.revision == 7));
    });
}

/// Runs `sync_shared_state` on every member at once.
fn sync_all(comms: &mut [Communicator], states: &mut [SharedState]) -> Vec<phalanx::Result<phalanx::SyncReport>> {
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter_mut()
            .zip(states.iter_mut())
            .map(|(comm, st)| s.spawn(move || comm.sync_shared_state(st, SyncStrategy::EnforcePopular)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Several tensors, one over many chunks, reach two stale members from several
/// sources at once, each transfer a plan the executor runs; a member whose tensor has
/// another size gets a mismatch, not a truncated copy.
#[test]
fn stale_members_receive_many_tensors_and_a_size_mismatch_is_refused() {
    with_timeout(60, || {
        let c = cluster();
        let mut comms = group(&c, 4, RetryPolicy::Never);
        let model = |stale: bool| {
            let mut s = SharedState::new();
            let k = if stale { 0.0 } else { 1.0 };
            s.insert("a", (0..1000).map(|i| k * i as f32).collect::<Vec<_>>());
            s.insert("big", (0..300_000).map(|i| k * (i % 977) as f32).collect::<Vec<_>>());
            s.insert("bytes", (0..70u8).map(|i| if stale { 0 } else { i }).collect::<Vec<_>>());
            s.revision = if stale { 0 } else { 3 };
            s
        };
        let mut states = vec![model(false), model(false), model(true), model(true)];
        let reports: Vec<_> = sync_all(&mut comms, &mut states).into_iter().map(Result::unwrap).collect();
        assert_eq!(reports[2].tensors_received + reports[3].tensors_received, 6);
        assert_eq!(reports[0].tensors_sent + reports[1].tensors_sent, 6);
        assert!(states.iter().all(|s| s.digest() == states[0].digest() && s.revision == 3));
        assert_eq!(states[3].get::<f32>("big").unwrap()[977 + 5], 5.0);

        // Member 3's "a" has another length: the transfer to it is refused everywhere.
        let mut states = vec![model(false), model(false), model(false), SharedState::new()];
        states[3].insert("a", vec![0f32; 999]);
        states[3].insert("big", vec![0f32; 300_000]);
        states[3].insert("bytes", vec![0u8; 70]);
        let before = states[3].digest();
        let results = sync_all(&mut comms, &mut states);
        assert!(results.iter().all(Result::is_err), "{results:?}");
        assert!(matches!(results[3], Err(Error::Mismatch { .. })), "{:?}", results[3]);
        assert_eq!(states[3].digest(), before, "a refused sync changes nothing");
    });
}

#[test]
fn concurrent_collectives_keep_their_traffic_apart() {
    with_timeout(30, || {
        let c = cluster();
        let mut comms = group(&c, 3, RetryPolicy::Never);
        let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter_mut()
                .map(|comm| {
                    s.spawn(move || {
                        let r = comm.rank() as f32;
                        // Two collectives in flight at once, different sizes and values.
                        let a = comm.all_reduce_start(vec![r; 70_000], ReduceOp::Sum).unwrap();
                        let b = comm.all_reduce_start(vec![10.0 * r + 1.0; 300], ReduceOp::Max).unwrap();
                        let (rb, b) = b.wait();
                        let (ra, a) = a.wait();
                        rb.unwrap();
                        ra.unwrap();
                        (a, b)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (a, b) in &results {
            assert!(a.len() == 70_000 && a.iter().all(|&x| x == 3.0));
            assert!(b.len() == 300 && b.iter().all(|&x| x == 21.0));
        }
    });
}

/// Local groups take the networked path (an embedded master), so non-blocking calls
/// work there too. (They used to be refused with `InvalidArgument`; one peer path
/// made that restriction pointless.)
#[test]
fn non_blocking_calls_work_on_local_groups_too() {
    let mut comms = Communicator::local_group(1, Default::default()).unwrap();
    let (result, buf) = comms[0].all_reduce_start(vec![7u8], ReduceOp::Sum).unwrap().wait();
    assert_eq!((result, buf), (Ok(()), vec![7u8]));
    let comms = Communicator::local_group(3, Default::default()).unwrap();
    let sums: Vec<Vec<i32>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|mut c| {
                s.spawn(move || {
                    let pending = c.all_reduce_start(vec![c.rank() as i32 + 1; 5], ReduceOp::Sum).unwrap();
                    let (result, buf) = pending.wait();
                    result.unwrap();
                    buf
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(sums.iter().all(|s| s == &vec![6; 5]), "{sums:?}");
}

#[test]
fn raw_calls_check_whole_elements() {
    let mut comms = Communicator::local_group(1, Default::default()).unwrap();
    let err = comms[0].all_reduce_raw(&mut [0u8; 7], phalanx::DType::F32, ReduceOp::Sum).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(ref m) if m.contains("whole number")), "{err}");
    let mut ok = 2.5f64.to_le_bytes();
    comms[0].all_reduce_raw(&mut ok, phalanx::DType::F64, ReduceOp::Avg).unwrap();
    assert_eq!(f64::from_le_bytes(ok), 2.5);
}
