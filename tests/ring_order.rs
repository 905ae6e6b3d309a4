//! The documented reduction orders, tested bit for bit.
//!
//! `src/plan/allreduce.rs` promises that the ring folds segment `j` from the left in ring
//! order starting at rank `j + 1`, and that recursive doubling evaluates a balanced
//! binary tree over the (paired-up) rank blocks; `src/plan/reduce.rs` promises a
//! right-grouped chain and a binomial tree of contiguous blocks. Float addition is not
//! associative, so with inputs like `1e8, 1, -1e8` each order gives different bits: the
//! tests below compute each documented order by hand and demand exact equality, and
//! check that the orders really differ for those inputs (so a wrong order fails).

use std::sync::mpsc;
use std::time::Duration;

use phalanx::collective::Tuning;
use phalanx::plan::allreduce::Algorithm;
use phalanx::plan::segments::equal;
use phalanx::{Communicator, Config, ReduceOp};

/// Longest a group may take for one test's collectives before the test fails.
const TIMEOUT: Duration = Duration::from_secs(60);

fn config(allreduce: Algorithm, chain_threshold_bytes: usize, chunk_bytes: usize) -> Config {
    Config { tuning: Tuning { allreduce, chain_threshold_bytes, chunk_bytes }, ..Config::default() }
}

/// Runs `f` on every rank of an `n`-rank local group, one thread each, and returns the
/// results in rank order; panics (instead of hanging) if a rank takes longer than
/// [`TIMEOUT`] or panics itself.
fn run_group<R, F>(n: usize, config: Config, f: F) -> Vec<R>
where
    R: Send + 'static,
    F: Fn(&mut Communicator) -> R + Send + Sync + 'static,
{
    let comms = Communicator::local_group(n, config).expect("local group");
    let f = std::sync::Arc::new(f);
    let (tx, rx) = mpsc::channel();
    for mut comm in comms {
        let (f, tx) = (f.clone(), tx.clone());
        std::thread::spawn(move || {
            let rank = comm.rank();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut comm)));
            drop(comm);
            let _ = tx.send((rank, r));
        });
    }
    drop(tx);
    let deadline = std::time::Instant::now() + TIMEOUT;
    let mut out: Vec<Option<R>> = (0..n).map(|_| None).collect();
    for _ in 0..n {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok((rank, Ok(r))) => out[rank] = Some(r),
            Ok((rank, Err(p))) => std::panic::resume_unwind(Box::new(format!(
                "rank {rank} panicked: {}",
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            ))),
            Err(e) => panic!("group of {n} did not finish within {TIMEOUT:?}: {e}"),
        }
    }
    out.into_iter().map(|r| r.expect("every rank")).collect()
}

/// All-reduce (sum) of `inputs[r]` on every rank with `algo`; every rank's result.
fn all_reduce_f32(inputs: &[Vec<f32>], algo: Algorithm, chunk_bytes: usize) -> Vec<Vec<f32>> {
    all_reduce_op(inputs, algo, chunk_bytes, ReduceOp::Sum)
}

fn all_reduce_op(inputs: &[Vec<f32>], algo: Algorithm, chunk_bytes: usize, op: ReduceOp) -> Vec<Vec<f32>> {
    let inputs = inputs.to_vec();
    run_group(inputs.len(), config(algo, 0, chunk_bytes), move |c| {
        let mut buf = inputs[c.rank()].clone();
        c.all_reduce(&mut buf, op).expect("all-reduce");
        buf
    })
}

/// A combine: `+` for most tests; [`min`] to expose the operand order.
type Combine = fn(f32, f32) -> f32;

fn add(a: f32, b: f32) -> f32 {
    a + b
}

/// `phalanx::Element::min` for `f32`: the right operand when the two compare equal.
fn min(a: f32, b: f32) -> f32 {
    if a < b {
        a
    } else {
        b
    }
}

/// The documented ring order for segment `j`: `((x[j+1] ⊕ x[j+2]) ⊕ …) ⊕ x[j]`.
fn ring_fold(xs: &[f32], j: usize, f: Combine) -> f32 {
    let n = xs.len();
    (2..=n).fold(xs[(j + 1) % n], |acc, k| f(acc, xs[(j + k) % n]))
}

/// The documented recursive-doubling order: pairs `x[2i] ⊕ x[2i+1]` for `i < n - p`,
/// then a balanced tree over the `p` blocks, lower block on the left.
fn rd_tree(xs: &[f32], f: Combine) -> f32 {
    let n = xs.len();
    let p = 1usize << n.ilog2();
    let e = n - p;
    let blocks: Vec<f32> = (0..p).map(|i| if i < e { f(xs[2 * i], xs[2 * i + 1]) } else { xs[i + e] }).collect();
    fn tree(b: &[f32], f: Combine) -> f32 {
        if b.len() == 1 {
            b[0]
        } else {
            let (lo, hi) = b.split_at(b.len() / 2);
            f(tree(lo, f), tree(hi, f))
        }
    }
    tree(&blocks, f)
}

