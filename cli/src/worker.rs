//! `phalanx worker`: one peer of a training-like loop.
//!
//! Each step: `update_topology` (admits joiners, settles views after losses),
//! `sync_shared_state` of the model (a joiner fetches it), an all-reduce of a gradient
//! that is a deterministic function of (peer id, step), and `model += sum`. The step
//! number is the model's revision, so every member agrees on it. A failed all-reduce is
//! reported and retried at the same step over the next view.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use phalanx::comm::ConnectOptions;
use phalanx::comm::ControlConfig;
use phalanx::quant::Quantization;
use phalanx::state::SharedState;
use phalanx::state::SyncStrategy;
use phalanx::transport::shm::SharedMemory;
use phalanx::workload::{gradient, hash_f32};
use phalanx::{Communicator, Error, ReduceOp};
use serde_json::json;

use crate::mix::{self, Extra};
use crate::quic_args::QuicArgs;
use crate::{emit, now_ms, quic_config};

/// Options of `phalanx worker`.
#[derive(Parser)]
pub struct WorkerArgs {
    /// The master's address.
    #[arg(long)]
    master: SocketAddr,
    /// A standby master, tried after the primary when it is lost (repeat for several).
    #[arg(long)]
    standby_master: Vec<SocketAddr>,
    /// Cluster secret; also read from PHALANX_SECRET.
    #[arg(long, env = "PHALANX_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Where this peer accepts data links.
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: SocketAddr,
    /// QUIC settings of the links.
    #[command(flatten)]
    quic: QuicArgs,
    /// The data address other peers dial (behind a NAT or a relay); default: the bound one.
    #[arg(long)]
    advertise: Option<SocketAddr>,
    /// What carries the data links: `auto` (TCP+TLS, or QUIC with --advertise), `quic`,
    /// `tcp` (TCP+TLS) or `tcp-plain` (plaintext TCP: trusted networks only, no
    /// encryption). The control connection to the master is QUIC whatever this says.
    #[arg(long, default_value = "auto")]
    data_transport: phalanx::comm::DataTransport,
    /// Data links to workers on this host over shared memory (`auto`) or always over
    /// QUIC (`off`).
    #[arg(long, default_value_t = SharedMemory::Auto)]
    shm: SharedMemory,
    /// This peer's id (unique in the group; random by default).
    #[arg(long)]
    peer_id: Option<u64>,
    /// Steps to complete before leaving (0: run until killed).
    #[arg(long, default_value_t = 0)]
    steps: u64,
    /// Model and gradient length in f32 elements.
    #[arg(long, default_value_t = 1 << 16)]
    len: usize,
    /// Extra elements in this peer's gradient, to provoke a mismatch.
    #[arg(long, default_value_t = 0)]
    len_offset: usize,
    /// Pause between steps.
    #[arg(long, default_value_t = 0)]
    step_delay_ms: u64,
    /// All-reduce with min-max codes of this width (u8 or u16) instead of f32.
    #[arg(long)]
    quantize: Option<Quantization>,
    /// Give up after this many failed attempts in a row.
    #[arg(long, default_value_t = 10)]
    max_failures: u32,
    /// Heartbeat interval.
    #[arg(long, default_value_t = phalanx::comm::DEFAULT_HEARTBEAT_MS)]
    heartbeat_ms: u64,
    /// Overlap two all-reduces per round, as async DiLoCo overlaps a round's outer
    /// reduction with the next round's work: step S's all-reduce is started without
    /// waiting, step S+1's gradient is computed and its all-reduce started while S's is
    /// in flight, then both are waited for and applied in order. A step whose all-reduce
    /// aborted is redone (with the ones after it) once the group has settled.
    #[arg(long)]
    overlap: bool,
    /// After each step's all-reduce, run one more collective of another kind, in turn
    /// all-gather, reduce-scatter, all-scan, sparse all-reduce and a sub-group
    /// all-reduce, and report its result's hash (`extra` events) for the churn to check
    /// (see `mix`). Blocking steps only.
    #[arg(long, conflicts_with = "overlap")]
    mix: bool,
    /// Leave gracefully after the last step instead of just exiting.
    #[arg(long)]
    leave: bool,
    /// Also leave gracefully (after the current step) once a line `leave` arrives on stdin.
    #[arg(long)]
    leave_on_stdin: bool,
    /// Fault injection for the churn harness's self-test: flip one bit (the top mantissa
    /// bit of the first non-zero element: a change that adding it to the model cannot round
    /// away) of the all-reduce result of the first step >= this one that the peer
    /// completes, as if the collective had corrupted it.
    #[arg(long, hide = true)]
    perturb_at_step: Option<u64>,
}

