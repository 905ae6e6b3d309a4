//! Eager collectives (see `comm::eager`) with the master and peer state machines paired
//! ([`super::pair::Pair`]): no runtime, every message and decision asserted exactly.
//! "Every member's done arrived" is the driver's knowledge; here the test says when.

#![allow(clippy::needless_range_loop)]

use std::time::Duration;

use super::master::{MasterConfig, Output};
use super::pair::Pair;
use super::peer::{OpKey, OpKind, PeerConfig};
use super::protocol::{AbortReason, Decision, OpResult, Removal, ToMaster, ToPeer};
use super::view::{Member, View};
use crate::error::Error;

fn view(epoch: u64, ids: &[u64]) -> View {
    View {
        epoch,
        members: ids.iter().map(|&id| Member { id, addr: ([127, 0, 0, 1], 7000 + id as u16).into() }).collect(),
    }
}

/// Every peer begins an eager whole-group collective and the master hears of it.
fn begin_eager(p: &mut Pair, call: u64) -> Vec<OpKey> {
    (0..p.peers.len())
        .map(|i| {
            let b = p.peers[i].begin_as(OpKind::Whole { call }, true).unwrap();
            assert_eq!(b.msg, ToMaster::EagerOpBegin { epoch: b.key.0, seq: b.key.1, call });
            assert_eq!(p.send(i, b.msg), vec![]);
            b.key
        })
        .collect()
}

fn ok(key: OpKey) -> ToMaster {
    ToMaster::OpEnd { epoch: key.0, seq: key.1, result: OpResult::Ok }
}

fn lost_rank_2() -> Decision {
    Decision::Abort(AbortReason::PeerLost { rank: 2, detail: "control connection closed".into() })
}

fn clear(p: &mut Pair) {
    for i in 0..p.peers.len() {
        p.take_inbox(i);
    }
}

#[test]
fn every_member_returns_before_the_outcome_which_then_leaves_nothing_behind() {
    let mut p = Pair::group(3, PeerConfig::default());
    clear(&mut p);
    let keys = begin_eager(&mut p, 0x77);
    for i in 0..3 {
        // The plan completed: the report goes out, nobody waits for an answer.
        assert_eq!(p.peers[i].end(keys[i], &Ok(())), ok(keys[i]));
        assert_eq!(p.peers[i].outcome(keys[i]), None, "peer {i}: undecided until the dones are in");
    }
    // The reports are still on their way; every member's "done" came over the data links.
    for i in 0..3 {
        assert!(p.peers[i].returned_eagerly(keys[i]));
        assert_eq!(p.peers[i].outcome(keys[i]), Some(Ok(())));
        p.peers[i].finish(keys[i]);
        assert_eq!(p.peers[i].known_ops(), 0);
    }
    assert!(p.take_inbox(0).is_empty(), "returned before any outcome");
    assert_eq!(p.send(0, ok(keys[0])), vec![]);
    assert_eq!(p.send(1, ok(keys[1])), vec![]);
    let commit = ToPeer::Outcome { epoch: 1, seq: 1, decision: Decision::Commit };
    assert_eq!(p.send(2, ok(keys[2])), (1..=3).map(|c| Output::Send(c, commit.clone())).collect::<Vec<_>>());
    // Nobody waits for it on success: the master's writer may hold it for the next message.
    assert!(p.master.may_wait(&commit));
    for i in 0..3 {
        assert_eq!(p.take_inbox(i), vec![commit.clone()]);
        assert_eq!(p.peers[i].known_ops(), 0, "peer {i}: the late commit of a finished collective is dropped");
    }
}

/// The commit of a collective that is not eager is what its members wait for: it never
/// waits in the master's writer; nor does an abort, or a commit of another epoch.
#[test]
fn only_an_eager_commit_may_wait() {
    let mut p = Pair::group(2, PeerConfig::default());
    clear(&mut p);
    let mut said = Vec::new();
    for i in 0..2 {
        let b = p.peers[i].begin(OpKind::Whole { call: 3 }).unwrap();
        p.send(i, b.msg);
        said = p.send(i, ok(b.key));
    }
    let commit = ToPeer::Outcome { epoch: 1, seq: 1, decision: Decision::Commit };
    assert_eq!(said, (1..=2).map(|c| Output::Send(c, commit.clone())).collect::<Vec<_>>());
    assert!(!p.master.may_wait(&commit), "a member waits for this commit");
    let keys = begin_eager(&mut p, 4);
    let seq = keys[0].1;
    assert!(p.master.may_wait(&ToPeer::Outcome { epoch: 1, seq, decision: Decision::Commit }));
    assert!(!p.master.may_wait(&ToPeer::Outcome { epoch: 2, seq, decision: Decision::Commit }), "another epoch");
    assert!(!p.master.may_wait(&ToPeer::Outcome { epoch: 1, seq, decision: lost_rank_2() }), "an abort");
}

