//! Changing owners: the moves between two shardings (re-sharding every K iterations),
//! backup owners that keep an expert's optimizer state on a second device, and the
//! sharding the survivors take up when a device is lost.

use super::{Hosts, MoeError, Sharding};
use crate::plan::sparse::Placement;

/// One expert changing owner: its parameters and optimizer state go from `from` to `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Move {
    /// The layer.
    pub layer: usize,
    /// The expert.
    pub expert: usize,
    /// Its owner now.
    pub from: usize,
    /// Its owner next.
    pub to: usize,
}

impl Sharding {
    /// The moves that turn this sharding into `next` (same devices, layers and experts),
    /// by layer, then expert: what re-sharding transfers.
    ///
    /// ```
    /// use phalanx::moe::{Move, Sharding};
    /// let now = Sharding::from_owners(2, vec![vec![0, 0, 1]], vec![8])?;
    /// let next = Sharding::from_owners(2, vec![vec![0, 1, 1]], vec![8])?;
    /// assert_eq!(now.moves_to(&next)?, vec![Move { layer: 0, expert: 1, from: 0, to: 1 }]);
    /// # Ok::<(), phalanx::moe::MoeError>(())
    /// ```
    pub fn moves_to(&self, next: &Sharding) -> Result<Vec<Move>, MoeError> {
        if next.devices() != self.devices() || next.layers() != self.layers() {
            return Err(MoeError::Invalid(format!(
                "re-sharding from {} devices and {} layers to {} and {}: plan the new sharding for the same group and model",
                self.devices(),
                self.layers(),
                next.devices(),
                next.layers()
            )));
        }
        let mut moves = Vec::new();
        for l in 0..self.layers() {
            let (a, b) = (self.owners(l), next.owners(l));
            if a.len() != b.len() {
                return Err(MoeError::Shape {
                    what: "experts of the new sharding's layer",
                    expected: a.len(),
                    got: b.len(),
                });
            }
            moves.extend((0..a.len()).filter(|&e| a[e] != b[e]).map(|e| Move {
                layer: l,
                expert: e,
                from: a[e],
                to: b[e],
            }));
        }
        Ok(moves)
    }

    /// The chunk placement of layer `layer` that re-sharding to `next` runs: each expert
    /// (`expert_len` elements, experts in order) owned by its current owner and, where
    /// it moves, also held by its next owner. A spAG over it (of the parameters, then of
    /// each optimizer-state buffer) leaves every next owner holding its experts' state;
    /// experts that stay move nothing.
    ///
    /// ```
    /// use phalanx::moe::Sharding;
    /// let now = Sharding::from_owners(2, vec![vec![0, 0, 1]], vec![8])?;
    /// let next = Sharding::from_owners(2, vec![vec![0, 1, 1]], vec![8])?;
    /// let p = now.transfer_placement(&next, 0, 4).expect("placement");
    /// assert_eq!((p.transfers(), p.holders(1)), (1, &[0, 1][..]));
    /// # Ok::<(), phalanx::moe::MoeError>(())
    /// ```
    pub fn transfer_placement(&self, next: &Sharding, layer: usize, expert_len: usize) -> crate::Result<Placement> {
        let moves = self.moves_to(next)?;
        if layer >= self.layers() {
            return Err(MoeError::Invalid(format!("layer {layer} of a sharding of {}", self.layers())).into());
        }
        let mut extra = vec![Vec::new(); self.owners(layer).len()];
        for m in moves.iter().filter(|m| m.layer == layer) {
            extra[m.expert].push(m.to);
        }
        Placement::new(self.devices(), vec![expert_len; extra.len()], self.owners(layer).to_vec())?.widen(&extra)
    }

    /// The sharding the survivors take up when device `lost` is gone: each of its
    /// experts is owned by its backup, and the devices after `lost` move down by one (as
    /// the ranks of a view do when a peer leaves). Plan new backups for the result.
    ///
    /// ```
    /// use phalanx::moe::{plan_backups, Sharding};
    /// let s = Sharding::from_owners(3, vec![vec![0, 1, 2]], vec![8])?;
    /// let b = plan_backups(&s, None)?;
    /// assert_eq!(b.of(0, 1), 2);
    /// // Expert 1 goes to its backup, device 2, which becomes device 1.
    /// let after = s.after_loss(1, &b)?;
    /// assert_eq!(after.owners(0), &[0, 1, 1]);
    /// # Ok::<(), phalanx::moe::MoeError>(())
    /// ```
    pub fn after_loss(&self, lost: usize, backups: &Backups) -> Result<Sharding, MoeError> {
        let devices = self.devices();
        if lost >= devices {
            return Err(MoeError::Device { what: "the lost device".into(), device: lost, devices });
        }
        if devices < 2 {
            return Err(MoeError::Invalid("the only device was lost: no survivor can take its experts".into()));
        }
        backups.check(self)?;
        let renumber = |d: usize| if d > lost { d - 1 } else { d };
        let owners = (0..self.layers())
            .map(|l| {
                self.owners(l)
                    .iter()
                    .enumerate()
                    .map(|(e, &o)| renumber(if o == lost { backups.of(l, e) } else { o }))
                    .collect()
            })
            .collect();
        Sharding::from_owners(devices - 1, owners, (0..self.layers()).map(|l| self.expert_bytes(l)).collect())
    }
}

