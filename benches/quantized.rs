//! Quantized (u8, u16) versus plain f32 all-reduce on a local group of 4 ranks.
//!
//! `cargo bench --bench quantized`
//!
//! The ranks run on their own threads, kept across iterations as in `allreduce_mem`;
//! each call is an `Avg` (so that repeated calls on one buffer neither overflow nor
//! collapse to constants) of varied values. Besides criterion's times, the bench prints
//! per size the median time of each variant, its ratio to plain f32, and the bytes one
//! rank puts on the wire per call (counted from the ring plan and the frame format:
//! `2(n-1)/n·S` for f32; 8 header bytes plus one code per element per frame when
//! quantized).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use phalanx::collective::Tuning;
use phalanx::plan::{allreduce, Step};
use phalanx::quant::{Codec, Quantization};
use phalanx::{Communicator, ReduceOp};

mod common;
use common::{median_per_call, Ranks};

const N: usize = 4;
const SIZES: [(usize, &str); 2] = [(16 << 20, "16MiB"), (64 << 20, "64MiB")];
const SAMPLES: usize = 10;
const VARIANTS: [Option<Quantization>; 3] = [None, Some(Quantization::U16), Some(Quantization::U8)];

fn name(v: Option<Quantization>) -> String {
    v.map_or("f32".into(), |q| q.to_string())
}

/// `N` rank threads, each with a communicator and an `S`-byte buffer, all-reducing it
/// (`Avg`) by `variant`.
fn start(bytes: usize, variant: Option<Quantization>) -> Ranks {
    let (ranks, _) = Ranks::start(N, "all-reduce", move |comm| {
        let r = comm.rank() as f32;
        let mut buf: Vec<f32> = (0..bytes / 4).map(|i| (i as f32 * 1e-3 + r).sin() * (1.0 + r)).collect();
        let mut call = move |comm: &mut Communicator| {
            match variant {
                None => comm.all_reduce(&mut buf, ReduceOp::Avg),
                Some(q) => comm.all_reduce_quantized(&mut buf, ReduceOp::Avg, q),
            }
            .map_err(|e| e.to_string())
        };
        call(comm)?;
        Ok(((), call))
    });
    ranks
}

/// Payload bytes rank 0 sends in one all-reduce of `bytes` bytes.
fn wire_bytes(bytes: usize, variant: Option<Quantization>) -> usize {
    let len = bytes / 4;
    let chunk = Tuning::default().chunk_bytes / 4;
    let plan = allreduce::ring(0, N, len);
    plan.steps
        .iter()
        .filter_map(|s| match s {
            Step::Exchange { send: Some(s), .. } => Some(s.range.len()),
            _ => None,
        })
        .map(|elems| {
            let frames = elems.div_ceil(chunk).max(1);
            match variant {
                None => elems * 4,
                Some(q) => frames * Codec::new(q).encoded_len(0) + elems * q.code_bytes(),
            }
        })
        .sum()
}

fn bench_quantized(c: &mut Criterion) {
    let mut summary = Vec::new();
    let mut group = c.benchmark_group(format!("quantized_allreduce/n{N}"));
    group.sample_size(SAMPLES).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    group.sampling_mode(SamplingMode::Flat);
    for (bytes, label) in SIZES {
        group.throughput(Throughput::Bytes(bytes as u64));
        let mut medians = Vec::new();
        for variant in VARIANTS {
            let ranks = start(bytes, variant);
            let samples: Arc<Mutex<Vec<(u64, Duration)>>> = Arc::default();
            group.bench_function(BenchmarkId::new(name(variant), label), |b| {
                b.iter_custom(|iters| {
                    let t = ranks.run(iters);
                    samples.lock().unwrap().push((iters, t));
                    t
                })
            });
            drop(ranks);
            let samples = samples.lock().unwrap();
            medians.push(median_per_call(&samples, SAMPLES).unwrap_or(f64::NAN));
        }
        let base_wire = wire_bytes(bytes, None) as f64;
        for (variant, t) in VARIANTS.iter().zip(&medians) {
            let wire = wire_bytes(bytes, *variant);
            summary.push(format!(
                "S={label:>6} {:>4}: time {:>8.1} ms ({:.2}x f32)  wire/rank {:>6.2} MiB ({:.3}x f32)",
                name(*variant),
                t * 1e3,
                t / medians[0],
                wire as f64 / (1 << 20) as f64,
                wire as f64 / base_wire
            ));
        }
    }
    group.finish();
    println!("\nall-reduce Avg, {N} ranks of a local group (median of {SAMPLES} samples)");
    for line in &summary {
        println!("  {line}");
    }
}

/// The codec alone on one default-sized chunk (256 KiB of f32): encode (with the
/// replacement by decoded values), decode, and decode-and-add.
fn bench_codec(c: &mut Criterion) {
    let len = Tuning::default().chunk_bytes / 4;
    let x: Vec<f32> = (0..len).map(|i| (i as f32 * 1e-3).sin()).collect();
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Bytes((len * 4) as u64));
    for q in [Quantization::U8, Quantization::U16] {
        let codec = Codec::new(q);
        let mut work = x.clone();
        group.bench_function(BenchmarkId::new("encode_replace", q), |b| {
            b.iter(|| {
                work.copy_from_slice(&x);
                codec.encode_replace(&mut work).expect("finite")
            })
        });
        let frame = codec.encode_replace(&mut x.clone()).expect("finite");
        group.bench_function(BenchmarkId::new("decode", q), |b| b.iter(|| codec.decode(&frame, &mut work)));
        group.bench_function(BenchmarkId::new("decode_add", q), |b| b.iter(|| codec.decode_add(&frame, &mut work)));
    }
    group.finish();
}

criterion_group!(benches, bench_codec, bench_quantized);
criterion_main!(benches);
