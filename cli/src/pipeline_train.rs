//! `phalanx pipeline-worker --mode mlp`: one position of a `pp × dp` grid of pipelines
//! training the MLP of `phalanx::pipeline_mlp`, as its own process.
//!
//! Each process places itself on the grid with [`Grid::place`] (the position it was
//! given, or, with `--join`, a free one), runs its replica's runner, all-reduces its
//! stage's gradients among the replicas ([`GridMap::all_reduce_gradients`]) and steps
//! SGD with momentum through a [`Committer`] (post-validation along the pipeline, then a
//! vote of every rank of the grid), so that an iteration's step is kept on every
//! position or on none. It prints each committed step (the bits and a digest of its
//! weights and momentum).
//!
//! Replica `r` trains, in iteration `i`, the micro-batches that `pipeline_mlp` reads for
//! its iteration `i·dp + r` ([`Mlp::set_iteration`]); the replicas' gradients are summed.
//!
//! After a loss (`dp ≥ 2`) a survivor settles the view without the lost peer
//! (`update_topology`), waits for a newcomer (a process started with `--join`), places
//! every rank again by the position it held, and the newcomer fetches its stage's
//! weights, momentum and iteration from a replica ([`GridMap::sync_stage_state`]); then
//! the failed iteration runs again. With `dp = 1` no replica holds the lost stage: with
//! `--checkpoint DIR` every position saves its state at each commit and the newcomer
//! restarts from the lost position's save (every rank checks that they agree on the
//! iteration); without, the worker exits with an error.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use phalanx::pipeline_mlp::{Mlp, D, LAYERS, LR};
use phalanx::sched::{
    Committed, Committer, GradStats, Grid, GridMap, Optimistic, Pass, Position, RunError, Runner, Schedule, StageError,
    Step,
};
use phalanx::workload::hash_f32;
use phalanx::{Communicator, ReduceOp, SharedState};
use serde_json::json;

use crate::{emit, now_ms};

/// How long a survivor waits, after a loss, for the view to settle and a newcomer to
/// join; a newcomer, to be admitted.
pub const RECOVERY_WAIT: Duration = Duration::from_secs(30);

/// How a process enters the grid.
pub enum Start {
    /// It holds this position from the first view.
    Holds(Position),
    /// It joins a running group and takes a free position.
    Join,
}

/// Where a stage stops for a harness to kill or stop it (`--hang-at`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HangAt {
    /// Before this pass of this micro-batch (on the stage's first chunk).
    Pass(Pass, usize),
    /// Inside the optimistic optimizer step (the gradients all-reduced, the stats passed on).
    Step,
}

/// What to train.
pub struct Training {
    /// The schedule every pipeline runs.
    pub schedule: Schedule,
    /// The grid.
    pub grid: Grid,
    /// Iterations in all.
    pub iterations: usize,
    /// The momentum `μ` of SGD (`v = μ·v + g`, `w -= LR·v`); 0 is plain SGD.
    pub momentum: f32,
    /// The post-validation's clipping limit of the global gradient norm.
    pub max_norm: Option<f64>,
    /// Stop in this iteration there (its first attempt only).
    pub hang: Option<(usize, HangAt)>,
    /// Where each position saves its state at each commit (the restart of `dp = 1`).
    pub checkpoint: Option<PathBuf>,
}

/// The file of `at`'s last committed state under `dir`.
fn checkpoint_file(dir: &Path, at: Position) -> PathBuf {
    dir.join(format!("stage{}-replica{}.state", at.stage, at.replica))
}

