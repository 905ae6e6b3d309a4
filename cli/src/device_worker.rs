//! `phalanx device-worker` (internal, started by `device-check`): one host's GPU as its
//! own process, a 1-rank device communicator (NCCL, or the CPU stand-in) joined to the
//! other processes by a phalanx group over QUIC through the hierarchical all-reduce.
//! It prints one JSON event per line:
//!
//! - `collective`: each device collective on device buffers against its CPU reference
//!   (one rank: every collective gives back its input), and the device-side backup;
//! - `hierarchical`: the hierarchical all-reduce across the processes, exact integer
//!   sums against the reference;
//! - `timing`: the seconds of each timed hierarchical all-reduce of `--mib` MiB;
//! - `hanging` (`--hang`): waits to be killed; `killed-peer` (the others): the
//!   all-reduce that was running when a peer was killed failed with a retryable error
//!   and the device buffer is as it was.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use phalanx::device::hier::all_reduce_hierarchical;
use phalanx::device::memory::{Backup, DeviceMemory};
use phalanx::device::{DeviceBackend, DeviceComm, DeviceError};
use phalanx::{Communicator, DType, ReduceOp};
use serde_json::json;

use crate::{emit, now_ms, settling_options};

/// The device backend of a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// The CPU stand-in: host buffers, no GPU (what CI runs).
    Standin,
    /// NCCL and the CUDA driver, loaded at run time (needs the `nccl` feature and a GPU).
    Nccl,
}

/// Options of `phalanx device-worker`.
#[derive(Parser, Clone)]
pub struct DeviceWorkerArgs {
    /// The master's address.
    #[arg(long)]
    pub master: SocketAddr,
    /// This process's number: its peer id and its rank in the first view.
    #[arg(long)]
    pub device: u64,
    /// How many processes the group has.
    #[arg(long, default_value_t = 2)]
    pub peers: usize,
    /// The device backend.
    #[arg(long, value_enum, default_value = "standin")]
    pub backend: BackendKind,
    /// The GPU to use (NCCL).
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// MiB of f32 of each timed all-reduce.
    #[arg(long, default_value_t = 256)]
    pub mib: usize,
    /// Timed all-reduces.
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// After the timed all-reduces, stop and wait to be killed.
    #[arg(long)]
    pub hang: bool,
}

fn err(stage: &str, e: impl std::fmt::Display) -> String {
    format!("{stage}: {e}")
}

pub fn run(args: DeviceWorkerArgs) -> Result<(), String> {
    let options = settling_options(Some(args.device), None, phalanx::comm::DEFAULT_HEARTBEAT_MS);
    let mut comm = Communicator::connect(args.master, options).map_err(|e| err("join", e))?;
    comm.update_topology().map_err(|e| err("settling the first view", e))?;
    if comm.size() != args.peers || comm.rank() as u64 != args.device {
        return Err(format!(
            "joined as rank {} of {}, expected {} of {}",
            comm.rank(),
            comm.size(),
            args.device,
            args.peers
        ));
    }
    emit(json!({ "event": "joined", "device": args.device, "t": now_ms() }));
    match args.backend {
        BackendKind::Standin => {
            let backend =
                phalanx::device::standin::StandIn::new(phalanx::device::Capabilities::ALL, Duration::from_secs(60));
            check(&backend, &mut comm, &args)
        }
        BackendKind::Nccl => nccl(&mut comm, &args),
    }?;
    emit(json!({ "event": "done", "t": now_ms() }));
    comm.leave();
    Ok(())
}

