//! The runner: one stage's part of a [`Schedule`], executed on a [`Communicator`].
//!
//! Each rank builds a [`Runner`] for its stage and calls [`Runner::run`] once per
//! iteration with its [`Stage`], the user's compute. The runner walks the stage's
//! actions in order: before a forward it receives the activation of the virtual stage
//! before (or takes it from the chunk of this stage that made it, for the turn of a V
//! placement), after it sends the output on; a backward receives the gradient of its
//! output from the virtual stage after and sends its input gradient back; a `W` moves
//! nothing. The first virtual stage's forward gets an empty input (it reads its
//! micro-batch itself) and the last's backward an empty gradient (it starts from its
//! loss).
//!
//! # Why blocking send and receive cannot deadlock here
//!
//! Every message has its own tag, unique per (micro-batch, receiving virtual stage,
//! direction) ([`tag`]), so no order of arrival can confuse two messages, and at most
//! one message per tag is in flight (a tag's next message belongs to the next
//! iteration, which a stage begins only after receiving everything of this one that
//! depends on its neighbours).
//!
//! phalanx's `send` is eager (`comm::p2p`, "Buffering"): it returns once the message
//! is handed to the transport, without waiting for the receiver's `recv`, as long as
//! the message fits the receiver's per-tag queue (`queue_frames × chunk_bytes`, 4 MiB
//! by default; the runner refuses a larger one with [`RunError::MessageTooLarge`], see
//! [`Runner::message_limit`]), and once the link between the two peers is open (the
//! peer with the smaller id opens it). The runner opens every link it uses at the top
//! of each run: each stage first sends a tiny greeting to every neighbour with a larger
//! id, then receives the greetings of those with a smaller one; sends never wait, so
//! neither does this.
//!
//! So a stage blocks only in a `recv`, for a message that another stage sends right
//! after a pass that comes earlier in that stage's list. A cycle of such waits would be
//! a cycle in the schedule's dependencies; [`Runner::new`] refuses a schedule that
//! [`validate`](super::validate) does not accept, and that replays every stage's order
//! under the same dependencies and fails on any such cycle. (The test
//! `send_returns_before_the_matching_recv` in `tests/pipeline_runner.rs` checks the
//! eager-send assumption.)
//!
//! Sends are started non-blocking and waited for at the end of the iteration; receives
//! are posted ahead of their passes, [`Runner::receives_ahead`] at a time (see
//! `ahead.rs`), and a pass waits only for its own. Neither adds a wait: a posted
//! receive blocks nothing, and a pass waits for the same message the blocking `recv`
//! did.
//!
//! # Failures
//!
//! Every error names the stage and the action that failed ([`RunError`]). When a peer
//! is lost mid-iteration, each other stage's pending `send` or `recv` fails with the
//! communicator's `PeerLost` or `Aborted` and its runner returns
//! [`RunError::Comm`]. The iteration's messages travel in the view it began in: a
//! send or receive that would begin after the view changed fails with `Aborted` too
//! (ranks may name other peers in the new view, and a message there would never come).
//! A stage whose own compute fails returns [`RunError::Stage`]; the
//! others are then waiting for it, so the caller must leave the group (drop or
//! [`Communicator::leave`] the communicator) or they wait until it does. The runner
//! does not roll anything back: the weights a stage's `W` passes touched are the
//! caller's to discard. The optimizer step that follows a run is made to commit on
//! every stage or none by [`Committer`](super::Committer).
//!
//! # Leaving
//!
//! A stage's run returns as soon as its own list is done, so that it can step its
//! optimizer while the others finish (the zero-bubble papers' per-stage span). Its last
//! messages may then still wait in a neighbour's queue, and a peer that leaves the group
//! voids the messages of its view: a neighbour still receiving them would fail with
//! `PeerLost`. So after the last iteration every stage calls [`Runner::finish`] (a
//! barrier of the pipeline's ranks) before it drops or leaves its communicator.
//!
//! Runner messages use tags with the top bit set ([`RUNNER_TAG_BIT`]); keep other
//! point-to-point tags below it while a runner runs on the communicator.

