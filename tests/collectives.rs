//! Every collective of [`Communicator`] against a naive reference, for every element
//! type and operator, group sizes 1 to 9, lengths from 0 up (not multiples of the group
//! size), both all-reduce algorithms, chain and tree broadcast/reduce, and chunks of a
//! few bytes so that every transfer spans many frames.
//!
//! Integer results must be exact (wrapping arithmetic; `Avg` is the wrapped sum divided
//! by the group size, truncated toward zero). Float results must be bitwise identical
//! on every rank, exact for `Min`, `Max` and `Prod` (whose inputs are chosen exactly
//! representable), and within the rounding of a fixed-order sum for `Sum` and `Avg`.

use std::fmt::Debug;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use half::{bf16, f16};
use phalanx::collective::Tuning;
use phalanx::plan::allreduce::Algorithm;
use phalanx::plan::segments::{equal, from_counts};
use phalanx::{Communicator, Config, Element, ReduceOp};
use proptest::prelude::*;

/// Longest one group may take for its collectives before the test fails (they take
/// milliseconds; a plan bug that leaves a rank waiting shows up as this timeout).
const TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------
// Element types under test.

/// An element type plus the conversions the reference needs.
trait TestElem: Element + Copy + Debug {
    /// Whether the type is floating point.
    const FLOAT: bool;
    /// Machine epsilon of the type (floats only).
    const EPS: f64;
    /// A test value from a raw random `i64`, suited to `op`: integers take any value
    /// (wrapping); floats take values whose `Prod` is exact and whose sums are modest.
    fn from_raw(raw: i64, op: ReduceOp) -> Self;
    /// The value as `i128` (integers, exact).
    fn to_i128(self) -> i128;
    /// `v` wrapped to the type (integers).
    fn from_i128(v: i128) -> Self;
    /// The value as `f64` (floats, exact).
    fn to_f64(self) -> f64;
}

macro_rules! int_elem {
    ($($t:ty),*) => {$(
        impl TestElem for $t {
            const FLOAT: bool = false;
            const EPS: f64 = 0.0;
            fn from_raw(raw: i64, _op: ReduceOp) -> Self {
                raw as $t
            }
            fn to_i128(self) -> i128 {
                self as i128
            }
            fn from_i128(v: i128) -> Self {
                v as $t
            }
            fn to_f64(self) -> f64 {
                unreachable!("integer type")
            }
        }
    )*};
}
int_elem!(i8, i16, i32, i64, u8, u16, u32, u64);

/// A float test value: `Prod` inputs are in `-2..=2` (every product of up to nine is a
/// signed power of two or zero, exact in every float type); the others are tenths in
/// `-200..=200`, which round in every type.
fn float_value(raw: i64, op: ReduceOp) -> f64 {
    match op {
        ReduceOp::Prod => (raw.rem_euclid(5) - 2) as f64,
        _ => (raw % 2001) as f64 / 10.0,
    }
}

macro_rules! float_elem {
    ($t:ty, $eps:expr, $from:expr, $to:expr) => {
        impl TestElem for $t {
            const FLOAT: bool = true;
            const EPS: f64 = $eps;
            fn from_raw(raw: i64, op: ReduceOp) -> Self {
                $from(float_value(raw, op))
            }
            fn to_i128(self) -> i128 {
                unreachable!("float type")
            }
            fn from_i128(_: i128) -> Self {
                unreachable!("float type")
            }
            fn to_f64(self) -> f64 {
                $to(self)
            }
        }
    };
}
float_elem!(f32, f32::EPSILON as f64, |v: f64| v as f32, |x: f32| x as f64);
float_elem!(f64, f64::EPSILON, |v: f64| v, |x: f64| x);
float_elem!(f16, 1.0 / 1024.0, f16::from_f64, f16::to_f64);
float_elem!(bf16, 1.0 / 128.0, bf16::from_f64, bf16::to_f64);

/// Calls `$f::<T>($args)` for every element type, stopping at the first error.
macro_rules! for_each_type {
    ($f:ident($($arg:expr),*)) => {
        (|| -> Result<(), String> {
            $f::<f32>($($arg),*)?;
            $f::<f64>($($arg),*)?;
            $f::<f16>($($arg),*)?;
            $f::<bf16>($($arg),*)?;
            $f::<i8>($($arg),*)?;
            $f::<i16>($($arg),*)?;
            $f::<i32>($($arg),*)?;
            $f::<i64>($($arg),*)?;
            $f::<u8>($($arg),*)?;
            $f::<u16>($($arg),*)?;
            $f::<u32>($($arg),*)?;
            $f::<u64>($($arg),*)?;
            Ok(())
        })()
    };
}

