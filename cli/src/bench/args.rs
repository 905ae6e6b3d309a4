//! The options of `phalanx bench` and of its hidden `bench-peer` processes.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use phalanx::comm::DataTransport;
use phalanx::quant::Quantization;
use phalanx::transport::shm::SharedMemory;

use super::collectives::Coll;
use super::compare::Anchor;
use crate::quic_args::QuicArgs;

/// Options of `phalanx bench`.
#[derive(Parser)]
pub struct BenchArgs {
    /// Buffer sizes per rank, comma-separated (K, M, G suffixes are binary: 64M = 64 MiB).
    #[arg(long, value_delimiter = ',', value_parser = parse_size, default_value = "1M,4M,16M,64M,256M")]
    pub(super) sizes: Vec<usize>,
    /// Collectives to time, comma-separated: all-reduce, reduce-scatter, all-gather,
    /// broadcast, all-to-all, all-scan (f32, sum, root 0), or `all`. Each gets an
    /// nccl-tests-style table; all-reduce also the detailed one.
    #[arg(long, value_parser = parse_collectives, default_value = "all-reduce")]
    pub(super) collectives: Collectives,
    /// Also run our harnesses on these anchors in the same run, with the same
    /// collectives, sizes and group sizes, and print phalanx busbw / anchor busbw:
    /// `mpi` (Open MPI's mpirun, over shared memory and over TCP), `gloo` (torch's Gloo
    /// backend). Installs nothing: benches/install-anchors.sh does.
    #[arg(long, value_delimiter = ',')]
    pub(super) compare: Vec<Anchor>,
    /// The Python interpreter with torch for `--compare gloo` (default:
    /// target/anchors-venv/bin/python if it exists, else python3 on PATH).
    #[arg(long)]
    pub(super) python: Option<PathBuf>,
    /// Group sizes (peer processes) to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    pub(super) peers: Vec<usize>,
    /// Timed iterations per size from 64 MiB up; smaller sizes run proportionally more
    /// (up to 16 times as many).
    #[arg(long, default_value_t = 5)]
    pub(super) iters: usize,
    /// Untimed iterations per size before the timed ones (after one checked call).
    #[arg(long, default_value_t = 1)]
    pub(super) warmup: usize,
    /// QUIC settings of the data links.
    #[command(flatten)]
    pub(super) quic: QuicArgs,
    /// Data transports to measure over, comma-separated, side by side for each group
    /// size: `quic`, `tcp` (TCP+TLS), `tcp-plain` (plaintext TCP, trusted networks only)
    /// or `auto` (what `Communicator::connect` picks).
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    pub(super) data_transport: Vec<DataTransport>,
    /// Shared memory between the peer processes (`auto`) or the network only (`off`);
    /// several, comma-separated (`auto,off`), measure each group size with each, side by
    /// side (with every `--data-transport`).
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    pub(super) shm: Vec<SharedMemory>,
    /// Chunk size of the executor in KiB (`Tuning::chunk_bytes`).
    #[arg(long, default_value_t = (phalanx::collective::DEFAULT_CHUNK_BYTES >> 10) as u64)]
    pub(super) chunk_kib: u64,
    /// Run the all-reduce groups through the test relay (`phalanx::relay`) with this
    /// one-way delay on every path, as over a WAN.
    #[arg(long)]
    pub(super) relay_delay_ms: Option<u64>,
    /// Relay: bottleneck rate of each direction of each path, in Mbit/s.
    #[arg(long)]
    pub(super) relay_rate_mbit: Option<f64>,
    /// Relay: probability that a packet is lost.
    #[arg(long, default_value_t = 0.0)]
    pub(super) relay_loss: f64,
    /// Relay: put only the master behind it; the peers' data links stay direct.
    #[arg(long)]
    pub(super) relay_master_only: bool,
    /// Also write the whole report as JSON to this file.
    #[arg(long)]
    pub(super) json: Option<PathBuf>,
    /// Seconds per raw QUIC measurement (plus half a second of warm-up).
    #[arg(long, default_value_t = 3.0)]
    pub(super) raw_secs: f64,
    /// Frame size of the raw QUIC measurement in KiB.
    #[arg(long, default_value_t = 1024)]
    pub(super) raw_frame_kib: usize,
    /// The master's peer timeout for the all-reduce groups, and the first recovery runs.
    #[arg(long, default_value_t = phalanx::membership::master::DEFAULT_PEER_TIMEOUT_MS)]
    pub(super) peer_timeout_ms: u64,
    /// Further peer timeouts to measure recovery with (comma-separated; 0 for none).
    #[arg(long, value_delimiter = ',', default_value = "300")]
    pub(super) recovery_timeouts_ms: Vec<u64>,
    /// Recovery runs with the master's liveness listener on, off, or both (`true,false`):
    /// with it a SIGKILLed peer is removed when its TCP connection closes.
    #[arg(long, value_delimiter = ',', default_value = "true,false")]
    pub(super) recovery_liveness: Vec<bool>,
    /// Peers of the recovery runs (0 skips them).
    #[arg(long, default_value_t = 4)]
    pub(super) recovery_peers: usize,
    /// Kills per peer timeout (a fresh group each).
    #[arg(long, default_value_t = 3)]
    pub(super) recovery_runs: usize,
    /// Buffer size of the recovery runs' all-reduces.
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    pub(super) recovery_size: usize,
    /// Skip the raw QUIC measurements.
    #[arg(long)]
    pub(super) no_raw: bool,
    /// Time the quantized all-reduce with these codes (u8 or u16) instead of the f32 one;
    /// busbw is then the effective f32 bandwidth (the wire carries a quarter or half).
    #[arg(long)]
    pub(super) quantize: Option<Quantization>,
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
/// - raw (`--raw-secs`): one end of a raw QUIC link (see [`raw_end`](super::raw::raw_end)).
#[derive(Parser)]
pub struct PeerArgs {
    /// The master's address (group modes).
    #[arg(long)]
    pub(super) master: Option<SocketAddr>,
    /// Where the peer accepts data links.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub(super) bind: SocketAddr,
    /// The data address the other peers dial (a relay's front); default: the bound one.
    #[arg(long)]
    pub(super) advertise: Option<SocketAddr>,
    /// Cluster secret; also read from PHALANX_SECRET.
    #[arg(long, env = "PHALANX_SECRET", hide_env_values = true)]
    pub(super) secret: Option<String>,
    /// Wait until the group has this many members.
    #[arg(long, default_value_t = 2)]
    pub(super) expect: usize,
    /// Buffer sizes in bytes.
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    pub(super) sizes: Vec<usize>,
    /// Collectives to time, in [`Coll::ALL`]'s order (each over every size).
    #[arg(long, value_parser = parse_collectives, default_value = "all-reduce")]
    pub(super) collectives: Collectives,
    /// Timed iterations per size from 64 MiB up (more below, see `--iters` of `bench`).
    #[arg(long, default_value_t = 5)]
    pub(super) iters: usize,
    /// Untimed iterations per size after the checked one.
    #[arg(long, default_value_t = 1)]
    pub(super) warmup: usize,
    /// QUIC settings of the data links.
    #[command(flatten)]
    pub(super) quic: QuicArgs,
    /// The data transport: `auto`, `quic`, `tcp` (TCP+TLS) or `tcp-plain`.
    #[arg(long, default_value = "auto")]
    pub(super) data_transport: DataTransport,
    /// Shared memory for data links to peers on this host (`auto`) or the network only
    /// (`off`).
    #[arg(long, default_value_t = SharedMemory::Auto)]
    pub(super) shm: SharedMemory,
    /// The executor's chunk size in KiB; must be equal on every peer.
    #[arg(long, default_value_t = 256)]
    pub(super) chunk_kib: u64,
    /// Quantized all-reduce with these codes (u8 or u16) instead of the f32 one.
    #[arg(long)]
    pub(super) quantize: Option<Quantization>,
    /// Heartbeat interval to the master.
    #[arg(long, default_value_t = phalanx::comm::DEFAULT_HEARTBEAT_MS)]
    pub(super) heartbeat_ms: u64,
    /// Recovery mode: all-reduce this many bytes back to back until killed.
    #[arg(long, value_parser = parse_size)]
    pub(super) recovery_size: Option<usize>,
    /// Raw mode: connect to this raw listener and send (without it, listen and receive).
    #[arg(long)]
    pub(super) raw_connect: Option<SocketAddr>,
    /// Raw mode: send and receive at once.
    #[arg(long)]
    pub(super) raw_both: bool,
    /// Raw mode: seconds to measure (after half a second of warm-up).
    #[arg(long, default_value_t = 0.0)]
    pub(super) raw_secs: f64,
    /// Raw mode: frame size in KiB.
    #[arg(long, default_value_t = 1024)]
    pub(super) raw_frame_kib: usize,
}

/// A list of collectives, each once, in [`Coll::ALL`]'s order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Collectives(pub(crate) Vec<Coll>);

/// Comma-separated collective names (`all` for every one), e.g. `all-reduce,all-gather`.
fn parse_collectives(s: &str) -> Result<Collectives, String> {
    let mut out: Vec<Coll> = Vec::new();
    for name in s.split(',').filter(|t| !t.trim().is_empty()) {
        let more = if name.trim() == "all" { Coll::ALL.to_vec() } else { vec![name.parse()?] };
        out.extend(more.into_iter().filter(|c| !out.contains(c)).collect::<Vec<_>>());
    }
    if out.is_empty() {
        return Err("no collective named".into());
    }
    // Always in the tables' order: all-reduce first, so that its peak RSS (the process's
    // peak so far, sizes growing) is its own.
    out.sort();
    Ok(Collectives(out))
}

impl Collectives {
    /// The names, comma-separated: the form `parse_collectives` reads.
    pub(crate) fn arg(&self) -> String {
        self.0.iter().map(|c| c.name()).collect::<Vec<_>>().join(",")
    }
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

impl BenchArgs {
    /// The relay the all-reduce groups run through, if any `--relay-*` option asks for one.
    pub(super) fn relay(&self) -> Result<Option<phalanx::relay::Relay>, String> {
        if self.relay_delay_ms.is_none() && self.relay_rate_mbit.is_none() && self.relay_loss == 0.0 {
            return Ok(None);
        }
        if !(0.0..1.0).contains(&self.relay_loss) {
            return Err(format!("--relay-loss {} must be at least 0 and below 1", self.relay_loss));
        }
        let mut shaping = phalanx::relay::Shaping::default()
            .delay(std::time::Duration::from_millis(self.relay_delay_ms.unwrap_or(0)))
            .loss(self.relay_loss);
        if let Some(mbit) = self.relay_rate_mbit {
            shaping = shaping.rate_mbit(mbit);
        }
        phalanx::relay::Relay::start(1, shaping).map(Some).map_err(|e| format!("relay: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectives_parse_once_each_in_table_order() {
        let c = parse_collectives("all-scan,all-reduce,all-scan").unwrap();
        assert_eq!(c.0, [Coll::AllReduce, Coll::AllScan]);
        assert_eq!(c.arg(), "all-reduce,all-scan");
        assert_eq!(parse_collectives("all").unwrap().0, Coll::ALL);
        assert_eq!(parse_collectives("broadcast,all").unwrap().0.len(), 6);
        assert!(parse_collectives("all-reduce,gather").unwrap_err().contains("\"gather\""));
        assert!(parse_collectives(",").is_err());
        // The default of `phalanx bench` stays all-reduce alone.
        let args = BenchArgs::try_parse_from(["bench"]).unwrap();
        assert_eq!(args.collectives.0, [Coll::AllReduce]);
        assert!(args.compare.is_empty());
        let args = BenchArgs::try_parse_from(["bench", "--compare", "mpi,gloo"]).unwrap();
        assert_eq!(args.compare, [Anchor::Mpi, Anchor::Gloo]);
        assert!(BenchArgs::try_parse_from(["bench", "--compare", "nccl"]).is_err());
    }
}

/// What carried a measured group's data links: the data transport asked for, and whether
/// shared memory was allowed (it replaces the transport between peers on one host).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Via {
    pub(super) transport: DataTransport,
    pub(super) shm: SharedMemory,
}

impl BenchArgs {
    /// Every data path to measure, in order: each data transport with each shm setting.
    pub(super) fn vias(&self) -> Vec<Via> {
        let mut out = Vec::new();
        for &transport in &self.data_transport {
            for &shm in &self.shm {
                out.push(Via { transport, shm });
            }
        }
        out
    }
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.shm {
            SharedMemory::Off => write!(f, "{}", self.transport),
            _ => write!(f, "{}+shm", self.transport),
        }
    }
}