mod ahead;
mod error;
mod pinned;
mod trace;

use std::collections::HashMap;
use std::time::Instant;

use ahead::Ahead;
pub use error::{At, RunError};
use pinned::{send_error, Pinned};
pub use trace::{Executed, ExecutedPass};

use super::{validate, Costs, Pass, Schedule};
use crate::dtype::{Element, ReduceOp};
use crate::plan::Rank;
use crate::Communicator;

/// An error of the user's compute, carried as is.
pub type StageError = Box<dyn std::error::Error + Send + Sync>;

/// The bit set in every tag the runner sends with.
pub const RUNNER_TAG_BIT: u32 = 1 << 31;

/// The default [`Runner::message_limit`]: what a receiver queues per tag with the
/// default `ConnectOptions::queue_frames` (16) and `Tuning::chunk_bytes` (256 KiB).
pub const DEFAULT_MESSAGE_LIMIT: usize = 16 * (256 << 10);

/// The default [`Runner::receives_ahead`]: the next two receives of a stage's list
/// (in a 1F1B-like steady state, the next forward's activation and the next backward's
/// gradient).
pub const DEFAULT_RECEIVES_AHEAD: usize = 2;

/// The tag of the greeting that opens a link (see the module docs).
const GREETING_TAG: u32 = RUNNER_TAG_BIT | (RUNNER_TAG_BIT - 1);

/// The hand-offs kept on this stage (the turn of a V placement), by direction,
/// micro-batch and receiving virtual stage.
type Local<T> = HashMap<(Direction, usize, usize), Vec<T>>;

/// Which way a message travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// An activation, from virtual stage `v - 1` to `v`.
    Activation,
    /// The gradient of an activation, from virtual stage `v + 1` to `v`.
    Gradient,
}

/// The tag of the message of micro-batch `mb` that virtual stage `v` (of `virtual_stages`)
/// receives in direction `dir`: distinct for every distinct triple, top bit set. `None`
/// when the triple does not fit the tag space (about a billion micro-batch stages).
pub fn tag(mb: usize, v: usize, virtual_stages: usize, dir: Direction) -> Option<u32> {
    let slot = mb.checked_mul(virtual_stages)?.checked_add(v)?.checked_mul(2)? + (dir == Direction::Gradient) as usize;
    // The greeting takes the last value below the bit, the optimizer post-validation
    // (`sched::postval`) the two before it.
    (slot < (RUNNER_TAG_BIT - 3) as usize).then_some(RUNNER_TAG_BIT | slot as u32)
}

/// Where a pass sits in the model: the micro-batch, the stage's chunk and the virtual
/// stage that chunk holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// The micro-batch, from 0.
    pub mb: usize,
    /// The chunk of this stage, from 0.
    pub chunk: usize,
    /// The virtual stage (the model's part) this chunk holds, from 0.
    pub virtual_stage: usize,
    /// How many virtual stages the model has (stages × chunks).
    pub virtual_stages: usize,
}

impl Step {
    /// Whether this is the model's first part: its forward reads the micro-batch itself.
    pub fn is_first(&self) -> bool {
        self.virtual_stage == 0
    }

    /// Whether this is the model's last part: its forward computes the loss, and its
    /// backward starts from it.
    pub fn is_last(&self) -> bool {
        self.virtual_stage + 1 == self.virtual_stages
    }
}

/// The user's compute for the chunks one stage holds. The runner calls it in the
/// schedule's order; each call names its micro-batch and chunk in a [`Step`].
pub trait Stage {
    /// The element type of activations and gradients.
    type Elem: Element;

    /// The length of the activation that `step`'s forward receives (not asked on the
    /// first virtual stage). Every stage must agree with its neighbour's
    /// [`Stage::output_len`] for the same micro-batch.
    fn input_len(&self, step: &Step) -> usize;

    /// The length of `step`'s forward output, which its backward receives the gradient
    /// of (not asked on the last virtual stage).
    fn output_len(&self, step: &Step) -> usize;

