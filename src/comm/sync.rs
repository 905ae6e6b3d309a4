//! Shared-state sync: the master compares every member's tensor digests and plans who
//! sends what to whom; the members move the tensors over their data links, check the
//! received bytes against the agreed digests, and commit through the master like any
//! collective.

use std::sync::Arc;

use super::datalinks::DataLinks;
use super::options::SyncReport;
use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, Result};
use crate::exec::{execute, execute_send, AbortSignal, Call, Delivery};
use crate::membership::client::ControlClient;
use crate::membership::peer::OpKind;
use crate::membership::protocol::Transfer;
use crate::plan::{self, Plan, Rank};
use crate::state::{digest, Digest, SharedState, SyncStrategy};
use crate::transport::demux::OpKey;
use crate::transport::Link;

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

/// Sends this rank's tensors and receives the ones it lacks, concurrently: each
/// tensor is a one-step transfer plan the executor runs, sends in the plan's order and
/// receives in the plan's order, so both ends of a link agree on which frames are which.
async fn transfer(
    state: &SharedState,
    transfers: &[Transfer],
    rank: Rank,
    links: &[Option<Arc<dyn Link>>],
    key: OpKey,
    chunk_bytes: usize,
) -> Result<(usize, Received)> {
    let size = links.len();
    let check = |r: u32| {
        if (r as usize) < size && r as usize != rank {
            Ok(r as usize)
        } else {
            Err(Error::Protocol { peer: r as usize, detail: "sync plan names a rank outside the view".into() })
        }
    };
    let abort = AbortSignal::new();
    let sends = async {
        let mut sent = 0;
        for t in transfers.iter().filter(|t| t.from as usize == rank) {
            let bytes = state.bytes(t.tensor as usize).ok_or_else(|| missing(t.tensor))?;
            let plan = plan::transfer::send(rank, size, bytes.len(), check(t.to)?);
            execute_send(&tensor_call(&plan, t.tensor, key, chunk_bytes), bytes, links, &abort).await?;
            sent += 1;
        }
        Ok::<_, Error>(sent)
    };
    let recvs = async {
        let mut received = Vec::new();
        for t in transfers.iter().filter(|t| t.to as usize == rank) {
            let len = state.bytes(t.tensor as usize).ok_or_else(|| missing(t.tensor))?.len();
            let plan = plan::transfer::recv(rank, size, len, check(t.from)?);
            let mut buf = vec![0u8; len];
            execute(&tensor_call(&plan, t.tensor, key, chunk_bytes), &mut buf, links, &abort, 0..1).await?;
            received.push((t.tensor as usize, buf));
        }
        Ok(received)
    };
    tokio::try_join!(sends, recvs)
}

/// The executor's call for moving tensor `tensor` by `plan`: bytes, fingerprinted by
/// the tensor's index and length, so a tensor of another size on the sender is a
/// [`Error::Mismatch`] at its first frame.
fn tensor_call(plan: &Plan, tensor: u32, key: OpKey, chunk_bytes: usize) -> Call<'_> {
    Call {
        plan,
        dtype: DType::U8,
        op: ReduceOp::Sum, // nothing is reduced
        epoch: key.0,
        seq: key.1,
        fingerprint: (tensor as u64) << 48 ^ plan.len as u64,
        chunk_bytes,
        custom: None,
        codec: None,
        delivery: Delivery::InPlace, // into a fresh buffer, dropped on error
    }
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
