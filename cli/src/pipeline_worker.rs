//! `phalanx pipeline-worker`: one stage of a pipeline schedule as its own process,
//! joined to a `phalanx master` over QUIC, printing one JSON event per line.
//!
//! `--mode mlp` trains the small MLP of `phalanx::pipeline_mlp` (8 linear layers, `B`
//! and `W` separate) on a grid of `--stages` × `--replicas` processes, SGD with
//! `--momentum`, each iteration committed on every position or none (see
//! `pipeline_train`), and prints each committed step; `--join` starts a replacement for
//! a lost position. `--mode timed` runs passes that sleep their cost (`--unit-ms` per
//! unit, a chunk's pass of a 2-chunk schedule half of it) on one pipeline (peer id =
//! stage, so with the master's `--initial-peers` the ranks are the stages), commits each
//! iteration with [`Runner::finish`] (a barrier), and stage 0 prints each iteration's
//! measured time (the longest stage span, and the makespan over all stages) against the
//! simulator's. `--hang-at IT` makes this stage stop in iteration `IT` before a pass
//! (`--hang-pass`, `--hang-mb`; the forward of micro-batch `m/2` by default) and wait to
//! be killed or stopped (announced by a `hanging` event).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use phalanx::pipeline_mlp::LAYERS;
use phalanx::sched::{by_name, simulate, Costs, Grid, Pass, Position, Runner, Schedule, Sleeper, Stage, Timeline};
use phalanx::Communicator;
use serde_json::json;

use crate::pipeline_train::{self, kind, HangAt, Start, Training, RECOVERY_WAIT};
use crate::{emit, now_ms, settling_options};

/// What a `pipeline-worker` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Trains the 8-layer MLP on a grid of stages × replicas; prints this position's
    /// weights and momentum after every committed iteration.
    Mlp,
    /// Passes that sleep their cost; stage 0 prints measured against simulated times.
    Timed,
}

/// A pass to stop before (`--hang-pass`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum HangPass {
    /// A forward.
    F,
    /// An input gradient.
    B,
    /// A weight gradient.
    W,
    /// A fused backward.
    Bw,
    /// Inside the optimistic optimizer step, after the replicas' all-reduce and after
    /// passing the gradient stats on (`mlp` only).
    Step,
}

impl HangPass {
    fn at(self, mb: usize) -> HangAt {
        match self {
            HangPass::F => HangAt::Pass(Pass::F, mb),
            HangPass::B => HangAt::Pass(Pass::B, mb),
            HangPass::W => HangAt::Pass(Pass::W, mb),
            HangPass::Bw => HangAt::Pass(Pass::BW, mb),
            HangPass::Step => HangAt::Step,
        }
    }
}

/// Options of `phalanx pipeline-worker`.
#[derive(Parser)]
pub struct PipelineWorkerArgs {
    /// The master's address (start it with `--initial-peers` stages × replicas).
    #[arg(long)]
    master: std::net::SocketAddr,
    /// Cluster secret; also read from PHALANX_SECRET.
    #[arg(long, env = "PHALANX_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// This process's stage. Its peer id is `replica × stages + stage`, and so its rank
    /// in the first view.
    #[arg(long, required_unless_present = "join")]
    stage: Option<u64>,
    /// In `mlp`, this process's replica (which pipeline of the grid).
    #[arg(long, default_value_t = 0)]
    replica: u64,
    /// In `mlp`, the data-parallel replicas of the pipeline: the grid is `--stages` ×
    /// `--replicas` processes.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// In `mlp`, join a running grid as the replacement of a lost position: take the
    /// free position and fetch its stage's state from a replica (`--replicas` ≥ 2) or
    /// from the lost position's `--checkpoint`.
    #[arg(long, conflicts_with_all = ["stage", "hang_at"])]
    join: bool,
    /// The peer id of a `--join`ing process (random by default).
    #[arg(long, requires = "join")]
    peer_id: Option<u64>,
    /// In `mlp`, the momentum of SGD (`v = μ·v + g`, `w -= lr·v`); 0 is plain SGD.
    #[arg(long, default_value_t = 0.0)]
    momentum: f32,
    /// In `mlp`, clip the global gradient norm at this (post-validated along the pipeline).
    #[arg(long)]
    max_norm: Option<f64>,
    /// In `mlp`, save this position's state to this folder at each commit; with one
    /// replica, a `--join`ing replacement restarts from the lost position's save.
    #[arg(long)]
    checkpoint: Option<std::path::PathBuf>,
    /// The schedule: 1f1b, interleaved (with --chunks), zbh1, zb2p, zbv, vhalf or vmin.
    #[arg(long, default_value = "1f1b")]
    schedule: String,
    /// Pipeline stages (processes).
    #[arg(long, default_value_t = 4)]
    stages: usize,
    /// Micro-batches per iteration.
    #[arg(long, default_value_t = 8)]
    microbatches: usize,
    /// Model chunks per stage, for the interleaved schedule.
    #[arg(long, default_value_t = 2)]
    chunks: usize,
    /// Iterations to run.
    #[arg(long, default_value_t = 3)]
    iterations: usize,
    /// What to run.
    #[arg(long, value_enum, default_value = "mlp")]
    mode: Mode,
    /// In `timed`, the milliseconds one unit of cost sleeps (every pass costs 1).
    #[arg(long, default_value_t = 20)]
    unit_ms: u64,
    /// In `mlp`, stop in this iteration before the pass `--hang-pass` of micro-batch
    /// `--hang-mb` (on its first chunk), or inside the optimizer step, and wait to be
    /// killed (announced by a `hanging` event).
    #[arg(long)]
    hang_at: Option<usize>,
    /// The pass `--hang-at` stops before.
    #[arg(long, value_enum, default_value = "f")]
    hang_pass: HangPass,
    /// The micro-batch `--hang-at` stops at [default: half the micro-batches].
    #[arg(long)]
    hang_mb: Option<usize>,
    /// Heartbeat interval.
    #[arg(long, default_value_t = phalanx::comm::DEFAULT_HEARTBEAT_MS)]
    heartbeat_ms: u64,
}