    /// Forward: the output activation from `input` (empty on the first virtual stage).
    /// On the last virtual stage the output is not sent anywhere (keep the loss).
    fn forward(&mut self, step: &Step, input: &[Self::Elem]) -> Result<Vec<Self::Elem>, StageError>;

    /// Input gradient (`B`): the gradient of the input from that of the output
    /// (`grad_out` is empty on the last virtual stage). Its result is ignored on the
    /// first virtual stage (return an empty vector there).
    fn backward_input(&mut self, step: &Step, grad_out: &[Self::Elem]) -> Result<Vec<Self::Elem>, StageError>;

    /// Weight gradient (`W`), after this micro-batch's `backward_input` on this chunk.
    fn backward_weight(&mut self, step: &Step) -> Result<(), StageError>;

    /// A fused backward (`BW`): by default `backward_input`, then `backward_weight`.
    fn backward(&mut self, step: &Step, grad_out: &[Self::Elem]) -> Result<Vec<Self::Elem>, StageError> {
        let grad_in = self.backward_input(step, grad_out)?;
        self.backward_weight(step)?;
        Ok(grad_in)
    }
}

/// Executes one stage of a schedule, iteration after iteration.
#[derive(Clone, Debug)]
pub struct Runner {
    schedule: Schedule,
    stage: usize,
    ranks: Vec<Rank>,
    message_limit: usize,
    receives_ahead: usize,
}

impl Runner {
    /// The runner of stage `stage` of `schedule`, which must validate (every pass once,
    /// no dependency cycle; memory is not checked here). Stage `s` runs on rank `s` of
    /// the communicator unless [`Runner::ranks`] says otherwise.
    pub fn new(schedule: Schedule, stage: usize) -> Result<Runner, RunError> {
        let p = schedule.stages();
        if stage >= p {
            return Err(RunError::Invalid(format!("stage {stage} of a schedule of {p} stages")));
        }
        validate(&schedule, &Costs::unit(), None)?;
        let v = p * schedule.chunks.max(1);
        if tag(schedule.microbatches.saturating_sub(1), v - 1, v, Direction::Gradient).is_none() {
            return Err(RunError::Invalid(format!(
                "{} micro-batches over {v} virtual stages do not fit the runner's tags",
                schedule.microbatches
            )));
        }
        Ok(Runner {
            ranks: (0..p).collect(),
            schedule,
            stage,
            message_limit: DEFAULT_MESSAGE_LIMIT,
            receives_ahead: DEFAULT_RECEIVES_AHEAD,
        })
    }

    /// Runs stage `s` on rank `ranks[s]` of the communicator (one distinct rank per
    /// stage), e.g. for one pipeline of a grid of pipelines × data-parallel replicas.
    pub fn ranks(mut self, ranks: Vec<Rank>) -> Result<Runner, RunError> {
        let mut sorted = ranks.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if ranks.len() != self.schedule.stages() || sorted.len() != ranks.len() {
            return Err(RunError::Invalid(format!(
                "want {} distinct ranks, one per stage; got {ranks:?}",
                self.schedule.stages()
            )));
        }
        self.ranks = ranks;
        Ok(self)
    }

    /// The largest message (bytes) the runner sends: what a receiver queues per tag,
    /// `ConnectOptions::queue_frames × Tuning::chunk_bytes` (4 MiB with the defaults).
    /// Set it to that product when raising either on every peer.
    pub fn message_limit(mut self, bytes: usize) -> Runner {
        self.message_limit = bytes;
        self
    }

    /// How many receives of the stage's list the runner keeps posted ahead of the
    /// passes that need them ([`DEFAULT_RECEIVES_AHEAD`] by default; `0` receives each
    /// message only when its pass begins). A stage then holds at most that many receive
    /// buffers at once, each at most [`Runner::message_limit`] bytes.
    pub fn receives_ahead(mut self, receives: usize) -> Runner {
        self.receives_ahead = receives;
        self
    }

    /// The schedule.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// The stage this runner runs.
    pub fn stage(&self) -> usize {
        self.stage
    }

    /// The rank of every stage of the pipeline, by stage (see [`Runner::ranks`]).
    pub fn pipeline_ranks(&self) -> &[Rank] {
        &self.ranks
    }

