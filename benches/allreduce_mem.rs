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

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use phalanx::{Communicator, Config, ReduceOp};

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
struct Group {
    /// Per-rank "run this many all-reduces" channels; dropping them stops the ranks.
    go: Vec<mpsc::Sender<u64>>,
    /// One message per rank per batch.
    done: mpsc::Receiver<Result<(), String>>,
    threads: Vec<JoinHandle<()>>,
}

impl Group {
    fn start(n: usize, bytes: usize) -> Group {
        let comms = Communicator::local_group(n, Config::default()).expect("local group");
        let (done_tx, done) = mpsc::channel();
        let mut go = Vec::new();
        let mut threads = Vec::new();
        for mut comm in comms {
            let (go_tx, go_rx) = mpsc::channel::<u64>();
            let done_tx = done_tx.clone();
            go.push(go_tx);
            threads.push(std::thread::spawn(move || {
                let len = bytes / 4;
                let rank = comm.rank() as f32;
                // One checked call first: every rank must see 1 + 2 + .. + n.
                let mut buf = vec![rank + 1.0; len];
                let want = (n * (n + 1) / 2) as f32;
                let first =
                    comm.all_reduce(&mut buf, ReduceOp::Sum).map_err(|e| e.to_string()).and_then(|()| {
                        match buf.iter().all(|&x| x == want) {
                            true => Ok(()),
                            false => Err(format!("rank {rank}: wrong all-reduce result")),
                        }
                    });
                // Then contributions that sum to exactly zero, so that repeated
                // all-reduces of the same buffer never overflow.
                buf.fill(rank - (n - 1) as f32 / 2.0);
                let _ = done_tx.send(first);
                while let Ok(iters) = go_rx.recv() {
                    let mut result = Ok(());
                    for _ in 0..iters {
                        if let Err(e) = comm.all_reduce(&mut buf, ReduceOp::Sum) {
                            result = Err(e.to_string());
                            break;
                        }
                    }
                    if done_tx.send(result).is_err() {
                        break;
                    }
                }
            }));
        }
        let group = Group { go, done, threads };
        group.wait();
        group
    }

    /// Waits for every rank to finish its batch.
    fn wait(&self) {
        for _ in 0..self.go.len() {
            match self.done.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("all-reduce failed: {e}"),
                Err(_) => panic!("a rank thread died"),
            }
        }
    }

    /// Runs `iters` all-reduces on every rank; the wall time until all are done.
    fn run(&self, iters: u64) -> Duration {
        let start = Instant::now();
        for go in &self.go {
            go.send(iters).expect("rank thread alive");
        }
        self.wait();
        start.elapsed()
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.go.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
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
            let ranks = Group::start(n, bytes);
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
            let mut per_iter: Vec<f64> = samples[samples.len().saturating_sub(SAMPLES)..]
                .iter()
                .map(|&(iters, t)| t.as_secs_f64() / iters as f64)
                .collect();
            per_iter.sort_by(f64::total_cmp);
            if let Some(&t) = per_iter.get(per_iter.len() / 2) {
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
