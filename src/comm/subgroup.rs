//! Sub-group collectives: a collective over some of the view's ranks that involves and
//! blocks only them.
//!
//! # Members and sub-ranks
//!
//! A sub-group is named by the view ranks of its members, in any order, each once, the
//! caller among them. Its sub-ranks follow view-rank order: the lowest view rank is
//! sub-rank 0. Every member must make the same call (collective, sizes, type, operator
//! and member set); ranks outside the set do not call it and are not delayed by it, and
//! disjoint sub-groups run at the same time. Two members run the sub-group collectives
//! they share in the same order.
//!
//! # Keys
//!
//! A collective's traffic and its record at the master are keyed by `(epoch, seq)`. The
//! whole group numbers its collectives 1, 2, 3, ... per epoch; a sub-group collective
//! takes `seq = 1 << 63 | h << 32 | c`, where `h` is a 31-bit hash of the members' peer
//! ids and `c` counts the collectives of that member set in the epoch (from 1), so it
//! never disturbs the whole group's counter. Two different member sets whose hashes
//! collide and whose counters meet share a key: the master sees two member sets under
//! one key and aborts the collective with [`Error::Mismatch`] for every member involved
//! (and frames never mix: the call fingerprint includes the member set). With 31 bits
//! that is about one chance in two billion per pair of sets in use at once.
//!
//! # Failures
//!
//! A member lost while the collective runs aborts it on the other members with
//! [`Error::PeerLost`], buffers restored. With [`super::RetryPolicy::OnPeerLost`] the
//! collective runs again in the new view only when every member of the sub-group
//! survived (a non-member was lost: every collective of the old view is void); when a
//! member was lost it returns `PeerLost`, and the caller picks a new sub-group in the new
//! view (e.g. [`Communicator::noloco_pairs`] with the new size). Members that disagree on
//! the member set wait for each other until one of them calls `update_topology` (which
//! aborts the collective with `Mismatch`) or the view changes.
//!
//! Local groups ([`Communicator::local_group`]) take the same path; there a lost rank
//! ends the whole group, as for every local collective.

use super::peer::{CallSpec, Scope};
use super::{elements, Communicator};
use crate::collective::Collective;
use crate::dtype::{DType, Element, ReduceOp};
use crate::error::{Error, Result};
use crate::plan::{Plan, Rank, Step};
use crate::rng::SplitMix64;

/// Checks `members` (view ranks) for a caller of rank `me` in a group of `size`:
/// returns them in ascending order, with the caller's sub-rank.
pub(crate) fn canonical(members: &[Rank], me: Rank, size: usize) -> Result<(Vec<Rank>, Rank)> {
    let mut sorted = members.to_vec();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::InvalidArgument(format!("sub-group names rank {} twice", w[0])));
    }
    if let Some(&r) = sorted.iter().find(|&&r| r >= size) {
        return Err(Error::InvalidArgument(format!("sub-group names rank {r} outside a group of {size}")));
    }
    let sub = sorted.iter().position(|&r| r == me).ok_or_else(|| {
        Error::InvalidArgument(format!("rank {me} calls a sub-group collective of {sorted:?} without being a member"))
    })?;
    Ok((sorted, sub))
}

/// Rewrites a sub-group plan's peers from sub-ranks to the view ranks `members[i]`, so
/// that it runs over the view's links and every error names a view rank. `plan.rank`
/// stays the sub-rank.
pub(crate) fn plan_in_view(mut plan: Plan, members: &[Rank]) -> Plan {
    let map = |r: &mut Rank| *r = members.get(*r).copied().unwrap_or(usize::MAX);
    for step in &mut plan.steps {
        match step {
            Step::Exchange { send, recv } => {
                if let Some(s) = send {
                    map(&mut s.to);
                }
                if let Some(r) = recv {
                    map(&mut r.from);
                }
            }
            Step::Forward { from, to, .. } => {
                map(from);
                map(to);
            }
            Step::Local { .. } => {}
        }
    }
    plan
}

impl Communicator {
    /// `members` sorted and checked against the view a collective begun now runs in,
    /// and this rank's place among them.
    fn sub_canonical(&self, members: &[Rank]) -> Result<(Vec<Rank>, Rank)> {
        let (rank, size) = self.call_group()?;
        canonical(members, rank, size)
    }

