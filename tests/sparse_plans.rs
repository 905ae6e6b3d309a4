//! Sparse all-gather / reduce-scatter (FSSDP) and all-to-all plans, run by the
//! simulator: the FSSDP example with a traffic counter on the links, property
//! tests against naive references, and a rank killed after every step of each plan.

use std::time::Duration;

use phalanx::plan::sparse::{sparse_all_gather, sparse_reduce_scatter, Placement};
use phalanx::plan::{alltoall, Plan};
use phalanx::sim::{Fault, Outcome, Simulation};
use phalanx::{DType, Error, ReduceOp};
use proptest::prelude::*;

fn sim() -> Simulation {
    Simulation { time_limit: Duration::from_secs(10), ..Simulation::new(DType::F32, ReduceOp::Sum) }
}

fn bytes(v: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

fn floats(b: &[u8]) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(b)
}

fn done(outcomes: Vec<Outcome>) -> Vec<Vec<f32>> {
    outcomes
        .into_iter()
        .enumerate()
        .map(|(r, o)| match o {
            Outcome::Done(b) => floats(&b),
            other => panic!("rank {r} ended {other:?}"),
        })
        .collect()
}

/// The example: 4 ranks, 8 experts of 2 elements, owners d0 {e0,e1}, d1 {e2,e3},
/// d2 {e4,e5}, d3 {e6,e7}; every rank also holds e0 and e4.
fn fssdp_example() -> Placement {
    let owners = vec![0, 0, 1, 1, 2, 2, 3, 3];
    let p = Placement::new(4, vec![2; 8], owners).expect("placement P");
    let mut extra = vec![vec![]; 8];
    extra[0] = vec![0, 1, 2, 3];
    extra[4] = vec![0, 1, 2, 3];
    p.widen(&extra).expect("placement P'")
}

#[test]
fn fssdp_example_all_gather_moves_exactly_six_experts() {
    let p = fssdp_example();
    let expert = |e: usize| [10.0 * e as f32 + 1.0, 10.0 * e as f32 + 2.0];
    // Each rank's slots: its own experts hold their values, every other slot garbage
    // (NaN with a rank-specific payload), which spAG must overwrite where held.
    let bufs: Vec<Vec<u8>> = (0..4)
        .map(|d| {
            let v: Vec<f32> = (0..8)
                .flat_map(|e| if p.owners()[e] == d { expert(e) } else { [f32::from_bits(0x7fc0_0000 | d as u32); 2] })
                .collect();
            bytes(&v)
        })
        .collect();
    let plans: Vec<Plan> = (0..4).map(|r| sparse_all_gather(r, &p)).collect();
    let (outcomes, traffic) = sim().run_counted(&plans, bufs.clone());
    let out = done(outcomes);
    for d in 0..4 {
        for e in 0..8 {
            let got = &out[d][2 * e..2 * e + 2];
            if p.holds(d, e) {
                let want = expert(e);
                assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want.map(f32::to_bits), "d{d} e{e}");
            } else {
                // Slots not held are untouched.
                assert_eq!(bytes(got), bufs[d][8 * e..8 * e + 8], "d{d} e{e} changed");
            }
        }
    }
    // One expert is 8 bytes, less than a chunk: one frame per expert transfer.
    assert_eq!(traffic.total_frames(), 6, "expert transfers");
    assert_eq!(traffic.total_bytes(), 6 * 8);
    for h in 1..4 {
        assert_eq!(traffic.frames(0, h), 1, "e0 from d0 to d{h}");
    }
    for h in [0, 1, 3] {
        assert_eq!(traffic.frames(2, h), 1, "e4 from d2 to d{h}");
    }
}

#[test]
fn fssdp_example_reduce_scatter_sums_in_rank_order() {
    let p = fssdp_example();
    let scratch = p.scratch_len();
    let bufs: Vec<Vec<u8>> = (0..4)
        .map(|d| {
            let k = (d + 1) as f32;
            let mut v = vec![0.0f32; 16 + scratch];
            for e in 0..8 {
                let g = match e {
                    0 => [k, k],
                    4 => [5.0 * k, k],
                    _ => [100.0 * e as f32 + d as f32, -1.0],
                };
                v[2 * e..2 * e + 2].copy_from_slice(&g);
            }
            bytes(&v)
        })
        .collect();
    let plans: Vec<Plan> = (0..4).map(|r| sparse_reduce_scatter(r, &p)).collect();
    let (outcomes, traffic) = sim().run_counted(&plans, bufs.clone());
    let out = done(outcomes);
    assert_eq!(&out[0][0..2], &[10.0, 10.0], "d0 owns e0");
    assert_eq!(&out[2][8..10], &[50.0, 10.0], "d2 owns e4");
    // The other experts moved nothing and every non-owner slot is untouched.
    assert_eq!(traffic.total_frames(), 6);
    for d in 0..4 {
        for e in 0..8 {
            if (e == 0 && d == 0) || (e == 4 && d == 2) {
                continue;
            }
            assert_eq!(bytes(&out[d][2 * e..2 * e + 2]), bufs[d][8 * e..8 * e + 8], "d{d} e{e}");
        }
    }
}