/// Runs one stage until its iterations are done or a failure.
pub fn run(args: PipelineWorkerArgs) -> Result<(), String> {
    let costs = Costs::unit();
    let schedule = by_name(&args.schedule, args.stages, args.microbatches, args.chunks, &costs, None)
        .map_err(|e| format!("schedule: {e}"))?;
    let virtual_stages = schedule.stages() * schedule.chunks.max(1);
    if args.mode == Mode::Mlp && LAYERS % virtual_stages != 0 {
        return Err(format!("the MLP's {LAYERS} layers do not split over {virtual_stages} virtual stages"));
    }
    let grid = Grid::new(args.stages, args.replicas).map_err(|e| format!("grid: {e}"))?;
    if args.mode == Mode::Timed && (args.replicas != 1 || args.join) {
        return Err("the timed mode runs one pipeline: no --replicas, no --join".into());
    }
    if args.join && args.replicas < 2 && args.checkpoint.is_none() {
        return Err("a replacement fetches its stage from a replica or a checkpoint: --join needs --replicas 2 or more, or --checkpoint".into());
    }
    let held = match args.stage {
        Some(stage) => {
            let stage = usize::try_from(stage).map_err(|e| format!("stage {stage}: {e}"))?;
            let replica = usize::try_from(args.replica).map_err(|e| format!("replica {}: {e}", args.replica))?;
            if stage >= args.stages || replica >= args.replicas {
                return Err(format!(
                    "position ({stage}, {replica}) outside a grid of {} × {}",
                    args.stages, args.replicas
                ));
            }
            Some(Position { stage, replica })
        }
        None => None,
    };
    // A loss fails the iteration everywhere; the worker settles the view itself.
    let peer_id = held.map(|p| (p.replica * args.stages + p.stage) as u64).or(args.peer_id);
    let mut options = settling_options(peer_id, args.secret.as_deref(), args.heartbeat_ms);
    if args.join {
        options = options.join_timeout(RECOVERY_WAIT);
    }
    let mut comm = Communicator::connect(args.master, options).map_err(|e| format!("join: {e}"))?;
    if !args.join {
        comm.update_topology().map_err(|e| format!("settling the first view: {e}"))?;
    }
    let hang = args.hang_at.map(|it| (it, args.hang_pass.at(args.hang_mb.unwrap_or(args.microbatches / 2))));
    let stage = held.map(|p| p.stage);
    emit(json!({
        "event": "joined", "stage": stage, "replica": held.map(|p| p.replica), "schedule": schedule.name,
        "epoch": comm.epoch(), "rank": comm.rank(), "t": now_ms(),
    }));
    match (args.mode, held) {
        (Mode::Mlp, held) => {
            let t = Training {
                schedule,
                grid,
                iterations: args.iterations,
                momentum: args.momentum,
                max_norm: args.max_norm,
                hang,
                checkpoint: args.checkpoint.clone(),
            };
            pipeline_train::train(&mut comm, &t, held.map_or(Start::Join, Start::Holds))
        }
        (Mode::Timed, Some(Position { stage, .. })) => {
            if comm.size() != args.stages || comm.rank() != stage {
                return Err(format!(
                    "joined as rank {} of {}, expected rank {stage} of {}: start the master with --initial-peers {} and give the stages 0..{}",
                    comm.rank(),
                    comm.size(),
                    args.stages,
                    args.stages,
                    args.stages
                ));
            }
            let runner = Runner::new(schedule, stage).map_err(|e| format!("runner: {e}"))?;
            timed(&mut comm, (&runner, stage), args.iterations, Duration::from_millis(args.unit_ms))
        }
        (Mode::Timed, None) => Err("the timed mode needs --stage".into()),
    }?;
    emit(json!({ "event": "done", "stage": stage, "t": now_ms() }));
    comm.leave();
    Ok(())
}