    /// Runs this stage's passes of one iteration: `stage` computes, `comm` moves the
    /// activations and gradients. Returns each pass's times, in the order they ran.
    pub fn run<S: Stage + ?Sized>(&self, comm: &mut Communicator, stage: &mut S) -> Result<Executed, RunError> {
        let me = self.ranks[self.stage];
        if comm.rank() != me || self.ranks.iter().any(|&r| r >= comm.size()) {
            return Err(RunError::Invalid(format!(
                "stage {} runs on rank {me} and the stages on ranks {:?}; this communicator is rank {} of {}",
                self.stage,
                self.ranks,
                comm.rank(),
                comm.size()
            )));
        }
        let start = Instant::now();
        // Every message of the iteration travels in this view: ranks name other peers
        // in the next one, so a call that would begin in it fails instead (a neighbour
        // that will never send there would hang it).
        let mut comm = Pinned::new(comm);
        let comm = &mut comm;
        self.greet(comm)?;
        let mut local: Local<S::Elem> = HashMap::new();
        let mut ahead = Ahead::plan(self);
        let mut passes = Vec::with_capacity(self.schedule.stages[self.stage].len());
        for (index, &action) in self.schedule.stages[self.stage].iter().enumerate() {
            let at = At { stage: self.stage, index, action };
            ahead.post(self, comm, stage);
            passes.push(self.pass(comm, stage, (&mut local, &mut ahead), at)?);
        }
        comm.sent()?;
        Ok(Executed { stage: self.stage, start, passes })
    }

    /// Waits until every stage of the pipeline has run its list (a barrier of its
    /// ranks; the whole group's when the pipeline spans it). Call it after the last
    /// iteration, before dropping or leaving the communicator: a stage that leaves while
    /// a neighbour still receives its last messages makes that neighbour fail (see the
    /// module docs, "Leaving"). Not needed between iterations.
    pub fn finish(&self, comm: &mut Communicator) -> Result<(), RunError> {
        let mut members = self.ranks.clone();
        members.sort_unstable();
        let done = if members.len() == comm.size() {
            comm.barrier()
        } else {
            comm.sub_all_reduce(&members, &mut [0u8], ReduceOp::Sum)
        };
        done.map_err(|source| RunError::Finish { source: Box::new(source) })
    }

    /// Opens the links to the neighbour stages (see the module docs).
    fn greet(&self, comm: &mut Pinned<'_>) -> Result<(), RunError> {
        let ids = comm.comm.members();
        let me = self.ranks[self.stage];
        let mut neighbours: Vec<Rank> = self.neighbours().into_iter().map(|s| self.ranks[s]).collect();
        neighbours.sort_unstable();
        neighbours.dedup();
        let id = |r: Rank| ids.get(r).copied();
        let fail = |what, peer, source| RunError::Comm { at: None, what, peer, source: Box::new(source) };
        for &peer in neighbours.iter().filter(|&&r| id(r) > id(me)) {
            comm.send(peer, GREETING_TAG, &[0u8]).map_err(|e| fail("greeting", peer, e))?;
        }
        for &peer in neighbours.iter().filter(|&&r| id(r) < id(me)) {
            comm.recv(peer, GREETING_TAG, &mut [0u8]).map_err(|e| fail("awaiting the greeting of", peer, e))?;
        }
        Ok(())
    }

    /// The other stages this one exchanges messages with.
    fn neighbours(&self) -> Vec<usize> {
        let s = &self.schedule;
        let v_all = s.stages() * s.chunks.max(1);
        let mut out = Vec::new();
        for c in 0..s.chunks.max(1) {
            let v = s.virtual_stage(self.stage, c);
            for n in [v.checked_sub(1), (v + 1 < v_all).then_some(v + 1)].into_iter().flatten() {
                let (at, _) = s.place(n);
                if at != self.stage {
                    out.push(at);
                }
            }
        }
        out
    }

