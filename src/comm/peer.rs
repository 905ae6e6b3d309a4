//! The one peer path: [`AsyncPeer`], a member of a group held together by a master.
//!
//! Every collective, whole-group or sub-group, in-process or over QUIC, goes the same
//! way: the peer state machine numbers it and the master hears of it (`OpBegin`, so
//! mismatched calls are caught even when they would never exchange a frame); the
//! executor runs its plan over the data links; the local result is reported (`OpEnd`)
//! and kept only when the master commits, or, for an eager collective (see
//! [`super::eager`]), once every member said over the data links that it completed. On any failure the buffer is restored from
//! what the executor saved before each write ([`Undo`](crate::exec::Undo)), and [`RetryPolicy`] (through [`PeerState::retry`]) decides whether to
//! run again over the survivors once the master has published the new view.
//!
//! [`PeerState::retry`]: crate::membership::peer::PeerState::retry

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

mod chain;

use super::datalinks::DataLinks;
use super::options::{ConnectOptions, DataTransport, RetryPolicy, SyncReport};
use super::p2p::Dir;
use super::{eager, subgroup, sync};
use crate::collective::{Collective, Tuning};
use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, Result};
use crate::exec::AbortSignal;
use crate::exec::{execute, execute_saving, Call, Undo};
use crate::membership::client::ControlClient;
use crate::membership::liveness;
use crate::membership::peer::{Begun, OpKind, PeerConfig, Retry};
use crate::membership::protocol::ToMaster;
use crate::membership::{PeerId, View};
use crate::op::CustomOp;
use crate::plan::Rank;
use crate::state::{SharedState, SyncStrategy};
use crate::transport::endpoint::Endpoint;
use crate::transport::tcp::{TcpConfig, TcpEndpoint, TcpOrQuic, TcpSecurity};

/// The endpoint this peer's data links run over, beside `control` (the endpoint of its
/// control connection): `control` itself for [`DataTransport::Quic`] and
/// [`DataTransport::Auto`] (the caller's endpoint; `Communicator::connect` resolves
/// `Auto` before it gets here), or a [`TcpEndpoint`] listening at the same address on
/// the TCP side, which falls back to `control` for peers with no TCP path
/// ([`TcpOrQuic`]).
pub(crate) fn data_endpoint(control: &Arc<dyn Endpoint>, options: &ConnectOptions) -> Result<Arc<dyn Endpoint>> {
    let security = match options.data_transport {
        DataTransport::Auto | DataTransport::Quic => return Ok(control.clone()),
        DataTransport::Tcp => TcpSecurity::Tls,
        DataTransport::TcpPlaintext => TcpSecurity::Plaintext,
    };
    let addr = control.local_addr();
    let tcp =
        TcpEndpoint::bind(addr, TcpConfig::from_quic(&options.quic, security)).map_err(|e| Error::JoinFailed {
            reason: format!(
                "{security} data links need TCP port {} beside the QUIC one: {e} (another process may hold it; \
             bind another port, or choose the QUIC data transport)",
                addr.port()
            ),
        })?;
    Ok(Arc::new(TcpOrQuic::new(tcp, control.clone())))
}

/// One call as the front hands it down: what to run, on which elements, with which
/// operator (a user-defined one replaces `op`).
#[derive(Clone, Copy)]
pub(crate) struct CallSpec<'a> {
    pub(crate) coll: &'a Collective,
    pub(crate) dtype: DType,
    pub(crate) op: ReduceOp,
    pub(crate) custom: Option<&'a dyn CustomOp>,
}