/// One timed iteration of stage `me`: its list, then the commit (a barrier of the
/// stages). Prints a `failed` event on error.
fn iteration<S: Stage + ?Sized>(
    comm: &mut Communicator,
    (runner, me): (&Runner, usize),
    stage: &mut S,
    it: usize,
) -> Result<phalanx::sched::Executed, String> {
    let done = runner.run(comm, stage).and_then(|executed| runner.finish(comm).map(|()| executed));
    let executed = done.map_err(|e| {
        emit(json!({
            "event": "failed", "iteration": it, "stage": me, "kind": kind(&e),
            "error": e.to_string(), "t": now_ms(),
        }));
        format!("iteration {it}: {e}")
    })?;
    executed.check_order(runner.schedule()).map_err(|e| format!("iteration {it}: the executed order: {e}"))?;
    Ok(executed)
}

/// The simulated makespan: the last pass's end less the first pass's start, over all
/// stages.
fn makespan(t: &Timeline) -> f64 {
    let all = t.passes.iter().flatten();
    let end = all.clone().map(|p| p.2).fold(0.0, f64::max);
    let start = all.map(|p| p.1).fold(f64::INFINITY, f64::min);
    if start.is_finite() {
        end - start
    } else {
        0.0
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Runs the calibrated passes; stage 0 prints each iteration's measured times against
/// the simulator's, then the medians (a `timed_summary` event and a text line).
fn timed(
    comm: &mut Communicator,
    (runner, me): (&Runner, usize),
    iterations: usize,
    unit: Duration,
) -> Result<(), String> {
    let schedule: &Schedule = runner.schedule();
    let sim = simulate(schedule, &Costs::unit()).map_err(|e| format!("simulating: {e}"))?;
    let u = unit.as_secs_f64() * 1e3;
    let (sim_iteration, sim_makespan) = (sim.iteration() * u, makespan(&sim) * u);
    // The stages' clocks are this host's: instants as Unix nanoseconds compare across
    // the processes.
    let (origin, unix) = (Instant::now(), SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default());
    let ns = |t: Instant| (unix + t.saturating_duration_since(origin)).as_nanos() as u64;
    let mut sleeper = Sleeper { unit, share: schedule.chunks.max(1) as u32 };
    // A stage's sleeps add up to its work, m(F+B+W) units; what they overran by is the
    // machine's wake-up latency, reported to tell it from the pipeline's own waits.
    let work_ns = sim.work * unit.as_secs_f64() * 1e9;
    let (mut iters, mut spans, mut lates) = (Vec::new(), Vec::new(), Vec::new());
    for it in 0..iterations {
        let executed = iteration(comm, (runner, me), &mut sleeper, it)?;
        let (first, last) = match (executed.passes.first(), executed.passes.last()) {
            (Some(f), Some(l)) => (ns(f.ready), ns(l.computed)),
            _ => (0, 0),
        };
        let compute: Duration = executed.passes.iter().map(|p| p.compute()).sum();
        let mine = [executed.span().as_nanos() as u64, first, last, compute.as_nanos() as u64];
        let mut all = vec![0u64; 4 * comm.size()];
        comm.all_gather(&mine, &mut all).map_err(|e| format!("gathering the times of iteration {it}: {e}"))?;
        if me != 0 {
            continue;
        }
        let stage_spans: Vec<f64> = all.chunks(4).map(|c| c[0] as f64 / 1e6).collect();
        let late: Vec<f64> = all.chunks(4).map(|c| (c[3] as f64 - work_ns) / 1e6).collect();
        let measured = stage_spans.iter().copied().fold(0.0, f64::max);
        let start = all.chunks(4).map(|c| c[1]).min().unwrap_or(0);
        let end = all.chunks(4).map(|c| c[2]).max().unwrap_or(0);
        let span = end.saturating_sub(start) as f64 / 1e6;
        emit(json!({
            "event": "timed", "iteration": it, "schedule": schedule.name,
            "measured_ms": measured, "simulated_ms": sim_iteration,
            "makespan_ms": span, "simulated_makespan_ms": sim_makespan,
            "spans_ms": stage_spans, "sleeps_late_ms": late, "t": now_ms(),
        }));
        iters.push(measured);
        spans.push(span);
        lates.push(late.iter().copied().fold(0.0, f64::max));
    }
    if me == 0 {
        let (measured, span, late) = (median(iters), median(spans), median(lates));
        emit(json!({
            "event": "timed_summary", "schedule": schedule.name, "iterations": iterations, "unit_ms": u,
            "measured_ms": measured, "simulated_ms": sim_iteration, "simulated_units": sim.iteration(),
            "makespan_ms": span, "simulated_makespan_ms": sim_makespan, "simulated_makespan_units": makespan(&sim),
            "sleeps_late_ms": late,
        }));
        println!(
            "{:<8} iteration {measured:8.1} ms, simulated {sim_iteration:8.1} ms ({} units): {:.3}x; makespan {span:8.1} ms, simulated {sim_makespan:8.1} ms: {:.3}x; sleeps late by {late:.1} ms",
            schedule.name,
            sim.iteration(),
            measured / sim_iteration,
            span / sim_makespan
        );
    }
    Ok(())
}
