//! `phalanx bench` as a user runs it: every collective with 2 peer processes and tiny
//! sizes, each row's result checked by the bench and its JSON report read back; the
//! `--compare` anchors' clear errors when their tools are missing; and one small
//! comparison against Open MPI (installed by .ci/run through benches/install-anchors.sh).
//! The Gloo comparison is a manual benchmark (torch takes minutes to install; see
//! docs/PERF.md).

use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

/// The bench runs one at a time: peer processes of two runs would compete for the 2 cores.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

const ALL: &str = "all-reduce,reduce-scatter,all-gather,broadcast,all-to-all,all-scan";

/// Runs `phalanx` with `args` (and `env`) to its end, in a process group of its own that
/// is SIGKILLed whole (with the peer processes it started) after `limit`.
fn phalanx(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_phalanx"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start phalanx");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait for phalanx"),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status();
            panic!("phalanx {args:?} did not end in {limit:?}");
        }
    }
}

fn json_report(path: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(path).expect("the JSON report");
    serde_json::from_str(&text).expect("JSON")
}

fn temp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("phalanx-bench-test-{}-{name}", std::process::id()))
}

fn text(out: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

const BUS_FACTOR_2: [(&str, f64); 6] = [
    ("all-reduce", 1.0),
    ("reduce-scatter", 0.5),
    ("all-gather", 0.5),
    ("broadcast", 1.0),
    ("all-to-all", 0.5),
    ("all-scan", 1.0),
];

#[test]
fn every_collective_runs_checked_with_nccl_tests_tables() {
    let _serial = serial();
    let json = temp("all.json");
    let out = phalanx(
        &[
            "bench",
            "--collectives",
            ALL,
            "--peers",
            "2",
            "--sizes",
            "4K,64K",
            "--iters",
            "1",
            "--warmup",
            "1",
            "--no-raw",
            "--recovery-peers",
            "0",
            "--json",
            json.to_str().expect("utf-8"),
        ],
        &[],
        Duration::from_secs(240),
    );
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    let report = json_report(&json);
    let _ = std::fs::remove_file(&json);
    let rows = report["collectives"].as_array().expect("collectives rows");
    assert_eq!(rows.len(), 12, "{log}");
    for (name, factor) in BUS_FACTOR_2 {
        for size in [4096, 65536] {
            let r = rows
                .iter()
                .find(|r| r["collective"] == name && r["size"] == size)
                .unwrap_or_else(|| panic!("no row for {name} {size}: {log}"));
            assert_eq!(r["checked"], true, "{name} {size}: {r}");
            assert_eq!(r["n"], 2);
            assert_eq!(r["bytes"], size, "2 parts divide every size");
            assert_eq!(r["bus_factor"].as_f64(), Some(factor), "{name}");
            assert_eq!(r["iters"], 16, "16 times --iters below 4 MiB");
            let (algbw, busbw, median) = (
                r["algbw_gbps"].as_f64().unwrap(),
                r["busbw_gbps"].as_f64().unwrap(),
                r["median_secs"].as_f64().unwrap(),
            );
            assert!(median > 0.0 && (algbw - size as f64 / median / 1e9).abs() <= 1e-9 * algbw.max(1.0), "{r}");
            assert!((busbw - algbw * factor).abs() <= 1e-12, "{r}");
            // The nccl-tests table line of this row.
            let line = format!(" {size:>11} ");
            assert!(log.contains(&format!("# {name}, 2 peer processes")), "{log}");
            assert!(log.lines().any(|l| l.starts_with(&line) && l.ends_with("ok")), "{name} {size}: {log}");
        }
    }
    // The all-reduce keeps its detailed table and JSON array.
    assert_eq!(report["allreduce"].as_array().map(Vec::len), Some(2));
    assert!(!log.contains("WRONG"), "{log}");
}

#[test]
fn compare_mpi_without_mpirun_says_what_is_missing_and_how_to_install_it() {
    let out = phalanx(
        &["bench", "--compare", "mpi", "--peers", "2", "--sizes", "4K", "--no-raw", "--recovery-peers", "0"],
        &[("PATH", "/nonexistent")],
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(err.contains("--compare mpi") && err.contains("mpicc and mpirun not found on PATH"), "{err}");
    assert!(err.contains("benches/install-anchors.sh mpi") && err.contains("openmpi-bin"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // Nothing was measured: the error comes before the first peer process.
    assert!(!String::from_utf8_lossy(&out.stdout).contains("peer processes:"), "{}", text(&out));
}

#[test]
fn compare_gloo_without_torch_says_what_is_missing_and_how_to_install_it() {
    let out = phalanx(
        &["bench", "--compare", "gloo", "--python", "/nonexistent/python3", "--peers", "2", "--sizes", "4K"],
        &[],
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(err.contains("--compare gloo") && err.contains("/nonexistent/python3 cannot run torch"), "{err}");
    assert!(err.contains("benches/install-anchors.sh gloo"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Open MPI over shared memory and over TCP, side by side with phalanx in one run: the
/// harness is built, both variants run, their results are checked and the ratios come out.
#[test]
fn compare_mpi_runs_open_mpi_side_by_side() {
    let _serial = serial();
    let json = temp("mpi.json");
    let out = phalanx(
        &[
            "bench",
            "--compare",
            "mpi",
            "--collectives",
            "all-reduce,all-scan",
            "--peers",
            "2",
            "--sizes",
            "4K",
            "--iters",
            "1",
            "--no-raw",
            "--recovery-peers",
            "0",
            "--json",
            json.to_str().expect("utf-8"),
        ],
        &[],
        Duration::from_secs(120),
    );
    let log = text(&out);
    assert!(out.status.success(), "Open MPI is installed by benches/install-anchors.sh mpi: {log}");
    let report = json_report(&json);
    let _ = std::fs::remove_file(&json);
    let anchors = report["anchors"].as_array().expect("anchor rows");
    for system in ["mpi-shm", "mpi-tcp"] {
        for coll in ["all-reduce", "all-scan"] {
            let a = anchors
                .iter()
                .find(|a| a["system"] == system && a["collective"] == coll)
                .unwrap_or_else(|| panic!("no {system} {coll}: {log}"));
            assert_eq!(a["checked"], true, "{a}");
            assert_eq!((a["n"].as_u64(), a["bytes"].as_u64()), (Some(2), Some(4096)), "{a}");
            assert!(a["busbw_gbps"].as_f64().is_some_and(|b| b > 0.0), "{a}");
        }
    }
    let ratios = report["ratios"].as_array().expect("ratios");
    assert_eq!(ratios.len(), 4, "{log}");
    for r in ratios {
        let want = r["phalanx_busbw_gbps"].as_f64().unwrap() / r["anchor_busbw_gbps"].as_f64().unwrap();
        assert!((r["ratio"].as_f64().unwrap() - want).abs() <= 1e-12 * want, "{r}");
    }
    assert!(log.contains("| phalanx / mpi-shm |") && log.contains("| phalanx / mpi-tcp |"), "{log}");
}
