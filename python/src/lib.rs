//! Python bindings of phalanx: the compiled module `phalanx._native`, re-exported by the
//! Python package `phalanx` (see `phalanx/__init__.pyi` for the typed API).
//!
//! Collectives work in place on the caller's memory (numpy arrays, DLPack tensors,
//! buffer-protocol objects): the array's bytes go to the core's `*_raw` calls without a
//! copy, and the GIL is released while the collective runs.
//!
//! One file per class or family: `errors` (exceptions), `args`, `master`,
//! `communicator` (with `AllReduceHandle`), `state` (with `SyncReport`), `array` (the
//! zero-copy view of Python arrays, with `dlpack` reading DLPack capsules of CPU and CUDA
//! memory), `device` (`DeviceCommunicator`, with `device_call` the body of its
//! collectives), and the collective families `scan`, `group`,
//! `quant`, `sparse` and `p2p` (with `P2pRequest`) that `Communicator`'s methods delegate
//! to; `sched`, pipeline schedules; `pipeline`, the pipeline runner (`PipelineRunner`,
//! `PipelineStep`); `pipeline_grid`, a grid of pipelines and its commit-or-none step
//! (`PipelineGrid`, `PipelineCommitter`); `moe`, expert placement and the FSSDP simulator; `moe_layer`, the
//! FSSDP layer (`ExpertLayer`, `Dispatched`), with `moe_started` its started steps
//! (`MoeStepHandle`), `moe_exchange` its started token exchanges (`DispatchHandle`,
//! `CombineHandle`) and re-materialisation (`ReleasedReplicas`); `moe_shard`, sharding, re-sharding and
//! backups (`Sharding`, `Backups`, `LoadPredictor`, `ReshardEvery`); `traffic`, the link
//! counters of `Communicator.traffic()` (`Traffic`).

mod args;
mod array;
mod communicator;
mod device;
mod device_call;
mod dlpack;
mod errors;
mod group;
mod handle;
mod master;
mod moe;
mod moe_exchange;
mod moe_layer;
mod moe_shard;
mod moe_started;
mod p2p;
mod pipeline;
mod pipeline_grid;
mod quant;
mod scan;
mod sched;
mod sparse;
mod state;
mod traffic;
mod typed;

use std::time::Instant;

use phalanx::ReduceOp;
use pyo3::prelude::*;

use crate::communicator::{AllReduceHandle, Communicator};
use crate::master::Master;
use crate::state::{SharedState, SyncReport};

/// Benchmark helper (not API): `iters` all-reduces (f32 sum) of `nbytes` bytes of zeros
/// run entirely in Rust on `comm`, the GIL released; returns each one's seconds. The same
/// loop as a Python caller's, minus Python, for side-by-side timing.
#[pyfunction]
fn _bench_all_reduce_rust(
    py: Python<'_>,
    comm: &Bound<'_, Communicator>,
    nbytes: usize,
    iters: usize,
) -> PyResult<Vec<f64>> {
    comm.get().with(py, move |c| {
        let mut buf = vec![0f32; nbytes / 4]; // zeros stay zeros: no overflow, no denormals
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t = Instant::now();
            c.all_reduce(&mut buf, ReduceOp::Sum)?;
            times.push(t.elapsed().as_secs_f64());
        }
        Ok(times)
    })
}

/// phalanx: fault-tolerant collective communication (compiled part; import `phalanx`).
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Master>()?;
    m.add_class::<Communicator>()?;
    m.add_class::<AllReduceHandle>()?;
    m.add_class::<p2p::P2pRequest>()?;
    m.add_class::<SharedState>()?;
    m.add_class::<SyncReport>()?;
    m.add_class::<moe_layer::ExpertLayer>()?;
    m.add_class::<moe_layer::Dispatched>()?;
    m.add_class::<moe_started::MoeStepHandle>()?;
    m.add_class::<moe_exchange::DispatchHandle>()?;
    m.add_class::<moe_exchange::CombineHandle>()?;
    m.add_class::<moe_started::ReleasedReplicas>()?;
    m.add_class::<traffic::Traffic>()?;
    m.add_class::<pipeline::PipelineRunner>()?;
    m.add_class::<pipeline::PipelineStep>()?;
    m.add_class::<device::DeviceCommunicator>()?;
    m.add_class::<pipeline_grid::PipelineGrid>()?;
    m.add_class::<pipeline_grid::PipelineCommitter>()?;
    errors::register(m)?;
    m.add_function(wrap_pyfunction!(_bench_all_reduce_rust, m)?)?;
    m.add_function(wrap_pyfunction!(dlpack::_dlpack_cuda_view, m)?)?;
    m.add_function(wrap_pyfunction!(sched::pipeline_schedule, m)?)?;
    m.add_function(wrap_pyfunction!(moe::moe_place, m)?)?;
    m.add_function(wrap_pyfunction!(moe::moe_simulate, m)?)?;
    sparse::register(m)?;
    moe_shard::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
