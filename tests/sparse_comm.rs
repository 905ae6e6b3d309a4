//! The sparse collectives and all-to-all through [`Communicator`]: local groups against
//! naive references (property tests), the dense switch of the sparse all-reduce, lost
//! ranks in local groups, and a networked group (in-memory network, master) where a
//! peer dies and the survivors retry exactly.

use std::time::Duration;

use phalanx::comm::{crossover_density, takes_dense_path, RetryPolicy, SparseReduced};
use phalanx::plan::sparse::Placement;
use phalanx::{Communicator, Config, Error, ReduceOp};
use proptest::prelude::*;

mod common;
use common::{admit, cluster, group, join, with_timeout};

/// Runs `f` on every rank of a local group of `n`, each on its own thread; aborts the
/// process if the group takes longer than 30 s (a hang must fail the run).
fn on_group<R: Send>(n: usize, f: impl Fn(&mut Communicator) -> R + Sync) -> Vec<R> {
    with_timeout(30, || {
        let comms = Communicator::local_group(n, Config::default()).expect("local group");
        std::thread::scope(|s| {
            let f = &f;
            let hs: Vec<_> = comms.into_iter().map(|mut c| s.spawn(move || f(&mut c))).collect();
            hs.into_iter().map(|h| h.join().expect("rank thread")).collect()
        })
    })
}

fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// A float whose sums depend on the order of addition.
fn float(x: u64) -> f32 {
    ((x % 2_000_001) as f32 - 1_000_000.0) * 1.37e-3 * 10f32.powi((x >> 40) as i32 % 7)
}

#[test]
fn fssdp_example_through_communicators() {
    let owners = vec![0, 0, 1, 1, 2, 2, 3, 3];
    let mut extra = vec![vec![]; 8];
    extra[0] = vec![0, 1, 2, 3];
    extra[4] = vec![0, 1, 2, 3];
    let p = Placement::new(4, vec![2; 8], owners).unwrap().widen(&extra).unwrap();
    let out = on_group(4, |c| {
        let d = c.rank();
        let mut params: Vec<f32> = (0..8)
            .flat_map(|e| if p.owners()[e] == d { [10.0 * e as f32 + 1.0, 10.0 * e as f32 + 2.0] } else { [0.0; 2] })
            .collect();
        c.sparse_all_gather(&p, &mut params).unwrap();
        let k = (d + 1) as f32;
        let mut grads = vec![-1.0f32; 16];
        grads[0..2].copy_from_slice(&[k, k]);
        grads[8..10].copy_from_slice(&[5.0 * k, k]);
        c.sparse_reduce_scatter(&p, &mut grads, ReduceOp::Sum).unwrap();
        (params, grads)
    });
    for (d, (params, grads)) in out.iter().enumerate() {
        assert_eq!(&params[0..2], &[1.0, 2.0], "d{d} holds e0");
        assert_eq!(&params[8..10], &[41.0, 42.0], "d{d} holds e4");
        if d == 0 {
            assert_eq!(&grads[0..2], &[10.0, 10.0]);
        }
        if d == 2 {
            assert_eq!(&grads[8..10], &[50.0, 10.0]);
        }
    }
}

/// Naive sparse sum: per index, ranks ascending, each rank's pairs in input order.
fn naive_sparse(inputs: &[(Vec<u32>, Vec<f32>)]) -> (Vec<u32>, Vec<f32>) {
    let mut map: std::collections::BTreeMap<u32, f32> = std::collections::BTreeMap::new();
    for (idx, vals) in inputs {
        for (&i, &v) in idx.iter().zip(vals) {
            map.entry(i).and_modify(|a| *a += v).or_insert(v);
        }
    }
    map.into_iter().unzip()
}

