//! The device membership machine driven for several peers with the master's
//! [`IdRelay`] between them: no runtime, no sockets, no GPU, every decision asserted.
//! `driver::tests` carries the decisions out on the CPU stand-in.

// Peers are numbered: an index names the same peer in `g.peers` and in each decision list.
#![allow(clippy::needless_range_loop)]

use super::membership::{Decision, DeviceMembership, Event, IdRelay, FIRST_POLL, MAX_POLL};
use super::{AsyncState, Capabilities, DeviceError, UniqueId};

/// The NCCL of the lent GPU machine's system: shrink, no revoke, no grow.
const NCCL_2_28_3: Capabilities =
    Capabilities { init_config: true, abort: true, async_error: true, shrink: true, revoke: false, grow: false };
/// An NCCL with nothing optional: every change is a fresh init.
const BARE: Capabilities =
    Capabilities { init_config: false, abort: false, async_error: false, shrink: false, revoke: false, grow: false };

fn id(n: u8) -> UniqueId {
    UniqueId([n; 128])
}

/// Peers numbered 0..n with one machine each, and the master's relay.
struct Group {
    peers: Vec<DeviceMembership>,
    relay: IdRelay,
}

impl Group {
    fn new(n: u64, caps: Capabilities) -> Group {
        Group { peers: (0..n).map(|p| DeviceMembership::new(p, caps)).collect(), relay: IdRelay::default() }
    }

    /// The master announces a view to its members (and to `also`, peers it removed).
    fn view(&mut self, epoch: u64, members: &[u64], also: &[u64]) -> Vec<Vec<Decision>> {
        self.relay.view(epoch, members.to_vec());
        let mut out = vec![Vec::new(); self.peers.len()];
        for &p in members.iter().chain(also) {
            out[p as usize] = self.peers[p as usize].handle(Event::View { epoch, members: members.to_vec() });
        }
        out
    }

    /// `from` publishes `id`; the relayed events are fed to their peers.
    fn publish(&mut self, from: u64, epoch: u64, id: UniqueId, grow: bool) -> Vec<Vec<Decision>> {
        let mut out = vec![Vec::new(); self.peers.len()];
        for (to, event) in self.relay.publish(from, epoch, 0, id, grow) {
            out[to as usize] = self.peers[to as usize].handle(event);
        }
        out
    }

    /// Every peer in `who` sees its communicator ready.
    fn ready(&mut self, who: &[u64], epoch: u64) {
        for &p in who {
            assert_eq!(
                self.peers[p as usize].handle(Event::Polled(AsyncState::Ready)),
                vec![Decision::Ready { epoch }]
            );
        }
    }

    /// A group of `members` with communicators ready in epoch 1.
    fn active(n: u64, caps: Capabilities) -> Group {
        let mut g = Group::new(n, caps);
        let all: Vec<u64> = (0..n).collect();
        g.view(1, &all, &[]);
        g.publish(0, 1, id(1), false);
        g.ready(&all, 1);
        g
    }
}

#[test]
fn the_first_member_makes_the_id_and_everyone_inits_from_the_relayed_one() {
    let mut g = Group::new(3, Capabilities::ALL);
    let d = g.view(1, &[0, 1, 2], &[]);
    assert_eq!(d, vec![vec![Decision::CreateAndPublishId { epoch: 1, generation: 0, grow: false }], vec![], vec![]]);
    let d = g.publish(0, 1, id(7), false);
    for r in 0..3 {
        assert_eq!(d[r], vec![Decision::Init { epoch: 1, id: id(7), rank: r, size: 3 }]);
    }
    // A second id for the same epoch (a maker that retried) reaches nobody.
    assert!(g.relay.publish(0, 1, 0, id(8), false).is_empty());
    assert_eq!(g.relay.current(), Some((0, id(7), false)));
    // Neither do ids from a non-member or for another epoch.
    assert!(g.relay.publish(9, 1, 0, id(9), false).is_empty());
    assert!(g.relay.publish(0, 2, 0, id(9), false).is_empty());
    g.ready(&[0, 1, 2], 1);
    assert_eq!(g.peers[1].ready_epoch(), Some(1));
}

