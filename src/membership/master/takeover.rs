//! Taking over a group whose master was lost: a master restarted on the same address,
//! or a standby the peers turn to, rebuilds the view from what the peers tell it.
//!
//! No log is kept anywhere. A peer that lost its master sends a [`Rejoin`]: the term it
//! followed, its last view, whether it waits in `update_topology`, and the collectives it
//! saw committed or has no decision for. The new master waits until every member of the
//! newest view (by term, then epoch) has rejoined, or until a majority has and
//! [`MasterConfig::takeover_grace`](super::MasterConfig::takeover_grace) has passed since
//! the first rejoin. Then it:
//!
//! 1. settles every collective the old master left: a collective any peer saw committed
//!    commits for all (the old master committed it, so every member succeeded locally);
//!    every other one aborts everywhere with [`AbortReason::MasterLost`], buffers
//!    restored. No collective ends both ways.
//! 2. starts a new term (above every term reported) and a new epoch (above the newest
//!    view's), whose view is the newest view's members that rejoined, in their order;
//! 3. counts the votes of the peers that were in `update_topology`.
//!
//! Requiring a majority of the newest view is what keeps two masters from deciding for
//! one group at once: two masters cannot both hear from a majority of the same view.
//! An active master that hears of a newer group than its own (see
//! `MasterState::newer_than_ours`) steps down into a takeover itself, releasing its
//! peers so that they rejoin; one that hears of an older one tells the peer it was
//! removed.

use std::collections::BTreeSet;
use std::time::Instant;

use super::{ConnId, MasterState, Output, Peer};
use crate::membership::protocol::{AbortReason, Decision, Rejoin, Removal, ToPeer};
use crate::membership::view::View;

/// A takeover in progress: the peers that rejoined so far.
#[derive(Debug, Default)]
pub(super) struct Takeover {
    /// When the first rejoin arrived.
    started: Option<Instant>,
    /// The grace after the first rejoin has passed: a majority suffices.
    grace_over: bool,
    rejoined: Vec<Rejoined>,
}

#[derive(Debug)]
struct Rejoined {
    conn: ConnId,
    last_seen: Instant,
    state: Rejoin,
}

impl Takeover {
    /// The newest view any rejoined peer holds, by (term, epoch).
    fn newest(&self) -> Option<(u64, &View)> {
        self.rejoined.iter().map(|r| (r.state.term, &r.state.view)).max_by_key(|(term, v)| (*term, v.epoch))
    }

    /// Whether the takeover can complete at `now`.
    fn ready(&self, now: Instant, grace: std::time::Duration) -> bool {
        let Some((_, newest)) = self.newest() else { return false };
        let back = newest.members.iter().filter(|m| self.rejoined.iter().any(|r| r.state.id == m.id)).count();
        let all = back == newest.members.len();
        let majority = back * 2 > newest.members.len();
        all || (majority && (self.grace_over || self.started.is_some_and(|t| now >= t + grace)))
    }

    /// When the master must next look: the end of the grace (once), or the first
    /// rejoined peer's silence deadline.
    pub(super) fn deadline(&self, grace: std::time::Duration, timeout: std::time::Duration) -> Option<Instant> {
        let grace_end = self.started.filter(|_| !self.grace_over).map(|t| t + grace);
        let silence = self.rejoined.iter().map(|r| r.last_seen + timeout).min();
        grace_end.into_iter().chain(silence).min()
    }

    /// Time passed: notes the end of the grace; returns the silent peers' connections,
    /// forgotten.
    pub(super) fn tick(
        &mut self,
        now: Instant,
        grace: std::time::Duration,
        timeout: std::time::Duration,
    ) -> Vec<ConnId> {
        if self.started.is_some_and(|t| now >= t + grace) {
            self.grace_over = true;
        }
        let silent = self.silent(now, timeout);
        self.rejoined.retain(|r| !silent.contains(&r.conn));
        silent
    }

