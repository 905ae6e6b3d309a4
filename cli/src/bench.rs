//! `phalanx bench`: QUIC throughput, all-reduce bandwidth and recovery time, in one run
//! on 127.0.0.1.
//!
//! 1. **Raw QUIC.** Two `bench-peer` processes hold one [`QuicLink`] pair (one
//!    connection) and send frames one way (the baseline), then both ways at once, for a
//!    few seconds each. Measured before each group size and after the last, so that the
//!    ratios compare figures of the same run.
//! 2. **All-reduce.** For each group size `n`, a master runs in this process and `n`
//!    peer processes (this executable's hidden `bench-peer` subcommand) join it over
//!    QUIC, form the group with `update_topology`, and time `all_reduce` of f32 `Sum` for
//!    each buffer size. `algbw = S / t` and `busbw = algbw · 2(n-1)/n` (nccl-tests).
//! 3. **Recovery.** `n` peers run back-to-back all-reduces of a small buffer with
//!    [`RetryPolicy::OnPeerLost`]; one is killed with SIGKILL, and the recovery time is
//!    from the kill to each survivor's first successful all-reduce in the view without
//!    it. Detection is the master's peer timeout (heartbeats every timeout / 5), so the
//!    recovery runs once per timeout given.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use phalanx::collective::Tuning;
use phalanx::comm::{ConnectOptions, RetryPolicy};
use phalanx::membership::client::ControlConfig;
use phalanx::membership::master::MasterConfig;
use phalanx::membership::server::MasterServer;
use phalanx::quant::Quantization;
use phalanx::transport::endpoint::Endpoint;
use phalanx::transport::quic::{QuicConfig, QuicEndpoint, QuicLink};
use phalanx::transport::{Frame, Header, Link};
use phalanx::{Communicator, Error, ReduceOp};
use serde_json::{json, Value};

use crate::emit;

const MIB: usize = 1 << 20;

/// Options of `phalanx bench`.
#[derive(Parser)]
pub struct BenchArgs {
    /// Buffer sizes per rank, comma-separated (K, M, G suffixes are binary: 64M = 64 MiB).
    #[arg(long, value_delimiter = ',', value_parser = parse_size, default_value = "1M,4M,16M,64M,256M")]
    sizes: Vec<usize>,
    /// Group sizes (peer processes) to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    peers: Vec<usize>,
    /// Timed iterations per size from 64 MiB up; smaller sizes run proportionally more
    /// (up to 16 times as many).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Untimed iterations per size before the timed ones (after one checked call).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// QUIC connections per data link (`QuicConfig::connections_per_link`).
    #[arg(long, default_value_t = 1)]
    connections_per_link: usize,
    /// Chunk size of the executor in KiB (`Tuning::chunk_bytes`).
    #[arg(long, default_value_t = (phalanx::exec::DEFAULT_CHUNK_BYTES >> 10) as u64)]
    chunk_kib: u64,
    /// Also write the whole report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Seconds per raw QUIC measurement (plus half a second of warm-up).
    #[arg(long, default_value_t = 3.0)]
    raw_secs: f64,
    /// Frame size of the raw QUIC measurement in KiB.
    #[arg(long, default_value_t = 1024)]
    raw_frame_kib: usize,
    /// The master's peer timeout for the all-reduce groups, and the first recovery runs.
    #[arg(long, default_value_t = phalanx::membership::master::DEFAULT_PEER_TIMEOUT_MS)]
    peer_timeout_ms: u64,
    /// Further peer timeouts to measure recovery with (comma-separated; 0 for none).
    #[arg(long, value_delimiter = ',', default_value = "300")]
    recovery_timeouts_ms: Vec<u64>,
    /// Peers of the recovery runs (0 skips them).
    #[arg(long, default_value_t = 4)]
    recovery_peers: usize,
    /// Kills per peer timeout (a fresh group each).
    #[arg(long, default_value_t = 3)]
    recovery_runs: usize,
    /// Buffer size of the recovery runs' all-reduces.
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    recovery_size: usize,
    /// Skip the raw QUIC measurements.
    #[arg(long)]
    no_raw: bool,
    /// Time the quantized all-reduce with these codes (u8 or u16) instead of the f32 one;
    /// busbw is then the effective f32 bandwidth (the wire carries a quarter or half).
    #[arg(long)]
    quantize: Option<Quantization>,
}

