//! A networked peer's sub-group collectives and point-to-point messages (see
//! `comm::subgroup` and `comm::p2p` for the contracts).

use std::collections::HashMap;
use std::sync::Arc;

use super::{AsyncPeer, RetryPolicy};
use crate::collective::Collective;
use crate::comm::{p2p, subgroup};
use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, Result};
use crate::membership::protocol::ToMaster;
use crate::membership::{Member, PeerId, View};
use crate::plan::Rank;
use crate::transport::demux::{Demux, OpLink};

/// What a peer keeps for one epoch: dropped when the view changes.
#[derive(Default)]
pub(crate) struct EpochState {
    /// Collectives run so far by each member set (peer ids in sub-rank order).
    sub_seq: HashMap<Vec<PeerId>, u32>,
    /// The receive queue of each `(peer, tag)` used so far, with the link it is on.
    p2p_rx: HashMap<(PeerId, u32), (Arc<Demux>, OpLink)>,
}

impl AsyncPeer {
    /// Runs one collective among `members` (view ranks, ascending, this peer among
    /// them), with retries over the same members while all of them survive.
    pub(crate) async fn run_sub(
        &mut self,
        members: &[Rank],
        coll: &Collective,
        dtype: DType,
        op: ReduceOp,
        buf: &mut [u8],
    ) -> Result<usize> {
        let view = self.current_view()?;
        let ids =
            members.iter().map(|&r| view.members.get(r).map(|m| m.id)).collect::<Option<Vec<PeerId>>>().ok_or_else(
                || Error::InvalidArgument(format!("sub-group {members:?} outside a group of {}", view.size())),
            )?;
        let attempts = match self.retry {
            RetryPolicy::Never => 1,
            RetryPolicy::OnPeerLost { max_attempts } => max_attempts.max(1),
        };
        let backup = buf.to_vec();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let view = self.current_view()?;
            let members = sub_members(&view, &ids)?;
            let set: Vec<PeerId> = members.iter().map(|&r| view.members[r].id).collect();
            let me = set
                .iter()
                .position(|&id| id == self.ops.id)
                .ok_or_else(|| Error::Removed { reason: format!("not in the view of epoch {}", view.epoch) })?;
            let plan = subgroup::plan_in_view(coll.plan(me, members.len(), dtype, &self.ops.tuning), &members);
            let counter = self.group.sub_seq.entry(set.clone()).or_insert(0);
            *counter += 1;
            let key = (view.epoch, subgroup::sub_key(&set, *counter));
            let fingerprint = subgroup::sub_fingerprint(coll.fingerprint(dtype, op), &set);
            let begin = ToMaster::SubOpBegin { epoch: key.0, seq: key.1, call: fingerprint, members: set };
            let result = self
                .ops
                .attempt_among(plan, dtype, op, None, coll.codec(), buf, &view, members[me], key, fingerprint, begin)
                .await;
            match result {
                Ok(()) => return Ok(members.len()),
                Err(e) => {
                    buf.copy_from_slice(&backup);
                    if !matches!(e, Error::PeerLost { .. }) || attempt >= attempts {
                        return Err(e);
                    }
                    let wait = tokio::time::timeout(self.wait_for_view, self.ops.control.view_after(view.epoch));
                    if let Ok(Err(removed)) = wait.await {
                        return Err(removed);
                    }
                    // A lost member ends the sub-group: the caller picks a new one.
                    let now = self.ops.control.view()?;
                    if ids.iter().any(|&id| now.rank_of(id).is_none()) {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// See [`crate::Communicator::send`].
    pub(crate) async fn send_p2p(&mut self, to: Rank, tag: u32, dtype: DType, data: &[u8]) -> Result<()> {
        let view = self.current_view()?;
        let peer = p2p_peer(&view, to, self.ops.id)?;
        let links = self.ops.links.clone();
        let chunk = self.ops.tuning.chunk_bytes;
        let send = async {
            let demux = links.get(&peer).await.map_err(|e| lost(to, e))?;
            p2p::send_message(&demux, p2p::p2p_key(view.epoch, tag), dtype, data, chunk, to).await
        };
        self.until_view_changes(&view, to, peer.id, send).await
    }

    /// See [`crate::Communicator::recv`].
    pub(crate) async fn recv_p2p(&mut self, from: Rank, tag: u32, dtype: DType, out: &mut [u8]) -> Result<()> {
        let view = self.current_view()?;
        let peer = p2p_peer(&view, from, self.ops.id)?;
        let demux = {
            let get = self.ops.links.get(&peer);
            let got = self.until_view_changes(&view, from, peer.id, async { get.await.map_err(|e| lost(from, e)) });
            got.await?
        };
        let key = p2p::p2p_key(view.epoch, tag);
        let entry = self.group.p2p_rx.entry((peer.id, tag)).or_insert_with(|| (demux.clone(), demux.op(key)));
        if !Arc::ptr_eq(&entry.0, &demux) {
            // The link was opened anew: the old queue is gone with the old link.
            *entry = (demux.clone(), demux.op(key));
        }
        let rx = &entry.1;
        let chunk = self.ops.tuning.chunk_bytes;
        let control = self.ops.control.clone();
        let recv = p2p::recv_message(rx, tag, dtype, out, chunk, from);
        until_view_changes(&control, &view, from, peer.id, recv).await
    }

    async fn until_view_changes<T>(
        &self,
        view: &View,
        rank: Rank,
        peer: PeerId,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        until_view_changes(&self.ops.control, view, rank, peer, work).await
    }
}

/// Runs `work` unless the view changes first: then [`Error::PeerLost`] if `peer`
/// (rank `rank` of `view`) left it, [`Error::Aborted`] otherwise.
async fn until_view_changes<T>(
    control: &crate::membership::client::ControlClient,
    view: &View,
    rank: Rank,
    peer: PeerId,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::select! {
        r = work => r,
        next = control.view_after(view.epoch) => match next {
            Ok(next) if next.rank_of(peer).is_none() => Err(Error::PeerLost {
                rank,
                reason: format!("left the view (now epoch {})", next.epoch),
            }),
            Ok(next) => Err(Error::Aborted {
                reason: format!("the view changed to epoch {} during a point-to-point transfer", next.epoch),
            }),
            Err(e) => Err(e),
        },
    }
}

/// The view ranks of the members with ids `ids`, ascending; `PeerLost` if one left.
fn sub_members(view: &View, ids: &[PeerId]) -> Result<Vec<Rank>> {
    let mut ranked = Vec::with_capacity(ids.len());
    for &id in ids {
        let rank = view.rank_of(id).ok_or_else(|| Error::PeerLost {
            rank: usize::MAX,
            reason: format!("sub-group member {id:#x} is not in the view of epoch {}", view.epoch),
        })?;
        ranked.push(rank);
    }
    ranked.sort_unstable();
    Ok(ranked)
}

fn p2p_peer(view: &View, rank: Rank, me: PeerId) -> Result<Member> {
    match view.members.get(rank) {
        Some(m) if m.id != me => Ok(m.clone()),
        _ => {
            Err(Error::InvalidArgument(format!("peer rank {rank} is this rank or outside a group of {}", view.size())))
        }
    }
}

fn lost(rank: Rank, e: crate::transport::LinkError) -> Error {
    Error::PeerLost { rank, reason: e.to_string() }
}
