//! The pipeline runner over four in-process peers (the in-memory network): a small f32
//! MLP of 8 linear layers split into stages trains one iteration under every schedule,
//! and each stage's weight gradients and the loss equal a single-process reference with
//! the same accumulation order, bitwise; the executed order is the schedule's. A stage
//! lost mid-iteration gives every other stage a typed error naming its pass, no hang.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::with_timeout;
use phalanx::comm::ConnectOptions;
use phalanx::membership::master::{MasterConfig, DEFAULT_MAX_PEER_TIMEOUT_MS};
use phalanx::pipeline_mlp::{initial_weights, reference_gradients, Mlp, LAYERS};
use phalanx::sched::{
    by_name, simulate, Costs, Executed, Pass, RunError, Runner, Schedule, Sleeper, Stage, StageError, Step,
    DEFAULT_MESSAGE_LIMIT, RUNNER_TAG_BIT,
};
use phalanx::transport::endpoint::Endpoint;
use phalanx::transport::memnet::MemNetwork;
use phalanx::{Communicator, Error, MasterServer};

const P: usize = 4;
const M: usize = 8;

/// Stage `stage` of `schedule` at the initial weights, failing with an injected error
/// at `fail_at` (after running `on_fail`, e.g. a freeze), if any.
fn mlp(
    schedule: &Schedule,
    stage: usize,
    fail_at: Option<(Pass, usize)>,
    on_fail: Option<Arc<dyn Fn() + Send + Sync>>,
) -> Mlp {
    let m = Mlp::initial(schedule, stage);
    let Some(at) = fail_at else { return m };
    m.with_hook(Box::new(move |pass, step| {
        if (pass, step.mb) != at {
            return Ok(());
        }
        if let Some(hook) = &on_fail {
            hook();
        }
        Err(format!("injected failure at {pass:?}{}", step.mb).into())
    }))
}

/// The single-process reference of one iteration at the initial weights.
fn reference(schedule: &Schedule) -> (Vec<Vec<f32>>, f32) {
    let weights: Vec<Vec<f32>> = (0..LAYERS).map(initial_weights).collect();
    reference_gradients(schedule, 0, &weights)
}

/// One iteration of `schedule` on `comms`: per stage, its executed timeline, its
/// layers' gradients `(layer, grad)` and its losses by micro-batch.
type StageResult = (Executed, Vec<(usize, Vec<f32>)>, HashMap<usize, f32>);