/// The kind of a run's error: the communicator's (`PeerLost`, `Aborted`) where sending,
/// receiving, a collective or the commit failed, else the runner's own.
pub fn kind(e: &RunError) -> &'static str {
    if let Some(source) = e.comm_error() {
        return source.kind().name();
    }
    match e {
        RunError::Schedule(_) => "Schedule",
        RunError::Invalid(_) => "Invalid",
        RunError::Stage { .. } => "Stage",
        RunError::Shape { .. } => "Shape",
        RunError::MessageTooLarge { .. } => "MessageTooLarge",
        RunError::Comm { .. } | RunError::Finish { .. } | RunError::Collective { .. } => "Comm",
        RunError::Uncommitted { .. } => "Uncommitted",
        RunError::Optimizer { .. } => "Optimizer",
    }
}

/// Some layers' tensors, in layer order.
type Tensors = Vec<Vec<f32>>;

/// Weights `w` and momentum `v` of one stage's layers (in layer order), the iteration's
/// all-reduced gradients `g`, and the copy an undo restores.
struct Params {
    layers: Vec<usize>,
    w: Tensors,
    v: Tensors,
    g: Tensors,
    momentum: f32,
    saved: Option<(Tensors, Tensors)>,
    /// Stop inside the next step (`HangAt::Step`), for iteration `.0`.
    hang_in_step: Option<usize>,
    /// Steps undone in this iteration (reported when it fails).
    undone: usize,
}

impl Params {
    fn initial(schedule: &Schedule, stage: usize, momentum: f32) -> Params {
        let (layers, w): (Vec<usize>, Vec<Vec<f32>>) = Mlp::initial(schedule, stage).weights().into_iter().unzip();
        let zeros = || layers.iter().map(|_| vec![0f32; D * D]).collect::<Vec<_>>();
        Params { v: zeros(), g: zeros(), layers, w, momentum, saved: None, hang_in_step: None, undone: 0 }
    }

    /// The stage's compute at these weights (a fresh one every iteration: nothing of a
    /// failed iteration stays behind).
    fn mlp(&self, schedule: &Schedule, stage: usize) -> Mlp {
        let mut all = vec![Vec::new(); LAYERS];
        for (&l, w) in self.layers.iter().zip(&self.w) {
            all[l] = w.clone();
        }
        Mlp::new(schedule, stage, &all)
    }

    fn set_grads(&mut self, flat: &[f32]) {
        for (g, chunk) in self.g.iter_mut().zip(flat.chunks(D * D)) {
            g.copy_from_slice(chunk);
        }
    }

    /// The stage's state as its replicas share it: `w<layer>`, `v<layer>`, and the
    /// number of committed iterations as the revision.
    fn state(&self, committed: usize) -> SharedState {
        let mut s = SharedState::new();
        for ((l, w), v) in self.layers.iter().zip(&self.w).zip(&self.v) {
            s.insert(&format!("w{l}"), w.clone());
            s.insert(&format!("v{l}"), v.clone());
        }
        s.revision = committed as u64;
        s
    }

    /// Writes the state after `committed` iterations to `file` (whole, or not at all:
    /// written aside, then renamed): the count, then each layer's weights and momentum,
    /// little-endian.
    fn save(&self, file: &Path, committed: usize) -> Result<(), String> {
        let mut bytes = (committed as u64).to_le_bytes().to_vec();
        for (w, v) in self.w.iter().zip(&self.v) {
            bytes.extend(w.iter().chain(v).flat_map(|x| x.to_le_bytes()));
        }
        let aside = file.with_extension("partial");
        std::fs::write(&aside, &bytes)
            .and_then(|()| std::fs::rename(&aside, file))
            .map_err(|e| format!("saving {}: {e}", file.display()))
    }

    /// Reads what [`Params::save`] wrote; returns the committed iterations.
    fn restore(&mut self, file: &Path) -> Result<usize, String> {
        let bytes = std::fs::read(file).map_err(|e| format!("reading {}: {e}", file.display()))?;
        let want = 8 + self.layers.len() * 2 * D * D * 4;
        if bytes.len() != want {
            return Err(format!("{}: {} bytes, expected {want}", file.display(), bytes.len()));
        }
        let mut f32s = bytes[8..].chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        for (w, v) in self.w.iter_mut().zip(&mut self.v) {
            w.iter_mut().chain(v.iter_mut()).zip(&mut f32s).for_each(|(x, y)| *x = y);
        }
        let mut count = [0u8; 8];
        count.copy_from_slice(&bytes[..8]);
        usize::try_from(u64::from_le_bytes(count)).map_err(|e| format!("{}: {e}", file.display()))
    }