    /// The NoLoCo pairing of ranks `0..n` at `step`: a permutation drawn from
    /// `(seed, step)` split into consecutive pairs, each pair in ascending order, pairs
    /// in permutation order. With `n` odd the permutation's last rank is left out. Every
    /// peer computes the same pairing from the same arguments, without talking.
    ///
    /// ```
    /// use phalanx::Communicator;
    /// let pairs = Communicator::noloco_pairs(42, 7, 5);
    /// assert_eq!(pairs.len(), 2);
    /// assert_eq!(pairs, Communicator::noloco_pairs(42, 7, 5));
    /// ```
    pub fn noloco_pairs(seed: u64, step: u64, n: usize) -> Vec<(Rank, Rank)> {
        let mut rng = SplitMix64(seed ^ step.wrapping_mul(0xd6e8_feb8_6659_fd93));
        rng.next_u64();
        let mut perm: Vec<Rank> = (0..n).collect();
        for i in (1..n).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            perm.swap(i, j);
        }
        perm.chunks_exact(2).map(|p| (p[0].min(p[1]), p[0].max(p[1]))).collect()
    }

    /// `rank`'s partner in [`Communicator::noloco_pairs`]`(seed, step, n)`, or `None`
    /// for the rank left out when `n` is odd (and for ranks outside `0..n`).
    pub fn noloco_partner(seed: u64, step: u64, n: usize, rank: Rank) -> Option<Rank> {
        Communicator::noloco_pairs(seed, step, n).into_iter().find_map(|(a, b)| match rank {
            r if r == a => Some(b),
            r if r == b => Some(a),
            _ => None,
        })
    }

    /// All-reduce among the ranks `members` only (view ranks, the caller among them; see
    /// the module docs of `comm::subgroup`). Other ranks do not call it and do not wait.
    /// `Avg` divides by the number of members.
    pub fn sub_all_reduce<T: Element>(&mut self, members: &[Rank], buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.sub_all_reduce_raw(members, bytemuck::cast_slice_mut(buf), T::DTYPE, op)
    }

    /// [`Communicator::sub_all_reduce`] on the bytes of elements of type `dtype`.
    pub fn sub_all_reduce_raw(&mut self, members: &[Rank], buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        let len = elements(buf.len(), dtype, "buffer")?;
        self.run_sub(members, &Collective::AllReduce { len }, dtype, op, buf)
    }

    /// Copies `root`'s `buf` to every member's `buf`; `root` is a view rank in `members`.
    pub fn sub_broadcast<T: Element>(&mut self, members: &[Rank], buf: &mut [T], root: Rank) -> Result<()> {
        self.sub_broadcast_raw(members, bytemuck::cast_slice_mut(buf), T::DTYPE, root)
    }

    /// [`Communicator::sub_broadcast`] on bytes.
    pub fn sub_broadcast_raw(&mut self, members: &[Rank], buf: &mut [u8], dtype: DType, root: Rank) -> Result<()> {
        let (sorted, _) = self.sub_canonical(members)?;
        let root = sorted
            .iter()
            .position(|&r| r == root)
            .ok_or_else(|| Error::InvalidArgument(format!("root {root} is not a member of {sorted:?}")))?;
        let len = elements(buf.len(), dtype, "buffer")?;
        self.run_sub(members, &Collective::Broadcast { root, len }, dtype, ReduceOp::Sum, buf).map(|_| ())
    }

    /// Concatenates the members' `input`s (equal lengths) into `output`, in view-rank
    /// order of the members.
    pub fn sub_all_gather<T: Element>(&mut self, members: &[Rank], input: &[T], output: &mut [T]) -> Result<()> {
        self.sub_all_gather_raw(members, bytemuck::cast_slice(input), bytemuck::cast_slice_mut(output), T::DTYPE)
    }

    /// [`Communicator::sub_all_gather`] on bytes.
    pub fn sub_all_gather_raw(
        &mut self,
        members: &[Rank],
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
    ) -> Result<()> {
        let (sorted, me) = self.sub_canonical(members)?;
        let k = sorted.len();
        if output.len() != input.len() * k {
            return Err(Error::InvalidArgument(format!(
                "output of {} bytes for {k} members' inputs of {} bytes",
                output.len(),
                input.len()
            )));
        }
        let n = elements(input.len(), dtype, "input")?;
        let mut work = output.to_vec();
        work[me * input.len()..(me + 1) * input.len()].copy_from_slice(input);
        let coll = Collective::AllGather { counts: vec![n; k] };
        self.run_sub(members, &coll, dtype, ReduceOp::Sum, &mut work)?;
        output.copy_from_slice(&work);
        Ok(())
    }

    /// Reduces the members' `input`s (`members.len() * output.len()` elements each) and
    /// leaves the caller's segment (by its position among the members in view-rank
    /// order) in `output`.
    pub fn sub_reduce_scatter<T: Element>(
        &mut self,
        members: &[Rank],
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let (input, output) = (bytemuck::cast_slice(input), bytemuck::cast_slice_mut(output));
        self.sub_reduce_scatter_raw(members, input, output, T::DTYPE, op)
    }

    /// [`Communicator::sub_reduce_scatter`] on bytes.
    pub fn sub_reduce_scatter_raw(
        &mut self,
        members: &[Rank],
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        let (sorted, me) = self.sub_canonical(members)?;
        let k = sorted.len();
        if input.len() != output.len() * k {
            return Err(Error::InvalidArgument(format!(
                "input of {} bytes for {k} members' outputs of {} bytes",
                input.len(),
                output.len()
            )));
        }
        let n = elements(output.len(), dtype, "output")?;
        let mut work = input.to_vec();
        self.run_sub(members, &Collective::ReduceScatter { counts: vec![n; k] }, dtype, op, &mut work)?;
        output.copy_from_slice(&work[me * output.len()..(me + 1) * output.len()]);
        Ok(())
    }

    /// Returns once every member of `members` has called it.
    pub fn sub_barrier(&mut self, members: &[Rank]) -> Result<()> {
        self.run_sub(members, &Collective::Barrier, DType::U8, ReduceOp::Sum, &mut [])
    }

    /// Runs one collective among `members` (view ranks), with retries over the same
    /// members while all of them survive.
    fn run_sub(
        &mut self,
        members: &[Rank],
        coll: &Collective,
        dtype: DType,
        op: ReduceOp,
        buf: &mut [u8],
    ) -> Result<()> {
        let (sorted, _) = self.sub_canonical(members)?;
        let spec = CallSpec::new(coll, dtype, op);
        self.block(async |p| {
            let ids = p.ids_of(&sorted)?;
            p.run(spec, Scope::Sub(&ids), buf).await
        })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plans_are_rewritten_to_view_ranks() {
        let plan = crate::collective::Collective::AllReduce { len: 8 }.plan(
            1,
            3,
            DType::F32,
            &crate::collective::Tuning::default(),
        );
        let peers = |p: &Plan| p.steps.iter().flat_map(|s| s.peers().collect::<Vec<_>>()).collect::<Vec<_>>();
        let sub: Vec<Rank> = peers(&plan);
        let view = plan_in_view(plan.clone(), &[2, 5, 7]);
        assert_eq!(peers(&view), sub.iter().map(|&r| [2, 5, 7][r]).collect::<Vec<_>>());
        assert!(!sub.is_empty() && view.rank == 1 && view.len == plan.len);
    }

    #[test]
    fn members_are_checked_and_sorted() {
        assert_eq!(canonical(&[3, 1], 3, 4).expect("valid"), (vec![1, 3], 1));
        assert!(canonical(&[1, 1, 3], 1, 4).is_err());
        assert!(canonical(&[1, 4], 1, 4).is_err());
        assert!(canonical(&[0, 2], 1, 4).is_err());
    }

    #[test]
    fn sub_keys_stay_out_of_the_whole_group_s_space_and_apart() {
        use crate::membership::peer::{sub_fingerprint, sub_key, SUB_KEY_BIT};
        let (a, b) = (sub_key(&[1, 2], 1), sub_key(&[3, 4], 1));
        assert!(a & SUB_KEY_BIT != 0 && b & SUB_KEY_BIT != 0);
        assert_ne!(a, b);
        assert_eq!(sub_key(&[1, 2], 2), a + 1);
        assert_ne!(sub_fingerprint(9, &[1, 2]), sub_fingerprint(9, &[3, 4]));
    }

    proptest! {
        #[test]
        fn noloco_pairs_are_a_valid_deterministic_pairing(seed in any::<u64>(), step in any::<u64>(), n in 0usize..64) {
            let pairs = Communicator::noloco_pairs(seed, step, n);
            prop_assert_eq!(&pairs, &Communicator::noloco_pairs(seed, step, n));
            prop_assert_eq!(pairs.len(), n / 2);
            let mut seen = vec![0u32; n];
            for &(a, b) in &pairs {
                prop_assert!(a < b && b < n);
                seen[a] += 1;
                seen[b] += 1;
            }
            prop_assert!(seen.iter().all(|&c| c <= 1));
            prop_assert_eq!(seen.iter().filter(|&&c| c == 0).count(), n % 2);
            for (r, &count) in seen.iter().enumerate() {
                match Communicator::noloco_partner(seed, step, n, r) {
                    Some(p) => prop_assert_eq!(Communicator::noloco_partner(seed, step, n, p), Some(r)),
                    None => prop_assert_eq!(count, 0),
                }
            }
        }
    }

    #[test]
    fn noloco_pairs_change_with_the_step() {
        let distinct: std::collections::BTreeSet<_> = (0..20).map(|s| Communicator::noloco_pairs(1, s, 8)).collect();
        assert!(distinct.len() > 10, "pairings should vary with the step: {} distinct", distinct.len());
    }
}
