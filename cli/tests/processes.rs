//! The membership guarantees with real processes: a `phalanx master` and `phalanx
//! worker`s talking QUIC over 127.0.0.1, killed, frozen, joined, refused and mismatched
//! while they run. Every worker prints one JSON event per line; the tests read those
//! lines and recompute every all-reduce result from the member list alone
//! ([`expected_sum`]).
//!
//! The tests run one at a time (they share two cores and heartbeat deadlines), every
//! wait is bounded, and the children are SIGKILLed and reaped when a test ends, passes
//! or panics.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use phalanx::membership::codec::CONTROL_HELLO;
use phalanx::transport::quic::{QuicConfig, QuicEndpoint, QuicError};

#[test]
fn kill_mid_collective() {
    let _serial = serial();
    let started = Instant::now();
    // 16 MiB of f32: an all-reduce over 4 processes takes seconds in a debug build, far
    // longer than it takes to deliver a SIGKILL.
    const LEN: usize = 4 << 20;
    let mut c = Cluster::start(None);
    let ws = workers(&mut c, 4, LEN, &["--steps", "0"]);
    c.wait(Duration::from_secs(45), "a step over all 4 members on every worker", |c| {
        ws.iter().all(|&w| c.steps(w).iter().any(|s| s.members.len() == 4)).then_some(())
    });
    let all = c.ids(&ws);
    let four = c.steps(ws[0]).into_iter().find(|s| s.members.len() == 4).expect("a 4-member step");
    assert_eq!(four.member_set(), all);

    let victim = ws[1];
    let survivors: Vec<usize> = ws.iter().copied().filter(|&w| w != victim).collect();
    let from = c.log(victim).len();
    let (step, epoch) = c.wait(Duration::from_secs(20), "the victim's next all-reduce", |c| {
        c.find(victim, from, |e| e.is("allreduce_start")).map(|(_, e)| (e.u64("step"), e.u64("epoch")))
    });
    let (killed, killed_ms) = (Instant::now(), unix_ms());
    c.procs[victim].child.kill().expect("SIGKILL the victim");
    let marks: Vec<usize> = survivors.iter().map(|&w| c.log(w).len()).collect();
    assert_eq!(epoch, four.epoch, "the view changed before the kill");

    // Every survivor's attempt at that step fails, with its buffer restored.
    let failures = c.wait(Duration::from_secs(15), "every survivor's failed attempt", |c| {
        survivors
            .iter()
            .zip(&marks)
            .map(|(&w, &k)| c.find(w, k, |e| e.is("attempt_failed")).map(|(_, e)| e.clone()))
            .collect::<Option<Vec<Ev>>>()
    });
    for (&w, f) in survivors.iter().zip(&failures) {
        let name = &c.procs[w].name;
        assert!(["PeerLost", "Aborted"].contains(&f.str("kind")), "{name}: {}", f.v);
        assert_eq!(f.v["restored"], true, "{name} did not get its buffer back: {}", f.v);
        assert_eq!((f.u64("step"), f.u64("epoch")), (step, epoch), "{name} failed elsewhere: {}", f.v);
        let detected = f.at.saturating_duration_since(killed);
        let by_clock = f.u64("t").saturating_sub(killed_ms);
        eprintln!(
            "kill_mid_collective: {name} failed {} ms after the kill ({}: {by_clock} ms by its clock)",
            detected.as_millis(),
            f.str("kind")
        );
        assert!(detected <= DETECTION_BOUND, "{name} noticed the loss after {detected:?} (bound {DETECTION_BOUND:?})");
    }

    // The retry of the same step runs over the 3 survivors and sums exactly their gradients.
    let three = c.ids(&survivors);
    let recovered = c.wait(Duration::from_secs(40), "every survivor's retried step", |c| {
        survivors
            .iter()
            .zip(&marks)
            .map(|(&w, &k)| {
                c.steps_from(w, k).into_iter().find(|(_, s)| s.step >= step).map(|(i, s)| (c.log(w)[i].at, s))
            })
            .collect::<Option<Vec<_>>>()
    });
    let first_ok = recovered.iter().map(|(at, _)| *at).min().expect("survivors");
    eprintln!(
        "kill_mid_collective: recovery (kill to first successful retry) {} ms; all survivors {} ms",
        first_ok.duration_since(killed).as_millis(),
        recovered.iter().map(|(at, _)| *at).max().expect("survivors").duration_since(killed).as_millis(),
    );
    // The rest needs no processes, and recomputing 16 MiB sums needs the cores.
    c.stop();
    let members: Vec<u64> = three.iter().copied().collect();
    let want = c.expected(&members, step, LEN);
    for (&w, (_, s)) in survivors.iter().zip(&recovered) {
        let name = &c.procs[w].name;
        assert_eq!(s.step, step, "{name} moved on without redoing step {step}");
        assert!(s.epoch > epoch, "{name} committed the aborted attempt: {s:?}");
        assert_eq!(s.member_set(), three, "{name}: the retry is not over the survivors");
        assert_eq!(s.sum, want, "{name}: the retry's sum is not the survivors' exact sum");
        assert_eq!((&s.sum, &s.model), (&recovered[0].1.sum, &recovered[0].1.model), "{name} disagrees");
    }
    // Nobody kept a result of the aborted attempt.
    for &w in &survivors {
        assert!(
            c.steps(w).iter().all(|s| !(s.step == step && s.epoch == epoch)),
            "{} committed step {step} of epoch {epoch}",
            c.procs[w].name
        );
    }
    c.check_steps(&ws);
    eprintln!("kill_mid_collective: test {} ms", started.elapsed().as_millis());
}

