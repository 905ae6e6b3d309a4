//! A grid of pipelines across real processes: a `phalanx master` and 4 `phalanx
//! pipeline-worker --mode mlp --replicas 2` processes over QUIC on 127.0.0.1, pp = 2
//! stages × dp = 2 replicas, ZB-H1, SGD with momentum.
//!
//! - With no fault, every position's weights and momentum after every iteration equal a
//!   single-process run with the same data and accumulation order, bitwise.
//! - Stage 1 of replica 0 is SIGKILLed mid-iteration (stopped at a known pass first):
//!   every survivor reports the iteration failed (`PeerLost` or `Aborted`, also where
//!   another survivor already settles the view) and settles
//!   the smaller view, and none reports a committed step for that iteration before the
//!   redo; a replacement process started with `--join` takes the lost position, fetches
//!   stage 1's weights, momentum and iteration from replica 1, and the failed iteration
//!   and the next run again: every position's weights and momentum after every
//!   iteration equal the fault-free reference, bitwise. Killed mid-run no survivor had
//!   stepped. Stage 0 of replica 0 killed inside its optimistic step (stage 1 of its
//!   pipeline had passed the gradient stats to it and stepped, replica 1 had stepped):
//!   every survivor's commit fails and each undoes its step: right after the failure
//!   each holds the last committed weights and momentum; then the same replacement.
//! - pp = 2 × dp = 1 with `--checkpoint`: stage 0 lost inside its step, the replacement
//!   restarting from the killed process's save of its last commit; the run equals the
//!   fault-free one.
//!
//! Every wait is bounded, and the processes are SIGKILLed and reaped when a test ends.

mod common;

use std::time::{Duration, Instant};

use common::*;
use phalanx::membership::master::DEFAULT_MAX_PEER_TIMEOUT_MS;
use phalanx::pipeline_mlp::{initial_weights, reference_gradients, D, LAYERS, LR};
use phalanx::sched::{by_name, Costs, Schedule};
use phalanx::workload::hash_f32;

const STAGES: usize = 2;
const MICROBATCHES: usize = 4;
const ITERATIONS: usize = 4;
const SCHEDULE: &str = "zbh1";
/// The workers' `--momentum`, as they parse it.
const MOMENTUM: f32 = 0.9;
/// Beyond the master's largest peer timeout: its check, the view's way to the
/// survivors, a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(3000);

fn schedule() -> Schedule {
    by_name(SCHEDULE, STAGES, MICROBATCHES, 1, &Costs::unit(), None).expect("schedule")
}

/// Every layer's weights and momentum.
type Layers = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// The weights and momentum of every layer after each iteration, in one process:
/// replica `r`'s gradients of iteration `i` are `pipeline_mlp`'s for its iteration
/// `i·dp + r` (accumulated in the schedule's order), summed over the replicas, then
/// `v = μ·v + g`, `w -= lr·v`, as the workers step.
fn reference(dp: usize) -> Vec<Layers> {
    let schedule = schedule();
    let mut w: Vec<Vec<f32>> = (0..LAYERS).map(initial_weights).collect();
    let mut v = vec![vec![0f32; D * D]; LAYERS];
    (0..ITERATIONS)
        .map(|it| {
            let mut g = reference_gradients(&schedule, it * dp, &w).0;
            for r in 1..dp {
                let other = reference_gradients(&schedule, it * dp + r, &w).0;
                g.iter_mut().zip(other).for_each(|(g, o)| g.iter_mut().zip(o).for_each(|(g, o)| *g += o));
            }
            for ((w, v), g) in w.iter_mut().zip(&mut v).zip(&g) {
                for ((w, v), &g) in w.iter_mut().zip(v.iter_mut()).zip(g) {
                    *v = MOMENTUM * *v + 1.0 * g;
                    *w -= LR * *v;
                }
            }
            (w.clone(), v.clone())
        })
        .collect()
}