#[test]
fn creation_in_progress_sleeps_with_a_growing_pause_never_zero() {
    let mut g = Group::new(1, Capabilities::ALL);
    g.view(1, &[0], &[]);
    g.publish(0, 1, id(1), false);
    let mut pauses = Vec::new();
    for _ in 0..10 {
        let d = g.peers[0].handle(Event::Polled(AsyncState::InProgress));
        let [Decision::PollAfter(p)] = d.as_slice() else { panic!("{d:?}") };
        pauses.push(*p);
    }
    assert_eq!(pauses[0], FIRST_POLL);
    assert!(pauses.iter().all(|p| *p >= FIRST_POLL && *p <= MAX_POLL), "{pauses:?}");
    assert!(pauses.windows(2).all(|w| w[1] >= w[0]), "{pauses:?}");
    assert_eq!(*pauses.last().unwrap(), MAX_POLL);
    assert_eq!(g.peers[0].ready_epoch(), None, "not ready while in progress");
    let e = DeviceError::Call { call: "ncclCommInitRankConfig", code: 6, message: "remote".into() };
    assert_eq!(
        g.peers[0].handle(Event::Polled(AsyncState::Failed(e.clone()))),
        vec![Decision::Abort, Decision::GiveUp(e)]
    );
}

#[test]
fn a_loss_revokes_then_shrinks_where_both_exist() {
    let mut g = Group::active(3, Capabilities::ALL);
    let d = g.view(2, &[0, 2], &[]);
    let expect = vec![Decision::Revoke, Decision::Shrink { epoch: 2, exclude: vec![1], abort_pending: false }];
    assert_eq!(d[0], expect);
    assert_eq!(d[2], expect);
    assert!(g.relay.current().is_none(), "a shrink needs no new id");
    g.ready(&[0, 2], 2);
}

#[test]
fn a_loss_on_nccl_2_28_3_shrinks_with_abort_and_no_revoke() {
    let mut g = Group::active(3, NCCL_2_28_3);
    // The failed collective: nothing to revoke with, the shrink will abort it.
    let e = DeviceError::Call { call: "ncclAllReduce", code: 6, message: "remote error".into() };
    assert_eq!(g.peers[0].handle(Event::Failed(e.clone())), vec![]);
    assert_eq!(g.peers[0].ready_epoch(), None, "broken");
    let d = g.view(2, &[0, 1], &[]);
    let expect = vec![Decision::Shrink { epoch: 2, exclude: vec![2], abort_pending: true }];
    assert_eq!(d[0], expect);
    assert_eq!(d[1], expect);
}

#[test]
fn a_loss_without_shrink_aborts_then_inits_afresh() {
    let mut g = Group::active(3, BARE);
    let e = DeviceError::Call { call: "ncclAllReduce", code: 6, message: "remote error".into() };
    assert_eq!(g.peers[1].handle(Event::Failed(e.clone())), vec![Decision::Abort]);
    assert_eq!(g.peers[1].handle(Event::Failed(e)), vec![], "one abort per failure");
    let d = g.view(2, &[1, 2], &[]);
    assert_eq!(d[1], vec![Decision::CreateAndPublishId { epoch: 2, generation: 0, grow: false }]);
    assert_eq!(d[2], vec![]);
    let d = g.publish(1, 2, id(2), false);
    // Peer 1 aborted already when its collective failed; the view's abort is the
    // communicator's own (an aborted handle is dropped, the driver ignores a second).
    assert_eq!(d[1], vec![Decision::Abort, Decision::Init { epoch: 2, id: id(2), rank: 0, size: 2 }]);
    assert_eq!(d[2], vec![Decision::Destroy, Decision::Init { epoch: 2, id: id(2), rank: 1, size: 2 }]);
}

#[test]
fn revoke_frees_the_stuck_ranks_at_the_failure() {
    let mut g = Group::active(2, Capabilities::ALL);
    let e = DeviceError::Call { call: "ncclAllReduce", code: 6, message: "remote error".into() };
    assert_eq!(g.peers[0].handle(Event::Failed(e)), vec![Decision::Revoke]);
    // Revoked already: the shrink does not revoke again.
    let d = g.view(2, &[0], &[]);
    assert_eq!(d[0], vec![Decision::Shrink { epoch: 2, exclude: vec![1], abort_pending: false }]);
}