    fn load(&mut self, s: &SharedState) -> Result<usize, String> {
        for ((l, w), v) in self.layers.iter().zip(&mut self.w).zip(&mut self.v) {
            for (name, into) in [(format!("w{l}"), &mut *w), (format!("v{l}"), &mut *v)] {
                let got = s.get::<f32>(&name).filter(|g| g.len() == into.len());
                into.copy_from_slice(got.ok_or_else(|| format!("the replica's state has no {name} of {} f32", D * D))?);
            }
        }
        usize::try_from(s.revision).map_err(|e| format!("revision {}: {e}", s.revision))
    }
}

impl Optimistic for Params {
    fn step(&mut self, scale: f32) -> Result<(), StageError> {
        self.saved = Some((self.w.clone(), self.v.clone()));
        for ((w, v), g) in self.w.iter_mut().zip(&mut self.v).zip(&self.g) {
            for ((w, v), &g) in w.iter_mut().zip(v.iter_mut()).zip(g) {
                *v = self.momentum * *v + scale * g;
                *w -= LR * *v;
            }
        }
        if let Some(it) = self.hang_in_step.take() {
            emit(json!({ "event": "hanging", "iteration": it, "pass": "step", "t": now_ms() }));
            loop {
                std::thread::park();
            }
        }
        Ok(())
    }

    fn undo(&mut self) -> Result<(), StageError> {
        let (w, v) = self.saved.take().ok_or("no step to undo")?;
        (self.w, self.v) = (w, v);
        self.undone += 1;
        Ok(())
    }
}

/// Where this process runs: its grid map, its runner and its committer, for one view.
struct Placed {
    map: GridMap,
    runner: Runner,
    committer: Committer,
    /// The view's members, to tell when a loss has left it.
    members: Vec<u64>,
}

fn placed(comm: &mut Communicator, t: &Training, held: Option<Position>) -> Result<Placed, String> {
    let map = t.grid.place(comm, held).map_err(|e| format!("placing this rank on the grid: {e}"))?;
    let runner = map.runner(t.schedule.clone()).map_err(|e| format!("runner: {e}"))?;
    let committer = Committer::for_grid(&map, &runner, t.max_norm);
    let me = map.me();
    let newcomers: Vec<[usize; 2]> = map.newcomers().iter().map(|p| [p.stage, p.replica]).collect();
    emit(json!({
        "event": "placed", "stage": me.stage, "replica": me.replica, "rank": comm.rank(),
        "epoch": comm.epoch(), "pipeline": runner.pipeline_ranks(), "newcomers": newcomers, "t": now_ms(),
    }));
    Ok(Placed { map, runner, committer, members: comm.members() })
}

/// Stops the pass `at` of micro-batch `mb` (first chunk) for good, announced by a
/// `hanging` event, for a harness to kill or stop this process.
fn hang_hook(it: usize, at: Pass, mb: usize) -> phalanx::pipeline_mlp::PassHook {
    Box::new(move |pass, step: &Step| {
        if pass == at && step.mb == mb && step.chunk == 0 {
            let pass = format!("{pass:?}");
            emit(json!({ "event": "hanging", "iteration": it, "pass": pass, "mb": mb, "t": now_ms() }));
            loop {
                std::thread::park();
            }
        }
        Ok(())
    })
}

