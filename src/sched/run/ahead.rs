//! Receives posted ahead of their pass.
//!
//! Before each pass the runner keeps the next [`Runner::receives_ahead`] receives of
//! the stage's list posted (non-blocking, pinned to the iteration's view, as the sends
//! are), so that a message that arrives before its pass is already being received into
//! its buffer while the stage computes the passes before it. The pass then waits for
//! its own handle only. At most that many receive buffers (each at most
//! [`Runner::message_limit`] bytes) are held at once.
//!
//! Each tag is used once per iteration, and receives on one `(peer, tag)` run in the
//! order they were made (`PendingP2p`'s rules), so posting early cannot hand a message
//! to the wrong pass. A posted receive fails as the blocking one did (a lost peer's
//! `PeerLost`, a view change's `Aborted`), and its error names the pass that needed it,
//! reported when that pass is reached. An error that ends the run early leaves the
//! receives still posted running in that view (a handle cannot be cancelled without
//! corrupting its tag's next message); the stage that failed leaves the group, which
//! changes the view and ends them (see the runner's "Failures").

use std::collections::VecDeque;
use std::time::Instant;

use super::pinned::{recv_error, Pinned};
use super::{At, Direction, RunError, Runner, Stage, Step};
use crate::comm::PendingP2pRaw;
use crate::plan::Rank;

/// A receive that a pass of this stage needs from a peer.
#[derive(Clone, Copy, Debug)]
struct Needed {
    at: At,
    step: Step,
    dir: Direction,
    peer: Rank,
    tag: u32,
}

/// A posted receive.
struct Posted {
    needed: Needed,
    /// When it was posted.
    when: Instant,
    /// Its handle, or why it could not be posted (reported at its pass).
    pending: Result<PendingP2pRaw, RunError>,
}

/// What the pass got: the message, when its receive was posted and whether the message
/// was in before the pass began.
pub(super) struct Got<T> {
    pub(super) data: Vec<T>,
    pub(super) posted: Instant,
    pub(super) early: bool,
}

/// The stage's receives of one iteration, posted ahead of their passes.
pub(super) struct Ahead {
    needed: Vec<Needed>,
    /// The next of `needed` to post.
    next: usize,
    posted: VecDeque<Posted>,
    depth: usize,
}

impl Ahead {
    /// The receives of `runner`'s stage list, in order; none posted yet.
    pub(super) fn plan(runner: &Runner) -> Ahead {
        let needed = runner.schedule.stages[runner.stage]
            .iter()
            .enumerate()
            .filter_map(|(index, &action)| {
                let at = At { stage: runner.stage, index, action };
                let step = runner.step(action);
                let (dir, from) = runner.source(&step, action.pass)?;
                let (holder, _) = runner.schedule.place(from);
                (holder != runner.stage).then(|| Needed {
                    at,
                    step,
                    dir,
                    peer: runner.ranks[holder],
                    tag: runner.tag(action.mb, step.virtual_stage, dir),
                })
            })
            .collect();
        Ahead { needed, next: 0, posted: VecDeque::new(), depth: runner.receives_ahead }
    }

    /// Posts receives until `depth` are posted (or none is left).
    pub(super) fn post<S: Stage + ?Sized>(&mut self, runner: &Runner, comm: &mut Pinned<'_>, stage: &S) {
        while self.posted.len() < self.depth && self.next < self.needed.len() {
            self.post_next(runner, comm, stage);
        }
    }

    fn post_next<S: Stage + ?Sized>(&mut self, runner: &Runner, comm: &mut Pinned<'_>, stage: &S) {
        let needed = self.needed[self.next];
        self.next += 1;
        let len = match needed.dir {
            Direction::Activation => stage.input_len(&needed.step),
            Direction::Gradient => stage.output_len(&needed.step),
        };
        let pending = runner.fits(needed.at, len.saturating_mul(std::mem::size_of::<S::Elem>())).and_then(|()| {
            comm.irecv::<S::Elem>(needed.peer, needed.tag, len)
                .map_err(|e| recv_error(needed.at, needed.dir, needed.peer, e))
        });
        self.posted.push_back(Posted { needed, when: Instant::now(), pending });
    }

    /// Waits for the receive of the pass at position `index` of the list (posting it,
    /// and those before it, if they are not yet).
    pub(super) fn take<S: Stage + ?Sized>(
        &mut self,
        runner: &Runner,
        comm: &mut Pinned<'_>,
        stage: &S,
        index: usize,
    ) -> Result<Got<S::Elem>, RunError> {
        while self.posted.is_empty() && self.next < self.needed.len() && self.needed[self.next].at.index <= index {
            self.post_next(runner, comm, stage);
        }
        let Some(front) = self.posted.pop_front().filter(|p| p.needed.at.index == index) else {
            return Err(RunError::Invalid(format!(
                "stage {}, pass {index}: no receive was planned for it",
                runner.stage
            )));
        };
        let Needed { at, dir, peer, .. } = front.needed;
        let pending = front.pending?;
        let early = pending.is_done();
        let (result, bytes) = pending.wait();
        result.map_err(|e| recv_error(at, dir, peer, e))?;
        // A copy, as the bytes may not be aligned for `S::Elem`.
        let data: Vec<S::Elem> = bytemuck::allocation::pod_collect_to_vec(&bytes);
        Ok(Got { data, posted: front.when, early })
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::{by_name, Costs, Pass};
    use super::*;

    #[test]
    fn the_plan_lists_every_remote_receive_once_in_order() {
        let zbv = by_name("zbv", 4, 8, 2, &Costs::unit(), None).unwrap();
        // Rank 3 holds virtual stages 3 and 4: the turn is local, so its chunk-1
        // forwards and chunk-0 backwards receive nothing.
        let plan = Ahead::plan(&Runner::new(zbv.clone(), 3).unwrap());
        let receives: Vec<_> = plan.needed.iter().map(|n| (n.at.action.pass, n.at.action.chunk)).collect();
        assert_eq!(receives.len(), 16, "{receives:?}");
        assert!(receives.iter().all(|&(p, c)| (p == Pass::F && c == 0) || (p != Pass::F && c == 1)));
        assert!(plan.needed.windows(2).all(|w| w[0].at.index < w[1].at.index));
        assert!(plan.needed.iter().all(|n| n.peer == 2));
        // The first stage of 1F1B receives only gradients: one per micro-batch.
        let plan = Ahead::plan(&Runner::new(by_name("1f1b", 4, 8, 1, &Costs::unit(), None).unwrap(), 0).unwrap());
        assert_eq!(plan.needed.len(), 8);
        assert!(plan.needed.iter().all(|n| n.dir == Direction::Gradient && n.peer == 1));
    }
}
