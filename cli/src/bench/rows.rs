//! Step 2 of the bench, the collectives: one row per collective, group size and buffer
//! size.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use super::args::Via;
use super::collectives::Coll;
use super::pool::{heartbeat_for, peer_args, start_master, Peers};
use super::{gbps, load_average, show_size, BenchArgs};
use phalanx::relay::free_udp_addr;
use phalanx::transport::shm::SharedMemory;

#[derive(Clone, Debug)]
pub(super) struct Row {
    pub(super) coll: Coll,
    pub(super) n: usize,
    /// What carried the data links (`--data-transport` and `--shm`).
    pub(super) transport: Via,
    /// The size asked for (`--sizes`).
    pub(super) size: usize,
    /// The size measured: the larger buffer, rounded down to `n` parts where it is split
    /// (see [`Coll::counts`]).
    pub(super) bytes: usize,
    pub(super) iters: usize,
    /// Mean seconds per call: per rank the mean, then the slowest rank.
    pub(super) secs: f64,
    /// Median over the iterations of the slowest rank's time: the time of the
    /// nccl-tests-style tables and of the comparisons (the anchors report the same).
    pub(super) median: f64,
    /// Fastest iteration (slowest rank in it).
    pub(super) best: f64,
    /// CPU cores the peer processes used together while timed.
    pub(super) cores: f64,
    /// Threads of the peer processes waiting for a CPU, on average, while timed.
    pub(super) runq: f64,
    /// CPU seconds of all peers per GB sent over the links (`n · factor · S` per call,
    /// `2(n-1)·S` for all-reduce).
    pub(super) cpu_per_gb: f64,
    pub(super) checked: bool,
    /// The largest peak resident memory of a peer process, in bytes.
    pub(super) peak_rss: u64,
}

/// One rank's report for one size.
pub(super) struct RankResult {
    bytes: usize,
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
        self.algbw(secs) * self.coll.bus_factor(self.n)
    }

    /// busbw / raw one-way GB/s if both got the same CPU time: a call sends
    /// `n · busbw · t` bytes over the links in all, so it costs `n · cpu_per_gb` CPU
    /// seconds per GB of busbw, against `raw_cpu_per_gb` per GB of raw QUIC.
    pub(super) fn equal_cpu_ratio(&self, raw_cpu_per_gb: f64) -> f64 {
        raw_cpu_per_gb / (self.n as f64 * self.cpu_per_gb)
    }
}

