//! Sub-group collectives' keys and fingerprints: the same on every member, whatever
//! order it names the members in.

use crate::error::{Error, Result};
use crate::membership::view::{PeerId, View};
use crate::plan::Rank;

use super::SUB_KEY_BIT;

/// The view ranks of the members with ids `ids`, ascending; `PeerLost` if one left,
/// `InvalidArgument` if one is named twice.
pub(super) fn sub_members(view: &View, ids: &[PeerId]) -> Result<Vec<Rank>> {
    let mut ranked = Vec::with_capacity(ids.len());
    for &id in ids {
        let rank = view.rank_of(id).ok_or_else(|| Error::PeerLost {
            rank: usize::MAX,
            reason: format!("sub-group member {id:#x} is not in the view of epoch {}", view.epoch),
        })?;
        ranked.push(rank);
    }
    ranked.sort_unstable();
    if let Some(w) = ranked.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::InvalidArgument(format!("sub-group names rank {} twice", w[0])));
    }
    Ok(ranked)
}

/// The key of the `counter`-th collective (from 1) of the member set with peer ids
/// `ids` (in sub-rank order) in an epoch: `1 << 63 | hash << 32 | counter` (see
/// `comm::subgroup` for why collisions are harmless).
pub fn sub_key(ids: &[u64], counter: u32) -> u64 {
    SUB_KEY_BIT | (set_hash(ids) & 0x7fff_ffff) << 32 | counter as u64
}

/// FNV-1a of the members' ids, stable across processes.
pub fn set_hash(ids: &[u64]) -> u64 {
    crate::collective::fnv1a(ids.iter().flat_map(|id| id.to_le_bytes()))
}

/// A call's fingerprint with the member set mixed in, so that frames of two sub-groups
/// sharing a key are told apart.
pub fn sub_fingerprint(call: u64, ids: &[u64]) -> u64 {
    (call ^ set_hash(ids).rotate_left(17)).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5ab5_ab5a
}
