//! `phalanx bench`: QUIC throughput, the collectives' bandwidth and recovery time, in one
//! run on 127.0.0.1, optionally beside Open MPI and torch's Gloo (`--compare`).
//!
//! 1. **Raw QUIC.** Two `bench-peer` processes hold one [`QuicLink`] pair (one
//!    connection) and send frames one way (the baseline), then both ways at once, for a
//!    few seconds each. Measured before each group size and after the last, so that the
//!    ratios compare figures of the same run.
//! 2. **All-reduce.** For each group size `n`, a master runs in this process and `n`
//!    peer processes (this executable's hidden `bench-peer` subcommand) join it over
//!    QUIC, form the group with `update_topology`, and time `all_reduce` of f32 `Sum` for
//!    each buffer size. `algbw = S / t` and `busbw = algbw · 2(n-1)/n` (nccl-tests).
//!    `--collectives` times others too (reduce-scatter, all-gather, broadcast,
//!    all-to-all, all-scan), each call's result checked first; every collective gets an
//!    nccl-tests-style table (busbw factors in [`collectives`]). `--data-transport` and
//!    `--shm` lists measure each data path in turn, side by side. With `--compare`, our
//!    harnesses on Open MPI and Gloo run the same collectives and sizes after each group
//!    size ([`compare`]), and a table gives phalanx busbw / anchor busbw.
//! 3. **Recovery.** `n` peers run back-to-back all-reduces of a small buffer with
//!    [`RetryPolicy::OnPeerLost`]; one is killed with SIGKILL, and the recovery time is
//!    from the kill to each survivor's first successful all-reduce in the view without
//!    it. Detection is the master's peer timeout (heartbeats every timeout / 5), so the
//!    recovery runs once per timeout given.

mod args;
mod collectives;
mod compare;
mod peer;
mod pool;
mod ratios;
mod raw;
mod recovery;
mod rows;
mod table;

use std::net::SocketAddr;

use serde_json::{json, Value};

pub use self::args::{BenchArgs, PeerArgs};
use self::collectives::Coll;
use self::compare::Anchors;
pub use self::peer::run_peer;
use self::raw::{measure_raw, Raw};
use self::recovery::run_recovery;
use self::rows::run_collectives;

const MIB: usize = 1 << 20;

fn show_size(bytes: usize) -> String {
    match bytes {
        b if b >= MIB && b % MIB == 0 => format!("{} MiB", b / MIB),
        b if b >= 1024 && b % 1024 == 0 => format!("{} KiB", b / 1024),
        b => format!("{b} B"),
    }
}

/// Microseconds since the Unix epoch: comparable across the processes of one machine.
fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Timed iterations for `bytes`: `iters` from 64 MiB up, up to 16 times more below.
fn iters_for(iters: usize, bytes: usize) -> usize {
    iters * (64 * MIB / bytes).clamp(1, 16)
}

fn gbps(bytes: f64, secs: f64) -> f64 {
    bytes / secs / 1e9
}

/// Seconds this process's threads have run on a CPU, and have waited runnable for one
/// (contention from other processes), so far: the sum over `/proc/self/task/*/schedstat`.
fn sched_secs() -> (f64, f64) {
    let (mut run, mut wait) = (0u64, 0u64);
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        let mut fields = stat.split_whitespace().map(|f| f.parse::<u64>().unwrap_or(0));
        run += fields.next().unwrap_or(0);
        wait += fields.next().unwrap_or(0);
    }
    (run as f64 / 1e9, wait as f64 / 1e9)
}

// ---------------------------------------------------------------------------------------
// The machine

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn load_average() -> String {
    read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn machine() -> Value {
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_default();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok()))
        .unwrap_or(0);
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    json!({ "nproc": nproc, "cpu": cpu, "mem_gib": mem_kib as f64 / (1 << 20) as f64 })
}

fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

// ---------------------------------------------------------------------------------------
// The report

fn random_secret() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    let a = h.finish();
    h.write_u64(a);
    format!("bench-{a:016x}{:016x}", h.finish())
}