#[test]
fn joiners_are_grown_in_where_grow_exists() {
    let mut g = Group::active(3, Capabilities::ALL);
    g.peers.push(DeviceMembership::new(3, Capabilities::ALL));
    let d = g.view(2, &[0, 1, 2, 3], &[]);
    assert_eq!(
        d,
        vec![vec![Decision::CreateAndPublishId { epoch: 2, generation: 0, grow: true }], vec![], vec![], vec![]]
    );
    let d = g.publish(0, 2, id(2), true);
    for r in 0..3 {
        assert_eq!(d[r], vec![Decision::Grow { epoch: 2, id: id(2), size: 4 }]);
    }
    assert_eq!(d[3], vec![Decision::JoinGrown { epoch: 2, id: id(2), rank: 3, size: 4 }]);
    g.ready(&[0, 1, 2, 3], 2);
}

#[test]
fn joiners_without_grow_get_a_fresh_communicator() {
    for (caps, broken) in [(NCCL_2_28_3, false), (Capabilities::ALL, true)] {
        let mut g = Group::active(2, caps);
        if broken {
            // A member whose communicator failed cannot grow it: the maker chooses afresh.
            let e = DeviceError::Call { call: "ncclAllReduce", code: 6, message: "remote".into() };
            g.peers[0].handle(Event::Failed(e));
        }
        g.peers.push(DeviceMembership::new(2, caps));
        let d = g.view(2, &[0, 1, 2], &[]);
        assert_eq!(d[0], vec![Decision::CreateAndPublishId { epoch: 2, generation: 0, grow: false }], "{caps:?}");
        let d = g.publish(0, 2, id(2), false);
        let old = if broken { Decision::Abort } else { Decision::Destroy };
        assert_eq!(d[0], vec![old, Decision::Init { epoch: 2, id: id(2), rank: 0, size: 3 }]);
        assert_eq!(d[1], vec![Decision::Destroy, Decision::Init { epoch: 2, id: id(2), rank: 1, size: 3 }]);
        assert_eq!(d[2], vec![Decision::Init { epoch: 2, id: id(2), rank: 2, size: 3 }]);
    }
}

#[test]
fn a_loss_and_a_join_together_make_a_fresh_communicator() {
    let mut g = Group::active(3, Capabilities::ALL);
    g.peers.push(DeviceMembership::new(3, Capabilities::ALL));
    let d = g.view(2, &[0, 2, 3], &[]);
    assert_eq!(d[0], vec![Decision::CreateAndPublishId { epoch: 2, generation: 0, grow: false }]);
    let d = g.publish(0, 2, id(2), false);
    assert_eq!(d[2], vec![Decision::Destroy, Decision::Init { epoch: 2, id: id(2), rank: 1, size: 3 }]);
    assert_eq!(d[3], vec![Decision::Init { epoch: 2, id: id(2), rank: 2, size: 3 }]);
}

#[test]
fn a_removed_peer_aborts_and_stale_events_are_ignored() {
    let mut g = Group::active(3, Capabilities::ALL);
    let d = g.view(2, &[0, 1], &[2]);
    assert_eq!(d[2], vec![Decision::Abort]);
    assert_eq!(g.peers[2].ready_epoch(), None);
    // The same view again, an older one, and an id of another epoch: nothing.
    assert_eq!(g.peers[0].handle(Event::View { epoch: 2, members: vec![0, 1] }), vec![]);
    assert_eq!(g.peers[0].handle(Event::View { epoch: 1, members: vec![0, 1, 2] }), vec![]);
    assert_eq!(g.peers[0].handle(Event::UniqueId { epoch: 1, generation: 0, id: id(9), grow: false }), vec![]);
    // A newer view while the shrink is still in progress: the half-made one is aborted.
    let d = g.peers[0].handle(Event::View { epoch: 3, members: vec![0] });
    assert_eq!(d, vec![Decision::Abort, Decision::CreateAndPublishId { epoch: 3, generation: 0, grow: false }]);
}

