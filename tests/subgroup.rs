//! Sub-group collectives on local groups and on networked groups (in-memory network):
//! disjoint sub-groups at once, non-members never called, the NoLoCo pairing, mismatches
//! and lost members.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::{cluster, each, net_group, with_timeout, Cluster};
use phalanx::comm::RetryPolicy;
use phalanx::{Communicator, Error, ReduceOp};

/// A group of `n` of the given kind; the cluster (if any) must outlive the group.
fn group(networked: bool, n: u16) -> (Option<Cluster>, Vec<Communicator>) {
    if networked {
        let c = cluster();
        let comms = net_group(&c, n, RetryPolicy::Never);
        (Some(c), comms)
    } else {
        (None, Communicator::local_group(n as usize, Default::default()).unwrap())
    }
}

fn value(rank: usize, i: usize) -> f64 {
    ((rank + 1) * 1000 + i) as f64
}

/// Pairs (0,1) and (2,3) all-reduce at the same time. Rank 1 calls only after pair
/// (2,3) has finished, so pair (2,3) must complete while rank 0 waits in its own.
fn disjoint_pairs_run_at_once(comms: &mut [Communicator]) {
    let (tx, rx) = mpsc::channel::<()>();
    let (tx, rx) = (std::sync::Mutex::new(Some(tx)), std::sync::Mutex::new(Some(rx)));
    let out = each(comms, |r, c| {
        let pair = if r < 2 { [0, 1] } else { [2, 3] };
        if r == 1 {
            let rx = rx.lock().unwrap().take().unwrap();
            rx.recv_timeout(Duration::from_secs(20)).expect("pair (2,3) finished while rank 0 waited");
        }
        let mut x: Vec<f64> = (0..1000).map(|i| value(r, i)).collect();
        c.sub_all_reduce(&pair, &mut x, ReduceOp::Sum).unwrap();
        if r == 3 {
            let _ = tx.lock().unwrap().take().unwrap().send(());
        }
        x
    });
    for (r, x) in out.iter().enumerate() {
        let pair = if r < 2 { [0, 1] } else { [2, 3] };
        let want: Vec<f64> = (0..1000).map(|i| value(pair[0], i) + value(pair[1], i)).collect();
        assert_eq!(x, &want, "rank {r}");
    }
}

/// Rank 3 calls nothing until (0,1,2) have finished their sub-group all-reduce; then
/// everyone runs a whole-group all-reduce.
fn a_non_member_is_not_blocked(comms: &mut [Communicator]) {
    let (tx, rx) = mpsc::channel::<()>();
    let (tx, rx) = (std::sync::Mutex::new(Some(tx)), std::sync::Mutex::new(Some(rx)));
    let out = each(comms, |r, c| {
        let mut sub: Vec<i64> = vec![r as i64 + 1; 70_000];
        if r == 3 {
            let rx = rx.lock().unwrap().take().unwrap();
            rx.recv_timeout(Duration::from_secs(20)).expect("the sub-group finished without rank 3");
        } else {
            c.sub_all_reduce(&[2, 0, 1], &mut sub, ReduceOp::Sum).unwrap();
            if r == 0 {
                let _ = tx.lock().unwrap().take().unwrap().send(());
            }
        }
        let mut all: Vec<i64> = vec![10i64.pow(r as u32); 100];
        c.all_reduce(&mut all, ReduceOp::Sum).unwrap();
        (sub, all)
    });
    for (r, (sub, all)) in out.iter().enumerate() {
        let want_sub = if r == 3 { 4 } else { 6 };
        assert!(sub.iter().all(|&v| v == want_sub), "rank {r} sub-group result");
        assert!(all.iter().all(|&v| v == 1111), "rank {r} whole-group result");
    }
}

/// Every collective over a sub-group, and Avg dividing by the members.
fn every_collective_over_a_sub_group(comms: &mut [Communicator]) {
    let members = [1, 3];
    let out = each(comms, |r, c| {
        if !members.contains(&r) {
            return None;
        }
        let mut avg = vec![r as f32 * 2.0; 5];
        c.sub_all_reduce(&members, &mut avg, ReduceOp::Avg).unwrap();
        let mut gathered = vec![0u32; 6];
        c.sub_all_gather(&members, &[r as u32; 3], &mut gathered).unwrap();
        let mut b = vec![r as u16; 4];
        c.sub_broadcast(&members, &mut b, 3).unwrap();
        let input: Vec<i32> = (0..4).map(|i| i * 10 + r as i32).collect();
        let mut seg = vec![0i32; 2];
        c.sub_reduce_scatter(&members, &input, &mut seg, ReduceOp::Sum).unwrap();
        c.sub_barrier(&members).unwrap();
        Some((avg, gathered, b, seg))
    });
    let (avg, gathered, b, seg) = out[1].clone().unwrap();
    assert_eq!(avg, vec![4.0; 5]);
    assert_eq!(gathered, vec![1, 1, 1, 3, 3, 3]);
    assert_eq!(b, vec![3; 4]);
    assert_eq!(seg, vec![4, 24]);
    let (avg3, gathered3, b3, seg3) = out[3].clone().unwrap();
    assert_eq!((avg3, gathered3, b3), (avg, gathered, b));
    assert_eq!(seg3, vec![44, 64]);
}

