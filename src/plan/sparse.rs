//! Sparse all-gather and sparse reduce-scatter over a chunk placement (FSSDP).
//!
//! A [`Placement`] cuts a working buffer into chunks (say, one per expert of a
//! mixture-of-experts layer), names the *owner* of each chunk (the rank whose copy is
//! authoritative, placement P), and the *holders* of each chunk this iteration (the
//! owner plus every rank that needs a replica, the wider placement P′ ⊇ P). Every rank's
//! working buffer has a slot for every chunk, at the same offsets on every rank; only
//! the slots of chunks a rank holds are meaningful to it.
//!
//! - [`sparse_all_gather`] (spAG(P, P′)): every holder's slot receives the owner's bytes.
//! - [`sparse_reduce_scatter`] (spRS(P′, P)): the owner's slot receives the sum of the
//!   slots of all holders of the chunk, combined in **ascending rank order**, as the
//!   left fold `((g_h0 ⊕ g_h1) ⊕ g_h2) ⊕ …` over the holders `h0 < h1 < …`, the owner's
//!   own slot included at its rank position. Non-owners' slots are left as they were.
//!
//! A chunk held only by its owner (not replicated) or of length zero moves nothing:
//! no step, no frame.
//!
//! # Deadlock freedom
//!
//! Both plans follow one global order of transfers that every rank knows: chunks in
//! ascending index, and within a chunk the non-owner holders in ascending rank. Each rank
//! performs, in that order, exactly the transfers it takes part in (as sender or
//! receiver). The earliest transfer not yet done always has both ends ready: each has
//! finished every earlier transfer it takes part in, and all its remaining ones come
//! later. So the earliest pending transfer completes, and by induction all do, whatever
//! the link buffer sizes.
//!
//! # Scratch (spRS)
//!
//! When the owner is not the lowest-ranked holder, the ordered fold needs an accumulator
//! apart from the owner's own gradient: the owner receives the lower holders' gradients
//! into a scratch region (the first by copy, later ones combined on the right), combines
//! its own slot in with a [`Step::Local`] when the fold reaches its rank, receives the
//! higher holders' gradients the same way, and copies the accumulator into its slot.
//! When the owner is the lowest holder, it receives straight into its slot. The scratch
//! region follows the chunks ([`Placement::scratch_len`]); its content is meaningless.
//!
//! ```
//! use phalanx::plan::sparse::{Placement, sparse_all_gather};
//! // 3 ranks, 2 chunks of 2 elements owned by ranks 0 and 2; rank 1 needs chunk 0.
//! let p = Placement::new(3, vec![2, 2], vec![0, 2]).unwrap().widen(&[vec![1], vec![]]).unwrap();
//! assert_eq!(sparse_all_gather(0, &p).steps.len(), 1); // send chunk 0 to rank 1
//! assert_eq!(sparse_all_gather(2, &p).steps.len(), 0); // chunk 1 is not replicated
//! ```

use std::ops::Range;

use super::{Action, Order, Plan, Rank, Step};
use crate::error::{Error, Result};

/// Owners and holders of the chunks of a working buffer (placements P and P′).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Placement {
    size: usize,
    lens: Vec<usize>,
    owners: Vec<Rank>,
    /// Per chunk: the holders, ascending, the owner included.
    holders: Vec<Vec<Rank>>,
}

impl Placement {
    /// Placement P: chunk `c` has `lens[c]` elements and is held only by `owners[c]`,
    /// a rank of a group of `size`.
    pub fn new(size: usize, lens: Vec<usize>, owners: Vec<Rank>) -> Result<Placement> {
        if lens.len() != owners.len() {
            return Err(Error::InvalidArgument(format!("{} chunk lengths but {} owners", lens.len(), owners.len())));
        }
        if let Some((c, o)) = owners.iter().enumerate().find(|(_, &o)| o >= size) {
            return Err(Error::InvalidArgument(format!("chunk {c} owned by rank {o}, outside a group of {size}")));
        }
        lens.iter().try_fold(0usize, |a, &l| a.checked_add(l)).ok_or_else(|| {
            Error::InvalidArgument("chunk lengths overflow".into()) //
        })?;
        let holders = owners.iter().map(|&o| vec![o]).collect();
        Ok(Placement { size, lens, owners, holders })
    }

    /// The wider placement P′: chunk `c` is also held by the ranks in `extra[c]` (in any
    /// order, duplicates and the owner allowed). `extra` has one entry per chunk.
    pub fn widen(&self, extra: &[Vec<Rank>]) -> Result<Placement> {
        if extra.len() != self.lens.len() {
            return Err(Error::InvalidArgument(format!("{} holder sets for {} chunks", extra.len(), self.lens.len())));
        }
        let mut wide = self.clone();
        for (c, ranks) in extra.iter().enumerate() {
            if let Some(r) = ranks.iter().find(|&&r| r >= self.size) {
                return Err(Error::InvalidArgument(format!(
                    "chunk {c} held by rank {r}, outside a group of {}",
                    self.size
                )));
            }
            let h = &mut wide.holders[c];
            h.extend_from_slice(ranks);
            h.sort_unstable();
            h.dedup();
        }
        Ok(wide)
    }

    /// The group size the placement is for.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Number of chunks.
    pub fn chunks(&self) -> usize {
        self.lens.len()
    }

    /// Chunk lengths, in elements.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// The owner of each chunk.
    pub fn owners(&self) -> &[Rank] {
        &self.owners
    }