/// A SIGKILLed peer is removed when the kernel closes its liveness connection, not
/// when its heartbeats time out: with a 20 s peer timeout the survivors still go on
/// within a few seconds (a bound for the mechanism, far below the timeout; the time
/// itself is measured by `phalanx bench --recovery-peers`).
#[test]
fn killed_peer_is_removed_through_its_liveness_connection() {
    let _serial = serial();
    const LEN: usize = 1 << 16;
    const TIMEOUT: Duration = Duration::from_secs(20);
    let mut c = Cluster::start_with(None, &["--peer-timeout-ms", &TIMEOUT.as_millis().to_string()]);
    let ws = workers(&mut c, 3, LEN, &["--step-delay-ms", "5"]);
    c.wait(Duration::from_secs(30), "workers to join", |c| ws.iter().all(|&w| c.id(w).is_some()).then_some(()));
    let three = c.ids(&ws);
    steps_over(&mut c, Duration::from_secs(30), &ws, &[0, 0, 0], &three, 3);
    let (victim, survivors) = (ws[2], [ws[0], ws[1]]);
    let marks: Vec<usize> = survivors.iter().map(|&w| c.log(w).len()).collect();
    let killed = Instant::now();
    c.procs[victim].child.kill().expect("SIGKILL the victim");
    let two = c.ids(&survivors);
    let at = steps_over(&mut c, Duration::from_secs(10), &survivors, &marks, &two, 1);
    let took = at.iter().max().expect("survivors").duration_since(killed);
    eprintln!("liveness: survivors' first step without the killed peer {} ms after the kill", took.as_millis());
    assert!(took < TIMEOUT / 4, "the killed peer was noticed after {took:?}, near its {TIMEOUT:?} timeout");
    c.check_steps(&ws);
}

