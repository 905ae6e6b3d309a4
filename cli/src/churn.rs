//! `phalanx churn`: a master and N workers on 127.0.0.1 under seeded churn (SIGKILLs,
//! SIGSTOP freezes, joins and graceful leaves), checked against the group's invariants.
//!
//! The harness reads every worker's JSON event lines (one reader thread per pipe, one
//! channel, `recv_timeout` up to the next scheduled action) and checks, as the events
//! arrive and at the end:
//!
//! - `model-agreement`: every peer that completed step S holds the same model hash;
//! - `exact-sum`: every completed all-reduce is the exact sum of the gradients of the
//!   members that took part (recomputed from the member list, in a verifier thread),
//!   and the reporter is one of them; with `--quantize`, it is bitwise the result of a
//!   fault-free quantized ring over the members in rank order (the simulator recomputes
//!   it), and that result is within the error bound `n·Δ̂` of the exact sum, where
//!   `Δ̂ = 6n / (2^bits - 1)` (each gradient's range is at most 6);
//! - `wait-bound`: no peer spends longer than the peer timeout plus a slack between its
//!   `allreduce_start` and the `step` or `attempt_failed` that ends it (a peer's own
//!   freezes excepted), nor is still waiting when checked;
//! - `joiner-sync`: every joiner that was left alone by the churn reaches a model hash
//!   some other peer also reported for the same step, within a bound;
//! - `progress`: distinct steps per second of the churn phase stay above a floor, and no
//!   stretch without a completed step is longer than a bound;
//! - `unexpected-exit`: neither the master nor a worker the churn left alone exits on
//!   its own (a worker's `Removed` exit, a falsely suspected peer, is allowed and counted).
//!
//! The schedule is a function of the seed and the options alone (splitmix64), including
//! every target, so the same seed gives the same churn (`--dry-run` prints it).
//!
//! Children die with the harness: they are SIGKILLed and reaped when it ends or panics
//! (a drop guard), the kernel SIGKILLs them if it dies (`PR_SET_PDEATHSIG`), and SIGINT
//! or SIGTERM end the run early with a report (a second one exits at once).

mod report;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use phalanx::plan::allreduce;
use phalanx::quant::{Codec, Quantization};
use phalanx::sim::{Outcome, Simulation};
use phalanx::workload::{expected_sum, gradient, hash_f32};
use phalanx::{DType, ReduceOp};
use serde_json::{json, Value};

use crate::now_ms;

/// Options of `phalanx churn`.
#[derive(Parser, Clone, Debug)]
pub struct ChurnArgs {
    /// Workers started at the beginning.
    #[arg(long, default_value_t = 5)]
    peers: usize,
    /// Length of the churn phase, which starts once the first workers formed a group
    /// [default: 60, unless --steps is given].
    #[arg(long, conflicts_with = "steps")]
    duration_s: Option<f64>,
    /// Run the churn phase until the group has completed this many steps (at most --timeout-s).
    #[arg(long)]
    steps: Option<u64>,
    /// With --steps: the longest the churn phase may last.
    #[arg(long, default_value_t = 600.0)]
    timeout_s: f64,
    /// Seed of the churn schedule: the same seed gives the same schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Model (and gradient) size in f32 elements.
    #[arg(long, default_value_t = 1 << 16)]
    len: usize,
    /// Mean interval between SIGKILLs of a random worker (0: none); each interval is
    /// drawn uniformly from 0.5 to 1.5 times the mean, likewise below.
    #[arg(long, default_value_t = 12.0)]
    kill_every_s: f64,
    /// Mean interval between SIGSTOPs of a random worker (0: none).
    #[arg(long, default_value_t = 20.0)]
    freeze_every_s: f64,
    /// A freeze lasts from 0.5 s to this long, then the worker gets SIGKILL or SIGCONT
    /// (a coin flip; a resumed worker usually finds it was removed, and exits).
    #[arg(long, default_value_t = 4.0)]
    freeze_max_s: f64,
    /// Mean interval between new workers (0: none).
    #[arg(long, default_value_t = 7.0)]
    join_every_s: f64,
    /// Mean interval between graceful leaves of a random worker (0: none).
    #[arg(long, default_value_t = 25.0)]
    leave_every_s: f64,
    /// Kills, freezes and leaves never take the number of workers the churn has not
    /// touched below this.
    #[arg(long, default_value_t = 2)]
    min_peers: usize,
    /// Joins never take the number of workers the churn has not touched above this
    /// [default: twice --peers].
    #[arg(long)]
    max_peers: Option<usize>,
    /// Overlapped (non-blocking) all-reduces in the workers: not implemented, rejected.
    #[arg(long = "async")]
    async_mode: bool,
    /// Invariant `progress`: distinct steps per second of the churn phase must stay above this.
    #[arg(long, default_value_t = 0.5)]
    min_steps_per_s: f64,
    /// Invariant `progress`: no stretch of the churn phase without a completed step may last longer.
    #[arg(long, default_value_t = 15.0)]
    max_stall_s: f64,
    /// Invariant `joiner-sync`: a joiner must reach the group's model within this long of its start.
    #[arg(long, default_value_t = 20.0)]
    join_bound_s: f64,
    /// The master's peer timeout: a peer silent this long is removed.
    #[arg(long, default_value_t = phalanx::membership::master::DEFAULT_PEER_TIMEOUT_MS)]
    peer_timeout_ms: u64,
    /// Invariant `wait-bound`: an all-reduce may take the peer timeout plus this long.
    #[arg(long, default_value_t = 3000)]
    slack_ms: u64,
    /// The workers' heartbeat interval.
    #[arg(long, default_value_t = phalanx::membership::client::DEFAULT_HEARTBEAT_MS)]
    heartbeat_ms: u64,
    /// The workers' pause between steps.
    #[arg(long, default_value_t = 0)]
    step_delay_ms: u64,
    /// Self-test: start one more worker at the beginning of the churn phase that flips a
    /// bit of its first all-reduce result; the run must fail `exact-sum` and `model-agreement`.
    #[arg(long)]
    plant_fault: bool,
    /// Workers all-reduce with min-max codes of this width (u8 or u16); `exact-sum` then
    /// checks bit equality with the deterministic quantized result and its error bound.
    #[arg(long)]
    quantize: Option<Quantization>,
    /// Go on after a violation (the default stops the run a second after the first one).
    #[arg(long)]
    keep_going: bool,
    /// Print the schedule the seed gives, and exit.
    #[arg(long)]
    dry_run: bool,
    /// Where to write the JSON report.
    #[arg(long, default_value = "churn-report.json")]
    report_json: PathBuf,
    /// Where to write the SVG picture of membership size and step rate over time.
    #[arg(long, default_value = "churn-report.svg")]
    report_svg: PathBuf,
}

impl ChurnArgs {
    fn duration(&self) -> Option<f64> {
        match (self.duration_s, self.steps) {
            (Some(d), _) => Some(d),
            (None, Some(_)) => None,
            (None, None) => Some(60.0),
        }
    }

