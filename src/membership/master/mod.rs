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

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::protocol::{AbortReason, Decision, OpResult, Removal, ToMaster, ToPeer};
use super::view::{Member, PeerId, View};
use carried::{CarriedOps, Settled};
use tally::{Begin, Recipients, Roster, Said, Tallies, Word};

mod carried;
mod device_ids;
mod silence;
mod sync_plan;
mod takeover;
mod tally;

pub use self::sync_plan::{sync_plan, PlannedSync};

/// A control connection, as numbered by the driver.
pub type ConnId = u64;

/// Default [`MasterConfig::peer_timeout`] in milliseconds: a crashed or frozen peer is
/// removed at most this long after its last heartbeat (five heartbeat intervals at the
/// default [`crate::membership::client::DEFAULT_HEARTBEAT_MS`]), which keeps the time
/// from a death to the survivors' next successful collective under one second.
pub const DEFAULT_PEER_TIMEOUT_MS: u64 = 750;

/// Default [`MasterConfig::max_peer_timeout`] in milliseconds: how far a peer whose
/// heartbeats arrive irregularly may stretch its timeout. One second keeps a frozen
/// peer's removal within a second whatever its history; raise it for a jittery WAN.
pub const DEFAULT_MAX_PEER_TIMEOUT_MS: u64 = 1000;

/// Settings of the master.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MasterConfig {
    /// A member silent for this long is removed (peers send heartbeats more often),
    /// unless its heartbeats have been arriving irregularly: then its timeout grows
    /// with the spread of its intervals, up to `max_peer_timeout` (see the `silence`
    /// module: a phi-accrual-like detector).
    pub peer_timeout: Duration,
    /// The most an adapted timeout may grow to; equal to `peer_timeout` for a fixed
    /// timeout.
    pub max_peer_timeout: Duration,
    /// At most this many joiners wait for admission; more are refused.
    pub max_pending: usize,
    /// The first view forms once this many peers have joined (ranked by peer id);
    /// until then joiners wait. 1 (the default) admits the first joiner at once.
    pub initial_peers: usize,
    /// Whether [`Master::start`](crate::Master::start) listens for the peers' liveness
    /// connections (TCP on the QUIC port's number), removing a peer whose process dies
    /// at once rather than after `peer_timeout` (default on; see `membership::liveness`).
    pub liveness: bool,
    /// A master taking over a group whose master was lost (see the `takeover` module)
    /// waits this long after the first peer rejoined for the rest of the last view;
    /// then a majority of it suffices, and the others are removed.
    pub takeover_grace: Duration,
    /// A standby (or a master restarted in place of a lost one): it forms no group of
    /// its own from joiners, who wait until it took a group over from its peers. This
    /// keeps a newcomer that reaches it first from starting a second group beside the
    /// one about to rejoin.
    pub standby: bool,
    /// Step down when most of the view goes silent at once: more than half of the
    /// members unheard for half the peer timeout when one of them reaches it. This
    /// master may then be the one cut off, while the others rejoin a standby; so it
    /// stops deciding, releases its peers and waits, as a takeover, for a majority of
    /// its view to come back (see the `takeover` module). Off by default: it trades
    /// availability (a majority frozen at once stops the group) for never letting a
    /// cut-off primary and a standby both decide. Turn it on where standbys run.
    pub fence: bool,
}

impl Default for MasterConfig {
    fn default() -> Self {
        MasterConfig {
            peer_timeout: Duration::from_millis(DEFAULT_PEER_TIMEOUT_MS),
            max_peer_timeout: Duration::from_millis(DEFAULT_MAX_PEER_TIMEOUT_MS),
            max_pending: 256,
            initial_peers: 1,
            liveness: true,
            takeover_grace: Duration::from_millis(DEFAULT_PEER_TIMEOUT_MS),
            standby: false,
            fence: false,
        }
    }
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Send a message on a control connection.
    Send(ConnId, ToPeer),
    /// Close a control connection, telling the peer why.
    Close(ConnId, String),
    /// Close a control connection without a word: the peer takes it for a lost master
    /// and rejoins (here or at another master).
    Release(ConnId),
}

