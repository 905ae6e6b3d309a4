//! The device communicator's membership decisions, sans-IO: views, unique ids, the
//! communicator's readiness and failures go in as [`Event`]s, [`Decision`]s come out,
//! and a driver carries them out on a [`super::DeviceBackend`] and the master link.
//! No sockets, no clock, no GPU: the tests assert every decision.
//!
//! - Each epoch's communicator has its own unique id: the first member of the view makes
//!   it and publishes it through the master, which relays the first id it gets for the
//!   epoch to every member ([`IdRelay`]); everyone, its maker included, inits from the
//!   relayed id, so all ranks use the same one.
//! - On a peer loss the communicator is revoked where NCCL has `ncclCommRevoke` (else
//!   the shrink aborts pending work itself), then shrunk over the survivors where it has
//!   `ncclCommShrink`; without shrink it is aborted and a fresh one is made.
//! - Joiners at `update_topology` are added with `ncclCommGrow` where it exists (the
//!   members keep their ranks, the joiners follow); otherwise the old communicator is
//!   destroyed and a fresh one made. The id's maker chooses, and the choice travels
//!   with the id, so members and joiners never disagree.
//! - Creation is non-blocking: while the communicator's async state reads "in progress"
//!   the decision is to sleep and check again, with a growing pause (never a spin).
//! - A device failure with no change of membership (an NCCL error while every peer
//!   lives) is recovered within the epoch: the communicators of an epoch are numbered by
//!   a *generation* (0 for the view's first). After a failure a member asks for the next
//!   generation ([`Event::Renew`]): it drops its communicator and makes an id, which the
//!   master relays to every member if it is the first for that generation. A member that
//!   did not see the failure follows the newer generation when its id reaches it: it
//!   aborts its communicator and inits from the relayed id.
//! - After a master takeover with the view unchanged (a new epoch, the same members in
//!   the same order), the new master relays again the id members held (see
//!   `membership::master::device_ids`): a member whose communicator was made from that
//!   very id keeps it (no second init from one id), the others init from it.

use std::time::Duration;

use super::{AsyncState, Capabilities, DeviceError, UniqueId};

/// The first pause between two checks of a communicator being created.
pub const FIRST_POLL: Duration = Duration::from_millis(1);
/// The longest pause between two checks.
pub const MAX_POLL: Duration = Duration::from_millis(100);

/// What the driver observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The master's view of `epoch`: its members' peer ids, in rank order.
    View {
        /// The view's epoch.
        epoch: u64,
        /// Member peer ids, rank order.
        members: Vec<u64>,
    },
    /// The master relayed the unique id of `epoch`, generation `generation`.
    UniqueId {
        /// The epoch it belongs to.
        epoch: u64,
        /// Its generation within the epoch.
        generation: u32,
        /// The id.
        id: UniqueId,
        /// Whether the members grow their communicator with it (else a fresh init).
        grow: bool,
    },
    /// The communicator being created (init, shrink or grow) reported its async state.
    Polled(AsyncState),
    /// A collective or an async check on the active communicator failed.
    Failed(DeviceError),
    /// The communicator being made will not complete (the view moved on without a rank
    /// it waits for): give it up.
    Abandon {
        /// Why.
        reason: String,
    },
    /// Make the communicator of generation `generation` of `epoch` over `members` (its
    /// current view): the one before failed, or could not be made.
    Renew {
        /// The current epoch.
        epoch: u64,
        /// The generation to make: above the current one.
        generation: u32,
        /// Member peer ids, rank order.
        members: Vec<u64>,
    },
}

