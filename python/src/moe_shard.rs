//! Sharding of expert parallelism (FSSDP) from Python: the at-rest owners of every
//! expert (`plan_sharding`, `Sharding`), re-sharding (`Sharding.moves_to`,
//! `ReshardEvery` with its state move), backup owners (`plan_backups`, `Backups`), the
//! sharding after a device is lost (`Sharding.after_loss`) and the load predictor
//! (`LoadPredictor`). Thin wrappers over `phalanx::moe`; its errors are ValueError.

use phalanx::moe::{
    plan_backups as core_plan_backups, plan_sharding as core_plan_sharding, Backups as CoreBackups, Hosts,
    LoadPredictor as CorePredictor, MoeLayer, ReshardEvery as CoreReshard, Sharding as CoreSharding,
};
use phalanx::plan::sparse::Placement;
use phalanx::Error;
use pyo3::exceptions::{PyIndexError, PyValueError};
use pyo3::prelude::*;

use crate::array::array as array_ref;
use crate::communicator::Communicator;

fn bad(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// One move as Python sees it: (layer, expert, from, to).
type PyMove = (usize, usize, usize, usize);

/// Each chunk's holders of `p` (its owner included, ascending): the `holders` argument
/// of `Communicator.sparse_all_gather`.
fn holders(p: &Placement, chunks: usize) -> Vec<Vec<usize>> {
    (0..chunks).map(|c| p.holders(c).to_vec()).collect()
}

/// The sharded placement P: the owner of every expert of every MoE layer.
///
/// Make one with `plan_sharding(capacities, layers)`, or give it outright:
/// `Sharding(devices, owners, expert_bytes)`, `owners[l][e]` owning expert `e` of layer
/// `l`, each expert of layer `l` being `expert_bytes[l]` bytes.
#[pyclass(frozen, module = "phalanx")]
pub(crate) struct Sharding {
    pub(crate) inner: CoreSharding,
}

impl Sharding {
    fn check_layer(&self, layer: usize) -> PyResult<()> {
        if layer < self.inner.layers() {
            Ok(())
        } else {
            Err(PyIndexError::new_err(format!("layer {layer} of a sharding of {} layers", self.inner.layers())))
        }
    }
}

#[pymethods]
impl Sharding {
    #[new]
    fn new(devices: usize, owners: Vec<Vec<usize>>, expert_bytes: Vec<u64>) -> PyResult<Self> {
        Ok(Sharding { inner: CoreSharding::from_owners(devices, owners, expert_bytes).map_err(bad)? })
    }

    /// The number of devices.
    #[getter]
    fn devices(&self) -> usize {
        self.inner.devices()
    }

    /// The number of MoE layers.
    #[getter]
    fn layers(&self) -> usize {
        self.inner.layers()
    }

    /// The owner of each expert of layer `layer`.
    fn owners(&self, layer: usize) -> PyResult<Vec<usize>> {
        self.check_layer(layer)?;
        Ok(self.inner.owners(layer).to_vec())
    }

    /// Bytes of one expert of layer `layer`.
    fn expert_bytes(&self, layer: usize) -> PyResult<u64> {
        self.check_layer(layer)?;
        Ok(self.inner.expert_bytes(layer))
    }

    /// The experts of layer `layer` that `device` owns, ascending.
    fn owned(&self, device: usize, layer: usize) -> PyResult<Vec<usize>> {
        self.check_layer(layer)?;
        Ok(self.inner.owned(device, layer))
    }

    /// Bytes `device` keeps at rest: its experts of every layer.
    fn memory(&self, device: usize) -> u64 {
        self.inner.memory(device)
    }

    /// The moves that turn this sharding into `next` (same devices, layers and
    /// experts), by layer then expert, as (layer, expert, from, to) tuples.
    fn moves_to(&self, next: &Sharding) -> PyResult<Vec<PyMove>> {
        let moves = self.inner.moves_to(&next.inner).map_err(bad)?;
        Ok(moves.into_iter().map(|m| (m.layer, m.expert, m.from, m.to)).collect())
    }

    /// The holders, per expert of layer `layer`, of the spAG that re-sharding to `next`
    /// runs: each expert's current owner and, where it moves, its next owner. With
    /// `lens = [expert_len] * experts` and `owners = self.owners(layer)`,
    /// `Communicator.sparse_all_gather` over them moves each buffer's state.
    fn transfer_holders(&self, next: &Sharding, layer: usize) -> PyResult<Vec<Vec<usize>>> {
        self.check_layer(layer)?;
        let p = self.inner.transfer_placement(&next.inner, layer, 1).map_err(bad)?;
        Ok(holders(&p, self.inner.owners(layer).len()))
    }

    /// The sharding the survivors take up when device `lost` is gone: each of its
    /// experts goes to its backup (`backups`, planned for this sharding), and the
    /// devices after `lost` move down by one (as ranks do when a peer leaves).
    fn after_loss(&self, lost: usize, backups: &Backups) -> PyResult<Sharding> {
        Ok(Sharding { inner: self.inner.after_loss(lost, &backups.inner).map_err(bad)? })
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other.cast::<Sharding>().is_ok_and(|o| o.get().inner == self.inner)
    }

    fn __repr__(&self) -> String {
        let owners: Vec<&[usize]> = (0..self.inner.layers()).map(|l| self.inner.owners(l)).collect();
        format!("Sharding(devices={}, owners={owners:?})", self.inner.devices())
    }
}

/// Plans the sharded placement P: every expert of every layer gets one owner, each
/// device's share of the experts' bytes in proportion to its capacity.
///
/// Args:
///     capacities: each device's memory for experts, in bytes.
///     layers: per MoE layer, (experts, expert_bytes) or (experts, expert_bytes, loads)
///         with each expert's expected load (the planner then spreads hot experts).
///
/// Raises ValueError when the experts do not fit or an input is malformed.
#[pyfunction]
pub(crate) fn plan_sharding(capacities: Vec<u64>, layers: Vec<Bound<'_, PyAny>>) -> PyResult<Sharding> {
    let layers = layers
        .iter()
        .map(|l| {
            if let Ok((experts, bytes, loads)) = l.extract::<(usize, u64, Option<Vec<f64>>)>() {
                let layer = MoeLayer::new(experts, bytes);
                Ok(match loads {
                    Some(loads) => layer.with_loads(loads),
                    None => layer,
                })
            } else {
                let (experts, bytes) = l.extract::<(usize, u64)>().map_err(|_| {
                    PyValueError::new_err("each layer is (experts, expert_bytes) or (experts, expert_bytes, loads)")
                })?;
                Ok(MoeLayer::new(experts, bytes))
            }
        })
        .collect::<PyResult<Vec<_>>>()?;
    Ok(Sharding { inner: core_plan_sharding(&capacities, &layers).map_err(bad)? })
}

/// A backup owner for every expert: a second device that keeps the expert's
/// parameters and optimizer state in step with its owner. Make one with
/// `plan_backups(sharding)`.
#[pyclass(frozen, module = "phalanx")]
pub(crate) struct Backups {
    inner: CoreBackups,
    /// Experts per layer of the sharding they were planned for (bounds of `of`).
    experts: Vec<usize>,
}

#[pymethods]
impl Backups {
    /// The backup of expert `expert` of layer `layer`.
    fn of(&self, layer: usize, expert: usize) -> PyResult<usize> {
        match self.experts.get(layer) {
            Some(&n) if expert < n => Ok(self.inner.of(layer, expert)),
            _ => Err(PyIndexError::new_err(format!("expert {expert} of layer {layer}: no such expert"))),
        }
    }

    /// The backups of layer `layer`'s experts, in order.
    fn layer(&self, layer: usize) -> PyResult<Vec<usize>> {
        match self.experts.get(layer) {
            Some(&n) => Ok((0..n).map(|e| self.inner.of(layer, e)).collect()),
            None => Err(PyIndexError::new_err(format!("layer {layer} of {}", self.experts.len()))),
        }
    }

    /// The experts of layer `layer` that `device` backs up.
    fn backed_up_by(&self, device: usize, layer: usize) -> PyResult<Vec<usize>> {
        if layer >= self.experts.len() {
            return Err(PyIndexError::new_err(format!("layer {layer} of {}", self.experts.len())));
        }
        Ok(self.inner.backed_up_by(device, layer))
    }

    /// Bytes each device sends per iteration to keep its experts' backups in step.
    fn sync_bytes(&self, sharding: &Sharding) -> Vec<u64> {
        self.inner.sync_bytes(&sharding.inner)
    }

    /// The holders, per expert of layer `layer`, of the spAG that copies each owner's
    /// slot to its backup (owner and backup): with `owners = sharding.owners(layer)`,
    /// `Communicator.sparse_all_gather` over them keeps the backups in step.
    fn holders(&self, sharding: &Sharding, layer: usize) -> PyResult<Vec<Vec<usize>>> {
        sharding.check_layer(layer)?;
        let p = self.inner.to_sparse(&sharding.inner, layer, 1).map_err(bad)?;
        Ok(holders(&p, sharding.inner.owners(layer).len()))
    }

    fn __repr__(&self) -> String {
        let layers: Vec<Vec<usize>> =
            (0..self.experts.len()).map(|l| (0..self.experts[l]).map(|e| self.inner.of(l, e)).collect()).collect();
        format!("Backups({layers:?})")
    }
}

/// Plans a backup for every expert of `sharding`: a device other than its owner, on
/// another host when `hosts` (each device's host) are given and there is one, spread
/// so that the backups' memory is balanced like the owners'. Needs 2 devices or more.
#[pyfunction]
#[pyo3(signature = (sharding, *, hosts = None))]
pub(crate) fn plan_backups(sharding: &Sharding, hosts: Option<Vec<usize>>) -> PyResult<Backups> {
    let hosts = hosts.map(Hosts);
    let inner = core_plan_backups(&sharding.inner, hosts.as_ref()).map_err(bad)?;
    let experts = (0..sharding.inner.layers()).map(|l| sharding.inner.owners(l).len()).collect();
    Ok(Backups { inner, experts })
}

/// Predicts each expert's load as the mean of the gate's counts over the last
/// `window` iterations (default 5, the reference's).
#[pyclass(module = "phalanx")]
pub(crate) struct LoadPredictor {
    inner: CorePredictor,
}

#[pymethods]
impl LoadPredictor {
    #[new]
    #[pyo3(signature = (experts, window = None))]
    fn new(experts: usize, window: Option<usize>) -> PyResult<Self> {
        let inner = match window {
            Some(w) => CorePredictor::with_window(experts, w).map_err(bad)?,
            None => CorePredictor::new(experts),
        };
        Ok(LoadPredictor { inner })
    }

    /// Feeds one iteration's gate counts (tokens per expert, summed over devices).
    fn observe(&mut self, counts: Vec<f64>) -> PyResult<()> {
        self.inner.observe(&counts).map_err(bad)
    }

    /// The mean load of each expert over the window, or None before any observation.
    fn predict(&self) -> Option<Vec<f64>> {
        self.inner.predict()
    }
}

/// Re-shard every `k` iterations over devices of `capacities` bytes each.
///
/// Each iteration ask `due(it)`; when due, every device plans the same next sharding
/// with `plan(now, loads)` (loads per layer from a `LoadPredictor`, None where unknown)
/// and moves each layer's state with `move_state`.
#[pyclass(frozen, module = "phalanx")]
pub(crate) struct ReshardEvery {
    inner: CoreReshard,
}

#[pymethods]
impl ReshardEvery {
    #[new]
    fn new(k: usize, capacities: Vec<u64>) -> PyResult<Self> {
        if k == 0 {
            return Err(PyValueError::new_err("re-sharding every 0 iterations: give k of at least 1"));
        }
        Ok(ReshardEvery { inner: CoreReshard { k, capacities } })
    }

    /// Iterations between re-shardings.
    #[getter]
    fn k(&self) -> usize {
        self.inner.k
    }

    /// Each device's memory for experts, in bytes.
    #[getter]
    fn capacities(&self) -> Vec<u64> {
        self.inner.capacities.clone()
    }

    /// Whether iteration `iteration` (from 0) starts with a re-sharding: every k-th,
    /// never the first.
    fn due(&self, iteration: usize) -> bool {
        self.inner.due(iteration)
    }

    /// The next sharding of `now`'s layers from each layer's predicted loads (a list,
    /// one entry per layer, None where none are known).
    fn plan(&self, now: &Sharding, loads: Vec<Option<Vec<f64>>>) -> PyResult<Sharding> {
        Ok(Sharding { inner: self.inner.plan(&now.inner, &loads).map_err(bad)? })
    }

    /// Moves layer `layer`'s state from `now`'s owners to `next`'s on `comm`: each array
    /// of `buffers` (the parameters, then each optimizer-state buffer: one slot per
    /// expert, experts in order, all of one length) goes through one spAG, after which
    /// each expert's slot on its next owner holds its current owner's bytes. Every
    /// device calls it alike. Returns the layer's moves as (layer, expert, from, to).
    ///
    /// On error the slots of the experts this device owns under `now` are unchanged.
    fn move_state(
        &self,
        py: Python<'_>,
        comm: &Bound<'_, Communicator>,
        now: &Sharding,
        next: &Sharding,
        layer: usize,
        buffers: Vec<Bound<'_, PyAny>>,
    ) -> PyResult<Vec<PyMove>> {
        now.check_layer(layer)?;
        let experts = now.inner.owners(layer).len();
        let arrays = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| array_ref(b, &format!("buffers[{i}]"), true))
            .collect::<PyResult<Vec<_>>>()?;
        let lens: Vec<usize> = arrays.iter().map(|a| a.len / a.dtype.size()).collect();
        let len = lens.first().copied().unwrap_or(0);
        if experts == 0 || len % experts != 0 || lens.iter().any(|&l| l != len) {
            return Err(PyValueError::new_err(format!(
                "state buffers of {lens:?} elements for a layer of {experts} experts: give arrays of equal length, a slot per expert"
            )));
        }
        for (i, a) in arrays.iter().enumerate() {
            if arrays[..i].iter().any(|b| b.raw().overlaps(a.raw())) {
                return Err(PyValueError::new_err(format!(
                    "buffers[{i}] overlaps an earlier buffer: give distinct arrays"
                )));
            }
        }
        let p = now.inner.transfer_placement(&next.inner, layer, len / experts).map_err(bad)?;
        let raws: Vec<_> = arrays.iter().map(|a| (a.raw(), a.dtype)).collect();
        comm.get().with(py, move |c| {
            for (raw, dtype) in raws {
                // SAFETY: `arrays` outlives the call and the buffers do not overlap
                // (checked), so each slice is the only one of its memory.
                c.sparse_all_gather_raw(&p, unsafe { raw.as_mut_slice() }, dtype)?;
            }
            Ok::<(), Error>(())
        })?;
        drop(arrays);
        let moves = now.inner.moves_to(&next.inner).map_err(bad)?;
        Ok(moves.into_iter().filter(|m| m.layer == layer).map(|m| (m.layer, m.expert, m.from, m.to)).collect())
    }
}

/// Registers this file's classes and functions in the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Sharding>()?;
    m.add_class::<Backups>()?;
    m.add_class::<LoadPredictor>()?;
    m.add_class::<ReshardEvery>()?;
    m.add_function(wrap_pyfunction!(plan_sharding, m)?)?;
    m.add_function(wrap_pyfunction!(plan_backups, m)?)?;
    Ok(())
}