fn iteration(comms: &mut [Communicator], schedule: &Schedule) -> Vec<StageResult> {
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter_mut()
            .enumerate()
            .map(|(r, comm)| {
                s.spawn(move || {
                    let runner = Runner::new(schedule.clone(), r).unwrap();
                    let mut mlp = Mlp::initial(schedule, r);
                    let executed = runner
                        .run(comm, &mut mlp as &mut dyn Stage<Elem = f32>)
                        .unwrap_or_else(|e| panic!("{} stage {r}: {e}", schedule.name));
                    (executed, mlp.grads(), mlp.losses)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

const SCHEDULES: [&str; 7] = ["1f1b", "interleaved", "zbh1", "zb2p", "zbv", "vhalf", "vmin"];

#[test]
fn every_schedule_trains_bitwise_like_one_process() {
    with_timeout(120, || {
        let mut comms = Communicator::local_group(P, Default::default()).unwrap();
        for name in SCHEDULES {
            let schedule = by_name(name, P, M, 2, &Costs::unit(), None).unwrap();
            let (want, want_loss) = reference(&schedule);
            // Two iterations on the same group: the runner's tags are reused.
            for it in 0..2 {
                let results = iteration(&mut comms, &schedule);
                let mut seen = [false; LAYERS];
                let mut losses = HashMap::new();
                for (stage, (executed, grads, stage_losses)) in results.iter().enumerate() {
                    executed.check_order(&schedule).unwrap_or_else(|e| panic!("{name}: {e}"));
                    assert_eq!(executed.stage, stage);
                    for (l, g) in grads {
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(g), bits(&want[*l]), "{name} iteration {it}: layer {l} on stage {stage}");
                        seen[*l] = true;
                    }
                    losses.extend(stage_losses.iter().map(|(&k, &v)| (k, v)));
                }
                assert!(seen.iter().all(|&s| s), "{name}: every layer is on some stage");
                let total: f32 = (0..M).map(|mb| losses[&mb]).sum();
                assert_eq!(total.to_bits(), want_loss.to_bits(), "{name}: loss {total} vs {want_loss}");
            }
        }
    });
}

#[test]
fn executed_timelines_follow_the_schedule_and_compare_with_the_simulator() {
    with_timeout(60, || {
        let mut comms = Communicator::local_group(P, Default::default()).unwrap();
        let schedule = by_name("zbv", P, M, 2, &Costs::unit(), None).unwrap();
        let results = iteration(&mut comms, &schedule);
        let origin = results.iter().map(|r| r.0.start).min().unwrap();
        for (executed, _, _) in &results {
            executed.check_order(&schedule).unwrap();
            let passes = executed.seconds_since(origin);
            assert_eq!(passes.len(), schedule.stages[executed.stage].len());
            // Each pass's compute ends after it starts, and the next starts after.
            for w in passes.windows(2) {
                assert!(w[0].1 <= w[0].2 && w[0].2 <= w[1].1, "{:?}", w);
            }
            let span = executed.span().as_secs_f64();
            let (first, last) = (passes[0].1, passes[passes.len() - 1].2);
            assert!((span - (last - first)).abs() < 1e-6);
            assert!(executed.passes.iter().all(|p| p.begin <= p.ready && p.computed <= p.end));
        }
        // A stage listed differently is named at the first difference.
        let mut other = schedule.clone();
        other.stages[1].swap(0, 1);
        let e = results[1].0.check_order(&other).unwrap_err();
        assert!(e.contains("stage 1: pass 0"), "{e}");
    });
}

/// With calibrated passes the executed per-stage spans follow the simulator's (within
/// a loose bound, 0.95-2.5x: the test machine is shared), and ZB-V and ZB-H1 beat 1F1B as simulated.
#[test]
fn calibrated_passes_take_about_the_simulated_time() {
    with_timeout(120, || {
        let unit = Duration::from_millis(20);
        let mut comms = Communicator::local_group(P, Default::default()).unwrap();
        let mut measured = HashMap::new();
        for name in ["1f1b", "zbh1", "zbv"] {
            let schedule = by_name(name, P, M, 2, &Costs::unit(), None).unwrap();
            let simulated = simulate(&schedule, &Costs::unit()).unwrap();
            let executed: Vec<Executed> = std::thread::scope(|s| {
                let hs: Vec<_> = comms
                    .iter_mut()
                    .enumerate()
                    .map(|(r, comm)| {
                        let schedule = &schedule;
                        s.spawn(move || {
                            let mut stage = Sleeper { unit, share: schedule.chunks as u32 };
                            Runner::new(schedule.clone(), r).unwrap().run(comm, &mut stage).unwrap()
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for e in &executed {
                let (span, sim) = (e.span().as_secs_f64(), simulated.spans[e.stage] * unit.as_secs_f64());
                assert!(
                    span >= sim * 0.95 && span <= sim * 2.5,
                    "{name} stage {}: ran {span:.3} s, simulated {sim:.3} s",
                    e.stage
                );
            }
            let iteration = executed.iter().map(|e| e.span()).max().unwrap();
            let sim = simulated.iteration() * unit.as_secs_f64();
            eprintln!("{name}: iteration {:.3} s, simulated {sim:.3} s", iteration.as_secs_f64());
            measured.insert(name, iteration);
        }
        // ZB-V's and ZB-H1's simulated iterations (24 and 27 units) are too close to order
        // reliably on a loaded machine (ZB-V runs twice the passes, each with its own
        // overhead); 1F1B's 33 units are not.
        assert!(measured["zbv"] < measured["1f1b"] && measured["zbh1"] < measured["1f1b"], "{measured:?}");
    });
}

/// Every stage leaves the group right after its last iteration: with `finish` first,
/// no stage fails (without it, the last stage's leaving could void the gradients the
/// first stages still receive).
#[test]
fn stages_that_finish_then_leave_fail_no_one() {
    with_timeout(60, || {
        for name in ["1f1b", "zbv"] {
            let comms = Communicator::local_group(P, Default::default()).unwrap();
            let schedule = by_name(name, P, M, 2, &Costs::unit(), None).unwrap();
            std::thread::scope(|s| {
                let hs: Vec<_> = comms
                    .into_iter()
                    .enumerate()
                    .map(|(r, mut comm)| {
                        let schedule = &schedule;
                        s.spawn(move || -> Result<(), RunError> {
                            let runner = Runner::new(schedule.clone(), r)?;
                            for _ in 0..2 {
                                runner.run(&mut comm, &mut Mlp::initial(schedule, r))?;
                            }
                            runner.finish(&mut comm)?;
                            comm.leave();
                            Ok(())
                        })
                    })
                    .collect();
                for (r, h) in hs.into_iter().enumerate() {
                    h.join().unwrap().unwrap_or_else(|e| panic!("{name} stage {r}: {e}"));
                }
            });
        }
    });
}

/// The runner's deadlock-freedom rests on this: a `send` of up to the runner's message
/// limit returns before the receiver has called `recv`.
#[test]
fn send_returns_before_the_matching_recv() {
    with_timeout(60, || {
        let mut comms = Communicator::local_group(2, Default::default()).unwrap();
        let (sent, wait) = std::sync::mpsc::channel();
        let len = DEFAULT_MESSAGE_LIMIT / 4;
        std::thread::scope(|s| {
            let (a, b) = comms.split_at_mut(1);
            let (a, b) = (&mut a[0], &mut b[0]);
            s.spawn(move || {
                // Open the link from the smaller id first, as the runner's greeting does.
                a.send(1, RUNNER_TAG_BIT | 7, &[0u8]).unwrap();
                for tag in 0..3 {
                    a.send(1, RUNNER_TAG_BIT | tag, &vec![tag as f32; len]).unwrap();
                }
                sent.send(()).unwrap();
            });
            s.spawn(move || {
                wait.recv_timeout(Duration::from_secs(30)).expect("the sends returned without a matching recv");
                b.recv(0, RUNNER_TAG_BIT | 7, &mut [0u8]).unwrap();
                for tag in (0..3).rev() {
                    let mut buf = vec![0f32; len];
                    b.recv(0, RUNNER_TAG_BIT | tag, &mut buf).unwrap();
                    assert!(buf.iter().all(|&v| v == tag as f32));
                }
            });
        });
    });
}

#[test]
fn a_message_over_the_limit_is_refused_on_both_sides() {
    with_timeout(60, || {
        let mut comms = Communicator::local_group(2, Default::default()).unwrap();
        let schedule = by_name("1f1b", 2, 2, 1, &Costs::unit(), None).unwrap();
        let errors: Vec<RunError> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter_mut()
                .enumerate()
                .map(|(r, comm)| {
                    let schedule = &schedule;
                    s.spawn(move || {
                        let runner = Runner::new(schedule.clone(), r).unwrap().message_limit(16);
                        runner.run(comm, &mut Mlp::initial(schedule, r)).unwrap_err()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (r, e) in errors.iter().enumerate() {
            assert!(matches!(e, RunError::MessageTooLarge { bytes: 72, limit: 16, .. }), "stage {r}: {e}");
            assert_eq!(e.at().map(|a| (a.stage, a.index, a.action.to_string())), Some((r, 0, "F0".to_string())));
        }
    });
}

/// Stage 2 fails at its `pass` of micro-batch 3 (after `on_fail`, if any) and leaves
/// (drops its communicator); every other stage's runner must return a communication
/// error naming its pass. Returns when each stage's runner returned.
fn a_lost_stage(
    comms: Vec<Communicator>,
    name: &str,
    pass: Pass,
    on_fail: Option<Arc<dyn Fn() + Send + Sync>>,
) -> Vec<Instant> {
    let schedule = by_name(name, P, M, 2, &Costs::unit(), None).unwrap();
    let results: Vec<(RunError, Instant, Option<Communicator>)> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(r, mut comm)| {
                let (schedule, on_fail) = (&schedule, on_fail.clone());
                s.spawn(move || {
                    let runner = Runner::new(schedule.clone(), r).unwrap();
                    let (fail_at, on_fail) = if r == 2 { (Some((pass, 3)), on_fail) } else { (None, None) };
                    let mut mlp = mlp(schedule, r, fail_at, on_fail);
                    let e = runner.run(&mut comm, &mut mlp).expect_err("the iteration cannot complete");
                    // The failed stage leaves; the others keep their communicators until
                    // every runner returned, so no error is a knock-on of a later drop.
                    (e, Instant::now(), (r != 2).then_some(comm))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, (e, _, _)) in results.iter().enumerate() {
        if r == 2 {
            assert!(matches!(e, RunError::Stage { .. }), "{name} stage 2: {e}");
            let at = e.at().unwrap();
            assert_eq!((at.action.pass, at.action.mb), (pass, 3), "{name}: {e}");
            assert!(e.to_string().contains("injected failure"), "{e}");
        } else {
            let source = e.comm_error().unwrap_or_else(|| panic!("{name} stage {r}: {e}"));
            assert!(matches!(source, Error::PeerLost { .. } | Error::Aborted { .. }), "{name} stage {r}: {e}");
            assert!(e.at().is_some(), "{name} stage {r} names its pass: {e}");
        }
    }
    results.into_iter().map(|(_, t, _)| t).collect()
}

#[test]
fn a_stage_lost_mid_iteration_fails_every_other_stage_in_a_local_group() {
    with_timeout(60, || {
        a_lost_stage(Communicator::local_group(P, Default::default()).unwrap(), "1f1b", Pass::F, None);
        a_lost_stage(Communicator::local_group(P, Default::default()).unwrap(), "zbv", Pass::B, None);
    });
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A networked group of `P` peers (ranks by peer id) on `net`, its master on a runtime
/// of its own.
fn networked(net: &MemNetwork) -> (tokio::runtime::Runtime, MasterServer, Vec<Communicator>) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let config = MasterConfig { initial_peers: P, ..MasterConfig::default() };
    let master = rt.block_on(async { MasterServer::spawn(net.endpoint(addr(1)), config) });
    let comms: Vec<Communicator> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..P as u16)
            .map(|i| {
                let net = net.clone();
                s.spawn(move || {
                    let options = ConnectOptions::new().peer_id(u64::from(i));
                    let make = move || Ok(net.endpoint(addr(100 + i)) as Arc<dyn Endpoint>);
                    Communicator::connect_with(make, addr(1), options).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(comms.iter().map(Communicator::rank).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    (rt, master, comms)
}

#[test]
fn a_stage_lost_mid_iteration_fails_every_other_stage_in_a_networked_group() {
    with_timeout(60, || {
        let net = MemNetwork::new(16);
        let (_rt, _master, comms) = networked(&net);
        a_lost_stage(comms, "zbh1", Pass::W, None);
    });
}

/// Stage 2 freezes at F3 (the network stops carrying its frames, heartbeats included,
/// as under SIGSTOP) for longer than the peer timeout: every other stage's runner
/// returns a typed error within the master's largest peer timeout plus a slack, while
/// the frozen stage is still asleep.
#[test]
fn a_frozen_stage_fails_every_other_stage_within_the_peer_timeout() {
    with_timeout(60, || {
        let net = MemNetwork::with_faults(16, 7, Duration::ZERO);
        let (_rt, _master, comms) = networked(&net);
        let frozen_at = Arc::new(std::sync::Mutex::new(None));
        let freeze = {
            let (net, frozen_at) = (net.clone(), frozen_at.clone());
            Arc::new(move || {
                net.cut(addr(102));
                *frozen_at.lock().unwrap() = Some(Instant::now());
                std::thread::sleep(FROZEN_FOR);
            })
        };
        let returned = a_lost_stage(comms, "1f1b", Pass::F, Some(freeze));
        let frozen_at = frozen_at.lock().unwrap().expect("stage 2 froze");
        let bound = Duration::from_millis(DEFAULT_MAX_PEER_TIMEOUT_MS) + SLACK;
        for (r, t) in returned.iter().enumerate().filter(|&(r, _)| r != 2) {
            let after = t.saturating_duration_since(frozen_at);
            eprintln!("stage {r} returned {after:?} after the freeze");
            assert!(after <= bound, "stage {r} returned {after:?} after the freeze; bound {bound:?}");
        }
    });
}

/// How long the frozen stage sleeps: well past the bound the others must meet.
const FROZEN_FOR: Duration = Duration::from_secs(5);
/// What the bound allows beyond the peer timeout: the master's check interval, the
/// view's way to the peers, a loaded test machine.
const SLACK: Duration = Duration::from_secs(2);

/// A stage of two: stage 0 signals `computed` from its forward of micro-batch 1;
/// stage 1 waits in its forward of micro-batch 0 until then, and a while more for the
/// activation to travel; stage 0 fails at the forward of `fail_mb`, if any.
struct Signalling {
    computed: Option<std::sync::mpsc::Sender<()>>,
    awaited: Option<std::sync::mpsc::Receiver<()>>,
    fail_mb: Option<usize>,
}

impl Stage for Signalling {
    type Elem = f32;
    fn input_len(&self, _: &Step) -> usize {
        4
    }
    fn output_len(&self, _: &Step) -> usize {
        4
    }
    fn forward(&mut self, step: &Step, _: &[f32]) -> Result<Vec<f32>, StageError> {
        if Some(step.mb) == self.fail_mb {
            return Err("injected failure".into());
        }
        if step.mb == 1 {
            if let Some(tx) = &self.computed {
                tx.send(()).map_err(|e| e.to_string())?;
            }
        }
        if step.mb == 0 {
            if let Some(rx) = &self.awaited {
                rx.recv_timeout(Duration::from_secs(30)).map_err(|e| e.to_string())?;
                // The activation of micro-batch 1 leaves stage 0 right after its
                // forward: on the in-memory network it is in long before this (a
                // second leaves room for a loaded CI machine; the assertion is on
                // structure, `early`, not on a time).
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        Ok(vec![step.mb as f32; 4])
    }
    fn backward_input(&mut self, step: &Step, _: &[f32]) -> Result<Vec<f32>, StageError> {
        Ok(vec![step.mb as f32; 4])
    }
    fn backward_weight(&mut self, _: &Step) -> Result<(), StageError> {
        Ok(())
    }
}

/// Runs 1F1B over 2 stages and 4 micro-batches with `Signalling` stages, stage 1
/// keeping `ahead` receives posted; each stage's outcome.
fn signalling_run(ahead: usize, fail_mb: Option<usize>) -> Vec<Result<Executed, RunError>> {
    let mut comms = Communicator::local_group(2, Default::default()).unwrap();
    let schedule = by_name("1f1b", 2, 4, 1, &Costs::unit(), None).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut stages = [
        Signalling { computed: Some(tx), awaited: None, fail_mb },
        Signalling { computed: None, awaited: Some(rx), fail_mb: None },
    ];
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .drain(..)
            .zip(stages.iter_mut())
            .enumerate()
            .map(|(r, (mut comm, stage))| {
                let schedule = &schedule;
                s.spawn(move || {
                    let runner =
                        Runner::new(schedule.clone(), r).unwrap().receives_ahead(if r == 1 { ahead } else { 2 });
                    let out = runner.run(&mut comm, stage);
                    if out.is_ok() {
                        runner.finish(&mut comm).unwrap();
                    }
                    // A failed stage 0 leaves here (drops its communicator).
                    out
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Stage 1 of 1F1B runs F0 BW0 F1 BW1 ...: with receives posted ahead, the receive of
/// F1's activation is posted before F0 runs, and the activation, sent by stage 0 while
/// stage 1 computes F0, is in when F1 begins. With none posted ahead, each receive is
/// posted when its pass begins.
#[test]
fn receives_are_posted_ahead_of_their_pass() {
    with_timeout(60, || {
        let out = signalling_run(2, None);
        let stage1 = out[1].as_ref().unwrap();
        let order: Vec<String> = stage1.order().iter().map(|a| a.to_string()).collect();
        assert_eq!(order, ["F0", "BW0", "F1", "BW1", "F2", "BW2", "F3", "BW3"]);
        let p = &stage1.passes;
        let f1 = &p[2];
        assert!(f1.posted.expect("F1 received its activation") < p[0].begin.max(p[0].ready), "{f1:?}");
        assert!(f1.posted.unwrap() <= p[1].begin, "posted before BW0");
        assert!(f1.early, "F1's activation was in before F1 began: {f1:?}");
        // Every forward of the last stage receives; its backwards (from the loss) do not.
        for pass in p {
            assert_eq!(pass.posted.is_some(), pass.action.pass == Pass::F, "{pass:?}");
            assert!(pass.posted.unwrap_or(pass.begin) <= pass.begin);
        }
        assert!(out[0].as_ref().unwrap().passes.iter().all(|q| q.posted.is_some() == (q.action.pass != Pass::F)));

        let out = signalling_run(0, None);
        let stage1 = out[1].as_ref().unwrap();
        for pass in stage1.passes.iter().filter(|q| q.posted.is_some()) {
            assert!(pass.posted.unwrap() >= pass.begin, "posted when its pass began: {pass:?}");
        }
    });
}

/// Stage 0 fails at F2 and leaves while stage 1 has the receives of F2 and F3 posted:
/// stage 1 returns the lost peer's error, naming F2 (the pass that needed the message),
/// and does not hang.
#[test]
fn a_lost_peer_fails_the_posted_receives_with_their_pass_named() {
    with_timeout(60, || {
        let out = signalling_run(2, Some(2));
        let e0 = out[0].as_ref().unwrap_err();
        assert!(matches!(e0, RunError::Stage { .. }), "{e0}");
        let e1 = out[1].as_ref().unwrap_err();
        let source = e1.comm_error().unwrap_or_else(|| panic!("{e1}"));
        assert!(matches!(source, Error::PeerLost { .. } | Error::Aborted { .. }), "{e1}");
        let at = e1.at().unwrap();
        assert_eq!((at.stage, at.index, at.action.to_string()), (1, 4, "F2".to_string()), "{e1}");
        assert!(e1.to_string().contains("receiving the activation from rank 0"), "{e1}");
    });
}