fn sparse_inputs(n: usize, dim: usize, max_nnz: usize, seed: u64, integral: bool) -> Vec<(Vec<u32>, Vec<f32>)> {
    let mut next = rng(seed);
    (0..n)
        .map(|_| {
            let nnz = if max_nnz == 0 { 0 } else { (next() % (max_nnz as u64 + 1)) as usize };
            let idx = (0..nnz).map(|_| (next() % dim as u64) as u32).collect();
            let vals = (0..nnz).map(|_| if integral { (next() % 201) as f32 - 100.0 } else { float(next()) }).collect();
            (idx, vals)
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, max_shrink_time: 60_000, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config(24))]

    /// Below the crossover: bitwise the naive ascending-rank sums, identical everywhere.
    #[test]
    fn sparse_all_reduce_matches_reference(n in 1usize..=6, dim in 1usize..=400, seed in any::<u64>()) {
        // At most dim / (4n) pairs per rank keeps the average density under 1/(4n) ≤ crossover.
        let inputs = sparse_inputs(n, dim, dim / (4 * n), seed, false);
        let total: usize = inputs.iter().map(|x| x.0.len()).sum();
        prop_assert!(!takes_dense_path(total as u64, dim, 4));
        let out = on_group(n, |c| {
            let (idx, vals) = &inputs[c.rank()];
            c.sparse_all_reduce(dim, idx, vals).unwrap()
        });
        let (want_idx, want_vals) = naive_sparse(&inputs);
        for o in &out {
            match o {
                SparseReduced::Sparse { indices, values } => {
                    prop_assert_eq!(indices, &want_idx);
                    prop_assert_eq!(bits(values), bits(&want_vals));
                }
                SparseReduced::Dense(_) => prop_assert!(false, "dense path below the crossover"),
            }
        }
    }

    /// Any density: the dense vector of the result equals the naive one (integral values,
    /// so every order of addition gives the same sum), and every rank took the same path.
    #[test]
    fn sparse_all_reduce_any_density(n in 1usize..=6, dim in 1usize..=200, dense in 0usize..=3, seed in any::<u64>()) {
        let inputs = sparse_inputs(n, dim, dim * dense, seed, true);
        let out = on_group(n, |c| {
            let (idx, vals) = &inputs[c.rank()];
            c.sparse_all_reduce(dim, idx, vals).unwrap()
        });
        let (want_idx, want_vals) = naive_sparse(&inputs);
        let mut want = vec![0.0f32; dim];
        for (i, v) in want_idx.iter().zip(&want_vals) {
            want[*i as usize] = *v;
        }
        let total: usize = inputs.iter().map(|x| x.0.len()).sum();
        for o in &out {
            prop_assert_eq!(o.is_dense(), takes_dense_path(total as u64, dim, 4));
            prop_assert_eq!(&o.to_dense(dim), &want);
            prop_assert_eq!(o, &out[0]);
        }
    }

    #[test]
    fn all_to_all_v_matches_reference(
        counts in (1usize..=6).prop_flat_map(|n| proptest::collection::vec(
            proptest::collection::vec(prop_oneof![2 => Just(0usize), 3 => 1usize..=20], n), n)),
        seed in any::<u64>(),
    ) {
        let n = counts.len();
        let sends: Vec<Vec<i64>> = (0..n).map(|i| {
            let mut next = rng(seed ^ (i as u64 + 1));
            (0..counts[i].iter().sum::<usize>()).map(|_| next() as i64).collect()
        }).collect();
        let out = on_group(n, |c| {
            let r = c.rank();
            c.all_to_all_v(&sends[r], &counts[r]).unwrap()
        });
        for (r, (data, recv_counts)) in out.iter().enumerate() {
            let mut want = Vec::new();
            for i in 0..n {
                let start: usize = counts[i][..r].iter().sum();
                want.extend_from_slice(&sends[i][start..start + counts[i][r]]);
            }
            prop_assert_eq!(data, &want);
            prop_assert_eq!(recv_counts, &(0..n).map(|i| counts[i][r]).collect::<Vec<_>>());
        }
    }
}

#[test]
fn all_to_all_equal_counts() {
    let out = on_group(3, |c| {
        let r = c.rank() as u16;
        let input: Vec<u16> = (0..6).map(|k| 100 * r + k).collect();
        let mut output = vec![0u16; 6];
        c.all_to_all(&input, &mut output).unwrap();
        output
    });
    assert_eq!(out[0], vec![0, 1, 100, 101, 200, 201]);
    assert_eq!(out[2], vec![4, 5, 104, 105, 204, 205]);
}

#[test]
fn dense_switch_taken_above_the_crossover_only() {
    let (n, dim) = (4usize, 1000usize);
    // Crossover 1/4 for u32 indices and f32 values on 4 ranks: total nnz 1000 of 4000.
    assert_eq!(crossover_density(n, 4, 4), 0.25);
    for (total, dense) in [(1000usize, false), (1004, true), (40, false), (3000, true)] {
        let per = total / n;
        let out = on_group(n, |c| {
            let idx: Vec<u32> = (0..per).map(|k| ((k * 7 + c.rank()) % dim) as u32).collect();
            c.sparse_all_reduce(dim, &idx, &vec![1.0f32; per]).unwrap()
        });
        for o in &out {
            assert_eq!(o.is_dense(), dense, "total nnz {total}");
            assert_eq!(o.to_dense(dim).iter().sum::<f32>(), total as f32);
        }
    }
}

