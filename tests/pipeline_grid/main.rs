//! Pipelines × data-parallel replicas, the optimizer post-validation, commit-or-none
//! iterations and a replacement stage, on in-process peers.
//!
//! A small f32 MLP (8 linear layers, leaky ReLU, `B` and `W` separate) is split over
//! `pp` stages; replica `r` trains micro-batches `r·M .. (r+1)·M`; each stage's
//! gradients are summed over the replicas, checked (inf/NaN, global norm) and stepped
//! with SGD with momentum. After every iteration the weights must equal a
//! single-process run with the same accumulation order, bitwise.

#[path = "../common/mod.rs"]
mod common;
mod mlp;

use mlp::{reference, same, stage_layers, Mlp, M};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::with_timeout;
use phalanx::comm::ConnectOptions;
use phalanx::membership::master::{MasterConfig, DEFAULT_MAX_PEER_TIMEOUT_MS};
use phalanx::sched::{
    by_name, Committer, Costs, GradStats, Grid, GridMap, Optimistic, Pass, Position, RunError, Runner, StageError,
    Verdict,
};
use phalanx::transport::endpoint::Endpoint;
use phalanx::transport::memnet::MemNetwork;
use phalanx::{Communicator, Error, MasterServer, ReduceOp, SharedState};

/// One iteration of one rank: run, all-reduce over the replicas, commit.
fn iterate(
    comm: &mut Communicator,
    map: &GridMap,
    runner: &Runner,
    mlp: &mut Mlp,
    max_norm: Option<f64>,
) -> Result<Verdict, RunError> {
    runner.run(comm, mlp)?;
    let mut flat = mlp.flat_grads();
    map.all_reduce_gradients(comm, &mut flat, ReduceOp::Sum)?;
    mlp.set_grads(&flat);
    let done = Committer::for_grid(map, runner, max_norm).step(comm, GradStats::of(&flat), mlp)?;
    mlp.next();
    Ok(done.verdict)
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn connect(net: &MemNetwork, port: u16) -> Communicator {
    let net = net.clone();
    let mut options = ConnectOptions::new().peer_id(u64::from(port));
    if port == 101 {
        // The peer the fault tests lose: once cut off, it gives up on the master at
        // once instead of looking for one to rejoin (its thread ends sooner).
        options = options.rejoin_within(None);
    }
    let make = move || Ok(net.endpoint(addr(port)) as Arc<dyn Endpoint>);
    Communicator::connect_with(make, addr(1), options).unwrap()
}

/// `n` networked peers on `net` (ranks in port order 100..), the master on its own runtime.
fn networked(net: &MemNetwork, n: usize) -> (tokio::runtime::Runtime, MasterServer, Vec<Communicator>) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let config = MasterConfig { initial_peers: n, ..MasterConfig::default() };
    let master = rt.block_on(async { MasterServer::spawn(net.endpoint(addr(1)), config) });
    let comms: Vec<Communicator> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..n as u16).map(|i| s.spawn(move || connect(net, 100 + i))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(comms.iter().map(Communicator::rank).collect::<Vec<_>>(), (0..n).collect::<Vec<_>>());
    (rt, master, comms)
}

