//! `phalanx device-check` on the CPU stand-in: the GPU check's protocol (worker
//! processes on 127.0.0.1, each a 1-rank device communicator, joined by QUIC through the
//! hierarchical all-reduce; every collective on device buffers; a killed worker and the
//! survivor's restored buffer) runs here exactly as `scripts/gpu-check.sh` runs it with
//! NCCL on a GPU, only the backend differs.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `phalanx args…`, SIGKILLed after `limit`; returns (success, stdout, stderr).
fn phalanx(args: &[&str], limit: Duration) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_phalanx"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("phalanx starts");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("its status") {
            break Some(s);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child.stdout.take().expect("stdout").read_to_string(&mut out).expect("utf-8");
    child.stderr.take().expect("stderr").read_to_string(&mut err).expect("utf-8");
    let status = status.unwrap_or_else(|| panic!("device-check hung past {limit:?}:\n{out}\n{err}"));
    (status.success(), out, err)
}

#[test]
fn the_gpu_check_passes_on_the_stand_in_with_three_processes() {
    let (ok, out, err) = phalanx(
        &["device-check", "--backend", "standin", "--peers", "3", "--mib", "2", "--iters", "2", "--timeout-s", "90"],
        Duration::from_secs(120),
    );
    assert!(ok, "device-check failed:\n{out}\n{err}");
    let passes: Vec<&str> = out.lines().filter(|l| l.starts_with("PASS: ")).collect();
    assert!(!out.contains("FAIL"), "{out}");
    // 2 per worker (collectives, hierarchical), busbw, 2 per survivor (error, exit).
    assert_eq!(passes.len(), 3 * 2 + 1 + 2 * 2, "{out}");
    let summary: serde_json::Value =
        serde_json::from_str(out.lines().last().expect("a summary")).expect("the summary is JSON");
    assert_eq!(summary["fails"], 0);
    assert_eq!(summary["peers"], 3);
    let killed = passes.iter().filter(|l| l.contains("a killed peer is a retryable error")).count();
    assert_eq!(killed, 2, "both survivors report the loss: {out}");
}

#[test]
fn the_nccl_backend_without_nccl_is_a_clear_failure_not_a_hang() {
    // No GPU here: either this build lacks the `nccl` feature, or no NCCL loads. Both
    // workers say why on stderr, every check fails, and the exit status counts them.
    let (ok, out, err) = phalanx(
        &["device-check", "--backend", "nccl", "--mib", "1", "--iters", "1", "--timeout-s", "60"],
        Duration::from_secs(90),
    );
    assert!(!ok, "{out}");
    assert!(
        err.contains("without its `nccl` feature")
            || err.contains("no NCCL library could be loaded")
            || err.contains("no usable CUDA driver"),
        "{err}"
    );
    assert!(out.lines().any(|l| l.starts_with("FAIL: worker 0: every collective")), "{out}");
}
