//! Quantized all-reduce: identical bytes on every rank, the error bound, and the fault
//! contract (restored buffers, `PeerLost`, exact retries) in the simulator, in local
//! groups and over an in-memory network.
//!
//! # The error bound the tests check
//!
//! The issue asks for a per-element error of at most `(n-1)·Δ + Δ`, `Δ` being one
//! quantization step of a chunk's range. On the ring each element is quantized `n`
//! times (`n - 1` reduce-scatter hops, then once by the owner), each time with an error
//! of at most half a step of the chunk it travels in, so the error is `≤ n·Δ/2` plus the
//! `f32` rounding of the sums and decodes. To bound `Δ` from the inputs alone: a decoded
//! chunk lies within the encoded chunk's `[min, max]`, so by induction the range of every
//! partial sum is at most the sum over ranks of each rank's range (`max - min` of its
//! whole buffer, which bounds the range of any chunk of it). Hence
//! `Δ ≤ Δ̂ = Σ_r range_r / (2^bits - 1)` and the tests assert
//! `|result - exact| ≤ n·Δ̂ + rounding`, with `rounding = 4·n·ε·Σ_r max|x_r|`
//! (`ε = f32::EPSILON`: `n` additions and `n` decodes, each off by at most half an ulp
//! of a value no larger than the sum of the magnitudes plus the steps).

use std::time::Duration;

use phalanx::collective::{Collective, Tuning};
use phalanx::comm::RetryPolicy;
use phalanx::plan::{allreduce, Plan};
use phalanx::quant::{Codec, Quantization};
use phalanx::sim::{Fault, Outcome, Simulation};
use phalanx::workload::hash_f32;
use phalanx::{Communicator, Config, DType, Error, ReduceOp};
use proptest::prelude::*;

mod common;
use common::{cluster, group, with_timeout};

const WIDTHS: [Quantization; 2] = [Quantization::U8, Quantization::U16];

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn from_bytes(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// A deterministic pseudo-random stream (splitmix64).
fn stream(seed: u64) -> impl FnMut() -> f64 {
    let mut s = seed;
    move || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) as f64 / u64::MAX as f64
    }
}

/// Rank inputs with rank-dependent offsets and scales.
fn inputs(n: usize, len: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rnd = stream(seed);
    (0..n)
        .map(|r| {
            let (offset, scale) = (r as f64 * 3.0 - 4.0, 1.0 + r as f64);
            (0..len).map(|_| (offset + scale * (2.0 * rnd() - 1.0)) as f32).collect()
        })
        .collect()
}

/// The bound of the module docs for every element, and the exact (f64) sums.
fn bound(ins: &[Vec<f32>], q: Quantization) -> (f64, Vec<f64>) {
    let n = ins.len();
    let len = ins[0].len();
    let range = |x: &Vec<f32>| {
        let (lo, hi) = x.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v as f64), hi.max(v as f64)));
        if x.is_empty() {
            0.0
        } else {
            hi - lo
        }
    };
    let step: f64 = ins.iter().map(range).sum::<f64>() / q.levels() as f64;
    let magnitude: f64 = ins.iter().map(|x| x.iter().fold(0f64, |m, &v| m.max(v.abs() as f64))).sum();
    let rounding = 4.0 * n as f64 * f32::EPSILON as f64 * (magnitude + n as f64 * step);
    let exact = (0..len).map(|i| ins.iter().map(|x| x[i] as f64).sum()).collect();
    (n as f64 * step + rounding, exact)
}

fn ring_plans(n: usize, len: usize) -> Vec<Plan> {
    (0..n).map(|r| allreduce::ring(r, n, len)).collect()
}

fn sim(q: Quantization, chunk_bytes: usize) -> Simulation {
    Simulation {
        chunk_bytes,
        codec: Some(Codec::new(q)),
        time_limit: Duration::from_secs(20),
        ..Simulation::new(DType::F32, ReduceOp::Sum)
    }
}

/// Runs a fault-free quantized ring in the simulator; every rank's result.
fn simulate(ins: &[Vec<f32>], q: Quantization, chunk_bytes: usize) -> Vec<Vec<f32>> {
    let plans = ring_plans(ins.len(), ins[0].len());
    sim(q, chunk_bytes)
        .run(&plans, ins.iter().map(|x| to_bytes(x)).collect())
        .into_iter()
        .enumerate()
        .map(|(r, o)| match o {
            Outcome::Done(b) => from_bytes(&b),
            other => panic!("rank {r} ended {other:?}"),
        })
        .collect()
}