#[test]
fn bad_arguments_are_rejected_before_sending() {
    let out = on_group(2, |c| {
        let p = Placement::new(3, vec![1], vec![0]).unwrap();
        let e1 = c.sparse_all_gather(&p, &mut [0f32; 1]).unwrap_err();
        let p = Placement::new(2, vec![2], vec![0]).unwrap();
        let e2 = c.sparse_reduce_scatter(&p, &mut [0f32; 3], ReduceOp::Sum).unwrap_err();
        let e3 = c.sparse_all_reduce(10, &[10], &[1.0f32]).unwrap_err();
        let e4 = c.all_to_all_v(&[1i32, 2], &[1, 0]).unwrap_err();
        [e1, e2, e3, e4].iter().all(|e| matches!(e, Error::InvalidArgument(_)))
    });
    assert!(out.iter().all(|&ok| ok));
}

/// A rank that drops its communicator instead of calling: the others fail with the loss
/// (or an abort), their inputs as they were, and nobody hangs.
#[test]
fn lost_rank_in_a_local_group_fails_every_collective_cleanly() {
    for which in 0..4 {
        let p = Placement::new(3, vec![2, 3], vec![0, 2]).unwrap().widen(&[vec![1, 2], vec![0, 1]]).unwrap();
        let out = on_group(3, |c| {
            if c.rank() == 1 {
                return None; // dropped on return: its links close
            }
            let orig: Vec<f32> = (0..5).map(|k| k as f32 * 1.5 + c.rank() as f32).collect();
            let mut buf = orig.clone();
            let err = match which {
                0 => c.sparse_all_gather(&p, &mut buf).unwrap_err(),
                1 => c.sparse_reduce_scatter(&p, &mut buf, ReduceOp::Sum).unwrap_err(),
                2 => c.all_to_all_v(&buf, &[1, 2, 2]).unwrap_err(),
                _ => c.sparse_all_reduce(100, &[3, 4, 5, 6, 7], &buf).unwrap_err(),
            };
            Some((err, buf == orig))
        });
        for (err, restored) in out.into_iter().flatten() {
            assert!(matches!(err, Error::PeerLost { .. } | Error::Aborted { .. }), "case {which}: {err:?}");
            assert!(restored, "case {which}: buffer changed");
        }
    }
}

/// A rank that dies part-way through the composite collectives, after taking part in
/// their first `k` sub-collectives (the count exchange, then the index gather): the
/// others fail cleanly at the next one, inputs untouched.
#[test]
fn rank_lost_between_the_steps_of_composites() {
    for k in 1..=2 {
        let out = on_group(3, |c| {
            let r = c.rank();
            if r == 1 {
                // The same first sub-collectives as the others' calls, then gone.
                let mut all = vec![0u64; 6];
                c.all_gather(&[2u64, 100], &mut all).unwrap();
                if k == 2 {
                    let counts: Vec<usize> = (0..3).map(|q| all[2 * q] as usize).collect();
                    let mut idx = vec![0u32; counts.iter().sum()];
                    c.all_gather_v(&[1u32, 2], &mut idx, &counts).unwrap();
                }
                return None;
            }
            let (idx, vals) = ([3u32, 4], [1.5f32, 2.5]);
            let err = c.sparse_all_reduce(100, &idx, &vals).unwrap_err();
            Some((err, idx == [3, 4] && vals == [1.5, 2.5]))
        });
        for (err, untouched) in out.into_iter().flatten() {
            assert!(matches!(err, Error::PeerLost { .. } | Error::Aborted { .. }), "after {k}: {err:?}");
            assert!(untouched);
        }
    }
    // all-to-all-v: the dying rank joins the count exchange only.
    let out = on_group(3, |c| {
        if c.rank() == 1 {
            let mut all = vec![0u64; 9];
            c.all_gather(&[1u64, 1, 1], &mut all).unwrap();
            return None;
        }
        Some(c.all_to_all_v(&[1i32, 2, 3], &[1, 1, 1]).unwrap_err())
    });
    for err in out.into_iter().flatten() {
        assert!(matches!(err, Error::PeerLost { .. } | Error::Aborted { .. }), "{err:?}");
    }
}

/// Ranks and ids of `comms`, sorted by rank.
fn ids_by_rank(comms: &[Communicator]) -> Vec<u64> {
    let mut ranked: Vec<(usize, u64)> = comms.iter().map(|c| (c.rank(), c.peer_id())).collect();
    ranked.sort_unstable();
    assert_eq!(ranked.iter().map(|r| r.0).collect::<Vec<_>>(), (0..comms.len()).collect::<Vec<_>>());
    ranked.into_iter().map(|r| r.1).collect()
}

