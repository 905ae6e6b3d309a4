//! The hierarchical all-reduce for GPUs on several hosts: a reduce-scatter inside the
//! host (NCCL, over NVLink/PCIe), an all-reduce of each shard across hosts (phalanx's
//! fault-tolerant all-reduce over QUIC, among the ranks with the same local rank), and
//! an all-gather inside the host. Every byte crosses the slow network once per host
//! rather than once per GPU.
//!
//! [`HierPlan`] sizes the shards (padding the buffer to a multiple of the host's ranks);
//! [`all_reduce_hierarchical`] runs the plan on host-memory buffers (the stand-in's).
//! On the NCCL backend the cross-host step reads the shard through a host staging copy;
//! that runner waits for a GPU run (see the README).

use super::{DeviceComm, DeviceError};
use crate::dtype::ReduceOp;

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

/// The hierarchical all-reduce of `buf`: reduce-scatter over `local` (this host's
/// ranks), `cross` all-reduces this rank's shard with the same local rank of every other
/// host, all-gather over `local`. Every rank of every host ends with the same result as
/// a flat all-reduce over all of them (bitwise for exact arithmetic, e.g. integers in
/// floats; the order of additions differs, so rounding may differ otherwise).
///
/// `op` is `Sum`, `Prod`, `Min` or `Max`: `Avg` would average averages, which is not the
/// flat average when hosts differ in size, so it is refused (sum, then scale).
///
/// On any error `buf` holds what it held before the call (it is restored from a copy)
/// and the error is returned: a lost rank inside the host is a [`DeviceError`], one
/// across hosts is the cross step's own error (`PeerLost`, `Aborted`).
pub fn all_reduce_hierarchical<C>(
    local: &mut C,
    buf: &mut Vec<f32>,
    op: ReduceOp,
    cross: impl FnOnce(&mut [f32]) -> crate::Result<()>,
) -> crate::Result<()>
where
    C: DeviceComm<Buffer = Vec<f32>>,
{
    if op == ReduceOp::Avg {
        return Err(crate::Error::InvalidArgument(
            "the hierarchical all-reduce takes Sum, Prod, Min or Max: sum, then scale, for an average".into(),
        ));
    }
    let plan = HierPlan::new(buf.len(), local.size())?;
    let backup = buf.clone();
    let result = (|| -> crate::Result<()> {
        // The padding is reduced too, and dropped at the end: any value will do.
        buf.resize(plan.padded_len(), 0.0);
        let mut shard = vec![0.0; plan.shard_len];
        local.reduce_scatter(buf, &mut shard, op)?;
        cross(&mut shard)?;
        local.all_gather(&shard, buf)?;
        buf.truncate(plan.len);
        Ok(())
    })();
    if result.is_err() {
        *buf = backup;
    }
    result
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::device::standin::StandIn;
    use crate::device::{Capabilities, DeviceBackend};
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
