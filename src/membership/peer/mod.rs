//! A peer as a state machine: the master's messages, the caller's calls and time in;
//! messages for the master, abort orders and outcomes out. No I/O.
//!
//! This is the twin of [`super::master::MasterState`]. Everything a peer decides about
//! membership and commitment lives here: the view it is in, whether it is still a
//! member, the numbering of its collectives (`(epoch, seq)` keys, sub-group keys), the
//! first-round rule for joiners, which collectives must stop when the view changes, the
//! master's decision for each collective, and whether a failed collective is worth a
//! retry. The driver ([`super::client`]) only moves bytes and wakes waiters, the way
//! quinn drives a quinn-proto connection; the pair can be run with no runtime and no
//! sockets (see [`super::pair`]).
//!
//! ```
//! use std::time::Instant;
//! use phalanx::membership::peer::{OpKind, PeerConfig, PeerState};
//! use phalanx::membership::protocol::{Decision, ToMaster, ToPeer};
//! use phalanx::membership::{Member, View};
//!
//! let now = Instant::now();
//! let mut peer = PeerState::new(7, PeerConfig::default(), now);
//! let addr = "127.0.0.1:9000".parse().unwrap();
//! let view = View { epoch: 1, members: vec![Member { id: 7, addr }] };
//! assert!(peer.handle(ToPeer::View { view, removed: vec![], term: 1 }, now).is_empty());
//! let begun = peer.begin(OpKind::Whole { call: 0xabc }).unwrap();
//! assert_eq!(begun.msg, ToMaster::OpBegin { epoch: 1, seq: 1, call: 0xabc });
//! peer.handle(ToPeer::Outcome { epoch: 1, seq: 1, decision: Decision::Commit }, now);
//! assert_eq!(peer.outcome(begun.key), Some(Ok(())));
//! ```

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

mod device_id;
mod eager;
mod rejoin;
mod subgroup;
mod topology;
mod types;

pub use self::device_id::{DeviceId, GenerationId};
use self::subgroup::sub_members;
pub use self::subgroup::{set_hash, sub_fingerprint, sub_key};
pub use self::types::{Begun, OpKind, PeerConfig, Retry, SyncPlan, Topology};
use super::protocol::{AbortReason, Decision, OpResult, ToMaster, ToPeer};
use super::view::{PeerId, View};
use crate::error::{Error, Result};

/// A collective's key: `(epoch, seq)`. Frames and the master's records carry it.
pub type OpKey = (u64, u64);

/// The bit that marks a sub-group collective's key.
pub const SUB_KEY_BIT: u64 = 1 << 63;

/// What the peer knows of one collective.
#[derive(Clone, Debug, Default)]
struct OpRecord {
    /// Begun by this peer and not yet finished.
    active: bool,
    decision: Option<Decision>,
    plan: Option<SyncPlan>,
    /// Why it must stop, once it must.
    abort: Option<Error>,
    /// Begun as an eager collective (see [`PeerState::begin_as`]).
    eager: bool,
    /// Eager, and this peer reported success: a new view no longer stops it (the master
    /// decides it from the survivors, see `membership::master::carried`).
    voted_ok: bool,
}

/// A peer's whole protocol state.
#[derive(Debug)]
pub struct PeerState {
    id: PeerId,
    config: PeerConfig,
    view: Option<View>,
    /// Topology rounds ended so far.
    rounds: u64,
    /// Why this peer is no longer a member, once it is not.
    gone: Option<String>,
    pending_joiners: u32,
    last_heard: Instant,
    ops: BTreeMap<OpKey, OpRecord>,
    /// The epoch the numbering below belongs to.
    epoch: u64,
    next_seq: u64,
    /// Collectives begun so far by each member set (ids in sub-rank order).
    sub_seq: HashMap<Vec<PeerId>, u32>,
    /// Admitted by the members' topology round, and no round or collective since.
    fresh: bool,
    /// The epoch this peer's last topology round ended in, or the view it was admitted
    /// into; `None` before admission.
    settled: Option<u64>,
    /// In a closed group ([`PeerConfig::closed`]): the first loss seen.
    lost: Option<Error>,
    /// The term of the master this peer follows.
    term: u64,
    /// While the master is lost: when to give up looking for one.
    rejoining: Option<Instant>,
    /// In `update_topology` and the round has not ended.
    voting: bool,
    /// The master refused or ended this peer's membership (rather than being lost).
    refused: bool,
    /// A vote made while rejoining after the rejoin was sent: it goes to the new master
    /// once the takeover is done ([`PeerState::take_deferred_vote`]).
    vote_deferred: bool,
    /// The last collectives of this epoch that committed and were finished: a master
    /// that takes over must hear of them, or it would abort them on the members that
    /// had no decision yet while this one kept the result.
    recent_commits: std::collections::VecDeque<OpKey>,
    /// Messages for the master that the state itself decided to send
    /// ([`PeerState::take_outbox`]).
    outbox: Vec<ToMaster>,
    /// The newest device (NCCL) unique id the master relayed: epoch, generation, id,
    /// grow flag.
    device_id: Option<(u64, u32, [u8; 128], bool)>,
    /// The last device id this peer offered: epoch, generation, id, grow flag.
    device_offer: Option<(u64, u32, [u8; 128], bool)>,
}

