//! Sharding of expert parallelism (FSSDP) from C: the at-rest owners of every expert
//! (`phx_moe_plan_sharding`), backup owners (`phx_moe_plan_backups`), the sharding the
//! survivors take up after a loss (`phx_moe_after_loss`), and the state move of a
//! re-sharding (`phx_moe_reshard_move`). Thin wrappers over `phalanx::moe`.
//!
//! A sharding crosses the ABI flattened: `n_layers` layers, layer `l` of `experts[l]`
//! experts of `expert_bytes[l]` bytes each, and `owners` (likewise `backups`) holding
//! the owner of every expert, layer 0's experts first: `sum(experts)` entries.

use std::ffi::{c_int, c_void};

use phalanx::moe::{plan_backups, plan_sharding, Backups, Hosts, MoeLayer, Sharding};

use crate::args::{bytes_mut, dtype, handle_mut, write_out};
use crate::comm::phx_comm;
use crate::sparse::slice;
use crate::status::{guard, invalid, null, Fail};

/// The layers' expert counts and sizes, and the total number of experts.
///
/// # Safety
/// `experts` and `expert_bytes` are NULL or readable for `n_layers` entries.
unsafe fn layers<'a>(
    n_layers: usize,
    experts: *const usize,
    expert_bytes: *const u64,
) -> Result<(&'a [usize], &'a [u64], usize), Fail> {
    // SAFETY: the caller's contract on each array.
    let (experts, bytes) =
        unsafe { (slice(experts, n_layers, "experts")?, slice(expert_bytes, n_layers, "expert_bytes")?) };
    let total = experts
        .iter()
        .try_fold(0usize, |a, &n| a.checked_add(n))
        .ok_or_else(|| invalid("the experts of all layers overflow"))?;
    Ok((experts, bytes, total))
}

/// `flat` (one entry per expert, layer 0 first) cut into layers of `experts[l]`.
fn split(flat: &[usize], experts: &[usize]) -> Vec<Vec<usize>> {
    let mut at = 0;
    experts
        .iter()
        .map(|&n| {
            let v = flat[at..at + n].to_vec();
            at += n;
            v
        })
        .collect()
}

/// The sharding given flattened (see the module docs).
///
/// # Safety
/// The arrays are NULL or readable: `experts` and `expert_bytes` for `n_layers`
/// entries, `owners` for `sum(experts)`.
unsafe fn sharding(
    n_devices: usize,
    n_layers: usize,
    experts: *const usize,
    expert_bytes: *const u64,
    owners: *const usize,
) -> Result<(Sharding, Vec<usize>), Fail> {
    // SAFETY: the caller's contract.
    let (experts, bytes, total) = unsafe { layers(n_layers, experts, expert_bytes) }?;
    // SAFETY: readable for `sum(experts)` entries (the caller's contract).
    let owners = unsafe { slice(owners, total, "owners") }?;
    let s =
        Sharding::from_owners(n_devices, split(owners, experts), bytes.to_vec()).map_err(|e| invalid(e.to_string()))?;
    Ok((s, experts.to_vec()))
}

/// Writes `values` to `out`, which must be non-NULL when there is anything to write.
///
/// # Safety
/// `out` is NULL or writable for `values.len()` entries.
unsafe fn write_all(out: *mut usize, values: impl ExactSizeIterator<Item = usize>, what: &str) -> Result<(), Fail> {
    if values.len() > 0 && out.is_null() {
        return Err(null(what));
    }
    for (i, v) in values.enumerate() {
        // SAFETY: non-NULL (checked) and writable for `values.len()` entries (the
        // caller's contract); `i` is below that.
        unsafe { out.add(i).write(v) };
    }
    Ok(())
}

