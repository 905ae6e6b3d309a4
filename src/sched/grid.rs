//! A grid of `pp` pipeline stages × `dp` data-parallel replicas over one group.
//!
//! Every rank of the group holds one [`Position`]: a stage of one replica's pipeline.
//! Replica `r`'s pipeline runs a schedule over its `pp` ranks ([`GridMap::pipeline`],
//! given to [`Runner::ranks`] by [`GridMap::runner`]); after the pipeline's backward,
//! each stage's gradients are all-reduced among the `dp` ranks that hold that stage
//! ([`GridMap::dp_group`], [`GridMap::all_reduce_gradients`]: a sub-group all-reduce, so
//! the `pp` stages reduce at the same time and never wait for each other).
//!
//! A fresh group places rank `replica × pp + stage` ([`Grid::in_order`]). After a loss
//! the ranks of the view renumber, so positions follow the peers instead: every rank
//! says which position it held ([`Grid::place`], an all-gather), and newcomers take the
//! positions nobody holds, in rank order. A newcomer then fetches its stage's weights and
//! optimizer state from a replica of the same stage ([`GridMap::sync_stage_state`]).
//!
//! ```
//! use phalanx::sched::{one_f_one_b, Grid, Position};
//! let grid = Grid::new(2, 3)?; // 2 stages × 3 replicas, 6 ranks
//! let map = grid.in_order(4)?;
//! assert_eq!(map.me(), Position { stage: 0, replica: 2 });
//! assert_eq!(map.pipeline(2), vec![4, 5]); // replica 2's stages 0 and 1
//! assert_eq!(map.dp_group(0), vec![0, 2, 4]); // stage 0 of every replica
//! let runner = map.runner(one_f_one_b(2, 4)?)?;
//! assert_eq!(runner.pipeline_ranks(), &[4, 5]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use super::{RunError, Runner, Schedule};
use crate::dtype::{DType, Element, ReduceOp};
use crate::error::Error;
use crate::plan::Rank;
use crate::state::SharedState;
use crate::Communicator;

/// The shape of the grid: `pp` stages per pipeline, `dp` replicas of the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    /// Pipeline stages.
    pub pp: usize,
    /// Data-parallel replicas.
    pub dp: usize,
}

/// One place in the grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position {
    /// The pipeline stage.
    pub stage: usize,
    /// The replica (which pipeline).
    pub replica: usize,
}

/// Where every position of a [`Grid`] runs in the group's current view, and this rank's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GridMap {
    grid: Grid,
    /// Rank of position `(stage, replica)` at `replica × pp + stage`.
    ranks: Vec<Rank>,
    me: Position,
    newcomers: Vec<Position>,
}

impl Grid {
    /// A grid of `pp ≥ 1` stages × `dp ≥ 1` replicas.
    pub fn new(pp: usize, dp: usize) -> Result<Grid, RunError> {
        if pp == 0 || dp == 0 || pp.checked_mul(dp).is_none() {
            return Err(RunError::Invalid(format!("a grid of {pp} stages × {dp} replicas")));
        }
        Ok(Grid { pp, dp })
    }

    /// How many ranks the grid takes.
    pub fn size(&self) -> usize {
        self.pp * self.dp
    }

    fn index(&self, p: Position) -> usize {
        p.replica * self.pp + p.stage
    }

    fn position(&self, index: usize) -> Position {
        Position { stage: index % self.pp, replica: index / self.pp }
    }

    /// The placement of a fresh group of `pp × dp` ranks: position `(stage, replica)` on
    /// rank `replica × pp + stage`, seen from rank `rank`. No communication.
    pub fn in_order(&self, rank: Rank) -> Result<GridMap, RunError> {
        if rank >= self.size() {
            return Err(RunError::Invalid(format!("rank {rank} outside a grid of {} ranks", self.size())));
        }
        Ok(GridMap { grid: *self, ranks: (0..self.size()).collect(), me: self.position(rank), newcomers: Vec::new() })
    }

