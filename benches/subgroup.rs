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

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use phalanx::{Communicator, ReduceOp};

mod common;
use common::Ranks;

const N: usize = 4;
const SIZES: [(usize, &str); 2] = [(1 << 20, "1MiB"), (16 << 20, "16MiB")];

#[derive(Clone, Copy)]
enum Mode {
    AllReduce,
    Pairs,
    SendRecv,
}

/// `N` rank threads, each with an `S`-byte buffer, spending each step by `mode`.
fn start(bytes: usize, mode: Mode) -> Ranks {
    let (ranks, _) = Ranks::start(N, "step", move |comm| {
        let r = comm.rank();
        let partner = r ^ 1;
        let pair = [r.min(partner), r.max(partner)];
        let mut buf = vec![r as f32; bytes / 4];
        let mut other = vec![0f32; bytes / 4];
        let step = move |comm: &mut Communicator| {
            match mode {
                Mode::AllReduce => comm.all_reduce(&mut buf, ReduceOp::Avg).expect("all-reduce"),
                Mode::Pairs => comm.sub_all_reduce(&pair, &mut buf, ReduceOp::Avg).expect("pairs"),
                Mode::SendRecv => {
                    comm.send(partner, 0, &buf).expect("send");
                    comm.recv(partner, 0, &mut other).expect("recv");
                }
            }
            Ok(())
        };
        Ok(((), step))
    });
    ranks
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("subgroup_mem_4ranks");
    g.sampling_mode(SamplingMode::Flat).sample_size(10).warm_up_time(Duration::from_millis(500));
    for (bytes, label) in SIZES {
        g.throughput(Throughput::Bytes(bytes as u64));
        for (mode, name) in [(Mode::AllReduce, "all_reduce"), (Mode::Pairs, "pairs"), (Mode::SendRecv, "send_recv")] {
            let group = start(bytes, mode);
            g.bench_with_input(BenchmarkId::new(name, label), &bytes, |b, _| b.iter_custom(|steps| group.run(steps)));
            drop(group);
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
