//! The `phalanx` command line: `master`, `worker`, `churn`, `bench`, `relay`, `pipeline`,
//! `moe-sim`, `moe-bench`, `moe-worker`, `pipeline-worker`, `device-check`.

mod bench;
mod churn;
mod device_check;
mod device_worker;
mod mix;
mod moe_bench;
mod moe_data;
mod moe_mlp;
mod moe_sim;
mod moe_worker;
mod pipeline;
mod pipeline_train;
mod pipeline_worker;
mod quic_args;
mod relay;
mod worker;

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use phalanx::comm::{ConnectOptions, ControlConfig};
use phalanx::membership::master::MasterConfig;
use phalanx::transport::quic::QuicConfig;
use phalanx::{Master, RetryPolicy};

#[derive(Parser)]
#[command(name = "phalanx", version, about = "Fault-tolerant collective communication")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a master: holds the view, admits joiners, removes lost peers.
    Master(MasterArgs),
    /// Runs one peer of a training-like loop, printing one JSON event per line.
    Worker(worker::WorkerArgs),
    /// Runs a master and workers on 127.0.0.1 under seeded churn and checks the invariants.
    Churn(churn::ChurnArgs),
    /// Measures raw QUIC throughput, all-reduce bandwidth and recovery time on loopback.
    Bench(bench::BenchArgs),
    /// Forwards UDP between fronts and targets on this host, adding delay, jitter,
    /// reordering, a rate limit and loss: a shaped network for trying phalanx locally.
    Relay(relay::RelayArgs),
    /// Generates a pipeline schedule (1F1B, ZB-H1, ZB-V), checks it, and prints its simulated
    /// timeline, bubble and peak memory per stage.
    Pipeline(pipeline::PipelineArgs),
    /// Simulates FSSDP's expert placement against static expert parallelism (EP) and FSDP
    /// on a Zipf-skewed gate trace: straggler load, traffic and memory.
    MoeSim(moe_sim::MoeSimArgs),
    /// Times the FSSDP layer against static expert parallelism on an in-process group,
    /// compute proportional to tokens (a sleep per token).
    MoeBench(moe_bench::MoeBenchArgs),
    /// One device of the FSSDP layer as its own process joined to a master: the worked
    /// example, the timed FSSDP-vs-EP comparison, or training with backups through a loss.
    MoeWorker(moe_worker::MoeWorkerArgs),
    /// One stage of a pipeline schedule as its own process joined to a master: trains the
    /// 8-layer MLP on a grid of stages × replicas (each step committed on every position
    /// or none, weights printed after every iteration; `--join` replaces a lost position)
    /// or runs timed passes against the simulator.
    PipelineWorker(pipeline_worker::PipelineWorkerArgs),
    /// One peer process of `bench` (internal).
    #[command(hide = true)]
    BenchPeer(bench::PeerArgs),
    /// The GPU check (issue 17): worker processes, each a 1-rank device communicator
    /// (NCCL, or the CPU stand-in) joined by QUIC through the hierarchical all-reduce;
    /// every collective on device buffers, busbw, a killed worker. PASS/FAIL per check.
    DeviceCheck(device_check::DeviceCheckArgs),
    /// One worker process of `device-check` (internal).
    #[command(hide = true)]
    DeviceWorker(device_worker::DeviceWorkerArgs),
}