/// What the driver should do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Make a unique id (`ncclGetUniqueId`) and send it to the master for `epoch`,
    /// with `grow`: the choice between growing the old communicator and a fresh init,
    /// made once by the id's maker so that every peer follows the same one.
    CreateAndPublishId {
        /// The epoch it is for.
        epoch: u64,
        /// The generation it is for.
        generation: u32,
        /// Whether the members grow their communicator with it.
        grow: bool,
    },
    /// Create the communicator of `epoch` from `id` as `rank` of `size` (non-blocking).
    Init {
        /// Its epoch.
        epoch: u64,
        /// The relayed id.
        id: UniqueId,
        /// This peer's rank.
        rank: usize,
        /// The number of ranks.
        size: usize,
    },
    /// Revoke the active communicator's pending work (`ncclCommRevoke`).
    Revoke,
    /// Abort the active communicator (`ncclCommAbort`) and drop it.
    Abort,
    /// Destroy the healthy active communicator (`ncclCommDestroy`): a new one replaces it.
    Destroy,
    /// Shrink the active communicator to the ranks not in `exclude` (`ncclCommShrink`);
    /// `abort_pending` asks the shrink to abort pending work (NCCL's
    /// `NCCL_SHRINK_ABORT`), when no revoke did.
    Shrink {
        /// The epoch of the shrunk communicator.
        epoch: u64,
        /// The old communicator's ranks that are gone.
        exclude: Vec<usize>,
        /// Whether the shrink must abort pending work itself.
        abort_pending: bool,
    },
    /// Grow the active communicator to `size` ranks with `id` (`ncclCommGrow`).
    Grow {
        /// The epoch of the grown communicator.
        epoch: u64,
        /// The relayed id.
        id: UniqueId,
        /// The new number of ranks.
        size: usize,
    },
    /// Join a communicator the members grow (`ncclCommGrow` with no parent).
    JoinGrown {
        /// Its epoch.
        epoch: u64,
        /// The relayed id.
        id: UniqueId,
        /// This peer's rank.
        rank: usize,
        /// The new number of ranks.
        size: usize,
    },
    /// Sleep this long, then read the async state again and report it as [`Event::Polled`].
    PollAfter(Duration),
    /// The communicator of `epoch` is ready: collectives may run.
    Ready {
        /// Its epoch.
        epoch: u64,
    },
    /// The communicator failed to come up: the error is the caller's; wait for the
    /// master's next view.
    GiveUp(DeviceError),
}

/// The communicator this peer holds while it waits for the next one's id.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    members: Vec<u64>,
    broken: bool,
    /// The unique id it was made (or grown) from; `None` for a shrunk one.
    id: Option<UniqueId>,
}

/// The state of the communicator of [`DeviceMembership`]'s (epoch, generation).
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// No communicator and none coming.
    Idle,
    /// Waiting for the master to relay the id; `held` is the communicator this peer has
    /// now, if any.
    AwaitingId { members: Vec<u64>, held: Option<Held> },
    /// A communicator is being created from `id` (`None`: a shrink); `pause` is the
    /// next sleep.
    Creating { members: Vec<u64>, pause: Duration, id: Option<UniqueId> },
    /// The communicator is ready (`broken` after a failure).
    Active { members: Vec<u64>, broken: bool, id: Option<UniqueId> },
    /// This peer is not in the view.
    Removed,
}

/// One peer's device membership state machine.
#[derive(Debug, Clone)]
pub struct DeviceMembership {
    me: u64,
    caps: Capabilities,
    /// The epoch of the communicator aimed at (the last view's).
    epoch: u64,
    /// Its generation within the epoch.
    generation: u32,
    /// The members of the last view or renewal (for a peer that gave up and follows a
    /// newer generation).
    members: Vec<u64>,
    state: State,
}

impl DeviceMembership {
    /// The machine of peer `me` on a backend with `caps` (every peer of a group is
    /// expected to load the same NCCL, so the same capabilities).
    pub fn new(me: u64, caps: Capabilities) -> DeviceMembership {
        DeviceMembership { me, caps, epoch: 0, generation: 0, members: Vec::new(), state: State::Idle }
    }

    /// The epoch of the ready communicator, if one is ready and not broken.
    pub fn ready_epoch(&self) -> Option<u64> {
        match self.state {
            State::Active { broken: false, .. } => Some(self.epoch),
            _ => None,
        }
    }

    /// The epoch and generation of the communicator aimed at: the ready one, the one
    /// being made or awaited, or the one that failed.
    pub fn current(&self) -> (u64, u32) {
        (self.epoch, self.generation)
    }

    /// Feeds one event; returns what to do.
    pub fn handle(&mut self, event: Event) -> Vec<Decision> {
        match event {
            Event::View { epoch, members } => self.on_view(epoch, members),
            Event::UniqueId { epoch, generation, id, grow } => self.on_id(epoch, generation, id, grow),
            Event::Polled(state) => self.on_polled(state),
            Event::Failed(error) => self.on_failed(error),
            Event::Renew { epoch, generation, members } => self.on_renew(epoch, generation, members),
            Event::Abandon { reason } => match self.state {
                State::Creating { .. } => {
                    self.state = State::Idle;
                    vec![Decision::Abort, Decision::GiveUp(DeviceError::Aborted { reason })]
                }
                _ => Vec::new(),
            },
        }
    }

