//! The CPU stand-in's collectives against plain references, its failure modes, and the
//! sleeping wait on the async state.

use std::time::{Duration, Instant};

use super::standin::{StandIn, StandInComm, REMOTE_ERROR};
use super::{wait_settled, AsyncState, Capabilities, DeviceBackend, DeviceComm, DeviceError};
use crate::dtype::ReduceOp;

/// Runs `f` on `n` fresh communicators of one group, one thread each; returns results
/// in rank order.
fn on_ranks<T: Send>(
    backend: &StandIn,
    n: usize,
    f: impl Fn(&mut StandInComm) -> Result<T, DeviceError> + Sync,
) -> Vec<Result<T, DeviceError>> {
    let id = backend.unique_id().unwrap();
    let f = &f;
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let backend = backend.clone();
                s.spawn(move || f(&mut backend.init(&id, r, n).unwrap()))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn backend() -> StandIn {
    StandIn::new(Capabilities::ALL, Duration::from_secs(20))
}

fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| (rank * 10 + i) as f32).collect()
}

#[test]
fn every_collective_matches_its_reference() {
    let b = backend();
    let n = 3;
    let sum: Vec<f32> = (0..6).map(|i| (0..n).map(|r| input(r, 6)[i]).sum()).collect();
    for r in on_ranks(&b, n, |c| {
        let mut buf = input(c.rank(), 6);
        c.all_reduce(&mut buf, ReduceOp::Sum)?;
        Ok(buf)
    }) {
        assert_eq!(r.unwrap(), sum);
    }
    let max: Vec<f32> = input(n - 1, 6);
    for r in on_ranks(&b, n, |c| {
        let mut buf = input(c.rank(), 6);
        c.all_reduce(&mut buf, ReduceOp::Max)?;
        Ok(buf)
    }) {
        assert_eq!(r.unwrap(), max);
    }
    for (rank, r) in on_ranks(&b, n, |c| {
        let mut shard = vec![0.0; 2];
        c.reduce_scatter(&input(c.rank(), 6), &mut shard, ReduceOp::Sum)?;
        Ok(shard)
    })
    .into_iter()
    .enumerate()
    {
        assert_eq!(r.unwrap(), sum[rank * 2..rank * 2 + 2]);
    }
    for r in on_ranks(&b, n, |c| {
        let mut all = vec![0.0; 6];
        c.all_gather(&input(c.rank(), 2), &mut all)?;
        Ok(all)
    }) {
        assert_eq!(r.unwrap(), [input(0, 2), input(1, 2), input(2, 2)].concat());
    }
    for r in on_ranks(&b, n, |c| {
        let mut buf = input(c.rank(), 4);
        c.broadcast(&mut buf, 1)?;
        Ok(buf)
    }) {
        assert_eq!(r.unwrap(), input(1, 4));
    }
    for (rank, r) in on_ranks(&b, n, |c| {
        let mut buf = input(c.rank(), 6);
        c.reduce(&mut buf, 2, ReduceOp::Sum)?;
        Ok(buf)
    })
    .into_iter()
    .enumerate()
    {
        assert_eq!(r.unwrap(), if rank == 2 { sum.clone() } else { input(rank, 6) });
    }
}

#[test]
fn grouped_send_recv_is_an_all_to_all() {
    let b = backend();
    let n = 3;
    let out = on_ranks(&b, n, |c| {
        let me = c.rank();
        // Block j of rank i is `i * 10 + j`: after the exchange, block i of rank j.
        let blocks: Vec<Vec<f32>> = (0..n).map(|j| vec![(me * 10 + j) as f32; 2]).collect();
        let mut got: Vec<Vec<f32>> = vec![vec![0.0; 2]; n];
        let sends: Vec<(usize, &Vec<f32>)> = blocks.iter().enumerate().collect();
        let mut recvs: Vec<(usize, &mut Vec<f32>)> = got.iter_mut().enumerate().collect();
        c.send_recv(&sends, &mut recvs)?;
        Ok(got)
    });
    for (me, r) in out.into_iter().enumerate() {
        let expect: Vec<Vec<f32>> = (0..n).map(|i| vec![(i * 10 + me) as f32; 2]).collect();
        assert_eq!(r.unwrap(), expect);
    }
}

#[test]
fn a_lost_peer_fails_the_waiters_and_the_async_state() {
    let b = backend();
    let id = b.unique_id().unwrap();
    let out = std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let mut c = b.init(&id, 0, 2).unwrap();
            let mut buf = vec![1.0; 3];
            let r = c.all_reduce(&mut buf, ReduceOp::Sum);
            (r, c.async_state())
        });
        // Rank 1 never comes: the runtime (here the test) reports it lost.
        std::thread::sleep(Duration::from_millis(50));
        b.fail(&id, "rank 1 lost");
        waiter.join().unwrap()
    });
    let (r, state) = out;
    assert!(matches!(r, Err(DeviceError::Call { code: REMOTE_ERROR, .. })), "{r:?}");
    assert!(matches!(state, Ok(AsyncState::Failed(_))), "{state:?}");
}