/// Options of the hidden `phalanx bench-peer`: one peer process of `phalanx bench`.
///
/// Three modes, each printing JSON lines on stdout (and `{"event":"error",...}` on
/// failure):
/// - throughput (default): joins `--master`, waits for `--expect` members, then prints
///   `{"event":"result","bytes":S,"secs":[...],"cpu_secs":..,"runq_secs":..,"checked":..}`
///   per size and `{"event":"done"}`;
/// - recovery (`--recovery-size`): all-reduces until killed, printing `running` after 50
///   calls and `view_ok` (with `t_us`) at the first success in each new view;
/// - raw (`--raw-secs`): one end of a raw QUIC link (see [`raw_end`]).
#[derive(Parser)]
pub struct PeerArgs {
    /// The master's address (group modes).
    #[arg(long)]
    master: Option<SocketAddr>,
    /// Cluster secret; also read from PHALANX_SECRET.
    #[arg(long, env = "PHALANX_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Wait until the group has this many members.
    #[arg(long, default_value_t = 2)]
    expect: usize,
    /// Buffer sizes in bytes.
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    sizes: Vec<usize>,
    /// Timed iterations per size from 64 MiB up (more below, see `--iters` of `bench`).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Untimed iterations per size after the checked one.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// QUIC connections per link.
    #[arg(long, default_value_t = 1)]
    connections_per_link: usize,
    /// The executor's chunk size in KiB; must be equal on every peer.
    #[arg(long, default_value_t = 256)]
    chunk_kib: u64,
    /// Quantized all-reduce with these codes (u8 or u16) instead of the f32 one.
    #[arg(long)]
    quantize: Option<Quantization>,
    /// Heartbeat interval to the master.
    #[arg(long, default_value_t = phalanx::membership::client::DEFAULT_HEARTBEAT_MS)]
    heartbeat_ms: u64,
    /// Recovery mode: all-reduce this many bytes back to back until killed.
    #[arg(long, value_parser = parse_size)]
    recovery_size: Option<usize>,
    /// Raw mode: connect to this raw listener and send (without it, listen and receive).
    #[arg(long)]
    raw_connect: Option<SocketAddr>,
    /// Raw mode: send and receive at once.
    #[arg(long)]
    raw_both: bool,
    /// Raw mode: seconds to measure (after half a second of warm-up).
    #[arg(long, default_value_t = 0.0)]
    raw_secs: f64,
    /// Raw mode: frame size in KiB.
    #[arg(long, default_value_t = 1024)]
    raw_frame_kib: usize,
}

/// `64K`, `4M`, `1G` (binary), `65536`, optionally followed by `B`/`iB`.
fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    let n: usize = digits.trim().parse().map_err(|_| format!("bad size {s:?}"))?;
    let bytes = n.checked_shl(shift).filter(|b| b >> shift == n).ok_or_else(|| format!("size {s:?} too large"))?;
    if bytes == 0 || bytes % 4 != 0 {
        return Err(format!("size {s:?} must be a positive multiple of 4 bytes (f32)"));
    }
    Ok(bytes)
}

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

// ---------------------------------------------------------------------------------------
// 1. Raw QUIC

fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Sends `payload` repeatedly until `stop`, then an empty end frame.
async fn raw_send(link: Arc<QuicLink>, payload: Bytes, stop: Instant) -> Result<(), String> {
    let mut index = 0;
    while Instant::now() < stop {
        let header = Header { epoch: 1, seq: 1, call: 0, index };
        link.send(Frame { header, payload: payload.clone() }).await.map_err(|e| e.to_string())?;
        index += 1;
    }
    let header = Header { epoch: 1, seq: 1, call: 0, index: u64::MAX };
    link.send(Frame { header, payload: Bytes::new() }).await.map_err(|e| e.to_string())
}

