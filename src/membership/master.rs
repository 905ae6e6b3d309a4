//! The master as a state machine: messages and time in, messages out. No I/O.
//!
//! The master holds the authoritative [`View`]. It admits joiners when every member
//! has called `update_topology`, removes members whose control connection broke or who
//! stayed silent past [`MasterConfig::peer_timeout`], and decides every collective's
//! outcome: a collective commits only when every member of its view reported success;
//! otherwise every member is told to abort. Being the single decider is what makes the
//! survivors agree.
//!
//! ```
//! use std::time::Instant;
//! use phalanx::membership::master::{MasterConfig, MasterState, Output};
//! use phalanx::membership::protocol::{ToMaster, ToPeer};
//! let mut m = MasterState::new(MasterConfig::default());
//! let now = Instant::now();
//! let out = m.handle(1, ToMaster::Join { id: 42, data_addr: "127.0.0.1:7000".parse().unwrap() }, now);
//! // The first peer is admitted at once.
//! assert!(matches!(&out[..], [Output::Send(1, ToPeer::View { .. })]));
//! assert_eq!(m.view().size(), 1);
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::protocol::{AbortReason, Decision, OpResult, Removal, ToMaster, ToPeer, Transfer};
use super::view::{Member, PeerId, View};
use crate::state::{Digest, SyncStrategy, TensorDigest};

/// A control connection, as numbered by the driver.
pub type ConnId = u64;

/// Default [`MasterConfig::peer_timeout`] in milliseconds: a crashed or frozen peer is
/// removed at most this long after its last heartbeat (five heartbeat intervals at the
/// default [`crate::membership::client::DEFAULT_HEARTBEAT_MS`]), which keeps the time
/// from a death to the survivors' next successful collective under one second.
pub const DEFAULT_PEER_TIMEOUT_MS: u64 = 750;

/// Settings of the master.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MasterConfig {
    /// A member silent for this long is removed (peers send heartbeats more often).
    pub peer_timeout: Duration,
    /// At most this many joiners wait for admission; more are refused.
    pub max_pending: usize,
}

impl Default for MasterConfig {
    fn default() -> Self {
        MasterConfig { peer_timeout: Duration::from_millis(DEFAULT_PEER_TIMEOUT_MS), max_pending: 256 }
    }
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Send a message on a control connection.
    Send(ConnId, ToPeer),
    /// Close a control connection, telling the peer why.
    Close(ConnId, String),
}

#[derive(Clone, Debug)]
struct Peer {
    id: PeerId,
    addr: SocketAddr,
    conn: ConnId,
    last_seen: Instant,
}

/// What a member started for one sequence number.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Begin {
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
}

/// The master's whole state.
#[derive(Debug)]
pub struct MasterState {
    config: MasterConfig,
    epoch: u64,
    members: Vec<Peer>,
    pending: Vec<Peer>,
    conns: HashMap<ConnId, PeerId>,
    topo_votes: BTreeSet<PeerId>,
    ops: BTreeMap<u64, Tally>,
    decided: BTreeSet<u64>,
}

impl MasterState {
    /// An empty group at epoch 0.
    pub fn new(config: MasterConfig) -> MasterState {
        MasterState {
            config,
            epoch: 0,
            members: Vec::new(),
            pending: Vec::new(),
            conns: HashMap::new(),
            topo_votes: BTreeSet::new(),
            ops: BTreeMap::new(),
            decided: BTreeSet::new(),
        }
    }

    /// The current view.
    pub fn view(&self) -> View {
        View { epoch: self.epoch, members: self.members.iter().map(|p| Member { id: p.id, addr: p.addr }).collect() }
    }

