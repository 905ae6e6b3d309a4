//! The commit rule: the master's record of each collective of the current epoch, and
//! the decisions it comes to.
//!
//! [`Tallies`] knows nothing of connections or of the roster's upkeep. Each call gets the
//! [`Roster`] it needs (the view's members in rank order and who is in a topology
//! round) and returns what must be said as data, `(recipients, seq, word)`, which
//! [`MasterState`](super::MasterState) turns into messages for the members.

use std::collections::{BTreeMap, BTreeSet};

use super::carried::Carried;
use super::sync_plan::{sync_plan, PlannedSync};
use crate::membership::peer::OpKey;
use crate::membership::protocol::{AbortReason, Decision, OpResult};
use crate::membership::view::PeerId;
use crate::state::{SyncStrategy, TensorDigest};

/// Who hears a word: every member of the view (`None`) or these peers only (a sub-group
/// collective's), as far as they are still members.
pub(super) type Recipients = Option<BTreeSet<PeerId>>;

/// What the master tells the members about one collective.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Word {
    /// Commit or abort.
    Outcome(Decision),
    /// Every member began a shared-state sync: who sends which tensor to whom.
    SyncPlan(PlannedSync),
}

/// What must be said, in order: to whom, about which collective, what.
pub(super) type Said = Vec<(Recipients, u64, Word)>;

/// The group as a tally sees it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Roster<'a> {
    /// The current view's members, in rank order.
    pub members: &'a [PeerId],
    /// The members in a topology round (empty when none runs).
    pub in_round: &'a BTreeSet<PeerId>,
}

impl Roster<'_> {
    fn rank(&self, id: PeerId) -> u32 {
        self.members.iter().position(|m| *m == id).unwrap_or(usize::MAX) as u32 // ok: callers pass members
    }
}

/// What a member started for one sequence number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Begin {
    Collective(u64),
    Sync(SyncStrategy, Vec<TensorDigest>),
}

/// The master's record of one collective of the current epoch.
#[derive(Clone, Debug, Default)]
struct Tally {
    begun: BTreeMap<PeerId, Begin>,
    ok: BTreeSet<PeerId>,
    planned: bool,
    /// For a sub-group collective: its members, the only peers it waits for and tells.
    members: Option<BTreeSet<PeerId>>,
    /// For a sub-group collective: the decision, kept for members that begin late.
    decision: Option<Decision>,
    /// Begun as an eager collective: a loss carries it instead of voiding it (see
    /// [`super::carried`]).
    eager: bool,
}

/// The records of the current epoch's collectives, by sequence number.
#[derive(Debug, Default)]
pub(super) struct Tallies {
    ops: BTreeMap<u64, Tally>,
    decided: BTreeSet<u64>,
}

impl Tallies {
    /// Whether collective `seq` of this epoch was begun as an eager one.
    pub(super) fn is_eager(&self, seq: u64) -> bool {
        self.ops.get(&seq).is_some_and(|t| t.eager)
    }

    /// Member `id` began collective `seq` (or a sync) as a whole-group call.
    pub(super) fn begin(&mut self, id: PeerId, seq: u64, begin: Begin, eager: bool, roster: &Roster<'_>) -> Said {
        if self.decided.contains(&seq) {
            return Vec::new(); // already aborted: the peer knows
        }
        // A member in the round that began this collective ran it before it voted (its
        // report precedes its vote): the others began it too, and an eager collective
        // may already have returned on them, so it must not abort here. A slow control
        // connection (or one whose messages wait behind others) brings a member's begin
        // after another member's vote; it is the same call, not a race with the round.
        let voters_ran_it = self.ops.get(&seq).is_some_and(|t| t.begun.keys().any(|m| roster.in_round.contains(m)));
        if !roster.in_round.is_empty() && !roster.in_round.contains(&id) && !voters_ran_it {
            // Eager collectives return without the master, so a member can begin its
            // next call before the master's PendingJoiners reaches it while the others
            // already wait in update_topology. That is a race, not a program error: the
            // call fails retryably (Aborted), and the member's next update_topology joins
            // the round.
            self.ops.entry(seq).or_default();
            let rank = roster.members.iter().position(|m| *m == id).unwrap_or(0) as u32;
            let detail = format!(
                "member {id:#x} began a collective while a membership round was open; call update_topology and retry"
            );
            return self.decide(seq, Decision::Abort(AbortReason::Failed { rank, detail }));
        }
        let tally = self.ops.entry(seq).or_default();
        if tally.members.is_some() {
            let detail =
                format!("member {id:#x} began collective {seq:#x} as a whole-group call, others as a sub-group");
            return self.mismatch(seq, detail);
        }
        tally.begun.insert(id, begin);
        tally.eager |= eager;
        if let Some(detail) = first_mismatch(&tally.begun) {
            return self.mismatch(seq, detail);
        }
        let tally = &self.ops[&seq];
        let all_begun = roster.members.iter().all(|m| tally.begun.contains_key(m));
        if all_begun && !tally.planned && matches!(tally.begun.get(&id), Some(Begin::Sync(..))) {
            return self.plan_sync(seq, roster.members);
        }
        Vec::new()
    }

