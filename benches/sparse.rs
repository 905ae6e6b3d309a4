//! Sparse all-reduce at 1 % density versus the dense all-reduce of the same dimension,
//! 4 ranks of a local group (in-memory transport), D = 4 Mi f32.
//!
//! `cargo bench --bench sparse`
//!
//! The ranks are spawned once and kept across iterations (as in `allreduce_mem`):
//! `iter_custom` tells every rank how many calls to make and times until all report
//! back. Each rank's 1 % of indices are distinct and spread over the dimension, so the
//! union has about 4 % of the indices. At the end it prints the median time per call
//! of both and their ratio.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use phalanx::{Communicator, ReduceOp};

mod common;
use common::{median_per_call, Ranks};

const N: usize = 4;
const DIM: usize = 4 << 20;
const DENSITY_PERCENT: usize = 1;
const SAMPLES: usize = 10;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sparse,
    Dense,
}

/// `N` rank threads, each with its 1 % of the indices (and a dense buffer), running
/// `kind`.
fn start(kind: Kind) -> Ranks {
    let (ranks, _) = Ranks::start(N, "collective", move |comm| {
        let r = comm.rank();
        let nnz = DIM * DENSITY_PERCENT / 100;
        let stride = DIM / nnz;
        let indices: Vec<u32> = (0..nnz).map(|k| (k * stride + r) as u32).collect();
        let values: Vec<f32> = (0..nnz).map(|k| (k % 97) as f32 * 0.25 - 12.0).collect();
        let mut dense = vec![0.0f32; DIM];
        let mut call = move |comm: &mut Communicator| -> Result<(), String> {
            match kind {
                Kind::Sparse => {
                    let out = comm.sparse_all_reduce(DIM, &indices, &values).map_err(|e| e.to_string())?;
                    if out.is_dense() {
                        return Err("1 % density took the dense path".into());
                    }
                    Ok(())
                }
                Kind::Dense => comm.all_reduce(&mut dense, ReduceOp::Sum).map_err(|e| e.to_string()),
            }
        };
        call(comm)?;
        Ok(((), call))
    });
    ranks
}

fn bench_sparse(c: &mut Criterion) {
    let mut group = c.benchmark_group(format!("sparse_allreduce/n{N}/D4Mi"));
    group
        .sample_size(SAMPLES)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sampling_mode(SamplingMode::Flat);
    let mut medians = Vec::new();
    for (kind, name) in [(Kind::Sparse, "sparse_1pct"), (Kind::Dense, "dense")] {
        let ranks = start(kind);
        let samples: Arc<Mutex<Vec<(u64, Duration)>>> = Arc::default();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let t = ranks.run(iters);
                samples.lock().expect("samples").push((iters, t));
                t
            })
        });
        drop(ranks);
        let samples = samples.lock().expect("samples");
        medians.push((name, median_per_call(&samples, SAMPLES).unwrap_or(f64::NAN)));
    }
    group.finish();
    println!("\nsparse all-reduce, {N} ranks, D = {DIM} f32, local group (median of {SAMPLES} samples)");
    for (name, t) in &medians {
        println!("  {name:<12} {:>10.2} ms", t * 1e3);
    }
    if let [(_, sparse), (_, dense)] = medians[..] {
        println!("  dense / sparse time ratio: {:.2}", dense / sparse);
    }
}

criterion_group!(benches, bench_sparse);
criterion_main!(benches);
