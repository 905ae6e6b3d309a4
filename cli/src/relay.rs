//! `phalanx relay`: the test relay as a process of its own, for measuring and trying
//! phalanx over a shaped network on one machine (delay, jitter, rate, loss).
//!
//! ```text
//! phalanx relay --route 127.0.0.1:9000=127.0.0.1:7000 --delay-ms 25 --rate-mbit 400 --loss 0.001
//! ```
//! Peers dial the route's front (`127.0.0.1:9000`) instead of its target; a peer that
//! others should reach through the relay advertises its own front (`phalanx worker
//! --bind B --advertise F` with a route `F=B`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use phalanx::relay::{Relay, Shaping};
use serde_json::json;

use crate::{emit, now_ms};

/// Arguments of `phalanx relay`.
#[derive(Parser)]
pub struct RelayArgs {
    /// A front and its target, `FRONT=TARGET` (both IP:PORT); repeat for more.
    #[arg(long = "route", value_parser = parse_route, required = true)]
    routes: Vec<(SocketAddr, SocketAddr)>,
    /// One-way delay added to every packet.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Extra delay drawn uniformly from 0 to this, per packet.
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Let jittered packets overtake each other.
    #[arg(long)]
    reorder: bool,
    /// Bottleneck rate of each direction of each path, in Mbit/s.
    #[arg(long)]
    rate_mbit: Option<f64>,
    /// Probability that a packet is lost (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// The longest a packet queues at the bottleneck before it is dropped.
    #[arg(long, default_value_t = 100)]
    queue_ms: u64,
    /// Seed of the loss and jitter draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the paths' counters this often (0: never).
    #[arg(long, default_value_t = 10)]
    stats_every_s: u64,
    /// Stop after this long (0: run until killed).
    #[arg(long, default_value_t = 0)]
    duration_s: u64,
}

fn parse_route(s: &str) -> Result<(SocketAddr, SocketAddr), String> {
    let (front, target) = s.split_once('=').ok_or_else(|| format!("route {s:?} is not FRONT=TARGET"))?;
    let addr = |a: &str| a.trim().parse::<SocketAddr>().map_err(|e| format!("{a:?} in route {s:?}: {e}"));
    Ok((addr(front)?, addr(target)?))
}

impl RelayArgs {
    fn shaping(&self) -> Result<Shaping, String> {
        if !(0.0..=1.0).contains(&self.loss) {
            return Err(format!("--loss {} is not a probability", self.loss));
        }
        let mut s = Shaping::default()
            .delay(Duration::from_millis(self.delay_ms))
            .jitter(Duration::from_millis(self.jitter_ms), self.reorder)
            .loss(self.loss);
        if let Some(mbit) = self.rate_mbit {
            if mbit.is_nan() || mbit <= 0.0 {
                return Err(format!("--rate-mbit {mbit} must be positive"));
            }
            s = s.rate_mbit(mbit);
        }
        s.queue = Duration::from_millis(self.queue_ms);
        Ok(s)
    }
}

/// Runs the relay until killed or `--duration-s` has passed.
pub fn run(args: RelayArgs) -> Result<(), String> {
    let relay = Relay::start(args.seed, args.shaping()?).map_err(|e| format!("relay: {e}"))?;
    for &(front, target) in &args.routes {
        let addr = relay.front_at(front, target).map_err(|e| format!("front {front} for {target}: {e}"))?;
        emit(json!({ "event": "route", "front": addr.to_string(), "target": target.to_string(), "t": now_ms() }));
    }
    let started = Instant::now();
    let every = Duration::from_secs(args.stats_every_s.max(1));
    loop {
        let left = match args.duration_s {
            0 => every,
            d => Duration::from_secs(d).saturating_sub(started.elapsed()).min(every),
        };
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left);
        if args.stats_every_s > 0 {
            for ((from, to), s) in relay.stats() {
                emit(json!({
                    "event": "path", "from": from.to_string(), "to": to.to_string(),
                    "delivered": s.delivered, "bytes": s.bytes, "lost": s.lost,
                    "cut": s.cut, "queue_drops": s.queue_drops, "t": now_ms(),
                }));
            }
        }
    }
}
