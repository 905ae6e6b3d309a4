//! Reduce-kernel throughput against a plain memcpy of the same byte size.
//!
//! `cargo bench --bench kernels`
//!
//! For each buffer size `S` (64 KiB .. 64 MiB) three functions run side by side:
//!
//! * `memcpy`: `dst.copy_from_slice(src)` of `S` bytes (reads `S`, writes `S`);
//! * `sum_f32`: `reduce_slice(Sum, acc, inc, IncomingRight)` over `S / 4` f32s
//!   (reads `2S`, writes `S`);
//! * `sum_bf16`: the same over `S / 2` bf16s.
//!
//! Throughput is reported as `S` bytes per iteration for all three, so the GB/s figures
//! compare directly: "how fast does a buffer of this size get combined, versus copied".
//! The issue-2 target is `sum_f32` at 64 MiB within 2x the time of `memcpy`.
//!
//! Every buffer is page-aligned. glibc's `memcpy` uses `rep movsb` on CPUs with FSRM,
//! and on AMD Zen 3 that runs up to 20x slower for cache-resident sizes when source and
//! destination differ in their offset within a 64-byte line; `memcpy_skew16` measures
//! that case (destination 16 bytes past a page boundary) so that it shows in the
//! figures instead of silently distorting the baseline.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use phalanx::dtype::{reduce_slice, Order, ReduceOp};

const SIZES: [(usize, &str); 4] = [(64 << 10, "64KiB"), (1 << 20, "1MiB"), (16 << 20, "16MiB"), (64 << 20, "64MiB")];

/// Values whose running sums stay normal (no subnormals, no infinities) however many
/// times the kernel is applied to the same accumulator.
fn f32_data(len: usize, seed: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7 + seed) % 13) as f32 * 0.25 + 1.0).collect()
}

/// A page of bytes; `Vec<Page>` is a page-aligned buffer.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Page([u8; 4096]);

// SAFETY: a byte array with no padding (size == align == 4096); every bit pattern is valid.
unsafe impl bytemuck::Zeroable for Page {}
// SAFETY: as above; `Page` is `Copy`, `repr(C)` and `'static`.
unsafe impl bytemuck::Pod for Page {}

/// A page-aligned buffer of `bytes` bytes (a multiple of the page size, plus `extra`
/// pages of slack).
fn pages(bytes: usize, extra: usize) -> Vec<Page> {
    vec![Page([0; 4096]); bytes.div_ceil(4096) + extra]
}

fn bench_kernels(c: &mut Criterion) {
    let mut group = c.benchmark_group("kernels");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    for (bytes, label) in SIZES {
        group.throughput(Throughput::Bytes(bytes as u64));

        let mut src_pages = pages(bytes, 0);
        let mut dst_pages = pages(bytes, 1);
        let src: &mut [u8] = bytemuck::cast_slice_mut(&mut src_pages);
        src.fill(0x5a);
        let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut dst_pages);
        group.bench_function(BenchmarkId::new("memcpy", label), |b| {
            b.iter(|| {
                dst[..bytes].copy_from_slice(black_box(&src[..bytes]));
                black_box(&mut *dst);
            })
        });
        group.bench_function(BenchmarkId::new("memcpy_skew16", label), |b| {
            b.iter(|| {
                dst[16..16 + bytes].copy_from_slice(black_box(&src[..bytes]));
                black_box(&mut *dst);
            })
        });
        drop((src_pages, dst_pages));

        let n = bytes / 4;
        let (mut acc_pages, mut inc_pages) = (pages(bytes, 0), pages(bytes, 0));
        let acc: &mut [f32] = bytemuck::cast_slice_mut(&mut acc_pages);
        let inc: &mut [f32] = bytemuck::cast_slice_mut(&mut inc_pages);
        acc.copy_from_slice(&f32_data(n, 0));
        inc.copy_from_slice(&f32_data(n, 5));
        group.bench_function(BenchmarkId::new("sum_f32", label), |b| {
            b.iter(|| {
                reduce_slice(ReduceOp::Sum, black_box(&mut *acc), black_box(&*inc), Order::IncomingRight);
            })
        });
        drop((acc_pages, inc_pages));

        let n = bytes / 2;
        let (mut acc_pages, mut inc_pages) = (pages(bytes, 0), pages(bytes, 0));
        let acc: &mut [bf16] = bytemuck::cast_slice_mut(&mut acc_pages);
        let inc: &mut [bf16] = bytemuck::cast_slice_mut(&mut inc_pages);
        let to_bf16 = |v: Vec<f32>| v.into_iter().map(bf16::from_f32).collect::<Vec<_>>();
        acc.copy_from_slice(&to_bf16(f32_data(n, 0)));
        inc.copy_from_slice(&to_bf16(f32_data(n, 5)));
        group.bench_function(BenchmarkId::new("sum_bf16", label), |b| {
            b.iter(|| {
                reduce_slice(ReduceOp::Sum, black_box(&mut *acc), black_box(&*inc), Order::IncomingRight);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_kernels);
criterion_main!(benches);