// ---------------------------------------------------------------------------------
// The reference.

/// Checks `got`, one element of a reduction over `xs` (one value per rank) with `op`.
fn check_reduced<T: TestElem>(op: ReduceOp, got: T, xs: &[T]) -> Result<(), String> {
    let n = xs.len();
    let fail = |want: &dyn Debug| Err(format!("{} {op:?} over {xs:?}: got {got:?}, want {want:?}", T::DTYPE));
    if !T::FLOAT {
        let vals = xs.iter().map(|x| x.to_i128());
        let sum = || T::from_i128(vals.clone().fold(0, i128::wrapping_add));
        let want = match op {
            ReduceOp::Sum => sum(),
            ReduceOp::Prod => T::from_i128(vals.clone().fold(1, i128::wrapping_mul)),
            ReduceOp::Min => T::from_i128(vals.clone().min().expect("n >= 1")),
            ReduceOp::Max => T::from_i128(vals.clone().max().expect("n >= 1")),
            // Rust's `/` truncates toward zero.
            ReduceOp::Avg => T::from_i128(sum().to_i128() / n as i128),
        };
        return if got.to_i128() == want.to_i128() { Ok(()) } else { fail(&want) };
    }
    let vals: Vec<f64> = xs.iter().map(|x| x.to_f64()).collect();
    let g = got.to_f64();
    let exact = match op {
        ReduceOp::Prod => Some(vals.iter().product::<f64>()),
        ReduceOp::Min => Some(vals.iter().copied().fold(f64::INFINITY, f64::min)),
        ReduceOp::Max => Some(vals.iter().copied().fold(f64::NEG_INFINITY, f64::max)),
        ReduceOp::Sum | ReduceOp::Avg => None,
    };
    if let Some(want) = exact {
        return if g == want { Ok(()) } else { fail(&want) };
    }
    // A fixed-order sum of n terms errs by at most (n - 1) roundings of a partial sum,
    // each below eps * sum|x|; the f64 reference itself errs far less.
    let sum: f64 = vals.iter().sum();
    let abs: f64 = vals.iter().map(|v| v.abs()).sum();
    let tol = n as f64 * T::EPS * abs;
    let (want, tol) = match op {
        ReduceOp::Avg => (sum / n as f64, tol / n as f64 + 2.0 * T::EPS * (sum / n as f64).abs()),
        _ => (sum, tol),
    };
    if g.is_finite() && (g - want).abs() <= tol {
        Ok(())
    } else {
        fail(&format!("{want} ± {tol}"))
    }
}

/// Element `i` of every rank's input.
fn column<T: Copy>(inputs: &[Vec<T>], i: usize) -> Vec<T> {
    inputs.iter().map(|x| x[i]).collect()
}

fn bytes_of<T: Element>(v: &[T]) -> &[u8] {
    bytemuck::cast_slice(v)
}

// ---------------------------------------------------------------------------------
// Inputs and groups.

/// A small xorshift generator: inputs come from a proptest-chosen seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A raw value: often small, sometimes extreme, otherwise anything.
    fn raw(&mut self) -> i64 {
        let r = self.next();
        match r % 8 {
            0 | 1 => ((r >> 8) % 7) as i64 - 3,
            2 => [i64::MIN, i64::MAX, 0, -1, 1, 127, 128, 255][((r >> 8) % 8) as usize],
            _ => (r >> 3) as i64 ^ (r << 61) as i64,
        }
    }
}

/// `n` raw input vectors of `len` values from `seed`.
fn raw_inputs(seed: u64, n: usize, len: usize) -> Vec<Vec<i64>> {
    let mut rng = Rng(seed | 1);
    (0..n).map(|_| (0..len).map(|_| rng.raw()).collect()).collect()
}

fn typed<T: TestElem>(raw: &[Vec<i64>], op: ReduceOp) -> Vec<Vec<T>> {
    raw.iter().map(|x| x.iter().map(|&v| T::from_raw(v, op)).collect()).collect()
}

