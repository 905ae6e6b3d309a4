//! The simulator: compute load, traffic and memory per device over a load trace, for
//! FSSDP, for expert parallelism with a static owner (EP) and for FSDP.

use super::{calibrate, dispatch, place, Dispatch, ExpertPlacement, Hosts, LoadPredictor, MoeError, PlaceParams};
use crate::rng::SplitMix64;

/// A synthetic gate trace of one layer: `trace[i][d][e]` tokens of device `d` chose
/// expert `e` in iteration `i`. Each of the `tokens` tokens of every device and
/// iteration picks one expert (top-1) with Zipf(`s`) popularity: the expert of rank `k`
/// (from 1) is chosen with probability ∝ `k^-s`. Which expert has which rank is a
/// permutation drawn from `seed`, fixed over the iterations (a router whose skew is
/// stable, as the window predictor assumes); the draws themselves differ.
///
/// ```
/// use phalanx::moe::zipf_trace;
/// let t = zipf_trace(2, 4, 1.2, 100, 3, 7)?;
/// assert_eq!((t.len(), t[0].len(), t[0][0].len()), (3, 2, 4));
/// assert!(t.iter().flatten().all(|device| device.iter().sum::<u64>() == 100));
/// # Ok::<(), phalanx::moe::MoeError>(())
/// ```
pub fn zipf_trace(
    devices: usize,
    experts: usize,
    s: f64,
    tokens: u64,
    iterations: usize,
    seed: u64,
) -> Result<Vec<Vec<Vec<u64>>>, MoeError> {
    zipf_trace_shifting(devices, experts, s, tokens, iterations, seed, 0)
}

/// [`zipf_trace`] whose popularity order is drawn afresh every `every` iterations (never
/// when 0): a router whose hot experts change, which the window predictor follows only
/// after a lag, and which [`calibrate`] can catch.
///
/// ```
/// use phalanx::moe::{zipf_trace, zipf_trace_shifting};
/// assert_eq!(zipf_trace_shifting(2, 4, 1.2, 100, 3, 7, 0)?, zipf_trace(2, 4, 1.2, 100, 3, 7)?);
/// # Ok::<(), phalanx::moe::MoeError>(())
/// ```
pub fn zipf_trace_shifting(
    devices: usize,
    experts: usize,
    s: f64,
    tokens: u64,
    iterations: usize,
    seed: u64,
    every: usize,
) -> Result<Vec<Vec<Vec<u64>>>, MoeError> {
    if devices == 0 || experts == 0 {
        return Err(MoeError::Invalid(format!("a trace needs devices and experts, got {devices} and {experts}")));
    }
    if !s.is_finite() || s < 0.0 {
        return Err(MoeError::Invalid(format!("Zipf exponent {s}: use a finite s >= 0 (0 is uniform)")));
    }
    let mut rng = SplitMix64(seed);
    // Fisher-Yates: perm[k] is the expert of rank k + 1.
    let shuffle = |rng: &mut SplitMix64| {
        let mut perm: Vec<usize> = (0..experts).collect();
        for i in (1..experts).rev() {
            perm.swap(i, rng.below(i as u64 + 1) as usize);
        }
        perm
    };
    let mut perm = shuffle(&mut rng);
    let mut cdf: Vec<f64> = (1..=experts).map(|k| (k as f64).powf(-s)).collect();
    for k in 1..experts {
        cdf[k] += cdf[k - 1];
    }
    let norm = cdf[experts - 1];
    Ok((0..iterations)
        .map(|i| {
            if every > 0 && i > 0 && i % every == 0 {
                perm = shuffle(&mut rng);
            }
            (0..devices)
                .map(|_| {
                    let mut counts = vec![0u64; experts];
                    for _ in 0..tokens {
                        let u = rng.unit() * norm;
                        let rank = cdf.partition_point(|&c| c <= u).min(experts - 1);
                        counts[perm[rank]] += 1;
                    }
                    counts
                })
                .collect()
        })
        .collect())
}

/// What the simulator charges and how FSSDP places.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    /// FSSDP's overlap degree `t` and memory slots `m`.
    pub params: PlaceParams,
    /// Bytes of one expert's parameters (what spAG moves; its gradient, what spRS moves,
    /// is as big).
    pub expert_bytes: u64,
    /// Bytes of one token's hidden state (what dispatch and combine move, and their
    /// gradients in backward).
    pub token_bytes: u64,
    /// Iterations the load predictor averages over.
    pub window: usize,
    /// Device → host, if known: FSSDP's placement and dispatch prefer a host's own
    /// replicas.
    pub hosts: Option<Hosts>,
    /// Calibrate with the gate's output ([`calibrate`]), one expert's transfer costing
    /// this many tokens of compute; `None`: never.
    pub calibrate: Option<f64>,
}