#[test]
fn a_hung_peer_times_out_instead_of_waiting_forever() {
    let b = StandIn::new(Capabilities::ALL, Duration::from_millis(100));
    let id = b.unique_id().unwrap();
    let mut c = b.init(&id, 0, 2).unwrap();
    let start = Instant::now();
    let e = c.all_reduce(&mut vec![1.0], ReduceOp::Sum).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(e.to_string().contains("lost or hung"), "{e}");
}

#[test]
fn an_abort_fails_the_others_and_the_aborted_handle() {
    let b = backend();
    let id = b.unique_id().unwrap();
    let mut a = b.init(&id, 0, 2).unwrap();
    let mut other = b.init(&id, 1, 2).unwrap();
    a.abort().unwrap();
    assert!(matches!(a.all_reduce(&mut vec![1.0], ReduceOp::Sum), Err(DeviceError::Aborted { .. })));
    assert!(matches!(other.all_reduce(&mut vec![1.0], ReduceOp::Sum), Err(DeviceError::Call { .. })));
}

#[test]
fn missing_capabilities_are_unsupported_not_panics() {
    let none = Capabilities::default();
    let b = StandIn::new(none, Duration::from_secs(1));
    let id = b.unique_id().unwrap();
    let mut c = b.init(&id, 0, 2).unwrap();
    for e in [c.revoke().unwrap_err(), c.shrink(&[1]).err().unwrap(), c.grow(&id, 3).err().unwrap()] {
        assert!(matches!(e, DeviceError::Unsupported { .. }), "{e:?}");
    }
    assert!(matches!(b.join_grown(&id, 2, 3), Err(DeviceError::Unsupported { operation: "ncclCommGrow", .. })));
}

#[test]
fn shrink_renumbers_the_survivors_and_refuses_bad_lists() {
    let b = backend();
    let id = b.unique_id().unwrap();
    let mut cs: Vec<StandInComm> = (0..4).map(|r| b.init(&id, r, 4).unwrap()).collect();
    let shrunk: Vec<StandInComm> = [0, 2, 3].map(|r| cs[r].shrink(&[1]).unwrap()).into_iter().collect();
    assert_eq!(shrunk.iter().map(|c| (c.rank(), c.size())).collect::<Vec<_>>(), vec![(0, 3), (1, 3), (2, 3)]);
    assert!(shrunk.windows(2).all(|w| w[0].id() == w[1].id()), "every survivor derives the same id");
    assert!(matches!(cs[1].shrink(&[1]), Err(DeviceError::InvalidArgument(_))), "a rank cannot exclude itself");
    assert!(matches!(cs[0].shrink(&[7]), Err(DeviceError::InvalidArgument(_))));
    assert!(matches!(b.init(&id, 4, 4), Err(DeviceError::InvalidArgument(_))));
    assert!(matches!(b.init(&id, 0, 5), Err(DeviceError::InvalidArgument(_))), "the id's group has 4 ranks");
}

#[test]
fn mismatched_lengths_are_argument_errors() {
    let b = backend();
    let out = on_ranks(&b, 2, |c| {
        let mut buf = vec![1.0; 2 + c.rank()];
        c.all_reduce(&mut buf, ReduceOp::Sum)
    });
    assert!(out.iter().all(|r| matches!(r, Err(DeviceError::InvalidArgument(_)))), "{out:?}");
    let id = b.unique_id().unwrap();
    let mut c = b.init(&id, 0, 2).unwrap();
    assert!(matches!(
        c.reduce_scatter(&vec![0.0; 3], &mut vec![0.0; 2], ReduceOp::Sum),
        Err(DeviceError::InvalidArgument(_))
    ));
    assert!(matches!(c.broadcast(&mut vec![0.0], 2), Err(DeviceError::InvalidArgument(_))));
}

#[test]
fn waiting_on_the_async_state_sleeps_between_checks() {
    let mut checks = 0;
    let start = Instant::now();
    let state = wait_settled(
        || {
            checks += 1;
            Ok(if checks < 5 { AsyncState::InProgress } else { AsyncState::Ready })
        },
        Duration::from_millis(10),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(state, AsyncState::Ready);
    assert_eq!(checks, 5, "one check per pause, not a spin");
    assert!(start.elapsed() >= Duration::from_millis(40), "{:?}", start.elapsed());
    // Never settling: the timeout ends the wait, a handful of checks later.
    let mut checks = 0;
    let state = wait_settled(
        || {
            checks += 1;
            Ok(AsyncState::InProgress)
        },
        Duration::from_millis(20),
        Duration::from_millis(100),
    )
    .unwrap();
    assert_eq!(state, AsyncState::InProgress);
    assert!(checks <= 8, "{checks} checks in 100 ms with 20 ms pauses");
}

#[test]
fn a_zero_pause_still_sleeps_and_an_endless_timeout_does_not_overflow() {
    let mut checks = 0;
    let start = Instant::now();
    let state = wait_settled(
        || {
            checks += 1;
            Ok(if checks < 4 { AsyncState::InProgress } else { AsyncState::Ready })
        },
        Duration::ZERO,
        Duration::MAX,
    )
    .unwrap();
    assert_eq!(state, AsyncState::Ready);
    assert!(start.elapsed() >= Duration::from_millis(3), "three pauses of at least 1 ms");
}
