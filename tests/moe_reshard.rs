//! Re-sharding every K iterations ([`phalanx::moe::ReshardEvery`]) across 4 in-process
//! peers: 8 experts trained with momentum SGD under a router whose hot experts shift;
//! every 2 iterations the devices plan the next owners from the predicted loads and
//! move parameters and momentum there. After each re-shard every expert's parameters
//! and momentum are on its new owner bitwise, and at the end they equal a
//! single-process run of the same iterations bitwise.

use phalanx::moe::{
    place, plan_sharding, ExpertPlacement, LoadPredictor, MoeLayer, PlaceParams, ReshardEvery, Sharding,
};
use phalanx::{Communicator, Config};

mod common;
use common::with_timeout;

const DEVICES: usize = 4;
const EXPERTS: usize = 8;
const LEN: usize = 3; // elements per expert
const ITERATIONS: usize = 7;
const LR: f32 = 0.1;
const BETA: f32 = 0.9;

/// A float with a full mantissa, so that sums depend on their order.
fn float(seed: u64) -> f32 {
    let x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
    (x as f32 / (1u64 << 24) as f32) - 0.5
}

/// The gate's counts in iteration `it`: expert `(it / 2) % 8` and its neighbour hot.
fn loads(it: usize) -> Vec<f64> {
    let hot = (it / 2) % EXPERTS;
    (0..EXPERTS)
        .map(|e| {
            if e == hot {
                60.0
            } else if e == (hot + 3) % EXPERTS {
                30.0
            } else {
                4.0
            }
        })
        .collect()
}

/// Device `d`'s gradient of expert `e` in iteration `it`, where it holds a replica.
fn grad(it: usize, d: usize, e: usize, k: usize) -> f32 {
    float((((it * DEVICES + d) * EXPERTS + e) * LEN + k) as u64)
}

fn initial(e: usize, k: usize) -> f32 {
    float(1_000_000 + (e * LEN + k) as u64)
}

/// What every device plans alike: the sharding of each iteration (after any re-shard)
/// and the holders of each expert.
struct Schedule {
    shardings: Vec<Sharding>,
    holders: Vec<Vec<Vec<usize>>>,
    placements: Vec<ExpertPlacement>,
}

fn schedule(policy: &ReshardEvery) -> Schedule {
    let layer = MoeLayer::new(EXPERTS, 4 * LEN as u64);
    let mut sharding = plan_sharding(&policy.capacities, &[layer]).expect("sharding");
    let mut predictor = LoadPredictor::new(EXPERTS);
    let (mut shardings, mut holders, mut placements) = (Vec::new(), Vec::new(), Vec::new());
    for it in 0..ITERATIONS {
        if policy.due(it) {
            sharding = policy.plan(&sharding, &[predictor.predict()]).expect("re-plan");
        }
        let predicted = predictor.predict().unwrap_or_else(|| loads(it));
        let p = place(sharding.owners(0), DEVICES, &predicted, PlaceParams { overlap: 2, slots: 2 }, None)
            .expect("placement");
        holders.push((0..EXPERTS).map(|e| p.holders(e).to_vec()).collect());
        placements.push(p);
        shardings.push(sharding.clone());
        predictor.observe(&loads(it)).expect("observe");
    }
    Schedule { shardings, holders, placements }
}

