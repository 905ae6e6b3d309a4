//! The runner's errors: each names the stage, the position in its list and the action
//! where it happened.

use super::super::{Action, ScheduleError};
use super::StageError;
use crate::error::Error;
use crate::plan::Rank;

/// Where an error happened: the stage, the position in its list and the action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct At {
    /// The stage.
    pub stage: usize,
    /// The action's position in the stage's list.
    pub index: usize,
    /// The action.
    pub action: Action,
}

impl std::fmt::Display for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stage {}, pass {} ({})", self.stage, self.index, self.action)
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The schedule does not validate: fix or regenerate it.
    #[error("the schedule cannot run: {0}")]
    Schedule(#[from] ScheduleError),
    /// The runner's arguments do not fit the schedule or the communicator.
    #[error("invalid pipeline run: {0}")]
    Invalid(String),
    /// Sending to or receiving from a peer failed (a lost peer gives the
    /// communicator's `PeerLost` or `Aborted`): the iteration is lost on every stage;
    /// settle the group (`update_topology`) and run it again.
    #[error("{}: {what} rank {peer} failed: {source}", OptAt(.at))]
    Comm {
        /// The action that was moving data, or `None` while opening the links or in the
        /// optimizer post-validation.
        at: Option<At>,
        /// What it was doing ("receiving the activation from").
        what: &'static str,
        /// The peer's rank.
        peer: Rank,
        /// The communicator's error (boxed: it is large, and errors travel by value).
        source: Box<Error>,
    },
    /// The user's compute failed. The other stages wait for this one: leave the group.
    #[error("{at}: the stage's compute failed: {source}")]
    Stage {
        /// The action.
        at: At,
        /// The stage's error.
        source: StageError,
    },
    /// The stage's compute returned a vector of the wrong length.
    #[error("{at}: {detail}")]
    Shape {
        /// The action.
        at: At,
        /// What was expected and what came.
        detail: String,
    },
    /// Waiting for the other stages in [`Runner::finish`](super::Runner::finish) failed (a peer was lost).
    #[error("finishing the pipeline (waiting until every stage ran its list) failed: {source}")]
    Finish {
        /// The communicator's error.
        source: Box<Error>,
    },
    /// A collective of the grid or of the iteration's commit failed (a lost peer gives
    /// the communicator's `PeerLost` or `Aborted`): see
    /// [`GridMap`](super::super::GridMap) and [`Committer`](super::super::Committer).
    #[error("{what} failed: {source}")]
    Collective {
        /// What it was doing ("all-reducing the gradients among the replicas").
        what: &'static str,
        /// The communicator's error.
        source: Box<Error>,
    },
    /// Another stage could not step (its optimizer or its post-validation failed, no
    /// peer lost): this stage's step of the iteration was undone, as on every stage.
    #[error("the iteration's step was not committed: {detail}")]
    Uncommitted {
        /// Which stage could not take part, as far as this one knows.
        detail: String,
    },
    /// The user's optimizer failed to step or to undo a step.
    #[error("the optimizer failed {what}: {source}")]
    Optimizer {
        /// What it was doing ("stepping", "undoing the step").
        what: &'static str,
        /// The optimizer's error.
        source: StageError,
    },
    /// A message larger than the receiver's queue for one tag holds: its `send` could
    /// wait for the `recv`, which the runner's order does not allow for. Raise
    /// `ConnectOptions::queue_frames` (or the chunk size) on every peer and
    /// [`Runner::message_limit`](super::Runner::message_limit) with it, or make the micro-batches smaller.
    #[error("{at}: a message of {bytes} bytes exceeds the {limit} bytes a receiver queues per tag; raise ConnectOptions::queue_frames and Runner::message_limit, or use smaller micro-batches")]
    MessageTooLarge {
        /// The action.
        at: At,
        /// The message's size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
}

impl std::fmt::Display for OptAt<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(at) => at.fmt(f),
            None => f.write_str("outside the passes (opening the links, or the optimizer's post-validation)"),
        }
    }
}

/// Displays an optional [`At`].
struct OptAt<'a>(&'a Option<At>);

impl RunError {
    /// The communicator's error, if sending or receiving failed.
    pub fn comm_error(&self) -> Option<&Error> {
        match self {
            RunError::Comm { source, .. } | RunError::Finish { source } | RunError::Collective { source, .. } => {
                Some(source)
            }
            _ => None,
        }
    }

    /// The action that failed, if the error belongs to one.
    pub fn at(&self) -> Option<At> {
        match self {
            RunError::Comm { at, .. } => *at,
            RunError::Stage { at, .. } | RunError::Shape { at, .. } | RunError::MessageTooLarge { at, .. } => Some(*at),
            RunError::Schedule(_)
            | RunError::Invalid(_)
            | RunError::Finish { .. }
            | RunError::Collective { .. }
            | RunError::Uncommitted { .. }
            | RunError::Optimizer { .. } => None,
        }
    }
}