/// Asserts identical bits everywhere and the error bound; returns the largest error.
fn check(ins: &[Vec<f32>], outs: &[Vec<f32>], q: Quantization) -> f64 {
    let hashes: Vec<String> = outs.iter().map(|o| hash_f32(o)).collect();
    assert!(hashes.iter().all(|h| h == &hashes[0]), "hashes differ: {hashes:?}");
    let (tol, exact) = bound(ins, q);
    let mut worst = 0f64;
    for (i, (&got, want)) in outs[0].iter().zip(&exact).enumerate() {
        let err = (got as f64 - want).abs();
        assert!(err <= tol, "element {i}: {got} vs {want}, error {err} > bound {tol} ({q}, n = {})", ins.len());
        worst = worst.max(err);
    }
    worst
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// n = 1..7, both widths, lengths that leave segments empty, uneven or many chunks.
    #[test]
    fn identical_bytes_and_bounded_error(n in 1usize..=7, len in 0usize..300, seed in any::<u64>(), wide in any::<bool>()) {
        let q = if wide { Quantization::U16 } else { Quantization::U8 };
        let ins = inputs(n, len, seed);
        let outs = simulate(&ins, q, 64);
        check(&ins, &outs, q);
    }
}

#[test]
fn every_group_size_and_width() {
    for n in 1..=7 {
        for q in WIDTHS {
            let ins = inputs(n, 1000, n as u64);
            let outs = simulate(&ins, q, 256);
            let worst = check(&ins, &outs, q);
            if n > 1 {
                assert!(worst > 0.0, "n = {n}, {q}: a quantized sum should not be exact for random inputs");
            }
        }
    }
}

#[test]
fn u16_error_is_much_smaller_than_u8() {
    let ins = inputs(4, 4096, 7);
    let e8 = check(&ins, &simulate(&ins, Quantization::U8, 1024), Quantization::U8);
    let e16 = check(&ins, &simulate(&ins, Quantization::U16, 1024), Quantization::U16);
    // 257 times finer steps; ask for a factor of 50.
    assert!(e16 * 50.0 < e8, "u16 max error {e16} vs u8 {e8}");
}

#[test]
fn constant_inputs_are_exact() {
    // Constant chunks quantize exactly (Δ = 0), and small integer sums are exact in f32.
    for n in 2..=5 {
        for q in WIDTHS {
            let ins: Vec<Vec<f32>> = (0..n).map(|r| vec![r as f32 - 1.5; 333]).collect();
            let want: f32 = ins.iter().map(|x| x[0]).sum();
            for out in simulate(&ins, q, 64) {
                assert!(out.iter().all(|&v| v == want), "n = {n}, {q}");
            }
        }
    }
}

/// A rank killed after every number of steps: survivors fail with their buffers restored
/// (or all complete, identically, when the victim had finished), nobody hangs.
#[test]
fn a_rank_killed_at_every_step() {
    for n in [2, 3, 4] {
        for len in [5, 100] {
            for q in WIDTHS {
                let ins = inputs(n, len, 99);
                let bufs: Vec<Vec<u8>> = ins.iter().map(|x| to_bytes(x)).collect();
                let plans = ring_plans(n, len);
                let reference = simulate(&ins, q, 64);
                for k in 0..n {
                    let total = plans[k].steps.len();
                    for s in 0..=total {
                        let case = format!("n {n} len {len} {q}: rank {k} dies after {s} of {total} steps");
                        let faulty = Simulation { fault: Some(Fault { rank: k, after_steps: s }), ..sim(q, 64) };
                        let outcomes = faulty.run(&plans, bufs.clone());
                        assert_eq!(outcomes[k], Outcome::Killed, "{case}");
                        let mut completed = 0;
                        for (r, o) in outcomes.iter().enumerate().filter(|&(r, _)| r != k) {
                            match o {
                                Outcome::Failed { error, buf } => {
                                    assert!(
                                        matches!(error, Error::PeerLost { rank, .. } if *rank == k)
                                            || matches!(error, Error::Aborted { .. }),
                                        "{case}: rank {r} failed with {error:?}"
                                    );
                                    assert_eq!(buf, &bufs[r], "{case}: rank {r}'s buffer not restored");
                                }
                                Outcome::Done(buf) => {
                                    assert_eq!(s, total, "{case}: rank {r} completed without the victim");
                                    assert_eq!(from_bytes(buf), reference[r], "{case}: rank {r}");
                                    completed += 1;
                                }
                                other => panic!("{case}: rank {r} ended {other:?}"),
                            }
                        }
                        assert!(completed == 0 || completed == n - 1, "{case}: {completed} completed");
                    }
                }
            }
        }
    }
}