#[test]
fn a_member_lost_after_every_member_completed_commits_for_the_survivors() {
    let mut p = Pair::group(3, PeerConfig::default());
    clear(&mut p);
    let keys = begin_eager(&mut p, 5);
    for i in 0..3 {
        p.peers[i].end(keys[i], &Ok(()));
    }
    // Peer 0 got every done and returned; peer 1 misses peer 2's. Peer 2 dies before its
    // report reaches the master.
    assert!(p.peers[0].returned_eagerly(keys[0]));
    p.peers[0].finish(keys[0]);
    p.send(0, ok(keys[0]));
    p.send(1, ok(keys[1]));
    let out = p.disconnect(2);
    let commit = ToPeer::Outcome { epoch: 1, seq: 1, decision: Decision::Commit };
    let removal = Removal { id: 2, rank: 2, detail: "control connection closed".into() };
    let v2 = ToPeer::View { view: view(2, &[0, 1]), removed: vec![removal], term: 1 };
    assert_eq!(
        out,
        vec![
            Output::Close(3, "removed from the group: control connection closed".into()),
            Output::Send(1, commit.clone()),
            Output::Send(2, commit.clone()),
            Output::Send(1, v2.clone()),
            Output::Send(2, v2),
        ]
    );
    assert_eq!(p.peers[1].outcome(keys[1]), Some(Ok(())), "the survivor keeps what peer 0 kept");
    assert!(p.aborts[1].is_empty());
}

#[test]
fn a_survivor_still_running_at_a_loss_is_waited_for_and_its_failure_aborts() {
    let mut p = Pair::group(3, PeerConfig::default());
    clear(&mut p);
    let keys = begin_eager(&mut p, 5);
    let end = p.peers[0].end(keys[0], &Ok(()));
    p.send(0, end);
    let out = p.disconnect(2);
    assert!(
        !out.iter().any(|o| matches!(o, Output::Send(_, ToPeer::Outcome { .. }))),
        "peer 1 may still complete and return: no decision yet: {out:?}"
    );
    // The new view stops peer 1's run (it had reported nothing), not peer 0's.
    assert_eq!(p.aborts[1].iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec![keys[1]]);
    assert!(p.aborts[0].is_empty());
    assert_eq!(p.peers[0].outcome(keys[0]), None);
    // Its executor got to the end anyway: stopped, it reports a failure, not a success.
    let end = p.peers[1].end(keys[1], &Ok(()));
    assert!(matches!(&end, ToMaster::OpEnd { result: OpResult::Failed(why), .. } if why.contains("stopped")));
    assert!(!p.peers[1].returned_eagerly(keys[1]));
    let out = p.send(1, end);
    let abort = ToPeer::Outcome { epoch: 1, seq: 1, decision: lost_rank_2() };
    assert_eq!(out, vec![Output::Send(1, abort.clone()), Output::Send(2, abort)]);
    assert!(matches!(p.peers[0].outcome(keys[0]), Some(Err(Error::PeerLost { rank: 2, .. }))));
}

#[test]
fn a_survivor_still_running_at_a_loss_that_completes_commits() {
    let mut p = Pair::group(3, PeerConfig::default());
    clear(&mut p);
    let keys = begin_eager(&mut p, 5);
    let end = p.peers[0].end(keys[0], &Ok(()));
    p.send(0, end);
    // Peer 1 completed and reported before the new view reached it; the report is in
    // flight when the master notices the loss.
    let end = p.peers[1].end(keys[1], &Ok(()));
    assert_eq!(end, ok(keys[1]));
    p.disconnect(2);
    assert!(p.aborts[1].is_empty(), "a reported success is not stopped by the view");
    let commit = ToPeer::Outcome { epoch: 1, seq: 1, decision: Decision::Commit };
    assert_eq!(p.send(1, end), vec![Output::Send(1, commit.clone()), Output::Send(2, commit)]);
    for i in 0..2 {
        assert_eq!(p.peers[i].outcome(keys[i]), Some(Ok(())));
    }
}