#[derive(Clone, Debug)]
struct Peer {
    id: PeerId,
    addr: SocketAddr,
    conn: ConnId,
    last_seen: Instant,
    arrivals: silence::Arrivals,
}

impl Peer {
    /// How long this peer may stay silent (see the `silence` module).
    fn timeout(&self, config: &MasterConfig) -> Duration {
        self.arrivals.timeout(config.peer_timeout, config.max_peer_timeout)
    }
}

/// The master's whole state.
#[derive(Debug)]
pub struct MasterState {
    config: MasterConfig,
    /// Grows with every takeover; see the `takeover` module.
    term: u64,
    epoch: u64,
    members: Vec<Peer>,
    pending: Vec<Peer>,
    conns: HashMap<ConnId, PeerId>,
    topo_votes: BTreeSet<PeerId>,
    tallies: Tallies,
    /// Eager collectives of ended epochs, still undecided.
    carried: CarriedOps,
    /// This epoch's reports of broken links: suspect -> the members that lost it.
    suspicions: HashMap<PeerId, BTreeSet<PeerId>>,
    /// A takeover of a group whose master was lost, while peers rejoin.
    takeover: Option<takeover::Takeover>,
    /// Every peer this master has made a member: a rejoining peer it never admitted
    /// comes from another master's group (see the `takeover` module).
    admitted: std::collections::HashSet<PeerId>,
    /// The device (NCCL) unique id of the current epoch (see the `device_ids` module).
    device_ids: crate::device::membership::IdRelay,
}

impl MasterState {
    /// An empty group at epoch 0.
    pub fn new(config: MasterConfig) -> MasterState {
        MasterState {
            config,
            term: 1,
            epoch: 0,
            members: Vec::new(),
            pending: Vec::new(),
            conns: HashMap::new(),
            topo_votes: BTreeSet::new(),
            tallies: Tallies::default(),
            carried: CarriedOps::default(),
            suspicions: HashMap::new(),
            takeover: None,
            admitted: Default::default(),
            device_ids: Default::default(),
        }
    }

    /// The master's term: 1 for a master that formed its group, one more than the
    /// newest it took over from for a master that took one over.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Whether a takeover is in progress (peers are rejoining).
    pub fn taking_over(&self) -> bool {
        self.takeover.is_some()
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
        let takeover =
            self.takeover.as_ref().and_then(|t| t.deadline(self.config.takeover_grace, self.config.peer_timeout));
        self.members.iter().chain(&self.pending).map(|p| p.last_seen + p.timeout(&self.config)).chain(takeover).min()
    }

    /// Whether `msg` may wait a little for the next message to the same peer: the
    /// commit of an eager collective of this epoch. Its members return once every
    /// member's "done" came over the data links, without it; only a member whose "done"
    /// exchange failed waits for it, and a delay changes nothing the protocol decides
    /// (see the peers' own `Lazy` in `membership::driver`).
    pub(crate) fn may_wait(&self, msg: &ToPeer) -> bool {
        match msg {
            ToPeer::Outcome { epoch, seq, decision: Decision::Commit } => {
                *epoch == self.epoch && self.tallies.is_eager(*seq)
            }
            _ => false,
        }
    }