/// Knobs that shape the plans; every rank uses the same.
#[derive(Clone, Copy, Debug)]
struct Knobs {
    allreduce: Algorithm,
    chain: bool,
    chunk_bytes: usize,
    link_capacity: usize,
}

impl Knobs {
    fn config(self) -> Config {
        Config {
            tuning: Tuning {
                allreduce: self.allreduce,
                chain_threshold_bytes: if self.chain { 0 } else { usize::MAX },
                chunk_bytes: self.chunk_bytes,
            },
            link_capacity: self.link_capacity,
        }
    }
}

fn knobs() -> impl Strategy<Value = Knobs> {
    (any::<bool>(), any::<bool>(), 8usize..=64, 1usize..=4).prop_map(|(ring, chain, chunk_bytes, link_capacity)| {
        Knobs {
            allreduce: if ring { Algorithm::Ring } else { Algorithm::RecursiveDoubling },
            chain,
            chunk_bytes,
            link_capacity,
        }
    })
}

/// Mostly short buffers, sometimes a few hundred elements.
fn length() -> impl Strategy<Value = usize> {
    prop_oneof![3 => 0usize..=12, 2 => 13usize..=100, 1 => 101usize..=300]
}

/// Runs `f` on every rank of an `n`-rank local group, one thread each, and returns the
/// results in rank order; fails (instead of hanging) after [`TIMEOUT`].
fn run_group<R, F>(n: usize, config: Config, f: F) -> Result<Vec<R>, String>
where
    R: Send + 'static,
    F: Fn(&mut Communicator) -> R + Send + Sync + 'static,
{
    let comms = Communicator::local_group(n, config).map_err(|e| e.to_string())?;
    let f = Arc::new(f);
    let (tx, rx) = mpsc::channel();
    for mut comm in comms {
        let (f, tx) = (f.clone(), tx.clone());
        std::thread::spawn(move || {
            let rank = comm.rank();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut comm)));
            drop(comm);
            let _ = tx.send((rank, r.map_err(|_| format!("rank {rank} panicked"))));
        });
    }
    drop(tx);
    let deadline = Instant::now() + TIMEOUT;
    let mut out: Vec<Option<R>> = (0..n).map(|_| None).collect();
    for _ in 0..n {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((rank, r)) => out[rank] = Some(r?),
            Err(e) => return Err(format!("group of {n} hung ({e}) with {config:?}")),
        }
    }
    Ok(out.into_iter().map(|r| r.expect("every rank")).collect())
}

/// Runs, on every rank, `call(comm, rank's input for op)` for every operator in turn;
/// returns `[rank][op]` outputs.
fn run_ops<T, R, F>(n: usize, knobs: Knobs, raw: &[Vec<i64>], call: F) -> Result<Vec<Vec<R>>, String>
where
    T: TestElem,
    R: Send + 'static,
    F: Fn(&mut Communicator, ReduceOp, Vec<T>) -> phalanx::Result<R> + Send + Sync + 'static,
{
    let inputs: Vec<Vec<Vec<T>>> = ReduceOp::ALL.iter().map(|&op| typed(raw, op)).collect();
    let per_rank = run_group(n, knobs.config(), move |c| {
        ReduceOp::ALL
            .iter()
            .zip(&inputs)
            .map(|(&op, ins)| call(c, op, ins[c.rank()].clone()).map_err(|e| (op, e)))
            .collect::<Result<Vec<R>, _>>()
    })?;
    per_rank
        .into_iter()
        .enumerate()
        .map(|(r, res)| res.map_err(|(op, e)| format!("{} {op:?} rank {r}: {e}", T::DTYPE)))
        .collect()
}

// ---------------------------------------------------------------------------------
// Per-collective checks, generic over the element type.