impl<'a> CallSpec<'a> {
    pub(crate) fn new(coll: &'a Collective, dtype: DType, op: ReduceOp) -> CallSpec<'a> {
        CallSpec { coll, dtype, op, custom: None }
    }
}

/// Who runs a collective: the whole view, or the members with these ids.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Scope<'a> {
    Whole,
    Sub(&'a [PeerId]),
}

/// A peer of a group, driven by the caller's async runtime.
///
/// [`crate::Communicator`] wraps one in a runtime of its own for blocking calls; tests
/// and simulations drive it directly (e.g. on a single-threaded runtime with paused
/// time, which makes a whole group's run deterministic).
pub struct AsyncPeer {
    ops: Ops,
    retry: RetryPolicy,
    /// How long a retry waits for the master's next view.
    wait_for_view: Duration,
    accept_task: tokio::task::JoinHandle<()>,
    /// What the current call overwrote, kept from call to call for its allocation.
    undo: Undo,
    p2p: Arc<super::p2p::Queues>,
    /// The liveness connection to the master, held open while this peer lives.
    /// Holds a liveness connection to the master followed now (see `membership::liveness`).
    liveness: Option<tokio::task::JoinHandle<()>>,
}

/// What running one collective needs; cheap to clone into a task.
#[derive(Clone)]
struct Ops {
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
        AsyncPeer::connect_as(endpoint, master, options, PeerConfig::default()).await
    }

    /// [`AsyncPeer::connect`] with protocol settings of the peer's own.
    pub(crate) async fn connect_as(
        endpoint: Arc<dyn Endpoint>,
        master: SocketAddr,
        options: ConnectOptions,
        peer: PeerConfig,
    ) -> Result<AsyncPeer> {
        let id = options.peer_id.unwrap_or_else(random_id);
        // Data links to peers on this host move to shared memory (transport::shm); the
        // others use the chosen network transport.
        let network = data_endpoint(&endpoint, &options)?;
        let data_endpoint = crate::transport::shm::ShmEndpoint::wrap(network, options.shm_config());
        let links = DataLinks::new(id, data_endpoint, options.queue_frames);
        let accept_task = tokio::spawn(links.clone().accept_loop());
        let data_addr = options.advertise.unwrap_or_else(|| endpoint.local_addr());
        // A caller that retries by hand settles every view change with update_topology.
        let peer = PeerConfig {
            settle_view_changes: options.retry == RetryPolicy::Never,
            closed: peer.closed || options.closed,
            ..peer
        };
        let masters: Vec<SocketAddr> = std::iter::once(master).chain(options.standby_masters.iter().copied()).collect();
        let control = ControlClient::join(endpoint.clone(), &masters, id, data_addr, options.control, peer).await;
        let control = match control {
            Ok(c) => Arc::new(c),
            Err(e) => {
                accept_task.abort();
                return Err(e);
            }
        };
        let witness = Arc::downgrade(&control);
        links.on_unreachable(move |epoch, peer| {
            if let Some(control) = witness.upgrade() {
                control.send(ToMaster::Unreachable { epoch, peer });
            }
        });
        let liveness = if options.liveness {
            let mut masters = control.master_changes();
            let master = *masters.borrow_and_update();
            let held = liveness::register(master, id, options.quic.secret.as_deref())
                .await
                .inspect_err(|e| tracing::debug!(peer = id, %master, "no liveness connection ({e}): heartbeats only"))
                .ok();
            let control = Arc::downgrade(&control);
            let gone = move || {
                if let Some(control) = control.upgrade() {
                    control.master_process_gone();
                }
            };
            Some(tokio::spawn(liveness::follow(held, masters, id, options.quic.secret.clone(), gone)))
        } else {
            None
        };
        Ok(AsyncPeer {
            liveness,
            ops: Ops { control, links, tuning: options.tuning },
            retry: options.retry,
            wait_for_view: options.control.heartbeat_interval * 20,
            accept_task,
            undo: Undo::default(),
            p2p: Default::default(),
        })
    }

    /// This peer's id.
    pub fn id(&self) -> PeerId {
        self.ops.control.id()
    }

    /// The current view, or why this peer is no longer a member.
    pub fn view(&self) -> Result<View> {
        self.ops.control.view()
    }

    /// This peer's rank and the group's size in the view a collective begun now would
    /// run in; see [`crate::membership::PeerState::call_view`].
    pub(crate) fn call_group(&self) -> Result<(Rank, usize)> {
        let view = self.ops.control.call_view()?;
        Ok((view.rank_of(self.id()).unwrap_or(0), view.size()))
    }

    fn view_or_empty(&self) -> View {
        self.view().unwrap_or_default()
    }