/// The documented reduce chain: `x[root] ⊕ (x[root+1] ⊕ (… ⊕ x[root-1]))`.
fn chain_fold(xs: &[f32], root: usize, f: Combine) -> f32 {
    let n = xs.len();
    (0..n - 1).rev().fold(xs[(root + n - 1) % n], |acc, p| f(xs[(root + p) % n], acc))
}

/// The documented reduce tree: position `pos` folds in the blocks of its children
/// `pos + 1, pos + 2, pos + 4, …` in ascending order, its own value on the left.
fn binomial_fold(xs: &[f32], root: usize, f: Combine) -> f32 {
    let n = xs.len();
    fn node(xs: &[f32], root: usize, pos: usize, low: usize, f: Combine) -> f32 {
        let n = xs.len();
        let mut acc = xs[(root + pos) % n];
        let mut m = 1;
        while m < low {
            if pos + m < n {
                acc = f(acc, node(xs, root, pos + m, m, f));
            }
            m <<= 1;
        }
        acc
    }
    node(xs, root, 0, n.next_power_of_two(), f)
}

/// Values whose sums depend on the association order: random 24-bit mantissas over
/// a wide range of exponents and both signs, so nearly every addition rounds and terms
/// of different sizes absorb each other differently in each order.
fn tricky(n: usize, len: usize, salt: u64) -> Vec<Vec<f32>> {
    let mut state = salt.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..n)
        .map(|_| {
            (0..len)
                .map(|_| {
                    let r = next();
                    let mantissa = 1.0 + (r & 0xff_ffff) as f32 / (1 << 24) as f32;
                    let exponent = [0, 2, 4, 20, 24, 26][((r >> 24) % 6) as usize];
                    let sign = if (r >> 40) & 1 == 1 { -1.0 } else { 1.0 };
                    sign * mantissa * 2f32.powi(exponent)
                })
                .collect()
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn three_ranks_sum_to_the_obvious_result() {
    let inputs = vec![vec![1.0f32, 2.0, 3.0], vec![10.0, 20.0, 30.0], vec![100.0, 200.0, 300.0]];
    for algo in [Algorithm::Ring, Algorithm::RecursiveDoubling] {
        for out in all_reduce_f32(&inputs, algo, 4) {
            assert_eq!(out, vec![111.0, 222.0, 333.0], "{algo:?}");
        }
    }
}

#[test]
fn ring_folds_each_segment_from_rank_after_it() {
    // Segment j holds 1e8 on rank j+1, -1e8 on rank j+2 and 1 on rank j: the ring
    // computes (1e8 - 1e8) + 1 = 1 everywhere, while rank order loses the 1 for j = 0, 1.
    let n = 3;
    let mut inputs = vec![vec![0.0f32; n]; n];
    for j in 0..n {
        inputs[(j + 1) % n][j] = 1e8;
        inputs[(j + 2) % n][j] = -1e8;
        inputs[j][j] = 1.0;
    }
    let column = |j: usize| -> Vec<f32> { inputs.iter().map(|x| x[j]).collect() };
    let ring_model: Vec<f32> = (0..n).map(|j| ring_fold(&column(j), j, add)).collect();
    let rd_model: Vec<f32> = (0..n).map(|j| rd_tree(&column(j), add)).collect();
    assert_eq!(ring_model, vec![1.0, 1.0, 1.0]);
    assert_eq!(rd_model, vec![0.0, 0.0, 1.0]);
    for out in all_reduce_f32(&inputs, Algorithm::Ring, 4) {
        assert_eq!(bits(&out), bits(&ring_model));
    }
    for out in all_reduce_f32(&inputs, Algorithm::RecursiveDoubling, 4) {
        assert_eq!(bits(&out), bits(&rd_model));
    }
}

#[test]
fn ring_and_recursive_doubling_follow_their_documented_orders() {
    for n in 1..=9 {
        for (len, chunk) in [(n, 4), (3 * n + 2, 8), (61, 12)] {
            let inputs = tricky(n, len, (n * 1000 + len) as u64);
            let segs = equal(len, n);
            let column = |i: usize| -> Vec<f32> { inputs.iter().map(|x| x[i]).collect() };
            let ring_model: Vec<f32> = (0..len)
                .map(|i| {
                    let j = segs.iter().position(|s| s.contains(&i)).expect("segment");
                    ring_fold(&column(i), j, add)
                })
                .collect();
            let rd_model: Vec<f32> = (0..len).map(|i| rd_tree(&column(i), add)).collect();
            if n >= 3 && len > n {
                assert_ne!(bits(&ring_model), bits(&rd_model), "n={n} len={len}: inputs do not tell the orders apart");
            }
            for (algo, model) in [(Algorithm::Ring, &ring_model), (Algorithm::RecursiveDoubling, &rd_model)] {
                for (rank, out) in all_reduce_f32(&inputs, algo, chunk).iter().enumerate() {
                    assert_eq!(bits(out), bits(model), "{algo:?} n={n} len={len} rank={rank}");
                }
            }
        }
    }
}

#[test]
fn reduce_chain_and_tree_follow_their_documented_orders() {
    for n in 2..=9 {
        let len = 2 * n + 1;
        let inputs = tricky(n, len, 77 + n as u64);
        for root in 0..n {
            let column = |i: usize| -> Vec<f32> { inputs.iter().map(|x| x[i]).collect() };
            let chain_model: Vec<f32> = (0..len).map(|i| chain_fold(&column(i), root, add)).collect();
            let tree_model: Vec<f32> = (0..len).map(|i| binomial_fold(&column(i), root, add)).collect();
            if n >= 3 {
                assert_ne!(bits(&chain_model), bits(&tree_model), "n={n} root={root}");
            }
            for (threshold, model) in [(0, &chain_model), (usize::MAX, &tree_model)] {
                let ins = inputs.clone();
                let outs = run_group(n, config(Algorithm::Ring, threshold, 8), move |c| {
                    let mut buf = ins[c.rank()].clone();
                    c.reduce(&mut buf, root, ReduceOp::Sum).expect("reduce");
                    buf
                });
                assert_eq!(bits(&outs[root]), bits(model), "threshold={threshold} n={n} root={root}");
            }
        }
    }
}

/// Zeros of both signs, a different pattern per element: bit `r` of `i * 37 + 11`
/// gives rank `r`'s sign at element `i`.
fn signed_zeros(n: usize, len: usize) -> Vec<Vec<f32>> {
    (0..n).map(|r| (0..len).map(|i| if ((i * 37 + 11) >> r) & 1 == 1 { -0.0 } else { 0.0 }).collect()).collect()
}

/// Sums are commutative bit for bit, so they show the grouping but not which operand
/// is on the left. `Min` over `+0.0` and `-0.0` does: ties return the right operand, so
/// the sign of the result names the contribution that the documented order puts last.
#[test]
fn all_reduce_operand_order_shows_in_signed_zero_min() {
    for n in 2..=9 {
        let len = 4 * n + 1;
        let inputs = signed_zeros(n, len);
        let segs = equal(len, n);
        let column = |i: usize| -> Vec<f32> { inputs.iter().map(|x| x[i]).collect() };
        let ring_model: Vec<f32> = (0..len)
            .map(|i| ring_fold(&column(i), segs.iter().position(|s| s.contains(&i)).expect("segment"), min))
            .collect();
        let rd_model: Vec<f32> = (0..len).map(|i| rd_tree(&column(i), min)).collect();
        assert_ne!(bits(&ring_model), bits(&rd_model), "n={n}");
        for (algo, model) in [(Algorithm::Ring, &ring_model), (Algorithm::RecursiveDoubling, &rd_model)] {
            for (rank, out) in all_reduce_op(&inputs, algo, 8, ReduceOp::Min).iter().enumerate() {
                assert_eq!(bits(out), bits(model), "{algo:?} n={n} rank={rank}");
            }
        }
    }
}

#[test]
fn reduce_operand_order_shows_in_signed_zero_min() {
    for n in 2..=9 {
        let len = 4 * n + 1;
        let inputs = signed_zeros(n, len);
        for root in 0..n {
            let column = |i: usize| -> Vec<f32> { inputs.iter().map(|x| x[i]).collect() };
            let chain_model: Vec<f32> = (0..len).map(|i| chain_fold(&column(i), root, min)).collect();
            let tree_model: Vec<f32> = (0..len).map(|i| binomial_fold(&column(i), root, min)).collect();
            for (threshold, model) in [(0, &chain_model), (usize::MAX, &tree_model)] {
                let ins = inputs.clone();
                let outs = run_group(n, config(Algorithm::Ring, threshold, 8), move |c| {
                    let mut buf = ins[c.rank()].clone();
                    c.reduce(&mut buf, root, ReduceOp::Min).expect("reduce");
                    buf
                });
                assert_eq!(bits(&outs[root]), bits(model), "threshold={threshold} n={n} root={root}");
            }
        }
    }
}
