//! In-memory all-reduce of f32 (`Communicator::local_group`), n = 2 and 4 ranks.
//!
//! `cargo bench --bench allreduce_mem`
//!
//! For each (n, S), with S the buffer bytes per rank, the n ranks are spawned once on
//! their own threads and kept across iterations: criterion's `iter_custom` tells every
//! rank how many all-reduces to run over a channel and times until all have reported
//! back, so thread spawn and buffer allocation are never measured.
//!
//! Besides criterion's time per all-reduce, each (n, S) prints the bus bandwidth as
//! nccl-tests defines it, from the median of the measured samples:
//!
//! ```text
//! algbw = S / t            busbw = algbw * 2(n-1)/n
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use phalanx::{Communicator, ReduceOp};

mod common;
use common::{median_per_call, Ranks};

const SIZES: [(usize, &str); 6] = [
    (1 << 10, "1KiB"),
    (16 << 10, "16KiB"),
    (256 << 10, "256KiB"),
    (1 << 20, "1MiB"),
    (16 << 20, "16MiB"),
    (64 << 20, "64MiB"),
];

const SAMPLES: usize = 10;

/// `n` rank threads, each holding a communicator and an `S`-byte f32 buffer.
fn start(n: usize, bytes: usize) -> Ranks {
    let (ranks, _) = Ranks::start(n, "all-reduce", move |comm| {
        let len = bytes / 4;
        let rank = comm.rank() as f32;
        // One checked call first: every rank must see 1 + 2 + .. + n.
        let mut buf = vec![rank + 1.0; len];
        let want = (n * (n + 1) / 2) as f32;
        comm.all_reduce(&mut buf, ReduceOp::Sum).map_err(|e| e.to_string())?;
        if !buf.iter().all(|&x| x == want) {
            return Err(format!("rank {rank}: wrong all-reduce result"));
        }
        // Then contributions that sum to exactly zero, so that repeated
        // all-reduces of the same buffer never overflow.
        buf.fill(rank - (n - 1) as f32 / 2.0);
        let step = move |comm: &mut Communicator| comm.all_reduce(&mut buf, ReduceOp::Sum).map_err(|e| e.to_string());
        Ok(((), step))
    });
    ranks
}

fn human_bytes(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

fn bench_allreduce(c: &mut Criterion) {
    let mut summary = Vec::new();
    for n in [2usize, 4] {
        let mut group = c.benchmark_group(format!("allreduce_mem/n{n}"));
        group.sample_size(SAMPLES).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
        for (bytes, label) in SIZES {
            group.throughput(Throughput::Bytes(bytes as u64));
            // Large buffers take tens to hundreds of ms per call: flat sampling keeps
            // the iteration count (and so the wall time) bounded.
            group.sampling_mode(if bytes >= 1 << 20 { SamplingMode::Flat } else { SamplingMode::Auto });
            let ranks = start(n, bytes);
            let samples: Arc<Mutex<Vec<(u64, Duration)>>> = Arc::default();
            group.bench_function(BenchmarkId::new("f32_sum", label), |b| {
                b.iter_custom(|iters| {
                    let t = ranks.run(iters);
                    samples.lock().unwrap().push((iters, t));
                    t
                })
            });
            drop(ranks);
            // Criterion's last SAMPLES calls are the measurement (earlier ones warm up).
            let samples = samples.lock().unwrap();
            if let Some(t) = median_per_call(&samples, SAMPLES) {
                let algbw = bytes as f64 / t / 1e9;
                let busbw = algbw * 2.0 * (n - 1) as f64 / n as f64;
                let line = format!(
                    "n={n} S={:>7}  time {:>10.1} us  algbw {algbw:>6.2} GB/s  busbw {busbw:>6.2} GB/s",
                    human_bytes(bytes),
                    t * 1e6
                );
                println!("busbw: {line}");
                summary.push(line);
            }
        }
        group.finish();
    }
    println!("\nall-reduce f32 Sum over the in-memory transport (median of {SAMPLES} samples; GB = 1e9 B)");
    for line in &summary {
        println!("  {line}");
    }
}

criterion_group!(benches, bench_allreduce);
criterion_main!(benches);