    /// How far the schedule must reach.
    fn horizon_s(&self) -> f64 {
        self.duration().unwrap_or(self.timeout_s)
    }

    fn max_peers(&self) -> usize {
        self.max_peers.unwrap_or(2 * self.peers)
    }

    fn wait_bound_ms(&self) -> u64 {
        self.peer_timeout_ms + self.slack_ms
    }

    fn validate(&self) -> Result<(), String> {
        if self.async_mode {
            return Err("--async is not implemented: the worker runs blocking all-reduces only (it has no \
                        overlapped mode over Communicator::all_reduce_start yet)"
                .into());
        }
        if self.peers == 0 {
            return Err("--peers must be at least 1".into());
        }
        if self.min_peers == 0 {
            return Err("--min-peers must be at least 1: the group's state lives in its members".into());
        }
        if self.len == 0 {
            return Err("--len must be at least 1".into());
        }
        let every = [self.kill_every_s, self.freeze_every_s, self.join_every_s, self.leave_every_s];
        if every.iter().any(|v| !v.is_finite() || *v < 0.0) {
            return Err("the --*-every-s intervals must be finite and >= 0".into());
        }
        if every.iter().any(|v| *v > 0.0 && *v < 0.1) {
            return Err("the --*-every-s intervals must be 0 (none) or at least 0.1 s".into());
        }
        if !(self.freeze_max_s.is_finite() && self.freeze_max_s >= 0.5) {
            return Err("--freeze-max-s must be at least 0.5".into());
        }
        if !(self.horizon_s().is_finite() && self.horizon_s() > 0.0) {
            return Err("--duration-s and --timeout-s must be positive".into());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The schedule

/// splitmix64: a small, seedable PRNG (no crate needed).
#[derive(Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Kill,
    Freeze,
    Join,
    Leave,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Kill => "kill",
            Action::Freeze => "freeze",
            Action::Join => "join",
            Action::Leave => "leave",
        }
    }
}

/// What follows a freeze.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Thaw {
    Kill,
    Cont,
}

#[derive(Clone, Debug)]
struct Planned {
    /// Milliseconds after the churn phase began.
    at_ms: u64,
    action: Action,
    /// Index of the worker (`w<index>`): acted on, or started by a join.
    target: usize,
    /// Freezes: how long, and what then.
    freeze: Option<(u64, Thaw)>,
}

impl Planned {
    fn to_json(&self) -> Value {
        let mut v = json!({ "at_ms": self.at_ms, "action": self.action.name(), "target": format!("w{}", self.target) });
        if let Some((ms, thaw)) = self.freeze {
            v["freeze_ms"] = json!(ms);
            v["then"] = json!(if thaw == Thaw::Kill { "kill" } else { "cont" });
        }
        v
    }

    fn describe(&self) -> String {
        let mut s = format!("+{:>7.3}s {:<6} w{}", self.at_ms as f64 / 1e3, self.action.name(), self.target);
        if let Some((ms, thaw)) = self.freeze {
            s += &format!(" for {ms} ms, then {}", if thaw == Thaw::Kill { "SIGKILL" } else { "SIGCONT" });
        }
        s
    }
}

/// The whole schedule up to `horizon_s`, targets included: the workers are `w0..` in the
/// order they start, and the plan tracks which ones the churn has not touched yet. Each
/// action kind has its own stream of times, so a longer horizon only appends.
fn schedule(args: &ChurnArgs, horizon_s: f64) -> Vec<Planned> {
    let horizon_ms = (horizon_s * 1e3) as u64;
    let mut times: Vec<(u64, Action)> = Vec::new();
    for (k, (every, action)) in [
        (args.kill_every_s, Action::Kill),
        (args.freeze_every_s, Action::Freeze),
        (args.join_every_s, Action::Join),
        (args.leave_every_s, Action::Leave),
    ]
    .into_iter()
    .enumerate()
    {
        if every <= 0.0 {
            continue;
        }
        let mut rng = SplitMix64(args.seed ^ (0xA076_1D64_78BD_642F_u64.wrapping_mul(k as u64 + 1)));
        let mut t = 0.0;
        loop {
            t += every * (0.5 + rng.unit());
            let at = (t * 1e3) as u64;
            if at >= horizon_ms {
                break;
            }
            times.push((at, action));
        }
    }
    // Same time: a fixed order of kinds (stable sort keeps the push order).
    times.sort_by_key(|&(at, _)| at);

    let mut rng = SplitMix64(args.seed ^ 0xE703_7ED1_A0B4_28DB);
    // Workers the churn has not touched, in start order.
    let mut untouched: Vec<usize> = (0..args.peers).collect();
    let mut next = args.peers;
    let mut plan = Vec::new();
    for (at_ms, action) in times {
        if action == Action::Join {
            if untouched.len() < args.max_peers() {
                plan.push(Planned { at_ms, action, target: next, freeze: None });
                untouched.push(next);
                next += 1;
            }
            continue;
        }
        if untouched.len() <= args.min_peers {
            continue;
        }
        let target = untouched.remove(rng.below(untouched.len()));
        let freeze = (action == Action::Freeze).then(|| {
            let ms = (500.0 + rng.unit() * (args.freeze_max_s * 1e3 - 500.0)) as u64;
            (ms, if rng.next_u64() & 1 == 0 { Thaw::Kill } else { Thaw::Cont })
        });
        plan.push(Planned { at_ms, action, target, freeze });
    }
    plan
}

// ---------------------------------------------------------------------------------------
// Signals and process control (Linux/Unix system calls, declared here: no libc crate)

#[cfg(unix)]
mod sys {
    use std::os::raw::c_int;
    use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

    pub const SIGKILL: c_int = 9;
    pub const SIGINT: c_int = 2;
    pub const SIGTERM: c_int = 15;
    pub const SIGCONT: c_int = 18;
    pub const SIGSTOP: c_int = 19;

    extern "C" {
        fn kill(pid: c_int, sig: c_int) -> c_int;
        fn signal(signum: c_int, handler: usize) -> usize;
        fn write(fd: c_int, buf: *const u8, count: usize) -> isize;
        fn _exit(status: c_int) -> !;
        #[cfg(target_os = "linux")]
        fn prctl(option: c_int, ...) -> c_int;
    }

    /// Sends `sig` to process `pid`.
    pub fn send(pid: u32, sig: c_int) -> bool {
        // SAFETY: kill(2) has no memory effects; pid is one of our children.
        unsafe { kill(pid as c_int, sig) == 0 }
    }

