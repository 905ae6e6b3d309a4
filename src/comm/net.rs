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

mod group;

use super::datalinks::DataLinks;
use crate::collective::{Collective, Tuning};
use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, Result};
use crate::exec::{execute, Call};
use crate::membership::client::{ControlClient, ControlConfig, OpSlot};
use crate::membership::wire::{OpResult, SyncStrategy, ToMaster, Transfer};
use crate::membership::{PeerId, View};
use crate::op::CustomOp;
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

/// A peer of a networked group, driven by the caller's async runtime.
///
/// [`crate::Communicator`] wraps one in a runtime of its own for blocking calls; tests
/// and simulations drive it directly (e.g. on a single-threaded runtime with paused
/// time, which makes a whole group's run deterministic).
pub struct AsyncPeer {
    ops: Ops,
    /// Admitted by the members' topology round, and no round or collective since:
    /// that round counts as this peer's first `update_topology`.
    fresh: bool,
    epoch: u64,
    next_seq: u64,
    retry: RetryPolicy,
    wait_for_view: Duration,
    accept_task: tokio::task::JoinHandle<()>,
    /// The copy of the caller's buffer that [`AsyncPeer::run`] restores on error, kept
    /// across calls: a fresh allocation of a large buffer is a fresh mapping, which costs
    /// a page fault per page on every call (see `docs/PERF.md`).
    backup: Vec<u8>,
    /// Calls in a row that did not use `backup`'s allocation.
    backup_idle: u32,
    /// Sub-group counters and point-to-point queues of the current epoch.
    group: group::EpochState,
}

/// A kept backup allocation is freed after this many calls in a row too small to use it.
const BACKUP_IDLE_CALLS: u32 = 64;

/// What running one collective needs; cheap to clone into a task.
#[derive(Clone)]
struct Ops {
    id: PeerId,
    control: Arc<ControlClient>,
    links: Arc<DataLinks>,
    tuning: Tuning,
}

impl AsyncPeer {
    /// Joins the group whose master is at `master`, over `endpoint`, and waits until
    /// admitted.
    pub async fn connect(
        endpoint: Arc<dyn Endpoint>,
        master: SocketAddr,
        options: ConnectOptions,
    ) -> Result<AsyncPeer> {
        let id = options.peer_id.unwrap_or_else(random_id);
        let links = DataLinks::new(id, endpoint.clone());
        let accept_task = tokio::spawn(links.clone().accept_loop());
        let control = ControlClient::join(&*endpoint, master, id, endpoint.local_addr(), options.control).await;
        let control = match control {
            Ok(c) => Arc::new(c),
            Err(e) => {
                accept_task.abort();
                return Err(e);
            }
        };
        // Admitted into a group that had members means the members' topology round
        // admitted us; admitted alone (into an empty group) means no round happened.
        let fresh = control.view().map(|v| v.size() > 1).unwrap_or(false);
        Ok(AsyncPeer {
            ops: Ops { id, control, links, tuning: options.tuning },
            fresh,
            epoch: 0,
            next_seq: 0,
            retry: options.retry,
            wait_for_view: options.control.heartbeat_interval * 20,
            accept_task,
            backup: Vec::new(),
            backup_idle: 0,
            group: group::EpochState::default(),
        })
    }

    /// This peer's id.
    pub fn id(&self) -> PeerId {
        self.ops.id
    }

    /// The current view, or why this peer is no longer a member.
    pub fn view(&self) -> Result<View> {
        self.ops.control.view()
    }

    fn view_or_empty(&self) -> View {
        self.view().unwrap_or_default()
    }

    /// This peer's rank in the current view (0 when it is not a member).
    pub fn rank(&self) -> Rank {
        self.view_or_empty().rank_of(self.ops.id).unwrap_or(0)
    }

    /// Members of the current view.
    pub fn size(&self) -> usize {
        self.view_or_empty().size()
    }

    /// Epoch of the current view.
    pub fn epoch(&self) -> u64 {
        self.view_or_empty().epoch
    }

    /// Ids of the current view's members, in rank order.
    pub fn members(&self) -> Vec<PeerId> {
        self.view_or_empty().members.iter().map(|m| m.id).collect()
    }

    /// Joiners waiting for admission.
    pub fn peers_pending(&self) -> usize {
        self.ops.control.pending_joiners() as usize
    }

    /// The next collective's key in the current view, and this peer's rank in it.
    fn next_op(&mut self) -> Result<(View, Rank, OpKey)> {
        let view = self.current_view()?;
        let rank = view
            .rank_of(self.ops.id)
            .ok_or_else(|| Error::Removed { reason: format!("not in the view of epoch {}", view.epoch) })?;
        self.next_seq += 1;
        Ok((view, rank, (self.epoch, self.next_seq)))
    }

