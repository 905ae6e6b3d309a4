//! The FSSDP layer across real processes: a `phalanx master` and 4 `phalanx moe-worker`s
//! over QUIC on 127.0.0.1, each device its own process.
//!
//! - The reference's worked example (4 devices, 8 experts, `t = m = 2`): after spAG every
//!   holder's bytes equal the owner's, dispatch sends every token to a holder of its
//!   expert (20/30/20/30 tokens), combine brings back what one device computes alone,
//!   and after spRS d0 holds `[10, 10]` for e0 and d2 `[50, 10]` for e4.
//! - Training with backup owners through a SIGKILL: device 2 stops mid-iteration (after
//!   spAG, before spRS) and is killed; every survivor's iteration fails with its
//!   parameters and momentum as they were, the survivors re-shard from the backups and
//!   go on, and every expert's parameters and momentum at the end equal, bitwise, a
//!   single-process run over the same data (all four devices' before the loss, the
//!   survivors' after it).
//! - An MoE layer of 8 MLP experts, top-1 and top-2 Zipf-skewed routing: every device's
//!   outputs, input gradients and, after spRS, its experts' gradients equal a dense
//!   single-process reference bitwise (each expert's gradient summed per holder in
//!   arrival order, holders ascending, as the layer adds them).
//! - The timed FSSDP-vs-EP comparison (`--mode bench`) runs to its table.
//!
//! Every wait is bounded, and the processes are SIGKILLed and reaped when a test ends.

mod common;

#[path = "../src/moe_data.rs"]
#[allow(dead_code)]
mod moe_data;
#[path = "../src/moe_mlp.rs"]
mod moe_mlp;

use std::time::Duration;

use common::*;
use moe_data::{BETA, EXPERTS, LEN, LR};

/// Starts a master forming its first view of 4 and 4 `moe-worker`s (devices 0..4) with
/// `extra` arguments for device `d` from `extra(d)`.
fn devices(mode: &str, extra: impl Fn(usize) -> Vec<String>) -> (Cluster, Vec<usize>) {
    let mut c = Cluster::start_with(None, &["--initial-peers", "4"]);
    let master = c.master.to_string();
    let ws = (0..4)
        .map(|d| {
            let mut args: Vec<String> = ["moe-worker", "--master", &master, "--device", &d.to_string(), "--mode", mode]
                .iter()
                .map(|s| s.to_string())
                .collect();
            args.extend(extra(d));
            c.spawn(&format!("d{d}"), &args, 0)
        })
        .collect();
    (c, ws)
}

fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("an array").iter().map(|x| x.as_u64().expect("a number") as u32).collect()
}

