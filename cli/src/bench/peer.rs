//! `phalanx bench-peer`: one peer process of `phalanx bench`.

use std::time::{Duration, Instant};

use phalanx::collective::Tuning;
use phalanx::comm::ControlConfig;
use phalanx::comm::{ConnectOptions, RetryPolicy};
use phalanx::{Communicator, Error, ReduceOp};
use serde_json::json;

use super::collectives::{Buffers, Coll};
use super::raw::raw_end;
use super::{iters_for, now_us, sched_secs, PeerArgs};
use crate::emit;

fn fail(stage: &str, e: &dyn std::fmt::Display) -> String {
    emit(json!({ "event": "error", "stage": stage, "message": e.to_string() }));
    format!("{stage}: {e}")
}

/// Waits until the group has `n` members: every member calls `update_topology` while a
/// joiner waits, and the joiner's own first call returns at once.
fn form_group(comm: &mut Communicator, n: usize) -> Result<(), Error> {
    while comm.size() < n {
        if comm.peers_pending() == 0 {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        comm.update_topology()?;
    }
    Ok(())
}

pub fn run_peer(args: PeerArgs) -> Result<(), String> {
    if args.raw_secs > 0.0 {
        let config = args.quic.apply(crate::quic_config(args.secret.as_deref())).map_err(|e| fail("arguments", &e))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        return rt.block_on(raw_end(&args, config)).map_err(|e| fail("raw", &e));
    }
    let master = args.master.ok_or_else(|| fail("arguments", &"--master is required"))?;
    let recovery = args.recovery_size.is_some();
    let quic = args.quic.apply(crate::quic_config(args.secret.as_deref())).map_err(|e| fail("arguments", &e))?;
    let options = ConnectOptions {
        quic,
        control: ControlConfig {
            heartbeat_interval: Duration::from_millis(args.heartbeat_ms),
            ..ControlConfig::default()
        },
        tuning: Tuning { chunk_bytes: (args.chunk_kib as usize) << 10, ..Tuning::default() },
        retry: if recovery { RetryPolicy::OnPeerLost { max_attempts: 3 } } else { RetryPolicy::Never },
        bind: args.bind,
        advertise: args.advertise,
        data_transport: args.data_transport,
        shared_memory: args.shm,
        ..ConnectOptions::default()
    };
    let mut comm = Communicator::connect(master, options).map_err(|e| fail("join", &e))?;
    form_group(&mut comm, args.expect).map_err(|e| fail("form group", &e))?;
    comm.barrier().map_err(|e| fail("barrier", &e))?;
    emit(json!({ "event": "ready", "rank": comm.rank(), "size": comm.size() }));
    match args.recovery_size {
        Some(bytes) => recovery_loop(&mut comm, bytes),
        None => {
            for &coll in &args.collectives.0 {
                for &bytes in &args.sizes {
                    throughput(&mut comm, &args, coll, bytes).map_err(|e| fail(coll.name(), &e))?;
                }
            }
            emit(json!({ "event": "done" }));
            Ok(())
        }
    }
}

fn throughput(comm: &mut Communicator, args: &PeerArgs, coll: Coll, size: usize) -> Result<(), Error> {
    let n = comm.size();
    let mut bufs = Buffers::new(coll, size, comm.rank(), n);
    let quantize = args.quantize.filter(|_| coll == Coll::AllReduce);
    let call = |comm: &mut Communicator, bufs: &mut Buffers| match quantize {
        Some(q) => comm.all_reduce_quantized(&mut bufs.input, ReduceOp::Sum, q),
        None => bufs.call(comm),
    };
    // A checked call (the values of `Buffers::new`, or ones for the quantized all-reduce:
    // constant chunks quantize exactly); then zeros for the timed calls.
    if quantize.is_some() {
        bufs.input.fill(1.0);
    }
    call(comm, &mut bufs)?;
    let checked = match quantize {
        Some(_) => bufs.input.iter().all(|&v| v == n as f32),
        None => bufs.check(),
    };
    bufs.zero();
    for _ in 0..args.warmup {
        call(comm, &mut bufs)?;
    }
    comm.barrier()?;
    let iters = iters_for(args.iters, size);
    let mut secs = Vec::with_capacity(iters);
    let before = sched_secs();
    for _ in 0..iters {
        let t = Instant::now();
        call(comm, &mut bufs)?;
        secs.push(t.elapsed().as_secs_f64());
    }
    let after = sched_secs();
    emit(json!({
        "event": "result", "rank": comm.rank(), "n": n, "collective": coll.name(), "size": size,
        "bytes": bufs.bytes(), "secs": secs, "cpu_secs": after.0 - before.0, "runq_secs": after.1 - before.1,
        "checked": checked, "peak_rss_bytes": peak_rss_bytes(),
    }));
    Ok(())
}

/// This process's peak resident memory so far (`VmHWM` of /proc/self/status), in
/// bytes; 0 where the kernel does not say. Sizes run smallest first, so after a size it
/// is that size's peak.
fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib << 10)
}

/// All-reduces back to back until killed; reports the first success in each new view.
fn recovery_loop(comm: &mut Communicator, bytes: usize) -> Result<(), String> {
    let mut buf = vec![0f32; bytes / 4];
    let (mut epoch, mut count, started) = (comm.epoch(), 0u64, Instant::now());
    loop {
        match comm.all_reduce(&mut buf, ReduceOp::Sum) {
            Ok(()) => {
                count += 1;
                if count == 50 {
                    let per_sec = count as f64 / started.elapsed().as_secs_f64();
                    emit(json!({ "event": "running", "rank": comm.rank(), "per_sec": per_sec }));
                }
                if comm.epoch() != epoch {
                    epoch = comm.epoch();
                    emit(json!({ "event": "view_ok", "epoch": epoch, "size": comm.size(), "t_us": now_us() }));
                }
            }
            Err(e @ (Error::PeerLost { .. } | Error::Aborted { .. })) => {
                emit(json!({ "event": "failed", "message": e.to_string(), "t_us": now_us() }));
                comm.update_topology().map_err(|e| fail("update_topology", &e))?;
            }
            Err(e) => return Err(fail("all_reduce", &e)),
        }
    }
}
