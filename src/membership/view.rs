//! Views: who is in the group, in which order, at which epoch.

use std::net::SocketAddr;

use crate::plan::Rank;

/// A peer's identity, chosen by the peer (random) and unique in the cluster.
pub type PeerId = u64;

/// One member of a view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Its identity.
    pub id: PeerId,
    /// Where it accepts data links.
    pub addr: SocketAddr,
}

/// The group as the master defines it: members in rank order, at an epoch. Every
/// change of membership makes a new view with a higher epoch.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct View {
    /// Increases with every change.
    pub epoch: u64,
    /// Members; a member's index is its rank.
    pub members: Vec<Member>,
}

impl View {
    /// The rank of `id`, if it is a member.
    pub fn rank_of(&self, id: PeerId) -> Option<Rank> {
        self.members.iter().position(|m| m.id == id)
    }

    /// The number of members.
    pub fn size(&self) -> usize {
        self.members.len()
    }
}