/// Plans the sharded placement P: every expert of every layer one owner, each of the
/// `n_devices` devices' share of the experts' bytes in proportion to `capacities[d]`
/// (bytes). Layer `l` has `experts[l]` experts of `expert_bytes[l]` bytes; `loads` is
/// NULL or gives every expert's expected load (flattened as `owners`), and the planner
/// then spreads hot experts. Writes `owners_out`, `sum(experts)` entries, layer 0's
/// experts first. On error (`PHX_ERR_INVALID_ARGUMENT`: the experts do not fit, a bad
/// load, ...; `PHX_ERR_NULL`) `owners_out` is unchanged. Thread-safe.
///
/// # Safety
/// `capacities` is readable for `n_devices` entries; `experts` and `expert_bytes` for
/// `n_layers`; `loads` is NULL or readable, and `owners_out` writable, for
/// `sum(experts)`.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_plan_sharding(
    n_devices: usize,
    capacities: *const u64,
    n_layers: usize,
    experts: *const usize,
    expert_bytes: *const u64,
    loads: *const f64,
    owners_out: *mut usize,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's contract on each array.
        let (experts, bytes, total) = unsafe { layers(n_layers, experts, expert_bytes) }?;
        // SAFETY: readable for `n_devices` entries (the caller's contract).
        let capacities = unsafe { slice(capacities, n_devices, "capacities") }?;
        let loads = if loads.is_null() {
            None
        } else {
            // SAFETY: non-NULL, readable for `sum(experts)` entries (the caller's contract).
            Some(unsafe { slice(loads, total, "loads") }?)
        };
        let mut at = 0;
        let layers: Vec<MoeLayer> = (0..n_layers)
            .map(|l| {
                let layer = MoeLayer::new(experts[l], bytes[l]);
                let out = match loads {
                    Some(v) => layer.with_loads(v[at..at + experts[l]].to_vec()),
                    None => layer,
                };
                at += experts[l];
                out
            })
            .collect();
        let s = plan_sharding(capacities, &layers).map_err(|e| invalid(e.to_string()))?;
        let flat: Vec<usize> = (0..n_layers).flat_map(|l| s.owners(l).to_vec()).collect();
        // SAFETY: writable for `sum(experts)` entries (the caller's contract).
        unsafe { write_all(owners_out, flat.into_iter(), "owners_out") }
    })
}

/// Plans a backup for every expert of the sharding `owners` (flattened, see
/// `phx_moe_plan_sharding`) over `n_devices` devices (at least 2): a device other than
/// its owner, on another host when `hosts` (NULL, or each device's host) says there is
/// one, the backups' bytes spread like the owners'. Writes `backups_out`, one entry per
/// expert as `owners`. On error `backups_out` is unchanged. Thread-safe.
///
/// # Safety
/// `experts` and `expert_bytes` are readable for `n_layers` entries; `owners` readable
/// and `backups_out` writable for `sum(experts)`; `hosts` NULL or readable for
/// `n_devices`.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_plan_backups(
    n_devices: usize,
    n_layers: usize,
    experts: *const usize,
    expert_bytes: *const u64,
    owners: *const usize,
    hosts: *const usize,
    backups_out: *mut usize,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's contract on each array.
        let (s, experts) = unsafe { sharding(n_devices, n_layers, experts, expert_bytes, owners) }?;
        let hosts = if hosts.is_null() {
            None
        } else {
            // SAFETY: non-NULL, readable for `n_devices` entries (the caller's contract).
            Some(Hosts(unsafe { slice(hosts, n_devices, "hosts") }?.to_vec()))
        };
        let b = plan_backups(&s, hosts.as_ref()).map_err(|e| invalid(e.to_string()))?;
        let flat: Vec<usize> =
            (0..n_layers).flat_map(|l| (0..experts[l]).map(move |e| (l, e))).map(|(l, e)| b.of(l, e)).collect();
        // SAFETY: writable for `sum(experts)` entries (the caller's contract).
        unsafe { write_all(backups_out, flat.into_iter(), "backups_out") }
    })
}

