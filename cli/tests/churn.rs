//! `phalanx churn` end to end: a clean churn passes every invariant, a planted fault (one
//! flipped bit in one peer's all-reduce result) fails it by name, SIGINT stops it with a
//! report and no process left behind, and the same seed gives the same schedule.
//!
//! The tests run one at a time (they share two cores and heartbeat deadlines). Each
//! `phalanx churn` runs in its own process group, which a drop guard SIGKILLs when the
//! test ends, passes or panics; the kernel then kills the harness's children (they are
//! in process groups of their own, with `PR_SET_PDEATHSIG`), as
//! `sigkill_takes_children_along` checks. Every wait is bounded.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running `phalanx churn` in its own process group; dropping it SIGKILLs the group
/// (the harness and anything it started) and reaps the harness.
struct Churn {
    child: Child,
    out: mpsc::Receiver<(bool, String)>,
    json: PathBuf,
    svg: PathBuf,
}

impl Drop for Churn {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).stderr(Stdio::null()).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.json);
        let _ = std::fs::remove_file(&self.svg);
    }
}

/// What a finished run left.
struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Churn {
    fn start(name: &str, args: &[&str]) -> Churn {
        let dir = std::env::temp_dir();
        let json = dir.join(format!("phalanx-churn-{}-{name}.json", std::process::id()));
        let svg = dir.join(format!("phalanx-churn-{}-{name}.svg", std::process::id()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_phalanx"))
            .arg("churn")
            .args(args)
            .arg("--report-json")
            .arg(&json)
            .arg("--report-svg")
            .arg(&svg)
            .env_remove("PHALANX_SECRET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("start phalanx churn");
        let (tx, out) = mpsc::channel();
        for (is_out, mut pipe) in [
            (true, Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>),
            (false, Box::new(child.stderr.take().expect("stderr"))),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = pipe.read_to_string(&mut s);
                let _ = tx.send((is_out, s));
            });
        }
        Churn { child, out, json, svg }
    }

    /// Waits for the run to end (both pipes closed, then the exit), at most `limit`.
    fn finish(&mut self, started: Instant, limit: Duration) -> Outcome {
        let (mut stdout, mut stderr) = (None, None);
        while stdout.is_none() || stderr.is_none() {
            let left = limit.saturating_sub(started.elapsed());
            match self.out.recv_timeout(left) {
                Ok((true, s)) => stdout = Some(s),
                Ok((false, s)) => stderr = Some(s),
                Err(_) => panic!("phalanx churn did not finish within {limit:?}"),
            }
        }
        let status = self.child.wait().expect("wait for phalanx churn");
        let (stdout, stderr) = (stdout.unwrap_or_default(), stderr.unwrap_or_default());
        eprintln!("--- stdout\n{stdout}--- stderr\n{stderr}---");
        Outcome { status, stdout, stderr, took: started.elapsed() }
    }

    fn report(&self) -> Value {
        let text = std::fs::read_to_string(&self.json).expect("the JSON report");
        serde_json::from_str(&text).expect("a JSON report")
    }
}

/// Whether a process `pid` running phalanx still exists.
fn phalanx_alive(pid: u64) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains("phalanx"))
}

/// Every process the run started has gone (the harness killed and reaped them).
fn assert_no_leftovers(report: &Value) {
    let mut pids: Vec<u64> =
        report["workers"].as_array().expect("workers").iter().filter_map(|w| w["pid"].as_u64()).collect();
    pids.extend(report["master_pids"].as_array().expect("master pids").iter().filter_map(Value::as_u64));
    assert!(pids.len() >= 2, "no pids in the report");
    let left: Vec<u64> = pids.into_iter().filter(|&p| phalanx_alive(p)).collect();
    assert!(left.is_empty(), "processes left behind by phalanx churn: {left:?}");
}

fn invariant_held(report: &Value, name: &str) -> bool {
    report["invariants"].as_array().expect("invariants").iter().any(|i| i["name"] == name && i["held"] == true)
}