/// Receives until the end frame; GB/s of the bytes that arrived after `counting`.
async fn raw_recv(link: Arc<QuicLink>, counting: Instant) -> Result<f64, String> {
    let (mut first, mut last, mut bytes) = (None::<Instant>, None::<Instant>, 0usize);
    loop {
        let frame = link.recv().await.map_err(|e| e.to_string())?;
        if frame.header.index == u64::MAX {
            break;
        }
        let now = Instant::now();
        if now < counting {
            continue;
        }
        // The first counted frame marks the start: its bytes arrived before it.
        if first.is_none() {
            first = Some(now);
        } else {
            bytes += frame.payload.len();
            last = Some(now);
        }
    }
    match (first, last) {
        (Some(f), Some(l)) if l > f => Ok(gbps(bytes as f64, (l - f).as_secs_f64())),
        _ => Err("too few frames to measure; raise --raw-secs".into()),
    }
}

/// One end of the raw measurement (in a `bench-peer` process): the listener receives,
/// the connector sends, and with `both` each does both. Reports the GB/s it received
/// (if it did) and the CPU time of this process while it measured.
async fn raw_end(args: &PeerArgs, config: QuicConfig) -> Result<(), String> {
    let ep = QuicEndpoint::bind(localhost(), config).map_err(|e| e.to_string())?;
    let link = match args.raw_connect {
        Some(addr) => ep.connect(addr, Bytes::new()).await.map_err(|e| e.to_string())?,
        None => {
            let addr = ep.local_addr().map_err(|e| e.to_string())?;
            emit(json!({ "event": "listening", "addr": addr.to_string() }));
            ep.accept().await.map_err(|e| e.to_string())?.0
        }
    };
    let link = Arc::new(link);
    let (sends, receives) = (args.raw_connect.is_some() || args.raw_both, args.raw_connect.is_none() || args.raw_both);
    let start = Instant::now();
    let (counting, stop) = (start + Duration::from_millis(500), start + Duration::from_secs_f64(0.5 + args.raw_secs));
    let payload = Bytes::from(vec![0xa5u8; args.raw_frame_kib << 10]);
    let sending = sends.then(|| tokio::spawn(raw_send(link.clone(), payload, stop)));
    let receiving = receives.then(|| tokio::spawn(raw_recv(link.clone(), counting)));
    tokio::time::sleep_until(counting.into()).await;
    let before = sched_secs();
    tokio::time::sleep_until(stop.into()).await;
    let after = sched_secs();
    if let Some(s) = sending {
        join(s.await)?;
    }
    let gbps = match receiving {
        Some(r) => Some(join(r.await)?),
        None => None,
    };
    emit(json!({
        "event": "raw", "gbps": gbps, "cpu_secs": after.0 - before.0, "runq_secs": after.1 - before.1,
        "secs": args.raw_secs,
    }));
    // Let the peer read its end frame before the link closes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    link.close();
    Ok(())
}

fn join<T>(r: Result<Result<T, String>, tokio::task::JoinError>) -> Result<T, String> {
    r.map_err(|e| e.to_string()).and_then(|r| r)
}