/// A few NoLoCo steps on 5 ranks: each rank averages with its partner of the step.
fn noloco_steps(comms: &mut [Communicator]) {
    let n = comms.len();
    let out = each(comms, |r, c| {
        let mut x = vec![r as f64 * 4.0; 33];
        let mut history = Vec::new();
        for step in 0..4 {
            let partner = Communicator::noloco_partner(7, step, n, r);
            if let Some(p) = partner {
                c.sub_all_reduce(&[r, p], &mut x, ReduceOp::Avg).unwrap();
            }
            history.push((partner, x[0]));
        }
        assert!(x.iter().all(|&v| v == x[0]));
        history
    });
    // Replay the pairing centrally and compare.
    let mut model: Vec<f64> = (0..n).map(|r| r as f64 * 4.0).collect();
    for step in 0..4 {
        for (a, b) in Communicator::noloco_pairs(7, step, n) {
            let m = (model[a] + model[b]) / 2.0;
            model[a] = m;
            model[b] = m;
        }
        for (r, h) in out.iter().enumerate() {
            assert_eq!(h[step as usize].0, Communicator::noloco_partner(7, step, n, r));
            assert_eq!(h[step as usize].1, model[r], "rank {r} step {step}");
        }
    }
}

fn mismatched_calls_fail_on_the_members(comms: &mut [Communicator]) {
    let out = each(comms, |r, c| {
        if r > 1 {
            return None;
        }
        let mut x = vec![1u8; 10 + r];
        Some(c.sub_all_reduce(&[0, 1], &mut x, ReduceOp::Sum).map(|_| x))
    });
    for (r, o) in out.iter().take(2).enumerate() {
        match o {
            Some(Err(Error::Mismatch { .. })) => {}
            other => panic!("rank {r}: {other:?}"),
        }
    }
}

fn bad_member_sets_are_refused(comms: &mut [Communicator]) {
    let c = &mut comms[0];
    let mut x = [0f32; 4];
    for bad in [&[1, 2][..], &[0, 0, 1], &[0, 9]] {
        assert!(matches!(c.sub_all_reduce(bad, &mut x, ReduceOp::Sum), Err(Error::InvalidArgument(_))), "{bad:?}");
    }
    // A sub-group of one is the identity and involves nobody.
    let mut y = [3i32, 4];
    c.sub_all_reduce(&[0], &mut y, ReduceOp::Sum).unwrap();
    assert_eq!(y, [3, 4]);
}

#[test]
fn local_disjoint_pairs_run_at_once() {
    with_timeout(60, || disjoint_pairs_run_at_once(&mut group(false, 4).1));
}

#[test]
fn net_disjoint_pairs_run_at_once() {
    with_timeout(60, || {
        let (_c, mut comms) = group(true, 4);
        disjoint_pairs_run_at_once(&mut comms);
        // And again: the per-set counters advance in step.
        disjoint_pairs_run_at_once(&mut comms);
    });
}

#[test]
fn local_non_member_is_not_blocked() {
    with_timeout(60, || a_non_member_is_not_blocked(&mut group(false, 4).1));
}

#[test]
fn net_non_member_is_not_blocked() {
    with_timeout(60, || a_non_member_is_not_blocked(&mut group(true, 4).1));
}

#[test]
fn local_every_collective_over_a_sub_group() {
    with_timeout(60, || every_collective_over_a_sub_group(&mut group(false, 4).1));
}

#[test]
fn net_every_collective_over_a_sub_group() {
    with_timeout(60, || every_collective_over_a_sub_group(&mut group(true, 4).1));
}

#[test]
fn local_noloco_steps() {
    with_timeout(60, || noloco_steps(&mut group(false, 5).1));
}

#[test]
fn net_noloco_steps() {
    with_timeout(60, || noloco_steps(&mut group(true, 5).1));
}

