//! The networked backend: a peer of a group held together by a master.
//!
//! Every collective is announced to the master (`OpBegin`, so mismatched calls are
//! caught even when they would never exchange a frame), run over the data links, and
//! reported (`OpEnd`); the result is kept only when the master commits it. On abort the
//! buffer is restored from a copy, and with [`RetryPolicy::OnPeerLost`] the collective
//! runs again over the survivors once the master has published the new view.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::datalinks::DataLinks;
use crate::collective::{Collective, Tuning};
use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, Result};
use crate::exec::{execute, Call};
use crate::membership::client::{ControlClient, ControlConfig, OpSlot};
use crate::membership::wire::{OpResult, SyncStrategy, ToMaster, Transfer};
use crate::membership::{PeerId, View};
use crate::plan::Rank;
use crate::state::{digest, SharedState};
use crate::transport::demux::OpKey;
use crate::transport::endpoint::Endpoint;
use crate::transport::quic::{QuicConfig, QuicEndpoint};
use crate::transport::{Frame, Header, Link};

/// What a collective does when a peer is lost while it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryPolicy {
    /// Return [`Error::PeerLost`]; the caller decides.
    Never,
    /// Run again over the survivors, up to `max_attempts` times in all.
    OnPeerLost {
        /// Attempts in all, the first included.
        max_attempts: u32,
    },
}

/// How to join a group.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Where this peer accepts data links (default `127.0.0.1:0`: loopback, any port).
    pub bind: SocketAddr,
    /// This peer's id; random when `None`.
    pub peer_id: Option<PeerId>,
    /// Heartbeats and join timeout.
    pub control: ControlConfig,
    /// Algorithm choices; must be equal on every peer.
    pub tuning: Tuning,
    /// Behaviour when a peer is lost mid-collective.
    pub retry: RetryPolicy,
    /// QUIC settings, the cluster secret among them.
    pub quic: QuicConfig,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            peer_id: None,
            control: ControlConfig::default(),
            tuning: Tuning::default(),
            retry: RetryPolicy::Never,
            quic: QuicConfig::default(),
        }
    }
}

/// What a shared-state sync did on this peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Tensors this peer received.
    pub tensors_received: usize,
    /// Bytes this peer received.
    pub bytes_received: usize,
    /// Tensors this peer sent.
    pub tensors_sent: usize,
}

pub(crate) struct Net {
    runtime: Arc<tokio::runtime::Runtime>,
    id: PeerId,
    control: ControlClient,
    links: Arc<DataLinks>,
    epoch: u64,
    next_seq: u64,
    tuning: Tuning,
    retry: RetryPolicy,
    wait_for_view: Duration,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("phalanx")
        .build()
        .map_err(|e| Error::InvalidArgument(format!("cannot start the runtime: {e}")))
}

impl Net {
    pub(crate) fn connect_quic(master: SocketAddr, options: ConnectOptions) -> Result<Net> {
        let (bind, quic) = (options.bind, options.quic.clone());
        Net::connect(
            move || {
                let ep = QuicEndpoint::bind(bind, quic).map_err(|e| Error::JoinFailed { reason: e.to_string() })?;
                Ok(Arc::new(ep) as Arc<dyn Endpoint>)
            },
            master,
            options,
        )
    }

    pub(crate) fn connect(
        make_endpoint: impl FnOnce() -> Result<Arc<dyn Endpoint>>,
        master: SocketAddr,
        options: ConnectOptions,
    ) -> Result<Net> {
        let runtime = Arc::new(runtime()?);
        let id = options.peer_id.unwrap_or_else(random_id);
        let (control, links) = runtime.block_on(async {
            let endpoint = make_endpoint()?;
            let links = DataLinks::new(id, endpoint.clone());
            tokio::spawn(links.clone().accept_loop());
            let control = ControlClient::join(&*endpoint, master, id, endpoint.local_addr(), options.control).await?;
            Ok::<_, Error>((control, links))
        })?;
        Ok(Net {
            runtime,
            id,
            control,
            links,
            epoch: 0,
            next_seq: 0,
            tuning: options.tuning,
            retry: options.retry,
            wait_for_view: options.control.heartbeat_interval * 20,
        })
    }

    pub(crate) fn id(&self) -> PeerId {
        self.id
    }

    fn view_or_empty(&self) -> View {
        self.control.view().unwrap_or_default()
    }

    pub(crate) fn rank(&self) -> Rank {
        self.view_or_empty().rank_of(self.id).unwrap_or(0)
    }

    pub(crate) fn size(&self) -> usize {
        self.view_or_empty().size()
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.view_or_empty().epoch
    }

    pub(crate) fn members(&self) -> Vec<PeerId> {
        self.view_or_empty().members.iter().map(|m| m.id).collect()
    }

    pub(crate) fn peers_pending(&self) -> usize {
        self.control.pending_joiners() as usize
    }

    /// The next collective's key in the current view, and this peer's rank in it.
    fn next_op(&mut self) -> Result<(View, Rank, OpKey)> {
        let view = self.control.view()?;
        if view.epoch != self.epoch {
            self.epoch = view.epoch;
            self.next_seq = 0;
            self.links.retain(&view);
        }
        let rank = view
            .rank_of(self.id)
            .ok_or_else(|| Error::Removed { reason: format!("not in the view of epoch {}", view.epoch) })?;
        self.next_seq += 1;
        Ok((view, rank, (self.epoch, self.next_seq)))
    }

