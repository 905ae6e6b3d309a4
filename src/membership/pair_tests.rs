//! Master and peer state machines driven together ([`super::pair::Pair`]): no runtime,
//! no sockets, every message and decision asserted exactly.

// Peers are numbered: an index names the same peer in `p.peers`, its keys and its inbox.
#![allow(clippy::needless_range_loop)]

use std::time::Duration;

use super::master::{MasterConfig, Output};
use super::pair::Pair;
use super::peer::{sub_fingerprint, sub_key, OpKind, PeerConfig, Retry, Topology};
use super::protocol::{AbortReason, Decision, OpResult, Removal, ToMaster, ToPeer};
use super::view::{Member, View};
use crate::error::Error;

fn view(epoch: u64, ids: &[u64]) -> View {
    View {
        epoch,
        members: ids.iter().map(|&id| Member { id, addr: ([127, 0, 0, 1], 7000 + id as u16).into() }).collect(),
    }
}

#[test]
fn join_then_admission_at_the_members_round() {
    let mut p = Pair::new(MasterConfig::default());
    p.join(0, PeerConfig::default());
    assert_eq!(p.take_inbox(0), vec![ToPeer::View { view: view(1, &[0]), removed: vec![], term: 1 }]);
    assert_eq!(p.peers[0].view().unwrap(), view(1, &[0]));

    p.join(1, PeerConfig::default());
    assert_eq!(p.take_inbox(1), vec![ToPeer::Pending]);
    assert_eq!(p.take_inbox(0), vec![ToPeer::PendingJoiners { count: 1 }]);
    assert_eq!(p.peers[0].pending_joiners(), 1);
    assert!(p.peers[1].admission().is_none(), "the joiner waits");

    let Topology::Wait { msg, seen } = p.peers[0].update_topology().unwrap() else { panic!("a member waits") };
    assert_eq!(msg, ToMaster::UpdateTopology { epoch: 1 });
    assert!(p.peers[0].round_after(seen).is_none());
    let out = p.send(0, msg);
    let v2 = ToPeer::View { view: view(2, &[0, 1]), removed: vec![], term: 1 };
    let done = ToPeer::TopologyDone { epoch: 2 };
    assert_eq!(
        out,
        vec![
            Output::Send(1, v2.clone()),
            Output::Send(2, v2.clone()),
            Output::Send(1, done.clone()),
            Output::Send(2, done.clone())
        ]
    );
    assert_eq!(p.peers[0].round_after(seen), Some(Ok(view(2, &[0, 1]))));
    assert_eq!(p.peers[1].admission(), Some(Ok(view(2, &[0, 1]))));
    // The round that admitted the joiner counts as its own first update_topology.
    assert_eq!(p.peers[1].update_topology(), Ok(Topology::Done));
    assert!(matches!(p.peers[1].update_topology(), Ok(Topology::Wait { .. })));
}

#[test]
fn commit_needs_every_member() {
    let mut p = Pair::group(3, PeerConfig::default());
    // The first view forms when the third peer joins; the first two waited for it.
    let formed = ToPeer::View { view: view(1, &[0, 1, 2]), removed: vec![], term: 1 };
    for i in 0..2 {
        assert_eq!(p.take_inbox(i), vec![ToPeer::Pending, formed.clone()]);
    }
    assert_eq!(p.take_inbox(2), vec![formed]);
    let mut keys = Vec::new();
    for i in 0..3 {
        let b = p.peers[i].begin(OpKind::Whole { call: 0x77 }).unwrap();
        assert_eq!((b.key, b.rank, b.doomed.clone()), ((1, 1), i, None));
        assert_eq!(p.send(i, b.msg), vec![]);
        keys.push(b.key);
    }
    for i in 0..2 {
        let end = p.peers[i].end(keys[i], &Ok(()));
        assert_eq!(end, ToMaster::OpEnd { epoch: 1, seq: 1, result: OpResult::Ok });
        assert_eq!(p.send(i, end), vec![], "no decision before the last member reports");
        assert_eq!(p.peers[i].outcome(keys[i]), None);
    }
    let end = p.peers[2].end(keys[2], &Ok(()));
    let commit = ToPeer::Outcome { epoch: 1, seq: 1, decision: Decision::Commit };
    assert_eq!(p.send(2, end), (1..=3).map(|c| Output::Send(c, commit.clone())).collect::<Vec<_>>());
    for i in 0..3 {
        assert_eq!(p.peers[i].outcome(keys[i]), Some(Ok(())));
        p.peers[i].finish(keys[i]);
        assert_eq!(p.peers[i].known_ops(), 0);
    }
}

