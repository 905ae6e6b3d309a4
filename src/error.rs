//! The error type of every fallible phalanx call, and its [`ErrorKind`].
//!
//! Match on [`Error::kind`] (not on the variants' payloads) to decide what to do, and
//! on [`Error::is_retryable`] to decide whether to retry a collective. The C ABI's
//! `PHX_ERR_*` codes and the Python exception classes are one-to-one with the kinds:
//!
//! | [`ErrorKind`]     | C status                   | Python exception      |
//! |-------------------|----------------------------|-----------------------|
//! | `PeerLost`        | `PHX_ERR_PEER_LOST`        | `PeerLostError`       |
//! | `Aborted`         | `PHX_ERR_ABORTED`          | `AbortedError`        |
//! | `Mismatch`        | `PHX_ERR_MISMATCH`         | `MismatchError`       |
//! | `Protocol`        | `PHX_ERR_PROTOCOL`         | `ProtocolError`       |
//! | `Removed`         | `PHX_ERR_REMOVED`          | `RemovedError`        |
//! | `JoinFailed`      | `PHX_ERR_JOIN_FAILED`      | `JoinFailedError`     |
//! | `InvalidArgument` | `PHX_ERR_INVALID_ARGUMENT` | `ValueError`          |
//! | `Transport`       | `PHX_ERR_TRANSPORT`        | `TransportError`      |
//! | `Runtime`         | `PHX_ERR_RUNTIME`          | `PhalanxRuntimeError` |
//! | `Device`          | `PHX_ERR_DEVICE`           | `PhalanxError`        |
//!
//! Every Python class but `ValueError` derives from `phalanx.PhalanxError`.

use crate::device::DeviceError;
use crate::plan::Rank;
use crate::transport::LinkError;

/// What went wrong in a collective or a membership call.
///
/// After any error from a collective the caller's buffers hold exactly what they held
/// before the call, so the call can be retried as it stands; [`Error::is_retryable`]
/// says whether a retry can succeed.
///
/// New variants may be added: match on [`Error::kind`] with a wildcard arm.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
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
    /// The call cannot run where or when it was made, through no fault of its
    /// arguments: the library could not start its runtime (threads, OS resources), or a
    /// blocking call was made from inside an async runtime. Nothing was sent.
    #[error("runtime error: {reason}")]
    Runtime {
        /// Why.
        reason: String,
    },
    /// The device (GPU) path failed: the NCCL library could not be found or loaded, it
    /// lacks a required symbol, it is older than supported, or an NCCL call failed. The
    /// [`DeviceError`] says which path(s) were tried, the version found and what to do.
    #[error("device error: {0}")]
    Device(#[from] DeviceError),
}

/// The kind of an [`Error`], without its details: what the C ABI's status codes and
/// the Python exception classes are made from.
///
/// New kinds may be added along with new [`Error`] variants: match with a wildcard arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ErrorKind {
    /// [`Error::PeerLost`].
    PeerLost,
    /// [`Error::Aborted`].
    Aborted,
    /// [`Error::Mismatch`].
    Mismatch,
    /// [`Error::Protocol`].
    Protocol,
    /// [`Error::Removed`].
    Removed,
    /// [`Error::JoinFailed`].
    JoinFailed,
    /// [`Error::InvalidArgument`].
    InvalidArgument,
    /// [`Error::Transport`].
    Transport,
    /// [`Error::Runtime`].
    Runtime,
    /// [`Error::Device`].
    Device,
}

impl ErrorKind {
    /// Every kind, in declaration order.
    pub const ALL: [ErrorKind; 10] = [
        ErrorKind::PeerLost,
        ErrorKind::Aborted,
        ErrorKind::Mismatch,
        ErrorKind::Protocol,
        ErrorKind::Removed,
        ErrorKind::JoinFailed,
        ErrorKind::InvalidArgument,
        ErrorKind::Transport,
        ErrorKind::Runtime,
        ErrorKind::Device,
    ];

