//! The peer state machine's vocabulary: its settings, what a caller asks it to begin,
//! what a begun collective carries, and its answers about retries, topology and sync.

use std::time::Duration;

use super::OpKey;
use crate::error::Error;
use crate::membership::protocol::{ToMaster, Transfer};
use crate::membership::view::{PeerId, View};
use crate::plan::Rank;
use crate::state::{Digest, SyncStrategy, TensorDigest};

/// Settings of a peer's protocol state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    /// With no message from the master for this long (it sends a heartbeat every
    /// 250 ms), the peer considers itself cut off: its collectives fail with
    /// [`Error::Removed`].
    pub master_timeout: Duration,
    /// A closed group: formed once, never joined, ended by its first loss. The view
    /// (ranks and size) stays as it was formed; once a member is lost, every later
    /// call of this peer fails with that loss ([`Error::PeerLost`]) instead of running
    /// over the survivors; `update_topology` has nothing to wait for. In-process groups
    /// are closed: their ranks are threads of one program that cannot rejoin.
    pub closed: bool,
    /// Calls wait for `update_topology` after a view change. Once this peer has taken
    /// part in a topology round, a collective begun in a view other than the one its
    /// last round settled fails at once with a retryable [`Error::Aborted`], and nothing
    /// reaches the master. Without it, a view change (a loss) splits the members by
    /// timing: those whose call it aborted go on to `update_topology`, while those that
    /// had not begun theirs yet would begin it in the new view, and the master would
    /// abort both as a mismatch. With it, every member calls `update_topology` next.
    /// Off for callers that run a failed call again inside it (a retry policy), which
    /// all run the call again in the new view instead.
    pub settle_view_changes: bool,
    /// When the master is lost (its connection breaks, or it stays silent for
    /// `master_timeout`), look for one to rejoin (the same address restarted, or a
    /// standby) for this long before giving up with [`Error::Removed`]; `None` gives up
    /// at once. Collectives in flight wait for the new master's verdict meanwhile, and
    /// new ones fail with a retryable [`Error::Aborted`].
    pub rejoin_within: Option<Duration>,
}

impl Default for PeerConfig {
    fn default() -> Self {
        PeerConfig {
            master_timeout: Duration::from_millis(2000),
            closed: false,
            settle_view_changes: false,
            rejoin_within: None,
        }
    }
}

/// What the caller starts, as the master must hear of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpKind<'a> {
    /// A collective of the whole view with this call fingerprint.
    Whole {
        /// Fingerprint of the call (collective, sizes, type, operator).
        call: u64,
    },
    /// A collective of some members only (ids in any order, this peer among them).
    Sub {
        /// Fingerprint of the call, before the member set is mixed in.
        call: u64,
        /// The members' peer ids.
        members: &'a [PeerId],
    },
    /// A shared-state sync.
    Sync {
        /// How this peer takes part.
        strategy: SyncStrategy,
        /// Its tensors' names, revisions and digests.
        tensors: Vec<TensorDigest>,
    },
}

/// A collective begun by [`PeerState::begin`]: what to run and what to tell the master.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Begun {
    /// Its key.
    pub key: OpKey,
    /// The view it runs in.
    pub view: View,
    /// This peer's rank in `view`.
    pub rank: Rank,
    /// For a sub-group: its members' view ranks, ascending; otherwise every rank.
    pub members: Vec<Rank>,
    /// The call fingerprint frames carry (the member set mixed in for a sub-group).
    pub fingerprint: u64,
    /// The message announcing it to the master.
    pub msg: ToMaster,
    /// Set when the master already aborted it (its decision arrived first).
    pub doomed: Option<Error>,
}

/// What to do after a collective failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Return the error.
    GiveUp,
    /// Wait (a bounded time) for a view of an epoch above this one, then run again.
    AfterViewAbove(u64),
}

/// What `update_topology` does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topology {
    /// Nothing to wait for: the members' round that admitted this peer was its own.
    Done,
    /// Send `msg`, then wait until more than `seen` rounds have ended.
    Wait {
        /// The vote for the master.
        msg: ToMaster,
        /// Rounds ended so far.
        seen: u64,
    },
}

/// A sync plan as received: the agreed content of each tensor and the transfers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncPlan {
    /// Agreed `(revision, digest)` per tensor.
    pub agreed: Vec<(u64, Digest)>,
    /// Who sends what to whom.
    pub transfers: Vec<Transfer>,
}