#[test]
fn a_loss_mid_collective_aborts_every_survivor_even_after_success() {
    let mut p = Pair::group(3, PeerConfig::default());
    let begun: Vec<_> = (0..3).map(|i| p.peers[i].begin(OpKind::Whole { call: 1 }).unwrap()).collect();
    for (i, b) in begun.iter().enumerate() {
        p.send(i, b.msg.clone());
    }
    // Ranks 0 and 1 finish their plans; rank 2 dies before reporting.
    for i in 0..2 {
        let end = p.peers[i].end(begun[i].key, &Ok(()));
        p.send(i, end);
    }
    (0..3).for_each(|i| drop(p.take_inbox(i)));
    let out = p.disconnect(2);
    let detail = "control connection closed".to_string();
    let abort = ToPeer::Outcome {
        epoch: 1,
        seq: 1,
        decision: Decision::Abort(AbortReason::PeerLost { rank: 2, detail: detail.clone() }),
    };
    let v2 = ToPeer::View {
        view: view(2, &[0, 1]),
        removed: vec![Removal { id: 2, rank: 2, detail: detail.clone() }],
        term: 1,
    };
    assert_eq!(
        out,
        vec![
            Output::Close(3, format!("removed from the group: {detail}")),
            Output::Send(1, abort.clone()),
            Output::Send(2, abort),
            Output::Send(1, v2.clone()),
            Output::Send(2, v2),
        ]
    );
    let lost = Error::PeerLost { rank: 2, reason: detail.clone() };
    for i in 0..2 {
        assert_eq!(p.aborts[i], vec![((1, 1), lost.clone())], "peer {i} stops exactly once");
        assert_eq!(p.peers[i].outcome((1, 1)), Some(Err(lost.clone())));
        // The policy retries once the new view is there, and the retry runs in it.
        assert_eq!(p.peers[i].retry(&lost, 1, 3, 1), Retry::AfterViewAbove(1));
        assert_eq!(p.peers[i].retry(&lost, 3, 3, 1), Retry::GiveUp);
        assert_eq!(p.peers[i].view_after(1), Some(Ok(view(2, &[0, 1]))));
        p.peers[i].finish((1, 1));
        let again = p.peers[i].begin(OpKind::Whole { call: 1 }).unwrap();
        assert_eq!((again.key, again.view.size()), ((2, 1), 2));
    }
    assert!(p.peers[2].gone().is_some(), "the removed peer heard why");
}

#[test]
fn mismatched_calls_abort_both_with_the_difference_named() {
    let mut p = Pair::group(2, PeerConfig::default());
    let a = p.peers[0].begin(OpKind::Whole { call: 0x1 }).unwrap();
    let b = p.peers[1].begin(OpKind::Whole { call: 0x2 }).unwrap();
    assert_eq!(p.send(0, a.msg), vec![]);
    let detail = "peers 0x0 and 0x1 made different calls (collective 0x1 vs collective 0x2)".to_string();
    let abort = ToPeer::Outcome {
        epoch: 1,
        seq: 1,
        decision: Decision::Abort(AbortReason::Mismatch { detail: detail.clone() }),
    };
    assert_eq!(p.send(1, b.msg), vec![Output::Send(1, abort.clone()), Output::Send(2, abort)]);
    for i in 0..2 {
        assert_eq!(p.peers[i].outcome((1, 1)), Some(Err(Error::Mismatch { detail: detail.clone() })));
        assert_eq!(p.peers[i].retry(&Error::Mismatch { detail: detail.clone() }, 1, 3, 1), Retry::GiveUp);
    }
    // A mismatch changes no view: the next collective is numbered on.
    p.peers[0].finish((1, 1));
    assert_eq!(p.peers[0].begin(OpKind::Whole { call: 0x1 }).unwrap().key, (1, 2));
}

