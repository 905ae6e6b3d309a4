//! Token dispatch: which device computes each token's expert, given a placement P′.

use super::{ExpertPlacement, Hosts, MoeError};

/// `tokens` tokens on device `from` routed to `expert`, computed on device `to` (which
/// holds the expert; `to == from` when they stay).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The device the tokens come from.
    pub from: usize,
    /// Their expert.
    pub expert: usize,
    /// The device that computes them.
    pub to: usize,
    /// How many.
    pub tokens: u64,
}

/// A dispatch plan: where every token of one layer and iteration goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dispatch {
    devices: usize,
    routes: Vec<Route>,
}

impl Dispatch {
    /// Every route, by expert, then as [`dispatch`] matched them.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Tokens each device computes (its expert compute load).
    pub fn compute(&self) -> Vec<u64> {
        let mut load = vec![0; self.devices];
        for r in &self.routes {
            load[r.to] += r.tokens;
        }
        load
    }

    /// The largest compute load: the straggler's.
    pub fn straggler(&self) -> u64 {
        self.compute().into_iter().max().unwrap_or(0)
    }

    /// `counts[from][to]`: tokens device `from` sends to device `to` (the diagonal stays
    /// local), the send counts of the dispatch all-to-all(v); the combine is its
    /// transpose.
    pub fn send_counts(&self) -> Vec<Vec<u64>> {
        let mut c = vec![vec![0; self.devices]; self.devices];
        for r in &self.routes {
            c[r.from][r.to] += r.tokens;
        }
        c
    }

    /// Tokens that leave their device.
    pub fn crossing(&self) -> u64 {
        self.routes.iter().filter(|r| r.from != r.to).map(|r| r.tokens).sum()
    }
}

/// Routes every token to a device holding its expert under `p`: `routed[d][e]` tokens
/// on device `d` chose expert `e`.
///
/// Each expert's `N` tokens are split evenly over its `k` holders: each computes
/// `⌊N/k⌋` of them, and the `N mod k` holders with the most of the expert's tokens
/// already on them (the lower index on a tie) one more. Tokens are then matched to those
/// shares locality first: each holder keeps its own tokens, then (when `hosts` are
/// known) takes tokens from devices of its host, then the rest go source by source,
/// ascending, to holders with room, ascending. The plan is a function of its inputs only,
/// so every device computes the same one.
///
/// ```
/// use phalanx::moe::{dispatch, ExpertPlacement};
/// use phalanx::moe::{place, PlaceParams};
/// // Expert 0 is owned by device 0 and has 3 + 2 tokens on devices 0 and 1.
/// let routed = [vec![3, 0], vec![2, 0]];
/// let p = ExpertPlacement::sharded(&[0, 1], 2)?;
/// assert_eq!(dispatch(&p, &routed, None)?.compute(), vec![5, 0]); // only its owner holds it
/// // Replicated on device 1: device 0 computes 3 (the odd token stays where most are),
/// // device 1 its own 2; nothing crosses.
/// let p = place(&[0, 1], 2, &[5.0, 0.0], PlaceParams { overlap: 1, slots: 1 }, None)?;
/// let d = dispatch(&p, &routed, None)?;
/// assert_eq!((d.compute(), d.crossing()), (vec![3, 2], 0));
/// # Ok::<(), phalanx::moe::MoeError>(())
/// ```
pub fn dispatch(p: &ExpertPlacement, routed: &[Vec<u64>], hosts: Option<&Hosts>) -> Result<Dispatch, MoeError> {
    let (devices, experts) = (p.devices(), p.experts());
    if routed.len() != devices {
        return Err(MoeError::Shape {
            what: "routed tokens (one row per device)",
            expected: devices,
            got: routed.len(),
        });
    }
    if let Some(row) = routed.iter().find(|r| r.len() != experts) {
        return Err(MoeError::Shape {
            what: "routed tokens (one count per expert)",
            expected: experts,
            got: row.len(),
        });
    }
    if let Some(h) = hosts {
        h.check(devices)?;
    }
    let host = |d: usize| hosts.map_or(d, |h| h.of(d));
    let mut routes = Vec::new();
    for (e, holders) in (0..experts).map(|e| (e, p.holders(e))) {
        let mut supply: Vec<u64> = routed.iter().map(|row| row[e]).collect();
        let total: u64 = supply.iter().sum();
        if total == 0 {
            continue;
        }
        let k = holders.len() as u64;
        let mut share = vec![total / k; holders.len()];
        let mut by_local: Vec<usize> = (0..holders.len()).collect();
        by_local.sort_by(|&a, &b| supply[holders[b]].cmp(&supply[holders[a]]).then(a.cmp(&b)));
        for &i in by_local.iter().take((total % k) as usize) {
            share[i] += 1;
        }
        let mut take = |from: usize, i: usize, supply: &mut [u64], share: &mut [u64]| {
            let n = supply[from].min(share[i]);
            if n > 0 {
                supply[from] -= n;
                share[i] -= n;
                routes.push(Route { from, expert: e, to: holders[i], tokens: n });
            }
        };
        // Local tokens first: they cost no transfer.
        for (i, &h) in holders.iter().enumerate() {
            take(h, i, &mut supply, &mut share);
        }
        // Then tokens of the holder's own host: an intra-host copy.
        if hosts.is_some() {
            for (i, &h) in holders.iter().enumerate() {
                for d in (0..devices).filter(|&d| d != h && host(d) == host(h)) {
                    take(d, i, &mut supply, &mut share);
                }
            }
        }
        for d in 0..devices {
            for i in 0..holders.len() {
                take(d, i, &mut supply, &mut share);
            }
        }
    }
    Ok(Dispatch { devices, routes })
}