/// Trains `iterations` on `comms` as a `pp × dp` grid and checks every rank's weights
/// against the reference after every iteration. Returns the verdicts seen by rank 0.
fn train(
    comms: &mut [Communicator],
    name: &str,
    grid: Grid,
    iterations: usize,
    max_norm: Option<f64>,
    nan: Option<(usize, usize, usize)>, // (iteration, global mb, stage)
) -> Vec<Verdict> {
    let schedule = by_name(name, grid.pp, M, 2, &Costs::unit(), None).unwrap();
    let ref_nan = nan.map(|(it, g, s)| (it, g, stage_layers(&schedule, s)[0]));
    let (want, verdicts) = reference(&schedule, grid.dp, iterations, max_norm, ref_nan);
    let seen = common::each(comms, |rank, comm| {
        if rank >= grid.size() {
            return None; // outside the grid: never called, never delayed
        }
        let map = grid.in_order(rank).unwrap();
        let me = map.me();
        let runner = map.runner(schedule.clone()).unwrap();
        let mut mlp = Mlp::new(&schedule, me.stage, me.replica);
        if let Some((it, g, s)) = nan {
            if s == me.stage {
                mlp.faults.nan = Some((it, g));
            }
        }
        let mut seen = Vec::new();
        for (it, want) in want.iter().enumerate() {
            let v = iterate(comm, &map, &runner, &mut mlp, max_norm).unwrap_or_else(|e| panic!("rank {rank}: {e}"));
            assert!(same(&mlp, want), "{name} {grid:?} rank {rank} ({me:?}) iteration {it}: weights differ");
            seen.push(v);
        }
        map.finish(comm).unwrap();
        Some(seen)
    });
    for s in seen.iter().flatten() {
        assert_eq!(s, &verdicts, "every rank takes the reference's verdicts");
    }
    verdicts
}

#[test]
fn a_grid_of_two_stages_by_two_replicas_equals_one_process() {
    with_timeout(60, || {
        let net = MemNetwork::new(16);
        let (_rt, _master, mut comms) = networked(&net, 4);
        let grid = Grid::new(2, 2).unwrap();
        train(&mut comms, "zbh1", grid, 3, None, None);
        train(&mut comms, "1f1b", grid, 2, None, None);
        train(&mut comms, "zbv", grid, 2, None, None);
    });
}

#[test]
fn a_grid_of_four_stages_by_two_replicas_equals_one_process() {
    with_timeout(60, || {
        let net = MemNetwork::new(16);
        let (_rt, _master, mut comms) = networked(&net, 8);
        train(&mut comms, "1f1b", Grid::new(4, 2).unwrap(), 3, None, None);
        train(&mut comms, "vhalf", Grid::new(4, 2).unwrap(), 2, None, None);
    });
}

/// Clipping at a norm the gradients exceed: every stage redoes its step clipped, and the
/// weights equal the synchronous check's (norm first, then one step), bitwise.
#[test]
fn clipping_after_the_optimistic_step_equals_the_synchronous_check() {
    with_timeout(60, || {
        let mut comms = Communicator::local_group(4, Default::default()).unwrap();
        let verdicts = train(&mut comms, "interleaved", Grid::new(4, 1).unwrap(), 3, Some(1e-3), None);
        assert!(verdicts.iter().all(|v| matches!(v, Verdict::Clip { .. })), "{verdicts:?}");
        // A limit the norm stays under keeps every step.
        let verdicts = train(&mut comms, "1f1b", Grid::new(4, 1).unwrap(), 2, Some(1e9), None);
        assert_eq!(verdicts, vec![Verdict::Keep; 2]);
    });
}

/// A grid on 4 of a group's 5 ranks: the replicas' all-reduce, the commit vote and the
/// final barrier are sub-group collectives that the fifth rank never joins.
#[test]
fn a_grid_on_part_of_a_group_leaves_the_other_ranks_alone() {
    with_timeout(60, || {
        let mut comms = Communicator::local_group(5, Default::default()).unwrap();
        let verdicts = train(&mut comms, "zbh1", Grid::new(2, 2).unwrap(), 2, Some(1e-3), None);
        assert!(verdicts.iter().all(|v| matches!(v, Verdict::Clip { .. })), "{verdicts:?}");
        common::each(&mut comms, |_, comm| comm.barrier().unwrap());
    });
}

/// A NaN in one micro-batch on stage 2 (of replica 1): no stage of either replica keeps
/// the step of that iteration, and training goes on from the weights before it.
#[test]
fn a_nan_on_one_stage_skips_the_step_on_every_stage() {
    with_timeout(60, || {
        let net = MemNetwork::new(16);
        let (_rt, _master, mut comms) = networked(&net, 8);
        let verdicts = train(&mut comms, "zbv", Grid::new(4, 2).unwrap(), 3, Some(100.0), Some((1, M + 2, 2)));
        assert_eq!(verdicts, vec![Verdict::Keep, Verdict::Skip, Verdict::Keep]);
    });
}