/// One iteration: the replica's pipeline, the replicas' gradient all-reduce, the step
/// on every position or none. On error `params` holds the last committed state.
fn iteration(
    comm: &mut Communicator,
    p: &Placed,
    params: &mut Params,
    t: &Training,
    it: usize,
    hang: bool,
) -> Result<Committed, RunError> {
    let me = p.map.me();
    let mut mlp = params.mlp(&t.schedule, me.stage);
    mlp.set_iteration(it * t.grid.dp + me.replica);
    params.hang_in_step = None;
    params.undone = 0;
    match t.hang.filter(|_| hang) {
        Some((_, HangAt::Pass(at, mb))) => mlp = mlp.with_hook(hang_hook(it, at, mb)),
        Some((_, HangAt::Step)) => params.hang_in_step = Some(it),
        None => {}
    }
    let executed = p.runner.run(comm, &mut mlp)?;
    executed
        .check_order(p.runner.schedule())
        .map_err(|e| RunError::Invalid(format!("iteration {it}: the executed order: {e}")))?;
    let mut flat: Vec<f32> = mlp.grads().into_iter().flat_map(|(_, g)| g).collect();
    p.map.all_reduce_gradients(comm, &mut flat, ReduceOp::Sum)?;
    params.set_grads(&flat);
    p.committer.step(comm, GradStats::of(&flat), params)
}

fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter().map(|w| w.iter().map(|x| x.to_bits()).collect()).collect()
}

fn digest(v: &[Vec<f32>]) -> String {
    hash_f32(&v.concat())
}

/// Trains from `start` until the last iteration, through losses of other positions
/// when `dp ≥ 2` or with a checkpoint (at most 3 recoveries).
pub fn train(comm: &mut Communicator, t: &Training, start: Start) -> Result<(), String> {
    let (mut p, mut params, mut it) = match start {
        Start::Holds(at) => {
            let p = placed(comm, t, Some(at))?;
            (p, Params::initial(&t.schedule, at.stage, t.momentum), 0)
        }
        Start::Join => {
            // The members' round that admitted this process counts as its first.
            comm.update_topology().map_err(|e| format!("settling the view it joined: {e}"))?;
            let p = placed(comm, t, None)?;
            let mut params = Params::initial(&t.schedule, p.map.me().stage, t.momentum);
            let it = match (&t.checkpoint, t.grid.dp) {
                (Some(dir), 1) => {
                    let it = params.restore(&checkpoint_file(dir, p.map.me()))?;
                    agree(comm, it)?;
                    it
                }
                _ => {
                    let mut state = params.state(0);
                    let received = p.map.sync_stage_state(comm, &mut state).map_err(|e| format!("catching up: {e}"))?;
                    if !received {
                        return Err("placed on the grid, but no replica's state came".into());
                    }
                    params.load(&state)?
                }
            };
            emit(json!({
                "event": "caught_up", "stage": p.map.me().stage, "replica": p.map.me().replica,
                "iteration": it, "digest": digest(&params.w), "t": now_ms(),
            }));
            (p, params, it)
        }
    };
    if let Some(dir) = &t.checkpoint {
        params.save(&checkpoint_file(dir, p.map.me()), it)?;
    }
    let (mut hung, mut recoveries) = (false, 0);
    while it < t.iterations {
        let hang = !hung && t.hang.is_some_and(|(at, ..)| at == it);
        hung |= hang;
        let me = p.map.me();
        match iteration(comm, &p, &mut params, t, it, hang) {
            Ok(done) => {
                emit(json!({
                    "event": "step", "iteration": it, "stage": me.stage, "replica": me.replica,
                    "rank": comm.rank(), "verdict": format!("{:?}", done.verdict),
                    "layers": params.layers, "weights": bits(&params.w), "momentum": bits(&params.v),
                    "digest": digest(&params.w), "momentum_digest": digest(&params.v), "t": now_ms(),
                }));
                it += 1;
                if let Some(dir) = &t.checkpoint {
                    params.save(&checkpoint_file(dir, me), it)?;
                }
            }
            Err(e) => {
                // `params` holds the last committed state again: its digests say so.
                emit(json!({
                    "event": "failed", "iteration": it, "stage": me.stage, "replica": me.replica,
                    "kind": kind(&e), "error": e.to_string(), "digest": digest(&params.w),
                    "momentum_digest": digest(&params.v), "undone": params.undone, "t": now_ms(),
                }));
                let replaceable = t.grid.dp > 1 || t.checkpoint.is_some();
                if !replaceable || !after_loss(&e) || recoveries == 3 {
                    return Err(format!("iteration {it}: {e}"));
                }
                recoveries += 1;
                p = recover(comm, t, &p, &params, it)?;
            }
        }
    }
    p.map.finish(comm).map_err(|e| format!("finishing: {e}"))
}