/// One strategy's figures, each a mean per iteration over the trace.
#[derive(Clone, Debug, PartialEq)]
pub struct StrategyStats {
    /// "EP", "FSDP" or "FSSDP".
    pub name: &'static str,
    /// Tokens each device computes.
    pub compute: Vec<f64>,
    /// The largest device's tokens (each iteration's straggler, averaged): what the
    /// iteration waits for.
    pub straggler: f64,
    /// Bytes of parameters and their gradients received, all devices together.
    pub param_bytes: f64,
    /// Bytes of tokens and their gradients received, all devices together.
    pub token_bytes: f64,
    /// Bytes each device receives, parameters and tokens.
    pub traffic: Vec<f64>,
    /// The most expert bytes each device holds at once during an iteration.
    pub memory: Vec<u64>,
}

impl StrategyStats {
    fn new(name: &'static str, devices: usize) -> StrategyStats {
        StrategyStats {
            name,
            compute: vec![0.0; devices],
            straggler: 0.0,
            param_bytes: 0.0,
            token_bytes: 0.0,
            traffic: vec![0.0; devices],
            memory: vec![0; devices],
        }
    }

    /// Parameter and token bytes together.
    pub fn total_traffic(&self) -> f64 {
        self.param_bytes + self.token_bytes
    }

    /// The mean device's tokens: the straggler's ideal.
    pub fn mean_compute(&self) -> f64 {
        self.compute.iter().sum::<f64>() / self.compute.len().max(1) as f64
    }

    /// The straggler over the mean (1 is perfect balance).
    pub fn imbalance(&self) -> f64 {
        self.straggler / self.mean_compute()
    }

    /// The most any device receives.
    pub fn max_traffic(&self) -> f64 {
        self.traffic.iter().cloned().fold(0.0, f64::max)
    }

    /// The most expert bytes any device holds.
    pub fn max_memory(&self) -> u64 {
        self.memory.iter().copied().max().unwrap_or(0)
    }

    /// Adds one iteration: the tokens each device computes, the parameter and token
    /// bytes each receives, and the expert bytes each holds.
    fn add(&mut self, compute: &[u64], params: &[u64], tokens: &[u64], memory: &[u64]) {
        for d in 0..self.compute.len() {
            self.compute[d] += compute[d] as f64;
            self.traffic[d] += (params[d] + tokens[d]) as f64;
            self.memory[d] = self.memory[d].max(memory[d]);
        }
        self.straggler += compute.iter().copied().max().unwrap_or(0) as f64;
        self.param_bytes += params.iter().sum::<u64>() as f64;
        self.token_bytes += tokens.iter().sum::<u64>() as f64;
    }

    fn average(&mut self, iterations: usize) {
        let n = iterations.max(1) as f64;
        self.compute.iter_mut().chain(self.traffic.iter_mut()).for_each(|x| *x /= n);
        self.straggler /= n;
        self.param_bytes /= n;
        self.token_bytes /= n;
    }
}

/// The simulator's result: the three strategies over the same trace and owners.
#[derive(Clone, Debug, PartialEq)]
pub struct SimReport {
    /// Iterations simulated.
    pub iterations: usize,
    /// Expert parallelism with a static owner: tokens go to the owner, parameters stay.
    pub ep: StrategyStats,
    /// FSDP: every device all-gathers every expert and reduce-scatters every gradient,
    /// and computes its own tokens.
    pub fsdp: StrategyStats,
    /// FSSDP: spAG of the hot experts' replicas, tokens to a holder, spRS back.
    pub fssdp: StrategyStats,
    /// FSSDP's replica slots left unused, per iteration.
    pub unused_slots: f64,
    /// Iterations in which calibration paid and ran its extra spAG.
    pub calibrated: usize,
}

impl SimReport {
    /// FSSDP's straggler over EP's (the issue's target: at most 0.6).
    pub fn straggler_ratio(&self) -> f64 {
        self.fssdp.straggler / self.ep.straggler
    }

    /// FSSDP's total traffic over FSDP's (the issue's target: at most 0.5).
    pub fn traffic_ratio(&self) -> f64 {
        self.fssdp.total_traffic() / self.fsdp.total_traffic()
    }
}

/// Bytes each device receives for the tokens of `plan` that cross devices: the holder
/// receives the token (dispatch) and, in backward, its output's gradient; the source
/// receives the output (combine) and, in backward, its input's gradient.
fn token_traffic(plan: &Dispatch, devices: usize, token_bytes: u64) -> Vec<u64> {
    let mut bytes = vec![0u64; devices];
    for r in plan.routes().iter().filter(|r| r.from != r.to) {
        bytes[r.to] += 2 * r.tokens * token_bytes;
        bytes[r.from] += 2 * r.tokens * token_bytes;
    }
    bytes
}

