//! Step 2 of the bench, all-reduce: one row per group size and buffer size.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use super::pool::{heartbeat_for, peer_args, start_master, Peers};
use super::{gbps, load_average, show_size, BenchArgs};
use phalanx::relay::free_udp_addr;
use phalanx::transport::shm::SharedMemory;

#[derive(Clone, Debug)]
pub(super) struct Row {
    pub(super) n: usize,
    /// Shared memory between the peers (`auto`) or QUIC only (`off`).
    pub(super) shm: SharedMemory,
    pub(super) bytes: usize,
    pub(super) iters: usize,
    /// Mean seconds per all-reduce: per rank the mean, then the slowest rank.
    pub(super) secs: f64,
    /// Fastest iteration (slowest rank in it).
    pub(super) best: f64,
    /// CPU cores the peer processes used together while timed.
    pub(super) cores: f64,
    /// Threads of the peer processes waiting for a CPU, on average, while timed.
    pub(super) runq: f64,
    /// CPU seconds of all peers per GB sent over the links (`2(n-1)·S` per call).
    pub(super) cpu_per_gb: f64,
    pub(super) checked: bool,
    /// The largest peak resident memory of a peer process, in bytes.
    pub(super) peak_rss: u64,
}

/// One rank's report for one size.
pub(super) struct RankResult {
    secs: Vec<f64>,
    cpu_secs: f64,
    runq_secs: f64,
    checked: bool,
    peak_rss: u64,
}

impl Row {
    pub(super) fn algbw(&self, secs: f64) -> f64 {
        gbps(self.bytes as f64, secs)
    }

    pub(super) fn busbw(&self, secs: f64) -> f64 {
        self.algbw(secs) * 2.0 * (self.n - 1) as f64 / self.n as f64
    }

    /// busbw / raw one-way GB/s if both got the same CPU time: a call sends
    /// `n · busbw · t` bytes over the links in all, so it costs `n · cpu_per_gb` CPU
    /// seconds per GB of busbw, against `raw_cpu_per_gb` per GB of raw QUIC.
    pub(super) fn equal_cpu_ratio(&self, raw_cpu_per_gb: f64) -> f64 {
        raw_cpu_per_gb / (self.n as f64 * self.cpu_per_gb)
    }
}

pub(super) fn run_allreduce(args: &BenchArgs, n: usize, shm: SharedMemory, secret: &str) -> Result<Vec<Row>, String> {
    let master = start_master(secret, args.peer_timeout_ms, true)?;
    let relay = args.relay()?;
    let (master_addr, fronts) = match &relay {
        None => (master.addr(), Vec::new()),
        Some(relay) => {
            let front = relay.front(master.addr()).map_err(|e| format!("relay: {e}"))?;
            let mut fronts = Vec::new();
            for _ in 0..n {
                let bind = free_udp_addr().map_err(|e| format!("a port: {e}"))?;
                let advertise =
                    if args.relay_master_only { bind } else { relay.front(bind).map_err(|e| e.to_string())? };
                fronts.push(vec![format!("--bind={bind}"), format!("--advertise={advertise}")]);
            }
            (front, fronts)
        }
    };
    let mut pargs = peer_args(args, master_addr, n, heartbeat_for(args.peer_timeout_ms));
    // Through the relay the data links stand for a network between hosts: never shm.
    let shm = if relay.is_some() && !args.relay_master_only { SharedMemory::Off } else { shm };
    pargs.push(format!("--shm={shm}"));
    let mut peers = Peers::spawn_each(n, &pargs, secret, |i| fronts.get(i).cloned().unwrap_or_default())?;
    // Per size: per rank the iteration times.
    let mut results: HashMap<usize, Vec<RankResult>> = HashMap::new();
    let mut done = 0;
    while done < n {
        let (_, v) = peers.next(Duration::from_secs(300))?;
        match v["event"].as_str() {
            Some("result") => {
                let bytes = v["bytes"].as_u64().unwrap_or(0) as usize;
                let secs: Vec<f64> =
                    v["secs"].as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default();
                let checked = v["checked"].as_bool().unwrap_or(false);
                let cpu_secs = v["cpu_secs"].as_f64().unwrap_or(0.0);
                let runq_secs = v["runq_secs"].as_f64().unwrap_or(0.0);
                let peak_rss = v["peak_rss_bytes"].as_u64().unwrap_or(0);
                let per_rank = results.entry(bytes).or_default();
                per_rank.push(RankResult { secs, cpu_secs, runq_secs, checked, peak_rss });
                if per_rank.len() == n {
                    let row = summarize(n, shm, bytes, per_rank);
                    println!(
                        "  n={n} shm {shm:<4} {:>8}: {:>9.3} ms  busbw {:.3} GB/s (best {:.3}), {:.2} cores, {:.2} waiting, {:.2} CPU s/GB, peak RSS {:.2}x the buffer{}  (load {})",
                        show_size(bytes),
                        row.secs * 1e3,
                        row.busbw(row.secs),
                        row.busbw(row.best),
                        row.cores,
                        row.runq,
                        row.cpu_per_gb,
                        row.peak_rss as f64 / bytes.max(1) as f64,
                        if row.checked { "" } else { "  RESULT WRONG" },
                        load_average()
                    );
                }
            }
            Some("done") => done += 1,
            _ => {}
        }
    }
    drop(peers);
    drop(master);
    let mut rows: Vec<Row> = results.iter().map(|(&bytes, per_rank)| summarize(n, shm, bytes, per_rank)).collect();
    rows.sort_by_key(|r| r.bytes);
    Ok(rows)
}

pub(super) fn summarize(n: usize, shm: SharedMemory, bytes: usize, per_rank: &[RankResult]) -> Row {
    let iters = per_rank.iter().map(|r| r.secs.len()).min().unwrap_or(0);
    let total = |r: &RankResult| r.secs.iter().sum::<f64>();
    let wall = per_rank.iter().map(total).fold(0.0, f64::max);
    let secs = wall / iters.max(1) as f64;
    let best = (0..iters).map(|i| per_rank.iter().map(|r| r.secs[i]).fold(0.0, f64::max)).fold(f64::MAX, f64::min);
    let cpu: f64 = per_rank.iter().map(|r| r.cpu_secs).sum();
    let runq: f64 = per_rank.iter().map(|r| r.runq_secs).sum();
    let sent_gb = (iters * 2 * (n - 1) * bytes) as f64 / 1e9;
    let checked = per_rank.iter().all(|r| r.checked);
    let peak_rss = per_rank.iter().map(|r| r.peak_rss).max().unwrap_or(0);
    Row {
        n,
        shm,
        bytes,
        iters,
        secs,
        best,
        cores: cpu / wall,
        runq: runq / wall,
        cpu_per_gb: cpu / sent_gb,
        checked,
        peak_rss,
    }
}
