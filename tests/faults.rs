//! Fault injection: a rank dies after any number of its plan's steps, and every
//! survivor must fail cleanly (buffer restored, `PeerLost` or `Aborted`), never hang,
//! and never keep a result that the group did not complete.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use phalanx::collective::Tuning;
use phalanx::plan::allreduce::{self, Algorithm};
use phalanx::plan::{broadcast, gather, reduce, Plan};
use phalanx::sim::{Fault, Outcome, Simulation};
use phalanx::{Communicator, Config, DType, Error, ReduceOp};

const N: usize = 4;

fn sim() -> Simulation {
    Simulation { time_limit: Duration::from_secs(10), ..Simulation::new(DType::I32, ReduceOp::Sum) }
}

/// Rank `r`'s input: `len` distinct values per rank, some negative.
fn inputs(n: usize, len: usize) -> Vec<Vec<i32>> {
    (0..n).map(|r| (0..len).map(|i| (r as i32 + 1) * 1000 - (i as i32 * 7) % 901).collect()).collect()
}

fn to_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn from_bytes(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn sum(ins: &[Vec<i32>]) -> Vec<i32> {
    let len = ins[0].len();
    (0..len).map(|i| ins.iter().fold(0i32, |a, x| a.wrapping_add(x[i]))).collect()
}

/// Whether `e` is an error a survivor may report when rank `killed` died.
fn is_loss(e: &Error, killed: usize) -> bool {
    match e {
        Error::PeerLost { rank, .. } => *rank == killed,
        Error::Aborted { .. } => true,
        _ => false,
    }
}

/// Kills every rank after every possible number of steps and checks every survivor.
///
/// `done_ok(rank, buf)` says whether a completed rank's final buffer is right; it is
/// only consulted when the killed rank had completed its whole plan.
fn kill_everywhere(what: &str, plans: &[Plan], ins: &[Vec<i32>], done_ok: impl Fn(usize, &[i32]) -> bool) {
    let n = plans.len();
    let bufs: Vec<Vec<u8>> = ins.iter().map(|x| to_bytes(x)).collect();
    // Without a fault, everyone completes correctly.
    for (r, o) in sim().run(plans, bufs.clone()).iter().enumerate() {
        match o {
            Outcome::Done(buf) => assert!(done_ok(r, &from_bytes(buf)), "{what}: rank {r}"),
            other => panic!("{what}: fault-free rank {r} ended {other:?}"),
        }
    }
    for k in 0..n {
        let total = plans[k].steps.len();
        for s in 0..=total {
            let case = format!("{what}: rank {k} dies after {s} of {total} steps");
            let sim = Simulation { fault: Some(Fault { rank: k, after_steps: s }), ..sim() };
            let outcomes = sim.run(plans, bufs.clone());
            assert_eq!(outcomes.len(), n, "{case}");
            assert_eq!(outcomes[k], Outcome::Killed, "{case}");
            let mut completed = Vec::new();
            for (r, o) in outcomes.iter().enumerate().filter(|&(r, _)| r != k) {
                match o {
                    Outcome::Failed { error, buf } => {
                        assert!(is_loss(error, k), "{case}: rank {r} failed with {error:?}");
                        assert_eq!(buf, &bufs[r], "{case}: rank {r}'s buffer not restored");
                    }
                    Outcome::Done(buf) => {
                        assert!(s == total, "{case}: rank {r} completed although rank {k} never did");
                        assert!(done_ok(r, &from_bytes(buf)), "{case}: rank {r} wrong");
                        completed.push(r);
                    }
                    Outcome::Hung => panic!("{case}: rank {r} hung"),
                    Outcome::Killed => panic!("{case}: rank {r} killed but not the victim"),
                }
            }
            // All survivors agree on whether the collective completed.
            assert!(completed.is_empty() || completed.len() == n - 1, "{case}: only ranks {completed:?} completed");
        }
    }
}

#[test]
fn all_reduce_survivors_fail_cleanly_at_every_step() {
    // 100 i32 elements = 400 bytes: many 64-byte chunks per segment; 1 and 7 leave some
    // segments empty or uneven.
    for len in [0, 1, 7, 100, 1000] {
        let ins = inputs(N, len);
        let expect = sum(&ins);
        for algo in [Algorithm::Ring, Algorithm::RecursiveDoubling] {
            let plans: Vec<Plan> = (0..N).map(|r| allreduce::plan(r, N, len, 4, algo)).collect();
            kill_everywhere(&format!("all-reduce {algo:?} len {len}"), &plans, &ins, |_, b| b == expect.as_slice());
        }
    }
}

#[test]
fn all_reduce_non_power_of_two_groups() {
    // Recursive doubling's fold-in/fold-out steps and the ring with 3 and 5 ranks.
    for n in [3, 5] {
        let len = 37;
        let ins = inputs(n, len);
        let expect = sum(&ins);
        for algo in [Algorithm::Ring, Algorithm::RecursiveDoubling] {
            let plans: Vec<Plan> = (0..n).map(|r| allreduce::plan(r, n, len, 4, algo)).collect();
            kill_everywhere(&format!("all-reduce {algo:?} n {n}"), &plans, &ins, |_, b| b == expect.as_slice());
        }
    }
}

#[test]
fn broadcast_chain_survivors_fail_cleanly() {
    let len = 100;
    let ins = inputs(N, len);
    for root in [0, 2] {
        let plans: Vec<Plan> = (0..N).map(|r| broadcast::chain(r, N, root, len)).collect();
        let want = ins[root].clone();
        kill_everywhere(&format!("broadcast chain root {root}"), &plans, &ins, |_, b| b == want.as_slice());
    }
}

#[test]
fn broadcast_tree_survivors_fail_cleanly() {
    let len = 100;
    let ins = inputs(N, len);
    let plans: Vec<Plan> = (0..N).map(|r| broadcast::tree(r, N, 1, len)).collect();
    let want = ins[1].clone();
    kill_everywhere("broadcast tree root 1", &plans, &ins, |_, b| b == want.as_slice());
}

#[test]
fn reduce_chain_survivors_fail_cleanly() {
    let len = 100;
    let ins = inputs(N, len);
    let expect = sum(&ins);
    for root in [0, 3] {
        let plans: Vec<Plan> = (0..N).map(|r| reduce::chain(r, N, root, len)).collect();
        // Non-root buffers are scratch: only the root's result is defined.
        kill_everywhere(&format!("reduce chain root {root}"), &plans, &ins, |r, b| r != root || b == expect.as_slice());
    }
}

#[test]
fn reduce_tree_survivors_fail_cleanly() {
    let len = 100;
    let ins = inputs(N, len);
    let expect = sum(&ins);
    let plans: Vec<Plan> = (0..N).map(|r| reduce::tree(r, N, 2, len)).collect();
    kill_everywhere("reduce tree root 2", &plans, &ins, |r, b| r != 2 || b == expect.as_slice());
}

#[test]
fn reduce_scatter_and_all_gather_survivors_fail_cleanly() {
    let len = 103;
    let ins = inputs(N, len);
    let expect = sum(&ins);
    let segs = phalanx::plan::segments::equal(len, N);
    let plans: Vec<Plan> = (0..N).map(|r| gather::reduce_scatter(r, N, len)).collect();
    kill_everywhere("reduce-scatter", &plans, &ins, |r, b| b[segs[r].clone()] == expect[segs[r].clone()]);

    let counts = [30, 0, 50, 23];
    let segs = phalanx::plan::segments::from_counts(&counts);
    let plans: Vec<Plan> = (0..N).map(|r| gather::reduce_scatter_v(r, &counts)).collect();
    kill_everywhere("reduce-scatter-v", &plans, &ins, |r, b| b[segs[r].clone()] == expect[segs[r].clone()]);

    // All-gather: rank r's segment of its own buffer is its contribution.
    let plans: Vec<Plan> = (0..N).map(|r| gather::all_gather_v(r, &counts)).collect();
    let gathered: Vec<i32> = (0..len).map(|i| ins[segs.iter().position(|s| s.contains(&i)).expect("seg")][i]).collect();
    kill_everywhere("all-gather-v", &plans, &ins, |_, b| b == gathered.as_slice());
}

#[test]
fn barrier_survivors_fail_cleanly() {
    for n in [2, 3, 4, 5] {
        let plans: Vec<Plan> = (0..n).map(|r| reduce::barrier(r, n)).collect();
        kill_everywhere(&format!("barrier n {n}"), &plans, &inputs(n, 0), |_, _| true);
    }
}

/// Runs `f` on every rank of a local group and collects `(rank, result)` as they come,
/// giving up after `limit`.
fn run_group_within<R: Send + 'static>(
    n: usize,
    config: Config,
    limit: Duration,
    f: impl Fn(Communicator) -> Option<R> + Send + Sync + 'static,
) -> Vec<(usize, R)> {
    let comms = Communicator::local_group(n, config).expect("local group");
    let f = std::sync::Arc::new(f);
    let (tx, rx) = mpsc::channel();
    for comm in comms {
        let (f, tx) = (f.clone(), tx.clone());
        std::thread::spawn(move || {
            let rank = comm.rank();
            if let Some(r) = f(comm) {
                let _ = tx.send((rank, r));
            }
        });
    }
    drop(tx);
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(x) => out.push(x),
            Err(mpsc::RecvTimeoutError::Disconnected) => return out,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("ranks did not return within {limit:?}; got {}", out.len())
            }
        }
    }
}