/// Runs `f(rank, comm)` on every communicator on its own thread.
fn on_each<T: Send>(comms: &mut [Communicator], f: impl Fn(&mut Communicator) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let f = &f;
        let hs: Vec<_> = comms.iter_mut().map(|c| s.spawn(move || f(c))).collect();
        hs.into_iter().map(|h| h.join().expect("rank thread")).collect()
    })
}

#[test]
fn local_groups_sum_and_average_identically() {
    for n in 1..=7 {
        for q in WIDTHS {
            // Larger than one 256 KiB chunk per segment for small n: several chunks.
            let len = 200_000;
            let ins = inputs(n, len, 1000 + n as u64);
            let mut comms = Communicator::local_group(n, Config::default()).unwrap();
            let outs = on_each(&mut comms, |c| {
                let mut x = ins[c.rank()].clone();
                c.all_reduce_quantized(&mut x, ReduceOp::Sum, q).unwrap();
                x
            });
            check(&ins, &outs, q);
            // The simulator with the same chunk size gives the same bytes.
            let chunk = Tuning::default().chunk_bytes;
            assert_eq!(outs, simulate(&ins, q, chunk), "n = {n}, {q}: local group vs simulator");
            let avgs = on_each(&mut comms, |c| {
                let mut x = ins[c.rank()].clone();
                c.all_reduce_quantized(&mut x, ReduceOp::Avg, q).unwrap();
                x
            });
            let want: Vec<f32> = outs[0].iter().map(|v| v / n as f32).collect();
            assert!(avgs.iter().all(|a| a == &want), "n = {n}, {q}: avg is the sum divided by n");
        }
    }
}

#[test]
fn other_operators_and_types_are_rejected() {
    let mut comms = Communicator::local_group(2, Config::default()).unwrap();
    for op in [ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max] {
        let err = comms[0].all_reduce_quantized(&mut [1.0], op, Quantization::U8).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{op:?}: {err:?}");
    }
    let err =
        comms[0].all_reduce_quantized_raw(&mut [0u8; 8], DType::F64, ReduceOp::Sum, Quantization::U8).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    let err =
        comms[0].all_reduce_quantized_raw(&mut [0u8; 6], DType::F32, ReduceOp::Sum, Quantization::U8).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    // Nothing ran: the group still works.
    let outs = on_each(&mut comms, |c| {
        let mut x = vec![1.0f32; 10];
        c.all_reduce_quantized(&mut x, ReduceOp::Sum, Quantization::U8).map(|()| x)
    });
    assert!(outs.iter().all(|o| o.as_ref().is_ok_and(|x| x == &vec![2.0; 10])), "{outs:?}");
}

#[test]
fn non_finite_input_fails_everywhere_with_buffers_restored() {
    for bad in [f32::NAN, f32::INFINITY] {
        let n = 3;
        let mut comms = Communicator::local_group(n, Config::default()).unwrap();
        let ins: Vec<Vec<f32>> =
            (0..n).map(|r| (0..100).map(|i| if r == 1 && i == 42 { bad } else { i as f32 }).collect()).collect();
        let outs = on_each(&mut comms, |c| {
            let mut x = ins[c.rank()].clone();
            let r = c.all_reduce_quantized(&mut x, ReduceOp::Sum, Quantization::U16);
            (r, x)
        });
        for (r, (result, x)) in outs.iter().enumerate() {
            assert!(matches!(result, Err(Error::InvalidArgument(m)) if m.contains("finite")), "rank {r}: {result:?}");
            assert_eq!(to_bytes(x), to_bytes(&ins[r]), "rank {r}'s buffer restored");
        }
    }
    // A group of one transmits nothing but applies the same rule.
    let mut one = Communicator::local_group(1, Config::default()).unwrap();
    let mut x = [1.0, f32::NAN];
    assert!(one[0].all_reduce_quantized(&mut x, ReduceOp::Sum, Quantization::U8).is_err());
    let mut y = [1.0f32, 2.5];
    one[0].all_reduce_quantized(&mut y, ReduceOp::Sum, Quantization::U8).unwrap();
    assert_eq!(y, [1.0, 2.5]);
}

