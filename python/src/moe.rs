//! Expert parallelism (FSSDP) from Python: `phalanx.moe_place`, the per-iteration
//! placement P′ of one layer as the `holders` lists that `Communicator.sparse_all_gather`
//! and `sparse_reduce_scatter` take, and `phalanx.moe_simulate`, the simulator of EP,
//! FSDP and FSSDP over a Zipf trace (what `phalanx moe-sim` prints).

use phalanx::moe::{
    place, plan_sharding, simulate, zipf_trace, Hosts, MoeLayer, PlaceParams, SimConfig, StrategyStats,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

fn bad(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// Plans P′ of one MoE layer for one iteration (the reference's Algorithm 1).
///
/// Args:
///     owners: the owner device of each expert.
///     loads: each expert's predicted tokens (say, the mean of the last 5 iterations).
///     overlap: the overlap degree t.
///     slots: the extra expert slots per device m.
///     devices: the number of devices (default: one past the largest owner).
///     hosts: each device's host, if known (replicas then spread over hosts).
///
/// Returns, per expert, the devices holding it (ascending, its owner included): the
/// `holders` argument of `Communicator.sparse_all_gather`. Raises ValueError for inputs
/// no placement fits (an owner outside the group, a negative load, ...).
#[pyfunction]
#[pyo3(signature = (owners, loads, overlap, slots, *, devices = None, hosts = None))]
pub(crate) fn moe_place(
    owners: Vec<usize>,
    loads: Vec<f64>,
    overlap: usize,
    slots: usize,
    devices: Option<usize>,
    hosts: Option<Vec<usize>>,
) -> PyResult<Vec<Vec<usize>>> {
    let devices = devices.unwrap_or_else(|| owners.iter().max().map_or(0, |&o| o + 1));
    let hosts = hosts.map(Hosts);
    let p = place(&owners, devices, &loads, PlaceParams { overlap, slots }, hosts.as_ref()).map_err(bad)?;
    Ok((0..owners.len()).map(|e| p.holders(e).to_vec()).collect())
}

fn stats<'py>(py: Python<'py>, s: &StrategyStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("straggler", s.straggler)?;
    d.set_item("param_bytes", s.param_bytes)?;
    d.set_item("token_bytes", s.token_bytes)?;
    d.set_item("compute", s.compute.clone())?;
    d.set_item("traffic", s.traffic.clone())?;
    d.set_item("memory", s.memory.clone())?;
    Ok(d)
}

/// Simulates one MoE layer over equal devices (contiguous blocks of owners) under
/// expert parallelism with a static owner (EP), FSDP and FSSDP, for a top-1 trace with
/// Zipf(`zipf`) popularity drawn from `seed`.
///
/// Returns a dict with `ep`, `fsdp` and `fssdp`, each a dict of per-iteration means:
/// `straggler` (the most tokens one device computes), `param_bytes` and `token_bytes`
/// (received, all devices together), and per device `compute`, `traffic` (bytes) and
/// `memory` (peak expert bytes); and the ratios `straggler_ratio` (FSSDP over EP) and
/// `traffic_ratio` (FSSDP over FSDP). Raises ValueError for impossible parameters.
#[pyfunction]
#[pyo3(signature = (*, devices = 8, experts = 32, zipf = 1.2, tokens = 4096, iterations = 20, overlap = 2, slots = 2, seed = 1, expert_bytes = 16 << 20, token_bytes = 2048))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn moe_simulate<'py>(
    py: Python<'py>,
    devices: usize,
    experts: usize,
    zipf: f64,
    tokens: u64,
    iterations: usize,
    overlap: usize,
    slots: usize,
    seed: u64,
    expert_bytes: u64,
    token_bytes: u64,
) -> PyResult<Bound<'py, PyDict>> {
    if devices == 0 || experts == 0 || iterations == 0 {
        return Err(PyValueError::new_err("devices, experts and iterations must be at least 1"));
    }
    let capacity = (experts as u64).div_ceil(devices as u64).saturating_mul(expert_bytes);
    let sharding = plan_sharding(&vec![capacity; devices], &[MoeLayer::new(experts, expert_bytes)]).map_err(bad)?;
    let trace = zipf_trace(devices, experts, zipf, tokens, iterations, seed).map_err(bad)?;
    let config = SimConfig {
        params: PlaceParams { overlap, slots },
        expert_bytes,
        token_bytes,
        window: phalanx::moe::WINDOW,
        hosts: None,
        calibrate: None,
    };
    let r = py.detach(|| simulate(&trace, sharding.owners(0), &config)).map_err(bad)?;
    let out = PyDict::new(py);
    out.set_item("ep", stats(py, &r.ep)?)?;
    out.set_item("fsdp", stats(py, &r.fsdp)?)?;
    out.set_item("fssdp", stats(py, &r.fssdp)?)?;
    out.set_item("straggler_ratio", r.straggler_ratio())?;
    out.set_item("traffic_ratio", r.traffic_ratio())?;
    Ok(out)
}