    fn on_view(&mut self, epoch: u64, members: Vec<u64>) -> Vec<Decision> {
        let mut out = Vec::new();
        let held = match &self.state {
            State::Active { .. } | State::AwaitingId { .. } | State::Creating { .. } if self.epoch >= epoch => {
                return out; // a stale or repeated view
            }
            State::Active { members, broken, id } => Some(Held { members: members.clone(), broken: *broken, id: *id }),
            State::AwaitingId { held, .. } => held.clone(),
            State::Creating { .. } => {
                // A communicator half made for a view that is already outdated.
                out.push(Decision::Abort);
                None
            }
            State::Idle | State::Removed => None,
        };
        (self.epoch, self.generation, self.members) = (epoch, 0, members.clone());
        if !members.contains(&self.me) {
            if held.is_some() {
                out.push(Decision::Abort);
            }
            self.state = State::Removed;
            return out;
        }
        if let Some(old) = &held {
            let lost: Vec<usize> =
                old.members.iter().enumerate().filter(|(_, p)| !members.contains(p)).map(|(r, _)| r).collect();
            let survivors: Vec<u64> = old.members.iter().copied().filter(|p| members.contains(p)).collect();
            if !lost.is_empty() && survivors == members && self.caps.shrink {
                // Only losses: the survivors shrink, no new id is needed.
                if self.caps.revoke && !old.broken {
                    out.push(Decision::Revoke);
                }
                out.push(Decision::Shrink { epoch, exclude: lost, abort_pending: !self.caps.revoke });
                self.state = State::Creating { members, pause: FIRST_POLL, id: None };
                return out;
            }
        }
        if members.first() == Some(&self.me) {
            // The maker of the id decides, for everyone, whether it grows the old
            // communicator or makes a fresh one: the choice travels with the id.
            let grow = held.as_ref().is_some_and(|old| {
                self.caps.grow && !old.broken && members.len() > old.members.len() && members.starts_with(&old.members)
            });
            out.push(Decision::CreateAndPublishId { epoch, generation: 0, grow });
        }
        self.state = State::AwaitingId { members, held };
        out
    }

    /// The communicator of `generation` is wanted: whatever this peer holds is dropped
    /// and it offers an id of its own (the master relays the first one).
    fn on_renew(&mut self, epoch: u64, generation: u32, members: Vec<u64>) -> Vec<Decision> {
        if epoch != self.epoch || generation <= self.generation || !members.contains(&self.me) {
            return Vec::new(); // another epoch, or a generation already reached
        }
        let mut out = Vec::new();
        match &self.state {
            State::Active { .. } | State::Creating { .. } | State::AwaitingId { held: Some(_), .. } => {
                out.push(Decision::Abort)
            }
            State::AwaitingId { held: None, .. } | State::Idle | State::Removed => {}
        }
        (self.generation, self.members) = (generation, members.clone());
        out.push(Decision::CreateAndPublishId { epoch, generation, grow: false });
        self.state = State::AwaitingId { members, held: None };
        out
    }

    fn on_id(&mut self, epoch: u64, generation: u32, id: UniqueId, grow: bool) -> Vec<Decision> {
        if epoch != self.epoch || generation < self.generation {
            return Vec::new(); // an id of another epoch or an older generation: stale
        }
        // A newer generation reaches a member that did not see the failure: it follows,
        // dropping its communicator (aborted: the others left it).
        let behind = generation > self.generation;
        let (members, held) = match &self.state {
            State::AwaitingId { members, held } => (members.clone(), held.clone()),
            State::Active { members, broken, id } if behind => {
                (members.clone(), Some(Held { members: members.clone(), broken: true, id: *id }))
            }
            // It could not make its communicator (gave up) while the others renewed.
            State::Idle if behind => (self.members.clone(), None),
            _ => return Vec::new(),
        };
        let held = if behind { held.map(|h| Held { broken: true, ..h }) } else { held };
        let Some(rank) = members.iter().position(|p| *p == self.me) else { return Vec::new() };
        self.generation = generation;
        if let Some(old) = held.as_ref().filter(|h| h.id == Some(id)) {
            // The communicator this peer holds was made from this very id (a new master
            // relayed it again after a takeover): over these members and healthy, it is
            // the one. Otherwise no second communicator can be made from the id (the
            // others keep theirs): this one is dropped, and the next generation asked
            // for ([`Event::Renew`]), which the others follow.
            if !old.broken && old.members == members {
                self.state = State::Active { members, broken: false, id: Some(id) };
                return vec![Decision::Ready { epoch }];
            }
            self.state = State::Idle;
            return vec![Decision::Abort];
        }
        let size = members.len();
        let mut out = Vec::new();
        match (grow, &held) {
            (true, Some(_)) if self.caps.grow => out.push(Decision::Grow { epoch, id, size }),
            (true, None) if self.caps.grow => out.push(Decision::JoinGrown { epoch, id, rank, size }),
            (true, _) => {
                self.state = State::Idle;
                let e = DeviceError::Unsupported {
                    operation: "ncclCommGrow",
                    hint: "every peer of a group must load an NCCL with the same capabilities".into(),
                };
                if held.is_some() {
                    out.push(Decision::Abort);
                }
                out.push(Decision::GiveUp(e));
                return out;
            }
            (false, Some(old)) => {
                out.push(if old.broken { Decision::Abort } else { Decision::Destroy });
                out.push(Decision::Init { epoch, id, rank, size });
            }
            (false, None) => out.push(Decision::Init { epoch, id, rank, size }),
        }
        self.state = State::Creating { members, pause: FIRST_POLL, id: Some(id) };
        out
    }

