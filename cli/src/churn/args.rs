//! The options of `phalanx churn` and what follows from them.

use std::path::PathBuf;

use clap::Parser;
use phalanx::quant::Quantization;

#[derive(Parser, Clone, Debug)]
pub struct ChurnArgs {
    /// Workers started at the beginning.
    #[arg(long, default_value_t = 5)]
    pub(super) peers: usize,
    /// Length of the churn phase, which starts once the first workers formed a group
    /// [default: 60, unless --steps is given].
    #[arg(long, conflicts_with = "steps")]
    pub(super) duration_s: Option<f64>,
    /// Run the churn phase until the group has completed this many steps (at most --timeout-s).
    #[arg(long)]
    pub(super) steps: Option<u64>,
    /// With --steps: the longest the churn phase may last.
    #[arg(long, default_value_t = 600.0)]
    pub(super) timeout_s: f64,
    /// Seed of the churn schedule: the same seed gives the same schedule.
    #[arg(long, default_value_t = 1)]
    pub(super) seed: u64,
    /// Model (and gradient) size in f32 elements.
    #[arg(long, default_value_t = 1 << 16)]
    pub(super) len: usize,
    /// Mean interval between SIGKILLs of a random worker (0: none); each interval is
    /// drawn uniformly from 0.5 to 1.5 times the mean, likewise below.
    #[arg(long, default_value_t = 12.0)]
    pub(super) kill_every_s: f64,
    /// Mean interval between SIGSTOPs of a random worker (0: none).
    #[arg(long, default_value_t = 20.0)]
    pub(super) freeze_every_s: f64,
    /// A freeze lasts from 0.5 s to this long, then the worker gets SIGKILL or SIGCONT
    /// (a coin flip; a resumed worker usually finds it was removed, and exits).
    #[arg(long, default_value_t = 4.0)]
    pub(super) freeze_max_s: f64,
    /// Mean interval between new workers (0: none).
    #[arg(long, default_value_t = 7.0)]
    pub(super) join_every_s: f64,
    /// Mean interval between graceful leaves of a random worker (0: none).
    #[arg(long, default_value_t = 25.0)]
    pub(super) leave_every_s: f64,
    /// Kills, freezes and leaves never take the number of workers the churn has not
    /// touched below this.
    #[arg(long, default_value_t = 2)]
    pub(super) min_peers: usize,
    /// Joins never take the number of workers the churn has not touched above this
    /// [default: twice --peers].
    #[arg(long)]
    pub(super) max_peers: Option<usize>,
    /// Mean interval between partitions that cut a random worker off from the master
    /// (not from its peers) through the relay, healed after a while (0: none).
    #[arg(long, default_value_t = 0.0)]
    pub(super) partition_every_s: f64,
    /// The longest partition; each lasts between 0.5 s and this.
    #[arg(long, default_value_t = 4.0)]
    pub(super) partition_max_s: f64,
    /// Mean interval between SIGKILLs of the master the group follows (0: none); a
    /// killed master is started again on its address after --master-down-ms, and the
    /// workers rejoin it (or, with --standby, the standby takes over at once).
    #[arg(long, default_value_t = 0.0)]
    pub(super) master_kill_every_s: f64,
    /// How long a killed master stays down before it is started again.
    #[arg(long, default_value_t = 500)]
    pub(super) master_down_ms: u64,
    /// Workers run a workload mix: after each step's all-reduce one more collective (in
    /// turn all-gather, reduce-scatter, all-scan, sparse all-reduce, a sub-group
    /// all-reduce), each result checked against its exact recomputation (`exact-sum`).
    #[arg(long, conflicts_with = "async_mode")]
    pub(super) mix: bool,
    /// Also run a standby master, which the workers list after the primary: a master
    /// kill then makes the other one take the group over.
    #[arg(long)]
    pub(super) standby: bool,
    /// One-way delay the relay adds to every packet of every worker and the master.
    #[arg(long, default_value_t = 0)]
    pub(super) delay_ms: u64,
    /// Extra delay per packet, uniform up to this.
    #[arg(long, default_value_t = 0)]
    pub(super) jitter_ms: u64,
    /// Let jittered packets overtake each other (QUIC takes heavy reordering for loss
    /// and slows down a lot: 3 ms of jitter on loopback cut a 4-peer run to a tenth).
    #[arg(long)]
    pub(super) reorder: bool,
    /// Probability that the relay loses a packet (0 to below 1).
    #[arg(long, default_value_t = 0.0)]
    pub(super) loss: f64,
    /// Overlapped (non-blocking) all-reduces in the workers, as async DiLoCo runs them:
    /// two in flight per round (`phalanx worker --overlap`), checked like blocking ones.
    #[arg(long = "async")]
    pub(super) async_mode: bool,
    /// Invariant `progress`: distinct steps per second of the churn phase must stay above this.
    #[arg(long, default_value_t = 0.5)]
    pub(super) min_steps_per_s: f64,
    /// Invariant `progress`: no stretch of the churn phase without a completed step may last longer.
    #[arg(long, default_value_t = 15.0)]
    pub(super) max_stall_s: f64,
    /// Invariant `joiner-sync`: a joiner must reach the group's model within this long of its start.
    #[arg(long, default_value_t = 20.0)]
    pub(super) join_bound_s: f64,
    /// The master's peer timeout: a peer silent this long is removed.
    #[arg(long, default_value_t = phalanx::membership::master::DEFAULT_PEER_TIMEOUT_MS)]
    pub(super) peer_timeout_ms: u64,
    /// Invariant `wait-bound`: an all-reduce may take the peer timeout plus this long.
    #[arg(long, default_value_t = 3000)]
    pub(super) slack_ms: u64,
    /// The workers' heartbeat interval.
    #[arg(long, default_value_t = phalanx::comm::DEFAULT_HEARTBEAT_MS)]
    pub(super) heartbeat_ms: u64,
    /// The workers' pause between steps.
    #[arg(long, default_value_t = 0)]
    pub(super) step_delay_ms: u64,
    /// Self-test: start one more worker at the beginning of the churn phase that flips a
    /// bit of its first all-reduce result; the run must fail `exact-sum` and `model-agreement`.
    #[arg(long)]
    pub(super) plant_fault: bool,
    /// Workers all-reduce with min-max codes of this width (u8 or u16); `exact-sum` then
    /// checks bit equality with the deterministic quantized result and its error bound.
    #[arg(long)]
    pub(super) quantize: Option<Quantization>,
    /// Go on after a violation (the default stops the run a second after the first one).
    #[arg(long)]
    pub(super) keep_going: bool,
    /// Print the schedule the seed gives, and exit.
    #[arg(long)]
    pub(super) dry_run: bool,
    /// Where to write the JSON report.
    #[arg(long, default_value = "churn-report.json")]
    pub(super) report_json: PathBuf,
    /// Where to write the SVG picture of membership size and step rate over time.
    #[arg(long, default_value = "churn-report.svg")]
    pub(super) report_svg: PathBuf,
}

