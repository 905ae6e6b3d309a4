//! Expert parallelism (FSSDP) from C: the per-iteration placement P′ of one layer, as the
//! `holds` matrix that `phx_comm_sparse_all_gather` and `phx_comm_sparse_reduce_scatter`
//! take, and the simulator of EP, FSDP and FSSDP over a Zipf trace.

use std::ffi::c_int;

use phalanx::moe::{
    place, plan_sharding, simulate, zipf_trace, Hosts, MoeLayer, PlaceParams, SimConfig, StrategyStats,
};

use crate::args::{out_ptr, write_out};
use crate::sparse::slice;
use crate::status::{guard, invalid, null, Fail};

/// Plans P′ of one MoE layer for one iteration (the reference's Algorithm 1): expert `e`
/// is owned by device `owners[e]` and predicted to get `loads[e]` tokens; `overlap` is
/// the overlap degree t, `slots` the extra expert slots per device m. `hosts` is NULL or
/// gives each of the `n_devices` devices its host (replicas then spread over hosts).
/// Writes `holds[e * n_devices + d]` = 1 where device `d` holds expert `e` (its owner
/// included), 0 elsewhere: the `holds` matrix of the sparse collectives. On error
/// (`PHX_ERR_INVALID_ARGUMENT`, `PHX_ERR_NULL`) `holds` is unchanged. Thread-safe.
///
/// # Safety
/// `owners` and `loads` are readable for `n_experts` entries, `hosts` is NULL or
/// readable for `n_devices`, and `holds` is writable for `n_experts * n_devices` bytes.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_place(
    n_devices: usize,
    n_experts: usize,
    owners: *const usize,
    loads: *const f64,
    overlap: usize,
    slots: usize,
    hosts: *const usize,
    holds: *mut u8,
) -> c_int {
    guard(|| {
        let cells = n_experts.checked_mul(n_devices).ok_or_else(|| invalid("n_experts * n_devices overflows"))?;
        // SAFETY: the caller's contract on each array.
        let (owners, loads) = unsafe { (slice(owners, n_experts, "owners")?, slice(loads, n_experts, "loads")?) };
        let hosts = if hosts.is_null() {
            None
        } else {
            // SAFETY: non-NULL and readable for `n_devices` entries (the caller's contract).
            Some(Hosts(unsafe { slice(hosts, n_devices, "hosts") }?.to_vec()))
        };
        let p = place(owners, n_devices, loads, PlaceParams { overlap, slots }, hosts.as_ref())
            .map_err(|e| invalid(e.to_string()))?;
        if cells > 0 && holds.is_null() {
            return Err(null("holds"));
        }
        for e in 0..n_experts {
            for d in 0..n_devices {
                // SAFETY: `holds` is non-NULL (checked) and writable for `cells` bytes
                // (the caller's contract); `e * n_devices + d < cells`.
                unsafe { holds.add(e * n_devices + d).write(u8::from(p.holds(d, e))) };
            }
        }
        Ok::<(), Fail>(())
    })
}

/// One strategy's figures per iteration, averaged over the trace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct phx_moe_strategy {
    /// The most tokens one device computes (the straggler).
    pub straggler: f64,
    /// Bytes of parameters and their gradients received, all devices together.
    pub param_bytes: f64,
    /// Bytes of tokens and their gradients received, all devices together.
    pub token_bytes: f64,
    /// The most expert bytes one device holds at once.
    pub max_memory: f64,
}

/// What `phx_moe_simulate` measured, for each strategy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct phx_moe_sim_result {
    /// Expert parallelism with a static owner.
    pub ep: phx_moe_strategy,
    /// FSDP: every expert all-gathered, every gradient reduce-scattered.
    pub fsdp: phx_moe_strategy,
    /// FSSDP: the hot experts' replicas by spAG and spRS.
    pub fssdp: phx_moe_strategy,
}

fn strategy(s: &StrategyStats) -> phx_moe_strategy {
    phx_moe_strategy {
        straggler: s.straggler,
        param_bytes: s.param_bytes,
        token_bytes: s.token_bytes,
        max_memory: s.max_memory() as f64,
    }
}

/// Simulates one MoE layer of `n_experts` experts (each `expert_bytes`) over `n_devices`
/// equal devices (contiguous blocks of owners) for `iterations` iterations of `tokens`
/// tokens per device (each `token_bytes`), routed top-1 with Zipf(`zipf`) popularity
/// drawn from `seed`, under EP, FSDP and FSSDP with overlap degree `overlap` and
/// `slots` extra slots per device: what `phalanx moe-sim` prints. Writes `*out`; on
/// error names the bad argument (`PHX_ERR_INVALID_ARGUMENT`). Thread-safe.
///
/// # Safety
/// `out` is NULL (an error) or valid for a write of a `phx_moe_sim_result`.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_simulate(
    n_devices: usize,
    n_experts: usize,
    zipf: f64,
    tokens: u64,
    iterations: usize,
    overlap: usize,
    slots: usize,
    seed: u64,
    expert_bytes: u64,
    token_bytes: u64,
    out: *mut phx_moe_sim_result,
) -> c_int {
    guard(|| {
        let out = out_ptr(out, "out")?;
        if n_devices == 0 || n_experts == 0 || iterations == 0 {
            return Err(invalid("n_devices, n_experts and iterations must be at least 1"));
        }
        let capacity = (n_experts as u64).div_ceil(n_devices as u64).saturating_mul(expert_bytes);
        let sharding = plan_sharding(&vec![capacity; n_devices], &[MoeLayer::new(n_experts, expert_bytes)])
            .map_err(|e| invalid(e.to_string()))?;
        let trace =
            zipf_trace(n_devices, n_experts, zipf, tokens, iterations, seed).map_err(|e| invalid(e.to_string()))?;
        let config = SimConfig {
            params: PlaceParams { overlap, slots },
            expert_bytes,
            token_bytes,
            window: phalanx::moe::WINDOW,
            hosts: None,
            calibrate: None,
        };
        let r = simulate(&trace, sharding.owners(0), &config).map_err(|e| invalid(e.to_string()))?;
        let result = phx_moe_sim_result { ep: strategy(&r.ep), fsdp: strategy(&r.fsdp), fssdp: strategy(&r.fssdp) };
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, result) };
        Ok(())
    })
}