#[test]
fn frozen_peer() {
    let _serial = serial();
    let started = Instant::now();
    const LEN: usize = 1 << 16;
    let mut c = Cluster::start(None);
    let ws = workers(&mut c, 3, LEN, &["--step-delay-ms", "20"]);
    c.wait(Duration::from_secs(30), "workers to join", |c| ws.iter().all(|&w| c.id(w).is_some()).then_some(()));
    let all = c.ids(&ws);
    steps_over(&mut c, Duration::from_secs(30), &ws, &[0, 0, 0], &all, 3);

    let victim = ws[2];
    let survivors = [ws[0], ws[1]];
    let two = c.ids(&survivors);
    let frozen = Instant::now();
    c.signal(victim, "STOP");
    let marks: Vec<usize> = survivors.iter().map(|&w| c.log(w).len()).collect();
    let first = steps_over(&mut c, Duration::from_secs(15), &survivors, &marks, &two, 1);
    for (&w, at) in survivors.iter().zip(&first) {
        let took = at.duration_since(frozen);
        eprintln!(
            "frozen_peer: {} stepped without the frozen peer {} ms after SIGSTOP",
            c.procs[w].name,
            took.as_millis()
        );
        assert!(took <= FROZEN_BOUND, "{} needed {took:?} (bound {FROZEN_BOUND:?})", c.procs[w].name);
    }
    // Whatever it printed before it stopped has been read by now (a second later).
    let frozen_log = c.log(victim).len();
    // Once a step ran without it, every later step does.
    steps_over(&mut c, Duration::from_secs(20), &survivors, &marks, &two, 5);
    let new_epoch = c
        .steps_from(survivors[0], marks[0])
        .into_iter()
        .find(|(_, s)| s.member_set() == two)
        .expect("a step without it")
        .1;
    for &w in &survivors {
        for s in c.steps(w).iter().filter(|s| s.epoch >= new_epoch.epoch) {
            assert_eq!(s.member_set(), two, "{} ran a step with the removed peer: {s:?}", c.procs[w].name);
        }
    }
    assert_eq!(c.log(victim).len(), frozen_log, "a stopped process printed");

    let (resumed, resumed_ms) = (Instant::now(), unix_ms());
    let marks: Vec<usize> = survivors.iter().map(|&w| c.log(w).len()).collect();
    c.signal(victim, "CONT");
    let removed = c.wait(REMOVED_BOUND + Duration::from_secs(10), "the resumed peer's error and exit", |c| {
        let err = c.find(victim, frozen_log, |e| e.is("error"))?.1.clone();
        c.exited(victim).map(|status| (err, status))
    });
    let (err, status) = removed;
    let took = err.at.duration_since(resumed);
    eprintln!("frozen_peer: the resumed peer reported {} after {} ms", err.str("kind"), took.as_millis());
    assert_eq!(err.str("kind"), "Removed", "{}", err.v);
    assert!(took <= REMOVED_BOUND, "the resumed peer learnt of its removal after {took:?}");
    assert!(!status.success(), "the removed peer exited successfully");
    // After resuming, it may only finish a step the group committed before removing it
    // (the decision was waiting in its socket buffer); never one of its own.
    let survivor_steps: Vec<Step> = survivors.iter().flat_map(|&w| c.steps(w)).collect();
    for (i, s) in c.steps_from(victim, frozen_log) {
        let t = c.log(victim)[i].u64("t");
        eprintln!(
            "frozen_peer: after SIGCONT the removed peer finished step {} (t - SIGCONT = {} ms)",
            s.step,
            t as i64 - resumed_ms as i64
        );
        assert!(
            s.epoch < new_epoch.epoch && survivor_steps.contains(&s),
            "the removed peer reported a step the survivors did not commit with it: {s:?}"
        );
    }
    // The survivors go on, undisturbed.
    steps_over(&mut c, Duration::from_secs(20), &survivors, &marks, &two, 5);
    for (&w, &k) in survivors.iter().zip(&marks) {
        for (_, s) in c.steps_from(w, k) {
            assert_eq!(s.member_set(), two, "{}: {s:?}", c.procs[w].name);
        }
    }
    c.check_steps(&ws);
    eprintln!("frozen_peer: test {} ms", started.elapsed().as_millis());
}