/// The single-process run: each expert's gradient summed over its holders ascending
/// (as spRS adds them), then momentum SGD.
fn reference(s: &Schedule) -> Vec<(Vec<f32>, Vec<f32>)> {
    let mut w: Vec<f32> = (0..EXPERTS * LEN).map(|i| initial(i / LEN, i % LEN)).collect();
    let mut v = vec![0.0f32; EXPERTS * LEN];
    let mut after = Vec::new();
    for it in 0..ITERATIONS {
        for e in 0..EXPERTS {
            for k in 0..LEN {
                let hs = &s.holders[it][e];
                let g = hs[1..].iter().fold(grad(it, hs[0], e, k), |a, &d| a + grad(it, d, e, k));
                let i = e * LEN + k;
                v[i] = BETA * v[i] + g;
                w[i] -= LR * v[i];
            }
        }
        after.push((w.clone(), v.clone()));
    }
    after
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn resharding_every_k_moves_the_state_and_training_matches_a_single_process() {
    let policy = ReshardEvery { k: 2, capacities: vec![1000; DEVICES] };
    let s = schedule(&policy);
    let want = reference(&s);
    let moved: usize =
        (1..ITERATIONS).map(|it| s.shardings[it - 1].moves_to(&s.shardings[it]).expect("moves").len()).sum();
    assert!(moved > 0, "the shifting router never moved an expert");

    let out = with_timeout(30, || {
        let comms = Communicator::local_group(DEVICES, Config::default()).expect("local group");
        std::thread::scope(|scope| {
            let s = &s;
            let (policy, want) = (&policy, &want);
            let hs: Vec<_> = comms
                .into_iter()
                .map(|mut c| {
                    scope.spawn(move || {
                        let d = c.rank();
                        let owns = |sh: &Sharding, e: usize| sh.owners(0)[e] == d;
                        // Owned slots hold the state, the others NaN.
                        let mut w: Vec<f32> = (0..EXPERTS * LEN)
                            .map(|i| if owns(&s.shardings[0], i / LEN) { initial(i / LEN, i % LEN) } else { f32::NAN })
                            .collect();
                        let mut v: Vec<f32> = (0..EXPERTS * LEN)
                            .map(|i| if owns(&s.shardings[0], i / LEN) { 0.0 } else { f32::NAN })
                            .collect();
                        let mut checked = 0;
                        for it in 0..ITERATIONS {
                            let sh = &s.shardings[it];
                            if policy.due(it) {
                                let before = &s.shardings[it - 1];
                                let moves = policy
                                    .move_state(&mut c, before, sh, 0, &mut [&mut w[..], &mut v[..]])
                                    .expect("re-shard");
                                assert_eq!(moves, before.moves_to(sh).expect("moves"));
                                // Every expert this device now owns holds the state it had
                                // after the last iteration, bitwise.
                                for e in (0..EXPERTS).filter(|&e| owns(sh, e)) {
                                    let r = e * LEN..(e + 1) * LEN;
                                    assert_eq!(bits(&w[r.clone()]), bits(&want[it - 1].0[r.clone()]), "it {it}, e {e}");
                                    assert_eq!(bits(&v[r.clone()]), bits(&want[it - 1].1[r]), "it {it}, e {e}");
                                    checked += 1;
                                }
                            }
                            // The gradients of the replicas held here, reduced to the owners.
                            let holds = |e: usize| s.holders[it][e].contains(&d);
                            let mut g: Vec<f32> = (0..EXPERTS * LEN)
                                .map(|i| if holds(i / LEN) { grad(it, d, i / LEN, i % LEN) } else { 0.0 })
                                .collect();
                            let placement = s.placements[it].to_sparse(LEN).expect("placement");
                            c.sparse_reduce_scatter(&placement, &mut g, phalanx::ReduceOp::Sum).expect("spRS");
                            for i in (0..EXPERTS * LEN).filter(|&i| owns(sh, i / LEN)) {
                                v[i] = BETA * v[i] + g[i];
                                w[i] -= LR * v[i];
                            }
                        }
                        let last = &s.shardings[ITERATIONS - 1];
                        let mine: Vec<(usize, Vec<u32>, Vec<u32>)> = (0..EXPERTS)
                            .filter(|&e| owns(last, e))
                            .map(|e| (e, bits(&w[e * LEN..(e + 1) * LEN]), bits(&v[e * LEN..(e + 1) * LEN])))
                            .collect();
                        (mine, checked)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("device thread")).collect::<Vec<_>>()
        })
    });
    let (w, v) = &want[ITERATIONS - 1];
    let mut seen = [false; EXPERTS];
    let mut checked = 0;
    for (mine, n) in out {
        checked += n;
        for (e, wb, vb) in mine {
            assert_eq!(wb, bits(&w[e * LEN..(e + 1) * LEN]), "expert {e} parameters");
            assert_eq!(vb, bits(&v[e * LEN..(e + 1) * LEN]), "expert {e} momentum");
            seen[e] = true;
        }
    }
    assert!(seen.iter().all(|&s| s), "every expert has an owner at the end");
    // Three re-shards (iterations 2, 4, 6), each checking all 8 experts on their owners.
    assert_eq!(checked, 3 * EXPERTS);
}