    fn on_polled(&mut self, state: AsyncState) -> Vec<Decision> {
        let epoch = self.epoch;
        let State::Creating { members, pause, id } = &mut self.state else { return Vec::new() };
        match state {
            AsyncState::InProgress => {
                let now = *pause;
                *pause = (*pause * 2).min(MAX_POLL);
                vec![Decision::PollAfter(now)]
            }
            AsyncState::Ready => {
                self.state = State::Active { members: std::mem::take(members), broken: false, id: *id };
                vec![Decision::Ready { epoch }]
            }
            AsyncState::Failed(e) => {
                self.state = State::Idle;
                vec![Decision::Abort, Decision::GiveUp(e)]
            }
        }
    }

    fn on_failed(&mut self, _error: DeviceError) -> Vec<Decision> {
        let State::Active { broken, .. } = &mut self.state else { return Vec::new() };
        if *broken {
            return Vec::new();
        }
        *broken = true;
        // Free every rank stuck in the failed collective. A revoke keeps the communicator
        // for a shrink; without revoke a later shrink aborts the pending work itself;
        // without shrink the communicator is aborted now and re-made at the next view.
        if self.caps.revoke {
            vec![Decision::Revoke]
        } else if !self.caps.shrink {
            vec![Decision::Abort]
        } else {
            Vec::new()
        }
    }
}

/// The master's side of the id exchange: the first id published for the current epoch
/// and a generation above the relayed one wins, and goes to every member; ids for other
/// epochs, older or equal generations and from non-members are not relayed.
#[derive(Debug, Default)]
pub struct IdRelay {
    epoch: u64,
    members: Vec<u64>,
    /// The relayed id of the current epoch: its generation, the id, the grow flag.
    current: Option<(u32, UniqueId, bool)>,
}

impl IdRelay {
    /// The view of `epoch`: a new epoch forgets the id of the one before.
    pub fn view(&mut self, epoch: u64, members: Vec<u64>) {
        if epoch != self.epoch {
            self.current = None;
        }
        self.epoch = epoch;
        self.members = members;
    }

    /// `from` published `id` (and its grow flag) for `epoch`, `generation`: the
    /// [`Event::UniqueId`] to send to each member, `(peer, event)`. Empty unless `from`
    /// is a member and this is the first id of the current epoch for a generation above
    /// the relayed one.
    pub fn publish(&mut self, from: u64, epoch: u64, generation: u32, id: UniqueId, grow: bool) -> Vec<(u64, Event)> {
        let newer = self.current.is_none_or(|(g, ..)| generation > g);
        if epoch != self.epoch || !self.members.contains(&from) || !newer {
            return Vec::new();
        }
        self.current = Some((generation, id, grow));
        self.members.iter().map(|&p| (p, Event::UniqueId { epoch, generation, id, grow })).collect()
    }

    /// A master that took over with the view unchanged relays, as generation 0 of its
    /// view `epoch`, the id the members held (see `membership::master::device_ids`):
    /// the events for each member.
    pub fn adopt(&mut self, epoch: u64, members: Vec<u64>, id: UniqueId, grow: bool) -> Vec<(u64, Event)> {
        self.view(epoch, members);
        self.current = Some((0, id, grow));
        self.members.iter().map(|&p| (p, Event::UniqueId { epoch, generation: 0, id, grow })).collect()
    }

    /// The relayed id of the current epoch, its generation and grow flag, for a member
    /// that asks again or offers for an older or equal generation.
    pub fn current(&self) -> Option<(u32, UniqueId, bool)> {
        self.current
    }
}