#[test]
fn a_decision_that_arrives_before_the_begin_dooms_it() {
    let mut p = Pair::group(2, PeerConfig::default());
    // Peer 1 enters update_topology while peer 0 runs a collective: the master aborts
    // the collective before peer 1 would ever begin it, retryably (peer 1 may have seen
    // a loss first: a race of recovery, not a program error).
    let a = p.peers[0].begin(OpKind::Whole { call: 3 }).unwrap();
    p.send(0, a.msg);
    let Topology::Wait { msg, .. } = p.peers[1].update_topology().unwrap() else { panic!() };
    let out = p.send(1, msg);
    assert!(matches!(&out[..], [Output::Send(1, ToPeer::Outcome { seq: 1, .. }), Output::Send(2, _)]), "{out:?}");
    let retryable = |e: &Error| matches!(e, Error::Aborted { reason } if reason.contains("update_topology"));
    assert!(matches!(p.peers[0].outcome(a.key), Some(Err(ref e)) if retryable(e)), "{:?}", p.peers[0].outcome(a.key));
    assert!(matches!(&p.aborts[0][..], [((1, 1), ref e)] if retryable(e)), "{:?}", p.aborts[0]);
    let late = p.peers[1].begin(OpKind::Whole { call: 3 }).unwrap();
    assert!(matches!(late.doomed, Some(ref e) if retryable(e)), "{late:?}");
}

#[test]
fn sub_group_commit_involves_its_members_only() {
    let mut p = Pair::group(3, PeerConfig::default());
    (0..3).for_each(|i| drop(p.take_inbox(i)));
    let set = [0u64, 2];
    let key = (1, sub_key(&set, 1));
    let fp = sub_fingerprint(0x55, &set);
    for i in [2, 0] {
        // Members name the set in any order; the key and message are the same.
        let b = p.peers[i].begin(OpKind::Sub { call: 0x55, members: &[2, 0] }).unwrap();
        assert_eq!((b.key, b.members.clone(), b.fingerprint), (key, vec![0, 2], fp));
        assert_eq!(b.msg, ToMaster::SubOpBegin { epoch: 1, seq: key.1, call: fp, members: set.to_vec() });
        assert_eq!(p.send(i, b.msg), vec![]);
    }
    // The non-member runs a whole-group numbering of its own, undisturbed.
    assert_eq!(p.peers[1].begin(OpKind::Whole { call: 9 }).unwrap().key, (1, 1));
    let end0 = p.peers[0].end(key, &Ok(()));
    assert_eq!(p.send(0, end0), vec![]);
    let end2 = p.peers[2].end(key, &Ok(()));
    let commit = ToPeer::Outcome { epoch: 1, seq: key.1, decision: Decision::Commit };
    assert_eq!(p.send(2, end2), vec![Output::Send(1, commit.clone()), Output::Send(3, commit)]);
    assert!(p.take_inbox(1).is_empty(), "the non-member heard nothing");
    assert_eq!(p.peers[0].outcome(key), Some(Ok(())));
    assert_eq!(p.peers[2].outcome(key), Some(Ok(())));
    // A second collective of the same set gets the next counter.
    p.peers[0].finish(key);
    let next = p.peers[0].begin(OpKind::Sub { call: 0x55, members: &[0, 2] }).unwrap();
    assert_eq!(next.key, (1, sub_key(&set, 2)));
}