fn args(c: &Cluster, dp: usize, extra: &[String]) -> Vec<String> {
    let mut a: Vec<String> = [
        "pipeline-worker",
        "--master",
        &c.master.to_string(),
        "--mode",
        "mlp",
        "--schedule",
        SCHEDULE,
        "--stages",
        &STAGES.to_string(),
        "--replicas",
        &dp.to_string(),
        "--microbatches",
        &MICROBATCHES.to_string(),
        "--iterations",
        &ITERATIONS.to_string(),
        "--momentum",
        "0.9",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    a.extend(extra.iter().cloned());
    a
}

/// A master forming a first view of `STAGES × dp` and the positions (stage, replica),
/// in peer id order; `extra(stage, replica)` more arguments each.
fn grid(dp: usize, extra: impl Fn(usize, usize) -> Vec<String>) -> (Cluster, Vec<usize>) {
    let mut c = Cluster::start_with(None, &["--initial-peers", &(STAGES * dp).to_string()]);
    let ws = (0..dp)
        .flat_map(|r| (0..STAGES).map(move |s| (s, r)))
        .map(|(s, r)| {
            let mut more = vec!["--stage".into(), s.to_string(), "--replica".into(), r.to_string()];
            more.extend(extra(s, r));
            let a = args(&c, dp, &more);
            c.spawn(&format!("s{s}r{r}"), &a, 0)
        })
        .collect();
    (c, ws)
}

/// Whether every process of `ws` printed `done`; panics (with every process's events)
/// as soon as one of them exits without it, instead of waiting out the timeout.
fn all_done(c: &Cluster, ws: &[usize]) -> Option<()> {
    for &w in ws {
        let failed = c.exited(w).is_some_and(|s| !s.success());
        assert!(!failed, "{} exited without finishing\n{}", c.procs[w].name, c.dump());
    }
    ws.iter().all(|&w| c.find(w, 0, |e| e.is("done")).is_some()).then_some(())
}

fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("an array").iter().map(|x| x.as_u64().expect("a number") as u32).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Checks process `w`'s step of iteration `it` as position (`stage`, `replica`)
/// against the reference; returns the index of the event in its log.
fn check_step(c: &Cluster, dp: usize, w: usize, it: usize, (stage, replica): (usize, usize)) -> usize {
    let want = reference(dp);
    let (at, step) = c
        .find(w, 0, |e| e.is("step") && e.u64("iteration") == it as u64)
        .unwrap_or_else(|| panic!("{} reported no step {it}\n{}", c.procs[w].name, c.dump()));
    let steps = c.log(w).iter().filter(|e| e.is("step") && e.u64("iteration") == it as u64).count();
    assert_eq!(steps, 1, "{}: one committed step {it}", c.procs[w].name);
    assert_eq!((step.u64("stage") as usize, step.u64("replica") as usize), (stage, replica), "{}", step.v);
    let layers: Vec<usize> =
        step.v["layers"].as_array().expect("layers").iter().map(|l| l.as_u64().expect("l") as usize).collect();
    assert_eq!(layers, (stage * LAYERS / STAGES..(stage + 1) * LAYERS / STAGES).collect::<Vec<_>>());
    let (weights, momentum) = (step.v["weights"].as_array().expect("w"), step.v["momentum"].as_array().expect("v"));
    for (k, &l) in layers.iter().enumerate() {
        let what = format!("layer {l} of ({stage}, {replica}) on {} after iteration {it}", c.procs[w].name);
        assert_eq!(u32s(&weights[k]), bits(&want[it].0[l]), "weights of {what}");
        assert_eq!(u32s(&momentum[k]), bits(&want[it].1[l]), "momentum of {what}");
    }
    at
}

#[test]
fn a_two_by_two_grid_of_processes_trains_bitwise_like_one_process() {
    let _serial = serial();
    let (mut c, ws) = grid(2, |_, _| Vec::new());
    c.wait(Duration::from_secs(45), "every position to finish training", |c| all_done(c, &ws));
    c.stop();
    for (i, &w) in ws.iter().enumerate() {
        for it in 0..ITERATIONS {
            check_step(&c, 2, w, it, (i % STAGES, i / STAGES));
        }
    }
    // The momentum makes the weights differ from plain SGD's: μ matters.
    let want = reference(2);
    assert_ne!(want[1].1[0], want[1].0[0]);
}

/// pp = 2 × dp = 2: stage 1 of replica 0 stops before the forward of micro-batch 2 in
/// iteration 1 and is SIGKILLed; a replacement joins once the survivors settled. No
/// survivor had stepped.
#[test]
fn a_replacement_process_catches_up_from_its_replica_and_the_run_equals_a_fault_free_one() {
    let undone = lose_and_replace(2, (1, 0), &["--hang-pass", "f", "--hang-mb", "2"], &[]);
    assert_eq!(undone, vec![0; 3], "no survivor had stepped");
}

/// The same, stage 0 of replica 0 stopped inside its optimistic step of iteration 1:
/// stage 1 of its pipeline passed its gradient stats to it, then stepped, and waits for
/// the verdict; stage 1 of replica 1 stepped and waits in the commit vote; stage 0 of
/// replica 1 stepped too unless the victim's last all-reduce message died in its
/// buffers. Every survivor's commit fails and each undoes what it stepped (the
/// `failed` events' digests are those of iteration 0).
#[test]
fn a_position_lost_inside_its_step_leaves_no_survivor_with_a_partial_step() {
    // The survivors: (1, 0), (0, 1), (1, 1).
    let undone = lose_and_replace(2, (0, 0), &["--hang-pass", "step"], &[]);
    assert_eq!((undone[0], undone[2]), (1, 1), "both stage 1s undid their optimistic step");
    assert!(undone[1] <= 1, "stage 0 of replica 1 undid at most its one step: {undone:?}");
}

/// pp = 2 × dp = 1 with `--checkpoint`: stage 0 stopped inside its optimistic step and
/// killed; no replica holds it, so the replacement restarts from the state the killed
/// process saved at its last commit; stage 1 had stepped and undoes it.
#[test]
fn with_one_replica_a_replacement_restarts_from_the_lost_stage_checkpoint() {
    let dir = std::env::temp_dir().join(format!("phalanx-pipeline-checkpoint-{}-{}", std::process::id(), unix_ms()));
    std::fs::create_dir_all(&dir).expect("a checkpoint folder");
    let extra = ["--checkpoint".to_string(), dir.display().to_string()];
    let undone = lose_and_replace(1, (0, 0), &["--hang-pass", "step"], &extra);
    let saved: Vec<String> = std::fs::read_dir(&dir)
        .expect("the checkpoint folder")
        .map(|e| e.expect("an entry").file_name().to_string_lossy().into_owned())
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(undone, vec![1], "stage 1 undid its optimistic step");
    let mut saved = saved;
    saved.sort();
    assert_eq!(saved, vec!["stage0-replica0.state", "stage1-replica0.state"]);
}

/// Kills the `victim` position (stage, replica) of a `STAGES × dp` grid where `hang`
/// stops it in iteration 1, starts a replacement, and checks the survivors' failure, the
/// replacement's catch-up and every position's weights and momentum against the
/// fault-free run; `extra` goes to every worker. Returns how many steps each survivor
/// undid in the failed iteration.
fn lose_and_replace(dp: usize, victim: (usize, usize), hang: &[&str], extra: &[String]) -> Vec<u64> {
    let _serial = serial();
    const FAILED_AT: usize = 1;
    let (mut c, ws) = grid(dp, |s, r| {
        let mut a = extra.to_vec();
        if (s, r) == victim {
            a.extend(["--hang-at".to_string(), FAILED_AT.to_string()]);
            a.extend(hang.iter().map(|h| h.to_string()));
        }
        a
    });
    let v = ws[victim.1 * STAGES + victim.0];
    c.wait(Duration::from_secs(45), "the victim to stop mid-iteration", |c| {
        c.find(v, 0, |e| e.is("hanging")).map(|_| ())
    });
    let killed = Instant::now();
    c.procs[v].child.kill().expect("SIGKILL the victim");
    let survivors: Vec<usize> = ws.iter().copied().filter(|&w| w != v).collect();
    let bound = Duration::from_millis(DEFAULT_MAX_PEER_TIMEOUT_MS) + SLACK;
    c.wait(bound, "every survivor to settle the view without the victim", |c| {
        survivors.iter().all(|&w| c.find(w, 0, |e| e.is("settled")).is_some()).then_some(())
    });
    eprintln!("survivors settled {} ms after the SIGKILL", killed.elapsed().as_millis());
    for &w in &survivors {
        let name = &c.procs[w].name;
        let (_, failed) = c.find(w, 0, |e| e.is("failed")).unwrap_or_else(|| panic!("{name}: no failed event"));
        eprintln!("  {name}: {}: {}", failed.str("kind"), failed.str("error"));
        assert_eq!(failed.u64("iteration"), FAILED_AT as u64, "{name}: {}", failed.v);
        // A survivor whose collective was still in the old view when another survivor
        // began settling it gets a retryable `Aborted` naming `update_topology`.
        assert!(["PeerLost", "Aborted"].contains(&failed.str("kind")), "{name}: {}", failed.v);
        // What it holds after the failure: the weights and momentum of the last commit.
        let i = ws.iter().position(|&x| x == w).expect("a position");
        let layers = (i % STAGES) * LAYERS / STAGES..(i % STAGES + 1) * LAYERS / STAGES;
        let committed = &reference(dp)[FAILED_AT - 1];
        let of = |t: &[Vec<f32>]| hash_f32(&layers.clone().flat_map(|l| t[l].clone()).collect::<Vec<_>>());
        assert_eq!(failed.str("digest"), of(&committed.0), "{name}: weights after the failure");
        assert_eq!(failed.str("momentum_digest"), of(&committed.1), "{name}: momentum after the failure");
        let (_, settled) = c.find(w, 0, |e| e.is("settled")).expect("settled");
        assert_eq!(settled.u64("size"), (STAGES * dp - 1) as u64, "{name}: {}", settled.v);
        let early = c.find(w, 0, |e| e.is("step") && e.u64("iteration") >= FAILED_AT as u64);
        assert!(early.is_none(), "{name} committed a step of the failed iteration: {:?}", early.map(|(_, e)| &e.v));
    }
    let joiner = {
        let mut more = extra.to_vec();
        more.push("--join".to_string());
        let a = args(&c, dp, &more);
        c.spawn("replacement", &a, 0)
    };
    let mut all = survivors.clone();
    all.push(joiner);
    c.wait(Duration::from_secs(30), "the survivors and the replacement to finish", |c| all_done(c, &all));
    c.stop();
    eprintln!("the run ended {} ms after the SIGKILL", killed.elapsed().as_millis());
    // The replacement took the lost position and the state of iteration FAILED_AT.
    let (_, placed) = c.find(joiner, 0, |e| e.is("placed")).expect("the replacement placed");
    assert_eq!((placed.u64("stage"), placed.u64("replica")), (victim.0 as u64, victim.1 as u64), "{}", placed.v);
    let (_, caught) = c.find(joiner, 0, |e| e.is("caught_up")).expect("the replacement caught up");
    assert_eq!(caught.u64("iteration"), FAILED_AT as u64, "{}", caught.v);
    assert!(c.find(joiner, 0, |e| e.is("step") && e.u64("iteration") < FAILED_AT as u64).is_none());
    // Iterations before the fault on the victim, the failed one and after on the replacement.
    for it in 0..FAILED_AT {
        check_step(&c, dp, v, it, victim);
    }
    assert!(c.find(v, 0, |e| e.is("step") && e.u64("iteration") >= FAILED_AT as u64).is_none());
    for it in FAILED_AT..ITERATIONS {
        check_step(&c, dp, joiner, it, victim);
    }
    for (i, &w) in ws.iter().enumerate().filter(|&(_, &w)| w != v) {
        let position = (i % STAGES, i / STAGES);
        let (failed, _) = c.find(w, 0, |e| e.is("failed")).expect("failed");
        // The view after the loss: placed again on the position it held.
        let (replaced, again) = c.find(w, failed, |e| e.is("placed")).expect("placed again after the loss");
        assert_eq!((again.u64("stage") as usize, again.u64("replica") as usize), position, "{}", again.v);
        for it in 0..ITERATIONS {
            let at = check_step(&c, dp, w, it, position);
            if it >= FAILED_AT {
                assert!(at > replaced, "{}: step {it} committed only after the redo's placement", c.procs[w].name);
            }
        }
    }
    survivors.iter().map(|&w| c.find(w, 0, |e| e.is("failed")).expect("failed").1.u64("undone")).collect()
}