#[test]
fn a_grow_id_on_a_peer_without_grow_is_a_typed_error() {
    let mut p = DeviceMembership::new(1, NCCL_2_28_3);
    p.handle(Event::View { epoch: 4, members: vec![0, 1] });
    let d = p.handle(Event::UniqueId { epoch: 4, generation: 0, id: id(4), grow: true });
    assert!(
        matches!(d.as_slice(), [Decision::GiveUp(DeviceError::Unsupported { operation: "ncclCommGrow", .. })]),
        "{d:?}"
    );
}

/// A device failure while every peer lives: peers 0 and 1 see it, ask for generation 1
/// and each make an id; the first relayed reaches every member, peer 2 (which did not
/// see the failure) included, which drops its communicator and follows. No new view.
#[test]
fn a_failure_with_no_change_of_membership_makes_the_next_generation() {
    for caps in [Capabilities::ALL, NCCL_2_28_3, BARE] {
        let mut g = Group::active(3, caps);
        let e = DeviceError::Call { call: "ncclAllReduce", code: 6, message: "remote".into() };
        let members = vec![0, 1, 2];
        for p in 0..2 {
            g.peers[p].handle(Event::Failed(e.clone()));
            let d = g.peers[p].handle(Event::Renew { epoch: 1, generation: 1, members: members.clone() });
            let want = vec![Decision::CreateAndPublishId { epoch: 1, generation: 1, grow: false }];
            // Whatever is still held (revoked, or broken awaiting a shrink) is aborted.
            assert_eq!(d, [vec![Decision::Abort], want].concat(), "{caps:?}");
            assert_eq!(g.peers[p].current(), (1, 1));
        }
        let mut d = vec![Vec::new(); 3];
        for (to, event) in g.relay.publish(1, 1, 1, id(11), false) {
            d[to as usize] = g.peers[to as usize].handle(event);
        }
        assert!(g.relay.publish(0, 1, 1, id(10), false).is_empty(), "the first offer wins");
        assert!(g.relay.publish(2, 1, 0, id(12), false).is_empty(), "an older generation is not relayed");
        assert_eq!(g.relay.current(), Some((1, id(11), false)));
        for r in 0..2 {
            assert_eq!(d[r], vec![Decision::Init { epoch: 1, id: id(11), rank: r, size: 3 }], "{caps:?}");
        }
        assert_eq!(d[2], vec![Decision::Abort, Decision::Init { epoch: 1, id: id(11), rank: 2, size: 3 }]);
        g.ready(&[0, 1, 2], 1);
        assert!(g.peers.iter().all(|p| p.current() == (1, 1) && p.ready_epoch() == Some(1)));
        // Stale: the failed generation's id, a renew to a generation reached, another epoch.
        assert_eq!(g.peers[2].handle(Event::UniqueId { epoch: 1, generation: 0, id: id(1), grow: false }), vec![]);
        assert_eq!(g.peers[2].handle(Event::UniqueId { epoch: 1, generation: 1, id: id(11), grow: false }), vec![]);
        assert_eq!(g.peers[0].handle(Event::Renew { epoch: 1, generation: 1, members: members.clone() }), vec![]);
        assert_eq!(g.peers[0].handle(Event::Renew { epoch: 0, generation: 5, members: members.clone() }), vec![]);
        // A new view starts again at generation 0.
        g.view(2, &members, &[]);
        assert_eq!(g.peers[1].current(), (2, 0));
    }
}