    /// This peer's rank in the current view (0 when it is not a member).
    pub fn rank(&self) -> Rank {
        self.view_or_empty().rank_of(self.id()).unwrap_or(0)
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

    /// See [`crate::Communicator::device_unique_id`].
    pub async fn device_unique_id(&self, epoch: u64, offer: Option<([u8; 128], bool)>) -> Result<([u8; 128], bool)> {
        let (_, id, grow) = self.ops.control.device_id(epoch, 0, offer).await?;
        Ok((id, grow))
    }

    /// See [`crate::Communicator::device_unique_id_at`].
    pub async fn device_unique_id_at(
        &self,
        epoch: u64,
        generation: u32,
        offer: Option<([u8; 128], bool)>,
    ) -> Result<crate::membership::peer::GenerationId> {
        self.ops.control.device_id(epoch, generation, offer).await
    }

    /// See [`crate::Communicator::device_relayed`].
    pub fn device_relayed(&self, epoch: u64) -> Option<crate::membership::peer::GenerationId> {
        self.ops.control.device_relayed(epoch)
    }

    /// See [`crate::Communicator::update_topology`].
    pub async fn update_topology(&mut self) -> Result<()> {
        self.ops.control.update_topology().await
    }

    /// See [`crate::Communicator::all_reduce`].
    pub async fn all_reduce<T: crate::Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let coll = Collective::AllReduce { len: buf.len() };
        self.run(CallSpec::new(&coll, T::DTYPE, op), Scope::Whole, bytemuck::cast_slice_mut(buf)).await
    }

    /// The ids of the members at view ranks `members` (any order).
    pub(crate) fn ids_of(&self, members: &[Rank]) -> Result<Vec<PeerId>> {
        let view = self.view()?;
        members
            .iter()
            .map(|&r| view.members.get(r).map(|m| m.id))
            .collect::<Option<Vec<PeerId>>>()
            .ok_or_else(|| Error::InvalidArgument(format!("sub-group {members:?} outside a group of {}", view.size())))
    }

    /// Runs one collective on `buf`, restoring it on error, with retries as the policy
    /// says.
    pub(crate) async fn run(&mut self, spec: CallSpec<'_>, scope: Scope<'_>, buf: &mut [u8]) -> Result<()> {
        self.undo.begin(buf.len());
        self.ops.with_retry(spec, scope, buf, &mut self.undo, self.retry, self.wait_for_view).await
    }

    /// For a collective made of several (a composite, such as a sparse all-reduce) that
    /// failed with `e` on its `attempt`-th try begun in view `epoch`: whether to run it
    /// again, as [`RetryPolicy`] says. When it returns `true` the master has published a
    /// newer view.
    pub(crate) async fn retry_composite(&mut self, epoch: u64, attempt: u32, e: &Error) -> Result<bool> {
        Ok(self.ops.wait_to_retry(e, attempt, self.retry.attempts(), epoch, self.wait_for_view).await?.is_some())
    }

    /// Starts one collective on an owned buffer and returns at once; the collective
    /// runs as a task (never retried). Traffic of concurrent collectives is kept apart
    /// by their keys.
    pub(crate) fn start(&mut self, coll: Collective, dtype: DType, op: ReduceOp, mut buf: Vec<u8>) -> Started {
        let ops = self.ops.clone();
        // Numbered now, in the caller's order: every peer must number its started
        // collectives alike, whatever order their tasks run in.
        let call = coll.fingerprint(dtype, op);
        let begun = ops.control.begin_as(OpKind::Whole { call }, coll_size(&coll), eager::is_eager(&coll));
        tokio::spawn(async move {
            let mut undo = Undo::default();
            undo.begin(buf.len());
            let result = match begun {
                Ok(begun) => {
                    let spec = CallSpec::new(&coll, dtype, op);
                    ops.run_begun(spec, Scope::Whole, begun, &mut buf, Some(&mut undo)).await
                }
                Err(e) => Err(e),
            };
            if result.is_err() {
                undo.restore(&mut buf);
            }
            (result, buf)
        })
    }

    /// See [`crate::Communicator::sync_shared_state`].
    pub async fn sync_shared_state(&mut self, state: &mut SharedState, strategy: SyncStrategy) -> Result<SyncReport> {
        sync::run(&self.ops.control, &self.ops.links, self.ops.tuning.chunk_bytes, state, strategy).await
    }