#[test]
fn clean_churn_passes() {
    let _serial = serial();
    let started = Instant::now();
    // Seed 11 schedules, in 20 s: a leave at 6.4 s, kills at 8.0 and 15.6 s (the second of
    // a joiner), joins at 9.5, 13.4 and 19.2 s, freezes at 11.3 s (3.9 s, then SIGCONT)
    // and 19.6 s (`--dry-run` prints it).
    let args = [
        "--peers",
        "4",
        "--duration-s",
        "20",
        "--seed",
        "11",
        "--kill-every-s",
        "6",
        "--join-every-s",
        "7",
        "--freeze-every-s",
        "9",
        "--leave-every-s",
        "12",
        "--len",
        "16384",
    ];
    let mut run = Churn::start("clean", &args);
    let out = run.finish(started, Duration::from_secs(150));
    assert!(out.status.success(), "a clean churn failed: {}\n{}", out.status, out.stderr);
    assert!(out.stderr.contains("all invariants held"), "{}", out.stderr);
    for col in ["kills", "freezes", "joins", "leaves", "steps completed", "aborted collectives", "recovery p99"] {
        assert!(out.stdout.contains(col), "the table has no column '{col}':\n{}", out.stdout);
    }
    let r = run.report();
    let s = &r["summary"];
    assert_eq!(r["ok"], true, "{}", r["violations"]);
    for name in ["model-agreement", "exact-sum", "wait-bound", "joiner-sync", "progress", "unexpected-exit"] {
        assert!(invariant_held(&r, name), "{name}: {}", r["invariants"]);
    }
    assert!(s["kills"].as_u64() >= Some(1), "no kill: {s}");
    assert!(s["joins"].as_u64() >= Some(1), "no join: {s}");
    assert!(s["freezes"].as_u64() >= Some(1), "no freeze: {s}");
    assert!(s["leaves"].as_u64() >= Some(1), "no leave: {s}");
    // The floor: 0.5 steps/s over 20 s would be 10; a debug build does ~10 steps/s.
    assert!(s["steps_completed"].as_u64() > Some(20), "too few steps: {s}");
    assert!(s["recovery_ms"]["p50"].as_u64().is_some(), "no recovery measured: {s}");
    assert!(
        r["timeline"].as_array().is_some_and(|t| t.iter().any(|e| e["event"] == "kill")),
        "no kill in the timeline"
    );
    let svg = std::fs::read_to_string(&run.svg).expect("the SVG report");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "not an SVG picture");
    assert_no_leftovers(&r);
    eprintln!("clean_churn_passes: {} ms", out.took.as_millis());
}

/// `--async`: each worker keeps two all-reduces in flight per round, as async DiLoCo
/// does, through kills and joins; every invariant is checked as for blocking ones, and
/// a planted fault is still caught.
#[test]
fn async_churn_passes_and_still_catches_a_planted_fault() {
    let _serial = serial();
    let started = Instant::now();
    let args = ["--async", "--peers", "4", "--duration-s", "15", "--seed", "7", "--kill-every-s", "5"];
    let args: Vec<&str> = args.into_iter().chain(["--join-every-s", "6", "--len", "16384"]).collect();
    let mut run = Churn::start("async", &args);
    let out = run.finish(started, Duration::from_secs(120));
    assert!(out.status.success(), "an async churn failed: {}\n{}", out.status, out.stderr);
    let r = run.report();
    assert_eq!(r["ok"], true, "{}", r["violations"]);
    let s = &r["summary"];
    assert!(s["kills"].as_u64() >= Some(1) && s["joins"].as_u64() >= Some(1), "no churn: {s}");
    assert!(s["steps_completed"].as_u64() > Some(20), "too few steps: {s}");
    assert_no_leftovers(&r);

    let planted = ["--async", "--peers", "3", "--duration-s", "20", "--plant-fault", "--kill-every-s", "0"];
    let planted: Vec<&str> =
        planted.into_iter().chain(["--freeze-every-s", "0", "--join-every-s", "0", "--leave-every-s", "0"]).collect();
    let mut run = Churn::start("async-planted", &planted);
    let out = run.finish(started, Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(1), "the planted fault was not caught: {}\n{}", out.status, out.stderr);
    assert_no_leftovers(&run.report());
    eprintln!("async churn: {} ms", started.elapsed().as_millis());
}