/// One raw measurement: GB/s received by the listener, by the connector (`both`
/// only), the CPU cores both processes used meanwhile, and how many of their threads
/// waited for a CPU on average.
fn raw_pair(args: &BenchArgs, secret: &str, both: bool) -> Result<(f64, Option<f64>, f64, f64), String> {
    let mut common = vec![
        format!("--raw-secs={}", args.raw_secs),
        format!("--raw-frame-kib={}", args.raw_frame_kib),
        // The baseline is one connection, whatever --connections-per-link says.
        "--connections-per-link=1".to_string(),
    ];
    if both {
        common.push("--raw-both".into());
    }
    let mut listener = Peers::spawn(1, &common, secret)?;
    let (_, v) = listener.next(Duration::from_secs(30))?;
    let addr = v["addr"].as_str().ok_or("the raw listener sent no address")?.to_string();
    common.push(format!("--raw-connect={addr}"));
    let mut connector = Peers::spawn(1, &common, secret)?;
    let timeout = Duration::from_secs_f64(args.raw_secs + 30.0);
    let (_, a) = listener.next(timeout)?;
    let (_, b) = connector.next(timeout)?;
    let sum = |k: &str| (a[k].as_f64().unwrap_or(0.0) + b[k].as_f64().unwrap_or(0.0)) / args.raw_secs;
    let received = a["gbps"].as_f64().ok_or("the raw listener measured nothing")?;
    Ok((received, b["gbps"].as_f64(), sum("cpu_secs"), sum("runq_secs")))
}

#[derive(Clone, Copy, Debug)]
struct Raw {
    one_way: f64,
    one_way_cores: f64,
    one_way_runq: f64,
    /// Per direction, both directions at once: (a→b, b→a).
    both: (f64, f64),
    both_cores: f64,
    both_runq: f64,
}

impl Raw {
    fn both_mean(&self) -> f64 {
        (self.both.0 + self.both.1) / 2.0
    }
}

fn measure_raw(args: &BenchArgs, secret: &str) -> Result<Raw, String> {
    let (one_way, _, one_way_cores, one_way_runq) = raw_pair(args, secret, false)?;
    let (ab, ba, both_cores, both_runq) = raw_pair(args, secret, true)?;
    let raw = Raw { one_way, one_way_cores, one_way_runq, both: (ab, ba.unwrap_or(0.0)), both_cores, both_runq };
    println!(
        "raw QUIC, one connection, {} KiB frames: one way {:.3} GB/s ({:.2} cores, {:.2} waiting); \
         both ways at once {:.3} + {:.3} GB/s ({:.2} cores, {:.2} waiting)  (load {})",
        args.raw_frame_kib,
        raw.one_way,
        raw.one_way_cores,
        raw.one_way_runq,
        raw.both.0,
        raw.both.1,
        raw.both_cores,
        raw.both_runq,
        load_average()
    );
    Ok(raw)
}

// ---------------------------------------------------------------------------------------
// Peer processes

/// Peer processes and their stdout lines, parsed.
struct Peers {
    children: Vec<Child>,
    lines: mpsc::Receiver<(usize, Option<Value>)>,
    killed: Vec<usize>,
    /// Peers that reported `done`: their end of output is expected.
    finished: Vec<usize>,
}

impl Peers {
    fn spawn(n: usize, peer_args: &[String], secret: &str) -> Result<Peers, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let (tx, lines) = mpsc::channel();
        let mut peers = Peers { children: Vec::new(), lines, killed: Vec::new(), finished: Vec::new() };
        for i in 0..n {
            let mut child = Command::new(&exe)
                .arg("bench-peer")
                .args(peer_args)
                .env("PHALANX_SECRET", secret)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| format!("spawning a peer: {e}"))?;
            let stdout = child.stdout.take().expect("piped"); // ok: set to piped just above
            peers.children.push(child);
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        if tx.send((i, Some(v))).is_err() {
                            return;
                        }
                    }
                }
                let _ = tx.send((i, None));
            });
        }
        Ok(peers)
    }

    /// The next event of a peer that was not killed; a peer's end of output is an error.
    fn next(&mut self, timeout: Duration) -> Result<(usize, Value), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((i, _)) if self.killed.contains(&i) => continue,
                Ok((i, None)) if self.finished.contains(&i) => continue,
                Ok((i, Some(v))) => {
                    if v["event"] == "error" {
                        return Err(format!("peer {i} failed: {}", v["message"]));
                    }
                    if v["event"] == "done" {
                        self.finished.push(i);
                    }
                    return Ok((i, v));
                }
                Ok((i, None)) => return Err(format!("peer {i} exited early")),
                Err(_) => return Err(format!("no event from the peers in {} s", timeout.as_secs())),
            }
        }
    }

    fn kill(&mut self, i: usize) {
        self.killed.push(i);
        let _ = self.children[i].kill();
        let _ = self.children[i].wait();
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }
}