#[test]
fn a_sub_group_naming_a_lost_peer_fails_without_numbering() {
    let mut p = Pair::group(3, PeerConfig::default());
    p.disconnect(2);
    let err = p.peers[0].begin(OpKind::Sub { call: 1, members: &[0, 2] }).unwrap_err();
    assert!(matches!(err, Error::PeerLost { .. }), "{err:?}");
    assert_eq!(p.peers[0].begin(OpKind::Sub { call: 1, members: &[0, 1] }).unwrap().key, (2, sub_key(&[0, 1], 1)));
}

#[test]
fn a_loss_ends_a_closed_group_and_keeps_its_ranks() {
    let mut p = Pair::group(3, PeerConfig { closed: true, ..PeerConfig::default() });
    p.disconnect(1);
    let err = p.peers[0].begin(OpKind::Whole { call: 1 }).unwrap_err();
    assert_eq!(err, Error::PeerLost { rank: 1, reason: "control connection closed".into() });
    assert_eq!(p.peers[0].retry(&err, 1, 5, 1), Retry::GiveUp);
    // Peer 2 keeps rank 2 of the view the group formed with, and learns of the end.
    assert_eq!(p.peers[2].view().unwrap(), view(1, &[0, 1, 2]));
    assert_eq!(p.peers[2].view_after(1), Some(Err(err.clone())));
    assert_eq!(p.peers[2].update_topology(), Err(err));
}

#[test]
fn a_silent_master_cuts_the_peer_off() {
    let config = PeerConfig { master_timeout: Duration::from_millis(500), ..PeerConfig::default() };
    let mut p = Pair::group(2, config);
    let b = p.peers[0].begin(OpKind::Whole { call: 1 }).unwrap();
    p.send(0, b.msg);
    p.peers[0].tick(p.now + Duration::from_millis(499));
    assert!(p.peers[0].gone().is_none());
    let aborts = p.peers[0].tick(p.now + Duration::from_millis(500));
    assert_eq!(aborts, vec![((1, 1), Error::Removed { reason: "no word from the master for 500 ms".into() })]);
    assert!(matches!(p.peers[0].view(), Err(Error::Removed { .. })));
    assert_eq!(p.peers[0].next_deadline(), None);
}

#[test]
fn a_commit_is_kept_when_the_view_changes_before_the_caller_looks() {
    let mut p = Pair::group(2, PeerConfig::default());
    let begun: Vec<_> = (0..2).map(|i| p.peers[i].begin(OpKind::Whole { call: 4 }).unwrap()).collect();
    for (i, b) in begun.iter().enumerate() {
        p.send(i, b.msg.clone());
        let end = p.peers[i].end(b.key, &Ok(()));
        p.send(i, end);
    }
    // Peer 1 saw the commit and left at once; peer 0 reads its outcome only now,
    // after the view without peer 1 arrived.
    p.disconnect(1);
    assert_eq!(p.peers[0].view().unwrap().epoch, 2);
    assert_eq!(p.peers[0].outcome((1, 1)), Some(Ok(())));
    assert!(p.aborts[0].is_empty());
    // The same when this peer is cut off after the commit.
    p.peers[0].disconnected("gone".into());
    assert_eq!(p.peers[0].outcome((1, 1)), Some(Ok(())));
}

#[test]
fn a_silent_peer_is_removed_and_its_partners_collective_aborts() {
    let mut p = Pair::group(2, PeerConfig::default());
    let timeout = MasterConfig::default().peer_timeout;
    let b = p.peers[0].begin(OpKind::Whole { call: 2 }).unwrap();
    p.send(0, b.msg);
    // Peer 0 heartbeats just before the deadline; peer 1 stays silent.
    p.now += timeout - Duration::from_millis(1);
    p.send(0, ToMaster::Heartbeat);
    let early = p.advance(Duration::from_millis(0));
    assert!(early.is_empty(), "nobody is removed before the timeout: {early:?}");
    p.advance(Duration::from_millis(1));
    assert_eq!(p.peers[0].view().unwrap().epoch, 2, "peer 0 heard the view without peer 1");
    assert_eq!(p.aborts[0].len(), 1);
    assert!(matches!(p.aborts[0][0], ((1, 1), Error::PeerLost { .. })), "{:?}", p.aborts[0]);
}