#[test]
fn worked_example_across_four_processes() {
    let _serial = serial();
    let (mut c, ws) = devices("example", |_| Vec::new());
    c.wait(Duration::from_secs(45), "every device to finish the example", |c| {
        ws.iter().all(|&w| c.find(w, 0, |e| e.is("done")).is_some()).then_some(())
    });
    c.stop();
    let reports: Vec<serde_json::Value> = ws
        .iter()
        .map(|&w| c.find(w, 0, |e| e.is("example")).map(|(_, e)| e.v.clone()).expect("an example report"))
        .collect();
    let sent: u64 = reports.iter().map(|r| r["spag_bytes_sent"].as_u64().expect("spag_bytes_sent")).sum();
    assert_eq!(sent, 6 * 8, "the links saw 6 expert transfers of 8 bytes");
    for (d, r) in reports.iter().enumerate() {
        assert_eq!(r["device"], d as u64);
        assert_eq!(r["transfers"], 6, "device {d}: {r}");
        // The links' counters: each replica's 8 bytes received once (d0 e4; d1 e0, e4;
        // d2 e0; d3 e0, e4), sent by e0's owner d0 and e4's owner d2 (or relayed).
        assert_eq!(r["spag_bytes_received"], [8, 16, 8, 16][d], "device {d}: {r}");
        // spAG: every slot this device holds is the owner's bytes.
        let params = u32s(&r["params"]);
        let held: Vec<usize> =
            r["held"].as_array().expect("held").iter().map(|e| e.as_u64().expect("e") as usize).collect();
        for &e in &held {
            let want: Vec<u32> = moe_data::weights(e).iter().map(|x| x.to_bits()).collect();
            assert_eq!(params[2 * e..2 * e + 2], want[..], "device {d}, expert {e}");
        }
        // Dispatch: only experts held here; e0 split 10 per device, e4 5, the rest to owners.
        let experts: Vec<usize> =
            r["experts"].as_array().expect("experts").iter().map(|e| e.as_u64().expect("e") as usize).collect();
        assert!(experts.iter().all(|e| held.contains(e)), "device {d} got {experts:?}, holds {held:?}");
        assert_eq!(r["compute"], serde_json::json!([20, 30, 20, 30]));
        assert_eq!(experts.len(), [20, 30, 20, 30][d]);
        // Combine: each token's output is what one device computes alone.
        let want: Vec<u32> = moe_data::routing(d)
            .iter()
            .enumerate()
            .flat_map(|(i, &e)| {
                let (x, w) = (moe_data::token(d, i), moe_data::weights(e));
                [(x[0] * w[0]).to_bits(), (x[1] * w[1]).to_bits()]
            })
            .collect();
        assert_eq!(u32s(&r["combined"]), want, "device {d}");
        // spRS: the owners of e0 and e4 hold the sums; every other slot is as it was.
        let grads: Vec<f32> =
            r["grads"].as_array().expect("grads").iter().map(|x| x.as_f64().expect("a float") as f32).collect();
        let mut want = moe_data::example_grads(d);
        match d {
            0 => want[0..2].copy_from_slice(&[10.0, 10.0]),
            2 => want[8..10].copy_from_slice(&[50.0, 10.0]),
            _ => {}
        }
        assert_eq!(grads, want, "device {d}");
    }
}

/// One momentum-SGD step of every expert over the devices taking part in iteration
/// `it`, their gradients added in ascending order (as spRS adds them).
fn reference_step(w: &mut [f32], m: &mut [f32], it: usize, devices: &[usize]) {
    for i in 0..EXPERTS * LEN {
        let (e, k) = (i / LEN, i % LEN);
        let g = devices.iter().map(|&d| moe_data::data(it, d, e, k) * w[i]).reduce(|a, b| a + b).expect("a device");
        m[i] = BETA * m[i] + g;
        w[i] -= LR * m[i];
    }
}