/// A master on a fresh QUIC endpoint of `rt`.
fn start_master(rt: &tokio::runtime::Runtime, secret: &str, peer_timeout_ms: u64) -> Result<MasterServer, String> {
    rt.block_on(async {
        let ep = QuicEndpoint::bind(localhost(), QuicConfig::with_secret(secret)).map_err(|e| e.to_string())?;
        let config = MasterConfig { peer_timeout: Duration::from_millis(peer_timeout_ms), ..MasterConfig::default() };
        Ok(MasterServer::spawn(Arc::new(ep) as Arc<dyn Endpoint>, config))
    })
}

fn peer_args(args: &BenchArgs, master: SocketAddr, n: usize, heartbeat_ms: u64) -> Vec<String> {
    let sizes = args.sizes.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
    let quantize = args.quantize.map(|q| format!("--quantize={q}"));
    quantize
        .into_iter()
        .chain([
            format!("--master={master}"),
            format!("--expect={n}"),
            format!("--sizes={sizes}"),
            format!("--iters={}", args.iters),
            format!("--warmup={}", args.warmup),
            format!("--connections-per-link={}", args.connections_per_link),
            format!("--chunk-kib={}", args.chunk_kib),
            format!("--heartbeat-ms={heartbeat_ms}"),
        ])
        .collect()
}

fn heartbeat_for(peer_timeout_ms: u64) -> u64 {
    (peer_timeout_ms / 5).clamp(10, phalanx::membership::client::DEFAULT_HEARTBEAT_MS)
}

// ---------------------------------------------------------------------------------------
// 2. All-reduce

#[derive(Clone, Debug)]
struct Row {
    n: usize,
    bytes: usize,
    iters: usize,
    /// Mean seconds per all-reduce: per rank the mean, then the slowest rank.
    secs: f64,
    /// Fastest iteration (slowest rank in it).
    best: f64,
    /// CPU cores the peer processes used together while timed.
    cores: f64,
    /// Threads of the peer processes waiting for a CPU, on average, while timed.
    runq: f64,
    /// CPU seconds of all peers per GB sent over the links (`2(n-1)·S` per call).
    cpu_per_gb: f64,
    checked: bool,
}

/// One rank's report for one size.
struct RankResult {
    secs: Vec<f64>,
    cpu_secs: f64,
    runq_secs: f64,
    checked: bool,
}

impl Row {
    fn algbw(&self, secs: f64) -> f64 {
        gbps(self.bytes as f64, secs)
    }

    fn busbw(&self, secs: f64) -> f64 {
        self.algbw(secs) * 2.0 * (self.n - 1) as f64 / self.n as f64
    }

    /// busbw / raw one-way GB/s if both got the same CPU time: a call sends
    /// `n · busbw · t` bytes over the links in all, so it costs `n · cpu_per_gb` CPU
    /// seconds per GB of busbw, against `raw_cpu_per_gb` per GB of raw QUIC.
    fn equal_cpu_ratio(&self, raw_cpu_per_gb: f64) -> f64 {
        raw_cpu_per_gb / (self.n as f64 * self.cpu_per_gb)
    }
}