#[cfg(feature = "nccl")]
fn nccl(comm: &mut Communicator, args: &DeviceWorkerArgs) -> Result<(), String> {
    use phalanx::device::nccl::cuda::CudaDevice;
    use phalanx::device::nccl::{NcclBackend, NcclLibrary};
    let lib = NcclLibrary::load().map_err(|e| err("loading NCCL", e))?;
    emit(json!({ "event": "nccl", "path": lib.path().display().to_string(), "version": lib.version().to_string() }));
    let cuda = CudaDevice::open(args.gpu).map_err(|e| err("opening the GPU", e))?;
    // SAFETY: NULL is the legacy default stream, valid for as long as the process runs.
    let backend = unsafe { NcclBackend::new(std::sync::Arc::new(lib), std::ptr::null_mut()) }.with_device(cuda);
    check(&backend, comm, args)
}

#[cfg(not(feature = "nccl"))]
fn nccl(_: &mut Communicator, _: &DeviceWorkerArgs) -> Result<(), String> {
    Err("this phalanx was built without its `nccl` feature: cargo build --release -p phalanx-cli --features nccl"
        .into())
}

/// The value of element `i` on device `d`: small integers, so every sum is exact.
fn value(d: u64, i: usize) -> f32 {
    ((d as usize * 7 + i * 3) % 11) as f32 - 5.0
}

fn upload<C: DeviceMemory>(local: &mut C, host: &[f32]) -> Result<C::Buffer, DeviceError> {
    let mut b = local.alloc(host.len(), DType::F32)?;
    local.upload(bytemuck::cast_slice(host), &mut b)?;
    Ok(b)
}

fn download<C: DeviceMemory>(local: &mut C, b: &C::Buffer) -> Result<Vec<f32>, DeviceError> {
    let mut host = vec![0.0_f32; C::len_of(b)];
    local.download(b, bytemuck::cast_slice_mut(&mut host))?;
    Ok(host)
}

/// Runs `f` on a device copy of `input` and reports whether what it left (read back)
/// equals `input`: on one rank every collective gives back its input.
fn collective<C: DeviceMemory>(
    local: &mut C,
    name: &str,
    input: &[f32],
    f: impl FnOnce(&mut C, &C::Buffer, &mut C::Buffer) -> Result<(), DeviceError>,
) -> bool {
    let outcome = (|| {
        let src = upload(local, input)?;
        let mut dst = upload(local, &vec![f32::NAN; input.len()])?;
        f(local, &src, &mut dst)?;
        local.finish()?;
        download(local, &dst)
    })();
    let (ok, detail) = match outcome {
        Ok(got) if got == input => (true, String::new()),
        Ok(got) => (
            false,
            format!("first elements {:?}, expected {:?}", &got[..got.len().min(4)], &input[..input.len().min(4)]),
        ),
        Err(e) => (false, e.to_string()),
    };
    emit(json!({ "event": "collective", "name": name, "ok": ok, "detail": detail }));
    ok
}

fn check<B>(backend: &B, comm: &mut Communicator, args: &DeviceWorkerArgs) -> Result<(), String>
where
    B: DeviceBackend,
    B::Comm: DeviceMemory,
{
    let id = backend.unique_id().map_err(|e| err("unique id", e))?;
    let mut local = backend.init(&id, 0, 1).map_err(|e| err("a 1-rank device communicator", e))?;
    let input: Vec<f32> = (0..1000).map(|i| value(args.device, i)).collect();
    let l = &mut local;
    let copy = |c: &mut B::Comm, s: &<B::Comm as DeviceComm>::Buffer, d: &mut <B::Comm as DeviceComm>::Buffer| {
        c.copy_prefix(s, d, B::Comm::len_of(s))
    };
    collective(l, "all_reduce", &input, |c, s, d| {
        copy(c, s, d)?;
        c.all_reduce(d, ReduceOp::Sum)
    });
    collective(l, "reduce_scatter", &input, |c, s, d| c.reduce_scatter(s, d, ReduceOp::Sum));
    collective(l, "all_gather", &input, |c, s, d| c.all_gather(s, d));
    collective(l, "broadcast", &input, |c, s, d| {
        copy(c, s, d)?;
        c.broadcast(d, 0)
    });
    collective(l, "reduce", &input, |c, s, d| {
        copy(c, s, d)?;
        c.reduce(d, 0, ReduceOp::Max)
    });
    collective(l, "send_recv", &input, |c, s, d| c.send_recv(&[(0, s)], &mut [(0, d)]));
    // The device-side backup: taken, the buffer overwritten, put back.
    collective(l, "backup_restore", &input, |c, s, d| {
        copy(c, s, d)?;
        let backup = Backup::take(c, d)?;
        let zeros = upload(c, &vec![0.0; B::Comm::len_of(d)])?;
        c.copy_prefix(&zeros, d, B::Comm::len_of(d))?;
        backup.restore(c, d)
    });
    hierarchical(&mut local, comm, args)?;
    timing(&mut local, comm, args)?;
    if args.hang {
        emit(json!({ "event": "hanging", "t": now_ms() }));
        loop {
            std::thread::park();
        }
    }
    killed_peer(&mut local, comm, args)
}

