//! Eager collectives whose epoch ended undecided: the master waits for the survivors'
//! reports before it decides, in the new epoch.
//!
//! A member of an eager collective returns without the master's decision once every
//! member told it, over the data links, that it completed locally (see `comm::eager`).
//! So once any member may have returned, every member has completed, and the master
//! must not abort. When a member is lost, the master therefore cannot void the eager
//! collectives of the epoch at once, as it voids the others: a survivor may have
//! received the lost member's "done" just before it died and returned. It decides each
//! one from the survivors alone:
//!
//! - a survivor reports a failure: abort (that survivor sent no "done", so no member
//!   returned);
//! - a survivor moved to the new view without having begun it ([`ToMaster::ViewSeen`]
//!   comes after any begin of the old epoch on its connection): abort, for the same
//!   reason;
//! - every survivor reported success: commit (whether or not the lost member did: its
//!   result is gone with it, and the survivors all hold theirs).
//!
//! A survivor that began it and has not reported yet will: its executor completes, or
//! the new view stops it. Another loss shrinks the set it waits for. A begin that
//! reaches the master only after the loss (a master far from peers that are close to
//! each other may hear of a collective first when it is over) starts the wait then,
//! over the epoch's survivors.
//!
//! [`ToMaster::ViewSeen`]: crate::membership::protocol::ToMaster::ViewSeen

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::membership::peer::OpKey;
use crate::membership::protocol::{AbortReason, Decision, OpResult};
use crate::membership::view::PeerId;

/// One undecided eager collective of an ended epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Carried {
    /// The surviving members that began or had to begin it: those it waits for and tells.
    pub members: BTreeSet<PeerId>,
    /// Members whose begin the master has seen.
    pub begun: BTreeSet<PeerId>,
    /// Members that reported success.
    pub ok: BTreeSet<PeerId>,
    /// Why it aborts, if it does (the loss that ended its epoch).
    pub reason: AbortReason,
}

/// A decision on a carried collective: whom to tell, which one, what.
pub(super) type Settled = (BTreeSet<PeerId>, OpKey, Decision);

/// The carried collectives, by key.
#[derive(Debug, Default)]
pub(super) struct CarriedOps {
    ops: BTreeMap<OpKey, Carried>,
    /// Members that moved to a view newer than a carried collective's epoch.
    moved: BTreeMap<PeerId, u64>,
    /// The recent epochs that ended with a loss: their surviving members and the loss.
    /// A begin of such an epoch that reaches the master only after the loss (a master
    /// far from peers that are close to each other) starts a carried collective then.
    ended: BTreeMap<u64, (BTreeSet<PeerId>, AbortReason)>,
    /// Keys decided here lately, so that a late begin does not start one again.
    settled: VecDeque<OpKey>,
}

/// How many ended epochs and settled keys [`CarriedOps`] remembers.
const REMEMBERED: usize = 256;

impl CarriedOps {
    /// The epoch `epoch` ended with the loss `reason`; `survivors` remain.
    pub(super) fn epoch_lost(&mut self, epoch: u64, survivors: &BTreeSet<PeerId>, reason: &AbortReason) {
        self.ended.insert(epoch, (survivors.clone(), reason.clone()));
        while self.ended.len() > REMEMBERED {
            self.ended.pop_first();
        }
    }

    /// Carries `op` of key `key`; returns its decision if it needs no more reports.
    pub(super) fn carry(&mut self, key: OpKey, op: Carried) -> Vec<Settled> {
        self.ops.insert(key, op);
        self.settle()
    }

    /// Member `id` began eager collective `key` of an ended epoch (among `members` for
    /// a sub-group): a begin that arrived after the loss that ended its epoch.
    pub(super) fn begun(&mut self, id: PeerId, key: OpKey, members: Option<&[PeerId]>) -> Vec<Settled> {
        if let Some(op) = self.ops.get_mut(&key) {
            op.begun.insert(id);
            return Vec::new();
        }
        let Some((survivors, reason)) = self.ended.get(&key.0) else { return Vec::new() };
        if self.settled.contains(&key) || !survivors.contains(&id) {
            return Vec::new();
        }
        let members = match members {
            Some(ids) => ids.iter().filter(|m| survivors.contains(m)).copied().collect(),
            None => survivors.clone(),
        };
        let op = Carried { members, begun: BTreeSet::from([id]), ok: BTreeSet::new(), reason: reason.clone() };
        self.carry(key, op)
    }

    /// Member `id` reported `result` for `key`.
    pub(super) fn end(&mut self, id: PeerId, key: OpKey, result: &OpResult) -> Vec<Settled> {
        let Some(op) = self.ops.get_mut(&key) else { return Vec::new() };
        if !op.members.contains(&id) {
            return Vec::new();
        }
        op.begun.insert(id);
        if *result == OpResult::Ok {
            op.ok.insert(id);
            return self.settle();
        }
        let Some(op) = self.ops.remove(&key) else { return Vec::new() };
        self.remember(key);
        vec![(op.members, key, Decision::Abort(op.reason))]
    }

    /// Member `id` moved to the view of `epoch`: it begins nothing older any more.
    pub(super) fn view_seen(&mut self, id: PeerId, epoch: u64) -> Vec<Settled> {
        let seen = self.moved.entry(id).or_default();
        *seen = (*seen).max(epoch);
        self.settle()
    }