fn run_allreduce(rt: &tokio::runtime::Runtime, args: &BenchArgs, n: usize, secret: &str) -> Result<Vec<Row>, String> {
    let master = start_master(rt, secret, args.peer_timeout_ms)?;
    let mut peers = Peers::spawn(n, &peer_args(args, master.addr(), n, heartbeat_for(args.peer_timeout_ms)), secret)?;
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
                let per_rank = results.entry(bytes).or_default();
                per_rank.push(RankResult { secs, cpu_secs, runq_secs, checked });
                if per_rank.len() == n {
                    let row = summarize(n, bytes, per_rank);
                    println!(
                        "  n={n} {:>8}: {:>9.3} ms  busbw {:.3} GB/s (best {:.3}), {:.2} cores, {:.2} waiting, {:.2} CPU s/GB{}  (load {})",
                        show_size(bytes),
                        row.secs * 1e3,
                        row.busbw(row.secs),
                        row.busbw(row.best),
                        row.cores,
                        row.runq,
                        row.cpu_per_gb,
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
    let mut rows: Vec<Row> = results.iter().map(|(&bytes, per_rank)| summarize(n, bytes, per_rank)).collect();
    rows.sort_by_key(|r| r.bytes);
    Ok(rows)
}

fn summarize(n: usize, bytes: usize, per_rank: &[RankResult]) -> Row {
    let iters = per_rank.iter().map(|r| r.secs.len()).min().unwrap_or(0);
    let total = |r: &RankResult| r.secs.iter().sum::<f64>();
    let wall = per_rank.iter().map(total).fold(0.0, f64::max);
    let secs = wall / iters.max(1) as f64;
    let best = (0..iters).map(|i| per_rank.iter().map(|r| r.secs[i]).fold(0.0, f64::max)).fold(f64::MAX, f64::min);
    let cpu: f64 = per_rank.iter().map(|r| r.cpu_secs).sum();
    let runq: f64 = per_rank.iter().map(|r| r.runq_secs).sum();
    let sent_gb = (iters * 2 * (n - 1) * bytes) as f64 / 1e9;
    let checked = per_rank.iter().all(|r| r.checked);
    Row { n, bytes, iters, secs, best, cores: cpu / wall, runq: runq / wall, cpu_per_gb: cpu / sent_gb, checked }
}

// ---------------------------------------------------------------------------------------
// 3. Recovery

#[derive(Clone, Debug)]
struct Recovery {
    peer_timeout_ms: u64,
    /// Per run: seconds from the kill to each survivor's first success without the victim.
    runs: Vec<Vec<f64>>,
    /// All-reduces per second before the kill (slowest peer), per run.
    rates: Vec<f64>,
}

fn run_recovery(
    rt: &tokio::runtime::Runtime,
    args: &BenchArgs,
    secret: &str,
    peer_timeout_ms: u64,
) -> Result<Recovery, String> {
    let n = args.recovery_peers;
    let mut out = Recovery { peer_timeout_ms, runs: Vec::new(), rates: Vec::new() };
    for run in 0..args.recovery_runs {
        let master = start_master(rt, secret, peer_timeout_ms)?;
        let mut pargs = peer_args(args, master.addr(), n, heartbeat_for(peer_timeout_ms));
        pargs.push(format!("--recovery-size={}", args.recovery_size));
        let mut peers = Peers::spawn(n, &pargs, secret)?;
        let mut ranks = vec![usize::MAX; n];
        let mut rate = f64::MAX;
        while ranks.contains(&usize::MAX) {
            let (i, v) = peers.next(Duration::from_secs(60))?;
            if v["event"] == "running" {
                ranks[i] = v["rank"].as_u64().unwrap_or(0) as usize;
                rate = rate.min(v["per_sec"].as_f64().unwrap_or(0.0));
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        let victim = ranks.iter().position(|&r| r == 1 % n).unwrap_or(0);
        let killed_at = now_us();
        peers.kill(victim);
        let mut recovered: Vec<Option<f64>> = vec![None; n];
        recovered[victim] = Some(f64::NAN);
        while recovered.contains(&None) {
            let (i, v) = peers.next(Duration::from_secs(30)).map_err(|e| format!("after the kill: {e}"))?;
            match v["event"].as_str() {
                Some("view_ok") if v["size"].as_u64() == Some(n as u64 - 1) => {
                    let t = v["t_us"].as_u64().unwrap_or(0);
                    recovered[i] = Some(t.saturating_sub(killed_at) as f64 / 1e6);
                }
                Some("failed") => eprintln!("  survivor {i}: all_reduce returned {}", v["message"]),
                _ => {}
            }
        }
        drop(peers);
        drop(master);
        let times: Vec<f64> = recovered.into_iter().flatten().filter(|t| !t.is_nan()).collect();
        let max = times.iter().cloned().fold(0.0, f64::max);
        println!(
            "  recovery, peer timeout {peer_timeout_ms} ms, run {}: {:.0} ms (survivors: {})  ({:.0} all-reduces/s before; load {})",
            run + 1,
            max * 1e3,
            times.iter().map(|t| format!("{:.0}", t * 1e3)).collect::<Vec<_>>().join(", "),
            rate,
            load_average()
        );
        out.runs.push(times);
        out.rates.push(rate);
    }
    Ok(out)
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
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
        "settings: chunk {} KiB, {} connection(s) per link, iters {} (x up to 16 below 64 MiB), warm-up {}",
        args.chunk_kib, args.connections_per_link, args.iters, args.warmup
    );

    // Raw QUIC before each group size and once more after the last, so that every
    // all-reduce figure has a raw figure measured just before and just after it.
    let mut raws = Vec::new();
    let mut rows = Vec::new();
    for &n in &args.peers {
        if !args.no_raw {
            raws.push(measure_raw(&args, &secret)?);
        }
        match args.quantize {
            Some(q) => println!("quantized ({q}) all-reduce, {n} peer processes:"),
            None => println!("all-reduce, {n} peer processes:"),
        }
        rows.extend(run_allreduce(&rt, &args, n, &secret)?);
    }
    if !args.no_raw {
        raws.push(measure_raw(&args, &secret)?);
    }
    let mut recoveries = Vec::new();
    if args.recovery_peers > 0 {
        let mut timeouts = vec![args.peer_timeout_ms];
        timeouts.extend(args.recovery_timeouts_ms.iter().filter(|&&t| t != 0 && t != args.peer_timeout_ms));
        for t in timeouts {
            recoveries.push(run_recovery(&rt, &args, &secret, t)?);
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
    println!();
    println!(
        "| n | size | iters | time | algbw GB/s | busbw GB/s | best busbw | raw one way GB/s | busbw / raw one way \
         | busbw / raw both ways | cores | waiting | CPU s/GB sent | busbw / raw one way, equal CPU |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let ratio = |bw: f64, raw: Option<f64>| raw.map_or("-".to_string(), |r| format!("{:.2}", bw / r));
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.2} ms | {:.3} | {:.3} | {:.3} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {} |{}",
            r.n,
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
        println!("| peers | peer timeout | runs | recovery, slowest survivor (ms) | every survivor (ms) |");
        println!("|---|---|---|---|---|");
        for rec in &recoveries {
            let slowest: Vec<String> =
                rec.runs.iter().map(|t| format!("{:.0}", t.iter().cloned().fold(0.0, f64::max) * 1e3)).collect();
            let all: Vec<String> = rec.runs.iter().flatten().map(|t| format!("{:.0}", t * 1e3)).collect();
            println!(
                "| {} | {} ms | {} | {} | {} |",
                args.recovery_peers,
                rec.peer_timeout_ms,
                rec.runs.len(),
                slowest.join(", "),
                all.join(", ")
            );
        }
    }

    if let Some(path) = &args.json {
        let report = json!({
            "machine": machine,
            "load_before": load_before,
            "load_after": load_after,
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "settings": {
                "chunk_kib": args.chunk_kib,
                "quantize": args.quantize.map(|q| q.to_string()),
                "connections_per_link": args.connections_per_link,
                "iters": args.iters,
                "warmup": args.warmup,
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
            "allreduce": rows.iter().map(|r| json!({
                "n": r.n, "bytes": r.bytes, "iters": r.iters, "secs": r.secs, "best_secs": r.best,
                "algbw_gbps": r.algbw(r.secs), "busbw_gbps": r.busbw(r.secs), "best_busbw_gbps": r.busbw(r.best),
                "ratio_raw_one_way": raw_one.map(|v| r.busbw(r.secs) / v),
                "ratio_raw_both_ways": raw_both.map(|v| r.busbw(r.secs) / v),
                "cores": r.cores, "waiting": r.runq, "cpu_secs_per_gb_sent": r.cpu_per_gb,
                "ratio_raw_one_way_equal_cpu": raw_one_cpu.map(|c| r.equal_cpu_ratio(c)),
                "checked": r.checked,
            })).collect::<Vec<_>>(),
            "recovery": recoveries.iter().map(|rec| json!({
                "peers": args.recovery_peers, "peer_timeout_ms": rec.peer_timeout_ms,
                "size_bytes": args.recovery_size, "secs": rec.runs, "allreduces_per_sec": rec.rates,
            })).collect::<Vec<_>>(),
        });
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    if rows.iter().any(|r| !r.checked) {
        return Err("an all-reduce returned a wrong result".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// bench-peer

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
        let config = QuicConfig {
            connections_per_link: args.connections_per_link,
            ..crate::quic_config(args.secret.as_deref())
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        return rt.block_on(raw_end(&args, config)).map_err(|e| fail("raw", &e));
    }
    let master = args.master.ok_or_else(|| fail("arguments", &"--master is required"))?;
    let recovery = args.recovery_size.is_some();
    let options = ConnectOptions {
        quic: QuicConfig {
            connections_per_link: args.connections_per_link,
            ..crate::quic_config(args.secret.as_deref())
        },
        control: ControlConfig {
            heartbeat_interval: Duration::from_millis(args.heartbeat_ms),
            ..ControlConfig::default()
        },
        tuning: Tuning { chunk_bytes: (args.chunk_kib as usize) << 10, ..Tuning::default() },
        retry: if recovery { RetryPolicy::OnPeerLost { max_attempts: 3 } } else { RetryPolicy::Never },
        ..ConnectOptions::default()
    };
    let mut comm = Communicator::connect(master, options).map_err(|e| fail("join", &e))?;
    form_group(&mut comm, args.expect).map_err(|e| fail("form group", &e))?;
    comm.barrier().map_err(|e| fail("barrier", &e))?;
    emit(json!({ "event": "ready", "rank": comm.rank(), "size": comm.size() }));
    match args.recovery_size {
        Some(bytes) => recovery_loop(&mut comm, bytes),
        None => {
            for &bytes in &args.sizes {
                throughput(&mut comm, &args, bytes).map_err(|e| fail("all_reduce", &e))?;
            }
            emit(json!({ "event": "done" }));
            Ok(())
        }
    }
}

fn throughput(comm: &mut Communicator, args: &PeerArgs, bytes: usize) -> Result<(), Error> {
    let n = comm.size();
    let mut buf = vec![1f32; bytes / 4];
    let quantize = args.quantize;
    let all_reduce = |comm: &mut Communicator, buf: &mut [f32]| match quantize {
        Some(q) => comm.all_reduce_quantized(buf, ReduceOp::Sum, q),
        None => comm.all_reduce(buf, ReduceOp::Sum),
    };
    // A checked call (constant chunks quantize exactly); then zeros, which stay zeros (no overflow, no denormals).
    all_reduce(comm, &mut buf)?;
    let checked = buf.iter().all(|&v| v == n as f32);
    buf.fill(0.0);
    for _ in 0..args.warmup {
        all_reduce(comm, &mut buf)?;
    }
    comm.barrier()?;
    let iters = iters_for(args.iters, bytes);
    let mut secs = Vec::with_capacity(iters);
    let before = sched_secs();
    for _ in 0..iters {
        let t = Instant::now();
        all_reduce(comm, &mut buf)?;
        secs.push(t.elapsed().as_secs_f64());
    }
    let after = sched_secs();
    emit(json!({
        "event": "result", "rank": comm.rank(), "n": n, "bytes": bytes, "secs": secs,
        "cpu_secs": after.0 - before.0, "runq_secs": after.1 - before.1, "checked": checked,
    }));
    Ok(())
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