    /// Runs one action: its input in, the compute, its output on.
    fn pass<S: Stage + ?Sized>(
        &self,
        comm: &mut Pinned<'_>,
        stage: &mut S,
        (local, ahead): (&mut Local<S::Elem>, &mut Ahead),
        at: At,
    ) -> Result<ExecutedPass, RunError> {
        let a = at.action;
        let step = self.step(a);
        let v = step.virtual_stage;
        let begin = Instant::now();
        let (mut posted, mut early) = (None, false);
        // The pass's input: kept here from a chunk of this stage, or received.
        let mut input = |stage: &mut S| -> Result<Vec<S::Elem>, RunError> {
            let Some((dir, from)) = self.source(&step, a.pass) else { return Ok(Vec::new()) };
            if self.schedule.place(from).0 == self.stage {
                // A validated order ran `from`'s pass earlier on this stage.
                return local.remove(&(dir, a.mb, v)).ok_or_else(|| {
                    RunError::Invalid(format!("{at}: the hand-off from virtual stage {from} was not made before"))
                });
            }
            let got = ahead.take(self, comm, stage, at.index)?;
            (posted, early) = (Some(got.posted), got.early);
            Ok(got.data)
        };
        let compute_err = |source| RunError::Stage { at, source };
        let (ready, computed) = match a.pass {
            Pass::F => {
                let input = input(stage)?;
                let ready = Instant::now();
                let out = stage.forward(&step, &input).map_err(compute_err)?;
                let computed = Instant::now();
                if !step.is_last() {
                    let want = stage.output_len(&step);
                    if out.len() != want {
                        let detail = format!("forward returned {} elements; output_len says {want}", out.len());
                        return Err(RunError::Shape { at, detail });
                    }
                    self.give(comm, local, at, (Direction::Activation, v + 1), out)?;
                }
                (ready, computed)
            }
            Pass::B | Pass::BW => {
                let grad_out = input(stage)?;
                let ready = Instant::now();
                let grad_in = if a.pass == Pass::B {
                    stage.backward_input(&step, &grad_out)
                } else {
                    stage.backward(&step, &grad_out)
                }
                .map_err(compute_err)?;
                let computed = Instant::now();
                if !step.is_first() {
                    let want = stage.input_len(&step);
                    if grad_in.len() != want {
                        let detail = format!("backward returned {} elements; input_len says {want}", grad_in.len());
                        return Err(RunError::Shape { at, detail });
                    }
                    self.give(comm, local, at, (Direction::Gradient, v - 1), grad_in)?;
                }
                (ready, computed)
            }
            Pass::W => {
                let ready = Instant::now();
                stage.backward_weight(&step).map_err(compute_err)?;
                (ready, Instant::now())
            }
        };
        Ok(ExecutedPass { action: a, begin, ready, computed, end: Instant::now(), posted, early })
    }

    /// Where `action` sits in the model.
    fn step(&self, action: super::Action) -> Step {
        let s = &self.schedule;
        let virtual_stages = s.stages() * s.chunks.max(1);
        Step {
            mb: action.mb,
            chunk: action.chunk,
            virtual_stage: s.virtual_stage(self.stage, action.chunk),
            virtual_stages,
        }
    }

    /// What the pass `pass` of `step` takes in, and from which virtual stage: a
    /// forward the activation of the stage before, a backward the gradient of the
    /// stage after; `None` for a `W` and at the model's ends.
    fn source(&self, step: &Step, pass: Pass) -> Option<(Direction, usize)> {
        let v = step.virtual_stage;
        match pass {
            Pass::F => (!step.is_first()).then(|| (Direction::Activation, v - 1)),
            Pass::B | Pass::BW => (!step.is_last()).then(|| (Direction::Gradient, v + 1)),
            Pass::W => None,
        }
    }

    /// Hands `data` to virtual stage `to`: kept if this stage holds it, sent otherwise.
    fn give<T: Element>(
        &self,
        comm: &mut Pinned<'_>,
        local: &mut Local<T>,
        at: At,
        (dir, to): (Direction, usize),
        data: Vec<T>,
    ) -> Result<(), RunError> {
        let (holder, _) = self.schedule.place(to);
        if holder == self.stage {
            local.insert((dir, at.action.mb, to), data);
            return Ok(());
        }
        let peer = self.ranks[holder];
        self.fits(at, std::mem::size_of_val(data.as_slice()))?;
        comm.isend((at, dir), peer, self.tag(at.action.mb, to, dir), &data)
            .map_err(|source| send_error(at, dir, peer, source))
    }

