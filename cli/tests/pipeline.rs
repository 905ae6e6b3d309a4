//! `phalanx pipeline` from the command line: the worked example's figures, the SVG, and
//! a typed refusal.

use std::process::Command;

fn phalanx(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_phalanx")).args(args).output().expect("run phalanx");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn the_worked_example_from_the_command_line() {
    let (ok, out, err) = phalanx(&["pipeline", "--schedule", "1f1b", "--stages", "4", "--microbatches", "8"]);
    assert!(ok, "{err}");
    assert!(out.contains("s0: F0 F1 F2 F3 BW0 F4"), "{out}");
    assert!(out.contains("bubble 9 "), "{out}");
    let svg = std::env::temp_dir().join(format!("phalanx-pipeline-{}.svg", std::process::id()));
    let (ok, out, err) = phalanx(&["pipeline", "--schedule", "zbv", "--svg", svg.to_str().expect("utf-8 path")]);
    assert!(ok, "{err}");
    assert!(out.contains("bubble 0 ") && out.contains("[4.0, 4.0, 4.0, 4.0]"), "{out}");
    let drawn = std::fs::read_to_string(&svg).expect("the SVG");
    let _ = std::fs::remove_file(&svg);
    assert!(
        drawn.starts_with("<svg") && drawn.matches("<rect").count() == 4 * 8 * 6,
        "{} rects",
        drawn.matches("<rect").count()
    );
    let (ok, _, err) = phalanx(&["pipeline", "--schedule", "1f1b", "--memory-limit", "3"]);
    assert!(!ok && err.contains("stage 0 holds 4 units") && err.contains("after F3"), "{err}");
    let (ok, _, err) = phalanx(&["pipeline", "--stages", "1"]);
    assert!(!ok && err.contains("at least 2 stages"), "{err}");
}

/// The automatic scheduler and the V schedules from the command line: ZB-2p's zero
/// bubble at 7 micro-batches on the first stage, auto under a limit, V-Half and V-Min
/// with their bubbles and balanced peaks, and the timing mode.
#[test]
fn the_new_schedules_from_the_command_line() {
    let (ok, out, err) = phalanx(&["pipeline", "--schedule", "zb2p"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("ZB-2p:") && out.contains("s0: F0 F1 F2 F3 F4 F5 F6 B0 F7 W0 B1"), "{out}");
    assert!(out.contains("bubble 0 ") && out.contains("[7.0, 5.0, 3.0, 1.0]"), "{out}");
    let (ok, out, err) = phalanx(&["pipeline", "--schedule", "auto", "--memory-limit", "4"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("auto:") && out.contains("[4.0, 3.0, 2.0, 1.0]"), "{out}");
    let (ok, out, err) = phalanx(&["pipeline", "--schedule", "vhalf"]);
    assert!(ok, "{err}");
    assert!(out.contains("bubble 2.5 ") && out.contains("[3.0, 3.0, 3.0, 3.0]"), "{out}");
    let (ok, out, err) = phalanx(&["pipeline", "--schedule", "v-min", "--costs", "1,1,1,0"]);
    assert!(ok, "{err}");
    assert!(out.contains("bubble 5.5 ") && out.contains("[2.0, 2.0, 2.0, 2.0]"), "{out}");
    let (ok, out, err) =
        phalanx(&["pipeline", "--schedule", "zb2p", "--stages", "8", "--microbatches", "32", "--time"]);
    assert!(ok, "{err}");
    assert!(out.contains("generated in ") && out.contains(" ms in all") && !out.contains("s0: F0"), "{out}");
    let (ok, _, err) = phalanx(&["pipeline", "--schedule", "auto"]);
    assert!(!ok && err.contains("needs a memory limit"), "{err}");
    let (ok, _, err) = phalanx(&["pipeline", "--schedule", "auto", "--memory-limit", "0.5"]);
    assert!(!ok && err.contains("memory limit 0.5 is below"), "{err}");
    let (ok, _, err) = phalanx(&["pipeline", "--schedule", "gpipe"]);
    assert!(!ok && err.contains("vhalf"), "{err}");
}
