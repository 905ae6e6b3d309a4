//! Per-iteration placement P′ ⊇ P (the reference's Algorithm 1, sparse materialisation)
//! and the load predictor that feeds it.

use std::collections::VecDeque;

use super::{check_loads, Hosts, MoeError};

/// Iterations the [`LoadPredictor`] averages over by default (the reference's window).
pub const WINDOW: usize = 5;

/// Predicts each expert's load for the next iteration of one layer: the mean of the gate
/// counts of the last [`WINDOW`] iterations.
///
/// ```
/// use phalanx::moe::LoadPredictor;
/// let mut p = LoadPredictor::new(2);
/// assert_eq!(p.predict(), None); // nothing seen yet
/// for counts in [[10.0, 0.0], [20.0, 2.0]] {
///     p.observe(&counts)?;
/// }
/// assert_eq!(p.predict(), Some(vec![15.0, 1.0]));
/// # Ok::<(), phalanx::moe::MoeError>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LoadPredictor {
    experts: usize,
    window: usize,
    history: VecDeque<Vec<f64>>,
}

impl LoadPredictor {
    /// A predictor for a layer of `experts` experts over the last [`WINDOW`] iterations.
    pub fn new(experts: usize) -> LoadPredictor {
        LoadPredictor { experts, window: WINDOW, history: VecDeque::with_capacity(WINDOW) }
    }

    /// A predictor over the last `window` iterations (at least 1).
    pub fn with_window(experts: usize, window: usize) -> Result<LoadPredictor, MoeError> {
        if window == 0 {
            return Err(MoeError::Invalid("a load window of 0 iterations predicts nothing: use at least 1".into()));
        }
        Ok(LoadPredictor { experts, window, history: VecDeque::with_capacity(window) })
    }

    /// Feeds the gate's real output of one iteration: `counts[e]` tokens went to expert
    /// `e` (summed over all devices). The oldest iteration beyond the window is dropped.
    pub fn observe(&mut self, counts: &[f64]) -> Result<(), MoeError> {
        if counts.len() != self.experts {
            return Err(MoeError::Shape {
                what: "gate counts (one per expert)",
                expected: self.experts,
                got: counts.len(),
            });
        }
        check_loads(counts)?;
        if self.history.len() == self.window {
            self.history.pop_front();
        }
        self.history.push_back(counts.to_vec());
        Ok(())
    }

    /// The mean load of each expert over the iterations in the window, or `None` before
    /// the first [`observe`](Self::observe).
    pub fn predict(&self) -> Option<Vec<f64>> {
        if self.history.is_empty() {
            return None;
        }
        let n = self.history.len() as f64;
        // Summed in observation order, so the prediction is the same on every device.
        Some((0..self.experts).map(|e| self.history.iter().map(|h| h[e]).sum::<f64>() / n).collect())
    }

    /// The prediction, or, before any observation, the gate's output of this iteration
    /// (the reference's calibration with the real gate output, here the only source).
    pub fn predict_or(&self, gate: &[f64]) -> Vec<f64> {
        self.predict().unwrap_or_else(|| gate.to_vec())
    }

    /// How many iterations the window holds now.
    pub fn iterations(&self) -> usize {
        self.history.len()
    }
}

/// The knobs of [`place`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlaceParams {
    /// The overlap degree `t`: how many experts' transfers hide under the attention
    /// compute (`T_nonMoE · bw / expert_size`).
    pub overlap: usize,
    /// The memory capacity `m`: extra expert slots per device.
    pub slots: usize,
}

/// A placement P′ of one layer's experts for one iteration: the owner of each expert
/// (P) and every device holding a copy (P′ ⊇ P).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertPlacement {
    devices: usize,
    owners: Vec<usize>,
    /// Per expert: its holders, ascending, the owner included.
    holders: Vec<Vec<usize>>,
    unused_slots: usize,
}

impl ExpertPlacement {
    /// The sharded placement P itself: every expert held by its owner only.
    pub fn sharded(owners: &[usize], devices: usize) -> Result<ExpertPlacement, MoeError> {
        check_owners(owners, devices)?;
        Ok(ExpertPlacement {
            devices,
            owners: owners.to_vec(),
            holders: owners.iter().map(|&o| vec![o]).collect(),
            unused_slots: 0,
        })
    }

    /// A placement given outright: expert `e` owned by `owners[e]` and also held by the
    /// devices in `extra[e]` (any order; duplicates and the owner allowed).
    pub fn with_replicas(owners: &[usize], devices: usize, extra: &[Vec<usize>]) -> Result<ExpertPlacement, MoeError> {
        let mut p = ExpertPlacement::sharded(owners, devices)?;
        if extra.len() != owners.len() {
            return Err(MoeError::Shape {
                what: "replica sets (one per expert)",
                expected: owners.len(),
                got: extra.len(),
            });
        }
        for (e, devs) in extra.iter().enumerate() {
            if let Some(&d) = devs.iter().find(|&&d| d >= devices) {
                return Err(MoeError::Device { what: format!("a replica of expert {e}"), device: d, devices });
            }
            p.holders[e].extend_from_slice(devs);
            p.holders[e].sort_unstable();
            p.holders[e].dedup();
        }
        Ok(p)
    }