    /// Makes the calling (forked, not yet exec'd) child get SIGKILL when its parent dies.
    /// Only async-signal-safe calls: it runs between fork and exec.
    pub fn die_with_parent(parent: u32) -> std::io::Result<()> {
        #[cfg(target_os = "linux")]
        {
            const PR_SET_PDEATHSIG: c_int = 1;
            // SAFETY: prctl(PR_SET_PDEATHSIG, sig) only sets a flag of this process.
            if unsafe { prctl(PR_SET_PDEATHSIG, SIGKILL as std::os::raw::c_ulong) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl: then nobody would kill us. (No
            // allocation here: another thread may have held the allocator's lock at fork.)
            if std::os::unix::process::parent_id() != parent {
                const ESRCH: i32 = 3;
                return Err(std::io::Error::from_raw_os_error(ESRCH));
            }
        }
        let _ = parent;
        Ok(())
    }

    static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);
    static SIGNALS: AtomicU32 = AtomicU32::new(0);

    extern "C" fn on_signal(_sig: c_int) {
        // Async-signal-safe only: atomics, write(2), _exit(2).
        if SIGNALS.fetch_add(1, Ordering::SeqCst) >= 1 {
            // SAFETY: _exit ends the process at once; the kernel kills the children
            // (PR_SET_PDEATHSIG).
            unsafe { _exit(130) }
        }
        let fd = SIGNAL_FD.load(Ordering::SeqCst);
        if fd >= 0 {
            let byte = 1u8;
            // SAFETY: writes one byte from a live local to a socket this process owns.
            unsafe { write(fd, &byte, 1) };
        }
    }

    /// Routes SIGINT and SIGTERM to a byte on `fd` (the first) or an immediate exit (the second).
    pub fn catch_interrupts(fd: c_int) {
        SIGNAL_FD.store(fd, Ordering::SeqCst);
        let handler = on_signal as extern "C" fn(c_int) as usize;
        // SAFETY: the handler only makes async-signal-safe calls.
        unsafe {
            signal(SIGINT, handler);
            signal(SIGTERM, handler);
        }
    }
}

#[cfg(not(unix))]
mod sys {
    pub const SIGKILL: i32 = 9;
    pub const SIGCONT: i32 = 18;
    pub const SIGSTOP: i32 = 19;
    pub fn send(_pid: u32, _sig: i32) -> bool {
        false
    }
    pub fn die_with_parent(_parent: u32) -> std::io::Result<()> {
        Ok(())
    }
}

/// A message to the harness's loop.
enum Msg {
    /// A stdout line of a process (`None`: the master).
    Line(Option<usize>, Value),
    /// A process closed its stdout (it exited, most likely).
    Eof(Option<usize>),
    /// The verifier recomputed a sum.
    Sum { w: usize, step: u64, members: Vec<u64>, got: String, want: String },
    /// SIGINT or SIGTERM.
    Interrupt,
}

/// A stdout reader that sends each JSON line (anything else as `{"event": "?"}`).
fn read_lines(src: Option<usize>, out: impl std::io::Read + Send + 'static, tx: Sender<Msg>) {
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let v = serde_json::from_str(&line).unwrap_or_else(|_| json!({ "event": "?", "line": line }));
            if tx.send(Msg::Line(src, v)).is_err() {
                return;
            }
        }
        let _ = tx.send(Msg::Eof(src));
    });
}

/// Keeps the last lines of a stderr pipe, for failure messages.
fn keep_tail(err: impl std::io::Read + Send + 'static) -> Arc<Mutex<VecDeque<String>>> {
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let sink = tail.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            let mut t = sink.lock().unwrap_or_else(|p| p.into_inner());
            if t.len() == 8 {
                t.pop_front();
            }
            t.push_back(line);
        }
    });
    tail
}

/// `phalanx <args>` as a child that dies with this process, stdio piped.
fn spawn_child(args: &[String]) -> Result<Child, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the phalanx executable: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id();
        // Its own process group: a Ctrl-C in the terminal reaches the harness only, which
        // then stops the run and its children itself.
        cmd.process_group(0);
        // SAFETY: the closure only makes async-signal-safe system calls (prctl, getppid)
        // and does not allocate.
        unsafe {
            cmd.pre_exec(move || sys::die_with_parent(parent));
        }
    }
    cmd.spawn().map_err(|e| format!("cannot start `phalanx {}`: {e}", args.join(" ")))
}

// ---------------------------------------------------------------------------------------
// State

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Initial,
    Joiner,
    Planted,
}

/// What the churn did to a worker.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Fate {
    Untouched,
    Killed,
    Frozen,
    /// Frozen, then SIGKILLed.
    FrozenKilled,
    /// Frozen, then SIGCONTed.
    Resumed,
    Leaving,
    /// Killed by the harness at the end of the run.
    Ended,
}

struct Worker {
    name: String,
    role: Role,
    child: Child,
    stdin: Option<ChildStdin>,
    pid: u32,
    spawned_t: u64,
    id: Option<u64>,
    joined_t: Option<u64>,
    fate: Fate,
    /// SIGSTOP and SIGCONT times (unix ms); the last may be open.
    frozen: Vec<(u64, Option<u64>)>,
    /// The all-reduce in progress: step and start time.
    open_wait: Option<(u64, u64)>,
    /// The open wait was already reported as too long.
    open_wait_reported: bool,
    steps: u64,
    failures: u64,
    first_step_t: Option<u64>,
    /// A step whose model some other peer also reported: (step, time).
    agreed: Option<(u64, u64)>,
    error: Option<Value>,
    eof: bool,
    status: Option<ExitStatus>,
    exit_t: Option<u64>,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl Worker {
    fn frozen_during(&self, from: u64, to: u64) -> bool {
        self.frozen.iter().any(|&(stop, cont)| stop <= to && cont.is_none_or(|c| c >= from))
    }

    fn is_frozen(&self) -> bool {
        self.frozen.last().is_some_and(|&(_, cont)| cont.is_none())
    }

    fn running(&self) -> bool {
        self.status.is_none()
    }
}

/// A committed step, as one peer reported it.
struct StepRec {
    w: usize,
    step: u64,
    epoch: u64,
    members: Vec<u64>,
    t: u64,
}

/// One harness action, as it happened.
struct Done {
    t: u64,
    action: &'static str,
    w: usize,
    /// The worker's id, if it had joined.
    id: Option<u64>,
    /// Freezes: when the SIGCONT came, if it did.
    resumed: Option<u64>,
}

#[derive(Clone, Debug)]
struct Violation {
    invariant: &'static str,
    message: String,
    t: u64,
}

struct Harness {
    args: ChurnArgs,
    tx: Sender<Msg>,
    rx: Receiver<Msg>,
    verifier: Sender<(usize, u64, Vec<u64>, String)>,
    /// Sums sent to the verifier and not back yet.
    sums_pending: usize,
    master: Option<Child>,
    master_addr: Option<String>,
    master_stderr: Option<Arc<Mutex<VecDeque<String>>>>,
    master_eof: bool,
    workers: Vec<Worker>,
    /// step -> (model hash, first reporter).
    models: HashMap<u64, (String, usize)>,
    /// step -> time it was first committed (unix ms).
    first_commit: HashMap<u64, u64>,
    /// The most members a step was completed over.
    max_members: usize,
    steps: Vec<StepRec>,
    timeline: Vec<Value>,
    done: Vec<Done>,
    violations: Vec<Violation>,
    violation_count: usize,
    waits_ms: Vec<u64>,
    aborted: u64,
    sums_checked: u64,
    interrupted: bool,
    /// Reading what is left after the run: nothing stops the pump but its condition.
    draining: bool,
    /// When the run stops after a violation: a second after the first, to collect the
    /// violations that come with it (another peer's report of the same step).
    stop_at: Option<Instant>,
    /// Start of the churn phase (unix ms).
    t0: Option<u64>,
}

/// The hash of the quantized ring all-reduce of `members`' gradients (in rank order) as
/// a fault-free group computes it, or why it is not acceptable: outside the error bound
/// `n·Δ̂` of the exact sum, `Δ̂ = 6n / (2^bits - 1)` (every gradient's range is at most 6,
/// so no partial sum's range exceeds `6n`; see `tests/quantized.rs`).
fn quantized_expectation(members: &[u64], step: u64, len: usize, q: Quantization) -> String {
    let n = members.len();
    let bufs: Vec<Vec<u8>> =
        members.iter().map(|&id| bytemuck::cast_slice(&gradient(id, step, len)).to_vec()).collect();
    let plans: Vec<_> = (0..n).map(|r| allreduce::ring(r, n, len)).collect();
    let sim = Simulation {
        chunk_bytes: phalanx::exec::DEFAULT_CHUNK_BYTES,
        link_capacity: 16,
        codec: Some(Codec::new(q)),
        ..Simulation::new(DType::F32, ReduceOp::Sum)
    };
    let out = match sim.run(&plans, bufs).into_iter().next() {
        Some(Outcome::Done(b)) => bytemuck::allocation::pod_collect_to_vec::<u8, f32>(&b),
        other => return format!("the simulated quantized all-reduce ended {other:?}"),
    };
    let exact = expected_sum(members, step, len);
    let bound = n as f64 * 6.0 * n as f64 / q.levels() as f64 + 8.0 * (n * n) as f64 * f32::EPSILON as f64;
    let err = out.iter().zip(&exact).map(|(a, b)| (*a as f64 - *b as f64).abs()).fold(0.0, f64::max);
    if err > bound {
        return format!("an error of {err} beyond the bound {bound}");
    }
    hash_f32(&out)
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.kill_all(Fate::Ended);
    }
}

