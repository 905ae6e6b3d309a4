//! Shared-state sync: the master compares every member's tensor digests and plans who
//! sends what to whom; the members move the tensors over their data links, check the
//! received bytes against the agreed digests, and commit through the master like any
//! collective.

use std::sync::Arc;

use super::datalinks::DataLinks;
use super::options::SyncReport;
use crate::error::{Error, Result};
use crate::exec::chunk_ranges;
use crate::membership::client::ControlClient;
use crate::membership::peer::OpKind;
use crate::membership::protocol::Transfer;
use crate::plan::Rank;
use crate::state::{digest, Digest, SharedState, SyncStrategy};
use crate::transport::demux::OpKey;
use crate::transport::{Frame, Header, Link};

/// See [`crate::Communicator::sync_shared_state`].
pub(crate) async fn run(
    control: &ControlClient,
    links: &Arc<DataLinks>,
    chunk_bytes: usize,
    state: &mut SharedState,
    strategy: SyncStrategy,
) -> Result<SyncReport> {
    let (begun, signal) = control.begin(OpKind::Sync { strategy, tensors: state.digests() }, None)?;
    let (key, rank) = (begun.key, begun.rank);
    links.enter(&begun.view);
    let op_links = links.for_op(&begun.view, rank, key);
    let result = async {
        let plan = tokio::select! {
            biased;
            e = signal.wait() => Err(e),
            p = control.sync_plan(key) => p,
        }?;
        let local = tokio::select! {
            biased;
            e = signal.wait() => Err(e),
            r = transfer(state, &plan.transfers, rank, &op_links, key, chunk_bytes) => r,
        };
        let local = local.and_then(|done| verify(state, &plan.agreed, &done.1).map(|()| done));
        let (outcome, done) = match local {
            Ok(done) => (Ok(()), done),
            Err(e) => (Err(e), (0, Vec::new())),
        };
        control.conclude(key, outcome).await?;
        Ok::<_, Error>((plan.agreed, done.1, done.0))
    }
    .await;
    links.finish(key);
    control.finish(key);
    let (agreed, received, tensors_sent) = result?;
    let mut report = SyncReport { tensors_sent, ..SyncReport::default() };
    for (t, bytes) in &received {
        state.set_bytes(*t, bytes);
        report.tensors_received += 1;
        report.bytes_received += bytes.len();
    }
    if let Some((rev, _)) = agreed.iter().max_by_key(|(rev, _)| *rev) {
        state.revision = *rev;
    }
    Ok(report)
}

type Received = Vec<(usize, Vec<u8>)>;

/// Sends this rank's tensors and receives the ones it lacks, concurrently.
async fn transfer(
    state: &SharedState,
    transfers: &[Transfer],
    rank: Rank,
    links: &[Option<Arc<dyn Link>>],
    key: OpKey,
    chunk_bytes: usize,
) -> Result<(usize, Received)> {
    let link = |r: u32| {
        links.get(r as usize).and_then(Option::as_ref).ok_or_else(|| Error::Protocol {
            peer: r as usize,
            detail: "sync plan names a rank outside the view".into(),
        })
    };
    let header = |index: u64| Header { epoch: key.0, seq: key.1, call: 0, index };
    let sends = async {
        let mut sent = 0;
        for t in transfers.iter().filter(|t| t.from as usize == rank) {
            let bytes = state.bytes(t.tensor as usize).ok_or_else(|| missing(t.tensor))?;
            let to = link(t.to)?;
            for (i, chunk) in chunk_ranges(bytes.len(), 1, chunk_bytes).enumerate() {
                let frame = Frame { header: header(i as u64), payload: bytes::Bytes::copy_from_slice(&bytes[chunk]) };
                to.send(frame).await.map_err(|e| lost(t.to, e))?;
            }
            sent += 1;
        }
        Ok::<_, Error>(sent)
    };
    let recvs = async {
        let mut received = Vec::new();
        for t in transfers.iter().filter(|t| t.to as usize == rank) {
            let len = state.bytes(t.tensor as usize).ok_or_else(|| missing(t.tensor))?.len();
            let from = link(t.from)?;
            let mut buf = vec![0u8; len];
            for chunk in chunk_ranges(len, 1, chunk_bytes) {
                let frame = from.recv().await.map_err(|e| lost(t.from, e))?;
                if frame.payload.len() != chunk.len() {
                    return Err(Error::Mismatch {
                        detail: format!("tensor {} has a different size on rank {}", t.tensor, t.from),
                    });
                }
                buf[chunk].copy_from_slice(&frame.payload);
            }
            received.push((t.tensor as usize, buf));
        }
        Ok(received)
    };
    tokio::try_join!(sends, recvs)
}

/// Checks that every received tensor hashes to the agreed content.
fn verify(state: &SharedState, agreed: &[(u64, Digest)], received: &Received) -> Result<()> {
    for (t, bytes) in received {
        let dtype = state.dtype(*t).ok_or_else(|| missing(*t as u32))?;
        let want = agreed.get(*t).map(|(_, d)| *d);
        if want != Some(digest(dtype, bytes)) {
            return Err(Error::Mismatch { detail: format!("received tensor {t} does not hash to the agreed content") });
        }
    }
    Ok(())
}

fn missing(t: u32) -> Error {
    Error::Mismatch { detail: format!("sync plan names tensor {t}, which this peer does not have") }
}

fn lost(peer: u32, e: crate::transport::LinkError) -> Error {
    Error::PeerLost { rank: peer as usize, reason: e.to_string() }
}