    /// Member `id` finished collective `seq` locally with `result`. A collective commits
    /// once every member it waits for reported success.
    pub(super) fn end(&mut self, id: PeerId, seq: u64, result: OpResult, roster: &Roster<'_>) -> Said {
        if self.decided.contains(&seq) {
            return Vec::new();
        }
        match result {
            OpResult::Ok => {
                let tally = self.ops.entry(seq).or_default();
                tally.ok.insert(id);
                let done = match &tally.members {
                    Some(members) => members.iter().all(|m| tally.ok.contains(m)),
                    None => roster.members.iter().all(|m| tally.ok.contains(m)),
                };
                if done {
                    self.decide(seq, Decision::Commit)
                } else {
                    Vec::new()
                }
            }
            OpResult::Mismatch(detail) => self.mismatch(seq, detail),
            OpResult::Invalid(detail) => {
                self.decide(seq, Decision::Abort(AbortReason::Invalid { rank: roster.rank(id), detail }))
            }
            OpResult::Failed(detail) => {
                self.decide(seq, Decision::Abort(AbortReason::Failed { rank: roster.rank(id), detail }))
            }
            OpResult::Lost { rank, detail } => {
                let detail = format!("rank {} lost its link to it: {detail}", roster.rank(id));
                self.decide(seq, Decision::Abort(AbortReason::PeerLost { rank, detail }))
            }
        }
    }

    /// A member began a sub-group collective: it is tallied, checked for mismatches and
    /// committed among `members` only, so non-members neither take part nor wait.
    ///
    /// Keys of different member sets may collide (see `comm::subgroup`); a collision, or
    /// members that name different sets under one key, aborts the collective with a
    /// mismatch for everyone involved, so traffic of two sub-groups never mixes.
    pub(super) fn begin_sub(
        &mut self,
        id: PeerId,
        seq: u64,
        call: u64,
        members: Vec<PeerId>,
        eager: bool,
        roster: &Roster<'_>,
    ) -> Said {
        let set: BTreeSet<PeerId> = members.iter().copied().collect();
        let valid = set.contains(&id) && set.len() == members.len() && set.iter().all(|m| roster.members.contains(m));
        let only_sender = || Some(BTreeSet::from([id]));
        if !valid {
            let detail = format!("member {id:#x} began sub-group collective {seq:#x} with an invalid member set");
            return vec![(only_sender(), seq, Word::Outcome(Decision::Abort(AbortReason::Mismatch { detail })))];
        }
        let tally = self.ops.entry(seq).or_insert_with(|| Tally { members: Some(set.clone()), ..Tally::default() });
        if let Some(decision) = tally.decision.clone() {
            // Decided before this member began (e.g. a mismatch another member caused).
            if tally.begun.insert(id, Begin::Collective(call)).is_none() {
                return vec![(only_sender(), seq, Word::Outcome(decision))];
            }
            return Vec::new();
        }
        tally.begun.insert(id, Begin::Collective(call));
        tally.eager |= eager;
        let detail = if tally.members.as_ref() != Some(&set) {
            Some(format!(
                "sub-group collective key {seq:#x} was used by different member sets (members disagree on the set, \
                 or two sets' keys collide)"
            ))
        } else if let Some(v) =
            // A member that began it before it voted ran it (see `Tallies::begin`).
            set.iter().find(|m| **m != id && roster.in_round.contains(m) && !tally.begun.contains_key(m))
        {
            // A race of recovery, as in `topology_vote`: retryable.
            let detail = format!(
                "member {v:#x} called update_topology while member {id:#x} began sub-group collective {seq:#x}; call \
                 update_topology and retry"
            );
            return self.decide(seq, Decision::Abort(AbortReason::Failed { rank: roster.rank(*v), detail }));
        } else {
            first_mismatch(&tally.begun)
        };
        match detail {
            Some(detail) => self.mismatch(seq, detail),
            None => Vec::new(),
        }
    }