/// How many finished commits a peer remembers for a takeover: far more than the
/// collectives one member can be ahead of another (they wait for each other).
const RECENT_COMMITS: usize = 256;

impl PeerState {
    /// A peer that has not been admitted yet; `now` starts the master timeout.
    pub fn new(id: PeerId, config: PeerConfig, now: Instant) -> PeerState {
        PeerState {
            id,
            config,
            view: None,
            rounds: 0,
            gone: None,
            pending_joiners: 0,
            last_heard: now,
            ops: BTreeMap::new(),
            epoch: 0,
            next_seq: 0,
            sub_seq: HashMap::new(),
            fresh: false,
            settled: None,
            lost: None,
            term: 0,
            rejoining: None,
            voting: false,
            refused: false,
            vote_deferred: false,
            recent_commits: Default::default(),
            outbox: Vec::new(),
            device_id: None,
            device_offer: None,
        }
    }

    /// This peer's id.
    pub fn id(&self) -> PeerId {
        self.id
    }

    /// The current view, or why this peer is not (or no longer) a member.
    pub fn view(&self) -> Result<View> {
        match (&self.gone, &self.view) {
            (Some(reason), _) => Err(Error::Removed { reason: reason.clone() }),
            (None, Some(v)) => Ok(v.clone()),
            (None, None) => Err(Error::Removed { reason: "not admitted yet".into() }),
        }
    }

    /// The view a collective begun now would run in: [`PeerState::view`], failing as
    /// [`PeerState::begin`] would when the view moved since this peer's last topology
    /// round (with [`PeerConfig::settle_view_changes`]). Arguments sized from the group
    /// (counts, roots, sub-groups) are checked against this, so a view that moves under
    /// a caller gives the retryable `Aborted` that `begin` gives, never a false
    /// `InvalidArgument`. A closed group's loss is left to `begin`: its formed view
    /// never moves, so a bad argument is still reported as one.
    pub fn call_view(&self) -> Result<View> {
        let view = self.view()?;
        self.check_settled()?;
        Ok(view)
    }

    /// `None` while waiting for admission; then the view, or why it was refused.
    pub fn admission(&self) -> Option<Result<View>> {
        (self.view.is_some() || self.gone.is_some()).then(|| self.view())
    }

    /// Joiners waiting for admission, as last announced by the master.
    pub fn pending_joiners(&self) -> u32 {
        self.pending_joiners
    }

    /// Topology rounds ended so far.
    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    /// Why this peer is no longer a member, if it is not.
    pub fn gone(&self) -> Option<&str> {
        self.gone.as_deref()
    }