#[test]
fn joiner_gets_state() {
    let _serial = serial();
    let started = Instant::now();
    const LEN: usize = 1 << 16;
    let mut c = Cluster::start(None);
    let ws = workers(&mut c, 2, LEN, &["--step-delay-ms", "20"]);
    c.wait(Duration::from_secs(30), "workers to join", |c| ws.iter().all(|&w| c.id(w).is_some()).then_some(()));
    let two = c.ids(&ws);
    steps_over(&mut c, Duration::from_secs(30), &ws, &[0, 0], &two, 3);

    let joining = Instant::now();
    let joiner = c.worker("joiner", LEN, &["--step-delay-ms", "20"]);
    let all3 = [ws[0], ws[1], joiner];
    c.wait(Duration::from_secs(20), "the joiner's first step", |c| c.steps(joiner).first().cloned());
    eprintln!("joiner_gets_state: joiner's first step {} ms after it started", joining.elapsed().as_millis());
    let three = c.ids(&all3);
    let order: Vec<&str> = c.log(joiner).iter().map(|e| e.str("event")).filter(|e| *e != "allreduce_start").collect();
    assert_eq!(&order[..3], ["joined", "synced", "step"], "the joiner must receive the model before its first step");
    let synced = c.find(joiner, 0, |e| e.is("synced")).expect("synced").1.clone();
    assert_eq!(synced.u64("bytes"), LEN as u64 * 4, "the joiner must receive the whole model");
    assert!(synced.u64("revision") >= 3, "the joiner got an old model: {}", synced.v);
    assert_eq!(c.steps(joiner)[0].step, synced.u64("revision"), "the joiner's first step is the model's revision");

    steps_over(&mut c, Duration::from_secs(20), &all3, &[0, 0, 0], &three, 5);
    let joiner_steps = c.steps(joiner);
    for s in &joiner_steps {
        assert_eq!(s.member_set(), three, "joiner: {s:?}");
    }
    let mut common = 0;
    for s in &joiner_steps {
        let others: Vec<Step> = ws
            .iter()
            .filter_map(|&w| c.steps(w).into_iter().find(|o| o.step == s.step && o.epoch == s.epoch))
            .collect();
        if others.len() == 2 {
            common += 1;
            for o in &others {
                assert_eq!((&o.model, &o.sum), (&s.model, &s.sum), "models differ at step {}", s.step);
            }
        }
    }
    assert!(common >= 5, "only {common} steps reported by all three");
    c.check_steps(&all3);
    eprintln!("joiner_gets_state: {common} common steps; test {} ms", started.elapsed().as_millis());
}