pub(super) fn run_collectives(args: &BenchArgs, n: usize, transport: Via, secret: &str) -> Result<Vec<Row>, String> {
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
    let shm = if relay.is_some() && !args.relay_master_only { SharedMemory::Off } else { transport.shm };
    let transport = Via { shm, ..transport };
    pargs.push(format!("--data-transport={}", transport.transport));
    pargs.push(format!("--shm={shm}"));
    let mut peers = Peers::spawn_each(n, &pargs, secret, |i| fronts.get(i).cloned().unwrap_or_default())?;
    // Per size: per rank the iteration times.
    let mut results: HashMap<(Coll, usize), Vec<RankResult>> = HashMap::new();
    let mut done = 0;
    while done < n {
        let (_, v) = peers.next(Duration::from_secs(300))?;
        match v["event"].as_str() {
            Some("result") => {
                let bytes = v["bytes"].as_u64().unwrap_or(0) as usize;
                let size = v["size"].as_u64().unwrap_or(0) as usize;
                let coll: Coll = v["collective"].as_str().unwrap_or_default().parse()?;
                let secs: Vec<f64> =
                    v["secs"].as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default();
                let checked = v["checked"].as_bool().unwrap_or(false);
                let cpu_secs = v["cpu_secs"].as_f64().unwrap_or(0.0);
                let runq_secs = v["runq_secs"].as_f64().unwrap_or(0.0);
                let peak_rss = v["peak_rss_bytes"].as_u64().unwrap_or(0);
                let per_rank = results.entry((coll, size)).or_default();
                per_rank.push(RankResult { bytes, secs, cpu_secs, runq_secs, checked, peak_rss });
                if per_rank.len() == n {
                    let row = summarize(coll, n, transport, size, per_rank);
                    println!(
                        "  {coll} n={n} {transport:>9} {:>8}: {:>9.3} ms  busbw {:.3} GB/s (best {:.3}), {:.2} cores, {:.2} waiting, {:.2} CPU s/GB{}{}  (load {})",
                        show_size(bytes),
                        row.secs * 1e3,
                        row.busbw(row.secs),
                        row.busbw(row.best),
                        row.cores,
                        row.runq,
                        row.cpu_per_gb,
                        // The peak is the process's so far: a size's own only while the
                        // sizes grow, that is for the first collective, all-reduce.
                        if coll == Coll::AllReduce {
                            format!(", peak RSS {:.2}x the buffer", row.peak_rss as f64 / bytes.max(1) as f64)
                        } else {
                            String::new()
                        },
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
    if let Some(relay) = &relay {
        let total = relay.stats().into_iter().fold(phalanx::relay::PathStats::default(), |mut t, (_, s)| {
            t.delivered += s.delivered;
            t.bytes += s.bytes;
            t.lost += s.lost;
            t.queue_drops += s.queue_drops;
            t
        });
        let all = (total.delivered + total.lost + total.queue_drops).max(1) as f64;
        println!(
            "  relay, all paths: {} packets delivered ({:.1} MB, {:.0} B each), {} lost at random ({:.3} %), \
             {} dropped by a full queue ({:.3} %); the kernel dropped {} datagrams on the sockets of the \
             relay (and of the master)",
            total.delivered,
            total.bytes as f64 / 1e6,
            total.bytes as f64 / total.delivered.max(1) as f64,
            total.lost,
            100.0 * total.lost as f64 / all,
            total.queue_drops,
            100.0 * total.queue_drops as f64 / all,
            udp_socket_drops(),
        );
    }
    drop(master);
    let mut rows: Vec<Row> =
        results.iter().map(|(&(coll, size), per_rank)| summarize(coll, n, transport, size, per_rank)).collect();
    rows.sort_by_key(|r| (r.coll, r.size));
    Ok(rows)
}

pub(super) fn summarize(coll: Coll, n: usize, transport: Via, size: usize, per_rank: &[RankResult]) -> Row {
    let bytes = per_rank.iter().map(|r| r.bytes).max().unwrap_or(0);
    let iters = per_rank.iter().map(|r| r.secs.len()).min().unwrap_or(0);
    let total = |r: &RankResult| r.secs.iter().sum::<f64>();
    let wall = per_rank.iter().map(total).fold(0.0, f64::max);
    let secs = wall / iters.max(1) as f64;
    let mut slowest: Vec<f64> = (0..iters).map(|i| per_rank.iter().map(|r| r.secs[i]).fold(0.0, f64::max)).collect();
    slowest.sort_by(f64::total_cmp);
    let best = slowest.first().copied().unwrap_or(f64::NAN);
    let median = median_sorted(&slowest);
    let cpu: f64 = per_rank.iter().map(|r| r.cpu_secs).sum();
    let runq: f64 = per_rank.iter().map(|r| r.runq_secs).sum();
    let sent_gb = iters as f64 * n as f64 * coll.bus_factor(n) * bytes as f64 / 1e9;
    let checked = per_rank.iter().all(|r| r.checked);
    let peak_rss = per_rank.iter().map(|r| r.peak_rss).max().unwrap_or(0);
    Row {
        coll,
        n,
        transport,
        size,
        bytes,
        iters,
        secs,
        median,
        best,
        cores: cpu / wall,
        runq: runq / wall,
        cpu_per_gb: cpu / sent_gb,
        checked,
        peak_rss,
    }
}

/// The median of sorted values (the mean of the middle two for an even count); NaN for none.
pub(super) fn median_sorted(v: &[f64]) -> f64 {
    match v.len() {
        0 => f64::NAN,
        k if k % 2 == 1 => v[k / 2],
        k => (v[k / 2 - 1] + v[k / 2]) / 2.0,
    }
}

/// UDP datagrams the kernel dropped so far on this process's sockets (the relay's and
/// the master's), for full receive buffers or the like: the `drops` column of
/// `/proc/net/udp` for the socket inodes among `/proc/self/fd`; 0 where unreadable.
fn udp_socket_drops() -> u64 {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_string))
        .collect();
    let table = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
            (f.len() >= 13 && inodes.contains(f[9])).then(|| f[12].parse::<u64>().unwrap_or(0))
        })
        .sum()
}