    /// The number of devices.
    pub fn devices(&self) -> usize {
        self.devices
    }

    /// The number of experts.
    pub fn experts(&self) -> usize {
        self.owners.len()
    }

    /// The owner of each expert.
    pub fn owners(&self) -> &[usize] {
        &self.owners
    }

    /// The devices holding expert `e`, ascending, its owner included.
    pub fn holders(&self, e: usize) -> &[usize] {
        &self.holders[e]
    }

    /// Whether `device` holds expert `e`.
    pub fn holds(&self, device: usize, e: usize) -> bool {
        self.holders[e].binary_search(&device).is_ok()
    }

    /// The experts `device` holds without owning them (what spAG brings it), ascending.
    pub fn replicas(&self, device: usize) -> Vec<usize> {
        (0..self.experts()).filter(|&e| self.owners[e] != device && self.holds(device, e)).collect()
    }

    /// The experts `device` holds, owned or not, ascending.
    pub fn held(&self, device: usize) -> Vec<usize> {
        (0..self.experts()).filter(|&e| self.holds(device, e)).collect()
    }

    /// Expert transfers of spAG(P, P′), the same as of spRS(P′, P): `Σ_e |R_e|`, the
    /// non-owner holders of each expert.
    pub fn transfers(&self) -> usize {
        self.holders.iter().map(|h| h.len() - 1).sum()
    }

    /// Replica slots (of `devices · m`) that [`place`] could not fill: every device with
    /// a free slot already held the experts still wanting replicas.
    pub fn unused_slots(&self) -> usize {
        self.unused_slots
    }

    /// This placement as the chunk placement of spAG and spRS, each expert a chunk of
    /// `expert_len` elements in expert order, devices as ranks: what
    /// [`crate::Communicator::sparse_all_gather`] and
    /// [`crate::Communicator::sparse_reduce_scatter`] take.
    pub fn to_sparse(&self, expert_len: usize) -> crate::Result<crate::plan::sparse::Placement> {
        let extra: Vec<Vec<usize>> = self.holders.clone();
        crate::plan::sparse::Placement::new(self.devices, vec![expert_len; self.experts()], self.owners.clone())?
            .widen(&extra)
    }
}

fn check_owners(owners: &[usize], devices: usize) -> Result<(), MoeError> {
    if devices == 0 {
        return Err(MoeError::Invalid("no devices".into()));
    }
    match owners.iter().enumerate().find(|(_, &d)| d >= devices) {
        Some((e, &d)) => Err(MoeError::Device { what: format!("the owner of expert {e}"), device: d, devices }),
        None => Ok(()),
    }
}

/// Splits `slots` among experts in proportion to `loads`, expert `e` getting at most
/// `caps[e]`: the water level `λ` with `Σ min(caps[e], λ·loads[e]) = total` gives each
/// expert its ideal share, rounded by largest remainder (ties to the lower index), so
/// every count is within 1 of its ideal. `total` is `slots`, or all the caps of the
/// loaded experts if that is less; experts with load 0 get nothing.
///
/// ```
/// use phalanx::moe::proportional_slots;
/// assert_eq!(proportional_slots(&[6.0, 3.0, 1.0], 10, &[9, 9, 9]), vec![6, 3, 1]);
/// // The hottest expert is capped at 3 (one replica per other device); the rest share the others.
/// assert_eq!(proportional_slots(&[8.0, 1.0, 1.0], 8, &[3, 9, 9]), vec![3, 3, 2]);
/// ```
pub fn proportional_slots(loads: &[f64], slots: usize, caps: &[usize]) -> Vec<usize> {
    let n = loads.len();
    let mut counts = vec![0usize; n];
    let loaded: Vec<usize> = (0..n).filter(|&e| loads[e] > 0.0 && caps[e] > 0).collect();
    let total = slots.min(loaded.iter().map(|&e| caps[e]).sum());
    if total == 0 {
        return counts;
    }
    // Water-filling: experts whose share reaches their cap are fixed at it and the
    // level is recomputed over the others, until no share passes its cap.
    let mut active = loaded;
    let mut left = total;
    let mut ideal = vec![0.0f64; n];
    loop {
        let sum: f64 = active.iter().map(|&e| loads[e]).sum();
        let level = left as f64 / sum;
        let (full, rest): (Vec<usize>, Vec<usize>) = active.iter().partition(|&&e| level * loads[e] >= caps[e] as f64);
        if full.is_empty() || rest.is_empty() {
            for &e in &active {
                ideal[e] = (level * loads[e]).min(caps[e] as f64);
            }
            break;
        }
        for &e in &full {
            ideal[e] = caps[e] as f64;
            left -= caps[e];
        }
        active = rest;
    }
    for e in 0..n {
        counts[e] = (ideal[e].floor() as usize).min(caps[e]);
    }
    let mut short = total.saturating_sub(counts.iter().sum());
    let mut by_remainder: Vec<usize> = (0..n).filter(|&e| counts[e] < caps[e] && loads[e] > 0.0).collect();
    by_remainder
        .sort_by(|&a, &b| (ideal[b] - ideal[b].floor()).total_cmp(&(ideal[a] - ideal[a].floor())).then(a.cmp(&b)));
    for e in by_remainder {
        if short == 0 {
            break;
        }
        counts[e] += 1;
        short -= 1;
    }
    counts
}