    /// Member `id` (of rank `rank`) entered `update_topology`: the collectives that wait
    /// for it, which it will not begin now, abort. A sub-group collective waits only for
    /// its own members.
    ///
    /// The abort is retryable (`Aborted`), not a `Mismatch`: a member enters
    /// `update_topology` after a failure it saw first (a broken link to a lost peer)
    /// while the others may still wait in the collective the loss will fail, and eager
    /// collectives return without the master, so one member may be a call ahead. Those
    /// are races of recovery, not program errors; the others' retry (`update_topology`,
    /// then the call again) joins the round.
    pub(super) fn topology_vote(&mut self, id: PeerId, rank: u32) -> Said {
        let waiting: Vec<u64> = self
            .ops
            .iter()
            .filter(|(s, t)| {
                !self.decided.contains(s)
                    && !t.begun.contains_key(&id)
                    && t.members.as_ref().is_none_or(|m| m.contains(&id))
            })
            .map(|(&s, _)| s)
            .collect();
        let mut said = Vec::new();
        for seq in waiting {
            let detail = format!(
                "member {id:#x} called update_topology while others ran collective {seq:#x}; call update_topology \
                 and retry"
            );
            said.extend(self.decide(seq, Decision::Abort(AbortReason::Failed { rank, detail })));
        }
        said
    }

    /// The epoch `epoch` ended: its collectives are void. With `lost`, a member was
    /// lost, and every undecided collective aborts for all members with that reason,
    /// except an eager one, which is returned to be carried into the new epoch over the
    /// members that remain, `survivors` (see [`super::carried`]).
    pub(super) fn epoch_ended(
        &mut self,
        lost: Option<AbortReason>,
        epoch: u64,
        survivors: &BTreeSet<PeerId>,
    ) -> (Said, Vec<(OpKey, Carried)>) {
        let (mut said, mut carried) = (Vec::new(), Vec::new());
        if let Some(reason) = lost {
            for (&seq, tally) in self.ops.iter().filter(|(s, _)| !self.decided.contains(s)) {
                if !tally.eager {
                    said.push((None, seq, Word::Outcome(Decision::Abort(reason.clone()))));
                    continue;
                }
                let members: BTreeSet<PeerId> = match &tally.members {
                    Some(set) => set.intersection(survivors).copied().collect(),
                    None => survivors.clone(),
                };
                let begun = tally.begun.keys().filter(|m| members.contains(m)).copied().collect();
                let ok = tally.ok.intersection(&members).copied().collect();
                carried.push(((epoch, seq), Carried { members, begun, ok, reason: reason.clone() }));
            }
        }
        self.ops.clear();
        self.decided.clear();
        (said, carried)
    }

    /// Decides collective `seq` once: a whole-group decision goes to every member, a
    /// sub-group's to its members and to whoever began it under its key.
    fn decide(&mut self, seq: u64, decision: Decision) -> Said {
        if !self.decided.insert(seq) {
            return Vec::new();
        }
        let to = match self.ops.get_mut(&seq) {
            Some(tally) if tally.members.is_some() => {
                tally.decision = Some(decision.clone());
                Some(tally.members.iter().flatten().chain(tally.begun.keys()).copied().collect())
            }
            _ => None,
        };
        vec![(to, seq, Word::Outcome(decision))]
    }

    fn mismatch(&mut self, seq: u64, detail: String) -> Said {
        self.decide(seq, Decision::Abort(AbortReason::Mismatch { detail }))
    }