    /// The holders of chunk `c`, ascending, the owner included.
    pub fn holders(&self, c: usize) -> &[Rank] {
        &self.holders[c]
    }

    /// Whether `rank` holds chunk `c`.
    pub fn holds(&self, rank: Rank, c: usize) -> bool {
        self.holders[c].binary_search(&rank).is_ok()
    }

    /// Element range of chunk `c` in the working buffer.
    pub fn range(&self, c: usize) -> Range<usize> {
        let start: usize = self.lens[..c].iter().sum();
        start..start + self.lens[c]
    }

    /// Total elements of all chunks (the working buffer of spAG).
    pub fn total_len(&self) -> usize {
        self.lens.iter().sum()
    }

    /// Elements of scratch that spRS needs after the chunks: the longest replicated chunk
    /// whose owner is not its lowest holder (0 if none). The same on every rank.
    pub fn scratch_len(&self) -> usize {
        (0..self.chunks()).filter(|&c| self.holders[c][0] != self.owners[c]).map(|c| self.lens[c]).max().unwrap_or(0)
    }

    /// Chunks that move data: replicated (more than one holder) and non-empty.
    fn moving(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.chunks()).filter(|&c| self.holders[c].len() > 1 && self.lens[c] > 0)
    }

    /// Number of chunk transfers of spAG (and of spRS): one per non-owner holder of a
    /// non-empty chunk.
    pub fn transfers(&self) -> usize {
        self.moving().map(|c| self.holders[c].len() - 1).sum()
    }

    /// Words describing the placement exactly, for fingerprints.
    pub fn words(&self) -> Vec<u64> {
        let mut w = vec![self.size as u64, self.lens.len() as u64];
        for c in 0..self.chunks() {
            w.extend([self.lens[c] as u64, self.owners[c] as u64, self.holders[c].len() as u64]);
            w.extend(self.holders[c].iter().map(|&h| h as u64));
        }
        w
    }
}

/// spAG(P, P′) for `rank`: every holder of a chunk receives its owner's bytes. The
/// working buffer holds all chunks ([`Placement::total_len`] elements).
pub fn sparse_all_gather(rank: Rank, p: &Placement) -> Plan {
    let mut steps = Vec::new();
    for c in p.moving() {
        let (owner, range) = (p.owners[c], p.range(c));
        for &h in p.holders[c].iter().filter(|&&h| h != p.owners[c]) {
            if rank == owner {
                steps.push(Step::send(h, range.clone()));
            } else if rank == h {
                steps.push(Step::recv(owner, range.clone(), Action::Copy));
            }
        }
    }
    Plan { rank, size: p.size, len: p.total_len(), steps }
}

/// spRS(P′, P) for `rank`: each owner's slot becomes the ascending-rank left fold of all
/// holders' slots. The working buffer holds all chunks followed by
/// [`Placement::scratch_len`] elements of scratch.
pub fn sparse_reduce_scatter(rank: Rank, p: &Placement) -> Plan {
    let total = p.total_len();
    let mut steps = Vec::new();
    for c in p.moving() {
        let (owner, slot) = (p.owners[c], p.range(c));
        let holders = &p.holders[c];
        if rank != owner {
            if holders.contains(&rank) {
                steps.push(Step::send(owner, slot));
            }
            continue;
        }
        let right = Action::Reduce(Order::IncomingRight);
        if holders[0] == owner {
            // The owner comes first: fold straight into its slot.
            steps.extend(holders[1..].iter().map(|&h| Step::recv(h, slot.clone(), right)));
            continue;
        }
        let scratch = total..total + slot.len();
        for (i, &h) in holders.iter().enumerate() {
            if h == owner {
                steps.push(Step::Local { src: slot.clone(), dst: scratch.clone(), action: right });
            } else {
                steps.push(Step::recv(h, scratch.clone(), if i == 0 { Action::Copy } else { right }));
            }
        }
        steps.push(Step::Local { src: scratch, dst: slot, action: Action::Copy });
    }
    Plan { rank, size: p.size, len: total + p.scratch_len(), steps }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_placements() {
        assert!(Placement::new(2, vec![1, 1], vec![0]).is_err());
        assert!(Placement::new(2, vec![1], vec![2]).is_err());
        let p = Placement::new(2, vec![1], vec![0]).unwrap();
        assert!(p.widen(&[vec![2]]).is_err());
        assert!(p.widen(&[]).is_err());
        assert_eq!(p.widen(&[vec![1, 0, 1]]).unwrap().holders(0), &[0, 1]);
    }

    #[test]
    fn plans_validate_and_skip_unreplicated_chunks() {
        let p = Placement::new(4, vec![2, 3, 0, 1], vec![1, 0, 3, 2])
            .unwrap()
            .widen(&[vec![0, 3], vec![], vec![0, 1], vec![3]])
            .unwrap();
        assert_eq!(p.transfers(), 3); // chunk 2 is empty, chunk 1 unreplicated
        assert_eq!(p.scratch_len(), 2); // chunk 0: owner 1 is not its lowest holder
        for r in 0..4 {
            for plan in [sparse_all_gather(r, &p), sparse_reduce_scatter(r, &p)] {
                plan.validate().unwrap();
            }
        }
        assert!(sparse_all_gather(0, &p).steps.iter().all(|s| !matches!(s, Step::Exchange { send: Some(_), .. })));
    }
}