/// The per-iteration placement P′ of one layer (the reference's Algorithm 1): from the
/// experts' `owners` (P) over `devices` devices, their predicted `loads`, the overlap
/// degree `t` and the memory slots `m` of `params`.
///
/// With `t := min(t, E)` and `m := min(m, t)`:
/// - if `t <= m`, the top-`t` experts by load (ties to the lower index) are replicated
///   on every device: `P′ = P ∪ (D × TopT)`;
/// - otherwise the `D · m` replica slots are shared among the top-`t` experts in
///   proportion to their loads ([`proportional_slots`]; an expert gets at most one
///   replica per device other than its owner). Experts with the most replicas are
///   placed first, each replica on a device with a free slot that does not hold the
///   expert yet, preferring a host with no copy of it (when `hosts` are known: tokens
///   then find a replica on their own host), then the device with the most free slots
///   (which places every replica whenever the owners leave room), then the one with the
///   least predicted load, then the lower index. Slots that no device can take are
///   counted in [`ExpertPlacement::unused_slots`].
///
/// No device gets more than `m` replicas.
pub fn place(
    owners: &[usize],
    devices: usize,
    loads: &[f64],
    params: PlaceParams,
    hosts: Option<&Hosts>,
) -> Result<ExpertPlacement, MoeError> {
    check_owners(owners, devices)?;
    let experts = owners.len();
    if loads.len() != experts {
        return Err(MoeError::Shape { what: "predicted loads (one per expert)", expected: experts, got: loads.len() });
    }
    check_loads(loads)?;
    if let Some(h) = hosts {
        h.check(devices)?;
    }
    let mut p = ExpertPlacement::sharded(owners, devices)?;
    let t = params.overlap.min(experts);
    let m = params.slots.min(t);
    let mut top: Vec<usize> = (0..experts).collect();
    top.sort_by(|&a, &b| loads[b].total_cmp(&loads[a]).then(a.cmp(&b)));
    top.truncate(t);

    if t <= m {
        for &e in &top {
            p.holders[e] = (0..devices).collect();
        }
        p.unused_slots = (0..devices).map(|d| m - p.replicas(d).len()).sum();
        return Ok(p);
    }

    let top_loads: Vec<f64> = top.iter().map(|&e| loads[e]).collect();
    let caps = vec![devices - 1; t];
    let counts = proportional_slots(&top_loads, devices * m, &caps);
    let mut order: Vec<usize> = (0..t).collect();
    order.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));

    let host = |d: usize| hosts.map_or(d, |h| h.of(d));
    let mut free = vec![m; devices];
    // The load each device is predicted to compute: an expert's load split evenly
    // over its holders, as `dispatch` splits its tokens.
    let mut device_load = vec![0.0f64; devices];
    for e in 0..experts {
        device_load[owners[e]] += loads[e];
    }
    let mut placed = 0;
    for i in order {
        let e = top[i];
        for _ in 0..counts[i] {
            let holders = &p.holders[e];
            let copies_on = |d: usize| holders.iter().filter(|&&h| host(h) == host(d)).count();
            let pick = (0..devices).filter(|&d| free[d] > 0 && !holders.contains(&d)).min_by(|&a, &b| {
                copies_on(a)
                    .cmp(&copies_on(b))
                    .then(free[b].cmp(&free[a]))
                    .then(device_load[a].total_cmp(&device_load[b]))
                    .then(a.cmp(&b))
            });
            let Some(d) = pick else { break };
            let k = p.holders[e].len() as f64;
            for &h in &p.holders[e] {
                device_load[h] -= loads[e] / k - loads[e] / (k + 1.0);
            }
            device_load[d] += loads[e] / (k + 1.0);
            let at = p.holders[e].partition_point(|&h| h < d);
            p.holders[e].insert(at, d);
            free[d] -= 1;
            placed += 1;
        }
    }
    p.unused_slots = devices * m - placed;
    Ok(p)
}