/// How long a frozen stage sleeps: well past the bound the others must meet.
const FROZEN_FOR: Duration = Duration::from_secs(3);
/// What the bound allows beyond the peer timeout: the master's check interval, the
/// view's way to the peers, a loaded test machine.
const SLACK: Duration = Duration::from_secs(2);

/// Whether `e` is a communication failure of a lost peer.
fn lost(e: &RunError) -> bool {
    matches!(e.comm_error(), Some(Error::PeerLost { .. } | Error::Aborted { .. }))
}

/// Stage 1 of replica 0 freezes inside its optimistic step of iteration 1 (the network
/// stops carrying its frames, as under SIGSTOP), after stage 0 of the same pipeline may
/// have stepped and while replica 1's pipeline steps and settles normally. Every other
/// rank returns a typed error within the peer timeout, and every survivor's weights are
/// those of iteration 0: the steps taken optimistically are undone.
#[test]
fn a_stage_lost_after_stepping_leaves_every_survivor_at_the_last_commit() {
    with_timeout(60, || {
        let net = MemNetwork::with_faults(16, 7, Duration::ZERO);
        let (_rt, _master, comms) = networked(&net, 4);
        let grid = Grid::new(2, 2).unwrap();
        let schedule = by_name("1f1b", 2, M, 1, &Costs::unit(), None).unwrap();
        let (want, _) = reference(&schedule, 2, 1, None, None);
        let frozen_at = Arc::new(std::sync::Mutex::new(None));
        let armed = Arc::new(AtomicBool::new(false));
        let freeze: Arc<dyn Fn() + Send + Sync> = {
            let (net, frozen_at, armed) = (net.clone(), frozen_at.clone(), armed.clone());
            Arc::new(move || {
                if armed.load(Ordering::SeqCst) {
                    net.cut(addr(101));
                    *frozen_at.lock().unwrap() = Some(Instant::now());
                    std::thread::sleep(FROZEN_FOR);
                }
            })
        };
        let results: Vec<(Result<Verdict, RunError>, Instant, bool, usize)> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .enumerate()
                .map(|(rank, mut comm)| {
                    let (schedule, want, freeze, armed) = (&schedule, &want, freeze.clone(), armed.clone());
                    s.spawn(move || {
                        let map = grid.in_order(rank).unwrap();
                        let runner = map.runner(schedule.clone()).unwrap();
                        let mut mlp = Mlp::new(schedule, map.me().stage, map.me().replica);
                        iterate(&mut comm, &map, &runner, &mut mlp, None).unwrap();
                        assert!(same(&mlp, &want[0]));
                        if rank == 1 {
                            mlp.faults.in_step = Some(freeze);
                            armed.store(true, Ordering::SeqCst);
                        }
                        let mut undone = Undos(&mut mlp, 0);
                        let r = iterate_counting(&mut comm, &map, &runner, &mut undone);
                        let undos = undone.1;
                        let at = Instant::now();
                        let kept = same(&mlp, &want[0]);
                        (r, at, kept, undos)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let frozen_at = frozen_at.lock().unwrap().expect("rank 1 froze");
        let bound = Duration::from_millis(DEFAULT_MAX_PEER_TIMEOUT_MS) + SLACK;
        for (rank, (r, at, kept, undos)) in results.iter().enumerate().filter(|(r, _)| *r != 1) {
            let e = r.as_ref().expect_err("the iteration cannot commit");
            assert!(lost(e), "rank {rank}: {e}");
            let after = at.saturating_duration_since(frozen_at);
            eprintln!("rank {rank} returned {after:?} after the freeze, undid {undos} step(s): {e}");
            assert!(after <= bound, "rank {rank} returned {after:?} after the freeze; bound {bound:?}");
            assert!(kept, "rank {rank} kept a step that the lost stage did not commit");
        }
        // Replica 1 stepped and settled before its vote failed: its steps were undone.
        assert_eq!(results[2].3, 1, "rank 2 undid its step");
        assert_eq!(results[3].3, 1, "rank 3 undid its step");
    });
}

/// Counts the undos of an optimizer.
struct Undos<'a>(&'a mut Mlp, usize);

impl Optimistic for Undos<'_> {
    fn step(&mut self, scale: f32) -> Result<(), StageError> {
        self.0.step(scale)
    }
    fn undo(&mut self) -> Result<(), StageError> {
        self.1 += 1;
        self.0.undo()
    }
}

/// [`iterate`] with the optimizer's undos counted.
fn iterate_counting(
    comm: &mut Communicator,
    map: &GridMap,
    runner: &Runner,
    opt: &mut Undos<'_>,
) -> Result<Verdict, RunError> {
    runner.run(comm, opt.0)?;
    let mut flat = opt.0.flat_grads();
    map.all_reduce_gradients(comm, &mut flat, ReduceOp::Sum)?;
    opt.0.set_grads(&flat);
    let done = Committer::for_grid(map, runner, None).step(comm, GradStats::of(&flat), opt)?;
    opt.0.next();
    Ok(done.verdict)
}

/// pp = 2 × dp = 2: the rank holding stage 1 of replica 0 is lost mid-iteration 2 (its
/// network cut at a forward, then it leaves). The survivors return typed errors with
/// the weights of iteration 1, settle the loss, admit a new peer, place it on the free
/// position (the survivors' ranks renumbered), and it fetches stage 1's weights and
/// momentum from replica 1; iterations 2 and 3 then run again, and every rank's weights
/// equal a run with no fault, bitwise.
#[test]
fn a_replacement_catches_up_from_its_replica_and_the_run_goes_on() {
    with_timeout(60, || lose_and_replace(Grid::new(2, 2).unwrap()));
}

/// pp = 2 × dp = 1: the same loss, but no replica holds stage 1. Every stage saves its
/// state at each commit (here to a map standing for a disk); the newcomer restarts from
/// the lost stage's last committed save, the survivor from its own committed weights
/// (the failed iteration was undone), and the run equals one with no fault.
#[test]
fn with_one_replica_the_run_restarts_from_the_last_commit() {
    with_timeout(60, || lose_and_replace(Grid::new(2, 1).unwrap()));
}

/// Stage states saved at each commit, by stage and replica.
type Saved = std::sync::Mutex<HashMap<Position, SharedState>>;

fn lose_and_replace(grid: Grid) {
    let net = MemNetwork::with_faults(16, 11, Duration::ZERO);
    let (_rt, _master, comms) = networked(&net, grid.size());
    let schedule = by_name("zbh1", 2, M, 1, &Costs::unit(), None).unwrap();
    let (want, _) = reference(&schedule, grid.dp, 4, None, None);
    let saved: Saved = Default::default();
    let save = |mlp: &Mlp, at: Position| saved.lock().unwrap().insert(at, mlp.state());
    let (settled, joiner_go) = std::sync::mpsc::channel::<()>();
    let cut: Arc<dyn Fn() + Send + Sync> = {
        let net = net.clone();
        Arc::new(move || net.cut(addr(101)))
    };
    let lost_at = Position { stage: 1, replica: 0 };
    std::thread::scope(|s| {
        let (schedule, want, save, saved) = (&schedule, &want, &save, &saved);
        let joiner = s.spawn(move || {
            joiner_go.recv_timeout(Duration::from_secs(30)).expect("the survivors settled the loss");
            let mut comm = connect(&net, 200);
            comm.update_topology().unwrap();
            let map = grid.place(&mut comm, None).unwrap();
            assert_eq!(map.me(), lost_at);
            assert_eq!(map.newcomers(), &[lost_at]);
            let mut mlp = Mlp::new(schedule, 1, 0);
            let mut state = mlp.state();
            if grid.dp > 1 {
                assert!(map.sync_stage_state(&mut comm, &mut state).unwrap(), "the newcomer receives");
            } else {
                let e = map.sync_stage_state(&mut comm, &mut state).unwrap_err();
                assert!(e.to_string().contains("no one holds its state"), "{e}");
                state = saved.lock().unwrap()[&lost_at].clone();
            }
            mlp.load(&state);
            assert_eq!(mlp.iteration, 2);
            assert!(same(&mlp, &want[1]), "the newcomer holds the committed weights and momentum");
            let runner = map.runner(schedule.clone()).unwrap();
            for want in &want[2..] {
                iterate(&mut comm, &map, &runner, &mut mlp, None).unwrap();
                assert!(same(&mlp, want), "the newcomer's weights");
            }
            map.finish(&mut comm).unwrap();
        });
        let hs: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, mut comm)| {
                let (cut, settled) = (cut.clone(), settled.clone());
                s.spawn(move || {
                    let map = grid.in_order(rank).unwrap();
                    let me = map.me();
                    let runner = map.runner(schedule.clone()).unwrap();
                    let mut mlp = Mlp::new(schedule, me.stage, me.replica);
                    for want in &want[..2] {
                        iterate(&mut comm, &map, &runner, &mut mlp, None).unwrap();
                        assert!(same(&mlp, want));
                        save(&mlp, me);
                    }
                    if me == lost_at {
                        mlp.faults.fail_at = Some((Pass::F, 1));
                        mlp.faults.on_fail = Some(cut);
                        let e = iterate(&mut comm, &map, &runner, &mut mlp, None).unwrap_err();
                        assert!(matches!(e, RunError::Stage { .. }), "{e}");
                        return; // the lost process: its communicator goes with it
                    }
                    let e = iterate(&mut comm, &map, &runner, &mut mlp, None).unwrap_err();
                    assert!(lost(&e), "rank {rank}: {e}");
                    assert!(same(&mlp, &want[1]), "rank {rank} is at the last commit");
                    assert_eq!(mlp.state(), saved.lock().unwrap()[&me], "rank {rank}: as saved at the last commit");
                    // Discard the failed iteration's gradients and activations.
                    mlp.grads.iter_mut().for_each(|g| g.fill(0.0));
                    mlp.cache.clear();
                    mlp.dz.clear();
                    mlp.out.clear();
                    comm.update_topology().unwrap();
                    if comm.rank() == 0 {
                        settled.send(()).unwrap();
                    }
                    while comm.size() < grid.size() {
                        if comm.peers_pending() > 0 {
                            comm.update_topology().unwrap();
                        } else {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                    let map = grid.place(&mut comm, Some(me)).unwrap();
                    assert_eq!(map.me(), me);
                    let mut state = mlp.state();
                    if me.stage != lost_at.stage || grid.dp > 1 {
                        assert!(!map.sync_stage_state(&mut comm, &mut state).unwrap());
                    }
                    let runner = map.runner(schedule.clone()).unwrap();
                    for want in &want[2..] {
                        iterate(&mut comm, &map, &runner, &mut mlp, None).unwrap();
                        assert!(same(&mlp, want), "rank {rank}'s weights after the replacement");
                    }
                    map.finish(&mut comm).unwrap();
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        joiner.join().unwrap();
    });
}

/// Stage 1's optimizer fails to step in iteration 1 (a local error, no peer lost): it
/// marks the post-validation broken, so no stage waits for it, every stage returns an
/// error and every stage's weights are those of iteration 0.
#[test]
fn a_stage_that_cannot_step_makes_every_stage_undo() {
    with_timeout(60, || {
        let mut comms = Communicator::local_group(6, Default::default()).unwrap();
        let grid = Grid::new(3, 2).unwrap();
        let schedule = by_name("1f1b", 3, M, 1, &Costs::unit(), None).unwrap();
        let (want, _) = reference(&schedule, 2, 1, None, None);
        let errors = common::each(&mut comms, |rank, comm| {
            let map = grid.in_order(rank).unwrap();
            let runner = map.runner(schedule.clone()).unwrap();
            let mut mlp = Mlp::new(&schedule, map.me().stage, map.me().replica);
            iterate(comm, &map, &runner, &mut mlp, None).unwrap();
            mlp.faults.refuse_step = rank == 1;
            let e = iterate(comm, &map, &runner, &mut mlp, None).unwrap_err();
            assert!(same(&mlp, &want[0]), "rank {rank} kept a step");
            map.finish(comm).unwrap();
            e
        });
        assert!(matches!(errors[1], RunError::Optimizer { .. }), "{}", errors[1]);
        for (rank, e) in errors.iter().enumerate().filter(|(r, _)| *r != 1) {
            assert!(matches!(e, RunError::Uncommitted { .. }), "rank {rank}: {e}");
        }
        for (rank, e) in errors.iter().enumerate() {
            assert!(e.comm_error().is_none(), "rank {rank}: no peer was lost: {e}");
            eprintln!("rank {rank}: {e}");
        }
    });
}

/// Positions follow what each rank held; newcomers fill the free ones in rank order;
/// two ranks claiming one position get the same error everywhere.
#[test]
fn placing_ranks_by_the_positions_they_held() {
    with_timeout(60, || {
        let grid = Grid::new(2, 2).unwrap();
        let mut comms = Communicator::local_group(4, Default::default()).unwrap();
        let at = |stage, replica| Position { stage, replica };
        let held = [Some(at(1, 1)), None, Some(at(0, 0)), None];
        let maps = common::each(&mut comms, |rank, comm| grid.place(comm, held[rank]).unwrap());
        let mes: Vec<Position> = maps.iter().map(GridMap::me).collect();
        assert_eq!(mes, vec![at(1, 1), at(1, 0), at(0, 0), at(0, 1)]);
        for m in &maps {
            assert_eq!(m.newcomers(), &[at(1, 0), at(0, 1)]);
            assert_eq!((m.pipeline(0), m.pipeline(1)), (vec![2, 1], vec![3, 0]));
            assert_eq!((m.dp_group(0), m.dp_group(1)), (vec![2, 3], vec![0, 1]));
        }
        let clash = [Some(at(0, 0)), Some(at(0, 0)), None, None];
        let errors = common::each(&mut comms, |rank, comm| grid.place(comm, clash[rank]).unwrap_err());
        for (rank, e) in errors.iter().enumerate() {
            assert!(matches!(e, RunError::Invalid(_)) && e.to_string().contains("held by rank 0"), "rank {rank}: {e}");
        }
        let e = grid.place(&mut comms[0], Some(at(2, 0))).unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
        common::each(&mut comms, |_, comm| comm.barrier().unwrap());
    });
}

/// The byte variant of the replicas' all-reduce sums like the typed one.
#[test]
fn the_raw_gradient_all_reduce_matches_the_typed_one() {
    with_timeout(60, || {
        let grid = Grid::new(2, 2).unwrap();
        let mut comms = Communicator::local_group(4, Default::default()).unwrap();
        let got = common::each(&mut comms, |rank, comm| {
            let map = grid.in_order(rank).unwrap();
            let mut typed = vec![rank as f32 + 0.5; 3];
            map.all_reduce_gradients(comm, &mut typed, ReduceOp::Sum).unwrap();
            let mut raw: Vec<u8> = [rank as f32 + 0.5; 3].iter().flat_map(|x| x.to_le_bytes()).collect();
            map.all_reduce_gradients_raw(comm, &mut raw, phalanx::DType::F32, ReduceOp::Sum).unwrap();
            let raw: Vec<f32> = raw.chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            map.finish(comm).unwrap();
            (typed, raw)
        });
        for (rank, (typed, raw)) in got.iter().enumerate() {
            // Stage 0 is on ranks 0 and 2, stage 1 on ranks 1 and 3.
            let want = if rank % 2 == 0 { 0.5 + 2.5 } else { 1.5 + 3.5 };
            assert_eq!(typed, &vec![want; 3], "rank {rank}");
            assert_eq!(raw, typed, "rank {rank}");
        }
    });
}