/// Network faults through the test relay: every packet of the master and the workers
/// crosses it with delay, jitter and 1 % loss, and workers are cut off from the master
/// (not from their peers) for 0.5 to 3 s at a time. The cut-off worker is removed (it
/// cannot commit anything on its own), the others go on, and every invariant holds.
/// Master kills through the run, with the master restarted on its address and with a
/// standby taking over: no step lost, repeated or diverged (the usual invariants), and
/// a step soon after every kill (`master-recovery`).
#[test]
fn master_kills_churn_passes_with_a_restart_and_with_a_standby() {
    let _serial = serial();
    for (name, standby) in [("master-restart", false), ("master-standby", true)] {
        let started = Instant::now();
        let args = ["--peers", "4", "--duration-s", "14", "--seed", "11", "--kill-every-s", "6", "--join-every-s", "5"];
        let more = ["--freeze-every-s", "0", "--master-kill-every-s", "3", "--master-down-ms", "400", "--len", "16384"];
        let mut args: Vec<&str> = args.into_iter().chain(more).collect();
        if standby {
            args.push("--standby");
        }
        let mut run = Churn::start(name, &args);
        let out = run.finish(started, Duration::from_secs(120));
        assert!(out.status.success(), "{name}: {}\n{}", out.status, out.stderr);
        let r = run.report();
        assert_eq!(r["ok"], true, "{name}: {}", r["violations"]);
        let kills = r["master_kills"].as_array().expect("master kills").len();
        assert!(kills >= 3, "{name}: {kills} master kills");
        let recoveries = r["summary"]["master_recovery_ms"].as_array().expect("recoveries").len();
        assert!(recoveries >= kills - 1, "{name}: {recoveries} recoveries of {kills} kills");
        assert!(invariant_held(&r, "master-recovery"), "{name}");
        let timeline = r["timeline"].as_array().expect("timeline");
        assert!(timeline.iter().any(|e| e["event"] == "master_restart"), "{name}: no restart");
        assert_no_leftovers(&r);
        eprintln!("{name} churn: {} in {} ms", r["summary"], out.took.as_millis());
    }
}

/// The workload mix: after every all-reduce one more collective of another kind, each
/// result recomputed and compared by the harness, through kills and joins.
#[test]
fn workload_mix_churn_passes() {
    let _serial = serial();
    let started = Instant::now();
    let args = ["--mix", "--peers", "4", "--duration-s", "12", "--seed", "4", "--kill-every-s", "5"];
    let args: Vec<&str> = args.into_iter().chain(["--join-every-s", "4", "--len", "4096"]).collect();
    let mut run = Churn::start("mix", &args);
    let out = run.finish(started, Duration::from_secs(120));
    assert!(out.status.success(), "the mix churn failed: {}\n{}", out.status, out.stderr);
    let r = run.report();
    assert_eq!(r["ok"], true, "{}", r["violations"]);
    let checked = r["summary"]["mix_checked"].as_object().expect("mix results checked");
    for kind in ["all_gather", "reduce_scatter", "all_scan", "sparse_all_reduce", "sub_group_all_reduce"] {
        assert!(checked.get(kind).and_then(Value::as_u64) > Some(3), "too few {kind} results checked: {checked:?}");
    }
    assert_no_leftovers(&r);
}