/// The hierarchical all-reduce across the processes, exact sums checked.
fn hierarchical<C: DeviceMemory>(
    local: &mut C,
    comm: &mut Communicator,
    args: &DeviceWorkerArgs,
) -> Result<(), String> {
    let len = 1 << 16;
    let host: Vec<f32> = (0..len).map(|i| value(args.device, i)).collect();
    let mut buf = upload(local, &host).map_err(|e| err("upload", e))?;
    let outcome = all_reduce_hierarchical(local, &mut buf, ReduceOp::Sum, |s| comm.all_reduce(s, ReduceOp::Sum));
    let got = download(local, &buf).map_err(|e| err("download", e))?;
    let expected: Vec<f32> = (0..len).map(|i| (0..args.peers as u64).map(|d| value(d, i)).sum()).collect();
    let ok = outcome.is_ok() && got == expected;
    let detail = outcome.err().map(|e| e.to_string()).unwrap_or_default();
    emit(json!({ "event": "hierarchical", "ok": ok, "elements": len, "detail": detail }));
    Ok(())
}

fn timing<C: DeviceMemory>(local: &mut C, comm: &mut Communicator, args: &DeviceWorkerArgs) -> Result<(), String> {
    let len = args.mib * (1 << 20) / 4;
    let mut buf = upload(local, &vec![1.0; len]).map_err(|e| err("upload", e))?;
    let mut seconds = Vec::new();
    for _ in 0..args.iters {
        let t = Instant::now();
        all_reduce_hierarchical(local, &mut buf, ReduceOp::Max, |s| comm.all_reduce(s, ReduceOp::Max))
            .map_err(|e| err("timed all-reduce", e))?;
        seconds.push(t.elapsed().as_secs_f64());
    }
    emit(json!({ "event": "timing", "mib": args.mib, "seconds": seconds }));
    Ok(())
}

/// Runs an all-reduce while a peer hangs (and is killed by `device-check`): it must fail
/// retryably with the device buffer as it was.
fn killed_peer<C: DeviceMemory>(local: &mut C, comm: &mut Communicator, args: &DeviceWorkerArgs) -> Result<(), String> {
    let host: Vec<f32> = (0..4096).map(|i| value(args.device, i) + 0.5).collect();
    let mut buf = upload(local, &host).map_err(|e| err("upload", e))?;
    emit(json!({ "event": "entering", "t": now_ms() }));
    let outcome = all_reduce_hierarchical(local, &mut buf, ReduceOp::Sum, |s| comm.all_reduce(s, ReduceOp::Sum));
    let t = now_ms();
    let after = download(local, &buf).map_err(|e| err("download", e))?;
    let (retryable, error) = match &outcome {
        Ok(()) => (false, "the all-reduce succeeded with a peer killed".to_string()),
        Err(e) => (e.is_retryable(), e.to_string()),
    };
    emit(json!({ "event": "killed-peer", "retryable": retryable, "error": error, "restored": after == host, "t": t }));
    Ok(())
}