/// Replays `trace` (`trace[i][d][e]`: tokens of device `d` routed to expert `e` in
/// iteration `i`, one layer) over the experts' `owners` under EP, FSDP and FSSDP.
///
/// Compute is counted in tokens, traffic in bytes received (every collective counted
/// once, at its receiver; forward and backward), memory in expert bytes held at the
/// peak of an iteration. FSSDP predicts each iteration's loads from the gate counts of
/// the previous `window` iterations (with none yet, from the gate's own output: the
/// calibration the reference allows), places with [`place`] and dispatches the real
/// tokens with [`dispatch`]; spAG and spRS each move one expert per replica.
///
/// ```
/// use phalanx::moe::{simulate, zipf_trace, PlaceParams, SimConfig};
/// let trace = zipf_trace(4, 8, 1.2, 1000, 10, 1)?;
/// let config = SimConfig {
///     params: PlaceParams { overlap: 2, slots: 2 },
///     expert_bytes: 1 << 20,
///     token_bytes: 1 << 10,
///     window: 5,
///     hosts: None,
///     calibrate: None,
/// };
/// let r = simulate(&trace, &[0, 0, 1, 1, 2, 2, 3, 3], &config)?;
/// assert!(r.fssdp.straggler < r.ep.straggler);
/// assert!(r.fssdp.total_traffic() < r.fsdp.total_traffic());
/// # Ok::<(), phalanx::moe::MoeError>(())
/// ```
pub fn simulate(trace: &[Vec<Vec<u64>>], owners: &[usize], config: &SimConfig) -> Result<SimReport, MoeError> {
    let Some(devices) = trace.first().map(Vec::len) else {
        return Err(MoeError::Invalid("an empty trace: give at least one iteration".into()));
    };
    let experts = owners.len();
    let sharded = ExpertPlacement::sharded(owners, devices)?;
    let mut predictor = LoadPredictor::with_window(experts, config.window)?;
    let (mut ep, mut fsdp, mut fssdp) =
        (StrategyStats::new("EP", devices), StrategyStats::new("FSDP", devices), StrategyStats::new("FSSDP", devices));
    let eb = config.expert_bytes;
    let owned: Vec<u64> = (0..devices).map(|d| owners.iter().filter(|&&o| o == d).count() as u64).collect();
    let mut unused = 0usize;
    let mut calibrated = 0usize;
    for (i, routed) in trace.iter().enumerate() {
        if routed.len() != devices {
            return Err(MoeError::Shape {
                what: "trace iteration (one row per device)",
                expected: devices,
                got: routed.len(),
            });
        }
        let plan = dispatch(&sharded, routed, None).map_err(|e| MoeError::Invalid(format!("iteration {i}: {e}")))?;
        let none = vec![0u64; devices];
        let at_rest: Vec<u64> = owned.iter().map(|&n| n * eb).collect();
        ep.add(&plan.compute(), &none, &token_traffic(&plan, devices, config.token_bytes), &at_rest);

        // FSDP: all-gather brings each device the experts it does not own; the
        // reduce-scatter brings each owner every other device's gradient of its own.
        let local: Vec<u64> = routed.iter().map(|row| row.iter().sum()).collect();
        let params: Vec<u64> =
            (0..devices).map(|d| (experts as u64 - owned[d]) * eb + owned[d] * (devices as u64 - 1) * eb).collect();
        fsdp.add(&local, &params, &none, &vec![experts as u64 * eb; devices]);

        let gate: Vec<f64> = (0..experts).map(|e| routed.iter().map(|row| row[e]).sum::<u64>() as f64).collect();
        let predicted = place(owners, devices, &predictor.predict_or(&gate), config.params, config.hosts.as_ref())?;
        let mut params = vec![0u64; devices];
        for (d, bytes) in params.iter_mut().enumerate() {
            *bytes += predicted.replicas(d).len() as u64 * eb; // spAG
        }
        // Held at the peak: the predicted replicas, and a calibration's new ones with them.
        let mut held: Vec<u64> = (0..devices).map(|d| predicted.held(d).len() as u64 * eb).collect();
        let mut p = predicted.clone();
        if let Some(cost) = config.calibrate {
            let c = calibrate(&predicted, routed, config.params, config.hosts.as_ref(), cost)?;
            if c.worth_it() {
                for d in 0..devices {
                    let new = c.placement.held(d).into_iter().filter(|&e| !predicted.holds(d, e)).count() as u64;
                    params[d] += new * eb; // the extra spAG
                    held[d] += new * eb;
                }
                calibrated += 1;
                p = c.placement;
            }
        }
        let plan = dispatch(&p, routed, config.hosts.as_ref())?;
        for e in 0..experts {
            params[owners[e]] += (p.holders(e).len() as u64 - 1) * eb; // spRS
        }
        fssdp.add(&plan.compute(), &params, &token_traffic(&plan, devices, config.token_bytes), &held);
        unused += p.unused_slots();
        predictor.observe(&gate)?;
    }
    for s in [&mut ep, &mut fsdp, &mut fssdp] {
        s.average(trace.len());
    }
    Ok(SimReport {
        iterations: trace.len(),
        ep,
        fsdp,
        fssdp,
        unused_slots: unused as f64 / trace.len().max(1) as f64,
        calibrated,
    })
}
