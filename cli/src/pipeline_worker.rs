//! `phalanx pipeline-worker`: one stage of a pipeline schedule as its own process,
//! joined to a `phalanx master` over QUIC (peer id = stage, so with the master's
//! `--initial-peers` the ranks are the stages), printing one JSON event per line.
//!
//! Each iteration runs this stage's list with [`Runner::run`], then commits with
//! [`Runner::finish`] (a barrier of the stages: phalanx's collectives commit on every
//! survivor or on none, so either every stage passes it or none does), and only then
//! steps the optimizer and reports the step. A stage lost mid-iteration fails every
//! other stage's run or commit with a typed error, which the worker prints (`failed`,
//! with the error's kind) before it exits with status 2; no stage steps.
//!
//! Modes: `mlp` trains the small MLP of `phalanx::pipeline_mlp` (8 linear layers, `B`
//! and `W` separate) with SGD and prints this stage's weights (bits and a digest) after
//! every iteration; `timed` runs passes that sleep their cost (`--unit-ms` per unit, a
//! chunk's pass of a 2-chunk schedule half of it) and stage 0 prints each iteration's
//! measured time (the longest stage span, and the makespan over all stages) against the
//! simulator's. `--hang-at IT` makes this stage stop in iteration `IT` before a pass
//! (`--hang-pass`, `--hang-mb`; the forward of micro-batch `m/2` by default) and wait to
//! be killed or stopped (announced by a `hanging` event).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use phalanx::comm::{ConnectOptions, ControlConfig};
use phalanx::pipeline_mlp::{Mlp, LAYERS};
use phalanx::sched::{by_name, simulate, Costs, Pass, RunError, Runner, Schedule, Stage, StageError, Step, Timeline};
use phalanx::workload::hash_f32;
use phalanx::{Communicator, RetryPolicy};
use serde_json::json;

use crate::{emit, now_ms, quic_config};

/// What a `pipeline-worker` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Trains the 8-layer MLP; prints this stage's weights after every iteration.
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
}

impl HangPass {
    fn pass(self) -> Pass {
        match self {
            HangPass::F => Pass::F,
            HangPass::B => Pass::B,
            HangPass::W => Pass::W,
            HangPass::Bw => Pass::BW,
        }
    }
}

/// Options of `phalanx pipeline-worker`.
#[derive(Parser)]
pub struct PipelineWorkerArgs {
    /// The master's address (start it with `--initial-peers` the number of stages).
    #[arg(long)]
    master: std::net::SocketAddr,
    /// Cluster secret; also read from PHALANX_SECRET.
    #[arg(long, env = "PHALANX_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// This process's stage: its peer id, and so its rank in the first view.
    #[arg(long)]
    stage: u64,
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
    /// `--hang-mb` (on its first chunk) and wait to be killed (announced by a `hanging`
    /// event).
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
    let stage = usize::try_from(args.stage).map_err(|e| format!("stage {}: {e}", args.stage))?;
    let runner = Runner::new(schedule.clone(), stage).map_err(|e| format!("runner: {e}"))?;
    let virtual_stages = schedule.stages() * schedule.chunks.max(1);
    if args.mode == Mode::Mlp && LAYERS % virtual_stages != 0 {
        return Err(format!("the MLP's {LAYERS} layers do not split over {virtual_stages} virtual stages"));
    }
    let options = ConnectOptions {
        peer_id: Some(args.stage),
        quic: quic_config(args.secret.as_deref()),
        control: ControlConfig {
            heartbeat_interval: Duration::from_millis(args.heartbeat_ms),
            ..ControlConfig::default()
        },
        // A lost stage fails the iteration everywhere; nothing retries in a smaller view.
        retry: RetryPolicy::Never,
        ..ConnectOptions::default()
    };
    let mut comm = Communicator::connect(args.master, options).map_err(|e| format!("join: {e}"))?;
    comm.update_topology().map_err(|e| format!("settling the first view: {e}"))?;
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
    emit(json!({ "event": "joined", "stage": stage, "schedule": schedule.name, "epoch": comm.epoch(), "t": now_ms() }));
    match args.mode {
        Mode::Mlp => {
            let hang = args
                .hang_at
                .map(|it| (it, args.hang_pass.pass(), args.hang_mb.unwrap_or(runner.schedule().microbatches / 2)));
            train(&mut comm, (&runner, stage), args.iterations, hang)
        }
        Mode::Timed => timed(&mut comm, (&runner, stage), args.iterations, Duration::from_millis(args.unit_ms)),
    }?;
    emit(json!({ "event": "done", "stage": stage, "t": now_ms() }));
    comm.leave();
    Ok(())
}