/// A networked group (master and peers over the in-memory network, `RetryPolicy::
/// OnPeerLost`), twice losing a peer:
///
/// 1. the third peer takes part in the first step of a sparse all-reduce (the count
///    all-gather) and dies: the survivors' exchange fails in its second step and the
///    library reruns it over the two survivors; the sums are exactly theirs;
/// 2. a new third peer is admitted and dies at once: the survivors' spAG with the
///    three-rank placement fails (`PeerLost`, or the placement's size once the new view
///    is out) with buffers as they were; the caller redoes it with a placement for the
///    survivors, which gives exactly the owners' bytes.
#[test]
fn networked_peer_loss_then_exact_retry_over_survivors() {
    with_timeout(60, || {
        let c = cluster();
        let retry = RetryPolicy::OnPeerLost { max_attempts: 3 };
        let mut comms = group(&c, 3, retry);
        assert_eq!(comms[0].size(), 3);

        // Phase 1: sparse all-reduce, the third peer dies after its first step.
        let mut dying = comms.pop().unwrap();
        let survivor_ids = ids_by_rank(&comms);
        let sums: Vec<SparseReduced<f32>> = std::thread::scope(|s| {
            s.spawn(move || {
                // The count all-gather of a sparse all-reduce of dimension 64, then death.
                let mut all = [0u64; 6];
                dying.all_gather(&[2u64, 64], &mut all).unwrap();
                drop(dying);
            });
            let hs: Vec<_> = comms
                .iter_mut()
                .map(|c| {
                    s.spawn(move || {
                        assert_eq!(c.size(), 3);
                        let id = c.peer_id();
                        c.sparse_all_reduce(64, &[1u32, 5, (id % 50) as u32], &[0.1f32, 0.2, 0.3]).unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let inputs: Vec<(Vec<u32>, Vec<f32>)> =
            survivor_ids.iter().map(|id| (vec![1, 5, (id % 50) as u32], vec![0.1, 0.2, 0.3])).collect();
        let (wi, wv) = naive_sparse(&inputs);
        for sum in &sums {
            assert_eq!(sum, &SparseReduced::Sparse { indices: wi.clone(), values: wv.clone() });
        }
        assert!(comms.iter().all(|c| c.size() == 2));

        // Phase 2: spAG, a newly admitted peer dies before calling.
        admit(&mut comms, || join(&c, 103, retry));
        let p3 = Placement::new(3, vec![3; 3], vec![0, 1, 2]).unwrap().widen(&vec![vec![0, 1, 2]; 3]).unwrap();
        drop(comms.pop());
        let ids = ids_by_rank(&comms);
        let results: Vec<Vec<f32>> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter_mut()
                .map(|c| {
                    let p3 = p3.clone();
                    s.spawn(move || {
                        let id = c.peer_id();
                        let mine = |rank: usize, n: usize| -> Vec<f32> {
                            (0..3 * n)
                                .map(|k| if k / 3 == rank { (id % 1000) as f32 + k as f32 } else { -7.0 })
                                .collect()
                        };
                        let orig = mine(c.rank(), 3);
                        let mut buf = orig.clone();
                        let err = c.sparse_all_gather(&p3, &mut buf).unwrap_err();
                        assert!(matches!(err, Error::PeerLost { .. } | Error::InvalidArgument(_)), "{err:?}");
                        assert_eq!(buf, orig, "buffer restored");
                        // The caller's retry: a placement for the current view.
                        for _ in 0..20 {
                            let n = c.size();
                            let p = Placement::new(n, vec![3; n], (0..n).collect())
                                .unwrap()
                                .widen(&vec![(0..n).collect(); n])
                                .unwrap();
                            let mut buf = mine(c.rank(), n);
                            match c.sparse_all_gather(&p, &mut buf) {
                                Ok(()) => return buf,
                                Err(e) => {
                                    assert_eq!(buf, mine(c.rank(), n), "{e:?}: buffer restored");
                                    std::thread::sleep(Duration::from_millis(50));
                                }
                            }
                        }
                        panic!("spAG over the survivors never succeeded");
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for buf in &results {
            assert_eq!(buf.len(), 6, "a placement over the 2 survivors");
            for (rank, id) in ids.iter().enumerate() {
                let want: Vec<f32> = (3 * rank..3 * rank + 3).map(|k| (id % 1000) as f32 + k as f32).collect();
                assert_eq!(&buf[3 * rank..3 * rank + 3], &want[..]);
            }
        }
    });
}