#[test]
fn dropped_communicator_fails_the_others_with_peer_lost() {
    for (algo, len) in [(Algorithm::Ring, 1000), (Algorithm::RecursiveDoubling, 5), (Algorithm::Ring, 0)] {
        for victim in 0..3 {
            let config = Config {
                tuning: Tuning { allreduce: algo, chunk_bytes: 64, ..Tuning::default() },
                ..Config::default()
            };
            let start = Instant::now();
            let results = run_group_within(3, config, Duration::from_secs(10), move |mut c| {
                if c.rank() == victim {
                    drop(c);
                    return None;
                }
                let input: Vec<f32> = (0..len).map(|i| (c.rank() * 100 + i) as f32).collect();
                let mut buf = input.clone();
                let r = c.all_reduce(&mut buf, ReduceOp::Sum);
                Some((r, buf == input))
            });
            let case = format!("{algo:?} len {len}, rank {victim} dropped");
            assert_eq!(results.len(), 2, "{case}");
            for (rank, (result, unchanged)) in results {
                match result {
                    Err(Error::PeerLost { rank: lost, .. }) => {
                        assert_eq!(lost, victim, "{case}: rank {rank}: {result:?}")
                    }
                    other => panic!("{case}: rank {rank} got {other:?}"),
                }
                assert!(unchanged, "{case}: rank {rank}'s buffer changed");
            }
            assert!(start.elapsed() < Duration::from_secs(5), "{case}: too slow");
        }
    }
}