#[test]
fn a_broken_link_reported_by_one_member_is_a_loss_for_every_member() {
    // Rank 0 sees its link to rank 2 break before the master sees rank 2's control
    // connection go: rank 1, which never touched rank 2, must still hear a loss.
    let mut p = Pair::group(3, PeerConfig::default());
    let mut keys = Vec::new();
    for i in 0..3 {
        let b = p.peers[i].begin(OpKind::Whole { call: 5 }).unwrap();
        p.send(i, b.msg);
        keys.push(b.key);
    }
    let lost = Err(Error::PeerLost { rank: 2, reason: "peer end dropped".into() });
    let end = p.peers[0].end(keys[0], &lost);
    assert_eq!(
        end,
        ToMaster::OpEnd { epoch: 1, seq: 1, result: OpResult::Lost { rank: 2, detail: "peer end dropped".into() } }
    );
    p.send(0, end);
    let want = Error::PeerLost { rank: 2, reason: "rank 0 lost its link to it: peer end dropped".into() };
    for i in 0..2 {
        assert_eq!(p.peers[i].outcome(keys[i]), Some(Err(want.clone())), "peer {i}");
        assert!(want.is_retryable());
    }
}

/// Peers that settle every view change (`settle_view_changes`, as a caller with no
/// retry policy is): `n` members that went through one round together.
fn settled_group(n: usize) -> Pair {
    let mut p = Pair::group(n, PeerConfig { settle_view_changes: true, ..PeerConfig::default() });
    vote_all(&mut p, &(0..n).collect::<Vec<_>>());
    p
}

/// Peers `who` vote in a topology round, which must end with their votes.
fn vote_all(p: &mut Pair, who: &[usize]) {
    let mut seen = Vec::new();
    for &i in who {
        let Topology::Wait { msg, seen: s } = p.peers[i].update_topology().unwrap() else { panic!("peer {i} votes") };
        p.send(i, msg);
        seen.push(s);
    }
    for (&i, s) in who.iter().zip(seen) {
        assert!(p.peers[i].round_after(s).is_some(), "the round ended for peer {i}");
    }
}

#[test]
fn a_view_change_sends_every_member_to_update_topology() {
    // The race the churn found: a loss aborts the call of a member that had begun it,
    // which goes to update_topology, while another member had not begun it yet.
    let mut p = settled_group(3);
    let a = p.peers[0].begin(OpKind::Whole { call: 7 }).unwrap();
    assert_eq!(a.key, (1, 1));
    p.send(0, a.msg);
    p.disconnect(2);
    assert!(matches!(&p.aborts[0][..], [((1, 1), Error::PeerLost { .. })]));
    p.peers[0].finish(a.key);
    // Peer 1 begins only now, in the new view: it fails at once and tells the master
    // nothing, so it cannot run alone against peer 0's vote.
    let err = p.peers[1].begin(OpKind::Whole { call: 7 }).unwrap_err();
    assert!(matches!(&err, Error::Aborted { reason } if reason.contains("update_topology")), "{err:?}");
    assert!(err.is_retryable());
    // A sync and a sub-group collective are held back the same way.
    assert!(p.peers[1]
        .begin(OpKind::Sync { strategy: crate::state::SyncStrategy::EnforcePopular, tensors: vec![] })
        .is_err());
    assert!(p.peers[1].begin(OpKind::Sub { call: 7, members: &[0, 1] }).is_err());
    // The view a caller sizes its arguments against fails alike (the churn's second
    // race: counts sized for 3 checked against a view of 2 gave a false InvalidArgument).
    assert!(matches!(p.peers[1].call_view(), Err(Error::Aborted { .. })));
    assert_eq!(p.peers[1].view().unwrap().size(), 2, "the live view moved");
    vote_all(&mut p, &[0, 1]);
    assert_eq!(p.peers[1].call_view().unwrap().size(), 2, "settled again");
    let keys: Vec<_> = (0..2)
        .map(|i| {
            let b = p.peers[i].begin(OpKind::Whole { call: 7 }).unwrap();
            p.send(i, b.msg);
            b.key
        })
        .collect();
    for i in 0..2 {
        let end = p.peers[i].end(keys[i], &Ok(()));
        p.send(i, end);
    }
    for i in 0..2 {
        assert_eq!(p.peers[i].outcome(keys[i]), Some(Ok(())), "peer {i} commits in the settled view");
    }
}

