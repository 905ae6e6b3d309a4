//! Expert parallelism with FSSDP (fully sharded sparse data parallelism, Hecate): who
//! owns each expert, which devices hold a replica this iteration, where each token goes,
//! and what it all costs.
//!
//! Everything here is sans-IO planning, like [`crate::plan`] and [`crate::sched`]: pure
//! functions of their inputs, deterministic, with no sockets and no clock.
//!
//! - [`plan_sharding`]: the at-rest placement P. Every expert of every MoE layer gets
//!   exactly one owner (its parameters and optimizer state live there), balanced by
//!   memory across devices of unequal capacity; a device may own 0 to E experts of a
//!   layer.
//! - [`LoadPredictor`] and [`place`]: the per-iteration placement P′ ⊇ P from the
//!   predicted loads (the mean of the last 5 iterations' gate counts), the overlap degree
//!   `t` and the memory slots `m` (the reference's Algorithm 1), spreading replicas over
//!   hosts when the [`Hosts`] are known; [`calibrate`] re-plans from the gate's real
//!   output and says whether one more spAG on the critical path pays for itself.
//! - [`dispatch`]: every token routed to a device holding its expert, a local replica
//!   first, an expert's tokens split evenly across its replicas.
//! - [`simulate`]: per-device compute load (the straggler), traffic and memory over a
//!   load trace ([`zipf_trace`]) for FSSDP, for expert parallelism with a static owner
//!   (EP), and for FSDP (all-gather everything).
//!
//! - [`Sharding::moves_to`] and [`Sharding::transfer_placement`], [`plan_backups`] and
//!   [`Sharding::after_loss`]: what re-sharding moves and the spAG that moves it, a
//!   backup owner per expert (another host first), and the
//!   sharding the survivors take up from the backups when a device is lost.
//! - [`ExpertLayer`]: one layer's iteration over a [`crate::Communicator`]:
//!   `materialize` (spAG P → P′), `dispatch` and `combine` (all-to-all(v) of the
//!   tokens there and back) and `reduce_gradients` (spRS P′ → P), each blocking or
//!   started ([`ExpertLayer::materialize_start`] and the others: a handle whose `wait`
//!   gives the outcome and the buffer back, so the step overlaps compute), and
//!   re-materialisation ([`ExpertLayer::release_replicas`] after the forward,
//!   [`ExpertLayer::rematerialize_start`] before the backward).
//! - [`ReshardEvery`]: re-sharding every K iterations, from the predicted loads, with
//!   the state moved to the new owners ([`ReshardEvery::move_state`]).
//!
//! The reference's worked example (`../shared/reference/fssdp.md`, 2.6): 4 devices, 8
//! experts, two per device, loads 40, 5, 10, 5, 20, 5, 10, 5 and `t = m = 2`: e0 and e4,
//! the two hottest, are replicated on every device, which takes 6 expert transfers.
//!
//! ```
//! use phalanx::moe::{place, plan_sharding, MoeLayer, PlaceParams};
//! let sharding = plan_sharding(&[2, 2, 2, 2], &[MoeLayer::new(8, 1)])?;
//! assert_eq!(sharding.owners(0), &[0, 0, 1, 1, 2, 2, 3, 3]);
//! let loads = [40.0, 5.0, 10.0, 5.0, 20.0, 5.0, 10.0, 5.0];
//! let p = place(sharding.owners(0), 4, &loads, PlaceParams { overlap: 2, slots: 2 }, None)?;
//! assert_eq!(p.holders(0), &[0, 1, 2, 3]);
//! assert_eq!(p.holders(4), &[0, 1, 2, 3]);
//! assert_eq!(p.holders(1), &[0]);
//! assert_eq!(p.transfers(), 6);
//! # Ok::<(), phalanx::moe::MoeError>(())
//! ```
//!
//! Built so far (issue 13): the planners, the simulator, the layer's collectives
//! blocking and started, re-materialisation and re-sharding every K iterations, tested
//! over in-process peers, and backups kept in step by a spAG ([`Backups::to_sparse`])
//! so that training goes on through a lost device (`tests/moe_backup.rs`). The
//! worked example's 6 expert transfers are checked on the links' traffic counters
//! ([`crate::Communicator::traffic`]).