#[test]
fn network_faults_churn_passes() {
    let _serial = serial();
    let started = Instant::now();
    let args = ["--peers", "4", "--duration-s", "20", "--seed", "3", "--kill-every-s", "0", "--freeze-every-s", "0"];
    let more = ["--leave-every-s", "0", "--join-every-s", "6", "--partition-every-s", "6", "--partition-max-s", "3"];
    let net = ["--loss", "0.01", "--delay-ms", "1", "--jitter-ms", "2", "--len", "16384"];
    let args: Vec<&str> = args.into_iter().chain(more).chain(net).collect();
    let mut run = Churn::start("network", &args);
    let out = run.finish(started, Duration::from_secs(150));
    assert!(out.status.success(), "a churn with network faults failed: {}\n{}", out.status, out.stderr);
    let r = run.report();
    assert_eq!(r["ok"], true, "{}", r["violations"]);
    let s = &r["summary"];
    assert!(s["partitions"].as_u64() >= Some(1), "no partition: {s}");
    assert!(s["steps_completed"].as_u64() > Some(10), "too few steps: {s}");
    let timeline = r["timeline"].as_array().expect("timeline");
    assert!(timeline.iter().any(|e| e["event"] == "relay"), "the run did not go through the relay");
    assert!(timeline.iter().any(|e| e["event"] == "heal"), "no partition healed");
    assert_no_leftovers(&r);
    eprintln!("network faults churn: {s} in {} ms", out.took.as_millis());
}

#[test]
fn planted_fault_is_caught() {
    let _serial = serial();
    let started = Instant::now();
    let args = [
        "--peers",
        "3",
        "--duration-s",
        "30",
        "--plant-fault",
        "--kill-every-s",
        "0",
        "--freeze-every-s",
        "0",
        "--join-every-s",
        "0",
        "--leave-every-s",
        "0",
        "--len",
        "16384",
    ];
    let mut run = Churn::start("planted", &args);
    let out = run.finish(started, Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(1), "the planted fault was not caught: {}\n{}", out.status, out.stderr);
    let named = ["exact-sum", "model-agreement"];
    assert!(out.stderr.contains("FAILED") && named.iter().any(|n| out.stderr.contains(n)), "{}", out.stderr);
    let r = run.report();
    assert_eq!(r["ok"], false);
    let violated: Vec<&str> =
        r["violations"].as_array().expect("violations").iter().filter_map(|v| v["invariant"].as_str()).collect();
    // The flipped bit changes both the sum and the model (it is one that adding cannot round away).
    assert!(named.iter().all(|n| violated.contains(n)), "violations: {violated:?}");
    assert!(violated.iter().all(|v| named.contains(v)), "a clean group broke another invariant: {violated:?}");
    // It stops at the first violation (plus a second to collect the related ones).
    assert!(out.took < Duration::from_secs(30), "the run went on after the violation: {:?}", out.took);
    assert_no_leftovers(&r);
    eprintln!("planted_fault_is_caught: {violated:?} in {} ms", out.took.as_millis());
}

#[test]
fn sigint_stops_with_a_report() {
    let _serial = serial();
    let started = Instant::now();
    let mut run = Churn::start("sigint", &["--peers", "3", "--duration-s", "60", "--len", "16384"]);
    // Let the group form and run (the first SIGKILL of the schedule is at 6 s or later).
    std::thread::sleep(Duration::from_secs(8));
    let sent = Instant::now();
    let status = Command::new("kill").args(["-INT", &run.child.id().to_string()]).status().expect("run kill");
    assert!(status.success());
    let out = run.finish(started, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(130), "after SIGINT: {}\n{}", out.status, out.stderr);
    assert!(sent.elapsed() < Duration::from_secs(15), "took {:?} to stop after SIGINT", sent.elapsed());
    assert!(out.stderr.contains("interrupted"), "{}", out.stderr);
    let r = run.report();
    assert_eq!(r["interrupted"], true);
    assert_no_leftovers(&r);
}

/// The pids of the processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u64> {
    let mut kids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(parent) {
            kids.push(pid);
        }
    }
    kids
}

