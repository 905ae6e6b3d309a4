//! `phalanx device-check`: the GPU check of issue 17 as one command. It starts a master
//! in this process and `--peers` `device-worker` processes on 127.0.0.1, each one
//! host's GPU with a 1-rank device communicator, joined by QUIC through the
//! hierarchical all-reduce; then it kills the last worker while the others are in an
//! all-reduce. It prints `PASS: …` or `FAIL: …` for each check, a JSON summary last,
//! and exits with the number of failures.
//!
//! ```text
//! phalanx device-check --backend nccl --mib 256     # on a GPU machine
//! phalanx device-check --backend standin --mib 4    # the same protocol on the CPU
//! ```

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Parser;
use phalanx::membership::master::MasterConfig;
use phalanx::Master;
use serde_json::{json, Value};

use crate::device_worker::BackendKind;
use crate::{now_ms, quic_config};

/// Options of `phalanx device-check`.
#[derive(Parser)]
pub struct DeviceCheckArgs {
    /// The device backend of every worker.
    #[arg(long, value_enum, default_value = "standin")]
    backend: BackendKind,
    /// Worker processes (hosts), at least 2: the last one is killed at the end.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(2..=8))]
    peers: u64,
    /// The GPU every worker uses (NCCL): one GPU serves every process, each a 1-rank
    /// communicator (NCCL refuses two ranks of one communicator on one GPU).
    #[arg(long, default_value_t = 0)]
    gpu: usize,
    /// MiB of f32 of each timed all-reduce.
    #[arg(long, default_value_t = 256)]
    mib: usize,
    /// Timed all-reduces.
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Give up (and fail) after this many seconds.
    #[arg(long, default_value_t = 240)]
    timeout_s: u64,
}

/// The worker processes; dropping it SIGKILLs and reaps them.
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One check's verdict, printed as it is known.
struct Verdicts {
    fails: usize,
    list: Vec<Value>,
}

impl Verdicts {
    fn check(&mut self, name: &str, ok: bool, detail: &str) {
        match ok {
            true => println!("PASS: {name}"),
            false => {
                println!("FAIL: {name} ({detail})");
                self.fails += 1;
            }
        }
        let detail = if ok { "" } else { detail };
        self.list.push(json!({ "check": name, "ok": ok, "detail": detail }));
    }
}

pub fn run(args: DeviceCheckArgs) -> Result<(), String> {
    let n = args.peers as usize;
    let config = MasterConfig { initial_peers: n, ..MasterConfig::default() };
    let master = Master::start("127.0.0.1:0".parse().map_err(|e| format!("{e}"))?, quic_config(None), config)
        .map_err(|e| format!("starting the master: {e}"))?;
    let exe = std::env::current_exe().map_err(|e| format!("this program's path: {e}"))?;
    let (tx, rx) = mpsc::channel::<(usize, Value)>();
    let mut workers = Workers(Vec::new());
    for d in 0..n {
        let mut cmd = Command::new(&exe);
        cmd.args(["device-worker", "--master", &master.addr().to_string(), "--device", &d.to_string()])
            .args(["--peers", &n.to_string(), "--gpu", &args.gpu.to_string(), "--mib", &args.mib.to_string()])
            .args(["--iters", &args.iters.to_string()])
            .arg("--backend")
            .arg(match args.backend {
                BackendKind::Standin => "standin",
                BackendKind::Nccl => "nccl",
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if d == n - 1 {
            cmd.arg("--hang");
        }
        let mut child = cmd.spawn().map_err(|e| format!("starting worker {d}: {e}"))?;
        let out = child.stdout.take().ok_or("a worker's stdout")?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line).unwrap_or_else(|_| json!({ "event": "text", "line": line }));
                if tx.send((d, v)).is_err() {
                    break;
                }
            }
            let _ = tx.send((d, json!({ "event": "closed" })));
        });
        workers.0.push(child);
    }
    drop(tx);
    let mut v = Verdicts { fails: 0, list: Vec::new() };
    let events = collect(&mut workers, &rx, &args, &mut v);
    judge(&events, &args, &mut v);
    let summary = json!({
        "backend": format!("{:?}", args.backend).to_lowercase(),
        "peers": n,
        "mib": args.mib,
        "checks": v.list,
        "fails": v.fails,
        "t": now_ms(),
    });
    println!("{summary}");
    drop(workers);
    drop(master);
    if v.fails > 0 {
        // The number of failures is the exit status, as scripts/gpu-check.sh counts them.
        std::process::exit(v.fails.min(100) as i32);
    }
    Ok(())
}