#[test]
fn the_width_is_part_of_the_fingerprint() {
    let len = 1000;
    let a = Collective::QuantizedAllReduce { len, quantization: Quantization::U8 };
    let b = Collective::QuantizedAllReduce { len, quantization: Quantization::U16 };
    let plain = Collective::AllReduce { len };
    let fps = [&a, &b, &plain].map(|c| c.fingerprint(DType::F32, ReduceOp::Sum));
    assert!(fps[0] != fps[1] && fps[0] != fps[2] && fps[1] != fps[2], "{fps:?}");
    // Ranks that disagree on the width get a mismatch, not a silent mix.
    let mut comms = Communicator::local_group(2, Config::default()).unwrap();
    let errs = on_each(&mut comms, |c| {
        let q = if c.rank() == 0 { Quantization::U8 } else { Quantization::U16 };
        let mut x = vec![1.0f32; len];
        c.all_reduce_quantized(&mut x, ReduceOp::Sum, q).unwrap_err()
    });
    assert!(errs.iter().all(|e| matches!(e, Error::Mismatch { .. })), "{errs:?}");
}

/// Over an in-memory network with a master: a peer that dies mid-collective gives the
/// survivors `PeerLost` with their buffers restored, and the retry over the survivors
/// gives bitwise the result of a fault-free quantized ring over them.
#[test]
fn networked_peer_lost_then_exact_retry() {
    with_timeout(60, || {
        let c = cluster();
        let mut comms = group(&c, 3, RetryPolicy::Never);
        let len = 300_000;
        let input = |c: &Communicator| inputs(1, len, c.peer_id())[0].clone();
        let victim = comms.pop().unwrap();
        let q = Quantization::U8;
        // The survivors start; the victim never sends and dies while they wait for it.
        let first = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter_mut()
                .map(|c| {
                    s.spawn(move || {
                        let orig = input(c);
                        let mut x = orig.clone();
                        let r = c.all_reduce_quantized(&mut x, ReduceOp::Sum, q);
                        (r, to_bytes(&x) == to_bytes(&orig))
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_millis(500));
            drop(victim);
            hs.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
        });
        for (r, (result, restored)) in first.iter().enumerate() {
            assert!(matches!(result, Err(Error::PeerLost { .. })), "survivor {r}: {result:?}");
            assert!(restored, "survivor {r}: buffer not restored");
        }
        // Retry as a training loop does: settle the view without the victim, call again.
        let outs = on_each(&mut comms, |c| {
            for _ in 0..50 {
                c.update_topology().unwrap();
                let mut x = input(c);
                match c.all_reduce_quantized(&mut x, ReduceOp::Sum, q) {
                    Ok(()) => return (c.rank(), c.size(), x),
                    Err(e) if e.is_retryable() => std::thread::sleep(Duration::from_millis(50)),
                    Err(e) => panic!("retry failed: {e:?}"),
                }
            }
            panic!("no view without the victim");
        });
        let mut by_rank: Vec<(usize, Vec<f32>, Vec<f32>)> = comms
            .iter()
            .zip(&outs)
            .map(|(c, (rank, size, x))| {
                assert_eq!(*size, 2);
                (*rank, input(c), x.clone())
            })
            .collect();
        by_rank.sort_by_key(|t| t.0);
        let ins: Vec<Vec<f32>> = by_rank.iter().map(|t| t.1.clone()).collect();
        let got: Vec<Vec<f32>> = by_rank.iter().map(|t| t.2.clone()).collect();
        check(&ins, &got, q);
        let want = simulate(&ins, q, Tuning::default().chunk_bytes);
        assert_eq!(got, want, "the retry equals a fault-free quantized ring over the survivors");
    });
}
