//! The error type of every fallible phalanx call.

use crate::plan::Rank;
use crate::transport::LinkError;

/// What went wrong in a collective or a membership call.
///
/// After any error from a collective the caller's buffers hold exactly what they held
/// before the call, so the call can be retried as it stands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A peer crashed, hung or left while this collective ran; the group must change
    /// its view (or retry over the survivors) before collectives can succeed again.
    #[error("peer {rank} lost: {reason}; the buffer was restored, retry after the view changes")]
    PeerLost {
        /// The rank that was lost, in the view the collective ran in.
        rank: Rank,
        /// What was observed (link closed, heartbeat missed, ...).
        reason: String,
    },
    /// The collective was aborted, by the caller or because another rank failed.
    #[error("collective aborted: {reason}; the buffer was restored")]
    Aborted {
        /// Why it was aborted.
        reason: String,
    },
    /// Ranks called different collectives, sizes, element types or operators.
    #[error("mismatched collective call: {detail}")]
    Mismatch {
        /// What differed.
        detail: String,
    },
    /// A peer sent something that breaks the protocol (wrong length, unknown step).
    #[error("protocol violation by peer {peer}: {detail}")]
    Protocol {
        /// The offending rank.
        peer: Rank,
        /// What it sent.
        detail: String,
    },
    /// This peer is no longer a member of the group (removed after a timeout, or the
    /// master is unreachable); collectives cannot run until it joins again.
    #[error("not a member of the group: {reason}; connect again to rejoin")]
    Removed {
        /// Why.
        reason: String,
    },
    /// Joining failed: the master refused or could not be reached.
    #[error("cannot join: {reason}")]
    JoinFailed {
        /// Why.
        reason: String,
    },
    /// The call's own arguments are invalid; nothing was sent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A transport failed in a way not attributable to one peer.
    #[error("transport error: {0}")]
    Transport(#[from] LinkError),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
