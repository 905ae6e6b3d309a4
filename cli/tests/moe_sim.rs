//! `phalanx moe-sim` and `moe-bench` from the command line: the table's figures agree
//! with each other and with what FSDP and EP must move and hold, the ratios are the
//! table's, the run repeats from its seed, calibration catches a shifting router, the
//! bench runs both strategies, and bad flags get a typed refusal.

use std::collections::HashMap;
use std::process::Command;

fn phalanx(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_phalanx")).args(args).output().expect("run phalanx");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// The figures after `prefix` on the line that starts with it.
fn numbers(out: &str, prefix: &str) -> Vec<f64> {
    let line = out.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no line {prefix:?} in\n{out}"));
    line[prefix.len()..]
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter_map(|w| w.trim_end_matches('x').parse::<f64>().ok())
        .collect()
}

fn close(a: f64, b: f64, tolerance: f64) -> bool {
    (a - b).abs() <= tolerance
}

#[test]
fn the_table_is_consistent() {
    let (devices, experts, tokens, slots) = (4.0, 8.0, 500.0, 2.0);
    let args = [
        "moe-sim",
        "--devices",
        "4",
        "--experts",
        "8",
        "--tokens",
        "500",
        "--iterations",
        "6",
        "-t",
        "2",
        "-m",
        "2",
        "--expert-bytes",
        "1048576",
        "--per-device",
        "--backups",
    ];
    let (ok, out, err) = phalanx(&args);
    assert!(ok, "{err}");
    // straggler, imbalance, param, token, traffic, max device traffic, memory.
    let rows: HashMap<&str, Vec<f64>> = ["EP ", "FSDP ", "FSSDP "].into_iter().map(|s| (s, numbers(&out, s))).collect();
    for (name, r) in &rows {
        assert_eq!(r.len(), 7, "{name}: {r:?}\n{out}");
        assert!(close(r[2] + r[3], r[4], 0.11), "{name}: traffic is params plus tokens\n{out}");
        assert!(r[5] <= r[4] + 0.05, "{name}: no device receives more than all\n{out}");
        assert!(r[0] >= tokens - 0.05 && close(r[1], r[0] / tokens, 0.006), "{name}: straggler over the mean\n{out}");
    }
    let (ep, fsdp, fssdp) = (&rows["EP "], &rows["FSDP "], &rows["FSSDP "]);
    // FSDP: every device computes its own tokens, gathers the 6 experts it does not
    // own and receives 3 gradients of each of its 2: 2·E·(D-1) experts of 1 MiB in all.
    assert_eq!(fsdp[0], tokens);
    assert_eq!((fsdp[2], fsdp[3]), (2.0 * experts * (devices - 1.0), 0.0));
    assert_eq!(fsdp[6], experts);
    // EP moves no parameters and holds only its own experts.
    assert_eq!((ep[2], ep[6]), (0.0, experts / devices));
    // FSSDP: at most m extra experts per device; its straggler is no worse than EP's.
    assert!(fssdp[6] <= experts / devices + slots && fssdp[0] <= ep[0], "{out}");
    // Each device's tokens add up to all tokens, under every strategy.
    for name in ["EP", "FSDP", "FSSDP"] {
        let per_device = numbers(&out, &format!("{name} tokens per device:"));
        assert_eq!(per_device.len(), 4);
        assert!(close(per_device.iter().sum::<f64>(), devices * tokens, 2.0), "{name}: {per_device:?}");
    }
    // The ratios are the table's.
    let straggler = numbers(&out, "FSSDP/EP straggler:");
    assert!(close(straggler[0], fssdp[0] / ep[0], 0.002), "{straggler:?}\n{out}");
    let traffic = numbers(&out, "FSSDP/FSDP traffic:");
    assert!(close(traffic[0], fssdp[4] / fsdp[4], 0.005), "{traffic:?}\n{out}");
    // Backups: every expert's reduced gradient to its backup, 8 experts of 1 MiB; two
    // backed-up experts on each device.
    let backups = numbers(&out, "backups:");
    assert_eq!(backups[0], experts, "{out}");
    assert!(close(backups[1], experts / fssdp[4], 0.002) && backups[2] == 2.0, "{backups:?}\n{out}");
    // The same seed, the same table.
    let (_, again, _) = phalanx(&args);
    assert_eq!(out, again);
}

#[test]
fn bad_flags_are_refused() {
    let (ok, _, err) = phalanx(&["moe-sim", "--devices", "0"]);
    assert!(!ok && err.contains("at least 1"), "{err}");
    let (ok, _, err) = phalanx(&["moe-sim", "--zipf=-1"]);
    assert!(!ok && err.contains("Zipf exponent"), "{err}");
}

#[test]
fn calibration_catches_a_shifting_router() {
    let base =
        ["moe-sim", "--devices", "4", "--experts", "8", "--tokens", "500", "--iterations", "8", "--shift-every", "2"];
    let (ok, plain, err) = phalanx(&base);
    assert!(ok, "{err}");
    let (ok, calibrated, err) = phalanx(&[&base[..], &["--calibrate", "0"]].concat());
    assert!(ok, "{err}");
    // Free transfers: it runs whenever it saves tokens, so FSSDP's straggler only drops.
    let ran = numbers(&calibrated, "calibration");
    assert!(ran.len() == 3 && ran[1] >= 1.0 && ran[2] == 8.0, "{ran:?}\n{calibrated}");
    assert!(numbers(&calibrated, "FSSDP ")[0] < numbers(&plain, "FSSDP ")[0], "{plain}\n{calibrated}");
    // EP and FSDP do not calibrate.
    assert_eq!(numbers(&calibrated, "EP "), numbers(&plain, "EP "));
}

/// `phalanx moe-bench` runs both strategies through the layer on an in-process group:
/// its straggler figures are the planners' (FSSDP's below EP's) and its speed-up is its
/// own columns' ratio. Times are not asserted (this machine is shared).
#[test]
fn the_bench_runs_both_strategies() {
    let args = ["moe-bench", "--tokens", "64", "--iterations", "2", "--us-per-token", "10"];
    let (ok, out, err) = phalanx(&args);
    assert!(ok, "{err}");
    let (ep, fssdp) = (numbers(&out, "EP "), numbers(&out, "FSSDP "));
    assert!(ep.len() == 2 && fssdp.len() == 2, "{out}");
    assert!(fssdp[1] < ep[1], "FSSDP's straggler below EP's\n{out}");
    let speedup = numbers(&out, "FSSDP speed-up over EP:");
    assert!(close(speedup[0], ep[0] / fssdp[0], 0.02 * speedup[0]), "{speedup:?}\n{out}");
    let (ok, _, err) = phalanx(&["moe-bench", "--hidden", "0"]);
    assert!(!ok && err.contains("at least 1"), "{err}");
}
