//! All-scan on a local group of 4 ranks, 4 MiB state per rank: the pipelined chain
//! (and recursive doubling, and a one-block chain) versus all-gather followed by a local
//! scan (LASP-2 style: every rank gathers every state and folds the prefix itself).
//!
//! `cargo bench --bench scan`
//!
//! Two operators: the linear-attention combine on `(a, S)` with `d_v = 128` (8128 rows
//! of 129 f32), and element-wise f32 sum. The ranks are spawned once and kept; each
//! iteration first restores the rank's input (a 4 MiB copy, in every variant), then runs
//! one scan. Every variant is checked once against the chain's result before timing.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use phalanx::comm::ScanOptions;
use phalanx::dtype::Order;
use phalanx::op::{CustomOp, LinearAttention};
use phalanx::plan::scan::Algorithm;
use phalanx::{Communicator, ReduceOp};

mod common;
use common::Ranks;

const N: usize = 4;
const D_V: usize = 128;
const STATE_BYTES: usize = 4 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    LinearAttention,
    Sum,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Scan(Algorithm),
    GatherThenScan,
}

/// Bytes of one unit and units of the state for `op`.
fn shape(op: Op) -> (usize, usize) {
    match op {
        Op::LinearAttention => {
            let unit = LinearAttention::new(D_V).unit_bytes();
            (unit, STATE_BYTES / unit)
        }
        Op::Sum => (4, STATE_BYTES / 4),
    }
}

fn input(op: Op, rank: usize) -> Vec<u8> {
    let (unit, units) = shape(op);
    let floats = unit * units / 4;
    let v: Vec<f32> = (0..floats)
        .map(|i| match op {
            // Gates near 1 at the start of each row, small state values elsewhere.
            Op::LinearAttention if i % (D_V + 1) == 0 => 0.99 + (rank as f32) * 0.001,
            _ => ((i * 7 + rank * 13) % 17) as f32 * 0.125,
        })
        .collect();
    bytemuck::cast_slice(&v).to_vec()
}

/// One rank's scan of `work` (its input on entry), by the variant.
fn run(comm: &mut Communicator, op: Op, variant: Variant, work: &mut [u8], gathered: &mut [u8]) -> Result<(), String> {
    let la = LinearAttention::new(D_V);
    match variant {
        Variant::Scan(algorithm) => {
            let options = ScanOptions::default().with_algorithm(algorithm);
            match op {
                Op::LinearAttention => comm.all_scan_with(work, &la, options),
                Op::Sum => comm.all_scan(bytemuck::cast_slice_mut::<u8, f32>(work), ReduceOp::Sum, options),
            }
            .map_err(|e| e.to_string())
        }
        Variant::GatherThenScan => {
            let counts = vec![work.len(); comm.size()];
            comm.all_gather_raw(work, gathered, &counts, phalanx::DType::U8).map_err(|e| e.to_string())?;
            // Left fold of ranks 0..=rank into `work`, the earlier state on the left.
            let s = work.len();
            work.copy_from_slice(&gathered[..s]);
            for q in 1..=comm.rank() {
                let next = &gathered[q * s..(q + 1) * s];
                match op {
                    Op::LinearAttention => la.combine(work, next, Order::IncomingRight),
                    Op::Sum => phalanx::dtype::reduce_bytes(
                        phalanx::DType::F32,
                        ReduceOp::Sum,
                        work,
                        next,
                        Order::IncomingRight,
                    ),
                }
            }
            Ok(())
        }
    }
}

/// `N` rank threads running `variant` of the scan of `op`; each iteration first restores
/// the rank's input. Also returns each rank's first (checked) result, in arrival order
/// with its rank unknown, for comparison across variants.
fn start(op: Op, variant: Variant) -> (Ranks, Vec<Vec<u8>>) {
    Ranks::start(N, "scan", move |comm| {
        let pristine = input(op, comm.rank());
        let mut work = pristine.clone();
        let mut gathered = vec![0u8; pristine.len() * N];
        run(comm, op, variant, &mut work, &mut gathered)?;
        let first = work.clone();
        let step = move |comm: &mut Communicator| {
            work.copy_from_slice(&pristine);
            run(comm, op, variant, &mut work, &mut gathered)
        };
        Ok((first, step))
    })
}

fn bench(c: &mut Criterion) {
    let variants = [
        ("chain_auto", Variant::Scan(Algorithm::Auto)),
        ("chain_k1", Variant::Scan(Algorithm::Chain { blocks: 1 })),
        ("chain_k4", Variant::Scan(Algorithm::Chain { blocks: 4 })),
        ("recursive_doubling", Variant::Scan(Algorithm::RecursiveDoubling)),
        ("allgather_then_scan", Variant::GatherThenScan),
    ];
    // Untimed warm-up: the process's first large allocations are fresh mappings (a page
    // fault per page) until the allocator adapts; without this the first variant
    // measured pays for it (observed: 4x slower, whichever variant comes first).
    for (_, variant) in variants {
        let (g, _) = start(Op::LinearAttention, variant);
        g.run(3);
    }
    for op in [Op::LinearAttention, Op::Sum] {
        let mut group = c.benchmark_group(format!("all_scan_4MiB_4ranks/{op:?}"));
        group.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_millis(500));
        group.measurement_time(Duration::from_secs(4)).throughput(Throughput::Bytes(STATE_BYTES as u64));
        let mut reference: Option<Vec<Vec<u8>>> = None;
        for (name, variant) in variants {
            let (g, mut firsts) = start(op, variant);
            firsts.sort();
            // The chain is the left fold; so is the gather's local fold: same bytes.
            // (Recursive doubling groups differently; it is only checked for sum.)
            if variant != Variant::Scan(Algorithm::RecursiveDoubling) || op == Op::Sum {
                match &reference {
                    None => reference = Some(firsts),
                    Some(r) => assert!(r == &firsts, "{name} disagrees with the chain for {op:?}"),
                }
            }
            group.bench_function(BenchmarkId::from_parameter(name), |b| b.iter_custom(|iters| g.run(iters)));
            drop(g);
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
