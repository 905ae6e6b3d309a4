//! Pipeline schedules across real processes: a `phalanx master` and 4 `phalanx
//! pipeline-worker`s over QUIC on 127.0.0.1, one stage each.
//!
//! - Training the 8-layer MLP under every schedule (1F1B, interleaved 1F1B on 2 chunks,
//!   ZB-H1, ZB-2p, ZB-V, V-Half, V-Min): after every iteration each
//!   stage's weights equal, bitwise, a single-process run computed here with the same
//!   micro-batch accumulation order (`phalanx::pipeline_mlp::reference_training`).
//! - A middle stage SIGKILLed mid-iteration (before its last pass, when the last stage
//!   has run its whole list and waits in the commit), and in another run a stage
//!   SIGSTOPped mid-iteration: every other stage prints a typed error (`PeerLost` or `Aborted`)
//!   and exits within the master's largest peer timeout plus [`SLACK`], and no stage
//!   reports a step for the failed iteration (every stage did for the one before).
//! - The timed mode runs to its summary (timing is not asserted: the machine is shared;
//!   the README reports a measured run).
//!
//! Every wait is bounded, and the processes are SIGKILLed and reaped when a test ends.

mod common;

use std::time::{Duration, Instant};

use common::*;
use phalanx::membership::master::DEFAULT_MAX_PEER_TIMEOUT_MS;
use phalanx::pipeline_mlp::reference_training;
use phalanx::sched::{by_name, Costs};
use phalanx::workload::hash_f32;

const STAGES: usize = 4;
const MICROBATCHES: usize = 8;
const ITERATIONS: usize = 3;
/// What a failure may take beyond the master's largest peer timeout: its check
/// interval, the new view's way to the stages, their exit, a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(2000);

/// Starts a master forming its first view of 4 and 4 `pipeline-worker`s (stages 0..4)
/// running `schedule` in `mode`, with `extra(stage)` more arguments each.
fn stages(schedule: &str, mode: &str, extra: impl Fn(usize) -> Vec<String>) -> (Cluster, Vec<usize>) {
    let mut c = Cluster::start_with(None, &["--initial-peers", &STAGES.to_string()]);
    let master = c.master.to_string();
    let ws = (0..STAGES)
        .map(|s| {
            let mut args: Vec<String> = [
                "pipeline-worker",
                "--master",
                &master,
                "--stage",
                &s.to_string(),
                "--schedule",
                schedule,
                "--mode",
                mode,
                "--stages",
                &STAGES.to_string(),
                "--microbatches",
                &MICROBATCHES.to_string(),
            ]
            .iter()
            .map(|a| a.to_string())
            .collect();
            args.extend(extra(s));
            c.spawn(&format!("s{s}"), &args, 0)
        })
        .collect();
    (c, ws)
}

fn iterations(n: usize) -> Vec<String> {
    vec!["--iterations".to_string(), n.to_string()]
}

fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("an array").iter().map(|x| x.as_u64().expect("a number") as u32).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Trains under `name` across 4 processes and checks every stage's weights after every
/// iteration against the single-process run.
fn trains_bitwise_like_one_process(name: &str) {
    let _serial = serial();
    let (mut c, ws) = stages(name, "mlp", |_| iterations(ITERATIONS));
    c.wait(Duration::from_secs(45), "every stage to finish training", |c| {
        ws.iter().all(|&w| c.find(w, 0, |e| e.is("done")).is_some()).then_some(())
    });
    c.stop();
    let schedule = by_name(name, STAGES, MICROBATCHES, 2, &Costs::unit(), None).expect("schedule");
    let want = reference_training(&schedule, ITERATIONS);
    for (it, want) in want.iter().enumerate() {
        let mut seen = vec![0usize; want.len()];
        for (s, &w) in ws.iter().enumerate() {
            let (_, step) = c
                .find(w, 0, |e| e.is("step") && e.u64("iteration") == it as u64)
                .unwrap_or_else(|| panic!("{name}: stage {s} reported no step {it}\n{}", c.dump()));
            assert_eq!(step.u64("stage"), s as u64, "{name}: {}\n{}", step.v, c.dump());
            let layers: Vec<usize> =
                step.v["layers"].as_array().expect("layers").iter().map(|l| l.as_u64().expect("l") as usize).collect();
            let weights = step.v["weights"].as_array().expect("weights");
            assert_eq!(layers.len(), weights.len());
            for (&l, got) in layers.iter().zip(weights) {
                assert_eq!(u32s(got), bits(&want[l]), "{name}: layer {l} on stage {s} after iteration {it}");
                seen[l] += 1;
            }
            let all: Vec<f32> = layers.iter().flat_map(|&l| want[l].iter().copied()).collect();
            assert_eq!(step.str("digest"), hash_f32(&all), "{name}: digest of stage {s} after iteration {it}");
        }
        assert!(seen.iter().all(|&n| n == 1), "{name}: every layer on exactly one stage: {seen:?}");
    }
}