/// The sharding the survivors take up when device `lost` of the `n_devices` is gone:
/// each of its experts is owned by its backup (`backups`, as `phx_moe_plan_backups`
/// wrote them), and the devices after `lost` move down by one (as ranks do when a peer
/// leaves). Writes `owners_out` (over `n_devices - 1` devices), one entry per expert.
/// On error (`PHX_ERR_INVALID_ARGUMENT`: `lost` out of range, a backup on its owner,
/// ...) `owners_out` is unchanged. Thread-safe.
///
/// # Safety
/// `experts` and `expert_bytes` are readable for `n_layers` entries; `owners` and
/// `backups` readable, `owners_out` writable, for `sum(experts)`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn phx_moe_after_loss(
    n_devices: usize,
    n_layers: usize,
    experts: *const usize,
    expert_bytes: *const u64,
    owners: *const usize,
    backups: *const usize,
    lost: usize,
    owners_out: *mut usize,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's contract on each array.
        let (s, experts) = unsafe { sharding(n_devices, n_layers, experts, expert_bytes, owners) }?;
        let total = experts.iter().sum();
        // SAFETY: readable for `sum(experts)` entries (the caller's contract).
        let backups = unsafe { slice(backups, total, "backups") }?;
        let b = Backups::from_lists(&s, split(backups, &experts)).map_err(|e| invalid(e.to_string()))?;
        let after = s.after_loss(lost, &b).map_err(|e| invalid(e.to_string()))?;
        let flat: Vec<usize> = (0..n_layers).flat_map(|l| after.owners(l).to_vec()).collect();
        // SAFETY: writable for `sum(experts)` entries (the caller's contract).
        unsafe { write_all(owners_out, flat.into_iter(), "owners_out") }
    })
}

/// Moves one layer's state from its owners now to its next owners (a re-sharding):
/// expert `e` of the `n_experts` is owned by `now_owners[e]` and next by
/// `next_owners[e]` (ranks of `comm`'s group). Each of the `n_buffers` buffers
/// (`buffers[i]`: the parameters, then each optimizer-state buffer) holds `count`
/// elements of `dtype_code`, a slot of `count / n_experts` per expert, experts in order;
/// one spAG per buffer leaves each expert's slot on its next owner holding its current
/// owner's bytes. Every rank calls it alike. Writes `*n_moves` (NULL allowed), the
/// experts that changed owner. On error the slots of the experts this rank owns now are
/// unchanged (others may have been written): keep the current sharding.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `now_owners` and
/// `next_owners` readable for `n_experts` entries; `buffers` readable for `n_buffers`
/// pointers, each readable and writable for `count` elements, the buffers disjoint;
/// `n_moves` NULL or writable.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn phx_moe_reshard_move(
    comm: *mut phx_comm,
    n_experts: usize,
    now_owners: *const usize,
    next_owners: *const usize,
    n_buffers: usize,
    buffers: *const *mut c_void,
    count: usize,
    dtype_code: c_int,
    n_moves: *mut usize,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        let dtype = dtype(dtype_code)?;
        // SAFETY: readable for `n_experts` entries each (the caller's contract).
        let (now, next) =
            unsafe { (slice(now_owners, n_experts, "now_owners")?, slice(next_owners, n_experts, "next_owners")?) };
        if n_experts == 0 || count % n_experts != 0 {
            return Err(invalid(format!(
                "buffers of {count} elements for a layer of {n_experts} experts: give a slot per expert"
            )));
        }
        let size = comm.size();
        let now = Sharding::from_owners(size, vec![now.to_vec()], vec![1]).map_err(|e| invalid(e.to_string()))?;
        let next = Sharding::from_owners(size, vec![next.to_vec()], vec![1]).map_err(|e| invalid(e.to_string()))?;
        let placement = now.transfer_placement(&next, 0, count / n_experts)?;
        // SAFETY: readable for `n_buffers` pointers (the caller's contract).
        let ptrs = unsafe { slice(buffers, n_buffers, "buffers") }?;
        let len = count.saturating_mul(dtype.size());
        for (i, &a) in ptrs.iter().enumerate() {
            if ptrs[..i].iter().any(|&b| len > 0 && (a as usize) < b as usize + len && (b as usize) < a as usize + len)
            {
                return Err(invalid(format!("buffers[{i}] overlaps an earlier buffer: give disjoint buffers")));
            }
        }
        for &p in ptrs {
            // SAFETY: valid for `count` elements and used by no one else (the caller's
            // contract; the buffers are disjoint, checked above).
            let buf = unsafe { bytes_mut(p, count, dtype, "buffers[i]") }?;
            comm.sparse_all_gather_raw(&placement, buf, dtype)?;
        }
        if !n_moves.is_null() {
            let moved = now.moves_to(&next).map_err(|e| invalid(e.to_string()))?.len();
            // SAFETY: non-NULL and writable (the caller's contract).
            unsafe { write_out(n_moves, moved) };
        }
        Ok(())
    })
}