/// Every worker's events, in order, until every worker closed its output (the killed
/// one is killed once the others are inside their last all-reduce) or time ran out.
fn collect(
    workers: &mut Workers,
    rx: &mpsc::Receiver<(usize, Value)>,
    args: &DeviceCheckArgs,
    v: &mut Verdicts,
) -> BTreeMap<usize, Vec<Value>> {
    let n = args.peers as usize;
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    let mut events: BTreeMap<usize, Vec<Value>> = BTreeMap::new();
    let (mut closed, mut entering, mut hanging, mut killed) = (0, 0, false, false);
    while closed < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok((d, e)) = rx.recv_timeout(left) else {
            v.check("finished in time", false, &format!("no progress within {} s", args.timeout_s));
            break;
        };
        match e["event"].as_str() {
            Some("closed") => closed += 1,
            Some("entering") => entering += 1,
            Some("hanging") => hanging = true,
            Some("text") => eprintln!("worker {d}: {}", e["line"]),
            _ => {}
        }
        events.entry(d).or_default().push(e);
        if hanging && entering == n - 1 && !killed {
            // Let the survivors' all-reduces reach the hung peer, then kill it.
            std::thread::sleep(Duration::from_millis(300));
            let _ = workers.0[n - 1].kill();
            events.entry(n - 1).or_default().push(json!({ "event": "killed", "t": now_ms() }));
            killed = true;
        }
    }
    events
}

fn judge(events: &BTreeMap<usize, Vec<Value>>, args: &DeviceCheckArgs, v: &mut Verdicts) {
    let n = args.peers as usize;
    let empty = Vec::new();
    let of = |d: usize| events.get(&d).unwrap_or(&empty);
    let find = |d: usize, name: &str| of(d).iter().filter(|e| e["event"] == name).cloned().collect::<Vec<_>>();
    for d in 0..n {
        let cs = find(d, "collective");
        let bad: Vec<String> =
            cs.iter().filter(|c| c["ok"] != true).map(|c| format!("{}: {}", c["name"], c["detail"])).collect();
        v.check(
            &format!("worker {d}: every collective on device buffers ({})", cs.len()),
            cs.len() == 7 && bad.is_empty(),
            &bad.join("; "),
        );
        let h = find(d, "hierarchical");
        let detail = h.first().map_or("no result".to_string(), |e| e["detail"].to_string());
        v.check(
            &format!("worker {d}: hierarchical all-reduce across {n} processes"),
            h.first().is_some_and(|e| e["ok"] == true),
            &detail,
        );
    }
    let timing = find(0, "timing");
    let seconds: Vec<f64> = timing
        .first()
        .and_then(|t| t["seconds"].as_array())
        .map_or(Vec::new(), |a| a.iter().filter_map(Value::as_f64).collect());
    let best = seconds.iter().copied().fold(f64::INFINITY, f64::min);
    // busbw as nccl-tests defines it for all-reduce: bytes/time × 2(n-1)/n.
    let bytes = (args.mib << 20) as f64;
    let busbw = bytes / best * 2.0 * (n as f64 - 1.0) / n as f64 / 1e9;
    let ok = seconds.len() == args.iters && best.is_finite();
    v.check(
        &format!("busbw of a {} MiB hierarchical all-reduce: {busbw:.3} GB/s (best of {:?} s)", args.mib, seconds),
        ok,
        "no timing",
    );
    let killed_at = find(n - 1, "killed").first().and_then(|e| e["t"].as_u64());
    for d in 0..n - 1 {
        let k = find(d, "killed-peer");
        let e = k.first();
        let ok = e.is_some_and(|e| e["retryable"] == true && e["restored"] == true);
        let after = match (killed_at, e.and_then(|e| e["t"].as_u64())) {
            (Some(k), Some(t)) => format!("{} ms after the kill", t.saturating_sub(k)),
            _ => "no time".into(),
        };
        let detail = e.map_or("no result".to_string(), |e| e.to_string());
        v.check(
            &format!("worker {d}: a killed peer is a retryable error, its device buffer restored ({after})"),
            ok,
            &detail,
        );
        v.check(&format!("worker {d}: exits cleanly"), find(d, "done").len() == 1, "no `done` event");
    }
}
