//! The C ABI of phalanx (`include/phalanx.h`, generated from this file by cbindgen).
//!
//! Conventions, the same for every function:
//!
//! - Every function returns an `int` status (`PHX_OK` or a `PHX_ERR_*` code) and passes
//!   results through out-pointers, except `phx_version`, `phx_last_error` and
//!   `phx_status_name`, which cannot fail.
//! - After a failed call, `phx_last_error()` describes it (thread-local).
//! - No panic crosses the boundary: a panic becomes `PHX_ERR_PANIC`.
//! - Element types, operators and sync strategies cross as `int` codes checked against
//!   the known values (`PHX_DTYPE_*`, `PHX_OP_*`, `PHX_SYNC_*`).
//! - Every pointer is checked for NULL (`PHX_ERR_NULL`); buffer pointers may be NULL
//!   when their element count is 0. `_free` functions accept NULL.
//!
//! One file per area (listed below); cbindgen reads them all from here.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks, missing_docs)]
#![allow(non_camel_case_types)]

// cbindgen reads each module's items before the next module's, so the order of these
// declarations is the header's order; the comments between them keep rustfmt from
// sorting them.
// Version, status codes, the thread-local last error and `guard`.
mod status;
// Codes of dtypes, operators and sync strategies; pointer and argument checks.
mod args;
// `phx_master_*`.
mod master;
// Connecting, leaving, and what a communicator knows about its group.
mod comm;
// Blocking collectives over the whole group.
mod collectives;
// The non-blocking all-reduce (`phx_pending`).
mod pending;
// Non-blocking point-to-point messages (`phx_request`).
mod request;
// Shared state (`phx_state`) and its sync.
mod state;
// Sparse collectives and all-to-all.
pub mod sparse;
// Sub-group collectives and point-to-point messages.
mod group;
// Quantized all-reduce.
mod quant;
// Scans.
pub mod scan;
// Pipeline schedules.
mod sched;
// The pipeline runner (`phx_pipeline_runner`) with C callbacks.
mod pipeline;
// A grid of pipelines, post-validation and commit-or-none (`phx_grid_map`, `phx_committer`).
mod pipeline_grid;
// Expert parallelism (FSSDP): placement and simulator.
mod moe;
// The FSSDP layer (`phx_moe_layer`, `phx_moe_dispatched`).
mod moe_layer;
// The layer's started steps and re-materialisation (`phx_moe_step`).
mod moe_started;
// The layer's started token exchanges (`phx_moe_dispatch_request`, `phx_moe_combine_request`).
mod moe_exchange;
// Sharding, backups, the sharding after a loss, and re-sharding's state move.
mod moe_shard;
// Link traffic counters (`phx_comm_traffic`).
mod traffic;
// Byte buffers seen as typed slices, aligned or not (`by_width!`).
mod typed;
// Device (GPU) communicators: NCCL, or the CPU stand-in (`phx_device_comm`).
mod device;
// The other device collectives (reduce-scatter, all-gather, broadcast, reduce,
// send/recv, all-to-all) on `phx_device_comm`.
mod device_collectives;

pub use args::*;
pub use collectives::*;
pub use comm::*;
pub use device::*;
pub use device_collectives::*;
pub use master::*;
pub use moe::{phx_moe_place, phx_moe_sim_result, phx_moe_simulate, phx_moe_strategy};
pub use moe_exchange::*;
pub use moe_layer::*;
pub use moe_shard::*;
pub use moe_started::*;
pub use pending::*;
pub use pipeline::*;
pub use pipeline_grid::*;
pub use quant::{phx_comm_all_reduce_quantized, PHX_QUANT_U16, PHX_QUANT_U8};
pub use request::*;
pub use sched::{phx_pipeline_result, phx_pipeline_simulate};
pub use state::*;
pub use status::*;
pub use traffic::*;

#[cfg(test)]
mod tests {
    use super::*;

    /// The handles' documented threading promises hold.
    #[test]
    fn handles_are_send() {
        fn send<T: Send>() {}
        send::<phx_master>();
        send::<phx_comm>();
        send::<phx_pending>();
        send::<phx_request>();
        send::<phx_state>();
        send::<phx_moe_layer>();
        send::<phx_device_comm>();
        send::<phx_moe_dispatched>();
        send::<phx_pipeline_runner>();
    }
}