/// Set once the all-reduce result has been perturbed (`--perturb-at-step` acts once).
static PERTURBED: AtomicBool = AtomicBool::new(false);

/// A flag that a line `leave` on stdin sets, if `enabled`.
fn leave_requests(enabled: bool) -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    if enabled {
        let set = flag.clone();
        std::thread::spawn(move || {
            for line in std::io::stdin().lines() {
                match line {
                    Ok(l) if l.trim() == "leave" => return set.store(true, Ordering::Relaxed),
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
    }
    flag
}

fn kind(e: &Error) -> &'static str {
    e.kind().name()
}

/// Whether the loop can go on after `e` (the group settles and the step is retried).
fn recoverable(e: &Error) -> bool {
    e.is_retryable()
}

fn fail(e: &Error, stage: &str) -> String {
    emit(json!({ "event": "error", "stage": stage, "kind": kind(e), "message": e.to_string(), "t": now_ms() }));
    format!("{stage}: {e}")
}

pub fn run(args: WorkerArgs) -> Result<(), String> {
    let options = ConnectOptions {
        bind: args.bind,
        advertise: args.advertise,
        data_transport: args.data_transport,
        quic: args.quic.apply(quic_config(args.secret.as_deref()))?,
        control: ControlConfig {
            heartbeat_interval: Duration::from_millis(args.heartbeat_ms),
            ..ControlConfig::default()
        },
        standby_masters: args.standby_master.clone(),
        shared_memory: args.shm,
        peer_id: args.peer_id,
        ..ConnectOptions::default()
    };
    let mut comm = Communicator::connect(args.master, options).map_err(|e| fail(&e, "join"))?;
    let id = comm.peer_id();
    emit(json!({ "event": "joined", "id": id.to_string(), "epoch": comm.epoch(), "t": now_ms() }));
    let mut state = SharedState::new();
    state.insert("model", vec![0f32; args.len]);
    let (mut done, mut failures) = (0u64, 0u32);
    let leave_requested = leave_requests(args.leave_on_stdin);
    while (args.steps == 0 || done < args.steps) && !leave_requested.load(Ordering::Relaxed) {
        let (completed, result) = match args.overlap {
            false => match step(&mut comm, &mut state, &args, id) {
                Ok(()) => (1, Ok(())),
                Err(e) => (0, Err(e)),
            },
            true => overlapped_steps(&mut comm, &mut state, &args, id),
        };
        // Steps an overlapped round completed before one of its all-reduces failed count.
        done += completed;
        if let Err(e) = result {
            if !recoverable(&e) || failures + 1 >= args.max_failures {
                return Err(fail(&e, "step"));
            }
            failures += 1;
            continue;
        }
        failures = 0;
        if args.step_delay_ms > 0 {
            std::thread::sleep(Duration::from_millis(args.step_delay_ms));
        }
    }
    emit(json!({ "event": "done", "steps": done, "t": now_ms() }));
    if args.leave || leave_requested.load(Ordering::Relaxed) {
        comm.leave();
    }
    Ok(())
}

/// Settles the group (admissions, removals) and brings this peer's model up to date;
/// returns the epoch the step runs in.
fn settle(comm: &mut Communicator, state: &mut SharedState) -> Result<u64, Error> {
    comm.update_topology()?;
    // The view this step was settled in.
    let epoch = comm.epoch();
    let report = comm.sync_shared_state(state, SyncStrategy::EnforcePopular)?;
    if report.tensors_received > 0 {
        emit(json!({ "event": "synced", "revision": state.revision, "bytes": report.bytes_received, "t": now_ms() }));
    }
    Ok(epoch)
}

/// Reports that step `step`'s all-reduce begins. (If the view moved since `settle`, the
/// library refuses to begin it, retryably, and the loop settles the new view: this peer
/// has no retry policy, see `phalanx::membership::PeerConfig::settle_view_changes`.)
fn announce(step: u64, epoch: u64) {
    emit(json!({ "event": "allreduce_start", "step": step, "epoch": epoch, "t": now_ms() }));
}

/// Adds a completed all-reduce's result to the model and reports the step (after the
/// fault `--perturb-at-step` plants, if it is due).
fn apply(
    state: &mut SharedState,
    args: &WorkerArgs,
    (step, epoch): (u64, u64),
    members: &[u64],
    sum: &mut [f32],
    ms: f64,
) -> Result<(), Error> {
    if args.perturb_at_step.is_some_and(|s| step >= s) && !PERTURBED.swap(true, Ordering::Relaxed) {
        if let Some(x) = sum.iter_mut().find(|x| **x != 0.0) {
            *x = f32::from_bits(x.to_bits() ^ (1 << 22));
        }
    }
    let model = state.get_mut::<f32>("model").ok_or_else(|| Error::InvalidArgument("no model".into()))?;
    model.iter_mut().zip(sum.iter()).for_each(|(m, g)| *m += g);
    let model_hash = hash_f32(model);
    state.revision += 1;
    emit(json!({
        "event": "step", "step": step, "epoch": epoch, "members": members.iter().map(u64::to_string).collect::<Vec<_>>(),
        "sum": hash_f32(sum), "model": model_hash, "ms": ms, "t": now_ms(),
    }));
    Ok(())
}

/// Two overlapped steps (see `--overlap`): how many completed (0 to 2), and the first
/// error, if any; every buffer is waited for and restored before it returns.
fn overlapped_steps(
    comm: &mut Communicator,
    state: &mut SharedState,
    args: &WorkerArgs,
    id: u64,
) -> (u64, Result<(), Error>) {
    let epoch = match settle(comm, state) {
        Ok(epoch) => epoch,
        Err(e) => return (0, Err(e)),
    };
    let members = comm.members();
    let first = state.revision;
    let len = args.len + args.len_offset;
    let mut pending = Vec::new();
    for step in [first, first + 1] {
        let grad = gradient(id, step, len); // the work that overlaps the all-reduce before
        announce(step, epoch);
        let started = comm.all_reduce_start(grad.clone(), ReduceOp::Sum);
        match started {
            Ok(handle) => pending.push((step, grad, Ok(handle), Instant::now())),
            Err(e) => {
                pending.push((step, grad, Err(e), Instant::now()));
                break;
            }
        }
    }
    let mut completed = 0;
    let mut first_error = None;
    // Every handle is waited for, in order, even after a failure: each returns its buffer.
    for (step, grad, handle, started) in pending {
        let (result, mut buf) = match handle {
            Ok(h) => h.wait(),
            Err(e) => (Err(e), grad.clone()),
        };
        match (result, &first_error) {
            (Ok(()), None) => {
                let ms = started.elapsed().as_secs_f64() * 1e3;
                if let Err(e) = apply(state, args, (step, epoch), &members, &mut buf, ms) {
                    first_error = Some(e);
                    continue;
                }
                completed += 1;
            }
            (Ok(()), Some(_)) => {
                // Committed after an earlier step aborted: every member saw the same two
                // outcomes, so all drop this one and redo both steps in order.
                emit(json!({ "event": "dropped_after_abort", "step": step, "epoch": epoch, "t": now_ms() }));
            }
            (Err(e), _) => {
                emit(json!({
                    "event": "attempt_failed", "step": step, "epoch": epoch, "kind": kind(&e), "message": e.to_string(),
                    "restored": buf == grad, "ms": started.elapsed().as_millis() as u64, "t": now_ms(),
                }));
                first_error.get_or_insert(e);
            }
        }
    }
    (completed, first_error.map_or(Ok(()), Err))
}

fn step(comm: &mut Communicator, state: &mut SharedState, args: &WorkerArgs, id: u64) -> Result<(), Error> {
    let epoch = settle(comm, state)?;
    let step = state.revision;
    let grad = gradient(id, step, args.len + args.len_offset);
    let mut buf = grad.clone();
    let members = comm.members();
    announce(step, epoch);
    let started = Instant::now();
    let result = match args.quantize {
        Some(q) => comm.all_reduce_quantized(&mut buf, ReduceOp::Sum, q),
        None => comm.all_reduce(&mut buf, ReduceOp::Sum),
    };
    if let Err(e) = result {
        emit(json!({
            "event": "attempt_failed", "step": step, "epoch": epoch, "kind": kind(&e), "message": e.to_string(),
            "restored": buf == grad, "ms": started.elapsed().as_millis() as u64, "t": now_ms(),
        }));
        return Err(e);
    }
    apply(state, args, (step, epoch), &members, &mut buf, started.elapsed().as_secs_f64() * 1e3)?;
    if args.mix {
        run_extra(comm, id, step)?;
    }
    Ok(())
}

/// The mix's collective after the all-reduce of `step`, reported for the churn's check.
/// A retryable failure is the loop's to handle, as any other: the step is done, and the
/// next one settles the view first.
fn run_extra(comm: &mut Communicator, id: u64, step: u64) -> Result<(), Error> {
    let extra = Extra::for_step(step);
    let (members, rank) = (comm.members(), comm.rank());
    if let Some(result) = extra.run(comm, id, step)? {
        emit(json!({
            "event": "extra", "kind": extra.name(), "step": step, "rank": rank,
            "members": members.iter().map(u64::to_string).collect::<Vec<_>>(), "hash": mix::hash(&result), "t": now_ms(),
        }));
    }
    Ok(())
}