#[test]
fn one_f_one_b_across_four_processes_trains_bitwise_like_one_process() {
    trains_bitwise_like_one_process("1f1b");
}

#[test]
fn zb_h1_across_four_processes_trains_bitwise_like_one_process() {
    trains_bitwise_like_one_process("zbh1");
}

#[test]
fn zb_v_across_four_processes_trains_bitwise_like_one_process() {
    trains_bitwise_like_one_process("zbv");
}

#[test]
fn interleaved_zb_2p_v_half_and_v_min_across_four_processes_train_bitwise_like_one_process() {
    for name in ["interleaved", "zb2p", "vhalf", "vmin"] {
        trains_bitwise_like_one_process(name);
    }
}

/// Stage `victim` stops in iteration 1 before `hang` (`--hang-pass`, `--hang-mb`);
/// `fault` SIGKILLs or SIGSTOPs it. Every other stage must print a typed error for
/// iteration 1 and exit with an error within the largest peer timeout plus [`SLACK`];
/// no stage steps iteration 1, every stage stepped iteration 0. Returns each other
/// stage's error by stage.
fn a_lost_stage_fails_every_other(name: &str, victim: usize, hang: [&str; 2], fault: &str) -> Vec<(usize, String)> {
    let _serial = serial();
    const FAILED_AT: u64 = 1;
    let (mut c, ws) = stages(name, "mlp", |s| {
        let mut a = iterations(ITERATIONS);
        if s == victim {
            let [pass, mb] = hang;
            a.extend(["--hang-at", &FAILED_AT.to_string(), "--hang-pass", pass, "--hang-mb", mb].map(String::from));
        }
        a
    });
    c.wait(Duration::from_secs(45), "the victim to stop mid-iteration", |c| {
        c.find(ws[victim], 0, |e| e.is("hanging")).map(|_| ())
    });
    let faulted = Instant::now();
    match fault {
        "KILL" => c.procs[ws[victim]].child.kill().expect("SIGKILL the victim"),
        sig => c.signal(ws[victim], sig),
    }
    let others: Vec<usize> = ws.iter().copied().filter(|&w| w != ws[victim]).collect();
    let bound = Duration::from_millis(DEFAULT_MAX_PEER_TIMEOUT_MS) + SLACK;
    c.wait(bound + Duration::from_secs(10), "every other stage to exit", |c| {
        others.iter().all(|&w| c.exited(w).is_some()).then_some(())
    });
    let exited = faulted.elapsed();
    // Read what is left in the pipes (the processes are gone; their last lines may lag).
    c.wait(Duration::from_secs(5), "every other stage's failed event", |c| {
        others.iter().all(|&w| c.find(w, 0, |e| e.is("failed")).is_some()).then_some(())
    });
    c.stop();
    eprintln!("{name}: SIG{fault} of stage {victim}: every other stage exited {} ms after it", exited.as_millis());
    for &w in &others {
        let p = &c.procs[w];
        let (_, failed) = c.find(w, 0, |e| e.is("failed")).expect("a failed event");
        let after = failed.at.saturating_duration_since(faulted);
        eprintln!("  {}: {} after {} ms: {}", p.name, failed.str("kind"), after.as_millis(), failed.str("error"));
        assert!(after <= bound, "{}: failed {after:?} after the fault; bound {bound:?}", p.name);
        assert_eq!(failed.u64("iteration"), FAILED_AT, "{}: {}", p.name, failed.v);
        assert!(["PeerLost", "Aborted"].contains(&failed.str("kind")), "{}: {}", p.name, failed.v);
        assert!(p.status.is_some_and(|s| !s.success()), "{} exits with an error: {:?}", p.name, p.status);
    }
    assert!(exited <= bound, "the other stages exited {exited:?} after the fault; bound {bound:?}");
    for (s, &w) in ws.iter().enumerate() {
        assert!(
            c.find(w, 0, |e| e.is("step") && e.u64("iteration") == FAILED_AT - 1).is_some(),
            "stage {s} stepped iteration {}",
            FAILED_AT - 1
        );
        let late = c.find(w, 0, |e| e.is("step") && e.u64("iteration") >= FAILED_AT);
        assert!(late.is_none(), "stage {s} applied a step of the failed iteration: {:?}", late.map(|(_, e)| &e.v));
    }
    others
        .iter()
        .map(|&w| {
            let (_, failed) = c.find(w, 0, |e| e.is("failed")).expect("a failed event");
            (failed.u64("stage") as usize, failed.str("error").to_string())
        })
        .collect()
}

