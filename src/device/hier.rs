//! The hierarchical all-reduce for GPUs on several hosts: a reduce-scatter inside the
//! host (NCCL, over NVLink/PCIe), an all-reduce of each shard across hosts (phalanx's
//! fault-tolerant all-reduce over QUIC, among the ranks with the same local rank), and
//! an all-gather inside the host. Every byte crosses the slow network once per host
//! rather than once per GPU.
//!
//! [`HierPlan`] sizes the shards (padding the buffer to a multiple of the host's ranks);
//! [`all_reduce_hierarchical`] runs the plan on any backend with [`DeviceMemory`]: the
//! stand-in's host buffers, or NCCL's device buffers with the shard staged through host
//! memory for the cross-host step.

use super::memory::{Backup, DeviceMemory};
use super::DeviceError;
use crate::dtype::{DType, ReduceOp};

/// The shape of one hierarchical all-reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HierPlan {
    /// Elements of the caller's buffer.
    pub len: usize,
    /// Ranks on this host.
    pub local_size: usize,
    /// Elements of each rank's shard (`len` divided by `local_size`, rounded up).
    pub shard_len: usize,
}

impl HierPlan {
    /// The plan for `len` elements on a host of `local_size` ranks.
    pub fn new(len: usize, local_size: usize) -> Result<HierPlan, DeviceError> {
        if local_size == 0 {
            return Err(DeviceError::InvalidArgument("a host needs at least one rank".into()));
        }
        Ok(HierPlan { len, local_size, shard_len: len.div_ceil(local_size) })
    }

    /// The buffer's length once padded to `shard_len * local_size`.
    pub fn padded_len(&self) -> usize {
        self.shard_len * self.local_size
    }
}

/// The hierarchical all-reduce of `buf` (f32): reduce-scatter over `local` (this host's
/// ranks), `cross` all-reduces this rank's shard, staged in host memory, with the same
/// local rank of every other host, all-gather over `local`. Every rank of every host
/// ends with the same result as a flat all-reduce over all of them (bitwise for exact
/// arithmetic, e.g. integers in floats; the order of additions differs, so rounding may
/// differ otherwise).
///
/// `op` is `Sum`, `Prod`, `Min` or `Max`: `Avg` would average averages, which is not the
/// flat average when hosts differ in size, so it is refused (sum, then scale).
///
/// On any error `buf` holds what it held before the call (restored from a device-side
/// [`Backup`]) and the error is returned: a lost rank inside the host is a
/// [`DeviceError`] (the local communicator is then aborted: re-create it), one across
/// hosts is the cross step's own error (`PeerLost`, `Aborted`). Device memory used: a
/// backup and a shard, plus a padded copy when the length is not a multiple of the
/// host's ranks; host memory: the shard.
pub fn all_reduce_hierarchical<C: DeviceMemory>(
    local: &mut C,
    buf: &mut C::Buffer,
    op: ReduceOp,
    cross: impl FnOnce(&mut [f32]) -> crate::Result<()>,
) -> crate::Result<()> {
    if op == ReduceOp::Avg {
        return Err(crate::Error::InvalidArgument(
            "the hierarchical all-reduce takes Sum, Prod, Min or Max: sum, then scale, for an average".into(),
        ));
    }
    if C::dtype_of(buf) != DType::F32 {
        return Err(crate::Error::InvalidArgument(format!(
            "the hierarchical all-reduce takes f32 buffers, not {:?}",
            C::dtype_of(buf)
        )));
    }
    let plan = HierPlan::new(C::len_of(buf), local.size())?;
    let backup = Backup::take(local, buf)?;
    let result = run(local, buf, plan, op, cross);
    if let Err(e) = &result {
        if matches!(e, crate::Error::Device(_)) {
            // Its kernels may wait on a lost local rank: the restore would queue behind them.
            let _ = local.abort();
        }
        backup.restore(local, buf)?;
    }
    result
}