    /// Places the group's ranks on the grid by what each held: every rank calls it (a
    /// whole-group all-gather; the group must have exactly `pp × dp` ranks), `held` being
    /// the position it held before (`None` for a newcomer). Newcomers take the positions
    /// nobody holds, in rank order, and are listed in [`GridMap::newcomers`]. Every rank
    /// gets the same map, or the same error (two ranks holding one position).
    pub fn place(&self, comm: &mut Communicator, held: Option<Position>) -> Result<GridMap, RunError> {
        if comm.size() != self.size() {
            return Err(RunError::Invalid(format!(
                "a grid of {} × {} needs {} ranks; the group has {}",
                self.pp,
                self.dp,
                self.size(),
                comm.size()
            )));
        }
        let code = match held {
            Some(p) if p.stage < self.pp && p.replica < self.dp => self.index(p) as u64 + 1,
            Some(p) => return Err(RunError::Invalid(format!("{p:?} outside a grid of {} × {}", self.pp, self.dp))),
            None => 0,
        };
        let mut all = vec![0u64; comm.size()];
        comm.all_gather(&[code], &mut all).map_err(|source| RunError::Collective {
            what: "gathering the grid positions",
            source: Box::new(source),
        })?;
        let mut ranks = vec![usize::MAX; self.size()];
        for (rank, &c) in all.iter().enumerate().filter(|(_, &c)| c != 0) {
            let index = c as usize - 1;
            match ranks.get(index) {
                None => return Err(RunError::Invalid(format!("rank {rank} claims a position outside the grid"))),
                Some(&other) if other != usize::MAX => {
                    return Err(RunError::Invalid(format!(
                        "rank {rank} claims position {:?}, held by rank {other} too",
                        self.position(index)
                    )))
                }
                Some(_) => ranks[index] = rank,
            }
        }
        let free: Vec<usize> = (0..self.size()).filter(|&i| ranks[i] == usize::MAX).collect();
        let new: Vec<Rank> = (0..all.len()).filter(|&r| all[r] == 0).collect();
        // Sizes match, so the free positions are exactly as many as the newcomers.
        for (&i, &r) in free.iter().zip(&new) {
            ranks[i] = r;
        }
        let me = ranks.iter().position(|&r| r == comm.rank()).map(|i| self.position(i));
        let me = me.ok_or_else(|| RunError::Invalid(format!("rank {} got no position", comm.rank())))?;
        let newcomers = free.into_iter().map(|i| self.position(i)).collect();
        Ok(GridMap { grid: *self, ranks, me, newcomers })
    }
}

impl GridMap {
    /// The grid.
    pub fn grid(&self) -> Grid {
        self.grid
    }

    /// This rank's position.
    pub fn me(&self) -> Position {
        self.me
    }

    /// The rank holding `position`.
    pub fn rank(&self, position: Position) -> Option<Rank> {
        if position.stage >= self.grid.pp || position.replica >= self.grid.dp {
            return None;
        }
        self.ranks.get(self.grid.index(position)).copied()
    }

    /// The positions that newcomers took in [`Grid::place`] (empty for [`Grid::in_order`]).
    pub fn newcomers(&self) -> &[Position] {
        &self.newcomers
    }

    /// The ranks of replica `replica`'s pipeline, by stage.
    pub fn pipeline(&self, replica: usize) -> Vec<Rank> {
        (0..self.grid.pp).map(|stage| self.ranks[self.grid.index(Position { stage, replica })]).collect()
    }

    /// The ranks holding stage `stage`, in rank order (the members of its gradient
    /// all-reduce).
    pub fn dp_group(&self, stage: usize) -> Vec<Rank> {
        let mut g: Vec<Rank> =
            (0..self.grid.dp).map(|replica| self.ranks[self.grid.index(Position { stage, replica })]).collect();
        g.sort_unstable();
        g
    }

    /// The runner of this rank's stage of `schedule` (of `pp` stages) on its replica's pipeline.
    pub fn runner(&self, schedule: Schedule) -> Result<Runner, RunError> {
        if schedule.stages() != self.grid.pp {
            return Err(RunError::Invalid(format!(
                "a schedule of {} stages on a grid of {}",
                schedule.stages(),
                self.grid.pp
            )));
        }
        Runner::new(schedule, self.me.stage)?.ranks(self.pipeline(self.me.replica))
    }

    /// All-reduces this stage's gradients (`grads`, flattened in an order every replica
    /// shares) among the replicas of the stage, after the pipeline's backward. Every
    /// rank calls it; the stages reduce at the same time (disjoint sub-groups). With
    /// `dp = 1` it does nothing. `ReduceOp::Sum` over 2 replicas is bitwise what one
    /// process adding the two replicas' gradients gets (float addition commutes); over
    /// more, the sum follows the collective's fixed order.
    pub fn all_reduce_gradients<T: Element>(
        &self,
        comm: &mut Communicator,
        grads: &mut [T],
        op: ReduceOp,
    ) -> Result<(), RunError> {
        if self.grid.dp == 1 {
            return Ok(());
        }
        let members = self.dp_group(self.me.stage);
        comm.sub_all_reduce(&members, grads, op).map_err(|source| RunError::Collective {
            what: "all-reducing the gradients among the replicas",
            source: Box::new(source),
        })
    }

