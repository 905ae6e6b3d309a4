//! What a run did: each pass's times on this stage, in the order it ran, to compare with
//! the schedule (same order) and with the simulator (spans, bubbles).

use std::time::{Duration, Instant};

use super::super::{Action, Schedule};

/// One pass as it ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecutedPass {
    /// The pass.
    pub action: Action,
    /// When the runner began it: it then waited for its input (a receive), if any.
    pub begin: Instant,
    /// When its input was in and the stage's compute began.
    pub ready: Instant,
    /// When the compute returned.
    pub computed: Instant,
    /// When its output was handed on (sent, or kept for a chunk of this stage).
    pub end: Instant,
    /// When the receive of its input was posted (ahead of the pass, see
    /// [`Runner::receives_ahead`](super::Runner::receives_ahead)); `None` when it
    /// received nothing from a peer.
    pub posted: Option<Instant>,
    /// Whether its input had been received in full before the pass began (it then did
    /// not wait for the network).
    pub early: bool,
}

impl ExecutedPass {
    /// The time spent waiting for the input.
    pub fn waited(&self) -> Duration {
        self.ready - self.begin
    }

    /// The time the stage's compute took.
    pub fn compute(&self) -> Duration {
        self.computed - self.ready
    }
}

/// One stage's executed iteration: its passes in the order they ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Executed {
    /// The stage (index into the schedule's stages).
    pub stage: usize,
    /// When the run began (before the links were greeted).
    pub start: Instant,
    /// The passes, in the order they ran.
    pub passes: Vec<ExecutedPass>,
}

impl Executed {
    /// The actions in the order they ran.
    pub fn order(&self) -> Vec<Action> {
        self.passes.iter().map(|p| p.action).collect()
    }

    /// Whether this stage ran exactly its list of `schedule`, in order; the error names
    /// the first position where they differ.
    pub fn check_order(&self, schedule: &Schedule) -> Result<(), String> {
        let want =
            schedule.stages.get(self.stage).ok_or_else(|| format!("the schedule has no stage {}", self.stage))?;
        let got = self.order();
        if let Some(i) = (0..want.len().max(got.len())).find(|&i| want.get(i) != got.get(i)) {
            let show = |a: Option<&Action>| a.map_or_else(|| "nothing".to_string(), Action::to_string);
            return Err(format!(
                "stage {}: pass {i} ran {} where the schedule has {}",
                self.stage,
                show(got.get(i)),
                show(want.get(i))
            ));
        }
        Ok(())
    }

    /// The zero-bubble span as the simulator measures it ([`super::super::Timeline`]
    /// `spans`): from the start of the first pass's compute to the end of the last
    /// pass's compute. Zero for a stage with no passes.
    pub fn span(&self) -> Duration {
        match (self.passes.first(), self.passes.last()) {
            (Some(first), Some(last)) => last.computed.saturating_duration_since(first.ready),
            _ => Duration::ZERO,
        }
    }

    /// Each pass's compute as `(action, start, end)` in seconds since `origin`, the
    /// shape of the simulator's [`super::super::Timeline`] `passes` (pass a common
    /// origin for the stages of one process; each stage's own `start` otherwise).
    /// Times before `origin` count as 0.
    pub fn seconds_since(&self, origin: Instant) -> Vec<(Action, f64, f64)> {
        let at = |t: Instant| t.saturating_duration_since(origin).as_secs_f64();
        self.passes.iter().map(|p| (p.action, at(p.ready), at(p.computed))).collect()
    }
}