    /// When [`PeerState::tick`] must next run (the master timeout), if ever.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.gone.is_none().then(|| self.rejoining.unwrap_or(self.last_heard + self.config.master_timeout))
    }

    /// Whether the master refused or ended this peer's membership (rather than being
    /// lost).
    pub fn refused(&self) -> bool {
        self.refused
    }

    /// A message from the master arrived. Returns the collectives that must stop now,
    /// with the error each returns.
    pub fn handle(&mut self, msg: ToPeer, now: Instant) -> Vec<(OpKey, Error)> {
        self.last_heard = now;
        let mut aborts = Vec::new();
        match msg {
            ToPeer::Pending | ToPeer::Heartbeat => {}
            ToPeer::PendingJoiners { count } => self.pending_joiners = count,
            ToPeer::View { view, removed, term } => {
                self.term = self.term.max(term);
                self.rejoining = None;
                // Commits of older epochs stay (the deque is bounded): a master that takes
                // over must hear of an eager collective this peer returned from even
                // when others still wait for it in the next epoch.
                let reason = match removed.first() {
                    Some(r) => Error::PeerLost { rank: r.rank as usize, reason: r.detail.clone() },
                    None => Error::Aborted { reason: format!("the view changed to epoch {}", view.epoch) },
                };
                if self.view.is_none() {
                    // Admitted into a group that had members means the members' topology
                    // round admitted us; admitted alone, or in the first view (epoch 1,
                    // formed from the first joiners), means no round happened.
                    self.fresh = view.size() > 1 && view.epoch > 1;
                    // The view a peer is admitted into is the one its caller sizes its
                    // first calls for, round or no round: a view that moves before its
                    // first update_topology must send it there too (else a collective
                    // sized for the old view runs in the new one, or meets a member's
                    // vote as a mismatch).
                    self.settled = Some(view.epoch);
                }
                let epoch = view.epoch;
                self.outbox.push(ToMaster::ViewSeen { epoch });
                let ended = self.config.closed && self.view.is_some() && !removed.is_empty();
                if ended {
                    // A closed group keeps its formed view: ranks never move under the
                    // caller, and every later call fails with this loss.
                    self.lost.get_or_insert_with(|| reason.clone());
                } else {
                    self.view = Some(view);
                }
                self.pending_joiners = 0;
                self.ops.retain(|&key, rec| {
                    if key.0 >= epoch {
                        return true;
                    }
                    // A decided collective keeps its decision: the master decides every
                    // collective of an epoch before it announces the next view.
                    if rec.active && rec.abort.is_none() && rec.decision.is_none() && !rec.voted_ok {
                        rec.abort = Some(reason.clone());
                        aborts.push((key, reason.clone()));
                    }
                    rec.active // kept until the caller finishes it
                });
            }
            ToPeer::Outcome { epoch, seq, decision: Decision::Commit } if !self.ops.contains_key(&(epoch, seq)) => {
                // A collective this peer already returned from (eagerly) and finished.
            }
            ToPeer::Outcome { epoch, seq, decision } => {
                let rec = self.ops.entry((epoch, seq)).or_default();
                if let Decision::Abort(reason) = &decision {
                    if rec.abort.is_none() {
                        let e = abort_error(reason.clone());
                        if rec.active {
                            aborts.push(((epoch, seq), e.clone()));
                        }
                        rec.abort = Some(e);
                    }
                }
                rec.decision = Some(decision);
            }
            ToPeer::SyncPlan { epoch, seq, agreed, transfers } => {
                self.ops.entry((epoch, seq)).or_default().plan = Some(SyncPlan { agreed, transfers });
            }
            ToPeer::Refused { reason } => {
                self.refused = true;
                aborts = self.disconnected(reason);
            }
            ToPeer::DeviceId { epoch, generation, id, grow } => self.device_id_relayed(epoch, generation, id, grow),
            ToPeer::TopologyDone { epoch } => {
                self.voting = false;
                self.rounds += 1;
                self.settled = Some(epoch);
            }
        }
        aborts
    }

    /// The control connection ended (or the driver gave up on it) for `reason`: this
    /// peer is no longer a member, and every collective in flight stops.
    pub fn disconnected(&mut self, reason: String) -> Vec<(OpKey, Error)> {
        if self.gone.is_none() {
            self.gone = Some(reason);
        }
        let err = Error::Removed { reason: self.gone.clone().unwrap_or_default() };
        let mut aborts = Vec::new();
        let undecided = |r: &&mut OpRecord| r.active && r.abort.is_none() && r.decision.is_none();
        for (&key, rec) in self.ops.iter_mut().filter(|(_, r)| undecided(r)) {
            rec.abort = Some(err.clone());
            aborts.push((key, err.clone()));
        }
        aborts
    }

    /// Time passed: a master silent for [`PeerConfig::master_timeout`] cuts this peer
    /// off (at exactly the deadline, so a driver woken then makes progress).
    pub fn tick(&mut self, now: Instant) -> Vec<(OpKey, Error)> {
        match (self.next_deadline(), self.rejoining) {
            (Some(deadline), Some(_)) if now >= deadline => {
                let within = self.config.rejoin_within.unwrap_or_default();
                self.disconnected(format!("the master was lost and none took over within {} ms", within.as_millis()))
            }
            (Some(deadline), None) if now >= deadline => {
                let silent = format!("no word from the master for {} ms", self.config.master_timeout.as_millis());
                self.master_lost(silent, now)
            }
            _ => Vec::new(),
        }
    }

    /// With [`PeerConfig::settle_view_changes`]: fails when the view moved since this
    /// peer's last topology round ended.
    fn check_settled(&self) -> Result<()> {
        let epoch = self.view.as_ref().map(|v| v.epoch);
        match self.settled {
            Some(settled) if self.config.settle_view_changes && epoch != Some(settled) => Err(Error::Aborted {
                reason: format!(
                    "the view changed from epoch {settled} to {} since the last update_topology; call it again, then this",
                    epoch.unwrap_or_default()
                ),
            }),
            _ => Ok(()),
        }
    }

    /// The current view, after moving the per-epoch numbering to it.
    fn current_view(&mut self) -> Result<View> {
        self.fresh = false;
        let view = self.view()?;
        if view.epoch != self.epoch {
            self.epoch = view.epoch;
            self.next_seq = 0;
            self.sub_seq.clear();
        }
        Ok(view)
    }

    /// Starts a collective: numbers it, records it, and says what to tell the master.
    ///
    /// Fails without numbering anything when this peer is not a member, when a
    /// sub-group names a peer outside the view ([`Error::PeerLost`]), or in a closed
    /// group once a member was lost.
    pub fn begin(&mut self, kind: OpKind<'_>) -> Result<Begun> {
        self.begin_as(kind, false)
    }

    /// [`PeerState::begin`], as an eager collective with `eager` (one whose members may
    /// return before the master's decision; see [`PeerState::returned_eagerly`]): the
    /// master hears of it with [`ToMaster::EagerOpBegin`] or
    /// [`ToMaster::EagerSubOpBegin`]. A shared-state sync is never eager.
    pub fn begin_as(&mut self, kind: OpKind<'_>, eager: bool) -> Result<Begun> {
        if let Some(e) = &self.lost {
            return Err(e.clone());
        }
        let view = self.current_view()?;
        if self.rejoining.is_some() {
            let reason = "the master was lost; rejoining a master (restarted or standby): call again once it took over";
            return Err(Error::Aborted { reason: reason.into() });
        }
        self.check_settled()?;
        let rank = view
            .rank_of(self.id)
            .ok_or_else(|| Error::Removed { reason: format!("not in the view of epoch {}", view.epoch) })?;
        let epoch = view.epoch;
        let (key, members, fingerprint, msg) = match kind {
            OpKind::Whole { call } => {
                self.next_seq += 1;
                let key = (epoch, self.next_seq);
                (key, (0..view.size()).collect(), call, ToMaster::OpBegin { epoch, seq: key.1, call })
            }
            OpKind::Sync { strategy, tensors } => {
                self.next_seq += 1;
                let key = (epoch, self.next_seq);
                (key, (0..view.size()).collect(), 0, ToMaster::SyncState { epoch, seq: key.1, strategy, tensors })
            }
            OpKind::Sub { call, members } => {
                let ranks = sub_members(&view, members)?;
                if !ranks.contains(&rank) {
                    return Err(Error::InvalidArgument(format!(
                        "peer {:#x} calls a sub-group collective without being a member",
                        self.id
                    )));
                }
                let set: Vec<PeerId> = ranks.iter().map(|&r| view.members[r].id).collect();
                let counter = self.sub_seq.entry(set.clone()).or_insert(0);
                *counter += 1;
                let seq = sub_key(&set, *counter);
                let fingerprint = sub_fingerprint(call, &set);
                ((epoch, seq), ranks, fingerprint, ToMaster::SubOpBegin { epoch, seq, call: fingerprint, members: set })
            }
        };
        let eager = eager && !matches!(msg, ToMaster::SyncState { .. });
        let msg = match msg {
            ToMaster::OpBegin { epoch, seq, call } if eager => ToMaster::EagerOpBegin { epoch, seq, call },
            ToMaster::SubOpBegin { epoch, seq, call, members } if eager => {
                ToMaster::EagerSubOpBegin { epoch, seq, call, members }
            }
            msg => msg,
        };
        let rec = self.ops.entry(key).or_default();
        rec.active = true;
        rec.eager = eager;
        Ok(Begun { key, view, rank, members, fingerprint, msg, doomed: rec.abort.clone() })
    }

    /// The collective `key` ended locally with `local`: the report for the master.
    pub fn end(&mut self, key: OpKey, local: &Result<()>) -> ToMaster {
        // A loss is this peer's own observation only while nothing stopped the
        // collective: once aborted, its executor returns the abort's reason, and echoing
        // a relayed loss back as a broken link would make every member a witness.
        let stopped = self.ops.get(&key).is_some_and(|r| r.abort.is_some() || r.decision.is_some());
        let result = match local {
            Ok(()) => match self.ops.get_mut(&key) {
                // An eager collective a new view stopped is no success, even if its
                // executor got to the end first: the master may commit it from the
                // survivors' reports, and this peer returns the abort.
                Some(rec @ OpRecord { eager: true, decision: None, abort: Some(_), .. }) => OpResult::Failed(format!(
                    "stopped: {}",
                    rec.abort.as_ref().map(|e| e.to_string()).unwrap_or_default()
                )),
                Some(rec) if rec.eager && !stopped => {
                    rec.voted_ok = true;
                    OpResult::Ok
                }
                _ => OpResult::Ok,
            },
            Err(Error::Mismatch { detail }) => OpResult::Mismatch(detail.clone()),
            Err(Error::InvalidArgument(detail)) => OpResult::Invalid(detail.clone()),
            Err(Error::PeerLost { rank, reason }) if !stopped => {
                OpResult::Lost { rank: u32::try_from(*rank).unwrap_or(u32::MAX), detail: reason.clone() }
            }
            Err(e) => OpResult::Failed(e.to_string()),
        };
        ToMaster::OpEnd { epoch: key.0, seq: key.1, result }
    }

    /// Whether `key` stopped: `None` while undecided, `Some(Ok)` once committed,
    /// `Some(Err)` once aborted (by the master, a view change or removal).
    pub fn outcome(&self, key: OpKey) -> Option<Result<()>> {
        let rec = self.ops.get(&key)?;
        if let Some(e) = &rec.abort {
            return Some(Err(e.clone()));
        }
        match &rec.decision {
            Some(Decision::Commit) => Some(Ok(())),
            Some(Decision::Abort(reason)) => Some(Err(abort_error(reason.clone()))),
            None => None,
        }
    }

    /// The abort of `key`, if it must stop.
    pub fn aborted(&self, key: OpKey) -> Option<Error> {
        self.ops.get(&key).and_then(|r| r.abort.clone())
    }

    /// The sync plan of `key` once it came, or why the sync stopped.
    pub fn sync_plan(&self, key: OpKey) -> Option<Result<SyncPlan>> {
        let rec = self.ops.get(&key)?;
        if let Some(e) = &rec.abort {
            return Some(Err(e.clone()));
        }
        rec.plan.clone().map(Ok)
    }

    /// Forgets a finished collective.
    pub fn finish(&mut self, key: OpKey) {
        if let Some(OpRecord { decision: Some(Decision::Commit), .. }) = self.ops.remove(&key) {
            if self.recent_commits.len() == RECENT_COMMITS {
                self.recent_commits.pop_front();
            }
            self.recent_commits.push_back(key);
        }
    }

    /// Collectives this peer knows of (begun, or decided before it began them).
    pub fn known_ops(&self) -> usize {
        self.ops.len()
    }

    /// Whether a collective begun in view `epoch` that failed with `e` on its
    /// `attempt`-th try (of `max_attempts`) should run again over the survivors.
    ///
    /// A lost peer shows as [`Error::PeerLost`], or as [`Error::Aborted`] where the
    /// master relays another rank's failure or the view moved; either is retried once
    /// a newer view arrives. Nothing else is: a mismatch or a bad argument would fail
    /// again the same way.
    pub fn retry(&self, e: &Error, attempt: u32, max_attempts: u32, epoch: u64) -> Retry {
        let moved = self.view.as_ref().is_some_and(|v| v.epoch > epoch);
        let retryable = matches!(e, Error::PeerLost { .. } | Error::Aborted { .. }) || moved;
        if attempt >= max_attempts || self.lost.is_some() || self.gone.is_some() || !retryable {
            Retry::GiveUp
        } else {
            Retry::AfterViewAbove(epoch)
        }
    }
}

/// The error a peer's collective returns for the master's abort reason.
pub fn abort_error(reason: AbortReason) -> Error {
    match reason {
        AbortReason::PeerLost { rank, detail } => Error::PeerLost { rank: rank as usize, reason: detail },
        AbortReason::Mismatch { detail } => Error::Mismatch { detail },
        AbortReason::Failed { rank, detail } => Error::Aborted { reason: format!("rank {rank} failed: {detail}") },
        AbortReason::Invalid { rank, detail } => Error::InvalidArgument(format!("rank {rank}: {detail}")),
        AbortReason::MasterLost { detail } => Error::Aborted { reason: detail },
    }
}