impl Harness {
    fn new(args: ChurnArgs) -> Harness {
        let (tx, rx) = mpsc::channel();
        let (verifier, jobs) = mpsc::channel::<(usize, u64, Vec<u64>, String)>();
        let (results, len, quantize) = (tx.clone(), args.len, args.quantize);
        std::thread::spawn(move || {
            let mut cache: HashMap<(Vec<u64>, u64), String> = HashMap::new();
            for (w, step, members, got) in jobs {
                let want = match quantize {
                    None => {
                        let mut sorted = members.clone();
                        sorted.sort_unstable(); // the sum is exact: order does not matter
                        cache.entry((sorted, step)).or_insert_with_key(|(m, s)| hash_f32(&expected_sum(m, *s, len)))
                    }
                    // The quantized result depends on the ring order: the members' rank order.
                    Some(q) => cache
                        .entry((members.clone(), step))
                        .or_insert_with_key(|(m, s)| quantized_expectation(m, *s, len, q)),
                }
                .clone();
                if results.send(Msg::Sum { w, step, members, got, want }).is_err() {
                    return;
                }
            }
        });
        Harness {
            args,
            tx,
            rx,
            verifier,
            sums_pending: 0,
            master: None,
            master_addr: None,
            master_stderr: None,
            master_eof: false,
            workers: Vec::new(),
            models: HashMap::new(),
            first_commit: HashMap::new(),
            max_members: 0,
            steps: Vec::new(),
            timeline: Vec::new(),
            done: Vec::new(),
            violations: Vec::new(),
            violation_count: 0,
            waits_ms: Vec::new(),
            aborted: 0,
            sums_checked: 0,
            interrupted: false,
            draining: false,
            stop_at: None,
            t0: None,
        }
    }

    fn violate(&mut self, invariant: &'static str, message: String) {
        self.violation_count += 1;
        if !self.args.keep_going {
            self.stop_at.get_or_insert_with(|| Instant::now() + Duration::from_secs(1));
        }
        if self.violations.len() < 100 {
            eprintln!("churn: VIOLATION {invariant}: {message}");
            self.violations.push(Violation { invariant, message, t: now_ms() });
        }
    }

    fn stop_now(&self) -> bool {
        !self.draining && (self.interrupted || self.stop_at.is_some_and(|t| Instant::now() >= t))
    }

    fn rel(&self, t: u64) -> f64 {
        (t as f64 - self.t0.unwrap_or(t) as f64) / 1e3
    }

    fn start_master(&mut self) -> Result<(), String> {
        let args = ["master", "--listen", "127.0.0.1:0", "--peer-timeout-ms", &self.args.peer_timeout_ms.to_string()];
        let mut child = spawn_child(&args.map(String::from))?;
        read_lines(None, child.stdout.take().expect("piped"), self.tx.clone()); // ok: spawned with Stdio::piped()
        self.master_stderr = Some(keep_tail(child.stderr.take().expect("piped"))); // ok: spawned with Stdio::piped()
        self.master = Some(child);
        Ok(())
    }

    fn start_worker(&mut self, role: Role, perturb_at: Option<u64>) -> Result<usize, String> {
        let w = self.workers.len();
        let master = self.master_addr.clone().ok_or("no master address")?;
        let mut args: Vec<String> = vec!["worker".into(), "--master".into(), master];
        for (k, v) in [
            ("--len", self.args.len as u64),
            ("--heartbeat-ms", self.args.heartbeat_ms),
            ("--step-delay-ms", self.args.step_delay_ms),
            ("--max-failures", 20),
        ] {
            args.extend([k.to_string(), v.to_string()]);
        }
        if let Some(q) = self.args.quantize {
            args.extend(["--quantize".into(), q.to_string()]);
        }
        args.push("--leave-on-stdin".into());
        if let Some(s) = perturb_at {
            args.extend(["--perturb-at-step".into(), s.to_string()]);
        }
        let mut child = spawn_child(&args)?;
        read_lines(Some(w), child.stdout.take().expect("piped"), self.tx.clone()); // ok: spawned with Stdio::piped()
        let stderr = keep_tail(child.stderr.take().expect("piped")); // ok: spawned with Stdio::piped()
        let name = if role == Role::Planted { "fault".to_string() } else { format!("w{w}") };
        let pid = child.id();
        let t = now_ms();
        self.timeline.push(json!({ "t": t, "source": "harness", "event": "spawn", "worker": name, "pid": pid }));
        self.workers.push(Worker {
            name,
            role,
            stdin: child.stdin.take(),
            child,
            pid,
            spawned_t: t,
            id: None,
            joined_t: None,
            fate: Fate::Untouched,
            frozen: Vec::new(),
            open_wait: None,
            open_wait_reported: false,
            steps: 0,
            failures: 0,
            first_step_t: None,
            agreed: None,
            error: None,
            eof: false,
            status: None,
            exit_t: None,
            stderr,
        });
        Ok(w)
    }