    /// See [`crate::Communicator::send`].
    pub(crate) async fn send_p2p(
        &mut self,
        to: Rank,
        tag: u32,
        dtype: DType,
        data: &[u8],
        epoch: Option<u64>,
    ) -> Result<()> {
        let chunk = self.ops.tuning.chunk_bytes;
        let mut turn = self.p2p.turn(to, tag, Dir::Send);
        turn.wait().await;
        self.p2p.send(&self.ops.control, &self.ops.links, (to, epoch), tag, dtype, data, chunk).await
    }

    /// See [`crate::Communicator::recv`].
    pub(crate) async fn recv_p2p(
        &mut self,
        from: Rank,
        tag: u32,
        dtype: DType,
        out: &mut [u8],
        epoch: Option<u64>,
    ) -> Result<()> {
        let chunk = self.ops.tuning.chunk_bytes;
        let mut turn = self.p2p.turn(from, tag, Dir::Recv);
        turn.wait().await;
        self.p2p.recv(&self.ops.control, &self.ops.links, (from, epoch), tag, dtype, out, chunk).await
    }

    /// Starts one point-to-point message with rank `peer` (a send of `buf`, or a
    /// receive into it) and returns at once; it runs as a task, after every call begun
    /// earlier on the same `(peer, tag, direction)`. The task gives the buffer back:
    /// received into on success, as passed otherwise. Needs the runtime entered.
    pub(crate) fn start_p2p(
        &mut self,
        dir: Dir,
        (peer, epoch): (Rank, Option<u64>),
        tag: u32,
        dtype: DType,
        mut buf: Vec<u8>,
    ) -> Started {
        let (queues, control, links) = (self.p2p.clone(), self.ops.control.clone(), self.ops.links.clone());
        let chunk = self.ops.tuning.chunk_bytes;
        // Taken now, in the caller's order (see `Queues::turn`).
        let mut turn = self.p2p.turn(peer, tag, dir);
        tokio::spawn(async move {
            turn.wait().await;
            let result = match dir {
                Dir::Send => queues.send(&control, &links, (peer, epoch), tag, dtype, &buf, chunk).await,
                // Written only once the whole message is in: untouched on error.
                Dir::Recv => queues.recv(&control, &links, (peer, epoch), tag, dtype, &mut buf, chunk).await,
            };
            drop(turn); // the next call on this line may start
            (result, buf)
        })
    }

    /// Each peer's data-link traffic so far (see [`crate::comm::Traffic`]): `(peer,
    /// (frames sent, bytes sent, frames received, bytes received))`, ascending.
    pub(crate) fn traffic(&self) -> Vec<(PeerId, (u64, u64, u64, u64))> {
        self.ops.links.traffic()
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
        if let Some(task) = &self.liveness {
            task.abort();
        }
        self.ops.links.close_all();
        // The control client's own drop would stop its connection too, but a message
        // task still running (a dropped `isend`/`irecv` handle, a receive the pipeline
        // runner posted ahead) holds a clone of it: without this the master would never
        // see this peer go, and the others would wait for it.
        self.ops.control.shut();
    }
}

/// A started collective: its result and its buffer (restored on error).
pub(crate) type Started = tokio::task::JoinHandle<(Result<()>, Vec<u8>)>;

