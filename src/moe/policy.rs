//! Re-sharding every K iterations: [`ReshardEvery`] says when, plans the next
//! ownership from the predicted loads and the devices' memory, and
//! [`ReshardEvery::move_state`] moves each expert's parameters and optimizer state to
//! its new owner with one spAG per buffer ([`Sharding::transfer_placement`]).

use super::{plan_sharding, MoeError, MoeLayer, Move, Sharding};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::Communicator;

/// Re-shard every `k` iterations, over devices of `capacities` bytes each (as
/// [`plan_sharding`] takes them).
///
/// A training loop asks [`due`](Self::due) at the top of each iteration; when it is,
/// every device plans the same next sharding with [`plan`](Self::plan) from the same
/// predicted loads (a [`super::LoadPredictor`] per layer fed the gate's all-gathered
/// counts), moves the state with [`move_state`](Self::move_state), and goes on with the
/// new sharding. The reference re-shards about every 100 iterations.
///
/// ```
/// use phalanx::moe::{plan_sharding, MoeLayer, ReshardEvery};
/// let policy = ReshardEvery { k: 100, capacities: vec![64; 4] };
/// assert!(!policy.due(0) && policy.due(100) && !policy.due(150));
/// let now = plan_sharding(&policy.capacities, &[MoeLayer::new(8, 8)])?;
/// // Experts 0 and 1 turned hot: the next sharding puts them on different devices.
/// let loads = vec![Some(vec![40.0, 40.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0])];
/// let next = policy.plan(&now, &loads)?;
/// assert_eq!(now.owners(0)[..2], [0, 0]);
/// assert_ne!(next.owners(0)[0], next.owners(0)[1]);
/// # Ok::<(), phalanx::moe::MoeError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReshardEvery {
    /// Iterations between re-shardings (at least 1).
    pub k: usize,
    /// Each device's memory for experts, in bytes.
    pub capacities: Vec<u64>,
}

impl ReshardEvery {
    /// Whether iteration `iteration` (counted from 0) starts with a re-sharding: every
    /// `k`-th, never the first.
    pub fn due(&self, iteration: usize) -> bool {
        iteration > 0 && iteration % self.k.max(1) == 0
    }

    /// The next sharding of `now`'s layers (same experts and sizes) from each layer's
    /// predicted loads (`None` where none are known yet), by [`plan_sharding`].
    pub fn plan(&self, now: &Sharding, loads: &[Option<Vec<f64>>]) -> Result<Sharding, MoeError> {
        if loads.len() != now.layers() {
            return Err(MoeError::Shape {
                what: "predicted loads (one per layer)",
                expected: now.layers(),
                got: loads.len(),
            });
        }
        if self.capacities.len() != now.devices() {
            return Err(MoeError::Shape {
                what: "capacities (one per device)",
                expected: now.devices(),
                got: self.capacities.len(),
            });
        }
        let layers: Vec<MoeLayer> = (0..now.layers())
            .map(|l| {
                let layer = MoeLayer::new(now.owners(l).len(), now.expert_bytes(l));
                match &loads[l] {
                    Some(loads) => layer.with_loads(loads.clone()),
                    None => layer,
                }
            })
            .collect();
        plan_sharding(&self.capacities, &layers)
    }

    /// Moves layer `layer`'s state from `now`'s owners to `next`'s: each buffer of
    /// `buffers` (the parameters, then each optimizer-state buffer, every expert's slot
    /// at the same offsets, experts in order, as [`super::ExpertLayer`] lays them out)
    /// goes through one spAG over [`Sharding::transfer_placement`], after which each
    /// expert's slot on its next owner holds its current owner's bytes. Every device
    /// calls it with the same shardings and buffers of the same lengths; returns the
    /// moves made.
    ///
    /// On error the caller keeps `now`: the slots of the experts each device owns under
    /// `now` are unchanged (only slots of experts it did not own may have been written).
    pub fn move_state<T: Element>(
        &self,
        comm: &mut Communicator,
        now: &Sharding,
        next: &Sharding,
        layer: usize,
        buffers: &mut [&mut [T]],
    ) -> Result<Vec<Move>> {
        let experts = now.owners(layer).len();
        let len = buffers.first().map_or(0, |b| b.len());
        if experts == 0 || len % experts != 0 || buffers.iter().any(|b| b.len() != len) {
            return Err(Error::InvalidArgument(format!(
                "state buffers of {:?} elements for a layer of {experts} experts: give buffers of equal length, a slot per expert",
                buffers.iter().map(|b| b.len()).collect::<Vec<_>>()
            )));
        }
        let placement = now.transfer_placement(next, layer, len / experts)?;
        for buf in buffers.iter_mut() {
            comm.sparse_all_gather(&placement, buf)?;
        }
        Ok(now.moves_to(next)?.into_iter().filter(|m| m.layer == layer).collect())
    }
}