#[test]
fn a_survivor_that_never_began_it_aborts_it_once_it_moved_to_the_new_view() {
    let mut p = Pair::group(3, PeerConfig::default());
    clear(&mut p);
    let keys: Vec<OpKey> = (0..2)
        .map(|i| {
            let b = p.peers[i].begin_as(OpKind::Whole { call: 5 }, true).unwrap();
            p.send(i, b.msg);
            b.key
        })
        .collect();
    let end = p.peers[0].end(keys[0], &Ok(()));
    p.send(0, end);
    // Peer 1 dies; peer 2 never began the collective: its ViewSeen says it never will.
    p.disconnect(1);
    let lost = Decision::Abort(AbortReason::PeerLost { rank: 1, detail: "control connection closed".into() });
    let removal = Removal { id: 1, rank: 1, detail: "control connection closed".into() };
    let v2 = ToPeer::View { view: view(2, &[0, 2]), removed: vec![removal], term: 1 };
    let abort = ToPeer::Outcome { epoch: 1, seq: 1, decision: lost };
    assert_eq!(p.take_inbox(0), vec![v2.clone(), abort.clone()]);
    assert_eq!(p.take_inbox(2), vec![v2, abort]);
    assert!(matches!(p.peers[0].outcome(keys[0]), Some(Err(Error::PeerLost { rank: 1, .. }))));
}

#[test]
fn a_new_master_commits_what_a_member_returned_from_eagerly() {
    let rejoining = PeerConfig { rejoin_within: Some(Duration::from_secs(10)), ..PeerConfig::default() };
    let mut p = Pair::group(3, rejoining);
    let keys = begin_eager(&mut p, 9);
    for i in 0..3 {
        p.peers[i].end(keys[i], &Ok(()));
    }
    // Peer 0 returned; the master dies before any report reaches it.
    assert!(p.peers[0].returned_eagerly(keys[0]));
    p.peers[0].finish(keys[0]);
    p.replace_master(MasterConfig::default());
    // Once the master is lost, the others wait for the new one's verdict: their rejoin
    // may already say they have no decision.
    assert!(!p.peers[1].returned_eagerly(keys[1]));
    for i in 0..3 {
        p.take_inbox(i);
        p.rejoin(i);
    }
    for i in 1..3 {
        assert_eq!(p.peers[i].outcome(keys[i]), Some(Ok(())), "peer {i}");
    }
}

#[test]
fn a_failed_member_means_nobody_returned_and_everyone_aborts_at_once() {
    let mut p = Pair::group(2, PeerConfig::default());
    clear(&mut p);
    let keys = begin_eager(&mut p, 3);
    let end = p.peers[0].end(keys[0], &Ok(()));
    p.send(0, end);
    let end = p.peers[1].end(keys[1], &Err(Error::Aborted { reason: "x".into() }));
    let out = p.send(1, end);
    let failed = Decision::Abort(AbortReason::Failed {
        rank: 1,
        detail: "collective aborted: x; the buffer was restored".into(),
    });
    let abort = ToPeer::Outcome { epoch: 1, seq: 1, decision: failed };
    assert_eq!(out, vec![Output::Send(1, abort.clone()), Output::Send(2, abort)]);
    assert!(!p.peers[0].returned_eagerly(keys[0]), "the abort stands");
    assert!(p.peers[0].outcome(keys[0]).is_some_and(|o| o.is_err()));
}

#[test]
fn a_far_master_that_hears_of_a_collective_only_after_a_loss_still_commits_it() {
    let mut p = Pair::group(3, PeerConfig::default());
    clear(&mut p);
    // Every member begins and completes; their messages are still on the way to a far
    // master when peer 2 dies (its own never arrive). Peer 0 had every done: it returned.
    let begins: Vec<ToMaster> =
        (0..3).map(|i| p.peers[i].begin_as(OpKind::Whole { call: 6 }, true).unwrap().msg).collect();
    let key = (1, 1);
    for i in 0..3 {
        assert_eq!(p.peers[i].end(key, &Ok(())), ok(key));
    }
    assert!(p.peers[0].returned_eagerly(key));
    p.peers[0].finish(key);
    let loss = p.master.disconnected(Pair::conn(2));
    assert!(!loss.iter().any(|o| matches!(o, Output::Send(_, ToPeer::Outcome { .. }))), "{loss:?}");
    // What was in flight arrives (before the survivors' ViewSeen, which follows it).
    assert_eq!(p.send(0, begins[0].clone()), vec![]);
    assert_eq!(p.send(1, begins[1].clone()), vec![]);
    assert_eq!(p.send(0, ok(key)), vec![]);
    let commit = ToPeer::Outcome { epoch: 1, seq: 1, decision: Decision::Commit };
    assert_eq!(p.send(1, ok(key)), vec![Output::Send(1, commit.clone()), Output::Send(2, commit)]);
    p.deliver(&loss);
    assert_eq!(p.peers[1].outcome(key), Some(Ok(())), "peer 1 keeps what peer 0 kept");
    assert!(p.aborts[1].is_empty());
}