fn run<C: DeviceMemory>(
    local: &mut C,
    buf: &mut C::Buffer,
    plan: HierPlan,
    op: ReduceOp,
    cross: impl FnOnce(&mut [f32]) -> crate::Result<()>,
) -> crate::Result<()> {
    let mut shard = local.alloc(plan.shard_len, DType::F32)?;
    // A length that does not divide among the host's ranks is padded in a copy; the
    // padding is reduced too, and dropped at the end: any value will do.
    let mut padded = match plan.padded_len() == plan.len {
        true => None,
        false => {
            let mut p = local.alloc(plan.padded_len(), DType::F32)?;
            local.copy_prefix(buf, &mut p, plan.len)?;
            Some(p)
        }
    };
    let whole = padded.as_mut().unwrap_or(buf);
    local.reduce_scatter(whole, &mut shard, op)?;
    let mut host = vec![0.0_f32; plan.shard_len];
    local.download(&shard, bytemuck::cast_slice_mut(&mut host))?;
    cross(&mut host)?;
    local.upload(bytemuck::cast_slice(&host), &mut shard)?;
    local.all_gather(&shard, whole)?;
    if let Some(p) = &padded {
        local.copy_prefix(p, buf, plan.len)?;
    }
    local.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::device::standin::StandIn;
    use crate::device::{Capabilities, DeviceBackend, DeviceComm};
    use crate::Communicator;

    const HOSTS: usize = 3;
    const LOCAL: usize = 2;

    /// Integers in floats: every sum and product below is exact, whatever the order.
    fn input(global_rank: usize, len: usize) -> Vec<f32> {
        (0..len).map(|i| ((global_rank * 7 + i * 3) % 11) as f32 - 5.0).collect()
    }

    fn flat(len: usize, op: ReduceOp) -> Vec<Vec<f32>> {
        let backend = StandIn::new(Capabilities::ALL, Duration::from_secs(20));
        let id = backend.unique_id().unwrap();
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..HOSTS * LOCAL)
                .map(|g| {
                    let backend = backend.clone();
                    s.spawn(move || {
                        let mut comm = backend.init(&id, g, HOSTS * LOCAL).unwrap();
                        let mut buf = input(g, len);
                        comm.all_reduce(&mut buf, op).unwrap();
                        buf
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn hierarchical(len: usize, op: ReduceOp) -> Vec<Vec<f32>> {
        let backend = StandIn::new(Capabilities::ALL, Duration::from_secs(20));
        let host_ids: Vec<_> = (0..HOSTS).map(|_| backend.unique_id().unwrap()).collect();
        // One phalanx group across hosts for each local rank: [local rank][host].
        let mut cross: Vec<Vec<Communicator>> =
            (0..LOCAL).map(|_| Communicator::local_group(HOSTS, Default::default()).unwrap()).collect();
        let mut outs = vec![Vec::new(); HOSTS * LOCAL];
        std::thread::scope(|s| {
            let mut hs = Vec::new();
            for (h, &id) in host_ids.iter().enumerate() {
                for (l, group) in cross.iter_mut().enumerate() {
                    let mut across = group.remove(0);
                    assert_eq!(across.rank(), h);
                    let backend = backend.clone();
                    hs.push((
                        h * LOCAL + l,
                        s.spawn(move || {
                            let mut local = backend.init(&id, l, LOCAL).unwrap();
                            let mut buf = input(h * LOCAL + l, len);
                            all_reduce_hierarchical(&mut local, &mut buf, op, |shard| across.all_reduce(shard, op))
                                .unwrap();
                            buf
                        }),
                    ));
                }
            }
            for (g, h) in hs {
                outs[g] = h.join().unwrap();
            }
        });
        outs
    }

    fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
        v.iter().map(|b| b.iter().map(|x| x.to_bits()).collect()).collect()
    }

    #[test]
    fn hierarchical_equals_flat_bitwise() {
        // 11 elements on 2 local ranks: shards of 6, one element of padding.
        for (len, op) in [(11, ReduceOp::Sum), (8, ReduceOp::Max), (5, ReduceOp::Min), (4, ReduceOp::Prod)] {
            let flat = flat(len, op);
            let hier = hierarchical(len, op);
            assert!(flat.iter().all(|b| b == &flat[0]), "the flat result is the same everywhere");
            assert_eq!(bits(&hier), bits(&flat), "{op:?} over {len} elements");
        }
    }

    #[test]
    fn plans_pad_to_the_host_size() {
        assert_eq!(HierPlan::new(11, 2).unwrap(), HierPlan { len: 11, local_size: 2, shard_len: 6 });
        assert_eq!(HierPlan::new(11, 2).unwrap().padded_len(), 12);
        assert_eq!(HierPlan::new(0, 4).unwrap().padded_len(), 0);
        assert!(HierPlan::new(3, 0).is_err());
    }

    #[test]
    fn a_failed_cross_step_restores_the_buffer() {
        let backend = StandIn::new(Capabilities::ALL, Duration::from_secs(20));
        let id = backend.unique_id().unwrap();
        let mut local = backend.init(&id, 0, 1).unwrap();
        let before = input(0, 5);
        let mut buf = before.clone();
        let e = all_reduce_hierarchical(&mut local, &mut buf, ReduceOp::Sum, |shard| {
            shard.fill(99.0);
            Err(crate::Error::PeerLost { rank: 1, reason: "killed".into() })
        })
        .unwrap_err();
        assert!(e.is_retryable(), "{e}");
        assert_eq!(buf, before);
        let e = all_reduce_hierarchical(&mut local, &mut buf, ReduceOp::Avg, |_| Ok(())).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::InvalidArgument);
        assert_eq!(buf, before);
    }
}