impl Ops {
    /// Runs the collective until it commits, a failure is final, or the attempts run
    /// out; `buf` is restored from `undo` after every failed attempt.
    async fn with_retry(
        &self,
        spec: CallSpec<'_>,
        scope: Scope<'_>,
        buf: &mut [u8],
        undo: &mut Undo,
        retry: RetryPolicy,
        wait_for_view: Duration,
    ) -> Result<()> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (e, epoch) = match self.attempt(spec, scope, buf, undo).await {
                Ok(()) => return Ok(()),
                Err(failed) => failed,
            };
            undo.restore(buf);
            // Not begun (nothing announced), or sized for the old view: never retried.
            let Some(epoch) = epoch.filter(|_| coll_size(spec.coll).is_none()) else { return Err(e) };
            match self.wait_to_retry(&e, attempt, retry.attempts(), epoch, wait_for_view).await? {
                None => return Err(e),
                // A lost member ends a sub-group: the caller picks a new one.
                Some(view) if matches!(scope, Scope::Sub(ids) if ids.iter().any(|&id| view.rank_of(id).is_none())) => {
                    return Err(e)
                }
                Some(_) => {}
            }
        }
    }

    /// Whether to retry after `e`: `Some(view)` once the master published a view
    /// newer than `epoch` (waiting at most `wait`), `None` to give up.
    async fn wait_to_retry(
        &self,
        e: &Error,
        attempt: u32,
        max_attempts: u32,
        epoch: u64,
        wait: Duration,
    ) -> Result<Option<View>> {
        match self.control.retry(e, attempt, max_attempts, epoch) {
            Retry::GiveUp => Ok(None),
            Retry::AfterViewAbove(epoch) => match tokio::time::timeout(wait, self.control.view_after(epoch)).await {
                Ok(Ok(view)) => Ok(Some(view)),
                Ok(Err(removed)) => Err(removed),
                Err(_) => Ok(None),
            },
        }
    }

    /// One attempt: begin, run the plan, report, await the decision. On failure, the
    /// error and the epoch it was begun in (`None` if it never began).
    async fn attempt(
        &self,
        spec: CallSpec<'_>,
        scope: Scope<'_>,
        buf: &mut [u8],
        undo: &mut Undo,
    ) -> Result<(), (Error, Option<u64>)> {
        let call = spec.coll.fingerprint(spec.dtype, spec.op);
        let kind = match scope {
            Scope::Whole => OpKind::Whole { call },
            Scope::Sub(members) => OpKind::Sub { call, members },
        };
        let eager = eager::is_eager(spec.coll);
        let begun = self.control.begin_as(kind, coll_size(spec.coll), eager).map_err(|e| (e, None))?;
        let epoch = begun.0.key.0;
        self.run_begun(spec, scope, begun, buf, Some(undo)).await.map_err(|e| (e, Some(epoch)))
    }

    /// Runs a begun collective: its plan over the data links, then the report and the
    /// master's decision. With `undo`, every write first saves what it overwrites there.
    async fn run_begun(
        &self,
        spec: CallSpec<'_>,
        scope: Scope<'_>,
        (begun, signal): (Begun, AbortSignal),
        buf: &mut [u8],
        undo: Option<&mut Undo>,
    ) -> Result<()> {
        let key = begun.key;
        self.links.enter(&begun.view);
        let me = begun.members.iter().position(|&r| r == begun.rank).unwrap_or(0);
        let mut plan = spec.coll.plan(me, begun.members.len(), spec.dtype, &self.tuning);
        if let Scope::Sub(_) = scope {
            plan = subgroup::plan_in_view(plan, &begun.members);
        }
        let links = self.links.for_op(&begun.view, begun.rank, key);
        let call = Call {
            plan: &plan,
            dtype: spec.dtype,
            op: spec.op,
            epoch: key.0,
            seq: key.1,
            fingerprint: begun.fingerprint,
            chunk_bytes: self.tuning.chunk_bytes,
            custom: spec.custom,
            codec: spec.coll.codec(),
            delivery: Default::default(),
        };
        tracing::debug!(peer = self.control.id(), ?key, rank = begun.rank, size = plan.size, "collective begins");
        let steps = 0..plan.steps.len();
        let local = match undo {
            Some(undo) => execute_saving(&call, buf, &links, &signal, steps, undo).await,
            None => execute(&call, buf, &links, &signal, steps).await,
        };
        tracing::debug!(peer = self.control.id(), ?key, ok = local.is_ok(), "collective ran locally");
        let result = match local {
            Ok(()) if eager::is_eager(spec.coll) => {
                eager::conclude(&self.control, &begun, &links, &signal, self.tuning.chunk_bytes).await
            }
            local => self.control.conclude(key, local).await,
        };
        tracing::debug!(peer = self.control.id(), ?key, ?result, "collective decided");
        self.links.finish(key);
        self.control.finish(key);
        result
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
