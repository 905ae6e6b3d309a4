//! Pipeline schedules as plans: per stage, the ordered passes of every micro-batch.
//!
//! A schedule is pure data, like the collective plans: [`Schedule`] lists, for each of
//! `p` stages, the forward (`F`), input-gradient (`B`), weight-gradient (`W`) or fused
//! (`BW`) passes it runs, in order, each naming a micro-batch and a chunk. Generators
//! build them ([`one_f_one_b`], [`interleaved_1f1b`], [`zb_h1`], [`zb_v`], [`v_half`],
//! [`v_min`], and the automatic scheduler [`auto_schedule`] with [`zb_2p`]), [`validate`]
//! checks one against the
//! dependency rules and a memory limit, and [`simulate`] replays it under pass and
//! communication costs to give each stage's timeline, span, bubble and peak memory.
//!
//! The operation model is the zero-bubble paper's (`../shared/reference/
//! pipeline-schedules.md`, 1.1): `F(s,j)` needs `F(s-1,j)`; the last stage's `B` needs
//! its own `F`; `B(s,j)` needs `B(s+1,j)`; `W(s,j)` needs `B(s,j)` on the same stage; a
//! fused `BW` is a `B` and its `W` in one pass.
//!
//! ```
//! use phalanx::sched::{one_f_one_b, simulate, Costs};
//! let s = one_f_one_b(4, 8).unwrap();
//! let t = simulate(&s, &Costs::unit()).unwrap();
//! assert_eq!(t.bubble(), 9.0); // (p - 1)(T_F + T_B + T_W)
//! assert_eq!(t.peak_memory, vec![4.0, 3.0, 2.0, 1.0]); // units of one micro-batch's activations
//! ```
//!
//! Built so far: 1F1B, ZB-H1 and the automatic scheduler (ZB-2p at a limit of `2p`) on
//! one chunk per stage, interleaved 1F1B on `v`, and ZB-V, V-Half and V-Min on two.
//! [`Runner`] executes one stage's list on a [`crate::Communicator`], calling the user's
//! [`Stage`] for each pass and moving activations and gradients with tagged send and
//! receive. A [`Grid`] of `pp` stages × `dp` replicas places pipelines on a group and
//! all-reduces each stage's gradients among its replicas ([`GridMap`]); the optimizer
//! post-validation ([`PostValidation`]) carries the gradient norm and inf/NaN flag along
//! the pipeline while every stage steps optimistically, and a [`Committer`] makes each
//! iteration's step commit on every rank or on none; a newcomer takes a lost position
//! and fetches its stage's state from a replica ([`GridMap::sync_stage_state`]).

mod auto;
mod commit;
mod generate;
mod grid;
mod named;
mod postval;
mod run;
mod simulate;
mod sleeper;
mod validate;
mod vshape;

pub use auto::{auto_schedule, zb_2p};
pub use commit::{Committed, Committer};
pub use generate::{interleaved_1f1b, one_f_one_b, zb_h1, zb_v};
pub use grid::{Grid, GridMap, Position};
pub use named::{by_name, SCHEDULE_NAMES};
pub use postval::{GradStats, Optimistic, PostValidation, Stepped, Verdict, PARTIAL_TAG, VERDICT_TAG};
pub use run::{
    tag, At, Direction, Executed, ExecutedPass, RunError, Runner, Stage, StageError, Step, DEFAULT_MESSAGE_LIMIT,
    DEFAULT_RECEIVES_AHEAD, RUNNER_TAG_BIT,
};
pub use simulate::{simulate, Timeline};
pub use sleeper::Sleeper;
pub use validate::validate;
pub use vshape::{v_half, v_min};

/// The kind of a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pass {
    /// Forward.
    F,
    /// Backward for the input gradient only.
    B,
    /// Backward for the weight gradient only.
    W,
    /// `B` and `W` fused into one pass.
    BW,
}

/// One pass of one micro-batch on one chunk of a stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Action {
    /// What runs.
    pub pass: Pass,
    /// The micro-batch, from 0.
    pub mb: usize,
    /// The stage's chunk (0 for schedules with one chunk per stage).
    pub chunk: usize,
}

impl Action {
    /// `pass` of micro-batch `mb` on chunk 0.
    pub fn new(pass: Pass, mb: usize) -> Action {
        Action { pass, mb, chunk: 0 }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}{}", self.pass, self.mb)?;
        if self.chunk > 0 {
            write!(f, "c{}", self.chunk)?;
        }
        Ok(())
    }
}