fn check_all_reduce<T: TestElem>(n: usize, len: usize, knobs: Knobs, seed: u64) -> Result<(), String> {
    let raw = raw_inputs(seed, n, len);
    let outs = run_ops::<T, _, _>(n, knobs, &raw, |c, op, mut buf| c.all_reduce(&mut buf, op).map(|()| buf))?;
    for (k, &op) in ReduceOp::ALL.iter().enumerate() {
        let inputs = typed::<T>(&raw, op);
        for r in 1..n {
            if bytes_of(&outs[r][k]) != bytes_of(&outs[0][k]) {
                return Err(format!(
                    "{} {op:?}: rank {r} differs from rank 0 (no bit parity): {:?} vs {:?}",
                    T::DTYPE,
                    outs[r][k],
                    outs[0][k]
                ));
            }
        }
        if outs[0][k].len() != len {
            return Err(format!("{} {op:?}: output length changed", T::DTYPE));
        }
        for (i, &got) in outs[0][k].iter().enumerate() {
            check_reduced(op, got, &column(&inputs, i)).map_err(|e| format!("elem {i}: {e}"))?;
        }
    }
    Ok(())
}

fn check_reduce_scatter_v<T: TestElem>(
    counts: &[usize],
    equal_counts: bool,
    knobs: Knobs,
    seed: u64,
) -> Result<(), String> {
    let n = counts.len();
    let len: usize = counts.iter().sum();
    let raw = raw_inputs(seed, n, len);
    let counts_owned = counts.to_vec();
    let outs = run_ops::<T, _, _>(n, knobs, &raw, move |c, op, input| {
        let mine = counts_owned[c.rank()];
        let mut out = vec![T::from_raw(7, ReduceOp::Sum); mine];
        if equal_counts {
            c.reduce_scatter(&input, &mut out, op)?;
        } else {
            c.reduce_scatter_v(&input, &mut out, &counts_owned, op)?;
        }
        Ok(out)
    })?;
    let segs = from_counts(counts);
    for (k, &op) in ReduceOp::ALL.iter().enumerate() {
        let inputs = typed::<T>(&raw, op);
        for (r, seg) in segs.iter().enumerate() {
            let got = &outs[r][k];
            if got.len() != seg.len() {
                return Err(format!("rank {r}: {} elements for {seg:?}", got.len()));
            }
            for (&g, i) in got.iter().zip(seg.clone()) {
                check_reduced(op, g, &column(&inputs, i)).map_err(|e| format!("rank {r} elem {i}: {e}"))?;
            }
        }
    }
    Ok(())
}

fn check_all_gather_v<T: TestElem>(
    counts: &[usize],
    equal_counts: bool,
    knobs: Knobs,
    seed: u64,
) -> Result<(), String> {
    let n = counts.len();
    let len: usize = counts.iter().sum();
    let segs = from_counts(counts);
    // Rank r contributes the first counts[r] values of its raw row.
    let raw = raw_inputs(seed, n, len);
    let mine: Vec<Vec<T>> = (0..n).map(|r| typed::<T>(&raw, ReduceOp::Sum)[r][..counts[r]].to_vec()).collect();
    let want: Vec<T> = mine.concat();
    let (mine_c, counts_c) = (mine.clone(), counts.to_vec());
    let outs = run_group(n, knobs.config(), move |c| {
        // The output starts as garbage: all-gather must overwrite all of it.
        let mut out = vec![T::from_raw(-1, ReduceOp::Sum); counts_c.iter().sum()];
        let input = &mine_c[c.rank()];
        let r = if equal_counts { c.all_gather(input, &mut out) } else { c.all_gather_v(input, &mut out, &counts_c) };
        r.map(|()| out).map_err(|e| e.to_string())
    })?;
    for (r, out) in outs.into_iter().enumerate() {
        let out = out?;
        if bytes_of(&out) != bytes_of(&want) {
            return Err(format!(
                "{} all-gather counts {counts:?} segs {segs:?}: rank {r} got {out:?}, want {want:?}",
                T::DTYPE
            ));
        }
    }
    Ok(())
}

fn check_broadcast<T: TestElem>(n: usize, root: usize, len: usize, knobs: Knobs, seed: u64) -> Result<(), String> {
    let raw = raw_inputs(seed, n, len);
    let inputs = typed::<T>(&raw, ReduceOp::Sum);
    let ins = inputs.clone();
    let outs = run_group(n, knobs.config(), move |c| {
        let mut buf = ins[c.rank()].clone();
        c.broadcast(&mut buf, root).map(|()| buf).map_err(|e| e.to_string())
    })?;
    for (r, out) in outs.into_iter().enumerate() {
        let out = out?;
        if bytes_of(&out) != bytes_of(&inputs[root]) {
            return Err(format!("{} broadcast from {root}: rank {r} got {out:?}, want {:?}", T::DTYPE, inputs[root]));
        }
    }
    Ok(())
}