/// Whether `e` is how a loss reaches this rank: the communicator's `PeerLost` or
/// `Aborted` (also where another survivor, which saw the loss first, already settles
/// the view in `update_topology` while this one still ran a collective of the old one:
/// the master aborts that collective retryably).
fn after_loss(e: &RunError) -> bool {
    e.comm_error().is_some_and(settling)
}

/// The errors of a view being settled: the retryable ones (`PeerLost`, `Aborted`).
/// Each is retried until the recovery's deadline.
fn settling(e: &phalanx::Error) -> bool {
    e.is_retryable()
}

/// After a loss: settles the view without the lost peer, waits for a newcomer, places
/// every rank again (this one on the position it held) and sends the newcomer its
/// stage's state if this rank's replica is the one that serves it.
fn recover(
    comm: &mut Communicator,
    t: &Training,
    before: &Placed,
    params: &Params,
    it: usize,
) -> Result<Placed, String> {
    let deadline = Instant::now() + RECOVERY_WAIT;
    let late =
        |what: &str| if Instant::now() > deadline { Err(format!("{what} within {RECOVERY_WAIT:?}")) } else { Ok(()) };
    // Every survivor calls `update_topology` until the view has lost a member it had.
    loop {
        match comm.update_topology() {
            Ok(()) if before.members.iter().any(|m| !comm.members().contains(m)) => break,
            Ok(()) => {}
            Err(e) if settling(&e) => {}
            Err(e) => return Err(format!("settling the view after a loss: {e}")),
        }
        late("no member left the view")?;
        std::thread::sleep(Duration::from_millis(20));
    }
    let me = before.map.me();
    emit(json!({
        "event": "settled", "stage": me.stage, "replica": me.replica, "size": comm.size(),
        "epoch": comm.epoch(), "iteration": it, "t": now_ms(),
    }));
    // Admit newcomers until the grid is full again (every survivor sees them pending).
    while comm.size() < t.grid.size() {
        if comm.peers_pending() > 0 {
            match comm.update_topology() {
                Ok(()) => {}
                Err(e) if settling(&e) => {}
                Err(e) => return Err(format!("admitting a newcomer: {e}")),
            }
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
        late("no newcomer joined")?;
    }
    let p = placed(comm, t, Some(me))?;
    if t.grid.dp == 1 {
        // No replica: the newcomer restarts from the lost position's checkpoint.
        agree(comm, it)?;
    } else {
        let mut state = params.state(it);
        p.map.sync_stage_state(comm, &mut state).map_err(|e| format!("sending the stage's state: {e}"))?;
    }
    Ok(p)
}

/// Checks that every rank goes on from iteration `it` (a whole-group all-gather): a
/// newcomer's checkpoint behind the survivors' commits (its process lost between a
/// commit and its save) fails every rank alike.
fn agree(comm: &mut Communicator, it: usize) -> Result<(), String> {
    let mut all = vec![0u64; comm.size()];
    comm.all_gather(&[it as u64], &mut all).map_err(|e| format!("agreeing on the iteration to go on from: {e}"))?;
    if all.iter().any(|&a| a != it as u64) {
        return Err(format!("the ranks would go on from different iterations: {all:?}"));
    }
    Ok(())
}