/// A pipeline schedule: `stages[s]` is stage `s`'s passes in the order it runs them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// The generator's name ("1F1B", "ZB-H1").
    pub name: &'static str,
    /// Micro-batches per iteration.
    pub microbatches: usize,
    /// Model chunks per stage (1 for the plain schedules).
    pub chunks: usize,
    /// Where the chunks' virtual stages lie.
    pub placement: Placement,
    /// Each stage's passes, in order.
    pub stages: Vec<Vec<Action>>,
}

impl Schedule {
    /// The number of stages (devices).
    pub fn stages(&self) -> usize {
        self.stages.len()
    }

    /// The virtual stage that chunk `chunk` of stage `stage` holds.
    pub fn virtual_stage(&self, stage: usize, chunk: usize) -> usize {
        let p = self.stages();
        match self.placement {
            Placement::V if chunk % 2 == 1 => (chunk + 1) * p - 1 - stage,
            _ => chunk * p + stage,
        }
    }

    /// The stage (device) that holds virtual stage `v`, and the chunk.
    pub fn place(&self, v: usize) -> (usize, usize) {
        let p = self.stages();
        let (chunk, at) = (v / p, v % p);
        match self.placement {
            Placement::V if chunk % 2 == 1 => (p - 1 - at, chunk),
            _ => (at, chunk),
        }
    }

    /// Stage `s`'s order as text, e.g. `F0 F1 B0 W0`.
    pub fn order(&self, s: usize) -> String {
        self.stages[s].iter().map(Action::to_string).collect::<Vec<_>>().join(" ")
    }
}

/// Where the `v` chunks of each of `p` stages lie in the model's `v·p` virtual stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Chunk `c` of stage `s` is virtual stage `c·p + s`: the forward passes every
    /// stage `v` times in the same direction (interleaved 1F1B; `v = 1`: plain).
    Interleaved,
    /// Two chunks in a V: stage `s` holds `s` and `2p-1-s`, so the forward runs down
    /// the stages and back up, and the turn stays on the last stage (ZB-V).
    V,
}

/// The costs a simulation charges, in any time unit, and the memory model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Costs {
    /// A forward pass.
    pub f: f64,
    /// An input-gradient pass.
    pub b: f64,
    /// A weight-gradient pass.
    pub w: f64,
    /// Moving an activation or a gradient to the next stage.
    pub comm: f64,
    /// The share of a micro-batch's activations (1 unit per `F`) that its `W` frees; its
    /// `B` frees the rest.
    pub w_memory: f64,
}

impl Costs {
    /// Every pass costs 1, communication 0, and `W` frees nothing (the reference's
    /// worked example).
    pub fn unit() -> Costs {
        Costs { f: 1.0, b: 1.0, w: 1.0, comm: 0.0, w_memory: 0.0 }
    }

    fn of(&self, pass: Pass) -> f64 {
        match pass {
            Pass::F => self.f,
            Pass::B => self.b,
            Pass::W => self.w,
            Pass::BW => self.b + self.w,
        }
    }
}

/// Why a schedule cannot be built, or is wrong.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    /// A parameter is outside what the generator supports.
    #[error("invalid schedule parameters: {0}")]
    Invalid(String),
    /// A pass is missing, repeated or out of range.
    #[error("stage {stage}: {detail}")]
    Passes {
        /// The stage.
        stage: usize,
        /// What is wrong.
        detail: String,
    },
    /// No stage can run its next pass: the order contradicts a dependency.
    #[error("deadlock: {0}")]
    Deadlock(String),
    /// A stage holds more activations than the limit.
    #[error("stage {stage} holds {peak} units of activation memory after {action}, above the limit {limit}")]
    Memory {
        /// The stage.
        stage: usize,
        /// The pass after which the peak was reached.
        action: String,
        /// Its memory then.
        peak: f64,
        /// The limit.
        limit: f64,
    },
    /// A memory limit below what a generator can meet: raise the limit.
    #[error("memory limit {limit} is below what the schedule needs ({need} micro-batches of activations on a stage): {detail}; raise the limit")]
    MemoryLimit {
        /// The limit asked for, in micro-batches of one stage's activations.
        limit: f64,
        /// What the schedule needed at the point it failed.
        need: f64,
        /// Where and why.
        detail: String,
    },
}