/// 1F1B, stage 2 killed before its last pass (`BW7`): stage 3 has then run its whole
/// list (its last `F` and `BW` need nothing more from stage 2), so it is the commit
/// (the post-validation, then the vote) that fails there, and it does not step either.
#[test]
fn a_sigkilled_middle_stage_fails_every_other_stage_with_a_typed_error() {
    let errors = a_lost_stage_fails_every_other("1f1b", 2, ["bw", "7"], "KILL");
    let last = errors.iter().find(|(s, _)| *s == 3).expect("stage 3's error");
    // Its post-validation waits for the stats that stage 2 never sends on.
    assert!(last.1.contains("gradient stats"), "stage 3 fails in the commit: {}", last.1);
}

/// ZB-V, stage 1 stopped mid-iteration (before the forward of micro-batch 4).
#[test]
fn a_sigstopped_stage_fails_every_other_stage_within_the_peer_timeout() {
    a_lost_stage_fails_every_other("zbv", 1, ["f", "4"], "STOP");
}

/// The timed mode runs to its summary on stage 0 (numbers are not asserted).
#[test]
fn timed_passes_across_four_processes_report_measured_against_simulated() {
    let _serial = serial();
    let (mut c, ws) = stages("zbv", "timed", |_| {
        let mut a = iterations(2);
        a.extend(["--unit-ms".to_string(), "5".to_string()]);
        a
    });
    c.wait(Duration::from_secs(45), "every stage to finish the timed run", |c| {
        ws.iter().all(|&w| c.find(w, 0, |e| e.is("done")).is_some()).then_some(())
    });
    c.stop();
    let (_, summary) = c.find(ws[0], 0, |e| e.is("timed_summary")).expect("a summary on stage 0");
    assert_eq!(summary.v["schedule"], "ZB-V");
    // The simulator's numbers: ZB-V at unit costs, 24 units a stage span.
    assert_eq!(summary.v["simulated_units"], 24.0);
    assert!(summary.v["measured_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{}", summary.v);
    assert!(summary.v["sleeps_late_ms"].as_f64().is_some(), "{}", summary.v);
    for e in c.log(ws[0]).iter().filter(|e| e.is("timed")) {
        assert_eq!(e.v["spans_ms"].as_array().map(Vec::len), Some(STAGES), "a span per stage: {}", e.v);
    }
    let timed: Vec<u64> = c.log(ws[0]).iter().filter(|e| e.is("timed")).map(|e| e.u64("iteration")).collect();
    assert_eq!(timed, vec![0, 1]);
    assert!(ws[1..].iter().all(|&w| c.find(w, 0, |e| e.is("timed") || e.is("timed_summary")).is_none()));
}