/// A naive spAG: each holder's slot becomes the owner's.
fn naive_all_gather(p: &Placement, ins: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let mut out = ins.to_vec();
    for c in 0..p.chunks() {
        let r = p.range(c);
        for &h in p.holders(c) {
            out[h][r.clone()].copy_from_slice(&ins[p.owners()[c]][r.clone()]);
        }
    }
    out
}

/// A naive spRS: each owner's slot becomes the left fold over the holders, ascending.
fn naive_reduce_scatter(p: &Placement, ins: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let mut out = ins.to_vec();
    for c in 0..p.chunks() {
        let holders = p.holders(c);
        for i in p.range(c) {
            let mut acc = ins[holders[0]][i];
            for &h in &holders[1..] {
                acc += ins[h][i];
            }
            out[p.owners()[c]][i] = acc;
        }
    }
    out
}

fn placement() -> impl Strategy<Value = Placement> {
    (1usize..=6)
        .prop_flat_map(|n| {
            let chunk =
                (prop_oneof![1 => Just(0usize), 4 => 1usize..=40], 0..n, proptest::collection::vec(0..n, 0..=n));
            (Just(n), proptest::collection::vec(chunk, 0..=10))
        })
        .prop_map(|(n, chunks)| {
            let lens = chunks.iter().map(|c| c.0).collect();
            let owners = chunks.iter().map(|c| c.1).collect();
            let extra: Vec<Vec<usize>> = chunks.into_iter().map(|c| c.2).collect();
            Placement::new(n, lens, owners).and_then(|p| p.widen(&extra)).expect("valid by construction")
        })
}

/// Values whose sums depend on the order of addition.
fn values(seed: u64, len: usize) -> Vec<f32> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x % 2_000_001) as f32 - 1_000_000.0) * 1.37e-3 * 10f32.powi((x >> 40) as i32 % 7)
        })
        .collect()
}

fn inputs(n: usize, len: usize, seed: u64) -> Vec<Vec<f32>> {
    (0..n).map(|r| values(seed.wrapping_add(r as u64 * 7919), len)).collect()
}

fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter().map(|x| x.iter().map(|f| f.to_bits()).collect()).collect()
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, max_shrink_time: 60_000, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn sparse_all_gather_matches_reference(p in placement(), seed in any::<u64>()) {
        let n = p.size();
        let ins = inputs(n, p.total_len(), seed);
        let plans: Vec<Plan> = (0..n).map(|r| sparse_all_gather(r, &p)).collect();
        let (outcomes, traffic) = sim().run_counted(&plans, ins.iter().map(|x| bytes(x)).collect());
        prop_assert_eq!(bits(&done(outcomes)), bits(&naive_all_gather(&p, &ins)));
        let moved: u64 = (0..p.chunks()).map(|c| (p.holders(c).len() as u64 - 1) * p.lens()[c] as u64 * 4).sum();
        prop_assert_eq!(traffic.total_bytes(), moved);
    }

    #[test]
    fn sparse_reduce_scatter_matches_reference(p in placement(), seed in any::<u64>()) {
        let n = p.size();
        let (total, scratch) = (p.total_len(), p.scratch_len());
        let ins = inputs(n, total, seed);
        let plans: Vec<Plan> = (0..n).map(|r| sparse_reduce_scatter(r, &p)).collect();
        let bufs = ins.iter().map(|x| { let mut b = bytes(x); b.resize(4 * (total + scratch), 0); b }).collect();
        let (outcomes, traffic) = sim().run_counted(&plans, bufs);
        let out: Vec<Vec<f32>> = done(outcomes).into_iter().map(|mut v| { v.truncate(total); v }).collect();
        prop_assert_eq!(bits(&out), bits(&naive_reduce_scatter(&p, &ins)));
        let moved: u64 = (0..p.chunks()).map(|c| (p.holders(c).len() as u64 - 1) * p.lens()[c] as u64 * 4).sum();
        prop_assert_eq!(traffic.total_bytes(), moved);
    }

    #[test]
    fn all_to_all_matches_reference(
        counts in (1usize..=6).prop_flat_map(|n| proptest::collection::vec(
            proptest::collection::vec(prop_oneof![2 => Just(0usize), 3 => 1usize..=30], n), n)),
        seed in any::<u64>(),
    ) {
        let n = counts.len();
        // Rank i's send area, then zeros for what it will receive.
        let sends: Vec<Vec<f32>> = (0..n).map(|i| values(seed ^ ((i as u64 + 1) * 0x9E37), counts[i].iter().sum())).collect();
        let bufs = (0..n).map(|r| { let mut b = bytes(&sends[r]); b.resize(4 * alltoall::working_len(r, &counts), 0); b }).collect();
        let plans: Vec<Plan> = (0..n).map(|r| alltoall::plan(r, &counts)).collect();
        let (outcomes, traffic) = sim().run_counted(&plans, bufs);
        let out = done(outcomes);
        for r in 0..n {
            let mut want = sends[r].clone();
            for i in 0..n {
                let start: usize = counts[i][..r].iter().sum();
                want.extend_from_slice(&sends[i][start..start + counts[i][r]]);
            }
            prop_assert_eq!(bits(&out[r..=r]), bits(&[want]));
        }
        let off_diagonal: usize = (0..n).flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| counts[i][j]).sum();
        prop_assert_eq!(traffic.total_bytes(), 4 * off_diagonal as u64);
    }
}