#[test]
fn stranger_is_refused() {
    let _serial = serial();
    let started = Instant::now();
    const LEN: usize = 1 << 16;
    let mut c = Cluster::start(Some("good"));
    let ws = workers(&mut c, 2, LEN, &["--secret", "good", "--step-delay-ms", "20"]);
    c.wait(Duration::from_secs(30), "workers to join", |c| ws.iter().all(|&w| c.id(w).is_some()).then_some(()));
    let two = c.ids(&ws);
    steps_over(&mut c, Duration::from_secs(30), &ws, &[0, 0], &two, 2);

    let attempt = Instant::now();
    let before: Vec<usize> = ws.iter().map(|&w| c.log(w).len()).collect();
    let stranger = c.worker("stranger", LEN, &["--secret", "bad"]);

    // The same from this process, over a raw QUIC connection, with a wrong secret and
    // with none.
    let master = c.master;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    for (what, config) in [("a wrong secret", QuicConfig::with_secret("bad")), ("no secret", QuicConfig::default())] {
        let t = Instant::now();
        let result = rt.block_on(async {
            let ep = QuicEndpoint::bind(SocketAddr::from(([127, 0, 0, 1], 0)), config).expect("bind");
            let hello = bytes::Bytes::from_static(CONTROL_HELLO);
            tokio::time::timeout(Duration::from_secs(15), ep.connect(master, hello)).await.map(|r| r.map(|_| ()))
        });
        match result {
            Ok(Err(QuicError::Auth(_))) => {}
            other => panic!("connecting with {what}: expected an authentication error, got {other:?}"),
        }
        eprintln!("stranger_is_refused: raw connect with {what} refused after {} ms", t.elapsed().as_millis());
    }
    drop(rt);

    let (err, status) = c.wait(REFUSED_BOUND + Duration::from_secs(5), "the stranger's error and exit", |c| {
        let err = c.find(stranger, 0, |e| e.is("error"))?.1.clone();
        c.exited(stranger).map(|s| (err, s))
    });
    let took = err.at.duration_since(attempt);
    eprintln!("stranger_is_refused: worker with the wrong secret failed after {} ms", took.as_millis());
    assert_eq!(err.str("kind"), "JoinFailed", "{}", err.v);
    assert!(took <= REFUSED_BOUND, "the stranger was refused after {took:?}");
    assert!(!status.success(), "the stranger exited successfully");
    assert!(c.id(stranger).is_none(), "the stranger joined");

    // The honest workers never noticed.
    let marks: Vec<usize> = ws.iter().map(|&w| c.log(w).len()).collect();
    steps_over(&mut c, Duration::from_secs(20), &ws, &marks, &two, 5);
    for (&w, &k) in ws.iter().zip(&before) {
        for (_, s) in c.steps_from(w, k) {
            assert_eq!(s.member_set(), two, "{}: {s:?}", c.procs[w].name);
        }
        assert!(c.find(w, k, |e| e.is("attempt_failed")).is_none(), "{} was disturbed", c.procs[w].name);
    }
    c.check_steps(&ws);
    eprintln!("stranger_is_refused: test {} ms", started.elapsed().as_millis());
}

#[test]
fn mismatch_fails_everywhere() {
    let _serial = serial();
    let started = Instant::now();
    const LEN: usize = 1 << 16;
    let mut c = Cluster::start(None);
    let first = c.worker("w0", LEN, &[]);
    c.wait(Duration::from_secs(20), "w0 to join", |c| c.id(first));
    let odd = c.worker("w1-odd", LEN, &["--len-offset", "1"]);
    let ws = [first, odd];
    let joined =
        c.wait(Duration::from_secs(20), "w1 to join", |c| c.find(odd, 0, |e| e.is("joined")).map(|(_, e)| e.at));
    let errors = c.wait(MISMATCH_BOUND + Duration::from_secs(10), "both workers' errors and exits", |c| {
        ws.iter()
            .map(|&w| {
                let err = c.find(w, 0, |e| e.is("error"))?.1.clone();
                c.exited(w).map(|s| (err, s))
            })
            .collect::<Option<Vec<_>>>()
    });
    for (&w, (err, status)) in ws.iter().zip(&errors) {
        let name = &c.procs[w].name;
        let took = err.at.saturating_duration_since(joined);
        eprintln!("mismatch_fails_everywhere: {name} failed {} ms after the second join: {}", took.as_millis(), err.v);
        assert_eq!(err.str("kind"), "Mismatch", "{name}: {}", err.v);
        assert!(took <= MISMATCH_BOUND, "{name} failed after {took:?}");
        assert!(!status.success(), "{name} exited successfully");
        let failed = c.find(w, 0, |e| e.is("attempt_failed")).map(|(_, e)| e.clone()).expect("a failed attempt");
        assert_eq!(failed.str("kind"), "Mismatch", "{name}: {}", failed.v);
        assert_eq!(failed.v["restored"], true, "{name}: {}", failed.v);
        assert!(c.steps(w).iter().all(|s| s.members.len() == 1), "{name} committed a mismatched all-reduce");
    }
    c.check_steps(&ws);
    eprintln!("mismatch_fails_everywhere: test {} ms", started.elapsed().as_millis());
}