    /// [`GridMap::all_reduce_gradients`] on the bytes of elements of type `dtype` (for
    /// bindings that know the type at run time).
    pub fn all_reduce_gradients_raw(
        &self,
        comm: &mut Communicator,
        grads: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<(), RunError> {
        if self.grid.dp == 1 {
            return Ok(());
        }
        let members = self.dp_group(self.me.stage);
        comm.sub_all_reduce_raw(&members, grads, dtype, op).map_err(|source| RunError::Collective {
            what: "all-reducing the gradients among the replicas",
            source: Box::new(source),
        })
    }

    /// Waits until every rank of the grid is done (a barrier of the grid's ranks). Call
    /// it after the last iteration, before a rank drops or leaves its communicator:
    /// [`Runner::finish`] waits for one pipeline only, and a replica that leaves while
    /// another still all-reduces or votes with it would fail that one.
    pub fn finish(&self, comm: &mut Communicator) -> Result<(), RunError> {
        let mut members = self.ranks.clone();
        members.sort_unstable();
        let done = if members.len() == comm.size() { comm.barrier() } else { comm.sub_barrier(&members) };
        done.map_err(|source| RunError::Finish { source: Box::new(source) })
    }

    /// Brings the newcomers of [`Grid::place`] up to date: in every stage that a newcomer
    /// joined, the replica of lowest rank that held it before sends its `state` (the
    /// stage's weights, optimizer state and revision, as a [`SharedState`]; every member
    /// lists the same tensors, names, types and sizes) to the newcomers, which take it
    /// with its revision, checked against the sender's digest of the whole state (BLAKE3,
    /// as `sync_shared_state` checks). Members of stages no newcomer joined return at once. Returns
    /// whether this rank received. With `dp = 1` a lost stage has no replica: the run
    /// restarts from the last committed iteration instead (see the README).
    pub fn sync_stage_state(&self, comm: &mut Communicator, state: &mut SharedState) -> Result<bool, RunError> {
        let stage = self.me.stage;
        let new: Vec<Rank> = self.newcomers.iter().filter(|p| p.stage == stage).filter_map(|&p| self.rank(p)).collect();
        if new.is_empty() {
            return Ok(false);
        }
        let members = self.dp_group(stage);
        let Some(&root) = members.iter().find(|r| !new.contains(r)) else {
            return Err(RunError::Invalid(format!("every replica of stage {stage} is new: no one holds its state")));
        };
        let fail = |source: Error| RunError::Collective {
            what: "sending the stage's state to the newcomers",
            source: Box::new(source),
        };
        // The revision and the root's digest of the whole state first: a newcomer
        // checks what it received against it.
        let mut head = [0u8; 40];
        head[..8].copy_from_slice(&state.revision.to_le_bytes());
        head[8..].copy_from_slice(&state.digest());
        comm.sub_broadcast(&members, &mut head, root).map_err(fail)?;
        let names: Vec<String> = state.names().map(str::to_string).collect();
        for name in &names {
            let (dtype, bytes) = state
                .get_raw(name)
                .map(|(d, b)| (d, b.to_vec()))
                .ok_or_else(|| RunError::Invalid(format!("tensor {name} vanished from the shared state")))?;
            let mut buf = bytes;
            comm.sub_broadcast_raw(&members, &mut buf, dtype, root).map_err(fail)?;
            state.insert_raw(name, dtype, &buf);
        }
        let mut revision = [0u8; 8];
        revision.copy_from_slice(&head[..8]);
        state.revision = u64::from_le_bytes(revision);
        if state.digest()[..] != head[8..] {
            return Err(RunError::Invalid(format!(
                "stage {stage}'s state from rank {root} does not match its digest (do all replicas list the same tensors?)"
            )));
        }
        Ok(new.contains(&comm.rank()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_groups_follow_the_grid() {
        let g = Grid::new(4, 2).unwrap();
        let m = g.in_order(6).unwrap();
        assert_eq!(m.me(), Position { stage: 2, replica: 1 });
        assert_eq!(m.pipeline(0), vec![0, 1, 2, 3]);
        assert_eq!(m.pipeline(1), vec![4, 5, 6, 7]);
        assert_eq!(m.dp_group(3), vec![3, 7]);
        assert_eq!(m.rank(Position { stage: 1, replica: 1 }), Some(5));
        assert_eq!(m.rank(Position { stage: 4, replica: 0 }), None);
        assert!(g.in_order(8).is_err());
        assert!(Grid::new(0, 2).is_err());
        assert!(m.runner(super::super::one_f_one_b(2, 4).unwrap()).is_err());
    }
}
