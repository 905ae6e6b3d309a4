//! NoLoCo-style pairwise averaging versus a whole-group all-reduce, in memory
//! (`Communicator::local_group`, 4 ranks, f32), and tagged point-to-point.
//!
//! `cargo bench --bench subgroup`
//!
//! Per buffer size S (bytes per rank), three ways to spend one step, all measured in the
//! same run on the same threads:
//! - `all_reduce`: every rank all-reduces S (Avg) with all 4;
//! - `pairs`: pairs (0,1) and (2,3) each all-reduce S (Avg) in their sub-group, at once;
//! - `send_recv`: each rank sends S to its pair partner and receives S from it.
//!
//! The ranks are spawned once and kept; criterion's `iter_custom` tells every rank how
//! many steps to run and times until all have reported back.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use phalanx::{Communicator, Config, ReduceOp};

const N: usize = 4;
const SIZES: [(usize, &str); 2] = [(1 << 20, "1MiB"), (16 << 20, "16MiB")];

#[derive(Clone, Copy)]
enum Mode {
    AllReduce,
    Pairs,
    SendRecv,
}

struct Group {
    go: Vec<mpsc::Sender<u64>>,
    done: mpsc::Receiver<()>,
    threads: Vec<JoinHandle<()>>,
}

impl Group {
    fn start(bytes: usize, mode: Mode) -> Group {
        let comms = Communicator::local_group(N, Config::default()).expect("local group");
        let (done_tx, done) = mpsc::channel();
        let (mut go, mut threads) = (Vec::new(), Vec::new());
        for mut comm in comms {
            let (go_tx, go_rx) = mpsc::channel::<u64>();
            let done_tx = done_tx.clone();
            go.push(go_tx);
            threads.push(std::thread::spawn(move || {
                let r = comm.rank();
                let partner = r ^ 1;
                let pair = [r.min(partner), r.max(partner)];
                let mut buf = vec![r as f32; bytes / 4];
                let mut other = vec![0f32; bytes / 4];
                while let Ok(steps) = go_rx.recv() {
                    for _ in 0..steps {
                        match mode {
                            Mode::AllReduce => comm.all_reduce(&mut buf, ReduceOp::Avg).expect("all-reduce"),
                            Mode::Pairs => comm.sub_all_reduce(&pair, &mut buf, ReduceOp::Avg).expect("pairs"),
                            Mode::SendRecv => {
                                comm.send(partner, 0, &buf).expect("send");
                                comm.recv(partner, 0, &mut other).expect("recv");
                            }
                        }
                    }
                    if done_tx.send(()).is_err() {
                        return;
                    }
                }
            }));
        }
        Group { go, done, threads }
    }

    fn run(&self, steps: u64) -> Duration {
        let t = Instant::now();
        for g in &self.go {
            g.send(steps).expect("rank alive");
        }
        for _ in 0..N {
            self.done.recv().expect("rank reports");
        }
        t.elapsed()
    }

    fn stop(self) {
        drop(self.go);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("subgroup_mem_4ranks");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_millis(500));
    for (bytes, label) in SIZES {
        g.throughput(Throughput::Bytes(bytes as u64));
        for (mode, name) in [(Mode::AllReduce, "all_reduce"), (Mode::Pairs, "pairs"), (Mode::SendRecv, "send_recv")] {
            let group = Group::start(bytes, mode);
            g.bench_with_input(BenchmarkId::new(name, label), &bytes, |b, _| b.iter_custom(|steps| group.run(steps)));
            group.stop();
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
