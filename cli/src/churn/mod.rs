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
//!   its own (a worker's `Removed` exit, a falsely suspected peer, is allowed and counted);
//! - `master-recovery`: after each master kill (`--master-kill-every-s`), some peer
//!   completes a step within the master's down time plus the wait bound.
//!
//! The schedule is a function of the seed and the options alone (splitmix64), including
//! every target, so the same seed gives the same churn (`--dry-run` prints it).
//!
//! Children die with the harness: they are SIGKILLed and reaped when it ends or panics
//! (a drop guard), the kernel SIGKILLs them if it dies (`PR_SET_PDEATHSIG`), and SIGINT
//! or SIGTERM end the run early with a report (a second one exits at once).

mod args;
mod checks;
mod masters;
mod procs;
mod report;
mod schedule;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::process::{Child, ChildStdin, ExitStatus};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub use self::args::ChurnArgs;
use self::checks::{final_checks, spawn_verifier};
use self::procs::{sys, Src};
use self::schedule::{schedule, Thaw};
use crate::now_ms;

/// A message to the harness's loop.
enum Msg {
    /// A stdout line of a process.
    Line(Src, Value),
    /// A process closed its stdout (it exited, most likely).
    Eof(Src),
    /// The verifier recomputed a sum.
    Sum { w: usize, step: u64, members: Vec<u64>, got: String, want: String },
    /// SIGINT or SIGTERM.
    Interrupt,
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
    /// Cut off from the master through the relay (it is removed, and exits with
    /// `Removed`, when the partition outlasts the timeouts).
    Partitioned,
    /// Killed by the harness at the end of the run.
    Ended,
}

struct Worker {
    name: String,
    /// Its bound address, when it talks through the relay.
    addr: Option<std::net::SocketAddr>,
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
    /// When a partition cut it off from the masters (unix ms).
    cut_at: Option<u64>,
    /// The all-reduces in progress, oldest first: step and start time (two at once
    /// with `--async`).
    open_waits: Vec<(u64, u64)>,
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

    /// Whether a partition cut it off from the masters at some point up to `to`: a
    /// cut-off peer's collective waits for a master to rejoin (see `bound_for`).
    fn cut_before(&self, to: u64) -> bool {
        self.cut_at.is_some_and(|t| t <= to)
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
    /// Every master process started, killed ones included.
    masters: Vec<masters::MasterProc>,
    /// The primary's and the standby's addresses and processes.
    slots: Vec<masters::Slot>,
    /// The slot whose master the group follows.
    active: usize,
    /// When each master kill happened (unix ms).
    master_kills: Vec<u64>,
    /// Results of the workload mix checked, by collective (`--mix`).
    extras_checked: std::collections::BTreeMap<String, u64>,
    /// The test relay every packet crosses, with network faults on (`--loss`,
    /// `--partition-every-s`, ...).
    relay: Option<phalanx::relay::Relay>,
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

impl Drop for Harness {
    fn drop(&mut self) {
        self.kill_all(Fate::Ended);
    }
}

impl Harness {
    fn new(args: ChurnArgs) -> Harness {
        let (tx, rx) = mpsc::channel();
        let verifier = spawn_verifier(tx.clone(), args.len, args.quantize);
        Harness {
            args,
            tx,
            rx,
            verifier,
            sums_pending: 0,
            masters: Vec::new(),
            slots: Vec::new(),
            active: 0,
            master_kills: Vec::new(),
            extras_checked: Default::default(),
            relay: None,
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

    fn stop_now(&self) -> bool {
        !self.draining && (self.interrupted || self.stop_at.is_some_and(|t| Instant::now() >= t))
    }

    fn rel(&self, t: u64) -> f64 {
        (t as f64 - self.t0.unwrap_or(t) as f64) / 1e3
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
            Msg::Line(Src::Master(g), v) => self.on_master_line(g, v),
            Msg::Eof(Src::Master(g)) => self.on_master_eof(g),
            Msg::Line(Src::Worker(w), v) => self.on_event(w, v),
            Msg::Eof(Src::Worker(w)) => {
                self.workers[w].eof = true;
                self.reap(w);
            }
            Msg::Sum { w, step, members, got, want } => self.on_sum(w, step, members, got, want),
            Msg::Interrupt => {
                eprintln!("churn: interrupted, stopping");
                self.interrupted = true;
            }
        }
    }

    /// The highest step committed so far.
    fn last_step(&self) -> Option<u64> {
        self.first_commit.keys().max().copied()
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
             kills {}, freezes {}, joins {}, leaves {}, partitions {}, master kills {}, aborted {}, violations {}",
            self.last_step().map_or("-".to_string(), |s| s.to_string()),
            steps as f64 / el.max(1e-3),
            count("kill"),
            count("freeze"),
            count("join"),
            count("leave"),
            count("partition"),
            self.master_kills.len(),
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
        s += &self.master_tails();
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
    let started_masters = h.start_masters();
    if let Some(code) = interrupted(&h) {
        return Ok(code);
    }
    started_masters.map_err(|e| setup(&h, &e))?;
    if args.uses_relay() {
        h.start_relay()?;
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
            match thaw {
                Thaw::Restart => h.restart_masters()?,
                _ => h.thaw(w, thaw),
            }
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