#[test]
fn sigkill_takes_children_along() {
    let _serial = serial();
    let started = Instant::now();
    let mut run = Churn::start("sigkill", &["--peers", "2", "--duration-s", "60", "--len", "1024"]);
    let harness = run.child.id();
    // Wait for the master and both workers.
    let mut kids = Vec::new();
    while started.elapsed() < Duration::from_secs(30) {
        kids = children_of(harness);
        if kids.len() >= 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(kids.len() >= 3, "the harness started {} processes: {kids:?}", kids.len());
    run.child.kill().expect("SIGKILL the harness"); // the harness alone, not its group
    let killed = Instant::now();
    while killed.elapsed() < Duration::from_secs(10) && kids.iter().any(|&p| phalanx_alive(p)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left: Vec<u64> = kids.iter().copied().filter(|&p| phalanx_alive(p)).collect();
    assert!(left.is_empty(), "children outlived the SIGKILLed harness: {left:?}");
    eprintln!(
        "sigkill_takes_children_along: {} children gone {} ms after the SIGKILL",
        kids.len(),
        killed.elapsed().as_millis()
    );
}

#[test]
fn same_seed_same_schedule() {
    let _serial = serial();
    let dry = |seed: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_phalanx"))
            .args(["churn", "--dry-run", "--seed", seed, "--duration-s", "120"])
            .output()
            .expect("phalanx churn --dry-run");
        assert!(out.status.success());
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let a = dry("11");
    assert_eq!(a, dry("11"), "the same seed gave another schedule");
    assert_ne!(a, dry("12"), "another seed gave the same schedule");
    for action in ["kill", "freeze", "join", "leave"] {
        assert!(a.contains(action), "no {action} in 120 s:\n{a}");
    }
}

/// `--quantize`: workers run the quantized all-reduce. Under kills and joins every
/// completed step must be bitwise the deterministic quantized ring result over its
/// members (within the error bound of the exact sum) and all models must agree; a
/// planted bit flip must still be caught.
#[test]
fn quantized_churn_passes_and_catches_a_planted_fault() {
    let _serial = serial();
    let started = Instant::now();
    let args = [
        "--peers",
        "3",
        "--duration-s",
        "15",
        "--seed",
        "11",
        "--kill-every-s",
        "6",
        "--join-every-s",
        "7",
        "--freeze-every-s",
        "0",
        "--leave-every-s",
        "0",
        "--len",
        "16384",
        "--quantize",
        "u8",
    ];
    let mut run = Churn::start("quantized", &args);
    let out = run.finish(started, Duration::from_secs(120));
    assert!(out.status.success(), "a quantized churn failed: {}\n{}", out.status, out.stderr);
    let r = run.report();
    assert_eq!(r["ok"], true, "{}", r["violations"]);
    for name in ["model-agreement", "exact-sum", "unexpected-exit"] {
        assert!(invariant_held(&r, name), "{name}: {}", r["invariants"]);
    }
    assert!(r["summary"]["kills"].as_u64() >= Some(1), "no kill: {}", r["summary"]);
    assert!(r["summary"]["steps_completed"].as_u64() > Some(10), "too few steps: {}", r["summary"]);
    assert_no_leftovers(&r);

    let started = Instant::now();
    let planted = [
        "--peers",
        "3",
        "--duration-s",
        "30",
        "--plant-fault",
        "--kill-every-s",
        "0",
        "--freeze-every-s",
        "0",
        "--join-every-s",
        "0",
        "--leave-every-s",
        "0",
        "--len",
        "16384",
        "--quantize",
        "u16",
    ];
    let mut run = Churn::start("quantized-planted", &planted);
    let out = run.finish(started, Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(1), "the planted fault was not caught: {}\n{}", out.status, out.stderr);
    let r = run.report();
    let violated: Vec<&str> =
        r["violations"].as_array().expect("violations").iter().filter_map(|v| v["invariant"].as_str()).collect();
    assert!(violated.contains(&"exact-sum"), "violations: {violated:?}");
    assert!(violated.iter().all(|v| ["exact-sum", "model-agreement"].contains(v)), "violations: {violated:?}");
    assert_no_leftovers(&r);
    eprintln!("quantized churn: {} ms", started.elapsed().as_millis());
}