    /// The current view, after moving this peer's per-epoch state to it.
    fn current_view(&mut self) -> Result<View> {
        self.fresh = false;
        let view = self.ops.control.view()?;
        if view.epoch != self.epoch {
            self.epoch = view.epoch;
            self.next_seq = 0;
            self.group = group::EpochState::default();
            self.ops.links.retain(&view);
        }
        Ok(view)
    }

    /// See [`crate::Communicator::update_topology`].
    pub async fn update_topology(&mut self) -> Result<()> {
        if std::mem::take(&mut self.fresh) {
            // The members admitted us in a round of their own; joining it is done.
            return self.ops.control.view().map(|_| ());
        }
        let seen = self.ops.control.state().rounds;
        let epoch = self.ops.control.view()?.epoch;
        tracing::debug!(peer = self.ops.id, epoch, "update_topology");
        self.ops.control.send(ToMaster::UpdateTopology { epoch });
        let view = self.ops.control.round_after(seen).await?;
        tracing::debug!(peer = self.ops.id, epoch = view.epoch, size = view.size(), "update_topology done");
        Ok(())
    }

    /// See [`crate::Communicator::all_reduce`].
    pub async fn all_reduce<T: crate::Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let coll = Collective::AllReduce { len: buf.len() };
        let contributors = self.run(&coll, T::DTYPE, op, bytemuck::cast_slice_mut(buf)).await?;
        super::finish_avg(op, T::DTYPE, bytemuck::cast_slice_mut(buf), contributors);
        Ok(())
    }

    /// Runs one collective, with retries as the policy says; returns the contributors.
    pub(crate) async fn run(&mut self, coll: &Collective, dtype: DType, op: ReduceOp, buf: &mut [u8]) -> Result<usize> {
        self.run_with(coll, dtype, op, None, buf).await
    }

    /// [`AsyncPeer::run`] with a user-defined operator in place of `op`.
    pub(crate) async fn run_with(
        &mut self,
        coll: &Collective,
        dtype: DType,
        op: ReduceOp,
        custom: Option<&dyn CustomOp>,
        buf: &mut [u8],
    ) -> Result<usize> {
        // The backup reuses the kept allocation when this call needs more than half of
        // it (growing it if needed); a smaller call copies into a temporary instead and
        // leaves it alone, until [`BACKUP_IDLE_CALLS`] calls in a row did not use it.
        // So a peer holds one extra copy of its largest recent buffer, no more. (A
        // cancelled call drops the allocation; the next call allocates anew.)
        let kept = std::mem::take(&mut self.backup);
        let (mut backup, kept) = if buf.len() > kept.capacity() / 2 {
            self.backup_idle = 0;
            let mut b = if buf.len() > kept.capacity() { Vec::with_capacity(buf.len()) } else { kept };
            b.clear();
            (b, None)
        } else {
            self.backup_idle += 1;
            (Vec::new(), (self.backup_idle < BACKUP_IDLE_CALLS).then_some(kept))
        };
        backup.extend_from_slice(buf);
        let result = self.run_restoring(coll, dtype, op, custom, buf, &backup).await;
        self.backup = kept.unwrap_or(backup);
        result
    }

    /// [`AsyncPeer::run`] with `backup` holding a copy of `buf`.
    async fn run_restoring(
        &mut self,
        coll: &Collective,
        dtype: DType,
        op: ReduceOp,
        custom: Option<&dyn CustomOp>,
        buf: &mut [u8],
        backup: &[u8],
    ) -> Result<usize> {
        let attempts = match self.retry {
            RetryPolicy::Never => 1,
            RetryPolicy::OnPeerLost { max_attempts } => max_attempts.max(1),
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (view, rank, key) = self.next_op()?;
            if let Some(n) = coll_size(coll).filter(|&n| n != view.size()) {
                // Nothing was announced: give the sequence number back, or this peer's
                // next collective would carry a number the others have not used.
                self.next_seq -= 1;
                return Err(Error::InvalidArgument(format!(
                    "per-rank counts for {n} ranks in a group of {}",
                    view.size()
                )));
            }
            match self.ops.attempt(coll, dtype, op, custom, buf, &view, rank, key).await {
                Ok(()) => return Ok(view.size()),
                Err(e) => {
                    buf.copy_from_slice(backup);
                    if !matches!(e, Error::PeerLost { .. }) || attempt >= attempts || coll_size(coll).is_some() {
                        return Err(e);
                    }
                    // Retry once the master has published the view without the lost peer.
                    let wait = tokio::time::timeout(self.wait_for_view, self.ops.control.view_after(view.epoch));
                    if let Ok(Err(removed)) = wait.await {
                        return Err(removed);
                    }
                }
            }
        }
    }

    /// For a collective made of several (a composite, such as a sparse all-reduce) that
    /// failed with `e` on its `attempt`-th try begun in view `epoch`: whether to run it
    /// again over the survivors, as [`RetryPolicy`] says. When it returns `true` the
    /// master has published a view after `epoch` (it waits a bounded time for one; an
    /// abort that changes no view is not retried).
    pub(crate) async fn retry_composite(&mut self, epoch: u64, attempt: u32, e: &Error) -> Result<bool> {
        let attempts = match self.retry {
            RetryPolicy::Never => 1,
            RetryPolicy::OnPeerLost { max_attempts } => max_attempts.max(1),
        };
        // A lost peer shows as `PeerLost`, or as `Aborted` where the master relays
        // another rank's failure; a part sized for the old view fails locally once the
        // view has moved on.
        let moved = self.view().is_ok_and(|v| v.epoch > epoch);
        if attempt >= attempts || !(moved || matches!(e, Error::PeerLost { .. } | Error::Aborted { .. })) {
            return Ok(false);
        }
        match tokio::time::timeout(self.wait_for_view, self.ops.control.view_after(epoch)).await {
            Ok(Err(removed)) => Err(removed),
            Ok(Ok(_)) => Ok(true),
            Err(_) => Ok(false),
        }
    }

    /// Starts one collective on an owned buffer and returns at once; the collective
    /// runs as a task. Traffic of concurrent collectives is kept apart by their keys.
    pub(crate) fn start(&mut self, coll: Collective, dtype: DType, op: ReduceOp, mut buf: Vec<u8>) -> Started {
        let next = self.next_op();
        let ops = self.ops.clone();
        tokio::spawn(async move {
            let (view, rank, key) = match next {
                Ok(n) => n,
                Err(e) => return (Err(e), buf),
            };
            let backup = buf.clone();
            match ops.attempt(&coll, dtype, op, None, &mut buf, &view, rank, key).await {
                Ok(()) => (Ok(view.size()), buf),
                Err(e) => (Err(e), backup),
            }
        })
    }

    /// See [`crate::Communicator::sync_shared_state`].
    pub async fn sync_shared_state(&mut self, state: &mut SharedState, strategy: SyncStrategy) -> Result<SyncReport> {
        let (view, rank, key) = self.next_op()?;
        self.ops.sync(state, strategy, &view, rank, key).await
    }

    /// Leaves the group gracefully.
    pub async fn leave(self) {
        self.ops.control.leave().await;
        self.ops.links.close_all();
    }
}