/// Kills every rank after every possible number of its steps: survivors fail with the
/// loss (or an abort) and their buffers restored, or, only when the killed rank had
/// finished, complete with the fault-free result. Nobody hangs.
fn kill_everywhere(what: &str, plans: &[Plan], bufs: &[Vec<u8>]) {
    let n = plans.len();
    let reference: Vec<Outcome> = sim().run(plans, bufs.to_vec());
    assert!(reference.iter().all(|o| matches!(o, Outcome::Done(_))), "{what}: fault-free run {reference:?}");
    for k in 0..n {
        let total = plans[k].steps.len();
        for s in 0..=total {
            let case = format!("{what}: rank {k} dies after {s} of {total} steps");
            let sim = Simulation { fault: Some(Fault { rank: k, after_steps: s }), ..sim() };
            let outcomes = sim.run(plans, bufs.to_vec());
            assert_eq!(outcomes[k], Outcome::Killed, "{case}");
            for (r, o) in outcomes.iter().enumerate().filter(|&(r, _)| r != k) {
                match o {
                    Outcome::Failed { error, buf } => {
                        let loss = matches!(error, Error::PeerLost { rank, .. } if *rank == k)
                            || matches!(error, Error::Aborted { .. });
                        assert!(loss, "{case}: rank {r} failed with {error:?}");
                        assert_eq!(buf, &bufs[r], "{case}: rank {r}'s buffer not restored");
                    }
                    Outcome::Done(_) => {
                        assert_eq!(s, total, "{case}: rank {r} completed although rank {k} never did");
                        assert_eq!(o, &reference[r], "{case}: rank {r} wrong");
                    }
                    other => panic!("{case}: rank {r} ended {other:?}"),
                }
            }
        }
    }
}

#[test]
fn rank_killed_during_sparse_all_gather() {
    let p = fssdp_example();
    let plans: Vec<Plan> = (0..4).map(|r| sparse_all_gather(r, &p)).collect();
    let bufs: Vec<Vec<u8>> = inputs(4, p.total_len(), 11).iter().map(|x| bytes(x)).collect();
    kill_everywhere("spAG", &plans, &bufs);
}

#[test]
fn rank_killed_during_sparse_reduce_scatter() {
    let p = fssdp_example();
    let len = p.total_len() + p.scratch_len();
    let plans: Vec<Plan> = (0..4).map(|r| sparse_reduce_scatter(r, &p)).collect();
    let bufs: Vec<Vec<u8>> = inputs(4, len, 12).iter().map(|x| bytes(x)).collect();
    kill_everywhere("spRS", &plans, &bufs);
}

#[test]
fn rank_killed_during_all_to_all() {
    let counts = vec![vec![3, 0, 40, 1], vec![2, 2, 0, 0], vec![0, 17, 1, 5], vec![9, 9, 9, 0]];
    let plans: Vec<Plan> = (0..4).map(|r| alltoall::plan(r, &counts)).collect();
    let bufs: Vec<Vec<u8>> = (0..4).map(|r| bytes(&values(r as u64 + 3, alltoall::working_len(r, &counts)))).collect();
    kill_everywhere("all-to-all", &plans, &bufs);
}