    pub(crate) fn update_topology(&mut self) -> Result<()> {
        let seen = self.control.state().updates;
        let epoch = self.control.view()?.epoch;
        self.control.send(ToMaster::UpdateTopology { epoch });
        self.runtime.block_on(self.control.next_view(seen)).map(|_| ())
    }

    pub(crate) fn run(&mut self, coll: &Collective, dtype: DType, op: ReduceOp, buf: &mut [u8]) -> Result<usize> {
        let attempts = match self.retry {
            RetryPolicy::Never => 1,
            RetryPolicy::OnPeerLost { max_attempts } => max_attempts.max(1),
        };
        let backup = buf.to_vec();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (view, rank, key) = self.next_op()?;
            if let Some(n) = coll_size(coll).filter(|&n| n != view.size()) {
                return Err(Error::InvalidArgument(format!(
                    "per-rank counts for {n} ranks in a group of {}",
                    view.size()
                )));
            }
            let result = self.attempt(coll, dtype, op, buf, &view, rank, key);
            match result {
                Ok(()) => return Ok(view.size()),
                Err(e) => {
                    buf.copy_from_slice(&backup);
                    if !matches!(e, Error::PeerLost { .. }) || attempt >= attempts || coll_size(coll).is_some() {
                        return Err(e);
                    }
                    // Retry once the master has published the view without the lost peer.
                    let wait =
                        async { tokio::time::timeout(self.wait_for_view, self.control.view_after(view.epoch)).await };
                    if let Ok(Err(removed)) = self.runtime.block_on(wait) {
                        return Err(removed);
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn attempt(
        &self,
        coll: &Collective,
        dtype: DType,
        op: ReduceOp,
        buf: &mut [u8],
        view: &View,
        rank: Rank,
        key: OpKey,
    ) -> Result<()> {
        let slot = self.control.slot(key);
        let fingerprint = coll.fingerprint(dtype, op);
        self.control.send(ToMaster::OpBegin { epoch: key.0, seq: key.1, call: fingerprint });
        let plan = coll.plan(rank, view.size(), dtype, &self.tuning);
        let links = self.links.for_op(view, rank, key);
        let call = Call {
            plan: &plan,
            dtype,
            op,
            epoch: key.0,
            seq: key.1,
            fingerprint,
            chunk_bytes: self.tuning.chunk_bytes,
        };
        let result = self.runtime.block_on(async {
            let local = execute(&call, buf, &links, &slot.abort, 0..plan.steps.len()).await;
            self.conclude(key, &slot, local).await
        });
        self.links.finish(key);
        self.control.forget(key);
        result
    }

    /// Reports the local result and waits for the master's decision.
    async fn conclude(&self, key: OpKey, slot: &OpSlot, local: Result<()>) -> Result<()> {
        let result = match &local {
            Ok(()) => OpResult::Ok,
            Err(Error::Mismatch { detail }) => OpResult::Mismatch(detail.clone()),
            Err(e) => OpResult::Failed(e.to_string()),
        };
        self.control.send(ToMaster::OpEnd { epoch: key.0, seq: key.1, result });
        local?;
        slot.decision().await
    }

    pub(crate) fn sync_shared_state(&mut self, state: &mut SharedState, strategy: SyncStrategy) -> Result<SyncReport> {
        let (view, rank, key) = self.next_op()?;
        let slot = self.control.slot(key);
        self.control.send(ToMaster::SyncState { epoch: key.0, seq: key.1, strategy, tensors: state.digests() });
        let links = self.links.for_op(&view, rank, key);
        let result = self.runtime.block_on(async {
            let plan = slot.sync_plan().await?;
            let local = tokio::select! {
                biased;
                e = slot.abort.wait() => Err(e),
                r = transfer(state, &plan.transfers, rank, &links, key, self.tuning.chunk_bytes) => r,
            };
            let local = local.and_then(|done| verify(state, &plan.agreed, &done.1).map(|()| done));
            let (outcome, done) = match local {
                Ok(done) => (Ok(()), done),
                Err(e) => (Err(e), (0, Vec::new())),
            };
            self.conclude(key, &slot, outcome).await?;
            Ok::<_, Error>((plan.agreed, done.1, done.0))
        });
        self.links.finish(key);
        self.control.forget(key);
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

    pub(crate) fn leave(self) {
        self.runtime.block_on(self.control.leave());
        self.links.close_all();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.links.close_all();
    }
}

/// The group size a collective's per-rank counts assume, if it has any.
fn coll_size(coll: &Collective) -> Option<usize> {
    match coll {
        Collective::ReduceScatter { counts } | Collective::AllGather { counts } => Some(counts.len()),
        _ => None,
    }
}

fn random_id() -> PeerId {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS per process; mixing in time and pid makes
    // collisions between peers started at once vanishingly unlikely.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
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
            for (i, chunk) in chunks(bytes.len(), chunk_bytes).enumerate() {
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
            for chunk in chunks(len, chunk_bytes) {
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
fn verify(state: &SharedState, agreed: &[(u64, crate::membership::wire::Digest)], received: &Received) -> Result<()> {
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

fn chunks(len: usize, chunk: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let chunk = chunk.max(1);
    let count = len.div_ceil(chunk).max(1);
    (0..count).map(move |k| (k * chunk).min(len)..((k + 1) * chunk).min(len))
}
