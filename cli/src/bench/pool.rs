//! The `bench-peer` processes of a measurement, and the master they join.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use phalanx::membership::master::MasterConfig;
use phalanx::transport::quic::QuicConfig;
use phalanx::Master;
use serde_json::Value;

use super::{localhost, BenchArgs};

/// Peer processes and their stdout lines, parsed.
pub(super) struct Peers {
    children: Vec<Child>,
    lines: mpsc::Receiver<(usize, Option<Value>)>,
    killed: Vec<usize>,
    /// Peers that reported `done`: their end of output is expected.
    finished: Vec<usize>,
}

impl Peers {
    pub(super) fn spawn(n: usize, peer_args: &[String], secret: &str) -> Result<Peers, String> {
        Peers::spawn_each(n, peer_args, secret, |_| Vec::new())
    }

    /// [`Peers::spawn`] with more arguments for peer `i` from `own(i)`.
    pub(super) fn spawn_each(
        n: usize,
        peer_args: &[String],
        secret: &str,
        own: impl Fn(usize) -> Vec<String>,
    ) -> Result<Peers, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let (tx, lines) = mpsc::channel();
        let mut peers = Peers { children: Vec::new(), lines, killed: Vec::new(), finished: Vec::new() };
        for i in 0..n {
            let mut child = Command::new(&exe)
                .arg("bench-peer")
                .args(peer_args)
                .args(own(i))
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
    pub(super) fn next(&mut self, timeout: Duration) -> Result<(usize, Value), String> {
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

    pub(super) fn kill(&mut self, i: usize) {
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

/// A master on a fresh QUIC endpoint, with or without the liveness listener.
pub(super) fn start_master(secret: &str, peer_timeout_ms: u64, liveness: bool) -> Result<Master, String> {
    let config =
        MasterConfig { peer_timeout: Duration::from_millis(peer_timeout_ms), liveness, ..MasterConfig::default() };
    Master::start(localhost(), QuicConfig::with_secret(secret), config).map_err(|e| e.to_string())
}

pub(super) fn peer_args(args: &BenchArgs, master: SocketAddr, n: usize, heartbeat_ms: u64) -> Vec<String> {
    let sizes = args.sizes.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
    let quantize = args.quantize.map(|q| format!("--quantize={q}"));
    quantize
        .into_iter()
        .chain(args.quic.to_args())
        .chain([
            format!("--master={master}"),
            format!("--expect={n}"),
            format!("--sizes={sizes}"),
            format!("--collectives={}", args.collectives.arg()),
            format!("--iters={}", args.iters),
            format!("--warmup={}", args.warmup),
            format!("--chunk-kib={}", args.chunk_kib),
            format!("--heartbeat-ms={heartbeat_ms}"),
        ])
        .collect()
}

pub(super) fn heartbeat_for(peer_timeout_ms: u64) -> u64 {
    (peer_timeout_ms / 5).clamp(10, phalanx::comm::DEFAULT_HEARTBEAT_MS)
}