    /// SIGKILLs and reaps every process still running (first noting those that exited
    /// on their own).
    fn kill_all(&mut self, fate: Fate) {
        for w in 0..self.workers.len() {
            self.reap(w);
        }
        for w in &mut self.workers {
            if w.status.is_none() {
                let _ = w.child.kill();
                if let Ok(s) = w.child.wait() {
                    w.status = Some(s);
                    w.exit_t = Some(now_ms());
                    if w.fate == Fate::Untouched {
                        w.fate = fate.clone();
                    }
                }
            }
        }
        if let Some(m) = &mut self.master {
            let _ = m.kill();
            let _ = m.wait();
        }
    }

    /// Processes messages until `until` holds (true), or `deadline` passes or the run must
    /// stop (false).
    fn pump(&mut self, deadline: Instant, until: &dyn Fn(&Harness) -> bool) -> bool {
        loop {
            if until(self) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline || self.stop_now() {
                return false;
            }
            match self.rx.recv_timeout(deadline - now) {
                Ok(msg) => self.handle(msg),
                Err(RecvTimeoutError::Timeout) => return false,
                Err(RecvTimeoutError::Disconnected) => unreachable!("the harness holds a sender"),
            }
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Line(None, v) => {
                if v["event"] == "listening" {
                    self.master_addr = v["addr"].as_str().map(String::from);
                }
            }
            Msg::Eof(None) => {
                self.master_eof = true;
                if self.t0.is_some() && !self.draining {
                    let tail = self.master_stderr.as_ref().map(|t| t.lock().unwrap_or_else(|p| p.into_inner()).clone());
                    self.violate("unexpected-exit", format!("the master exited; its stderr: {tail:?}"));
                }
            }
            Msg::Line(Some(w), v) => self.on_event(w, v),
            Msg::Eof(Some(w)) => {
                self.workers[w].eof = true;
                self.reap(w);
            }
            Msg::Sum { w, step, members, got, want } => {
                self.sums_pending -= 1;
                self.sums_checked += 1;
                if got != want {
                    let name = self.workers[w].name.clone();
                    self.violate(
                        "exact-sum",
                        format!(
                            "{name}'s all-reduce of step {step} over {members:?} gave hash {got}, but the {} \
                             of those members' gradients hashes to {want}",
                            if self.args.quantize.is_some() { "quantized sum" } else { "exact sum" }
                        ),
                    );
                }
            }
            Msg::Interrupt => {
                eprintln!("churn: interrupted, stopping");
                self.interrupted = true;
            }
        }
    }

    /// Notes the exit of worker `w` if it has exited; a closed stdout comes just before.
    fn reap(&mut self, w: usize) {
        let wk = &mut self.workers[w];
        if wk.status.is_some() {
            return;
        }
        let status = match wk.child.try_wait() {
            Ok(Some(s)) => s,
            // It closed stdout but runs on: look again at the next tick.
            _ => return,
        };
        wk.status = Some(status);
        wk.exit_t = Some(now_ms());
        wk.stdin = None;
        let t = now_ms();
        let (name, fate) = (wk.name.clone(), wk.fate.clone());
        let kind = wk.error.as_ref().and_then(|e| e["kind"].as_str()).unwrap_or("").to_string();
        self.timeline.push(json!({
            "t": t, "source": name, "event": "exit", "status": status.to_string(), "fate": format!("{fate:?}"),
        }));
        if fate == Fate::Untouched && kind != "Removed" && self.t0.is_some() {
            let tail =
                self.workers[w].stderr.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect::<Vec<_>>();
            let err = self.workers[w].error.clone().unwrap_or(Value::Null);
            self.violate(
                "unexpected-exit",
                format!("{name}, which the churn left alone, exited ({status}); its error: {err}; stderr: {tail:?}"),
            );
        }
    }

    fn on_event(&mut self, w: usize, v: Value) {
        let t = v["t"].as_u64().unwrap_or_else(now_ms);
        let event = v["event"].as_str().unwrap_or("?").to_string();
        let name = self.workers[w].name.clone();
        let u = |k: &str| v[k].as_u64();
        match event.as_str() {
            "joined" => {
                let wk = &mut self.workers[w];
                wk.id = v["id"].as_str().and_then(|s| s.parse().ok());
                wk.joined_t = Some(t);
            }
            "allreduce_start" => {
                let wk = &mut self.workers[w];
                wk.open_wait = Some((u("step").unwrap_or(0), t));
                wk.open_wait_reported = false;
            }
            "attempt_failed" => {
                self.aborted += 1;
                self.workers[w].failures += 1;
                self.close_wait(w, t, "attempt_failed");
            }
            "step" => {
                self.close_wait(w, t, "step");
                self.on_step(w, &v, t);
            }
            "error" => self.workers[w].error = Some(v.clone()),
            _ => {}
        }
        if event != "allreduce_start" && event != "step" {
            let mut e = v;
            e["source"] = json!(name);
            self.timeline.push(e);
        }
    }

    /// The end of worker `w`'s all-reduce at `t`: checks its wait against the bound.
    fn close_wait(&mut self, w: usize, t: u64, how: &str) {
        let Some((step, start)) = self.workers[w].open_wait.take() else { return };
        let waited = t.saturating_sub(start);
        if self.workers[w].frozen_during(start, t) {
            return; // its own freeze: not a wait
        }
        self.waits_ms.push(waited);
        let bound = self.args.wait_bound_ms();
        if waited > bound && !self.workers[w].open_wait_reported {
            let name = self.workers[w].name.clone();
            self.violate(
                "wait-bound",
                format!(
                    "{name} waited {waited} ms in its all-reduce of step {step} (from allreduce_start to {how}), \
                     more than the bound of {bound} ms (peer timeout {} ms + slack {} ms)",
                    self.args.peer_timeout_ms, self.args.slack_ms
                ),
            );
        }
    }

    /// Reports any all-reduce still open longer than the bound (and a second to deliver its
    /// end) on a running, unfrozen worker: a hang.
    fn check_open_waits(&mut self) {
        let now = now_ms();
        let bound = self.args.wait_bound_ms();
        for w in 0..self.workers.len() {
            let wk = &self.workers[w];
            let Some((step, start)) = wk.open_wait else { continue };
            // A worker the harness has SIGKILLed is not hanging, even before its exit is
            // reaped (on a loaded machine that can take seconds): its wait ends with it.
            let killed = matches!(wk.fate, Fate::Killed | Fate::FrozenKilled | Fate::Ended);
            if !wk.running() || killed || wk.is_frozen() || wk.open_wait_reported || wk.frozen_during(start, now) {
                continue;
            }
            let waited = now.saturating_sub(start);
            if waited > bound + 1000 {
                self.workers[w].open_wait_reported = true;
                let name = self.workers[w].name.clone();
                self.violate(
                    "wait-bound",
                    format!(
                        "{name} has been in its all-reduce of step {step} for {waited} ms, more than the bound of \
                         {bound} ms (peer timeout {} ms + slack {} ms)",
                        self.args.peer_timeout_ms, self.args.slack_ms
                    ),
                );
            }
        }
    }