    /// The number of joiners waiting for admission.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// When the next timeout can expire, for the driver's timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.members.iter().chain(&self.pending).map(|p| p.last_seen + self.config.peer_timeout).min()
    }

    /// A message arrived on `conn`.
    pub fn handle(&mut self, conn: ConnId, msg: ToMaster, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        let Some(&id) = self.conns.get(&conn) else {
            match msg {
                ToMaster::Join { id, data_addr } => self.join(conn, id, data_addr, now, &mut out),
                _ => out.push(Output::Close(conn, "the first message must be a join".into())),
            }
            return out;
        };
        if let Some(p) = self.members.iter_mut().chain(self.pending.iter_mut()).find(|p| p.id == id) {
            p.last_seen = now;
        }
        let is_member = self.members.iter().any(|p| p.id == id);
        match msg {
            ToMaster::Heartbeat => {}
            ToMaster::Join { .. } => out.push(Output::Close(conn, "joined twice on one connection".into())),
            ToMaster::Leave => self.remove(&[id], "left the group", &mut out),
            _ if !is_member => {} // a pending joiner has nothing else to say yet
            ToMaster::UpdateTopology { .. } => self.vote_topology(id, &mut out),
            ToMaster::OpBegin { epoch, seq, call } => self.begin(id, epoch, seq, Begin::Collective(call), &mut out),
            ToMaster::SyncState { epoch, seq, strategy, tensors } => {
                self.begin(id, epoch, seq, Begin::Sync(strategy, tensors), &mut out)
            }
            ToMaster::OpEnd { epoch, seq, result } => self.end(id, epoch, seq, result, &mut out),
            ToMaster::SubOpBegin { epoch, seq, call, members } => {
                self.begin_sub(id, epoch, seq, call, members, &mut out)
            }
        }
        out
    }

    /// The control connection `conn` broke.
    pub fn disconnected(&mut self, conn: ConnId) -> Vec<Output> {
        let mut out = Vec::new();
        if let Some(id) = self.conns.get(&conn).copied() {
            self.remove(&[id], "control connection closed", &mut out);
        }
        out
    }

    /// Time passed: removes peers silent for the timeout or longer. (At exactly the
    /// deadline counts, so that a driver woken at [`MasterState::next_deadline`] always
    /// makes progress.)
    pub fn tick(&mut self, now: Instant) -> Vec<Output> {
        let timeout = self.config.peer_timeout;
        let silent: Vec<PeerId> = self
            .members
            .iter()
            .chain(&self.pending)
            .filter(|p| now.saturating_duration_since(p.last_seen) >= timeout)
            .map(|p| p.id)
            .collect();
        let mut out = Vec::new();
        if !silent.is_empty() {
            let detail = format!("no heartbeat for {} ms", timeout.as_millis());
            self.remove(&silent, &detail, &mut out);
        }
        out
    }

    fn join(&mut self, conn: ConnId, id: PeerId, addr: SocketAddr, now: Instant, out: &mut Vec<Output>) {
        if self.members.iter().chain(&self.pending).any(|p| p.id == id) {
            out.push(Output::Close(conn, format!("peer id {id:#x} is already in use")));
            return;
        }
        if self.pending.len() >= self.config.max_pending {
            out.push(Output::Close(conn, "too many joiners are waiting; try again later".into()));
            return;
        }
        self.conns.insert(conn, id);
        self.pending.push(Peer { id, addr, conn, last_seen: now });
        if self.members.is_empty() {
            self.admit_pending(out);
        } else {
            out.push(Output::Send(conn, ToPeer::Pending));
            self.announce_pending(out);
        }
    }

    fn announce_pending(&self, out: &mut Vec<Output>) {
        let count = self.pending.len() as u32;
        self.broadcast(ToPeer::PendingJoiners { count }, out);
    }

    fn broadcast(&self, msg: ToPeer, out: &mut Vec<Output>) {
        out.extend(self.members.iter().map(|p| Output::Send(p.conn, msg.clone())));
    }

    /// Starts a new epoch with `removed` gone: voids the old epoch's collectives.
    fn new_epoch(&mut self, removed: Vec<Removal>, out: &mut Vec<Output>) {
        let undecided: Vec<u64> = self.ops.keys().copied().filter(|s| !self.decided.contains(s)).collect();
        if let Some(first) = removed.first() {
            let reason = AbortReason::PeerLost { rank: first.rank, detail: first.detail.clone() };
            for seq in undecided {
                let decision = Decision::Abort(reason.clone());
                self.broadcast(ToPeer::Outcome { epoch: self.epoch, seq, decision }, out);
            }
        }
        self.epoch += 1;
        self.ops.clear();
        self.decided.clear();
        // A topology round in progress goes on among the members that remain.
        let members: BTreeSet<PeerId> = self.members.iter().map(|p| p.id).collect();
        self.topo_votes.retain(|id| members.contains(id));
        self.broadcast(ToPeer::View { view: self.view(), removed }, out);
    }

    fn admit_pending(&mut self, out: &mut Vec<Output>) {
        let joiners = std::mem::take(&mut self.pending);
        self.members.extend(joiners);
        self.new_epoch(Vec::new(), out);
    }

    fn remove(&mut self, ids: &[PeerId], detail: &str, out: &mut Vec<Output>) {
        // Ranks in the removals refer to the view the collectives ran in.
        let old = self.view();
        let mut removed = Vec::new();
        for &id in ids {
            if let Some(rank) = self.members.iter().position(|p| p.id == id) {
                let p = self.members.remove(rank);
                let old_rank = old.rank_of(id).unwrap_or(rank);
                removed.push(Removal { id, rank: old_rank as u32, detail: detail.to_string() });
                self.forget(p.conn, detail, out);
            } else if let Some(i) = self.pending.iter().position(|p| p.id == id) {
                let p = self.pending.remove(i);
                self.forget(p.conn, detail, out);
                self.announce_pending(out);
            }
        }
        if !removed.is_empty() {
            self.new_epoch(removed, out);
            if self.members.is_empty() && !self.pending.is_empty() {
                self.admit_pending(out);
            }
            self.finish_round_if_complete(out);
        }
    }

    fn forget(&mut self, conn: ConnId, detail: &str, out: &mut Vec<Output>) {
        self.conns.remove(&conn);
        out.push(Output::Close(conn, format!("removed from the group: {detail}")));
    }

    /// A member entered `update_topology`. The round ends when every member of the
    /// current view has; losses during the round shrink the set it waits for, so
    /// every member leaves the round at the same point (the epoch a vote names is only
    /// informative).
    fn vote_topology(&mut self, id: PeerId, out: &mut Vec<Output>) {
        self.topo_votes.insert(id);
        // Collectives that wait for this member, which will not begin them now. A
        // sub-group collective waits only for its own members.
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
        for seq in waiting {
            let detail = format!("member {id:#x} called update_topology while others ran collective {seq:#x}");
            self.decide(seq, Decision::Abort(AbortReason::Mismatch { detail }), out);
        }
        self.finish_round_if_complete(out);
    }

    /// Ends the topology round once every member has voted: admits the joiners, then
    /// tells every member that the round is over.
    fn finish_round_if_complete(&mut self, out: &mut Vec<Output>) {
        if self.topo_votes.is_empty() || !self.members.iter().all(|p| self.topo_votes.contains(&p.id)) {
            return;
        }
        self.topo_votes.clear();
        if !self.pending.is_empty() {
            self.admit_pending(out);
        }
        self.broadcast(ToPeer::TopologyDone { epoch: self.epoch }, out);
    }

    fn rank(&self, id: PeerId) -> u32 {
        self.members.iter().position(|p| p.id == id).unwrap_or(usize::MAX) as u32
        // ok: callers pass members
    }

    fn begin(&mut self, id: PeerId, epoch: u64, seq: u64, begin: Begin, out: &mut Vec<Output>) {
        if epoch != self.epoch || self.decided.contains(&seq) {
            return; // a collective of a past view, or already aborted: the peer knows
        }
        if !self.topo_votes.is_empty() && !self.topo_votes.contains(&id) {
            let detail = format!("member {id:#x} called a collective while others called update_topology");
            self.ops.entry(seq).or_default();
            self.decide(seq, Decision::Abort(AbortReason::Mismatch { detail }), out);
            return;
        }
        let tally = self.ops.entry(seq).or_default();
        if tally.members.is_some() {
            let detail =
                format!("member {id:#x} began collective {seq:#x} as a whole-group call, others as a sub-group");
            self.decide(seq, Decision::Abort(AbortReason::Mismatch { detail }), out);
            return;
        }
        tally.begun.insert(id, begin);
        let mismatch = first_mismatch(&tally.begun);
        if let Some(detail) = mismatch {
            self.decide(seq, Decision::Abort(AbortReason::Mismatch { detail }), out);
            return;
        }
        let all_begun = self.members.iter().all(|p| self.ops[&seq].begun.contains_key(&p.id));
        if all_begun && !self.ops[&seq].planned {
            if let Some(Begin::Sync(..)) = self.ops[&seq].begun.get(&id) {
                self.plan_sync(seq, out);
            }
        }
    }

    fn end(&mut self, id: PeerId, epoch: u64, seq: u64, result: OpResult, out: &mut Vec<Output>) {
        if epoch != self.epoch || self.decided.contains(&seq) {
            return;
        }
        let rank = self.rank(id);
        match result {
            OpResult::Ok => {
                let tally = self.ops.entry(seq).or_default();
                tally.ok.insert(id);
                let done = match &tally.members {
                    Some(members) => members.iter().all(|m| tally.ok.contains(m)),
                    None => self.members.iter().all(|p| tally.ok.contains(&p.id)),
                };
                if done {
                    self.decide(seq, Decision::Commit, out);
                }
            }
            OpResult::Mismatch(detail) => self.decide(seq, Decision::Abort(AbortReason::Mismatch { detail }), out),
            OpResult::Failed(detail) => self.decide(seq, Decision::Abort(AbortReason::Failed { rank, detail }), out),
        }
    }

    fn decide(&mut self, seq: u64, decision: Decision, out: &mut Vec<Output>) {
        if !self.decided.insert(seq) {
            return;
        }
        let msg = ToPeer::Outcome { epoch: self.epoch, seq, decision: decision.clone() };
        match self.ops.get_mut(&seq) {
            Some(tally) if tally.members.is_some() => {
                tally.decision = Some(decision);
                let told = tally.members.iter().flatten().chain(tally.begun.keys());
                let told: BTreeSet<PeerId> = told.copied().collect();
                let conns = self.members.iter().filter(|p| told.contains(&p.id)).map(|p| p.conn);
                out.extend(conns.map(|c| Output::Send(c, msg.clone())));
            }
            _ => self.broadcast(msg, out),
        }
    }

    /// A member began a sub-group collective: it is tallied, checked for mismatches and
    /// committed among `members` only, so non-members neither take part nor wait.
    ///
    /// Keys of different member sets may collide (see `comm::subgroup`); a collision, or
    /// members that name different sets under one key, aborts the collective with a
    /// mismatch for everyone involved, so traffic of two sub-groups never mixes.
    fn begin_sub(&mut self, id: PeerId, epoch: u64, seq: u64, call: u64, members: Vec<PeerId>, out: &mut Vec<Output>) {
        if epoch != self.epoch {
            return; // a collective of a past view: the peer knows
        }
        let conn = self.members.iter().find(|p| p.id == id).map(|p| p.conn);
        let set: BTreeSet<PeerId> = members.iter().copied().collect();
        let valid = set.contains(&id)
            && set.len() == members.len()
            && set.iter().all(|m| self.members.iter().any(|p| p.id == *m));
        if !valid {
            let detail = format!("member {id:#x} began sub-group collective {seq:#x} with an invalid member set");
            let decision = Decision::Abort(AbortReason::Mismatch { detail });
            out.extend(conn.map(|c| Output::Send(c, ToPeer::Outcome { epoch, seq, decision })));
            return;
        }
        let tally = self.ops.entry(seq).or_insert_with(|| Tally { members: Some(set.clone()), ..Tally::default() });
        if let Some(decision) = tally.decision.clone() {
            // Decided before this member began (e.g. a mismatch another member caused).
            if tally.begun.insert(id, Begin::Collective(call)).is_none() {
                out.extend(conn.map(|c| Output::Send(c, ToPeer::Outcome { epoch, seq, decision })));
            }
            return;
        }
        tally.begun.insert(id, Begin::Collective(call));
        let detail = if tally.members.as_ref() != Some(&set) {
            Some(format!(
                "sub-group collective key {seq:#x} was used by different member sets (members disagree on the set, \
                 or two sets' keys collide)"
            ))
        } else if let Some(v) = set.iter().find(|m| **m != id && self.topo_votes.contains(m)) {
            Some(format!(
                "member {v:#x} called update_topology while member {id:#x} began sub-group collective {seq:#x}"
            ))
        } else {
            first_mismatch(&tally.begun)
        };
        if let Some(detail) = detail {
            self.decide(seq, Decision::Abort(AbortReason::Mismatch { detail }), out);
        }
    }

    fn plan_sync(&mut self, seq: u64, out: &mut Vec<Output>) {
        let requests: Vec<(SyncStrategy, &[TensorDigest])> = self
            .members
            .iter()
            .filter_map(|p| match self.ops[&seq].begun.get(&p.id) {
                Some(Begin::Sync(strategy, tensors)) => Some((*strategy, tensors.as_slice())),
                _ => None,
            })
            .collect();
        match sync_plan(&requests) {
            Ok((agreed, transfers)) => {
                if let Some(t) = self.ops.get_mut(&seq) {
                    t.planned = true;
                }
                self.broadcast(ToPeer::SyncPlan { epoch: self.epoch, seq, agreed, transfers }, out);
            }
            Err(detail) => self.decide(seq, Decision::Abort(AbortReason::Mismatch { detail }), out),
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

/// The agreed `(revision, digest)` of each tensor, and the transfers that spread it.
pub type PlannedSync = (Vec<(u64, Digest)>, Vec<Transfer>);

/// Chooses each tensor's content and who sends it to whom. `requests` are in rank order.
///
/// Candidates are the send-only members if there are any, else every member that is not
/// receive-only. Of the candidates' contents, those at the highest revision compete, and
/// the one most of them hold wins (ties: the lowest rank's), so newcomers still at
/// revision 0 never outvote a group that has trained. Members holding other content
/// receive it from the holders in turn.
pub fn sync_plan(requests: &[(SyncStrategy, &[TensorDigest])]) -> Result<PlannedSync, String> {
    let Some((_, first)) = requests.first() else {
        return Ok((Vec::new(), Vec::new()));
    };
    let any_send_only = requests.iter().any(|(s, _)| *s == SyncStrategy::SendOnly);
    let is_candidate =
        |s: SyncStrategy| if any_send_only { s == SyncStrategy::SendOnly } else { s != SyncStrategy::ReceiveOnly };
    let mut agreed = Vec::with_capacity(first.len());
    let mut transfers = Vec::new();
    for (t, tensor) in first.iter().enumerate() {
        let content = |r: usize| (requests[r].1[t].revision, requests[r].1[t].digest);
        let mut votes: BTreeMap<(u64, Digest), (usize, usize)> = BTreeMap::new(); // content -> (count, first rank)
        for (r, (s, _)) in requests.iter().enumerate() {
            if is_candidate(*s) {
                let v = votes.entry(content(r)).or_insert((0, r));
                v.0 += 1;
            }
        }
        if any_send_only && votes.len() > 1 {
            return Err(format!("send-only members hold different contents of tensor '{}'", tensor.name));
        }
        let top = votes.keys().map(|c| c.0).max();
        let Some((&chosen, _)) = votes
            .iter()
            .filter(|(c, _)| Some(c.0) == top)
            .max_by(|(_, (na, ra)), (_, (nb, rb))| na.cmp(nb).then(rb.cmp(ra)))
        else {
            return Err(format!("no member offers tensor '{}' (all are receive-only)", tensor.name));
        };
        let holders: Vec<usize> = (0..requests.len()).filter(|&r| content(r) == chosen).collect();
        let receivers = (0..requests.len()).filter(|&r| content(r) != chosen);
        for (i, to) in receivers.enumerate() {
            let from = holders[i % holders.len()];
            transfers.push(Transfer { tensor: t as u32, from: from as u32, to: to as u32 });
        }
        agreed.push(chosen);
    }
    Ok((agreed, transfers))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u64) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 7000 + i as u16))
    }

    /// A master with members 1..=n joined through update_topology; conn i is peer i.
    fn group(n: u64) -> (MasterState, Instant) {
        let mut m = MasterState::new(MasterConfig::default());
        let now = Instant::now();
        for i in 1..=n {
            m.handle(i, ToMaster::Join { id: i, data_addr: addr(i) }, now);
        }
        m.handle(1, ToMaster::UpdateTopology { epoch: 1 }, now);
        assert_eq!(m.view().size(), n as usize);
        (m, now)
    }

    fn outcomes(out: &[Output]) -> Vec<(ConnId, Decision)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send(c, ToPeer::Outcome { decision, .. }) => Some((*c, decision.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn joiners_wait_for_every_member() {
        let (mut m, now) = group(2);
        let epoch = m.view().epoch;
        let out = m.handle(3, ToMaster::Join { id: 3, data_addr: addr(3) }, now);
        assert!(out.contains(&Output::Send(3, ToPeer::Pending)));
        assert!(out.contains(&Output::Send(1, ToPeer::PendingJoiners { count: 1 })));
        assert!(m.handle(1, ToMaster::UpdateTopology { epoch }, now).is_empty());
        let out = m.handle(2, ToMaster::UpdateTopology { epoch }, now);
        assert_eq!(m.view().size(), 3);
        assert_eq!(m.view().epoch, epoch + 1);
        let views = out.iter().filter(|o| matches!(o, Output::Send(_, ToPeer::View { .. }))).count();
        assert_eq!(views, 3, "old members and the joiner all learn the view");
    }

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
    fn silence_past_the_timeout_removes() {
        let (mut m, now) = group(2);
        let timeout = MasterConfig::default().peer_timeout;
        let almost = timeout - Duration::from_millis(100);
        m.handle(1, ToMaster::Heartbeat, now + almost);
        assert!(m.tick(now + almost).is_empty());
        // Woken exactly at the deadline, the master must act (or its driver would spin).
        assert_eq!(m.next_deadline(), Some(now + timeout));
        let out = m.tick(now + timeout);
        assert_eq!(m.view().members.iter().map(|p| p.id).collect::<Vec<_>>(), vec![1]);
        assert!(out.iter().any(|o| matches!(o, Output::Close(2, _))));
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
    fn a_loss_during_a_topology_round_ends_it_for_the_rest() {
        let (mut m, now) = group(3);
        let e = m.view().epoch;
        m.handle(1, ToMaster::UpdateTopology { epoch: e }, now);
        m.handle(2, ToMaster::UpdateTopology { epoch: e }, now);
        let out = m.disconnected(3);
        let done: Vec<ConnId> = out
            .iter()
            .filter_map(|o| match o {
                Output::Send(c, ToPeer::TopologyDone { .. }) => Some(*c),
                _ => None,
            })
            .collect();
        assert_eq!(done, vec![1, 2]);
    }

    #[test]
    fn a_collective_during_a_topology_round_is_a_mismatch() {
        let (mut m, now) = group(2);
        let e = m.view().epoch;
        m.handle(1, ToMaster::UpdateTopology { epoch: e }, now);
        let out = m.handle(2, ToMaster::OpBegin { epoch: e, seq: 1, call: 9 }, now);
        let d = outcomes(&out);
        assert!(!d.is_empty() && d.iter().all(|(_, d)| matches!(d, Decision::Abort(AbortReason::Mismatch { .. }))));
    }

    #[test]
    fn duplicate_ids_and_silent_strangers_are_refused() {
        let (mut m, now) = group(1);
        let out = m.handle(9, ToMaster::Join { id: 1, data_addr: addr(1) }, now);
        assert!(matches!(&out[..], [Output::Close(9, _)]));
        let out = m.handle(10, ToMaster::Heartbeat, now);
        assert!(matches!(&out[..], [Output::Close(10, _)]));
        assert_eq!(m.view().size(), 1);
    }

    fn sub(epoch: u64, seq: u64, call: u64, members: &[PeerId]) -> ToMaster {
        ToMaster::SubOpBegin { epoch, seq, call, members: members.to_vec() }
    }

    fn ok(epoch: u64, seq: u64) -> ToMaster {
        ToMaster::OpEnd { epoch, seq, result: OpResult::Ok }
    }

    const S: u64 = 1 << 63;

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
        // Now a member votes while its partner waits in a sub-op: a mismatch for the pair.
        m.handle(1, sub(e, S | 2, 7, &[1, 2]), now);
        let out = m.handle(2, ToMaster::UpdateTopology { epoch: e }, now);
        let d = outcomes(&out);
        assert_eq!(d.len(), 2);
        assert!(d.iter().all(|(c, d)| *c != 3 && matches!(d, Decision::Abort(AbortReason::Mismatch { .. }))));
        // And a member beginning a sub-op while its partner is in the round: mismatch too.
        let out = m.handle(3, sub(e, S | 3, 7, &[2, 3]), now);
        assert!(outcomes(&out).iter().all(|(_, d)| matches!(d, Decision::Abort(AbortReason::Mismatch { .. }))));
        assert_eq!(outcomes(&out).len(), 2);
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

    fn td(name: &str, rev: u64, d: u8) -> TensorDigest {
        TensorDigest { name: name.into(), revision: rev, digest: [d; 32] }
    }

    #[test]
    fn sync_plan_enforces_the_popular_content() {
        let a = [td("w", 3, 1)];
        let b = [td("w", 3, 2)];
        let z = [td("w", 0, 0)];
        let reqs = [
            (SyncStrategy::EnforcePopular, &a[..]),
            (SyncStrategy::EnforcePopular, &b[..]),
            (SyncStrategy::EnforcePopular, &a[..]),
            (SyncStrategy::ReceiveOnly, &z[..]),
        ];
        let (agreed, transfers) = sync_plan(&reqs).expect("plan");
        assert_eq!(agreed, vec![(3, [1; 32])]);
        assert_eq!(transfers, vec![Transfer { tensor: 0, from: 0, to: 1 }, Transfer { tensor: 0, from: 2, to: 3 }]);
    }

    #[test]
    fn sync_plan_prefers_the_highest_revision_over_numbers() {
        let trained = [td("w", 5, 1)];
        let fresh = [td("w", 0, 0)];
        let reqs = [
            (SyncStrategy::EnforcePopular, &trained[..]),
            (SyncStrategy::EnforcePopular, &fresh[..]),
            (SyncStrategy::EnforcePopular, &fresh[..]),
        ];
        let (agreed, transfers) = sync_plan(&reqs).expect("plan");
        assert_eq!(agreed, vec![(5, [1; 32])]);
        assert_eq!(transfers.len(), 2);
    }

    #[test]
    fn sync_plan_send_only_wins_and_must_agree() {
        let a = [td("w", 1, 1)];
        let b = [td("w", 9, 2)];
        let reqs = [
            (SyncStrategy::EnforcePopular, &b[..]),
            (SyncStrategy::EnforcePopular, &b[..]),
            (SyncStrategy::SendOnly, &a[..]),
        ];
        let (agreed, transfers) = sync_plan(&reqs).expect("plan");
        assert_eq!(agreed, vec![(1, [1; 32])]);
        assert_eq!(transfers.len(), 2);
        let reqs = [(SyncStrategy::SendOnly, &b[..]), (SyncStrategy::SendOnly, &a[..])];
        assert!(sync_plan(&reqs).is_err());
        let reqs = [(SyncStrategy::ReceiveOnly, &b[..])];
        assert!(sync_plan(&reqs).is_err());
    }
}