#[test]
fn without_settling_a_member_that_had_not_begun_runs_in_the_new_view() {
    // A caller with a retry policy runs the aborted call again in the new view; one that
    // had not begun it begins it there, and both meet.
    let mut p = Pair::group(3, PeerConfig::default());
    vote_all(&mut p, &[0, 1, 2]);
    p.disconnect(2);
    for i in 0..2 {
        assert_eq!(p.peers[i].begin(OpKind::Whole { call: 7 }).unwrap().key, (2, 1));
    }
}

#[test]
fn a_joiner_admitted_just_before_a_loss_takes_part_in_the_next_round() {
    let config = PeerConfig { settle_view_changes: true, ..PeerConfig::default() };
    let mut p = settled_group(3);
    let j = p.join(9, config);
    vote_all(&mut p, &[0, 1, 2]);
    assert_eq!(p.peers[j].admission().unwrap().unwrap().epoch, 2);
    // A member is lost before the joiner calls update_topology: the round that admitted
    // it no longer settles the view, so it votes with the others.
    p.disconnect(2);
    assert!(p.peers[j].begin(OpKind::Whole { call: 1 }).is_err());
    assert!(matches!(p.peers[j].update_topology(), Ok(Topology::Wait { .. })));
    // Had no view come since, the admitting round would have been its own.
    let mut q = settled_group(2);
    let k = q.join(9, config);
    vote_all(&mut q, &[0, 1]);
    assert_eq!(q.peers[k].update_topology(), Ok(Topology::Done));
    assert_eq!(q.peers[k].begin(OpKind::Whole { call: 1 }).unwrap().key, (2, 1));
}

/// Peers that look for a master to rejoin when theirs is lost.
fn rejoining() -> PeerConfig {
    PeerConfig { rejoin_within: Some(Duration::from_secs(10)), ..PeerConfig::default() }
}

/// Every peer of `p` begins a whole-group collective; returns the keys.
fn begin_all(p: &mut Pair, call: u64) -> Vec<(u64, u64)> {
    (0..p.peers.len())
        .map(|i| {
            let b = p.peers[i].begin(OpKind::Whole { call }).unwrap();
            p.send(i, b.msg);
            b.key
        })
        .collect()
}