pub fn run(args: BenchArgs) -> Result<(), String> {
    if args.peers.iter().any(|&n| n < 2) {
        return Err("--peers: group sizes must be at least 2".into());
    }
    if args.iters == 0 || args.chunk_kib == 0 {
        return Err("--iters and --chunk-kib must be positive".into());
    }
    if args.recovery_peers == 1 {
        return Err("--recovery-peers must be 0 (skip) or at least 2".into());
    }
    if args.quantize.is_some() && !args.compare.is_empty() {
        return Err("--compare times the anchors' f32 collectives: not with --quantize".into());
    }
    // The anchors' tools are found and their harness built before anything is measured.
    let anchors = if args.compare.is_empty() { None } else { Some(Anchors::prepare(&args)?) };
    let secret = random_secret();
    let machine = machine();
    let load_before = load_average();
    println!(
        "machine: {} CPUs, {}, {:.1} GiB; load average {load_before}",
        machine["nproc"],
        machine["cpu"],
        machine["mem_gib"].as_f64().unwrap_or(0.0)
    );
    println!(
        "settings: chunk {} KiB, data paths {}, {}, iters {} (x up to 16 below 64 MiB), warm-up {}",
        args.chunk_kib,
        args.vias().iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        args.quic.describe(),
        args.iters,
        args.warmup
    );
    println!("collectives: {}", args.collectives.arg().replace(',', ", "));
    for (anchor, version) in anchors.iter().flat_map(Anchors::versions) {
        println!("compare: {anchor} ({version})");
    }
    if args.relay()?.is_some() {
        println!(
            "relay: all-reduce groups through the test relay, {} ms one way, {}, loss {}{}",
            args.relay_delay_ms.unwrap_or(0),
            args.relay_rate_mbit.map_or("no rate limit".to_string(), |r| format!("{r} Mbit/s per direction")),
            args.relay_loss,
            if args.relay_master_only { ", master only (data links direct)" } else { "" }
        );
    }

    // Raw QUIC before each group size and once more after the last, so that every
    // all-reduce figure has a raw figure measured just before and just after it.
    let mut raws = Vec::new();
    let mut rows = Vec::new();
    let mut anchor_rows = Vec::new();
    for &n in &args.peers {
        if !args.no_raw {
            raws.push(measure_raw(&args, &secret)?);
        }
        match args.quantize {
            Some(q) => println!("quantized ({q}) all-reduce, {n} peer processes:"),
            None => println!("{}, {n} peer processes:", args.collectives.arg().replace(',', ", ")),
        }
        // Each data path in turn, right after one another: their ratios mean something.
        for via in args.vias() {
            rows.extend(run_collectives(&args, n, via, &secret)?);
        }
        if let Some(anchors) = &anchors {
            println!("anchors, {n} ranks:");
            anchor_rows.extend(anchors.run(&args, n)?);
        }
    }
    if !args.no_raw {
        raws.push(measure_raw(&args, &secret)?);
    }
    let mut recoveries = Vec::new();
    if args.recovery_peers > 0 {
        let mut timeouts = vec![args.peer_timeout_ms];
        timeouts.extend(args.recovery_timeouts_ms.iter().filter(|&&t| t != 0 && t != args.peer_timeout_ms));
        for t in timeouts {
            for &liveness in &args.recovery_liveness {
                recoveries.push(run_recovery(&args, &secret, (t, liveness))?);
            }
        }
    }
    let load_after = load_average();

    // The baseline: the mean of all raw measurements of the run.
    let mean = |f: fn(&Raw) -> f64| (!raws.is_empty()).then(|| raws.iter().map(f).sum::<f64>() / raws.len() as f64);
    let raw_one = mean(|r| r.one_way);
    let raw_both = mean(Raw::both_mean);
    let raw_one_cpu = mean(|r| r.one_way_cores / r.one_way);
    let raw_both_cpu = mean(|r| r.both_cores / (r.both.0 + r.both.1));

    println!();
    println!("load average: {load_before} before, {load_after} after");
    if let (Some(one), Some(both)) = (raw_one, raw_both) {
        let range = |f: fn(&Raw) -> f64| {
            let v: Vec<f64> = raws.iter().map(f).collect();
            format!("{:.3}-{:.3}", v.iter().cloned().fold(f64::MAX, f64::min), v.iter().cloned().fold(0.0, f64::max))
        };
        println!(
            "raw QUIC, one connection, mean of {} runs: one way {one:.3} GB/s (range {}; {:.2} CPU s/GB), \
             both ways {both:.3} GB/s per direction (range {}; {:.2} CPU s/GB)",
            raws.len(),
            range(|r| r.one_way),
            raw_one_cpu.unwrap_or(0.0),
            range(Raw::both_mean),
            raw_both_cpu.unwrap_or(0.0),
        );
    }
    rows.sort_by_key(|r| (r.coll, r.n, r.size));
    let allreduce: Vec<&rows::Row> = rows.iter().filter(|r| r.coll == Coll::AllReduce).collect();
    table::print_tables(&rows);
    if !anchor_rows.is_empty() {
        println!();
        println!("phalanx busbw / anchor busbw (time: median over the iterations of the slowest rank, both):");
        for line in ratios::table(&rows, &anchor_rows) {
            println!("{line}");
        }
    }
    if !allreduce.is_empty() {
        println!();
        println!("all-reduce in detail (time: the slowest rank's mean):");
        println!(
            "| n | data transport | size | iters | time | algbw GB/s | busbw GB/s | best busbw | raw one way GB/s | busbw / raw one way \
             | busbw / raw both ways | cores | waiting | CPU s/GB sent | busbw / raw one way, equal CPU |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    }
    let ratio = |bw: f64, raw: Option<f64>| raw.map_or("-".to_string(), |r| format!("{:.2}", bw / r));
    for r in &allreduce {
        println!(
            "| {} | {} | {} | {} | {:.2} ms | {:.3} | {:.3} | {:.3} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {} |{}",
            r.n,
            r.transport,
            show_size(r.bytes),
            r.iters,
            r.secs * 1e3,
            r.algbw(r.secs),
            r.busbw(r.secs),
            r.busbw(r.best),
            raw_one.map_or("-".to_string(), |v| format!("{v:.3}")),
            ratio(r.busbw(r.secs), raw_one),
            ratio(r.busbw(r.secs), raw_both),
            r.cores,
            r.runq,
            r.cpu_per_gb,
            raw_one_cpu.map_or("-".to_string(), |c| format!("{:.2}", r.equal_cpu_ratio(c))),
            if r.checked { "" } else { " WRONG RESULT" }
        );
    }
    if !recoveries.is_empty() {
        println!();
        println!("| peers | peer timeout | liveness | runs | recovery, slowest survivor (ms) | every survivor (ms) |");
        println!("|---|---|---|---|---|---|");
        for rec in &recoveries {
            let slowest: Vec<String> =
                rec.runs.iter().map(|t| format!("{:.0}", t.iter().cloned().fold(0.0, f64::max) * 1e3)).collect();
            let all: Vec<String> = rec.runs.iter().flatten().map(|t| format!("{:.0}", t * 1e3)).collect();
            println!(
                "| {} | {} ms | {} | {} | {} | {} |",
                args.recovery_peers,
                rec.peer_timeout_ms,
                if rec.liveness { "on" } else { "off" },
                rec.runs.len(),
                slowest.join(", "),
                all.join(", ")
            );
        }
    }

    if let Some(path) = &args.json {
        let (anchor_json, ratio_json) = ratios::json(&rows, &anchor_rows);
        let report = json!({
            "machine": machine,
            "load_before": load_before,
            "load_after": load_after,
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "settings": {
                "chunk_kib": args.chunk_kib,
                "quantize": args.quantize.map(|q| q.to_string()),
                "connections_per_link": args.quic.connections_per_link.to_string(),
                "data_transports": args.data_transport.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "shm": args.shm.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "congestion": args.quic.congestion.to_string(),
                "window_rate_mbit": args.quic.window_rate_mbit,
                "window_mib": args.quic.window_mib,
                "iters": args.iters,
                "warmup": args.warmup,
                "collectives": args.collectives.arg(),
                "raw_frame_kib": args.raw_frame_kib,
                "raw_secs": args.raw_secs,
            },
            "raw": raws.iter().map(|r| json!({
                "one_way_gbps": r.one_way, "one_way_cores": r.one_way_cores, "one_way_waiting": r.one_way_runq,
                "both_ways_gbps": [r.both.0, r.both.1], "both_ways_cores": r.both_cores,
                "both_ways_waiting": r.both_runq,
            })).collect::<Vec<_>>(),
            "raw_one_way_gbps": raw_one,
            "raw_both_ways_gbps": raw_both,
            "raw_one_way_cpu_secs_per_gb": raw_one_cpu,
            "raw_both_ways_cpu_secs_per_gb": raw_both_cpu,
            "collectives": table::rows_json(&rows),
            "anchors": anchor_json,
            "anchor_versions": anchors.iter().flat_map(Anchors::versions).collect::<Vec<_>>(),
            "ratios": ratio_json,
            "allreduce": allreduce.iter().map(|r| json!({
                "n": r.n, "data_transport": r.transport.to_string(), "bytes": r.bytes, "iters": r.iters, "secs": r.secs, "best_secs": r.best,
                "algbw_gbps": r.algbw(r.secs), "busbw_gbps": r.busbw(r.secs), "best_busbw_gbps": r.busbw(r.best),
                "ratio_raw_one_way": raw_one.map(|v| r.busbw(r.secs) / v),
                "ratio_raw_both_ways": raw_both.map(|v| r.busbw(r.secs) / v),
                "cores": r.cores, "waiting": r.runq, "cpu_secs_per_gb_sent": r.cpu_per_gb,
                "ratio_raw_one_way_equal_cpu": raw_one_cpu.map(|c| r.equal_cpu_ratio(c)),
                "checked": r.checked, "peak_rss_bytes": r.peak_rss,
            })).collect::<Vec<_>>(),
            "recovery": recoveries.iter().map(|rec| json!({
                "peers": args.recovery_peers, "peer_timeout_ms": rec.peer_timeout_ms, "liveness": rec.liveness,
                "size_bytes": args.recovery_size, "secs": rec.runs, "allreduces_per_sec": rec.rates,
            })).collect::<Vec<_>>(),
        });
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    if let Some(r) = rows.iter().find(|r| !r.checked) {
        return Err(format!("{} with {} peers returned a wrong result ({} B)", r.coll, r.n, r.bytes));
    }
    if let Some(a) = anchor_rows.iter().find(|a| !a.checked && a.unsupported.is_none()) {
        return Err(format!("the {} harness's {} with {} ranks returned a wrong result", a.system, a.coll, a.n));
    }
    Ok(())
}