#[test]
fn training_survives_a_sigkilled_device_from_the_backups() {
    let _serial = serial();
    const ITERATIONS: usize = 6;
    const LOST_AT: usize = 3;
    const VICTIM: usize = 2;
    let (mut c, ws) = devices("train", |d| {
        let mut a = vec!["--train-iterations".to_string(), ITERATIONS.to_string()];
        if d == VICTIM {
            a.extend(["--hang-at".to_string(), LOST_AT.to_string()]);
        }
        a
    });
    c.wait(Duration::from_secs(45), "the victim to stop mid-iteration", |c| {
        c.find(ws[VICTIM], 0, |e| e.is("hanging")).map(|_| ())
    });
    let killed = std::time::Instant::now();
    c.procs[ws[VICTIM]].child.kill().expect("SIGKILL the victim");
    let survivors: Vec<usize> = ws.iter().copied().filter(|&w| w != ws[VICTIM]).collect();
    let trained = c.wait(Duration::from_secs(45), "every survivor's final state", |c| {
        survivors
            .iter()
            .map(|&w| c.find(w, 0, |e| e.is("trained")).map(|(_, e)| e.v.clone()))
            .collect::<Option<Vec<_>>>()
    });
    let logs: Vec<Vec<serde_json::Value>> =
        survivors.iter().map(|&w| c.log(w).iter().map(|e| e.v.clone()).collect()).collect();
    // The survivors notice the loss within the harness's bound (the kernel closes the
    // victim's liveness connection; the peer timeout is the fallback).
    for &w in &survivors {
        let (_, failed) = c.find(w, 0, |e| e.is("iteration_failed")).expect("a failed iteration");
        let detected = failed.at.saturating_duration_since(killed);
        eprintln!("moe training: {} failed {} ms after the SIGKILL", c.procs[w].name, detected.as_millis());
        assert!(detected <= DETECTION_BOUND, "{} noticed the loss after {detected:?}", c.procs[w].name);
    }
    c.stop();

    // Every survivor's iteration LOST_AT failed once, typed, with its buffers restored.
    for (log, &w) in logs.iter().zip(&survivors) {
        let failed: Vec<&serde_json::Value> = log.iter().filter(|e| e["event"] == "iteration_failed").collect();
        assert_eq!(failed.len(), 1, "{}: {failed:?}", c.procs[w].name);
        assert_eq!(failed[0]["iteration"], LOST_AT as u64);
        assert!(["PeerLost", "Aborted"].contains(&failed[0]["kind"].as_str().expect("kind")), "{}", failed[0]);
        assert_eq!(failed[0]["restored"], true, "{}", failed[0]);
        let rec = log.iter().find(|e| e["event"] == "recovered").expect("a recovery");
        assert_eq!(rec["lost"], VICTIM as u64);
    }

    let mut w = vec![0.0f32; EXPERTS * LEN];
    let mut m = vec![0.0f32; EXPERTS * LEN];
    for (i, x) in w.iter_mut().enumerate() {
        *x = moe_data::initial(i / LEN, i % LEN);
    }
    for it in 0..ITERATIONS {
        let devices: &[usize] = if it < LOST_AT { &[0, 1, 2, 3] } else { &[0, 1, 3] };
        reference_step(&mut w, &mut m, it, devices);
    }
    let mut covered = [0usize; EXPERTS];
    for t in &trained {
        assert_eq!(t["devices"], 3);
        assert!(t["owners"].as_array().expect("owners").iter().all(|o| o.as_u64().expect("o") < 3));
        let (dw, dm) = (u32s(&t["w"]), u32s(&t["m"]));
        for e in t["held"].as_array().expect("held").iter().map(|e| e.as_u64().expect("e") as usize) {
            covered[e] += 1;
            let slot = e * LEN..(e + 1) * LEN;
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(dw[slot.clone()], bits(&w[slot.clone()])[..], "parameters of expert {e} on {t}");
            assert_eq!(dm[slot.clone()], bits(&m[slot])[..], "momentum of expert {e} on {t}");
        }
    }
    // Every expert lives on its owner and its backup among the survivors.
    assert_eq!(covered, [2; EXPERTS], "owner and backup of every expert");
}