mod calibrate;
mod dispatch;
mod layer;
mod pending;
mod placement;
mod policy;
mod remat;
mod reshard;
mod shard;
mod simulate;
#[cfg(test)]
mod tests;

pub use calibrate::{calibrate, Calibration};
pub use dispatch::{dispatch, Dispatch, Route};
pub use layer::{Dispatched, ExpertLayer};
pub use pending::{AnyPendingStep, PendingCombine, PendingDispatch, PendingStep};
pub use placement::{place, proportional_slots, ExpertPlacement, LoadPredictor, PlaceParams, WINDOW};
pub use policy::ReshardEvery;
pub use remat::Released;
pub use reshard::{plan_backups, Backups, Move};
pub use shard::{plan_sharding, MoeLayer, Sharding};
pub use simulate::{simulate, zipf_trace, zipf_trace_shifting, SimConfig, SimReport, StrategyStats};

/// Device → host, for topology-aware placement and dispatch: `Hosts(vec![0, 0, 1, 1])`
/// says devices 0 and 1 share host 0 and devices 2 and 3 share host 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hosts(pub Vec<usize>);

impl Hosts {
    /// The host of `device`.
    pub fn of(&self, device: usize) -> usize {
        self.0[device]
    }

    /// Checks that there is one host per device.
    pub(crate) fn check(&self, devices: usize) -> Result<(), MoeError> {
        if self.0.len() != devices {
            return Err(MoeError::Shape { what: "hosts (one per device)", expected: devices, got: self.0.len() });
        }
        Ok(())
    }
}

/// Why an expert-parallel plan cannot be made from its inputs. Nothing was planned.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum MoeError {
    /// A parameter is outside what the planner supports.
    #[error("invalid expert-parallel parameters: {0}")]
    Invalid(String),
    /// An input has the wrong number of entries.
    #[error("{what}: expected {expected} entries, got {got}")]
    Shape {
        /// Which input.
        what: &'static str,
        /// How many entries it needs.
        expected: usize,
        /// How many it has.
        got: usize,
    },
    /// The experts need more memory than all devices together have.
    #[error("the experts need {need} bytes but the devices have {have} in all: add devices or memory, or shard fewer layers")]
    TotalCapacity {
        /// Bytes of all experts of all layers.
        need: u64,
        /// Bytes of all devices' capacities.
        have: u64,
    },
    /// An expert fits on no device (what is left of every device's capacity is smaller).
    #[error("expert {expert} of layer {layer} ({bytes} bytes) fits on no device: the most any device has left is {largest_free} bytes; give the devices more memory")]
    Capacity {
        /// The layer.
        layer: usize,
        /// The expert.
        expert: usize,
        /// Its size.
        bytes: u64,
        /// The largest free capacity of any device when it was placed.
        largest_free: u64,
    },
    /// A predicted or observed load is negative or not finite.
    #[error("load of expert {expert} is {value}: loads must be finite and at least 0")]
    Load {
        /// The expert.
        expert: usize,
        /// The load given.
        value: f64,
    },
    /// A device index names no device.
    #[error("{what} names device {device}, outside a group of {devices}")]
    Device {
        /// What named it.
        what: String,
        /// The device named.
        device: usize,
        /// The number of devices.
        devices: usize,
    },
}

impl From<MoeError> for crate::Error {
    fn from(e: MoeError) -> crate::Error {
        crate::Error::InvalidArgument(e.to_string())
    }
}

/// Checks that every load is finite and non-negative.
pub(crate) fn check_loads(loads: &[f64]) -> Result<(), MoeError> {
    match loads.iter().enumerate().find(|(_, l)| !l.is_finite() || **l < 0.0) {
        Some((expert, &value)) => Err(MoeError::Load { expert, value }),
        None => Ok(()),
    }
}