    fn plan_sync(&mut self, seq: u64, members: &[PeerId]) -> Said {
        let tally = &self.ops[&seq];
        let requests: Vec<(SyncStrategy, &[TensorDigest])> = members
            .iter()
            .filter_map(|m| match tally.begun.get(m) {
                Some(Begin::Sync(strategy, tensors)) => Some((*strategy, tensors.as_slice())),
                _ => None,
            })
            .collect();
        match sync_plan(&requests) {
            Ok(plan) => {
                if let Some(t) = self.ops.get_mut(&seq) {
                    t.planned = true;
                }
                vec![(None, seq, Word::SyncPlan(plan))]
            }
            Err(detail) => self.mismatch(seq, detail),
        }
    }
}

/// Describes the first disagreement among the members' calls for one sequence number.
fn first_mismatch(begun: &BTreeMap<PeerId, Begin>) -> Option<String> {
    let mut iter = begun.iter();
    let (first_id, first) = iter.next()?;
    let names = |b: &Begin| match b {
        Begin::Collective(_) => None,
        Begin::Sync(_, t) => Some(t.iter().map(|t| t.name.clone()).collect::<Vec<_>>()),
    };
    for (id, b) in iter {
        let differs = match (first, b) {
            (Begin::Collective(a), Begin::Collective(c)) => a != c,
            (Begin::Sync(..), Begin::Sync(..)) => names(first) != names(b),
            _ => true,
        };
        if differs {
            return Some(format!(
                "peers {first_id:#x} and {id:#x} made different calls ({} vs {})",
                describe(first),
                describe(b)
            ));
        }
    }
    None
}