    fn on_step(&mut self, w: usize, v: &Value, t: u64) {
        let name = self.workers[w].name.clone();
        let (Some(step), Some(epoch), Some(sum), Some(model), Some(members)) = (
            v["step"].as_u64(),
            v["epoch"].as_u64(),
            v["sum"].as_str(),
            v["model"].as_str(),
            v["members"]
                .as_array()
                .map(|m| m.iter().filter_map(|x| x.as_str()?.parse::<u64>().ok()).collect::<Vec<_>>()),
        ) else {
            self.violate("exact-sum", format!("{name} reported a malformed step: {v}"));
            return;
        };
        let wk = &mut self.workers[w];
        wk.steps += 1;
        wk.first_step_t.get_or_insert(t);
        if let Some(id) = wk.id {
            if !members.contains(&id) {
                self.violate("exact-sum", format!("{name} (id {id}) reported step {step} of members {members:?}"));
            }
        }
        match self.models.get(&step) {
            None => {
                self.models.insert(step, (model.to_string(), w));
            }
            Some((m, first)) if m != model => {
                let (m, first) = (m.clone(), self.workers[*first].name.clone());
                self.violate(
                    "model-agreement",
                    format!("after step {step}, {name} holds model {model} but {first} holds {m}"),
                );
            }
            Some((_, first)) => {
                let first = *first;
                if first != w {
                    for k in [w, first] {
                        self.workers[k].agreed.get_or_insert((step, t));
                    }
                }
            }
        }
        let first = self.first_commit.entry(step).or_insert(t);
        *first = (*first).min(t);
        self.max_members = self.max_members.max(members.len());
        self.steps.push(StepRec { w, step, epoch, members: members.clone(), t });
        self.sums_pending += 1;
        let _ = self.verifier.send((w, step, members, sum.to_string()));
    }

    /// The highest step committed so far.
    fn last_step(&self) -> Option<u64> {
        self.first_commit.keys().max().copied()
    }

    /// Carries out one planned action.
    fn act(&mut self, p: &Planned) -> Result<(), String> {
        let t = now_ms();
        if p.action == Action::Join {
            let w = self.start_worker(Role::Joiner, None)?;
            debug_assert_eq!(self.workers[w].name, format!("w{}", p.target));
            self.done.push(Done { t, action: "join", w, id: None, resumed: None });
            self.timeline.push(json!({ "t": t, "source": "harness", "event": "join", "target": self.workers[w].name }));
            return Ok(());
        }
        let w = p.target;
        let Some(wk) = self.workers.get_mut(w) else { return Ok(()) };
        if !wk.running() {
            let name = wk.name.clone();
            self.timeline.push(json!({
                "t": t, "source": "harness", "event": "skipped", "action": p.action.name(), "target": name,
                "reason": "already exited",
            }));
            return Ok(());
        }
        let id = wk.id;
        match p.action {
            Action::Kill => {
                let _ = wk.child.kill();
                wk.fate = Fate::Killed;
            }
            Action::Freeze => {
                sys::send(wk.pid, sys::SIGSTOP);
                wk.fate = Fate::Frozen;
                wk.frozen.push((t, None));
            }
            Action::Leave => {
                if let Some(stdin) = &mut wk.stdin {
                    let _ = stdin.write_all(b"leave\n").and_then(|_| stdin.flush());
                }
                wk.fate = Fate::Leaving;
            }
            Action::Join => unreachable!(),
        }
        let name = wk.name.clone();
        self.done.push(Done { t, action: p.action.name(), w, id, resumed: None });
        let mut e = json!({ "t": t, "source": "harness", "event": p.action.name(), "target": name, "pid": self.workers[w].pid });
        if let Some(id) = id {
            e["id"] = json!(id.to_string());
        }
        if let Some((ms, thaw)) = p.freeze {
            e["freeze_ms"] = json!(ms);
            e["then"] = json!(if thaw == Thaw::Kill { "kill" } else { "cont" });
        }
        self.timeline.push(e);
        Ok(())
    }

    /// Ends the freeze of worker `w`.
    fn thaw(&mut self, w: usize, thaw: Thaw) {
        let t = now_ms();
        let wk = &mut self.workers[w];
        if !wk.running() {
            return;
        }
        if let Some(last) = wk.frozen.last_mut() {
            last.1.get_or_insert(t);
        }
        match thaw {
            Thaw::Kill => {
                let _ = wk.child.kill();
                wk.fate = Fate::FrozenKilled;
            }
            Thaw::Cont => {
                sys::send(wk.pid, sys::SIGCONT);
                wk.fate = Fate::Resumed;
                if let Some(d) = self.done.iter_mut().rev().find(|d| d.w == w && d.action == "freeze") {
                    d.resumed = Some(t);
                }
            }
        }
        let name = self.workers[w].name.clone();
        let event = if thaw == Thaw::Kill { "freeze_kill" } else { "cont" };
        self.timeline.push(json!({ "t": t, "source": "harness", "event": event, "target": name }));
    }

    /// The progress line.
    fn progress(&self, churn_started: Instant) {
        let el = churn_started.elapsed().as_secs_f64();
        let t0 = self.t0.unwrap_or(0);
        let steps = self.first_commit.values().filter(|&&t| t >= t0).count();
        let members = self.steps.last().map_or(0, |s| s.members.len());
        let alive = self.workers.iter().filter(|w| w.running() && !w.is_frozen()).count();
        let count = |a: &str| self.done.iter().filter(|d| d.action == a).count();
        eprintln!(
            "churn +{el:>5.1}s: step {}, {steps} steps ({:.1}/s), {members} members, {alive} workers running, \
             kills {}, freezes {}, joins {}, leaves {}, aborted {}, violations {}",
            self.last_step().map_or("-".to_string(), |s| s.to_string()),
            steps as f64 / el.max(1e-3),
            count("kill"),
            count("freeze"),
            count("join"),
            count("leave"),
            self.aborted,
            self.violation_count,
        );
    }

    fn dump(&self) -> String {
        let mut s = String::new();
        for w in &self.workers {
            let tail = w.stderr.lock().unwrap_or_else(|p| p.into_inner());
            s += &format!(
                "  {} pid {} id {:?} fate {:?} steps {} status {:?} error {} stderr {:?}\n",
                w.name,
                w.pid,
                w.id,
                w.fate,
                w.steps,
                w.status.map(|s| s.to_string()),
                w.error.clone().unwrap_or(Value::Null),
                tail
            );
        }
        if let Some(m) = &self.master_stderr {
            s += &format!("  master stderr {:?}\n", m.lock().unwrap_or_else(|p| p.into_inner()));
        }
        s
    }
}