    /// The kind's name as written in Rust, e.g. `"PeerLost"` (stable: logs and the CLI's
    /// JSON events carry it).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::PeerLost => "PeerLost",
            ErrorKind::Aborted => "Aborted",
            ErrorKind::Mismatch => "Mismatch",
            ErrorKind::Protocol => "Protocol",
            ErrorKind::Removed => "Removed",
            ErrorKind::JoinFailed => "JoinFailed",
            ErrorKind::InvalidArgument => "InvalidArgument",
            ErrorKind::Transport => "Transport",
            ErrorKind::Runtime => "Runtime",
            ErrorKind::Device => "Device",
        }
    }

    /// Whether a collective that failed with this kind can succeed when called again
    /// with the same arguments, on the same communicator, once the group has settled
    /// (after `update_topology`, or by the communicator's own `RetryPolicy`). The
    /// buffers are restored after every error, so retrying is always *safe*; this says
    /// whether it can *help*:
    ///
    /// - `PeerLost`: **yes**. A member went away mid-collective; the next view leaves
    ///   it out and the call can run over the survivors.
    /// - `Aborted`: **yes**. The usual cause is the same loss seen from another rank:
    ///   a loss that the master relays (rather than one this rank saw on its own link)
    ///   arrives as `Aborted`. If the abort came from a deterministic failure on
    ///   another rank (say, a NaN in a quantized all-reduce's input) the retry fails
    ///   the same way, so bound the attempts.
    /// - `Mismatch`: no. The ranks made different calls; the same calls disagree again.
    /// - `Protocol`: no. A peer broke the protocol (a bug, version skew or an attack);
    ///   the group has to remove it first.
    /// - `Removed`: no. This peer is no longer a member: connect again instead.
    /// - `JoinFailed`: no. There is no membership to retry on; whether connecting again
    ///   helps depends on why the master refused or could not be reached.
    /// - `InvalidArgument`: no. The same arguments are refused again.
    /// - `Transport`: no. The local transport failed in a way not tied to one peer;
    ///   nothing in the group's view changes that.
    /// - `Runtime`: no. The library could not start its runtime, or was called from
    ///   inside an async runtime; the same call from the same place fails again.
    /// - `Device`: no. The NCCL library is missing, unusable or failed; the same call
    ///   fails the same way until the library (or the GPU) is fixed.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorKind::PeerLost | ErrorKind::Aborted)
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Error {
    /// This error's kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::PeerLost { .. } => ErrorKind::PeerLost,
            Error::Aborted { .. } => ErrorKind::Aborted,
            Error::Mismatch { .. } => ErrorKind::Mismatch,
            Error::Protocol { .. } => ErrorKind::Protocol,
            Error::Removed { .. } => ErrorKind::Removed,
            Error::JoinFailed { .. } => ErrorKind::JoinFailed,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::Transport(_) => ErrorKind::Transport,
            Error::Runtime { .. } => ErrorKind::Runtime,
            Error::Device(_) => ErrorKind::Device,
        }
    }

    /// Whether calling the failed collective again, once the group has settled, can
    /// succeed: true for [`ErrorKind::PeerLost`] and [`ErrorKind::Aborted`] (a loss
    /// relayed by the master arrives as `Aborted`). See [`ErrorKind::is_retryable`] for
    /// why each kind is or is not.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// One error of every variant, in declaration order.
    fn one_of_each() -> Vec<Error> {
        let reason = || "why".to_string();
        vec![
            Error::PeerLost { rank: 1, reason: reason() },
            Error::Aborted { reason: reason() },
            Error::Mismatch { detail: reason() },
            Error::Protocol { peer: 2, detail: reason() },
            Error::Removed { reason: reason() },
            Error::JoinFailed { reason: reason() },
            Error::InvalidArgument(reason()),
            Error::Transport(LinkError::Closed(reason())),
            Error::Runtime { reason: reason() },
            Error::Device(DeviceError::Unsupported { operation: "why", hint: reason() }),
        ]
    }

    #[test]
    fn every_variant_has_its_own_kind() {
        let kinds: Vec<ErrorKind> = one_of_each().iter().map(Error::kind).collect();
        assert_eq!(kinds, ErrorKind::ALL);
        let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
        assert_eq!(
            names,
            [
                "PeerLost",
                "Aborted",
                "Mismatch",
                "Protocol",
                "Removed",
                "JoinFailed",
                "InvalidArgument",
                "Transport",
                "Runtime",
                "Device"
            ]
        );
        for kind in ErrorKind::ALL {
            assert_eq!(kind.to_string(), kind.name());
            assert_eq!(format!("{kind:?}"), kind.name());
        }
    }

    #[test]
    fn only_a_lost_or_aborted_collective_is_retryable() {
        for e in one_of_each() {
            let expected = matches!(e, Error::PeerLost { .. } | Error::Aborted { .. });
            assert_eq!(e.is_retryable(), expected, "{e}");
            assert_eq!(e.kind().is_retryable(), expected, "{e}");
        }
    }

    #[test]
    fn runtime_errors_say_why() {
        let e = Error::Runtime { reason: "blocking collective called from inside an async runtime".into() };
        assert_eq!(e.to_string(), "runtime error: blocking collective called from inside an async runtime");
        assert_eq!(e.kind(), ErrorKind::Runtime);
    }
}