#[derive(Parser)]
struct MasterArgs {
    /// Address to listen on (UDP, QUIC).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Cluster secret peers must prove; also read from PHALANX_SECRET.
    #[arg(long, env = "PHALANX_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// A peer silent for this long is removed (when its heartbeats come regularly).
    #[arg(long, default_value_t = phalanx::membership::master::DEFAULT_PEER_TIMEOUT_MS)]
    peer_timeout_ms: u64,
    /// How far the timeout of a peer whose heartbeats come irregularly may grow (raise
    /// it for a jittery WAN; at most the peer timeout for a fixed one).
    #[arg(long, default_value_t = phalanx::membership::master::DEFAULT_MAX_PEER_TIMEOUT_MS)]
    max_peer_timeout_ms: u64,
    /// When peers of a lost master rejoin this one (a restart on the same address, or a
    /// standby they list), wait this long after the first for the rest of their last
    /// view; then a majority of it suffices [default: the peer timeout].
    #[arg(long)]
    takeover_grace_ms: Option<u64>,
    /// Form no group of its own: joiners wait until this master took a group over from
    /// peers that lost theirs. Start standbys, and a master restarted in place of a lost
    /// one, with it.
    #[arg(long)]
    standby: bool,
    /// Step down when most of the group goes silent at once (this master may be the one
    /// cut off while the others rejoin a standby): no group is then decided by two
    /// masters. Turn it on where standbys run; it costs availability when a majority
    /// freezes at once.
    #[arg(long)]
    fence: bool,
    /// Form the first view once this many peers have joined, ranked by peer id (for
    /// torch.distributed: `--initial-peers WORLD_SIZE`, and ranks join with their rank
    /// as id, so phalanx's ranks are torch's).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    initial_peers: u64,
}

/// QUIC settings with the cluster secret, if any.
pub(crate) fn quic_config(secret: Option<&str>) -> QuicConfig {
    match secret {
        Some(s) => QuicConfig::with_secret(s),
        None => QuicConfig::default(),
    }
}

/// Connect options of a worker that settles the group itself after a loss (the MoE and
/// pipeline workers): no retry, so that a loss fails the step everywhere; heartbeats
/// every `heartbeat_ms`.
pub(crate) fn settling_options(peer_id: Option<u64>, secret: Option<&str>, heartbeat_ms: u64) -> ConnectOptions {
    ConnectOptions {
        peer_id,
        quic: quic_config(secret),
        control: ControlConfig { heartbeat_interval: Duration::from_millis(heartbeat_ms), ..ControlConfig::default() },
        retry: RetryPolicy::Never,
        ..ConnectOptions::default()
    }
}

/// Milliseconds since the Unix epoch, for event timestamps.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Prints one JSON event line and flushes, so that a harness reading the pipe sees it.
pub(crate) fn emit(value: serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

fn run_master(args: MasterArgs) -> Result<(), String> {
    let config = MasterConfig {
        peer_timeout: Duration::from_millis(args.peer_timeout_ms),
        max_peer_timeout: Duration::from_millis(args.max_peer_timeout_ms),
        takeover_grace: Duration::from_millis(args.takeover_grace_ms.unwrap_or(args.peer_timeout_ms)),
        standby: args.standby,
        fence: args.fence,
        initial_peers: args.initial_peers as usize,
        ..MasterConfig::default()
    };
    // Master::start also listens for the peers' liveness connections (TCP, same port).
    let master = Master::start(args.listen, quic_config(args.secret.as_deref()), config).map_err(|e| e.to_string())?;
    emit(serde_json::json!({ "event": "listening", "addr": master.addr().to_string(), "t": now_ms() }));
    loop {
        std::thread::park();
    }
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Master(args) => run_master(args),
        Command::Worker(args) => worker::run(args),
        Command::Churn(args) => churn::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Pipeline(args) => pipeline::run(args),
        Command::MoeSim(args) => moe_sim::run(args),
        Command::MoeBench(args) => moe_bench::run(args),
        Command::MoeWorker(args) => moe_worker::run(args),
        Command::PipelineWorker(args) => pipeline_worker::run(args),
        Command::BenchPeer(args) => bench::run_peer(args),
        Command::DeviceCheck(args) => device_check::run(args),
        Command::DeviceWorker(args) => device_worker::run(args),
        Command::Relay(args) => relay::run(args),
    };
    if let Err(e) = result {
        eprintln!("phalanx: {e}");
        std::process::exit(2);
    }
}