    /// Forgets the peer on `conn` (its connection broke); whether it was here.
    pub(super) fn forget(&mut self, conn: ConnId) -> bool {
        let before = self.rejoined.len();
        self.rejoined.retain(|r| r.conn != conn);
        before != self.rejoined.len()
    }

    /// Notes that the peer on `conn` is alive; whether it is one that rejoined.
    pub(super) fn heard(&mut self, conn: ConnId, now: Instant) -> bool {
        self.rejoined.iter_mut().find(|r| r.conn == conn).map(|r| r.last_seen = now).is_some()
    }

    /// The rejoined peers silent for `timeout` at `now`.
    fn silent(&self, now: Instant, timeout: std::time::Duration) -> Vec<ConnId> {
        self.rejoined.iter().filter(|r| now.saturating_duration_since(r.last_seen) >= timeout).map(|r| r.conn).collect()
    }

    /// The connection of the rejoined peer `id`.
    pub(super) fn conn_of(&self, id: u64) -> Option<ConnId> {
        self.rejoined.iter().find(|r| r.state.id == id).map(|r| r.conn)
    }
}

impl MasterState {
    /// A peer that lost its master asks this one to take over, on connection `conn`.
    pub(super) fn rejoin(&mut self, conn: ConnId, state: Rejoin, now: Instant, out: &mut Vec<Output>) {
        if self.takeover.is_none() {
            if !self.newer_than_ours(&state) {
                // This master settled the peer's fate while it was away.
                let why = format!(
                    "removed from the group while away from the master (it is at term {}, epoch {})",
                    self.term, self.epoch
                );
                out.push(Output::Close(conn, why));
                return;
            }
            // The peer comes from a newer group than this master's (one that a fresh
            // restart formed of newcomers, or a master a newer one replaced): this one
            // steps down and takes the newer group over.
            if self.epoch > 0 {
                self.step_down(out);
            }
            // (A master with no group yet keeps its waiting newcomers for the group it
            // takes over.)
            self.takeover = Some(Takeover::default());
        }
        let Some(takeover) = self.takeover.as_mut() else { return };
        // A peer that rejoins again (it gave up waiting here, then came back) replaces
        // its earlier try, whose connection it abandoned.
        if let Some(i) = takeover.rejoined.iter().position(|r| r.state.id == state.id) {
            let old = takeover.rejoined.remove(i);
            out.push(Output::Release(old.conn));
        }
        takeover.started.get_or_insert(now);
        takeover.rejoined.push(Rejoined { conn, last_seen: now, state });
        self.complete_takeover(now, out);
    }