/// The timed comparison with each device a process: device 0 prints the table (each
/// iteration timed by its slowest device), every device finishes. Timing itself is not
/// asserted (a shared 2-core machine); the README reports a measured run.
#[test]
fn timed_comparison_across_four_processes() {
    let _serial = serial();
    let short = ["--tokens", "64", "--iterations", "2", "--us-per-token", "10", "--expert-len", "256"];
    let (mut c, ws) = devices("bench", |_| short.iter().map(|s| s.to_string()).collect());
    c.wait(Duration::from_secs(45), "every device to finish the comparison", |c| {
        ws.iter().all(|&w| c.find(w, 0, |e| e.is("done")).is_some()).then_some(())
    });
    c.stop();
    // Lines that are not JSON are logged as `?` events with their text.
    let lines = |w: usize| -> Vec<String> {
        c.log(w).iter().filter(|e| e.is("?")).map(|e| e.str("line").to_string()).collect()
    };
    let table = lines(ws[0]);
    assert!(table.first().is_some_and(|l| l.starts_with("moe-bench: 4 process devices")), "{table:?}");
    for row in ["EP ", "FSSDP ", "FSSDP speed-up over EP: "] {
        assert!(table.iter().any(|l| l.starts_with(row)), "no {row:?} line in {table:?}");
    }
    assert!(ws[1..].iter().all(|&w| lines(w).is_empty()), "only device 0 prints the table");
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The MLP experts' layer across 4 processes against the dense reference.
fn mlp_layer_matches_dense(k: usize) {
    use moe_mlp::{c_of, expert_weights, mix, mlp, mlp_backward, rows, x_of, DEVICES, EXPERTS, W};
    let _serial = serial();
    let (mut c, ws) = devices("mlp", |_| vec!["--top-k".to_string(), k.to_string()]);
    c.wait(Duration::from_secs(45), "every device to finish the layer", |c| {
        ws.iter().all(|&w| c.find(w, 0, |e| e.is("done")).is_some()).then_some(())
    });
    c.stop();
    let reports: Vec<serde_json::Value> =
        ws.iter().map(|&w| c.find(w, 0, |e| e.is("mlp")).map(|(_, e)| e.v.clone()).expect("a report")).collect();

    // The dense reference, one process: each expert's gradient summed per holder in
    // arrival order (by source device, then by expert, then in order), holders ascending.
    let (owners, routed, p) = moe_mlp::plan(k).expect("plan");
    assert!(p.transfers() > 0, "the skew replicates something: {p:?}");
    let plan = phalanx::moe::dispatch(&p, &routed, None).expect("dispatch plan");
    let mut per_holder: Vec<Vec<Vec<f32>>> = vec![vec![vec![0.0; W]; DEVICES]; EXPERTS];
    let mut arrivals: Vec<Vec<(usize, usize)>> = vec![Vec::new(); DEVICES]; // (device, row)
    for src in 0..DEVICES {
        let (_, experts) = rows(src, k);
        let mut taken = [0usize; EXPERTS];
        for r in plan.routes().iter().filter(|r| r.from == src) {
            let mine: Vec<usize> = (0..experts.len()).filter(|&row| experts[row] == r.expert).collect();
            let cut = &mine[taken[r.expert]..taken[r.expert] + r.tokens as usize];
            taken[r.expert] += r.tokens as usize;
            arrivals[r.to].extend(cut.iter().map(|&row| (src, row)));
        }
    }
    for (h, list) in arrivals.iter_mut().enumerate() {
        list.sort_by_key(|&(src, row)| (src, rows(src, k).1[row], row));
        for &(src, row) in list.iter() {
            let (picks, experts) = rows(src, k);
            let (i, g) = picks[row];
            let dy: Vec<f32> = c_of(src, i).into_iter().map(|v| g * v).collect();
            let (dw, _) = mlp_backward(&expert_weights(experts[row]), &x_of(src, i), &dy);
            for (a, v) in per_holder[experts[row]][h].iter_mut().zip(dw) {
                *a += v;
            }
        }
    }
    for (d, r) in reports.iter().enumerate() {
        assert_eq!((r["device"].as_u64(), r["top_k"].as_u64()), (Some(d as u64), Some(k as u64)));
        let (picks, experts) = rows(d, k);
        let ys: Vec<f32> =
            picks.iter().zip(&experts).flat_map(|(&(i, _), &e)| mlp(&expert_weights(e), &x_of(d, i)).0).collect();
        assert_eq!(u32s(&r["y"]), bits(&mix(&picks, &ys)), "forward, device {d}, top-{k}");
        let dxs: Vec<f32> = picks
            .iter()
            .zip(&experts)
            .flat_map(|(&(i, g), &e)| {
                let dy: Vec<f32> = c_of(d, i).into_iter().map(|v| g * v).collect();
                mlp_backward(&expert_weights(e), &x_of(d, i), &dy).1
            })
            .collect();
        let ones: Vec<(usize, f32)> = picks.iter().map(|&(i, _)| (i, 1.0)).collect();
        assert_eq!(u32s(&r["dx"]), bits(&mix(&ones, &dxs)), "dx, device {d}, top-{k}");
        let owned: Vec<usize> = (0..EXPERTS).filter(|&e| owners[e] == d).collect();
        assert_eq!(r["owned"], serde_json::json!(owned));
        let grads = r["grads"].as_array().expect("grads");
        assert_eq!(grads.len(), owned.len());
        for (&e, got) in owned.iter().zip(grads) {
            let want = p
                .holders(e)
                .iter()
                .map(|&h| per_holder[e][h].clone())
                .reduce(|a, g| a.iter().zip(&g).map(|(x, y)| x + y).collect());
            assert_eq!(u32s(got), bits(&want.expect("a holder")), "gradient of expert {e}, top-{k}");
        }
    }
}

#[test]
fn mlp_layer_top1_across_four_processes_matches_a_dense_reference_bitwise() {
    mlp_layer_matches_dense(1);
}

#[test]
fn mlp_layer_top2_across_four_processes_matches_a_dense_reference_bitwise() {
    mlp_layer_matches_dense(2);
}
