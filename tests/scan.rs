//! All-scan: the issue's linear-attention example, left-fold references for random
//! inputs (bitwise), order of non-commutative operators, built-in operators on every
//! type, faults at every step, and a lost peer in a networked group.

use std::sync::Arc;
use std::time::Duration;

use phalanx::comm::{builtin_identity, RetryPolicy, ScanOptions};
use phalanx::dtype::Order;
use phalanx::op::{CustomOp, LinearAttention};
use phalanx::plan::scan::{self, Algorithm};
use phalanx::plan::Plan;
use phalanx::sim::{Fault, Outcome, Simulation};
use phalanx::{Communicator, DType, Error, ReduceOp};
use proptest::prelude::*;

mod common;
use common::{cluster, group, with_timeout};

/// Runs `f(comm)` on every rank of a local group of `n`, each on its own thread.
fn on_group<T: Send>(n: usize, f: impl Fn(&mut Communicator) -> T + Sync) -> Vec<T> {
    let comms = Communicator::local_group(n, Default::default()).unwrap();
    std::thread::scope(|s| {
        let f = &f;
        let hs: Vec<_> = comms.into_iter().map(|mut c| s.spawn(move || f(&mut c))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Every algorithm worth checking, with block counts that divide the state unevenly.
fn algorithms() -> Vec<Algorithm> {
    let mut v = vec![Algorithm::Auto, Algorithm::RecursiveDoubling];
    v.extend([1, 2, 3, 5, 7, 64].map(|blocks| Algorithm::Chain { blocks }));
    v
}

/// A linear-attention state `(a, S)`.
type La = (Vec<f32>, Vec<f32>);

/// The reference combine, written out: `(a1, S1) ⊕ (a2, S2) = (a1 ⊙ a2, diag(a2)·S1 + S2)`.
fn la_combine(x: &La, y: &La, d_v: usize) -> La {
    let a = x.0.iter().zip(&y.0).map(|(p, q)| p * q).collect();
    let s = x.1.iter().enumerate().map(|(k, s1)| y.0[k / d_v] * s1 + y.1[k]).collect();
    (a, s)
}

/// Sequential left fold of each rank's prefix in scan order; `None` for an empty prefix.
fn la_reference(states: &[La], d_v: usize, inclusive: bool, reverse: bool) -> Vec<Option<La>> {
    let n = states.len();
    let order: Vec<usize> = if reverse { (0..n).rev().collect() } else { (0..n).collect() };
    let mut out = vec![None; n];
    let mut acc: Option<La> = None;
    for &r in &order {
        let incl = match &acc {
            None => states[r].clone(),
            Some(p) => la_combine(p, &states[r], d_v),
        };
        out[r] = if inclusive { Some(incl.clone()) } else { acc.clone() };
        acc = Some(incl);
    }
    out
}

fn la_identity(d_k: usize, d_v: usize) -> La {
    (vec![1.0; d_k], vec![0.0; d_k * d_v])
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn run_la(states: &[La], d_v: usize, options: ScanOptions) -> Vec<La> {
    on_group(states.len(), |c| {
        let (mut a, mut s) = states[c.rank()].clone();
        c.all_scan_linear_attention(&mut a, &mut s, d_v, options).unwrap();
        (a, s)
    })
}

fn issue_example() -> Vec<La> {
    let a = [[0.5, 1.0], [0.5, 0.25], [0.25, 0.5], [1.0, 0.5]];
    let s = [[1.0, 2.0, 3.0, 4.0], [2.0, 0.0, 1.0, 1.0], [4.0, 4.0, 0.0, 2.0], [3.0, 1.0, 1.0, 0.0]];
    a.iter().zip(&s).map(|(a, s)| (a.to_vec(), s.to_vec())).collect()
}

#[test]
fn issue_example_inclusive_and_exclusive_for_every_algorithm() {
    let states = issue_example();
    // The issue's stated inclusive S results.
    let want_s = [[1.0, 2.0, 3.0, 4.0], [2.5, 1.0, 1.75, 2.0], [4.625, 4.25, 0.875, 3.0], [7.625, 5.25, 1.4375, 1.5]];
    // a is the running element-wise product.
    let mut want_a = vec![states[0].0.clone()];
    for st in &states[1..] {
        let prev = want_a.last().unwrap().clone();
        want_a.push(prev.iter().zip(&st.0).map(|(p, q)| p * q).collect());
    }
    for alg in algorithms() {
        let incl = run_la(&states, 2, ScanOptions::default().with_algorithm(alg));
        for r in 0..4 {
            assert_eq!(bits(&incl[r].1), bits(&want_s[r]), "{alg:?} inclusive S rank {r}");
            assert_eq!(bits(&incl[r].0), bits(&want_a[r]), "{alg:?} inclusive a rank {r}");
        }
        let excl = run_la(&states, 2, ScanOptions::exclusive().with_algorithm(alg));
        let id = la_identity(2, 2);
        assert_eq!((bits(&excl[0].0), bits(&excl[0].1)), (bits(&id.0), bits(&id.1)), "{alg:?} exclusive rank 0");
        for r in 1..4 {
            assert_eq!(bits(&excl[r].1), bits(&want_s[r - 1]), "{alg:?} exclusive S rank {r}");
            assert_eq!(bits(&excl[r].0), bits(&want_a[r - 1]), "{alg:?} exclusive a rank {r}");
        }
    }
}

#[test]
fn chain_is_bitwise_the_left_fold_for_every_block_count_in_both_directions() {
    // Values with rounding: every K must still give the left fold's exact bits.
    let (n, d_k, d_v) = (5, 13, 3);
    let states: Vec<La> = (0..n)
        .map(|r| {
            let a = (0..d_k).map(|i| 0.9 + ((r * 7 + i) % 11) as f32 * 0.013).collect();
            let s = (0..d_k * d_v).map(|k| ((r * 31 + k * 17) % 23) as f32 / 7.0 - 1.3).collect();
            (a, s)
        })
        .collect();
    for reverse in [false, true] {
        for inclusive in [true, false] {
            let want = la_reference(&states, d_v, inclusive, reverse);
            for blocks in 1..=d_k + 1 {
                let options = ScanOptions { inclusive, reverse, algorithm: Algorithm::Chain { blocks } };
                let got = run_la(&states, d_v, options);
                for r in 0..n {
                    let w = want[r].clone().unwrap_or_else(|| la_identity(d_k, d_v));
                    assert_eq!(bits(&got[r].1), bits(&w.1), "K={blocks} incl={inclusive} rev={reverse} rank {r}");
                    assert_eq!(bits(&got[r].0), bits(&w.0), "K={blocks} incl={inclusive} rev={reverse} rank {r}");
                }
            }
        }
    }
}

/// 2x2 matrix product over wrapping i64 (associative, not commutative), row-major.
fn mat_mul(l: &[i64], r: &[i64], o: &mut [i64]) {
    let m = |a: i64, b: i64| a.wrapping_mul(b);
    o[0] = m(l[0], r[0]).wrapping_add(m(l[1], r[2]));
    o[1] = m(l[0], r[1]).wrapping_add(m(l[1], r[3]));
    o[2] = m(l[2], r[0]).wrapping_add(m(l[3], r[2]));
    o[3] = m(l[2], r[1]).wrapping_add(m(l[3], r[3]));
}

/// Left fold of `units`-unit matrix states, per rank, in scan order (identity when empty).
fn mat_reference(ins: &[Vec<i64>], inclusive: bool, reverse: bool) -> Vec<Vec<i64>> {
    let n = ins.len();
    let order: Vec<usize> = if reverse { (0..n).rev().collect() } else { (0..n).collect() };
    let units = ins[0].len() / 4;
    let mut acc: Vec<i64> = (0..units).flat_map(|_| [1, 0, 0, 1]).collect();
    let mut out = vec![Vec::new(); n];
    for &r in &order {
        let mut next = vec![0; acc.len()];
        for u in 0..units {
            mat_mul(&acc[4 * u..4 * u + 4], &ins[r][4 * u..4 * u + 4], &mut next[4 * u..4 * u + 4]);
        }
        out[r] = if inclusive { next.clone() } else { acc.clone() };
        acc = next;
    }
    out
}

fn run_mat(ins: &[Vec<i64>], options: ScanOptions) -> Vec<Vec<i64>> {
    on_group(ins.len(), |c| {
        let mut m = ins[c.rank()].clone();
        c.all_scan_fn(&mut m, "mat2-wrapping", 4, Some(vec![1, 0, 0, 1]), mat_mul, options).unwrap();
        m
    })
}

#[test]
fn a_non_commutative_closure_keeps_rank_order() {
    // Shears: [[1,1],[0,1]]·[[1,0],[1,1]] ≠ [[1,0],[1,1]]·[[1,1],[0,1]], so any swap shows.
    let ins: Vec<Vec<i64>> =
        (0..5).map(|r| if r % 2 == 0 { vec![1, r as i64 + 1, 0, 1] } else { vec![1, 0, r as i64, 1] }).collect();
    for alg in algorithms() {
        for reverse in [false, true] {
            for inclusive in [true, false] {
                let got = run_mat(&ins, ScanOptions { inclusive, reverse, algorithm: alg });
                assert_eq!(got, mat_reference(&ins, inclusive, reverse), "{alg:?} incl={inclusive} rev={reverse}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Any algorithm equals the left fold exactly on wrapping-integer matrices.
    #[test]
    fn matrix_scan_matches_left_fold(
        n in 1usize..=7,
        units in 1usize..6,
        seed in any::<u64>(),
        alg in 0usize..4,
        inclusive in any::<bool>(),
        reverse in any::<bool>(),
    ) {
        let mut x = seed | 1;
        let mut next = move || { x ^= x << 13; x ^= x >> 7; x ^= x << 17; (x % 2001) as i64 - 1000 };
        let ins: Vec<Vec<i64>> = (0..n).map(|_| (0..4 * units).map(|_| next()).collect()).collect();
        let alg = [Algorithm::Auto, Algorithm::RecursiveDoubling, Algorithm::Chain { blocks: 2 },
                   Algorithm::Chain { blocks: 5 }][alg];
        let got = run_mat(&ins, ScanOptions { inclusive, reverse, algorithm: alg });
        prop_assert_eq!(got, mat_reference(&ins, inclusive, reverse));
    }

    /// The chain equals the left fold bitwise on random f32 linear-attention states.
    #[test]
    fn linear_attention_chain_matches_left_fold_bitwise(
        n in 1usize..=7,
        d_k in 1usize..6,
        d_v in 1usize..4,
        blocks in 1usize..7,
        vals in proptest::collection::vec(-4.0f32..4.0, 7 * 5 * 4),
        inclusive in any::<bool>(),
        reverse in any::<bool>(),
    ) {
        let states: Vec<La> = (0..n).map(|r| {
            let base = r * d_k * (d_v + 1);
            let a = (0..d_k).map(|i| vals[base + i] / 4.0).collect();
            let s = (0..d_k * d_v).map(|k| vals[base + d_k + k]).collect();
            (a, s)
        }).collect();
        let want = la_reference(&states, d_v, inclusive, reverse);
        let got = run_la(&states, d_v, ScanOptions { inclusive, reverse, algorithm: Algorithm::Chain { blocks } });
        for r in 0..n {
            let w = want[r].clone().unwrap_or_else(|| la_identity(d_k, d_v));
            prop_assert_eq!(bits(&got[r].0), bits(&w.0));
            prop_assert_eq!(bits(&got[r].1), bits(&w.1));
        }
    }
}

/// Encodes small integral values as `dtype` elements (exact in every type).
fn encode(dtype: DType, vals: &[f64]) -> Vec<u8> {
    vals.iter()
        .flat_map(|&v| match dtype {
            DType::F32 => (v as f32).to_ne_bytes().to_vec(),
            DType::F64 => v.to_ne_bytes().to_vec(),
            DType::F16 => half::f16::from_f64(v).to_ne_bytes().to_vec(),
            DType::BF16 => half::bf16::from_f64(v).to_ne_bytes().to_vec(),
            DType::I8 => (v as i8).to_ne_bytes().to_vec(),
            DType::I16 => (v as i16).to_ne_bytes().to_vec(),
            DType::I32 => (v as i32).to_ne_bytes().to_vec(),
            DType::I64 => (v as i64).to_ne_bytes().to_vec(),
            DType::U8 => (v as u8).to_ne_bytes().to_vec(),
            DType::U16 => (v as u16).to_ne_bytes().to_vec(),
            DType::U32 => (v as u32).to_ne_bytes().to_vec(),
            DType::U64 => (v as u64).to_ne_bytes().to_vec(),
        })
        .collect()
}

#[test]
fn builtin_operators_on_every_type() {
    let n = 3;
    let len = 9;
    // Values 1..=4: sums up to 12 and products up to 64 are exact in every type.
    let vals: Vec<Vec<f64>> = (0..n).map(|r| (0..len).map(|i| ((r * 5 + i * 3) % 4 + 1) as f64).collect()).collect();
    let fold = |op: ReduceOp, a: f64, b: f64| match op {
        ReduceOp::Sum => a + b,
        ReduceOp::Prod => a * b,
        ReduceOp::Min => a.min(b),
        _ => a.max(b),
    };
    for dtype in DType::ALL {
        for op in [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max] {
            for alg in [Algorithm::RecursiveDoubling, Algorithm::Chain { blocks: 4 }] {
                for (inclusive, reverse) in [(true, false), (false, false), (true, true), (false, true)] {
                    let options = ScanOptions { inclusive, reverse, algorithm: alg };
                    let got = on_group(n, |c| {
                        let mut b = encode(dtype, &vals[c.rank()]);
                        c.all_scan_raw(&mut b, dtype, op, options).unwrap();
                        b
                    });
                    for (r, got) in got.iter().enumerate() {
                        let ranks: Vec<usize> = match (inclusive, reverse) {
                            (true, false) => (0..=r).collect(),
                            (false, false) => (0..r).collect(),
                            (true, true) => (r..n).rev().collect(),
                            (false, true) => (r + 1..n).rev().collect(),
                        };
                        let want = if ranks.is_empty() {
                            builtin_identity(dtype, op).unwrap().repeat(len)
                        } else {
                            let folded: Vec<f64> = (0..len)
                                .map(|i| ranks[1..].iter().fold(vals[ranks[0]][i], |a, &q| fold(op, a, vals[q][i])))
                                .collect();
                            encode(dtype, &folded)
                        };
                        assert_eq!(got, &want, "{dtype} {op:?} {alg:?} incl={inclusive} rev={reverse} rank {r}");
                    }
                }
            }
        }
    }
}

#[test]
fn invalid_calls_are_refused() {
    let mut comms = Communicator::local_group(1, Default::default()).unwrap();
    let c = &mut comms[0];
    assert!(matches!(c.all_scan(&mut [1.0f32], ReduceOp::Avg, ScanOptions::default()), Err(Error::InvalidArgument(_))));
    let mut odd = [0u8; 7];
    let err = c.all_scan_with(&mut odd, &LinearAttention::new(1), ScanOptions::default()).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    let err = c.all_scan_linear_attention(&mut [1.0; 2], &mut [0.0; 3], 2, ScanOptions::default()).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    // No identity: an exclusive scan is refused, an inclusive one runs.
    let mut m = vec![1i64, 2, 3, 4];
    let err = c.all_scan_fn(&mut m, "m", 4, None, mat_mul, ScanOptions::exclusive()).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    c.all_scan_fn(&mut m, "m", 4, None, mat_mul, ScanOptions::default()).unwrap();
    assert_eq!(m, vec![1, 2, 3, 4]);
}

#[test]
fn ranks_disagreeing_on_the_scan_fail_everywhere() {
    let errs = on_group(3, |c| {
        // Rank 1 asks for an exclusive scan: the fingerprints differ.
        let options = if c.rank() == 1 { ScanOptions::exclusive() } else { ScanOptions::default() };
        let mut x = vec![c.rank() as i32; 8];
        let before = x.clone();
        let e = c.all_scan(&mut x, ReduceOp::Sum, options.with_algorithm(Algorithm::Chain { blocks: 2 })).unwrap_err();
        assert_eq!(x, before, "buffer restored");
        e
    });
    assert!(errs.iter().any(|e| matches!(e, Error::Mismatch { .. })), "{errs:?}");
}

/// A linear-attention op whose combine fails (as a C callback may).
struct Failing;
impl CustomOp for Failing {
    fn unit_bytes(&self) -> usize {
        LinearAttention::new(1).unit_bytes()
    }
    fn combine(&self, acc: &mut [u8], incoming: &[u8], order: Order) {
        LinearAttention::new(1).combine(acc, incoming, order)
    }
    fn identity(&self, unit: &mut [u8]) -> bool {
        LinearAttention::new(1).identity(unit)
    }
    fn name(&self) -> &str {
        "linear-attention/f32"
    }
    fn try_combine(&self, _: &mut [u8], _: &[u8], _: Order) -> Result<(), String> {
        Err("user callback returned 7".into())
    }
}

#[test]
fn a_failing_custom_combine_aborts_every_rank_and_restores() {
    let outs = on_group(3, |c| {
        let mut st = LinearAttention::pack(&[0.5, 2.0], &[1.0, 2.0], 1).unwrap();
        let before = st.clone();
        let r = if c.rank() == 2 {
            c.all_scan_with(&mut st, &Failing, ScanOptions::default())
        } else {
            c.all_scan_with(&mut st, &LinearAttention::new(1), ScanOptions::default())
        };
        (r, st == before)
    });
    for (r, restored) in &outs {
        assert!(r.is_err() && *restored, "{outs:?}");
    }
    assert!(matches!(&outs[2].0, Err(Error::Aborted { reason }) if reason.contains("returned 7")), "{outs:?}");
}

/// Kills every rank after every step of the scan plans, in the simulator, and checks
/// that survivors fail with their working buffer restored (or all complete, correctly).
#[test]
fn survivors_fail_cleanly_when_a_rank_dies_at_any_step() {
    let (n, d_k, d_v) = (4, 6, 2);
    let op = LinearAttention::new(d_v);
    let states: Vec<La> = (0..n)
        .map(|r| {
            ((0..d_k).map(|i| 0.5 + (r + i) as f32 * 0.25).collect(), (0..d_k * d_v).map(|k| (r * k) as f32).collect())
        })
        .collect();
    for alg in [Algorithm::RecursiveDoubling, Algorithm::Chain { blocks: 3 }] {
        for inclusive in [true, false] {
            let plans: Vec<Plan> = (0..n).map(|r| scan::plan_full(r, n, d_k, inclusive, false, alg)).collect();
            let bufs: Vec<Vec<u8>> = states
                .iter()
                .map(|(a, s)| {
                    let mut w = LinearAttention::pack(a, s, d_v).unwrap();
                    let id = LinearAttention::pack(&la_identity(d_k, d_v).0, &la_identity(d_k, d_v).1, d_v).unwrap();
                    w.extend_from_slice(&id);
                    w.resize(scan::working_len(d_k, alg) * op.unit_bytes(), 0);
                    w
                })
                .collect();
            let want = la_reference(&states, d_v, inclusive, false);
            let check = |r: usize, buf: &[u8]| {
                let range = scan::result_range(d_k, inclusive, alg);
                let got =
                    LinearAttention::unpack(&buf[range.start * op.unit_bytes()..range.end * op.unit_bytes()], d_v);
                let w = want[r].clone().unwrap_or_else(|| la_identity(d_k, d_v));
                got.map(|(a, s)| bits(&a) == bits(&w.0) && bits(&s) == bits(&w.1)) == Some(true)
            };
            let base = Simulation {
                time_limit: Duration::from_secs(10),
                custom: Some(Arc::new(op)),
                ..Simulation::new(DType::U8, ReduceOp::Sum)
            };
            for (r, o) in base.run(&plans, bufs.clone()).iter().enumerate() {
                assert!(matches!(o, Outcome::Done(b) if check(r, b)), "{alg:?} fault-free rank {r}: {o:?}");
            }
            for k in 0..n {
                let total = plans[k].steps.len();
                for s in 0..=total {
                    let case = format!("{alg:?} inclusive={inclusive}: rank {k} dies after {s} of {total} steps");
                    let sim = Simulation { fault: Some(Fault { rank: k, after_steps: s }), ..base.clone() };
                    let outcomes = sim.run(&plans, bufs.clone());
                    assert_eq!(outcomes[k], Outcome::Killed, "{case}");
                    let mut completed = 0;
                    for (r, o) in outcomes.iter().enumerate().filter(|&(r, _)| r != k) {
                        match o {
                            Outcome::Failed { error, buf } => {
                                let lost = matches!(error, Error::PeerLost { rank, .. } if *rank == k)
                                    || matches!(error, Error::Aborted { .. });
                                assert!(lost, "{case}: rank {r} failed with {error:?}");
                                assert_eq!(buf, &bufs[r], "{case}: rank {r}'s buffer not restored");
                            }
                            Outcome::Done(buf) => {
                                assert!(s == total && check(r, buf), "{case}: rank {r} completed wrongly");
                                completed += 1;
                            }
                            other => panic!("{case}: rank {r} ended {other:?}"),
                        }
                    }
                    assert!(completed == 0 || completed == n - 1, "{case}: survivors disagree");
                }
            }
        }
    }
}

// ---- networked group over the in-memory network ----

/// Each peer's state depends on its id, so the expected result follows the new view.
fn state_of(id: u64) -> La {
    let x = (id % 97) as f32;
    (vec![0.5, 0.25 + (id % 3) as f32 * 0.25], vec![x, 1.0, 2.0, x * 0.5])
}

#[test]
fn networked_retry_over_survivors_is_exact() {
    with_timeout(60, || {
        let c = cluster();
        let mut comms = group(&c, 4, RetryPolicy::OnPeerLost { max_attempts: 3 });
        let dying = comms.remove(1);
        let outs: Vec<(u64, La, usize, usize)> = std::thread::scope(|s| {
            // A middle peer of the chain dies while the others are inside the scan.
            s.spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                drop(dying);
            });
            let hs: Vec<_> = comms
                .iter_mut()
                .map(|c| {
                    s.spawn(move || {
                        let id = c.peer_id();
                        let (mut a, mut st) = state_of(id);
                        let options = ScanOptions::default().with_algorithm(Algorithm::Chain { blocks: 2 });
                        c.all_scan_linear_attention(&mut a, &mut st, 2, options).unwrap();
                        (id, (a, st), c.rank(), c.size())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut by_rank = outs.clone();
        by_rank.sort_by_key(|o| o.2);
        let states: Vec<La> = by_rank.iter().map(|o| state_of(o.0)).collect();
        let want = la_reference(&states, 2, true, false);
        for (r, (_, got, rank, size)) in by_rank.iter().enumerate() {
            assert_eq!((*rank, *size), (r, 3));
            let w = want[r].clone().unwrap();
            assert_eq!((bits(&got.0), bits(&got.1)), (bits(&w.0), bits(&w.1)), "rank {r}");
        }
    });
}

#[test]
fn networked_lost_peer_gives_peer_lost_and_restores() {
    with_timeout(60, || {
        let c = cluster();
        let mut comms = group(&c, 3, RetryPolicy::Never);
        let dying = comms.remove(2);
        let outs: Vec<(Result<(), Error>, bool)> = std::thread::scope(|s| {
            // The third peer dies while the others are inside the scan, waiting for it.
            s.spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                drop(dying);
            });
            let hs: Vec<_> = comms
                .iter_mut()
                .map(|c| {
                    s.spawn(move || {
                        let mut x: Vec<i64> = (0..1000).map(|i| i * (c.rank() as i64 + 2)).collect();
                        let before = x.clone();
                        let options = ScanOptions::exclusive().with_algorithm(Algorithm::RecursiveDoubling);
                        let r = c.all_scan(&mut x, ReduceOp::Sum, options);
                        (r, x == before)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (r, restored) in &outs {
            assert!(matches!(r, Err(Error::PeerLost { .. })), "{outs:?}");
            assert!(restored);
        }
    });
}
