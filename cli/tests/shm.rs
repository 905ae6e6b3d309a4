//! The shared-memory transport with real processes: `phalanx worker`s on 127.0.0.1
//! whose data links move to shared memory (`--shm auto`, the default) or stay on QUIC
//! (`--shm off`). Every all-reduce result is recomputed exactly from the member list
//! (so both paths give the same bits), a worker SIGKILLed mid-collective leaves the
//! survivors with the usual typed error and their buffers restored, nothing is left in
//! `/dev/shm`, and a worker blocked on a shared-memory link burns no CPU.
//!
//! Tests run one at a time, every wait is bounded, and children are SIGKILLed and
//! reaped when a test ends, passes or panics.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;

/// Shared-memory segments process `pid` has mapped (`/proc/PID/maps` names the file,
/// "(deleted)" once unlinked).
fn mapped_segments(pid: &str) -> usize {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let mut names: Vec<&str> = maps.lines().filter_map(|l| l.split_whitespace().nth(5)).collect();
    names.retain(|n| n.starts_with("/dev/shm/phalanx-"));
    names.sort_unstable();
    names.dedup();
    names.len()
}

/// Segment files in /dev/shm made by any of `pids`.
fn segment_files(pids: &[String]) -> Vec<String> {
    let prefixes: Vec<String> = pids.iter().map(|p| format!("phalanx-{p}-")).collect();
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| prefixes.iter().any(|p| n.starts_with(p)))
                .collect()
        })
        .unwrap_or_default()
}

/// CPU seconds process `pid` has used (utime + stime of /proc/PID/stat).
fn cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<u64> = rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect();
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the state.
    let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    ticks as f64 / clock_ticks_per_sec()
}

/// Clock ticks per second (`getconf CLK_TCK`), 100 where it cannot be read.
fn clock_ticks_per_sec() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Runs `n` workers (ids 1..=n) with `shm` until each has a step numbered `last` or
/// later over all `n`; returns the cluster, the workers, and how many segments each had
/// mapped meanwhile.
fn run_steps(n: usize, len: usize, shm: &str, last: u64) -> (Cluster, Vec<usize>, Vec<usize>) {
    let mut c = Cluster::start(None);
    let first = c.worker("w0", len, &["--shm", shm, "--peer-id", "1"]);
    c.wait(Duration::from_secs(20), "w0 to join", |c| c.id(first));
    let mut ws = vec![first];
    for k in 1..n {
        let id = (k + 1).to_string();
        ws.push(c.worker(&format!("w{k}"), len, &["--shm", shm, "--peer-id", &id]));
    }
    c.wait(Duration::from_secs(45), "steps over all members on every worker", |c| {
        ws.iter().all(|&w| c.steps(w).iter().any(|s| s.members.len() == n && s.step >= last)).then_some(())
    });
    let mapped = ws.iter().map(|&w| mapped_segments(&c.pid(w))).collect();
    (c, ws, mapped)
}

#[test]
fn all_reduce_over_shared_memory_is_exact_and_equal_to_quic() {
    let _serial = serial();
    const N: usize = 3;
    const LEN: usize = 1 << 18;
    // Per transport: (step, members) -> (sum, model) hashes of the full steps.
    let mut runs = Vec::new();
    for shm in ["auto", "off"] {
        // Steps before all have joined differ between runs; by step 12 both have
        // full steps at the same step numbers.
        let (mut c, ws, mapped) = run_steps(N, LEN, shm, 12);
        let pids: Vec<String> = ws.iter().map(|&w| c.pid(w)).collect();
        match shm {
            // Every worker holds a segment per other worker, unlinked already.
            "auto" => assert_eq!(mapped, vec![N - 1; N], "shared memory not used\n{}", c.dump()),
            _ => assert_eq!(mapped, vec![0; N], "shared memory used although off"),
        }
        assert!(segment_files(&pids).is_empty(), "segment files left: {:?}", segment_files(&pids));
        c.stop();
        // Every sum is the exact sum of the members' gradients, bitwise.
        c.check_steps(&ws);
        let full: std::collections::BTreeMap<u64, (String, String)> = c
            .steps(ws[0])
            .into_iter()
            .filter(|s| s.members.len() == N)
            .map(|s| (s.step, (s.sum.clone(), s.model.clone())))
            .collect();
        runs.push(full);
        assert!(segment_files(&pids).is_empty());
    }
    // The same peers (ids 1..=3) at the same steps: the same bits on both paths.
    let common: Vec<u64> = runs[0].keys().filter(|k| runs[1].contains_key(k)).copied().collect();
    assert!(!common.is_empty(), "no step over all members in both runs: {runs:?}");
    for step in common {
        assert_eq!(runs[0][&step].0, runs[1][&step].0, "step {step}: shared memory and QUIC sums differ");
    }
}