impl Drop for AsyncPeer {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.ops.links.close_all();
    }
}

/// A started collective: its result and its buffer (restored on error).
pub(crate) type Started = tokio::task::JoinHandle<(Result<usize>, Vec<u8>)>;

impl Ops {
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        coll: &Collective,
        dtype: DType,
        op: ReduceOp,
        custom: Option<&dyn CustomOp>,
        buf: &mut [u8],
        view: &View,
        rank: Rank,
        key: OpKey,
    ) -> Result<()> {
        let fingerprint = coll.fingerprint(dtype, op);
        let begin = ToMaster::OpBegin { epoch: key.0, seq: key.1, call: fingerprint };
        let plan = coll.plan(rank, view.size(), dtype, &self.tuning);
        self.attempt_among(plan, dtype, op, custom, coll.codec(), buf, view, rank, key, fingerprint, begin).await
    }

    /// Runs `plan` (its peers named by view ranks: the whole view's, or a sub-group's)
    /// as view rank `rank`, announced to the master by `begin`.
    #[allow(clippy::too_many_arguments)]
    async fn attempt_among(
        &self,
        plan: crate::plan::Plan,
        dtype: DType,
        op: ReduceOp,
        custom: Option<&dyn CustomOp>,
        codec: Option<crate::quant::Codec>,
        buf: &mut [u8],
        view: &View,
        rank: Rank,
        key: OpKey,
        fingerprint: u64,
        begin: ToMaster,
    ) -> Result<()> {
        let slot = self.control.slot(key);
        self.control.send(begin);
        let links = self.links.for_op(view, rank, key);
        let call = Call {
            plan: &plan,
            dtype,
            op,
            epoch: key.0,
            seq: key.1,
            fingerprint,
            chunk_bytes: self.tuning.chunk_bytes,
            custom,
            codec,
        };
        tracing::debug!(peer = self.id, ?key, rank, size = plan.size, "collective begins");
        let local = execute(&call, buf, &links, &slot.abort, 0..plan.steps.len()).await;
        tracing::debug!(peer = self.id, ?key, ok = local.is_ok(), "collective ran locally");
        let result = self.conclude(key, &slot, local).await;
        tracing::debug!(peer = self.id, ?key, ?result, "collective decided");
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
        match local {
            Ok(()) => slot.decision().await,
            // A mismatch is the group's error: return it only once the master has decided
            // (it aborts for every member on this report), so that a caller that gives up
            // and exits at once cannot take the report down with it and leave the others
            // to time out on a lost peer instead of getting the mismatch.
            Err(e @ Error::Mismatch { .. }) => {
                let _ = slot.decision().await;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    async fn sync(
        &self,
        state: &mut SharedState,
        strategy: SyncStrategy,
        view: &View,
        rank: Rank,
        key: OpKey,
    ) -> Result<SyncReport> {
        let slot = self.control.slot(key);
        self.control.send(ToMaster::SyncState { epoch: key.0, seq: key.1, strategy, tensors: state.digests() });
        let links = self.links.for_op(view, rank, key);
        let result = async {
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
        }
        .await;
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
}

/// The blocking backend of [`crate::Communicator`]: an [`AsyncPeer`] on a runtime of
/// its own.
pub(crate) struct Net {
    runtime: Arc<tokio::runtime::Runtime>,
    peer: Option<AsyncPeer>,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("phalanx")
        .build()
        .map_err(|e| Error::Runtime { reason: format!("cannot start the runtime: {e}") })
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
        let peer = runtime.block_on(async { AsyncPeer::connect(make_endpoint()?, master, options).await })?;
        Ok(Net { runtime, peer: Some(peer) })
    }

    pub(crate) fn peer(&self) -> &AsyncPeer {
        self.peer.as_ref().expect("present until dropped") // ok: only `leave` takes it, consuming self
    }

    fn peer_mut(&mut self) -> &mut AsyncPeer {
        self.peer.as_mut().expect("present until dropped") // ok: only `leave` takes it, consuming self
    }

    pub(crate) fn update_topology(&mut self) -> Result<()> {
        let rt = self.runtime.clone();
        rt.block_on(self.peer_mut().update_topology())
    }

    pub(crate) fn retry_composite(&mut self, epoch: u64, attempt: u32, e: &Error) -> Result<bool> {
        let rt = self.runtime.clone();
        rt.block_on(self.peer_mut().retry_composite(epoch, attempt, e))
    }

    pub(crate) fn run_with(
        &mut self,
        coll: &Collective,
        dtype: DType,
        op: ReduceOp,
        custom: Option<&dyn CustomOp>,
        buf: &mut [u8],
    ) -> Result<usize> {
        let rt = self.runtime.clone();
        rt.block_on(self.peer_mut().run_with(coll, dtype, op, custom, buf))
    }

    pub(crate) fn run_sub(
        &mut self,
        members: &[Rank],
        coll: &Collective,
        dtype: DType,
        op: ReduceOp,
        buf: &mut [u8],
    ) -> Result<usize> {
        let rt = self.runtime.clone();
        rt.block_on(self.peer_mut().run_sub(members, coll, dtype, op, buf))
    }

    pub(crate) fn send_p2p(&mut self, to: Rank, tag: u32, dtype: DType, data: &[u8]) -> Result<()> {
        let rt = self.runtime.clone();
        rt.block_on(self.peer_mut().send_p2p(to, tag, dtype, data))
    }

    pub(crate) fn recv_p2p(&mut self, from: Rank, tag: u32, dtype: DType, out: &mut [u8]) -> Result<()> {
        let rt = self.runtime.clone();
        rt.block_on(self.peer_mut().recv_p2p(from, tag, dtype, out))
    }

    pub(crate) fn start(
        &mut self,
        coll: Collective,
        dtype: DType,
        op: ReduceOp,
        buf: Vec<u8>,
    ) -> (Started, Arc<tokio::runtime::Runtime>) {
        let rt = self.runtime.clone();
        let _guard = rt.enter();
        (self.peer_mut().start(coll, dtype, op, buf), rt.clone())
    }

    pub(crate) fn sync_shared_state(&mut self, state: &mut SharedState, strategy: SyncStrategy) -> Result<SyncReport> {
        let rt = self.runtime.clone();
        rt.block_on(self.peer_mut().sync_shared_state(state, strategy))
    }

    pub(crate) fn leave(mut self) {
        if let Some(peer) = self.peer.take() {
            self.runtime.block_on(peer.leave());
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Drop the peer inside the runtime so that its tasks are cancelled cleanly.
        let _guard = self.runtime.enter();
        self.peer.take();
    }
}

/// The group size a collective's per-rank counts assume, if it has any.
fn coll_size(coll: &Collective) -> Option<usize> {
    match coll {
        Collective::ReduceScatter { counts } | Collective::AllGather { counts } => Some(counts.len()),
        Collective::AllToAll { counts } => Some(counts.len()),
        Collective::SparseAllGather { placement } | Collective::SparseReduceScatter { placement } => {
            Some(placement.size())
        }
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