#[test]
fn a_restarted_master_settles_what_the_old_one_left_the_same_way_everywhere() {
    let mut p = Pair::group(3, rejoining());
    // Collective 1 commits. Collective 2 succeeds on every member, the master commits it
    // and dies having told peer 0 only. Collective 3 is still running on peer 2.
    let one = begin_all(&mut p, 1);
    for i in 0..3 {
        let end = p.peers[i].end(one[i], &Ok(()));
        p.send(i, end);
    }
    let two = begin_all(&mut p, 2);
    for i in 0..2 {
        let end = p.peers[i].end(two[i], &Ok(()));
        p.send(i, end);
    }
    p.peers[0].handle(ToPeer::Outcome { epoch: 1, seq: 2, decision: Decision::Commit }, p.now);
    for i in 0..3 {
        p.peers[i].finish(one[i]);
    }
    p.peers[0].finish(two[0]);
    let three = begin_all(&mut p, 3);
    let end = p.peers[0].end(three[0], &Ok(()));
    p.send(0, end);
    p.replace_master(MasterConfig::default());
    for i in 0..3 {
        assert!(p.peers[i].rejoining(), "peer {i} looks for a master");
        assert!(p.aborts[i].is_empty(), "peer {i}: nothing in flight stops while it looks");
        assert!(matches!(p.peers[i].begin(OpKind::Whole { call: 4 }), Err(Error::Aborted { .. })));
        p.take_inbox(i);
    }
    assert!(p.rejoin(0).is_empty(), "one of three is no majority: the master waits");
    assert!(p.rejoin(1).is_empty(), "a majority waits for the rest during the grace");
    let out = p.rejoin(2);
    assert!(out.iter().any(|o| matches!(o, Output::Send(_, ToPeer::View { term: 2, .. }))), "{out:?}");
    for i in 0..3 {
        assert!(!p.peers[i].rejoining());
        assert_eq!(p.peers[i].view().unwrap(), view(2, &[0, 1, 2]), "peer {i}");
        assert_eq!(p.peers[i].term(), 2);
        // What peer 0 saw committed commits for all; what nobody saw aborts for all.
        if i > 0 {
            assert_eq!(p.peers[i].outcome(two[i]), Some(Ok(())), "peer {i}: collective 2");
        }
        let aborted = p.peers[i].outcome(three[i]);
        assert!(matches!(&aborted, Some(Err(Error::Aborted { reason })) if reason.contains("replaced")), "{aborted:?}");
    }
    // The group goes on in the new epoch.
    for i in 0..3 {
        p.peers[i].finish(three[i]);
        if i > 0 {
            p.peers[i].finish(two[i]);
        }
    }
    let four = begin_all(&mut p, 4);
    assert_eq!(four[0], (2, 1));
    for i in 0..3 {
        let end = p.peers[i].end(four[i], &Ok(()));
        p.send(i, end);
    }
    assert_eq!(p.peers[2].outcome(four[2]), Some(Ok(())));
}

#[test]
fn a_takeover_needs_a_majority_of_the_last_view_and_removes_the_rest() {
    let mut p = Pair::group(3, rejoining());
    p.replace_master(MasterConfig::default());
    let grace = MasterConfig::default().takeover_grace;
    assert!(p.rejoin(0).is_empty());
    p.now += grace * 3;
    p.send(0, ToMaster::Heartbeat);
    assert!(p.advance(Duration::ZERO).is_empty(), "one of three never takes over, however long");
    let out = p.rejoin(1);
    let removal = Removal { id: 2, rank: 2, detail: "did not rejoin when the master was replaced".into() };
    let v = ToPeer::View { view: view(2, &[0, 1]), removed: vec![removal], term: 2 };
    assert_eq!(out, vec![Output::Send(1, v.clone()), Output::Send(2, v)]);
    // The peer that comes back late was removed; it hears so and is cut off.
    let out = p.rejoin(2);
    assert!(matches!(&out[..], [Output::Close(3, why)] if why.contains("removed")), "{out:?}");
    assert!(p.peers[2].gone().is_some());
}

#[test]
fn a_vote_in_flight_carries_over_to_the_new_master() {
    let mut p = Pair::group(2, rejoining());
    let Topology::Wait { msg, seen } = p.peers[0].update_topology().unwrap() else { panic!("votes") };
    p.send(0, msg);
    p.replace_master(MasterConfig::default());
    p.rejoin(0);
    p.rejoin(1);
    assert!(p.peers[0].round_after(seen).is_none(), "the round waits for peer 1");
    let Topology::Wait { msg, .. } = p.peers[1].update_topology().unwrap() else { panic!("votes") };
    p.send(1, msg);
    assert_eq!(p.peers[0].round_after(seen), Some(Ok(view(2, &[0, 1]))));
}