    /// A message arrived on `conn`.
    pub fn handle(&mut self, conn: ConnId, msg: ToMaster, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        if self.takeover.as_mut().is_some_and(|t| t.heard(conn, now)) {
            // A rejoined peer waits for the takeover; a leave just takes it out of it.
            if msg == ToMaster::Leave {
                if let Some(t) = self.takeover.as_mut() {
                    t.forget(conn);
                }
                out.push(Output::Close(conn, "left the group".into()));
                self.complete_takeover(now, &mut out);
            }
            return out;
        }
        let Some(&id) = self.conns.get(&conn) else {
            match msg {
                ToMaster::Join { id, data_addr } => self.join(conn, id, data_addr, now, &mut out),
                ToMaster::Rejoin(state) => self.rejoin(conn, *state, now, &mut out),
                _ => out.push(Output::Close(conn, "the first message must be a join".into())),
            }
            return out;
        };
        if let Some(p) = self.members.iter_mut().chain(self.pending.iter_mut()).find(|p| p.id == id) {
            p.last_seen = now;
            p.arrivals.heard(now);
        }
        let is_member = self.members.iter().any(|p| p.id == id);
        match msg {
            ToMaster::Heartbeat => {}
            ToMaster::Join { .. } | ToMaster::Rejoin(_) => {
                out.push(Output::Close(conn, "joined twice on one connection".into()))
            }
            ToMaster::Leave => self.remove(&[id], "left the group", &mut out),
            _ if !is_member => {} // a pending joiner has nothing else to say yet
            ToMaster::UpdateTopology { .. } => self.vote_topology(id, &mut out),
            ToMaster::DeviceId { epoch, generation, id: bytes, grow } => {
                self.device_id(id, (epoch, generation), bytes, grow, &mut out)
            }
            ToMaster::Unreachable { epoch, peer } => {
                if epoch == self.epoch {
                    if let Some(rank) = self.members.iter().position(|p| p.id == peer) {
                        self.suspect(id, rank as u32);
                        self.remove_unreachable(&mut out);
                    }
                }
            }
            msg => self.collective(id, msg, &mut out),
        }
        out
    }

    /// A member's message about a collective: the tallies decide, against the current
    /// roster; collectives of a past view are void, and their peers know.
    fn collective(&mut self, id: PeerId, msg: ToMaster, out: &mut Vec<Output>) {
        let members: Vec<PeerId> = self.members.iter().map(|p| p.id).collect();
        let roster = Roster { members: &members, in_round: &self.topo_votes };
        let current = |epoch: u64| epoch == self.epoch;
        let mut lost_link = None;
        let said = match msg {
            ToMaster::OpBegin { epoch, seq, call } if current(epoch) => {
                self.tallies.begin(id, seq, Begin::Collective(call), false, &roster)
            }
            ToMaster::EagerOpBegin { epoch, seq, call } if current(epoch) => {
                self.tallies.begin(id, seq, Begin::Collective(call), true, &roster)
            }
            ToMaster::SyncState { epoch, seq, strategy, tensors } if current(epoch) => {
                self.tallies.begin(id, seq, Begin::Sync(strategy, tensors), false, &roster)
            }
            ToMaster::OpEnd { epoch, seq, result } if current(epoch) => {
                if let OpResult::Lost { rank, .. } = &result {
                    lost_link = Some(*rank);
                }
                self.tallies.end(id, seq, result, &roster)
            }
            ToMaster::SubOpBegin { epoch, seq, call, members } if current(epoch) => {
                self.tallies.begin_sub(id, seq, call, members, false, &roster)
            }
            ToMaster::EagerSubOpBegin { epoch, seq, call, members } if current(epoch) => {
                self.tallies.begin_sub(id, seq, call, members, true, &roster)
            }
            // An ended epoch's eager collectives wait for their survivors (`carried`).
            ToMaster::EagerOpBegin { epoch, seq, .. } => {
                let settled = self.carried.begun(id, (epoch, seq), None);
                self.tell_settled(settled, out);
                Vec::new()
            }
            ToMaster::EagerSubOpBegin { epoch, seq, members, .. } => {
                let settled = self.carried.begun(id, (epoch, seq), Some(&members));
                self.tell_settled(settled, out);
                Vec::new()
            }
            ToMaster::OpEnd { epoch, seq, result } => {
                let settled = self.carried.end(id, (epoch, seq), &result);
                self.tell_settled(settled, out);
                Vec::new()
            }
            ToMaster::ViewSeen { epoch } => {
                let settled = self.carried.view_seen(id, epoch);
                self.tell_settled(settled, out);
                Vec::new()
            }
            _ => Vec::new(),
        };
        self.tell(said, out);
        if let Some(rank) = lost_link {
            self.suspect(id, rank);
            self.remove_unreachable(out);
        }
    }