    fn fits(&self, at: At, bytes: usize) -> Result<(), RunError> {
        if bytes > self.message_limit {
            return Err(RunError::MessageTooLarge { at, bytes, limit: self.message_limit });
        }
        Ok(())
    }

    fn tag(&self, mb: usize, v: usize, dir: Direction) -> u32 {
        let virtual_stages = self.schedule.stages() * self.schedule.chunks.max(1);
        // Runner::new checked that the largest triple fits; smaller ones do too.
        tag(mb, v, virtual_stages, dir).unwrap_or(GREETING_TAG)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{by_name, one_f_one_b, Action, Costs};
    use super::*;
    use crate::collective::Tuning;
    use crate::transport::demux::DEFAULT_QUEUE_FRAMES;

    #[test]
    fn the_default_message_limit_is_what_a_receiver_queues_per_tag() {
        assert_eq!(DEFAULT_MESSAGE_LIMIT, DEFAULT_QUEUE_FRAMES * Tuning::default().chunk_bytes);
    }

    #[test]
    fn tags_are_distinct_per_micro_batch_stage_and_direction() {
        let (m, v) = (32, 16);
        let mut seen = std::collections::HashSet::new();
        for mb in 0..m {
            for s in 0..v {
                for dir in [Direction::Activation, Direction::Gradient] {
                    let t = tag(mb, s, v, dir).unwrap();
                    assert_ne!(t & RUNNER_TAG_BIT, 0);
                    assert_ne!(t, GREETING_TAG);
                    assert!(seen.insert(t), "tag {t:#x} repeated at mb {mb} v {s} {dir:?}");
                }
            }
        }
        assert_eq!(tag(usize::MAX / 2, 3, 4, Direction::Activation), None);
        assert_eq!(tag(1 << 30, 0, 1, Direction::Gradient), None);
    }

    #[test]
    fn runners_refuse_what_cannot_run() {
        let s = one_f_one_b(4, 8).unwrap();
        assert!(matches!(Runner::new(s.clone(), 4), Err(RunError::Invalid(_))));
        let e = Runner::new(s.clone(), 0).unwrap().ranks(vec![0, 1, 1, 2]).unwrap_err();
        assert!(e.to_string().contains("distinct ranks"), "{e}");
        // A hand-broken order (stage 1 runs B0 before F0) is refused with the pass named.
        let mut broken = s.clone();
        broken.stages[1].swap(0, 3);
        let e = Runner::new(broken, 0).unwrap_err();
        assert!(matches!(e, RunError::Schedule(_)), "{e}");
        let mut missing = s;
        missing.stages[2].retain(|a| *a != Action::new(Pass::F, 5));
        let e = Runner::new(missing, 2).unwrap_err();
        assert!(e.to_string().contains("stage 2"), "{e}");
        for name in ["1f1b", "interleaved", "zbh1", "zb2p", "zbv", "vhalf", "vmin"] {
            let s = by_name(name, 4, 8, 2, &Costs::unit(), None).unwrap();
            for stage in 0..4 {
                Runner::new(s.clone(), stage).unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
    }

    #[test]
    fn neighbours_follow_the_placement() {
        let zbv = by_name("zbv", 4, 8, 2, &Costs::unit(), None).unwrap();
        // Rank 3 holds virtual stages 3 and 4: the turn is local, only rank 2 is a neighbour.
        assert_eq!(Runner::new(zbv.clone(), 3).unwrap().neighbours(), vec![2, 2]);
        assert_eq!(Runner::new(zbv, 0).unwrap().neighbours(), vec![1, 1]);
        // Interleaved: the last stage's chunk 0 feeds the first stage's chunk 1.
        let il = by_name("interleaved", 4, 8, 2, &Costs::unit(), None).unwrap();
        assert_eq!(Runner::new(il, 3).unwrap().neighbours(), vec![2, 0, 2]);
    }
}