/// A master replaced while peers 0 and 1 had made their communicator from the id of
/// epoch 1 and peer 2 still waited for it: the takeover's view (epoch 2, the same
/// members) and the same id relayed again. Peers 0 and 1 keep theirs (a second init from
/// one id would never complete); peer 2 inits from it, as rank 2 of 3.
#[test]
fn a_communicator_made_from_the_id_a_new_master_relays_again_is_kept() {
    let mut g = Group::new(3, NCCL_2_28_3);
    let all = [0, 1, 2];
    g.view(1, &all, &[]);
    for p in 0..2 {
        let d = g.peers[p].handle(Event::UniqueId { epoch: 1, generation: 0, id: id(1), grow: false });
        assert_eq!(d, vec![Decision::Init { epoch: 1, id: id(1), rank: p, size: 3 }]);
    }
    g.ready(&[0, 1], 1);
    let d = g.view(2, &all, &[]);
    assert_eq!(d[0], vec![Decision::CreateAndPublishId { epoch: 2, generation: 0, grow: false }]);
    let mut d = vec![Vec::new(); 3];
    for (to, event) in g.relay.adopt(2, all.to_vec(), id(1), false) {
        d[to as usize] = g.peers[to as usize].handle(event);
    }
    assert_eq!(d[0], vec![Decision::Ready { epoch: 2 }]);
    assert_eq!(d[1], vec![Decision::Ready { epoch: 2 }]);
    assert_eq!(d[2], vec![Decision::Init { epoch: 2, id: id(1), rank: 2, size: 3 }]);
    assert!(g.relay.publish(0, 2, 0, id(2), false).is_empty(), "the maker's new id comes too late");
    assert_eq!(g.peers[0].ready_epoch(), Some(2));
    // A communicator that failed is not kept, even from the same id.
    let mut p = Group::active(2, NCCL_2_28_3);
    p.peers[1].handle(Event::Failed(DeviceError::Aborted { reason: "x".into() }));
    p.view(2, &[0, 1], &[]);
    let mut d = vec![Vec::new(); 2];
    for (to, event) in p.relay.adopt(2, vec![0, 1], id(1), false) {
        d[to as usize] = p.peers[to as usize].handle(event);
    }
    assert_eq!(d[0], vec![Decision::Ready { epoch: 2 }]);
    // Peer 1 cannot init from the id of the communicator that failed (peer 0 holds it):
    // it drops its own, and its next sync asks for the next generation, which peer 0
    // follows.
    assert_eq!(d[1], vec![Decision::Abort]);
    assert_eq!(p.peers[1].ready_epoch(), None);
    let d = p.peers[1].handle(Event::Renew { epoch: 2, generation: 1, members: vec![0, 1] });
    assert_eq!(d, vec![Decision::CreateAndPublishId { epoch: 2, generation: 1, grow: false }]);
    let mut d = vec![Vec::new(); 2];
    for (to, event) in p.relay.publish(1, 2, 1, id(2), false) {
        d[to as usize] = p.peers[to as usize].handle(event);
    }
    assert_eq!(d[0], vec![Decision::Abort, Decision::Init { epoch: 2, id: id(2), rank: 0, size: 2 }]);
    assert_eq!(d[1], vec![Decision::Init { epoch: 2, id: id(2), rank: 1, size: 2 }]);
}

/// A creation that waits for a rank that will never come is given up when the driver
/// says so (the view moved on without it): aborted, with a typed error; nothing else is.
#[test]
fn an_abandoned_creation_is_aborted_and_given_up() {
    let mut g = Group::new(2, NCCL_2_28_3);
    g.view(1, &[0, 1], &[]);
    let abandon = || Event::Abandon { reason: "the view moved".into() };
    assert_eq!(g.peers[0].handle(abandon()), vec![], "nothing is being made yet");
    g.publish(0, 1, id(1), false);
    let d = g.peers[0].handle(abandon());
    assert_eq!(d, vec![Decision::Abort, Decision::GiveUp(DeviceError::Aborted { reason: "the view moved".into() })]);
    assert_eq!(g.peers[0].ready_epoch(), None);
    g.ready(&[1], 1);
    assert_eq!(g.peers[1].handle(abandon()), vec![], "a ready communicator is not abandoned");
    // Peer 0 gave up; the others' next generation reaches it: it follows, from nothing.
    let follow = g.peers[0].clone().handle(Event::UniqueId { epoch: 1, generation: 1, id: id(5), grow: false });
    assert_eq!(follow, vec![Decision::Init { epoch: 1, id: id(5), rank: 0, size: 2 }]);
    let same = g.peers[0].clone().handle(Event::UniqueId { epoch: 1, generation: 0, id: id(1), grow: false });
    assert_eq!(same, vec![], "the generation it gave up is not made again from its id");
    // The next generation is made as after any failure.
    let d = g.peers[0].handle(Event::Renew { epoch: 1, generation: 1, members: vec![0, 1] });
    assert_eq!(d, vec![Decision::CreateAndPublishId { epoch: 1, generation: 1, grow: false }]);
}