fn check_reduce<T: TestElem>(n: usize, root: usize, len: usize, knobs: Knobs, seed: u64) -> Result<(), String> {
    let raw = raw_inputs(seed, n, len);
    let outs = run_ops::<T, _, _>(n, knobs, &raw, move |c, op, mut buf| c.reduce(&mut buf, root, op).map(|()| buf))?;
    for (k, &op) in ReduceOp::ALL.iter().enumerate() {
        let inputs = typed::<T>(&raw, op);
        for (r, out) in outs.iter().enumerate().map(|(r, o)| (r, &o[k])) {
            if r != root {
                if bytes_of(out) != bytes_of(&inputs[r]) {
                    return Err(format!("{} {op:?} reduce to {root}: non-root rank {r}'s buffer changed", T::DTYPE));
                }
                continue;
            }
            for (i, &got) in out.iter().enumerate() {
                check_reduced(op, got, &column(&inputs, i)).map_err(|e| format!("root {root} elem {i}: {e}"))?;
            }
        }
    }
    Ok(())
}

/// Group size and per-rank counts (some zero).
fn counts() -> impl Strategy<Value = Vec<usize>> {
    (1usize..=9).prop_flat_map(|n| proptest::collection::vec(prop_oneof![1 => Just(0usize), 4 => 0usize..=35], n))
}