#[test]
fn a_fresh_master_that_formed_a_group_steps_down_for_an_older_group_coming_back() {
    // The master restarts and a newcomer joins before the old members rejoin: the
    // newcomer's one-peer group is released, and the old group is taken over.
    let mut p = Pair::group(2, rejoining());
    p.replace_master(MasterConfig::default());
    let newcomer = p.join(7, rejoining());
    assert_eq!(p.peers[newcomer].view().unwrap().epoch, 1);
    let out = p.rejoin(0);
    assert!(out.contains(&Output::Release(3)), "{out:?}");
    assert!(p.peers[newcomer].rejoining());
    p.rejoin(1);
    assert_eq!(p.peers[0].view().unwrap(), view(2, &[0, 1]));
    // The newcomer, not in that group, is told to join again.
    let out = p.rejoin(newcomer);
    assert!(matches!(&out[..], [Output::Close(3, _)]), "{out:?}");
}

#[test]
fn a_peer_that_gives_up_looking_is_removed() {
    let config = PeerConfig { rejoin_within: Some(Duration::from_millis(500)), ..PeerConfig::default() };
    let mut p = Pair::group(2, config);
    let keys = begin_all(&mut p, 1);
    p.replace_master(MasterConfig::default());
    let aborts = p.peers[0].tick(p.now + Duration::from_millis(500));
    assert!(
        matches!(&aborts[..], [(k, Error::Removed { reason })] if *k == keys[0] && reason.contains("none took over"))
    );
}

#[test]
fn a_standby_forms_no_group_of_its_own_and_admits_newcomers_after_its_takeover() {
    let mut p = Pair::group(2, rejoining());
    p.replace_master(MasterConfig { standby: true, ..MasterConfig::default() });
    // A newcomer reaches the standby before the group does: it waits.
    let newcomer = p.join(7, rejoining());
    assert_eq!(p.take_inbox(newcomer), vec![ToPeer::Pending]);
    p.rejoin(0);
    p.rejoin(1);
    assert_eq!(p.peers[0].view().unwrap(), view(2, &[0, 1]));
    // The members' next round admits it into the group taken over.
    for i in 0..2 {
        let Topology::Wait { msg, .. } = p.peers[i].update_topology().unwrap() else { panic!("votes") };
        p.send(i, msg);
    }
    assert_eq!(p.peers[newcomer].view().unwrap().members.len(), 3);
}

#[test]
fn a_fencing_master_that_loses_most_of_its_view_at_once_stops_deciding() {
    let timeout = MasterConfig::default().peer_timeout;
    for fence in [false, true] {
        let mut p = Pair::new(MasterConfig { initial_peers: 3, fence, ..MasterConfig::default() });
        for id in 0..3 {
            p.join(id, rejoining());
        }
        // Peers 1 and 2 fall silent together (a partition between them and the master).
        p.now += timeout;
        p.send(0, ToMaster::Heartbeat);
        let out = p.advance(Duration::ZERO);
        if !fence {
            assert_eq!(p.master.view().members.len(), 1, "without fencing the master goes on with peer 0");
            continue;
        }
        assert_eq!(out.iter().filter(|o| matches!(o, Output::Release(_))).count(), 3, "{out:?}");
        assert!(p.master.taking_over());
        // Peer 0 alone is no majority of the view: nothing is decided for it.
        assert!(p.rejoin(0).is_empty());
        assert!(matches!(p.peers[0].begin(OpKind::Whole { call: 1 }), Err(Error::Aborted { .. })));
        // The partition heals: the majority comes back, and the group goes on in a new term.
        p.rejoin(1);
        p.rejoin(2);
        assert_eq!(p.peers[0].view().unwrap(), view(2, &[0, 1, 2]));
        assert!((0..3).all(|i| p.peers[i].term() == 2));
    }
}