    /// The members now are `survivors`: the others are lost.
    pub(super) fn lost(&mut self, survivors: &BTreeSet<PeerId>) -> Vec<Settled> {
        for op in self.ops.values_mut() {
            op.members.retain(|m| survivors.contains(m));
        }
        for (ended, _) in self.ended.values_mut() {
            ended.retain(|m| survivors.contains(m));
        }
        self.moved.retain(|m, _| survivors.contains(m));
        self.settle()
    }

    /// Decides every carried collective that can be decided (see the module docs).
    fn settle(&mut self) -> Vec<Settled> {
        let moved = &self.moved;
        let mut settled = Vec::new();
        self.ops.retain(|&key, op| {
            let never_begins = |m: &PeerId| !op.begun.contains(m) && moved.get(m).is_some_and(|&e| e > key.0);
            let decision = if op.members.is_empty() {
                return false; // nobody left to tell
            } else if op.members.iter().any(never_begins) {
                Decision::Abort(op.reason.clone())
            } else if op.members.iter().all(|m| op.ok.contains(m)) {
                Decision::Commit
            } else {
                return true;
            };
            settled.push((op.members.clone(), key, decision));
            false
        });
        for &(_, key, _) in &settled {
            self.remember(key);
        }
        settled
    }

    fn remember(&mut self, key: OpKey) {
        if self.settled.len() == REMEMBERED {
            self.settled.pop_front();
        }
        self.settled.push_back(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lost() -> AbortReason {
        AbortReason::PeerLost { rank: 2, detail: "gone".into() }
    }

    fn op(members: &[PeerId], begun: &[PeerId], ok: &[PeerId]) -> Carried {
        let set = |s: &[PeerId]| s.iter().copied().collect();
        Carried { members: set(members), begun: set(begun), ok: set(ok), reason: lost() }
    }

    #[test]
    fn every_survivor_ok_commits_at_once() {
        let mut c = CarriedOps::default();
        let out = c.carry((1, 1), op(&[0, 1], &[0, 1], &[0, 1]));
        assert_eq!(out, vec![(BTreeSet::from([0, 1]), (1, 1), Decision::Commit)]);
        assert!(c.ops.is_empty());
    }

    #[test]
    fn a_survivor_still_running_is_waited_for() {
        let mut c = CarriedOps::default();
        assert!(c.carry((1, 1), op(&[0, 1], &[0, 1], &[0])).is_empty());
        assert!(c.view_seen(1, 2).is_empty(), "it began it: its report will come");
        let out = c.end(1, (1, 1), &OpResult::Ok);
        assert_eq!(out, vec![(BTreeSet::from([0, 1]), (1, 1), Decision::Commit)]);
    }

    #[test]
    fn a_failure_or_a_member_that_never_began_aborts() {
        let mut c = CarriedOps::default();
        c.carry((1, 1), op(&[0, 1], &[0, 1], &[0]));
        let out = c.end(1, (1, 1), &OpResult::Failed("stopped".into()));
        assert_eq!(out, vec![(BTreeSet::from([0, 1]), (1, 1), Decision::Abort(lost()))]);
        c.carry((1, 2), op(&[0, 1], &[0], &[0]));
        assert!(c.view_seen(1, 1).is_empty(), "a view of the same epoch says nothing");
        let out = c.view_seen(1, 2);
        assert_eq!(out, vec![(BTreeSet::from([0, 1]), (1, 2), Decision::Abort(lost()))]);
    }

    #[test]
    fn a_begin_heard_only_after_the_loss_starts_the_wait_then() {
        let mut c = CarriedOps::default();
        let survivors = BTreeSet::from([0, 1, 3]);
        c.epoch_lost(2, &survivors, &lost());
        assert!(c.view_seen(3, 3).is_empty(), "a member that moved on with nothing carried yet");
        // Member 3 never began it and moved to the new view: abort, at the first begin.
        let out = c.begun(0, (2, 5), None);
        assert_eq!(out, vec![(survivors.clone(), (2, 5), Decision::Abort(lost()))]);
        assert!(c.begun(1, (2, 5), None).is_empty(), "decided: a later begin starts nothing");
        assert!(c.end(1, (2, 5), &OpResult::Ok).is_empty());
        // A sub-group of the survivors commits among them; a late repeat starts nothing.
        assert!(c.begun(0, (2, 6), Some(&[0, 1, 2])).is_empty());
        assert!(c.begun(1, (2, 6), Some(&[0, 1, 2])).is_empty());
        assert!(c.end(0, (2, 6), &OpResult::Ok).is_empty());
        let out = c.end(1, (2, 6), &OpResult::Ok);
        assert_eq!(out, vec![(BTreeSet::from([0, 1]), (2, 6), Decision::Commit)]);
        assert!(c.begun(1, (2, 6), Some(&[0, 1, 2])).is_empty());
        assert!(c.ops.is_empty());
        assert!(c.begun(0, (9, 1), None).is_empty(), "an epoch that ended with no loss carries nothing");
        assert!(c.ops.is_empty());
    }

    #[test]
    fn a_late_begin_then_a_loss_of_the_last_waited_for_member_commits() {
        let mut c = CarriedOps::default();
        c.carry((3, 1), op(&[0, 1, 2], &[0, 1], &[0, 1]));
        assert!(c.begun(2, (3, 1), None).is_empty());
        assert!(c.view_seen(2, 4).is_empty());
        let out = c.lost(&BTreeSet::from([0, 1]));
        assert_eq!(out, vec![(BTreeSet::from([0, 1]), (3, 1), Decision::Commit)]);
    }
}