#[test]
fn local_mismatched_calls_fail() {
    with_timeout(60, || mismatched_calls_fail_on_the_members(&mut group(false, 3).1));
}

#[test]
fn net_mismatched_calls_fail_and_the_group_goes_on() {
    with_timeout(60, || {
        let (_c, mut comms) = group(true, 3);
        mismatched_calls_fail_on_the_members(&mut comms);
        // Networked groups recover from a mismatch: the next calls succeed.
        disjoint_free_all_reduce(&mut comms);
    });
}

fn disjoint_free_all_reduce(comms: &mut [Communicator]) {
    let out = each(comms, |r, c| {
        let mut x = vec![r as i32; 8];
        if r < 2 {
            c.sub_all_reduce(&[0, 1], &mut x, ReduceOp::Sum).unwrap();
        }
        c.all_reduce(&mut x, ReduceOp::Sum).unwrap();
        x
    });
    assert!(out.iter().all(|x| x == &vec![4; 8]), "{out:?}");
}

#[test]
fn bad_member_sets() {
    bad_member_sets_are_refused(&mut group(false, 3).1);
    with_timeout(60, || bad_member_sets_are_refused(&mut group(true, 3).1));
}

/// Ranks 0 and 1 run a sub-group all-reduce with rank 3, which dies instead of
/// calling (rank 2, not a member, looks on): 0 and 1 get `PeerLost` naming view rank 3
/// (sub-rank 2), with their buffers as before, and do not hang.
fn a_lost_member_aborts_the_sub_op(mut comms: Vec<Communicator>, networked: bool) {
    let bystander = comms.remove(2);
    let victim = comms.pop().unwrap();
    let out: Vec<Error> = std::thread::scope(|s| {
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(victim);
        });
        let hs: Vec<_> = comms
            .iter_mut()
            .enumerate()
            .map(|(r, c)| {
                s.spawn(move || {
                    let mut x: Vec<f32> = (0..100_000).map(|i| (i * (r + 1)) as f32).collect();
                    let before = x.clone();
                    let e = c.sub_all_reduce(&[0, 1, 3], &mut x, ReduceOp::Sum).unwrap_err();
                    assert_eq!(x, before, "rank {r}'s buffer is restored");
                    e
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, e) in out.iter().enumerate() {
        match e {
            Error::PeerLost { rank: 3, .. } => {}
            // As for whole-group collectives: a member that sees the broken link first
            // reports it, and the master's abort can reach the other as `Aborted`.
            Error::Aborted { .. } if networked => {}
            other => panic!("rank {r}: {other:?}"),
        }
    }
    drop(bystander);
}

#[test]
fn local_lost_member_aborts_the_sub_op() {
    with_timeout(60, || a_lost_member_aborts_the_sub_op(group(false, 4).1, false));
}

#[test]
fn net_lost_member_aborts_the_sub_op() {
    with_timeout(60, || {
        let (_c, comms) = group(true, 4);
        a_lost_member_aborts_the_sub_op(comms, true);
    });
}

/// With a retry policy, a sub-group whose members all survive a non-member's loss
/// reruns in the new view; one that lost a member returns `PeerLost`.
#[test]
fn net_retry_reruns_when_every_member_survives() {
    with_timeout(60, || {
        let c = cluster();
        let mut comms = net_group(&c, 4, RetryPolicy::OnPeerLost { max_attempts: 3 });
        // Rank 3: a non-member of (0,1), a member of (2,3), lost once both pairs are
        // under way (rank 1 joins its pair only after the loss).
        let victim = comms.pop().unwrap();
        let out: Vec<Result<Vec<i32>, Error>> = std::thread::scope(|s| {
            s.spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                drop(victim);
            });
            let hs: Vec<_> = comms
                .iter_mut()
                .enumerate()
                .map(|(r, c)| {
                    s.spawn(move || {
                        let pair = if r < 2 { [0, 1] } else { [2, 3] };
                        std::thread::sleep(Duration::from_millis(if r == 1 { 400 } else { 0 }));
                        let mut x = vec![r as i32 + 1; 1000];
                        c.sub_all_reduce(&pair, &mut x, ReduceOp::Sum).map(|_| x)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (r, o) in out.iter().take(2).enumerate() {
            assert_eq!(o.as_ref().unwrap(), &vec![3; 1000], "rank {r}");
        }
        assert!(matches!(out[2], Err(Error::PeerLost { .. })), "{:?}", out[2].as_ref().err());
    });
}