impl ChurnArgs {
    pub(super) fn duration(&self) -> Option<f64> {
        match (self.duration_s, self.steps) {
            (Some(d), _) => Some(d),
            (None, Some(_)) => None,
            (None, None) => Some(60.0),
        }
    }

    /// How far the schedule must reach.
    pub(super) fn horizon_s(&self) -> f64 {
        self.duration().unwrap_or(self.timeout_s)
    }

    pub(super) fn max_peers(&self) -> usize {
        self.max_peers.unwrap_or(2 * self.peers)
    }

    pub(super) fn wait_bound_ms(&self) -> u64 {
        self.peer_timeout_ms + self.slack_ms
    }

    /// Whether the workers and the master talk through the test relay.
    pub(super) fn uses_relay(&self) -> bool {
        self.partition_every_s > 0.0 || self.delay_ms > 0 || self.jitter_ms > 0 || self.loss > 0.0
    }

    /// What the relay does to every packet.
    pub(super) fn shaping(&self) -> phalanx::relay::Shaping {
        use std::time::Duration;
        phalanx::relay::Shaping::default()
            .delay(Duration::from_millis(self.delay_ms))
            .jitter(Duration::from_millis(self.jitter_ms), self.reorder)
            .loss(self.loss)
    }

    pub(super) fn validate(&self) -> Result<(), String> {
        if !(0.0..1.0).contains(&self.loss) {
            return Err(format!("--loss {} must be at least 0 and below 1", self.loss));
        }
        if self.master_kill_every_s > 0.0 && self.master_kill_every_s * 1e3 < 2.0 * self.master_down_ms as f64 {
            return Err("--master-kill-every-s must be at least twice --master-down-ms".into());
        }
        if self.partition_every_s > 0.0 && self.partition_max_s < 0.5 {
            return Err("--partition-max-s must be at least 0.5".into());
        }
        if self.peers == 0 {
            return Err("--peers must be at least 1".into());
        }
        if self.min_peers == 0 {
            return Err("--min-peers must be at least 1: the group's state lives in its members".into());
        }
        if self.len == 0 {
            return Err("--len must be at least 1".into());
        }
        let every = [self.kill_every_s, self.freeze_every_s, self.join_every_s, self.leave_every_s];
        if every.iter().any(|v| !v.is_finite() || *v < 0.0) {
            return Err("the --*-every-s intervals must be finite and >= 0".into());
        }
        if every.iter().any(|v| *v > 0.0 && *v < 0.1) {
            return Err("the --*-every-s intervals must be 0 (none) or at least 0.1 s".into());
        }
        if !(self.freeze_max_s.is_finite() && self.freeze_max_s >= 0.5) {
            return Err("--freeze-max-s must be at least 0.5".into());
        }
        if !(self.horizon_s().is_finite() && self.horizon_s() > 0.0) {
            return Err("--duration-s and --timeout-s must be positive".into());
        }
        Ok(())
    }
}