#[test]
fn sigkill_mid_collective_over_shared_memory() {
    let _serial = serial();
    let started = Instant::now();
    const N: usize = 3;
    // 16 MiB of f32: an all-reduce takes long enough in a debug build to kill inside it.
    const LEN: usize = 4 << 20;
    let (mut c, ws, mapped) = run_steps(N, LEN, "auto", 0);
    assert_eq!(mapped, vec![N - 1; N], "shared memory not used\n{}", c.dump());
    let pids: Vec<String> = ws.iter().map(|&w| c.pid(w)).collect();
    let full = c.steps(ws[0]).into_iter().find(|s| s.members.len() == N).expect("a full step");

    let victim = ws[1];
    let survivors: Vec<usize> = ws.iter().copied().filter(|&w| w != victim).collect();
    let from = c.log(victim).len();
    let (step, epoch) = c.wait(Duration::from_secs(20), "the victim's next all-reduce", |c| {
        c.find(victim, from, |e| e.is("allreduce_start")).map(|(_, e)| (e.u64("step"), e.u64("epoch")))
    });
    // Into the all-reduce: a debug build reduces 16 MiB in far more than this.
    std::thread::sleep(Duration::from_millis(30));
    let killed = Instant::now();
    c.procs[victim].child.kill().expect("SIGKILL the victim");
    let marks: Vec<usize> = survivors.iter().map(|&w| c.log(w).len()).collect();
    assert_eq!(epoch, full.epoch, "the view changed before the kill");

    let failures = c.wait(Duration::from_secs(15), "every survivor's failed attempt", |c| {
        survivors
            .iter()
            .zip(&marks)
            .map(|(&w, &k)| {
                // The survivor may have finished its part before the kill was seen, so
                // look from before the kill too.
                let k = k.saturating_sub(4);
                c.find(w, k, |e| e.is("attempt_failed") && e.u64("step") == step).map(|(_, e)| e.clone())
            })
            .collect::<Option<Vec<Ev>>>()
    });
    for (&w, f) in survivors.iter().zip(&failures) {
        let name = &c.procs[w].name;
        assert!(["PeerLost", "Aborted"].contains(&f.str("kind")), "{name}: {}", f.v);
        assert_eq!(f.v["restored"], true, "{name} did not get its buffer back: {}", f.v);
        eprintln!(
            "sigkill over shm: {name} failed {} ms after the kill ({})",
            f.at.saturating_duration_since(killed).as_millis(),
            f.str("kind")
        );
    }
    // The retry runs over the survivors and sums exactly their gradients.
    let two: BTreeSet<u64> = c.ids(&survivors);
    let retried = c.wait(Duration::from_secs(40), "every survivor's retried step", |c| {
        survivors
            .iter()
            .map(|&w| c.steps(w).into_iter().find(|s| s.step >= step && s.epoch > epoch))
            .collect::<Option<Vec<_>>>()
    });
    // Nothing of the dead worker is left in /dev/shm, nor of anyone's.
    assert!(segment_files(&pids).is_empty(), "segment files left: {:?}", segment_files(&pids));
    c.stop();
    for s in &retried {
        assert_eq!(s.member_set(), two, "the retry is not over the survivors: {s:?}");
    }
    for &w in &survivors {
        assert!(
            c.steps(w).iter().all(|s| !(s.step == step && s.epoch == epoch)),
            "{} committed step {step} of the aborted epoch {epoch}",
            c.procs[w].name
        );
    }
    c.check_steps(&ws);
    assert!(segment_files(&pids).is_empty(), "segment files left: {:?}", segment_files(&pids));
    eprintln!("sigkill over shm: test {} ms", started.elapsed().as_millis());
}

#[test]
fn a_worker_blocked_on_shared_memory_uses_no_cpu() {
    let _serial = serial();
    let mut c = Cluster::start(None);
    // w1 sleeps 3 s after each step: w0 waits in the next all-reduce meanwhile.
    let w0 = c.worker("w0", 1 << 16, &["--shm", "auto"]);
    c.wait(Duration::from_secs(20), "w0 to join", |c| c.id(w0));
    let w1 = c.worker("w1", 1 << 16, &["--shm", "auto", "--step-delay-ms", "3000"]);
    c.wait(Duration::from_secs(45), "a step over both workers", |c| {
        c.steps(w0).iter().any(|s| s.members.len() == 2).then_some(())
    });
    assert_eq!(mapped_segments(&c.pid(w0)), 1, "shared memory not used\n{}", c.dump());
    // Right after a step both made, w0 settles the next one (update_topology, then the
    // state sync, a collective over the data links) and waits there ~3 s for w1.
    let from = c.log(w1).len();
    let k = c.wait(Duration::from_secs(20), "w1's next step", |c| {
        c.find(w1, from, |e| e.is("step")).map(|(_, e)| e.u64("step"))
    });
    c.wait(Duration::from_secs(20), "w0's step", |c| c.find(w0, 0, |e| e.is("step") && e.u64("step") == k).map(|_| ()));
    std::thread::sleep(Duration::from_millis(300));
    let pid = c.pid(w0);
    let (cpu0, t0) = (cpu_secs(&pid), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let (cpu1, t1) = (cpu_secs(&pid), Instant::now());
    // Still blocked through the window: w0's next all-reduce began after it.
    let next_at = c.wait(Duration::from_secs(20), "w0's next all-reduce", |c| {
        c.find(w0, 0, |e| e.is("allreduce_start") && e.u64("step") == k + 1).map(|(_, e)| e.at)
    });
    assert!(next_at >= t1, "w0 was not blocked through the window\n{}", c.dump());
    let used = cpu1 - cpu0;
    eprintln!("blocked worker: {:.3} CPU s in {:.3} s", used, (t1 - t0).as_secs_f64());
    // A spinning waiter would use about a whole second here.
    assert!(used < 0.1, "w0 used {used:.3} CPU seconds in 1 s while blocked");
    c.stop();
    c.check_steps(&[w0, w1]);
}