    /// Records that member `reporter` lost its link to the member of rank `rank` in a
    /// collective of this epoch (see [`MasterState::remove_unreachable`]).
    fn suspect(&mut self, reporter: PeerId, rank: u32) {
        if let Some(suspect) = self.members.get(rank as usize).map(|p| p.id).filter(|&s| s != reporter) {
            self.suspicions.entry(suspect).or_default().insert(reporter);
        }
    }

    /// Removes a member that more than half of the other members have lost their links
    /// to in this epoch, although it still talks to the master: the group is split, and
    /// the side with the master and the majority goes on, while the cut-off member is
    /// told it was removed. Without this, members that all heartbeat the master would
    /// abort and retry across the split forever. (In a group of two, one report is a
    /// majority: the first reporter stays.)
    fn remove_unreachable(&mut self, out: &mut Vec<Output>) {
        let others = self.members.len().saturating_sub(1);
        let members: BTreeSet<PeerId> = self.members.iter().map(|p| p.id).collect();
        let cut = self.suspicions.iter().find_map(|(&suspect, reporters)| {
            let count = reporters.iter().filter(|r| members.contains(r)).count();
            (members.contains(&suspect) && others > 0 && count * 2 > others).then_some((suspect, count))
        });
        if let Some((suspect, count)) = cut {
            let detail = format!("unreachable from {count} of the {others} other members");
            self.remove(&[suspect], &detail, out);
        }
    }

    /// Sends what the tallies said, each to its recipients among the members.
    fn tell(&self, said: Said, out: &mut Vec<Output>) {
        for (to, seq, word) in said {
            let msg = match word {
                Word::Outcome(decision) => ToPeer::Outcome { epoch: self.epoch, seq, decision },
                Word::SyncPlan((agreed, transfers)) => ToPeer::SyncPlan { epoch: self.epoch, seq, agreed, transfers },
            };
            self.send(&to, msg, out);
        }
    }

    /// Tells the surviving members of carried collectives their decisions (in the
    /// collectives' own epochs).
    fn tell_settled(&self, settled: Vec<Settled>, out: &mut Vec<Output>) {
        for (to, (epoch, seq), decision) in settled {
            self.send(&Some(to), ToPeer::Outcome { epoch, seq, decision }, out);
        }
    }

    /// The control connection `conn` broke.
    pub fn disconnected(&mut self, conn: ConnId) -> Vec<Output> {
        let mut out = Vec::new();
        if self.takeover.as_mut().is_some_and(|t| t.forget(conn)) {
            return out;
        }
        if let Some(id) = self.conns.get(&conn).copied() {
            self.remove(&[id], "control connection closed", &mut out);
        }
        out
    }

    /// The process of peer `id` is gone (its liveness connection closed, see
    /// `membership::liveness`): it is removed as if its control connection broke,
    /// without waiting for its heartbeats to stop. A peer not known (already removed,
    /// or it left) changes nothing.
    pub fn process_gone(&mut self, id: PeerId) -> Vec<Output> {
        let mut out = Vec::new();
        if let Some(conn) = self.takeover.as_ref().and_then(|t| t.conn_of(id)) {
            if let Some(t) = self.takeover.as_mut() {
                t.forget(conn);
            }
            out.push(Output::Close(conn, "its process is gone (liveness connection closed)".into()));
            return out;
        }
        if self.conns.values().any(|&p| p == id) {
            self.remove(&[id], "its process is gone (liveness connection closed)", &mut out);
        }
        out
    }