    /// Whether a rejoining peer's group is newer than this master's own: a newer term;
    /// or, at an equal term, a group this master never held (a peer it never admitted:
    /// a restarted master and the one before it both started at term 1) with a later
    /// epoch, or as late and larger. A master with no group yet holds nothing newer.
    fn newer_than_ours(&self, state: &Rejoin) -> bool {
        if self.epoch == 0 {
            return true;
        }
        match state.term.cmp(&self.term) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => {
                let theirs = (state.view.epoch, state.view.size());
                !self.admitted.contains(&state.id) && theirs > (self.epoch, self.members.len())
            }
        }
    }

    /// Whether more than half of a view of three or more went unheard for half the
    /// peer timeout (see [`MasterConfig::fence`](super::MasterConfig::fence)).
    pub(super) fn majority_unheard(&self, now: Instant) -> bool {
        let n = self.members.len();
        let half = self.config.peer_timeout / 2;
        let heard = self.members.iter().filter(|p| now.saturating_duration_since(p.last_seen) < half).count();
        n >= 3 && heard * 2 <= n
    }

    /// Stops deciding: this master lost most of its view at once and may be the one cut
    /// off. Its peers are released to rejoin, and it waits, as a takeover, for a
    /// majority of its own view (which a standby elsewhere cannot also have).
    pub(super) fn fence(&mut self, out: &mut Vec<Output>) {
        tracing::warn!(term = self.term, epoch = self.epoch, "most of the group went silent at once: stepping down");
        self.step_down(out);
        self.takeover = Some(Takeover::default());
    }

    /// Gives up this master's group: every peer is released to rejoin (here or at a
    /// newer master), and the next rejoin starts a takeover.
    fn step_down(&mut self, out: &mut Vec<Output>) {
        for p in self.members.drain(..).chain(self.pending.drain(..)) {
            out.push(Output::Release(p.conn));
        }
        self.conns.clear();
        self.topo_votes.clear();
        self.tallies.epoch_ended(None, self.epoch, &BTreeSet::new());
        self.carried = Default::default();
        self.suspicions.clear();
    }

    /// Completes the takeover once it is [`Takeover::ready`].
    pub(super) fn complete_takeover(&mut self, now: Instant, out: &mut Vec<Output>) {
        let grace = self.config.takeover_grace;
        if !self.takeover.as_ref().is_some_and(|t| t.ready(now, grace)) {
            return;
        }
        let Some(takeover) = self.takeover.take() else { return };
        let Some((_, newest)) = takeover.newest() else { return };
        let newest = newest.clone();
        let term = takeover.rejoined.iter().map(|r| r.state.term).max().unwrap_or(0).max(self.term) + 1;
        let committed: BTreeSet<(u64, u64)> =
            takeover.rejoined.iter().flat_map(|r| r.state.committed.iter().copied()).collect();
        let mut members = Vec::new();
        let mut removed = Vec::new();
        for (rank, m) in newest.members.iter().enumerate() {
            match takeover.rejoined.iter().find(|r| r.state.id == m.id) {
                Some(r) => members.push(r),
                None => removed.push(Removal {
                    id: m.id,
                    rank: rank as u32,
                    detail: "did not rejoin when the master was replaced".into(),
                }),
            }
        }
        for r in takeover.rejoined.iter().filter(|r| newest.rank_of(r.state.id).is_none()) {
            let why = "removed from the group before its master was replaced; join again";
            out.push(Output::Close(r.conn, why.into()));
        }
        // The old master's collectives: each member hears the outcome of those it knows.
        for r in &members {
            for &(epoch, seq) in r.state.committed.iter().chain(&r.state.undecided) {
                let decision = if committed.contains(&(epoch, seq)) {
                    Decision::Commit
                } else {
                    let detail = "the master was replaced before it decided".to_string();
                    Decision::Abort(AbortReason::MasterLost { detail })
                };
                out.push(Output::Send(r.conn, ToPeer::Outcome { epoch, seq, decision }));
            }
        }
        self.term = term;
        self.epoch = self.epoch.max(newest.epoch) + 1;
        self.tallies.epoch_ended(None, self.epoch, &BTreeSet::new());
        self.carried = Default::default();
        self.suspicions.clear();
        self.topo_votes.clear();
        self.members = members
            .iter()
            .map(|r| {
                self.conns.insert(r.conn, r.state.id);
                self.admitted.insert(r.state.id);
                let mut arrivals = super::silence::Arrivals::default();
                arrivals.heard(r.last_seen);
                Peer { id: r.state.id, addr: r.state.data_addr, conn: r.conn, last_seen: r.last_seen, arrivals }
            })
            .collect();
        tracing::info!(term, epoch = self.epoch, members = self.members.len(), "took over the group");
        let unchanged = removed.is_empty();
        self.broadcast(ToPeer::View { view: self.view(), removed, term }, out);
        if unchanged {
            // The device communicator of the newest view may be half made from an id
            // the old master relayed to some members only: relay it to all again.
            self.adopt_device_id(newest.epoch, members.iter().filter_map(|r| r.state.device.as_ref()), out);
        }
        self.topo_votes = members.iter().filter(|r| r.state.voting).map(|r| r.state.id).collect();
        self.finish_round_if_complete(out);
    }
}