fn describe(b: &Begin) -> String {
    match b {
        Begin::Collective(call) => format!("collective {call:#x}"),
        Begin::Sync(_, t) => format!("shared-state sync of {} tensors", t.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{group, outcomes};
    use super::super::Output;
    use super::*;
    use crate::membership::protocol::{ToMaster, ToPeer};

    fn sub(epoch: u64, seq: u64, call: u64, members: &[PeerId]) -> ToMaster {
        ToMaster::SubOpBegin { epoch, seq, call, members: members.to_vec() }
    }

    fn ok(epoch: u64, seq: u64) -> ToMaster {
        ToMaster::OpEnd { epoch, seq, result: OpResult::Ok }
    }

    const S: u64 = 1 << 63;

    #[test]
    fn commit_needs_every_member() {
        let (mut m, now) = group(3);
        let e = m.view().epoch;
        for i in 1..=3 {
            m.handle(i, ToMaster::OpBegin { epoch: e, seq: 1, call: 9 }, now);
        }
        assert!(m.handle(1, ToMaster::OpEnd { epoch: e, seq: 1, result: OpResult::Ok }, now).is_empty());
        assert!(m.handle(2, ToMaster::OpEnd { epoch: e, seq: 1, result: OpResult::Ok }, now).is_empty());
        let out = m.handle(3, ToMaster::OpEnd { epoch: e, seq: 1, result: OpResult::Ok }, now);
        assert_eq!(outcomes(&out).len(), 3);
        assert!(outcomes(&out).iter().all(|(_, d)| *d == Decision::Commit));
    }

    #[test]
    fn loss_aborts_for_all_survivors_even_after_their_success() {
        let (mut m, now) = group(3);
        let e = m.view().epoch;
        for i in 1..=3 {
            m.handle(i, ToMaster::OpBegin { epoch: e, seq: 1, call: 9 }, now);
        }
        m.handle(1, ToMaster::OpEnd { epoch: e, seq: 1, result: OpResult::Ok }, now);
        m.handle(3, ToMaster::OpEnd { epoch: e, seq: 1, result: OpResult::Ok }, now);
        let out = m.disconnected(2);
        let decided = outcomes(&out);
        assert_eq!(decided.len(), 2);
        assert!(decided.iter().all(|(_, d)| matches!(d, Decision::Abort(AbortReason::PeerLost { rank: 1, .. }))));
        assert_eq!(m.view().size(), 2);
        assert_eq!(m.view().epoch, e + 1);
        assert!(out.contains(&Output::Close(2, "removed from the group: control connection closed".into())));
        // A late report of the old epoch changes nothing.
        assert!(m.handle(1, ToMaster::OpEnd { epoch: e, seq: 1, result: OpResult::Ok }, now).is_empty());
    }

    #[test]
    fn different_calls_abort_with_mismatch() {
        let (mut m, now) = group(2);
        let e = m.view().epoch;
        m.handle(1, ToMaster::OpBegin { epoch: e, seq: 1, call: 9 }, now);
        let out = m.handle(2, ToMaster::OpBegin { epoch: e, seq: 1, call: 8 }, now);
        let d = outcomes(&out);
        assert_eq!(d.len(), 2);
        assert!(d.iter().all(|(_, d)| matches!(d, Decision::Abort(AbortReason::Mismatch { .. }))));
    }

    #[test]
    fn a_collective_during_a_topology_round_aborts_retryably() {
        // With eager collectives a member may begin its next call before it hears of
        // the round the others already wait in: a race, so the call is aborted with a
        // retryable error (the member's update_topology then joins the round), not a
        // mismatch, which no caller could recover from.
        let (mut m, now) = group(2);
        let e = m.view().epoch;
        m.handle(1, ToMaster::UpdateTopology { epoch: e }, now);
        let out = m.handle(2, ToMaster::OpBegin { epoch: e, seq: 1, call: 9 }, now);
        let d = outcomes(&out);
        assert!(!d.is_empty());
        for (_, d) in d {
            let Decision::Abort(reason) = d else { panic!("{d:?}") };
            assert!(matches!(reason, AbortReason::Failed { .. }), "{reason:?}");
            let e = crate::membership::peer::abort_error(reason);
            assert!(e.is_retryable() && e.to_string().contains("update_topology"), "{e}");
        }
    }

    #[test]
    fn a_sub_op_commits_over_its_members_only() {
        let (mut m, now) = group(4);
        let e = m.view().epoch;
        // Sub-groups {1,2} and {3,4} and a whole-group collective, all at once.
        for (i, set) in [(1, [1, 2]), (2, [1, 2]), (3, [3, 4]), (4, [3, 4])] {
            assert!(m.handle(i, sub(e, S | set[0], 7, &set), now).is_empty());
        }
        assert!(m.handle(1, ok(e, S | 1), now).is_empty());
        let out = m.handle(2, ok(e, S | 1), now);
        assert_eq!(outcomes(&out), vec![(1, Decision::Commit), (2, Decision::Commit)], "told to members only");
        // The other pair is still undecided; it commits on its own members' reports.
        assert!(m.handle(3, ok(e, S | 3), now).is_empty());
        let out = m.handle(4, ok(e, S | 3), now);
        assert_eq!(outcomes(&out), vec![(3, Decision::Commit), (4, Decision::Commit)]);
        // The whole-group counter is untouched: seq 1 still needs every member.
        for i in 1..=4 {
            m.handle(i, ToMaster::OpBegin { epoch: e, seq: 1, call: 9 }, now);
        }
        for i in 1..=3 {
            assert!(m.handle(i, ok(e, 1), now).is_empty());
        }
        assert_eq!(outcomes(&m.handle(4, ok(e, 1), now)).len(), 4);
    }

    #[test]
    fn a_non_member_s_topology_vote_leaves_a_sub_op_alone_but_a_member_s_aborts_it() {
        let (mut m, now) = group(3);
        let e = m.view().epoch;
        m.handle(1, sub(e, S | 1, 7, &[1, 2]), now);
        // Peer 3 is not in the sub-group: its vote changes nothing for the pair.
        assert!(outcomes(&m.handle(3, ToMaster::UpdateTopology { epoch: e }, now)).is_empty());
        m.handle(2, sub(e, S | 1, 7, &[1, 2]), now);
        m.handle(1, ok(e, S | 1), now);
        let out = m.handle(2, ok(e, S | 1), now);
        assert_eq!(outcomes(&out), vec![(1, Decision::Commit), (2, Decision::Commit)]);
        // The round completes once the pair votes too.
        m.handle(1, ToMaster::UpdateTopology { epoch: e }, now);
        let out = m.handle(2, ToMaster::UpdateTopology { epoch: e }, now);
        assert!(out.iter().any(|o| matches!(o, Output::Send(_, ToPeer::TopologyDone { .. }))));
        // Now a member votes while its partner waits in a sub-op: the pair's op aborts,
        // retryably (the member may have seen a loss its partner has not yet).
        m.handle(1, sub(e, S | 2, 7, &[1, 2]), now);
        let out = m.handle(2, ToMaster::UpdateTopology { epoch: e }, now);
        let d = outcomes(&out);
        assert_eq!(d.len(), 2);
        let retryable = |d: &Decision| matches!(d, Decision::Abort(AbortReason::Failed { detail, .. }) if detail.contains("update_topology"));
        assert!(d.iter().all(|(c, d)| *c != 3 && retryable(d)), "{d:?}");
        // And a member beginning a sub-op while its partner is in the round: the same.
        let out = m.handle(3, sub(e, S | 3, 7, &[2, 3]), now);
        assert!(outcomes(&out).iter().all(|(_, d)| retryable(d)), "{out:?}");
        assert_eq!(outcomes(&out).len(), 2);
    }

    #[test]
    fn a_begin_that_comes_after_the_vote_of_a_member_that_ran_it_is_not_aborted() {
        // Members 2 and 3 began eager collective 1, reported success and voted (an eager
        // collective returns on the members' "done"s); member 1's begin and report come
        // late on a slow control connection. The collective commits: 2 and 3 may have
        // returned from it.
        let (mut m, now) = group(3);
        let e = m.view().epoch;
        for i in [2, 3] {
            m.handle(i, ToMaster::EagerOpBegin { epoch: e, seq: 1, call: 9 }, now);
            m.handle(i, ok(e, 1), now);
            assert!(outcomes(&m.handle(i, ToMaster::UpdateTopology { epoch: e }, now)).is_empty());
        }
        assert!(outcomes(&m.handle(1, ToMaster::EagerOpBegin { epoch: e, seq: 1, call: 9 }, now)).is_empty());
        let out = m.handle(1, ok(e, 1), now);
        assert_eq!(outcomes(&out).len(), 3);
        assert!(outcomes(&out).iter().all(|(_, d)| *d == Decision::Commit), "{out:?}");
        // A collective that no member in the round began still aborts (the round's rule).
        let out = m.handle(1, ToMaster::EagerOpBegin { epoch: e, seq: 2, call: 9 }, now);
        assert!(outcomes(&out).iter().all(|(_, d)| matches!(d, Decision::Abort(_))), "{out:?}");
        assert_eq!(outcomes(&out).len(), 3);
    }

    #[test]
    fn sub_op_mismatches_and_key_collisions_reach_every_member() {
        let (mut m, now) = group(4);
        let e = m.view().epoch;
        m.handle(1, sub(e, S | 1, 7, &[1, 2]), now);
        let d = outcomes(&m.handle(2, sub(e, S | 1, 8, &[1, 2]), now));
        assert_eq!(d.len(), 2);
        assert!(d.iter().all(|(_, d)| matches!(d, Decision::Abort(AbortReason::Mismatch { .. }))));
        // Two sets under one key: both sets' members hear of it, late ones when they begin.
        m.handle(1, sub(e, S | 2, 7, &[1, 2]), now);
        let d = outcomes(&m.handle(3, sub(e, S | 2, 7, &[3, 4]), now));
        assert_eq!(d.iter().map(|(c, _)| *c).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert!(d.iter().all(|(_, d)| matches!(d, Decision::Abort(AbortReason::Mismatch { .. }))));
        let d = outcomes(&m.handle(4, sub(e, S | 2, 7, &[3, 4]), now));
        assert_eq!(d.len(), 1);
        assert!(matches!(d[0], (4, Decision::Abort(AbortReason::Mismatch { .. }))));
        // A set without the sender, or with a stranger, is refused to the sender alone.
        let d = outcomes(&m.handle(1, sub(e, S | 3, 7, &[2, 3]), now));
        assert!(matches!(&d[..], [(1, Decision::Abort(AbortReason::Mismatch { .. }))]));
        let d = outcomes(&m.handle(1, sub(e, S | 4, 7, &[1, 99]), now));
        assert!(matches!(&d[..], [(1, Decision::Abort(AbortReason::Mismatch { .. }))]));
        // A whole-group begin under a sub-op's key is a mismatch, not a join of the tally.
        m.handle(1, sub(e, S | 5, 7, &[1, 2]), now);
        let d = outcomes(&m.handle(3, ToMaster::OpBegin { epoch: e, seq: S | 5, call: 7 }, now));
        assert!(!d.is_empty() && d.iter().all(|(_, d)| matches!(d, Decision::Abort(AbortReason::Mismatch { .. }))));
    }

    #[test]
    fn losing_a_sub_group_member_aborts_its_op_with_peer_lost() {
        let (mut m, now) = group(3);
        let e = m.view().epoch;
        m.handle(1, sub(e, S | 1, 7, &[1, 2]), now);
        m.handle(2, sub(e, S | 1, 7, &[1, 2]), now);
        m.handle(1, ok(e, S | 1), now);
        let out = m.disconnected(2);
        let d = outcomes(&out);
        assert!(d.iter().any(|(c, d)| *c == 1 && matches!(d, Decision::Abort(AbortReason::PeerLost { rank: 1, .. }))));
        assert!(d.iter().all(|(_, d)| *d != Decision::Commit));
        assert_eq!(m.view().epoch, e + 1);
    }

    #[test]
    fn tallies_decide_on_their_own() {
        let (members, none) = ([1, 2, 3], BTreeSet::new());
        let roster = Roster { members: &members, in_round: &none };
        let mut t = Tallies::default();
        for id in members {
            assert!(t.begin(id, 1, Begin::Collective(9), false, &roster).is_empty());
        }
        assert!(t.end(1, 1, OpResult::Ok, &roster).is_empty());
        assert!(t.end(2, 1, OpResult::Ok, &roster).is_empty());
        assert_eq!(t.end(3, 1, OpResult::Ok, &roster), vec![(None, 1, Word::Outcome(Decision::Commit))]);
        // A sub-group's decision names its recipients; a failure names the failing rank.
        assert!(t.begin_sub(2, S | 1, 7, vec![2, 3], false, &roster).is_empty());
        let said = t.end(3, S | 1, OpResult::Failed("x".into()), &roster);
        let failed = Decision::Abort(AbortReason::Failed { rank: 2, detail: "x".into() });
        assert_eq!(said, vec![(Some(BTreeSet::from([2, 3])), S | 1, Word::Outcome(failed))]);
        // A member whose link broke reports the loss: everyone hears a loss, not a failure.
        assert!(t.begin(1, 3, Begin::Collective(9), false, &roster).is_empty());
        let said = t.end(2, 3, OpResult::Lost { rank: 2, detail: "reset".into() }, &roster);
        let lost = AbortReason::PeerLost { rank: 2, detail: "rank 1 lost its link to it: reset".into() };
        assert_eq!(said, vec![(None, 3, Word::Outcome(Decision::Abort(lost)))]);
        // The epoch ends with a loss: what is undecided aborts for everyone, then all is void.
        assert!(t.begin(1, 2, Begin::Collective(9), false, &roster).is_empty());
        // An eager one is carried over the survivors instead, with what they reported.
        for id in members {
            assert!(t.begin(id, 4, Begin::Collective(9), true, &roster).is_empty());
        }
        assert!(t.end(2, 4, OpResult::Ok, &roster).is_empty());
        let lost = AbortReason::PeerLost { rank: 0, detail: "gone".into() };
        let survivors = BTreeSet::from([2, 3]);
        let (said, carried) = t.epoch_ended(Some(lost.clone()), 5, &survivors);
        assert_eq!(said, vec![(None, 2, Word::Outcome(Decision::Abort(lost.clone())))]);
        let expect = Carried { members: survivors.clone(), begun: survivors, ok: BTreeSet::from([2]), reason: lost };
        assert_eq!(carried, vec![((5, 4), expect)]);
        let (said, carried) = t.epoch_ended(None, 6, &BTreeSet::new());
        assert!(said.is_empty() && carried.is_empty());
    }
}