    /// Time passed: removes peers silent for the timeout or longer. (At exactly the
    /// deadline counts, so that a driver woken at [`MasterState::next_deadline`] always
    /// makes progress.)
    pub fn tick(&mut self, now: Instant) -> Vec<Output> {
        if let Some(t) = self.takeover.as_mut() {
            let (grace, timeout) = (self.config.takeover_grace, self.config.peer_timeout);
            let mut out: Vec<Output> = t.tick(now, grace, timeout).into_iter().map(Output::Release).collect();
            self.complete_takeover(now, &mut out);
            return out;
        }
        let silent: Vec<(PeerId, Duration)> = self
            .members
            .iter()
            .chain(&self.pending)
            .map(|p| (p, p.timeout(&self.config)))
            .filter(|(p, timeout)| now.saturating_duration_since(p.last_seen) >= *timeout)
            .map(|(p, timeout)| (p.id, timeout))
            .collect();
        let mut out = Vec::new();
        if self.config.fence && !silent.is_empty() && self.majority_unheard(now) {
            self.fence(&mut out);
            return out;
        }
        if let Some(&(_, longest)) = silent.iter().max_by_key(|(_, t)| *t) {
            // One removal (one new epoch) for all of them.
            let detail = format!("no heartbeat for {} ms", longest.as_millis());
            let ids: Vec<PeerId> = silent.iter().map(|(id, _)| *id).collect();
            self.remove(&ids, &detail, &mut out);
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
        let mut arrivals = silence::Arrivals::default();
        arrivals.heard(now);
        self.pending.push(Peer { id, addr, conn, last_seen: now, arrivals });
        let forming = self.epoch > 0 || (self.pending.len() >= self.config.initial_peers && !self.config.standby);
        if self.members.is_empty() && self.takeover.is_none() && forming {
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
        self.send(&None, msg, out);
    }

    /// Sends `msg` to the members among `to` (all of them for `None`), in rank order.
    fn send(&self, to: &Recipients, msg: ToPeer, out: &mut Vec<Output>) {
        let told = self.members.iter().filter(|p| to.as_ref().is_none_or(|ids| ids.contains(&p.id)));
        out.extend(told.map(|p| Output::Send(p.conn, msg.clone())));
    }

    /// Starts a new epoch with `removed` gone: voids the old epoch's collectives.
    fn new_epoch(&mut self, removed: Vec<Removal>, out: &mut Vec<Output>) {
        let lost = removed.first().map(|r| AbortReason::PeerLost { rank: r.rank, detail: r.detail.clone() });
        let survivors: BTreeSet<PeerId> = self.members.iter().map(|p| p.id).collect();
        let (voided, carried) = self.tallies.epoch_ended(lost.clone(), self.epoch, &survivors);
        self.tell(voided, out);
        let settled = self.carried.lost(&survivors);
        self.tell_settled(settled, out);
        if let Some(reason) = &lost {
            self.carried.epoch_lost(self.epoch, &survivors, reason);
        }
        for (key, op) in carried {
            let settled = self.carried.carry(key, op);
            self.tell_settled(settled, out);
        }
        self.epoch += 1;
        self.suspicions.clear();
        // A topology round in progress goes on among the members that remain.
        let members: BTreeSet<PeerId> = self.members.iter().map(|p| p.id).collect();
        self.topo_votes.retain(|id| members.contains(id));
        self.broadcast(ToPeer::View { view: self.view(), removed, term: self.term }, out);
    }

    fn admit_pending(&mut self, out: &mut Vec<Output>) {
        let mut joiners = std::mem::take(&mut self.pending);
        if self.members.is_empty() {
            // A first view of several peers ranks them by id, whatever their arrival order.
            joiners.sort_by_key(|p| p.id);
        }
        self.admitted.extend(joiners.iter().map(|p| p.id));
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
        let rank = self.members.iter().position(|p| p.id == id).unwrap_or(0) as u32; // ok: only a rank for the message
        let aborted = self.tallies.topology_vote(id, rank);
        self.tell(aborted, out);
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
}

#[cfg(test)]
mod tests;