fn config(cases: u32) -> ProptestConfig {
    // A hang costs TIMEOUT per shrinking step: bound the shrinking.
    ProptestConfig { cases, failure_persistence: None, max_shrink_time: 60_000, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config(40))]

    #[test]
    fn all_reduce_matches_reference(
        n in 1usize..=9, len in length(), knobs in knobs(), seed in any::<u64>(),
    ) {
        for_each_type!(check_all_reduce(n, len, knobs, seed)).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn reduce_scatter_matches_reference(
        n in 1usize..=9, per_rank in 0usize..=33, knobs in knobs(), seed in any::<u64>(),
    ) {
        for_each_type!(check_reduce_scatter_v(&vec![per_rank; n], true, knobs, seed))
            .map_err(TestCaseError::fail)?;
    }

    #[test]
    fn reduce_scatter_v_matches_reference(
        counts in counts(), knobs in knobs(), seed in any::<u64>(),
    ) {
        for_each_type!(check_reduce_scatter_v(&counts, false, knobs, seed)).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn all_gather_matches_reference(
        n in 1usize..=9, per_rank in 0usize..=33, knobs in knobs(), seed in any::<u64>(),
    ) {
        for_each_type!(check_all_gather_v(&vec![per_rank; n], true, knobs, seed))
            .map_err(TestCaseError::fail)?;
    }

    #[test]
    fn all_gather_v_matches_reference(
        counts in counts(), knobs in knobs(), seed in any::<u64>(),
    ) {
        for_each_type!(check_all_gather_v(&counts, false, knobs, seed)).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn broadcast_from_any_root(
        (n, root) in (1usize..=9).prop_flat_map(|n| (Just(n), 0..n)),
        len in length(), knobs in knobs(), seed in any::<u64>(),
    ) {
        for_each_type!(check_broadcast(n, root, len, knobs, seed)).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn reduce_to_any_root(
        (n, root) in (1usize..=9).prop_flat_map(|n| (Just(n), 0..n)),
        len in length(), knobs in knobs(), seed in any::<u64>(),
    ) {
        for_each_type!(check_reduce(n, root, len, knobs, seed)).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn barrier_waits_for_every_rank(n in 1usize..=9, rounds in 1usize..=4, knobs in knobs()) {
        // Each rank bumps a counter, then waits at the barrier: nobody may leave a round
        // before all n arrived, so after round k every rank sees at least k * n bumps.
        let arrived = Arc::new(AtomicUsize::new(0));
        let a = arrived.clone();
        let outs = run_group(n, knobs.config(), move |c| {
            (1..=rounds).try_for_each(|k| {
                // Stagger arrivals so that an early leaver would be caught.
                std::thread::sleep(Duration::from_micros(200 * c.rank() as u64));
                a.fetch_add(1, Ordering::SeqCst);
                c.barrier().map_err(|e| e.to_string())?;
                let seen = a.load(Ordering::SeqCst);
                if seen < k * n {
                    return Err(format!("left round {k} having seen {seen} of {} arrivals", k * n));
                }
                Ok(())
            })
        })
        .map_err(TestCaseError::fail)?;
        for (r, o) in outs.into_iter().enumerate() {
            o.map_err(|e| TestCaseError::fail(format!("rank {r}: {e}")))?;
        }
        prop_assert_eq!(arrived.load(Ordering::SeqCst), rounds * n);
    }
}

// ---------------------------------------------------------------------------------
// Deterministic sweeps, so that every type, operator and algorithm is covered at the
// edge sizes whatever the random cases draw.

/// Two settings that between them cover both all-reduce algorithms and both
/// broadcast/reduce shapes (all-reduce ignores `chain`, broadcast and reduce ignore
/// `allreduce`).
fn sweep_knobs() -> [Knobs; 2] {
    [(Algorithm::Ring, true), (Algorithm::RecursiveDoubling, false)].map(|(allreduce, chain)| Knobs {
        allreduce,
        chain,
        chunk_bytes: 8,
        link_capacity: 2,
    })
}

#[test]
fn every_type_op_and_algorithm_at_edge_sizes() -> Result<(), String> {
    for n in [1usize, 2, 3, 4, 7, 9] {
        for len in [0, 1, n.saturating_sub(1), n + 1, 4 * n + 3] {
            for (i, knobs) in sweep_knobs().into_iter().enumerate() {
                let seed = (n * 1000 + len * 10 + i) as u64;
                let ctx = |e: String| format!("n={n} len={len} {knobs:?}: {e}");
                let run = || -> Result<(), String> {
                    for_each_type!(check_all_reduce(n, len, knobs, seed))?;
                    let root = len % n;
                    for_each_type!(check_broadcast(n, root, len, knobs, seed))?;
                    for_each_type!(check_reduce(n, root, len, knobs, seed))?;
                    Ok(())
                };
                run().map_err(ctx)?;
            }
        }
    }
    Ok(())
}

#[test]
fn uneven_segments_cover_the_buffer() {
    // The reference above relies on the documented equal split.
    for n in 1..=9 {
        for len in 0..40 {
            let segs = equal(len, n);
            assert_eq!(segs.len(), n);
            assert_eq!(segs.first().map(|s| s.start), Some(0));
            assert_eq!(segs.last().map(|s| s.end), Some(len));
            assert!(segs.windows(2).all(|w| w[0].end == w[1].start));
            let sizes: Vec<usize> = segs.iter().map(|s| s.len()).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
        }
    }
}

/// `Max` and `Min` propagate a NaN that one rank holds, on every algorithm's path
/// (ring and recursive doubling all-reduce, reduce-scatter, scan), as numpy and torch do;
/// an inf/NaN check across ranks relies on it.
#[test]
fn max_and_min_propagate_a_nan_from_any_rank() {
    for n in [2usize, 3, 5] {
        for nan_rank in 0..n {
            for op in [ReduceOp::Max, ReduceOp::Min] {
                let outs = run_group(n, Config::default(), move |c| {
                    let r = c.rank();
                    let value = if r == nan_rank { f32::NAN } else { r as f32 + 1.0 };
                    // Short (recursive doubling) and long (ring) buffers.
                    let mut short = vec![value; 3];
                    c.all_reduce(&mut short, op).unwrap();
                    let mut long = vec![value; 40_000];
                    c.all_reduce(&mut long, op).unwrap();
                    let mut scanned = vec![value; 5];
                    c.all_scan(&mut scanned, op, phalanx::comm::ScanOptions::default()).unwrap();
                    let input = vec![value; 2 * c.size()];
                    let mut piece = vec![0f32; 2];
                    c.reduce_scatter(&input, &mut piece, op).unwrap();
                    (short, long, scanned, piece)
                })
                .unwrap();
                for (r, (short, long, scanned, piece)) in outs.iter().enumerate() {
                    let what = format!("{op:?} n={n} NaN at rank {nan_rank}, rank {r}");
                    assert!(short.iter().chain(long).chain(piece).all(|x| x.is_nan()), "{what}");
                    // An inclusive scan has the NaN from its rank on.
                    assert_eq!(scanned.iter().all(|x| x.is_nan()), r >= nan_rank, "{what}: scan");
                }
            }
        }
    }
}