/// A backup owner for every expert: a second device that keeps the expert's parameters
/// and optimizer state in step with its owner, so that losing the owner loses nothing.
///
/// Keeping them in step costs, every iteration, each expert's reduced gradient sent from
/// its owner to its backup (an expert's bytes; the backup runs the same optimizer step)
/// and, at rest, each device holding its backups' state as well as its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backups {
    devices: usize,
    /// `backups[l][e]`: the backup of expert `e` of layer `l`.
    backups: Vec<Vec<usize>>,
}

impl Backups {
    /// Backups given outright for `sharding`: `backups[l][e]` backs up expert `e` of
    /// layer `l` (a device of the sharding other than the expert's owner), as
    /// [`plan_backups`] planned them, say, on another process.
    ///
    /// ```
    /// use phalanx::moe::{plan_backups, Backups, Sharding};
    /// let s = Sharding::from_owners(2, vec![vec![0, 1]], vec![8])?;
    /// assert_eq!(Backups::from_lists(&s, vec![vec![1, 0]])?, plan_backups(&s, None)?);
    /// assert!(Backups::from_lists(&s, vec![vec![0, 0]]).is_err()); // expert 0 on its owner
    /// # Ok::<(), phalanx::moe::MoeError>(())
    /// ```
    pub fn from_lists(sharding: &Sharding, backups: Vec<Vec<usize>>) -> Result<Backups, MoeError> {
        let b = Backups { devices: sharding.devices(), backups };
        b.check(sharding)?;
        for (l, layer) in b.backups.iter().enumerate() {
            for (e, &d) in layer.iter().enumerate() {
                if d >= b.devices || d == sharding.owners(l)[e] {
                    return Err(MoeError::Invalid(format!(
                        "the backup of expert {e} of layer {l} is device {d}: give a device of the {} other than its owner {}",
                        b.devices,
                        sharding.owners(l)[e]
                    )));
                }
            }
        }
        Ok(b)
    }

    /// The backup of expert `expert` of layer `layer`.
    pub fn of(&self, layer: usize, expert: usize) -> usize {
        self.backups[layer][expert]
    }

    /// The experts of layer `layer` that `device` backs up.
    pub fn backed_up_by(&self, device: usize, layer: usize) -> Vec<usize> {
        (0..self.backups[layer].len()).filter(|&e| self.backups[layer][e] == device).collect()
    }

    /// Bytes each device sends per iteration to keep its experts' backups in step (an
    /// expert's reduced gradient each).
    pub fn sync_bytes(&self, sharding: &Sharding) -> Vec<u64> {
        let mut bytes = vec![0u64; self.devices];
        for l in 0..sharding.layers() {
            for &o in sharding.owners(l) {
                bytes[o] += sharding.expert_bytes(l);
            }
        }
        bytes
    }

    /// The chunk placement of layer `layer` that copies each owner's slot of an expert
    /// (`expert_len` elements, experts in order) to its backup: a spAG over it keeps the
    /// backups in step (of the reduced gradient after spRS, from which the backup takes
    /// the owner's optimizer step) or gives new backups the state (parameters, optimizer
    /// state) after a re-sharding.
    pub fn to_sparse(&self, sharding: &Sharding, layer: usize, expert_len: usize) -> crate::Result<Placement> {
        self.check(sharding)?;
        let owners = sharding.owners(layer).to_vec();
        let extra: Vec<Vec<usize>> = self.backups[layer].iter().map(|&b| vec![b]).collect();
        Placement::new(self.devices, vec![expert_len; owners.len()], owners)?.widen(&extra)
    }

    fn check(&self, sharding: &Sharding) -> Result<(), MoeError> {
        let fits = self.devices == sharding.devices()
            && self.backups.len() == sharding.layers()
            && (0..sharding.layers()).all(|l| self.backups[l].len() == sharding.owners(l).len());
        if fits {
            Ok(())
        } else {
            Err(MoeError::Invalid("the backups were planned for another sharding: plan them for this one".into()))
        }
    }
}

/// Plans a backup for every expert of `sharding`: a device other than its owner, on
/// another host when `hosts` are known and there is one (a host that fails whole then
/// loses no expert), and among those the one with the fewest backup bytes so far (then
/// the first after the owner, cyclically), so that the backups' memory is spread like
/// the owners'.
///
/// Needs at least two devices: with one, there is nowhere to keep a backup.
pub fn plan_backups(sharding: &Sharding, hosts: Option<&Hosts>) -> Result<Backups, MoeError> {
    let devices = sharding.devices();
    if devices < 2 {
        return Err(MoeError::Invalid("a backup needs a second device: run with at least 2".into()));
    }
    if let Some(h) = hosts {
        h.check(devices)?;
    }
    let host = |d: usize| hosts.map_or(d, |h| h.of(d));
    let mut load = vec![0u64; devices];
    let mut backups = Vec::with_capacity(sharding.layers());
    for l in 0..sharding.layers() {
        let size = sharding.expert_bytes(l);
        let layer: Vec<usize> = sharding
            .owners(l)
            .iter()
            .map(|&o| {
                let pick = (0..devices)
                    .filter(|&d| d != o)
                    .min_by_key(|&d| (host(d) == host(o), load[d], (d + devices - o) % devices))
                    .unwrap_or((o + 1) % devices);
                load[pick] += size;
                pick
            })
            .collect();
        backups.push(layer);
    }
    Ok(Backups { devices, backups })
}