// ---------------------------------------------------------------------------------------
// The run

/// `phalanx churn`.
pub fn run(args: ChurnArgs) -> Result<(), String> {
    args.validate()?;
    if args.dry_run {
        println!(
            "churn schedule: seed {}, {} peers, {:.1} s (times from the start of the churn phase)",
            args.seed,
            args.peers,
            args.horizon_s()
        );
        for p in schedule(&args, args.horizon_s()) {
            println!("{}", p.describe());
        }
        return Ok(());
    }
    let code = run_churn(args)?;
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

/// Runs the churn and reports; the exit code. Every child is dead when it returns.
fn run_churn(args: ChurnArgs) -> Result<i32, String> {
    let plan = schedule(&args, args.horizon_s());
    let mut h = Harness::new(args.clone());
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
        let tx = h.tx.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut ours = ours;
            let mut b = [0u8; 1];
            while ours.read(&mut b).is_ok_and(|n| n > 0) {
                if tx.send(Msg::Interrupt).is_err() {
                    return;
                }
            }
        });
        sys::catch_interrupts(theirs.as_raw_fd());
        std::mem::forget(theirs); // the handler writes to it until the process exits
    }

    let setup = |h: &Harness, what: &str| format!("setup failed: {what}\n{}", h.dump());
    let interrupted = |h: &Harness| {
        h.interrupted.then(|| {
            eprintln!("churn: interrupted during setup");
            130
        })
    };
    h.start_master()?;
    h.pump(Instant::now() + Duration::from_secs(30), &|h| h.master_addr.is_some() || h.master_eof);
    if let Some(code) = interrupted(&h) {
        return Ok(code);
    }
    if h.master_addr.is_none() {
        return Err(setup(&h, "the master did not report its address within 30 s"));
    }
    let first = h.start_worker(Role::Initial, None)?;
    h.pump(Instant::now() + Duration::from_secs(30), &|h| h.workers[first].id.is_some() || h.workers[first].eof);
    if let Some(code) = interrupted(&h) {
        return Ok(code);
    }
    if h.workers[first].id.is_none() {
        return Err(setup(&h, "w0 did not join within 30 s"));
    }
    for _ in 1..args.peers {
        h.start_worker(Role::Initial, None)?;
    }
    let peers = args.peers;
    let formed = |h: &Harness| h.max_members >= peers;
    h.pump(Instant::now() + Duration::from_secs(60), &formed);
    if let Some(code) = interrupted(&h) {
        return Ok(code);
    }
    if !formed(&h) && !h.stop_now() {
        return Err(setup(&h, &format!("the {peers} initial workers did not complete a step together within 60 s")));
    }

    // The churn phase.
    let started = Instant::now();
    let t0 = now_ms();
    h.t0 = Some(t0);
    h.timeline.push(json!({ "t": t0, "source": "harness", "event": "churn_start", "step": h.last_step() }));
    eprintln!(
        "churn: {} workers formed a group at step {}; churning for {}",
        peers,
        h.last_step().unwrap_or(0),
        match (args.duration(), args.steps) {
            (Some(d), _) => format!("{d} s"),
            (None, Some(s)) => format!("{s} steps (at most {} s)", args.timeout_s),
            (None, None) => unreachable!(),
        }
    );
    if args.plant_fault {
        // It joins the running group: its first step is at least the current one.
        let from = h.last_step().map_or(0, |s| s + 1);
        h.start_worker(Role::Planted, Some(from))?;
    }
    let end = started + Duration::from_secs_f64(args.horizon_s());
    let target_steps = args.steps.map(|s| h.last_step().map_or(0, |l| l + 1) + s);
    let mut next = 0; // index into plan
    let mut thaws: Vec<(Instant, usize, Thaw)> = Vec::new();
    let mut tick = started + Duration::from_secs(5);
    loop {
        if h.stop_now() {
            break;
        }
        if let Some(target) = target_steps {
            if h.last_step().is_some_and(|l| l + 1 >= target) {
                break;
            }
        }
        let now = Instant::now();
        if now >= end {
            break;
        }
        while next < plan.len() && started + Duration::from_millis(plan[next].at_ms) <= now {
            let p = plan[next].clone();
            next += 1;
            h.act(&p)?;
            if let Some((ms, thaw)) = p.freeze {
                thaws.push((now + Duration::from_millis(ms), p.target, thaw));
            }
        }
        thaws.sort_by_key(|&(at, _, _)| at);
        while thaws.first().is_some_and(|&(at, _, _)| at <= now) {
            let (_, w, thaw) = thaws.remove(0);
            h.thaw(w, thaw);
        }
        if now >= tick {
            h.check_open_waits();
            for w in 0..h.workers.len() {
                if h.workers[w].eof {
                    h.reap(w);
                }
            }
            h.progress(started);
            tick += Duration::from_secs(5);
        }
        let mut wake = end.min(tick);
        if let Some(p) = plan.get(next) {
            wake = wake.min(started + Duration::from_millis(p.at_ms));
        }
        if let Some(&(at, _, _)) = thaws.first() {
            wake = wake.min(at);
        }
        if let Some(at) = h.stop_at {
            wake = wake.min(at);
        }
        if let Ok(msg) = h.rx.recv_timeout(wake.saturating_duration_since(Instant::now())) {
            h.handle(msg);
        }
    }
    let t_end = now_ms();
    let elapsed = started.elapsed().as_secs_f64();
    h.check_open_waits();
    h.timeline.push(json!({ "t": t_end, "source": "harness", "event": "churn_end" }));

    // Stop everything, read what is left in the pipes, and let the verifier finish.
    // A run stopped early by a violation is not judged on progress and joiners.
    let cut_short = h.stop_now();
    h.kill_all(Fate::Ended);
    h.draining = true;
    h.pump(Instant::now() + Duration::from_secs(5), &|h| h.workers.iter().all(|w| w.eof));
    if !h.pump(Instant::now() + Duration::from_secs(300), &|h| h.sums_pending == 0) {
        eprintln!("churn: {} sums were not verified in time", h.sums_pending);
    }

    let summary = final_checks(&mut h, t0, t_end, elapsed, cut_short);
    let report = report::build(&h, &plan, &summary);
    let mut failures = Vec::new();
    if let Err(e) = std::fs::write(&args.report_json, serde_json::to_string_pretty(&report).unwrap_or_default()) {
        failures.push(format!("cannot write {}: {e}", args.report_json.display()));
    }
    if let Err(e) = std::fs::write(&args.report_svg, report::svg(&h, &summary)) {
        failures.push(format!("cannot write {}: {e}", args.report_svg.display()));
    }
    println!("{}", report::table(&h, &summary));
    println!("report: {} and {}", args.report_json.display(), args.report_svg.display());
    for f in &failures {
        eprintln!("churn: {f}");
    }
    if h.violation_count > 0 {
        let names: BTreeSet<&str> = h.violations.iter().map(|v| v.invariant).collect();
        eprintln!(
            "churn: FAILED: {} violation(s) of invariant(s) {}; first: {}: {}",
            h.violation_count,
            names.into_iter().collect::<Vec<_>>().join(", "),
            h.violations[0].invariant,
            h.violations[0].message
        );
        return Ok(1);
    }
    if summary.interrupted {
        eprintln!("churn: interrupted: no violation seen, but the run did not finish");
        return Ok(130);
    }
    if !failures.is_empty() {
        return Ok(2);
    }
    eprintln!("churn: all invariants held");
    Ok(0)
}