/// The kind of a run's error: the communicator's (`PeerLost`, `Aborted`) where sending,
/// receiving or the commit failed, else the runner's own.
fn kind(e: &RunError) -> &'static str {
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

/// One iteration of stage `me`: its list, then the commit. Prints a `failed` event on
/// error. (The stage is not the communicator's rank once a finished stage left.)
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

/// Trains the MLP: after each committed iteration, the SGD step and this stage's weights.
fn train(
    comm: &mut Communicator,
    (runner, me): (&Runner, usize),
    iterations: usize,
    hang: Option<(usize, Pass, usize)>,
) -> Result<(), String> {
    let schedule = runner.schedule();
    let current = Arc::new(AtomicUsize::new(0));
    let mut mlp = Mlp::initial(schedule, me);
    if let Some((it, at, mb)) = hang {
        let current = current.clone();
        mlp = mlp.with_hook(Box::new(move |pass, step: &Step| {
            if current.load(Ordering::Relaxed) == it && pass == at && step.mb == mb && step.chunk == 0 {
                let pass = format!("{pass:?}");
                emit(json!({ "event": "hanging", "iteration": it, "pass": pass, "mb": mb, "t": now_ms() }));
                loop {
                    std::thread::park();
                }
            }
            Ok(())
        }));
    }
    for it in 0..iterations {
        current.store(it, Ordering::Relaxed);
        mlp.set_iteration(it);
        iteration(comm, (runner, me), &mut mlp, it)?;
        mlp.step();
        let weights = mlp.weights();
        let all: Vec<f32> = weights.iter().flat_map(|(_, w)| w.iter().copied()).collect();
        let bits: Vec<Vec<u32>> = weights.iter().map(|(_, w)| w.iter().map(|x| x.to_bits()).collect()).collect();
        emit(json!({
            "event": "step", "iteration": it, "stage": me,
            "layers": weights.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
            "weights": bits, "digest": hash_f32(&all), "t": now_ms(),
        }));
    }
    Ok(())
}

/// Calibrated passes: each sleeps its cost (a unit per pass of a full stage, its share
/// for a chunk), nothing else.
struct Sleeper {
    unit: Duration,
    share: u32,
}

impl Sleeper {
    fn pass(&self, units: u32) -> Vec<f32> {
        std::thread::sleep(self.unit * units / self.share);
        vec![0.0; 4]
    }
}

impl Stage for Sleeper {
    type Elem = f32;
    fn input_len(&self, _: &Step) -> usize {
        4
    }
    fn output_len(&self, _: &Step) -> usize {
        4
    }
    fn forward(&mut self, _: &Step, _: &[f32]) -> Result<Vec<f32>, StageError> {
        Ok(self.pass(1))
    }
    fn backward_input(&mut self, _: &Step, _: &[f32]) -> Result<Vec<f32>, StageError> {
        Ok(self.pass(1))
    }
    fn backward_weight(&mut self, _: &Step) -> Result<(), StageError> {
        self.pass(1);
        Ok(())
    }
    fn backward(&mut self, _: &Step, _: &[f32]) -> Result<Vec<f32>, StageError> {
        Ok(self.pass(2))
    }
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