/// Figures of the run, for the table, the JSON report and the picture.
pub(crate) struct Summary {
    pub t0: u64,
    pub t_end: u64,
    pub elapsed_s: f64,
    pub steps_completed: usize,
    pub peer_steps: usize,
    pub throughput: f64,
    pub max_stall_ms: u64,
    pub recovery_ms: Vec<u64>,
    pub unrecovered: usize,
    pub join_ms: Vec<u64>,
    pub spurious_removals: usize,
    pub interrupted: bool,
}

/// The checks that need the whole run: progress, joiners; and the figures.
fn final_checks(h: &mut Harness, t0: u64, t_end: u64, elapsed_s: f64, cut_short: bool) -> Summary {
    let args = h.args.clone();
    let mut commits: Vec<u64> = h.first_commit.values().copied().filter(|&t| t >= t0 && t <= t_end).collect();
    commits.sort_unstable();
    let steps_completed = commits.len();
    let span_s = ((t_end - t0) as f64 / 1e3).max(1e-3);
    let throughput = steps_completed as f64 / span_s;
    let mut max_stall_ms = 0;
    let mut last = t0;
    for &t in commits.iter().chain(std::iter::once(&t_end)) {
        max_stall_ms = max_stall_ms.max(t.saturating_sub(last));
        last = t;
    }
    let interrupted = h.interrupted;
    if !cut_short {
        if throughput < args.min_steps_per_s {
            h.violate(
                "progress",
                format!(
                    "{steps_completed} steps in {span_s:.1} s: {throughput:.2} steps/s, below the floor of {} steps/s",
                    args.min_steps_per_s
                ),
            );
        }
        if let Some(want) = args.steps {
            if (steps_completed as u64) < want {
                h.violate(
                    "progress",
                    format!("{steps_completed} of {want} steps completed within --timeout-s {} s", args.timeout_s),
                );
            }
        }
        if max_stall_ms as f64 > args.max_stall_s * 1e3 {
            h.violate(
                "progress",
                format!("no step completed for {max_stall_ms} ms, more than the bound of {} s", args.max_stall_s),
            );
        }
    }

    // Recovery: from a kill or freeze of a member to the first step another peer completes
    // without it (or, after a SIGCONT before its removal, after the SIGCONT).
    let mut recovery_ms = Vec::new();
    let mut unrecovered = 0;
    for d in h.done.iter().filter(|d| d.action == "kill" || d.action == "freeze") {
        let Some(id) = d.id else { continue };
        let found = h
            .steps
            .iter()
            .filter(|s| s.w != d.w && s.t >= d.t)
            .find(|s| !s.members.contains(&id) || d.resumed.is_some_and(|r| s.t >= r));
        match found {
            Some(s) => recovery_ms.push(s.t - d.t),
            None if t_end.saturating_sub(d.t) > args.wait_bound_ms() + 1000 => unrecovered += 1,
            None => {}
        }
    }

    // Joiners: each one the churn left alone for --join-bound-s must have reached a model
    // some other peer also reported for the same step.
    let bound_ms = (args.join_bound_s * 1e3) as u64;
    let mut join_ms = Vec::new();
    let mut late = Vec::new();
    for (i, w) in h.workers.iter().enumerate().filter(|(_, w)| w.role == Role::Joiner) {
        match w.agreed {
            Some((_, t)) => join_ms.push(t.saturating_sub(w.spawned_t)),
            None => {
                // Touched by the churn before the bound: no verdict.
                let touched_at = h.done.iter().find(|d| d.w == i && d.action != "join").map(|d| d.t);
                let until = touched_at.unwrap_or(t_end).min(w.exit_t.unwrap_or(u64::MAX));
                if until.saturating_sub(w.spawned_t) > bound_ms {
                    late.push(format!("{} (started at +{:.1} s, {} steps)", w.name, h.rel(w.spawned_t), w.steps));
                }
            }
        }
    }
    if !late.is_empty() && !cut_short {
        h.violate(
            "joiner-sync",
            format!(
                "joiner(s) {} did not reach a model hash another peer reported for the same step within {} s",
                late.join(", "),
                args.join_bound_s
            ),
        );
    }
    let spurious_removals = h
        .workers
        .iter()
        .filter(|w| w.fate == Fate::Untouched && w.error.as_ref().is_some_and(|e| e["kind"] == "Removed"))
        .count();
    Summary {
        t0,
        t_end,
        elapsed_s,
        steps_completed,
        peer_steps: h.steps.iter().filter(|s| s.t >= t0).count(),
        throughput,
        max_stall_ms,
        recovery_ms,
        unrecovered,
        join_ms,
        spurious_removals,
        interrupted,
    }
}

/// Nearest-rank percentile of `v` (sorted or not).
pub(crate) fn percentile(v: &[u64], p: f64) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    Some(s[rank.min(s.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> ChurnArgs {
        let mut v = vec!["churn"];
        v.extend(extra);
        ChurnArgs::try_parse_from(v).expect("args")
    }

    #[test]
    fn same_seed_same_schedule() {
        let a = args(&["--seed", "7"]);
        let p1: Vec<String> = schedule(&a, 60.0).iter().map(Planned::describe).collect();
        let p2: Vec<String> = schedule(&a, 60.0).iter().map(Planned::describe).collect();
        assert_eq!(p1, p2);
        let p3: Vec<String> = schedule(&args(&["--seed", "8"]), 60.0).iter().map(Planned::describe).collect();
        assert_ne!(p1, p3);
        // A longer horizon only appends.
        let long: Vec<String> = schedule(&a, 120.0).iter().map(Planned::describe).collect();
        assert_eq!(&long[..p1.len()], &p1[..]);
    }

    #[test]
    fn schedule_keeps_min_peers() {
        let a = args(&["--peers", "3", "--kill-every-s", "1", "--join-every-s", "0", "--min-peers", "2"]);
        let p = schedule(&a, 60.0);
        assert_eq!(p.len(), 1, "only one kill keeps 2 of 3: {:?}", p);
    }

    #[test]
    fn percentiles() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[5, 1, 3], 50.0), Some(3));
        assert_eq!(percentile(&[5, 1, 3], 99.0), Some(5));
    }
}
