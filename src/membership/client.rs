//! A peer's control connection to the master.
//!
//! [`ControlClient`] sends the peer's messages and heartbeats, and turns the master's
//! messages into state the communicator waits on: the current view, each collective's
//! [`OpSlot`] (its abort signal, decision and sync plan), and whether this peer is still
//! a member. A view change fires the abort signal of every collective of older epochs;
//! a removal fires them all with [`Error::Removed`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::codec::{frame_body, to_frame, CONTROL_HELLO};
use super::protocol::{AbortReason, Decision, Removal, ToMaster, ToPeer, Transfer};
use super::view::{PeerId, View};
use crate::error::{Error, Result};
use crate::exec::AbortSignal;
use crate::state::Digest;
use crate::transport::demux::OpKey;
use crate::transport::endpoint::Endpoint;
use crate::transport::Link;

/// A sync plan as received: the agreed content of each tensor and the transfers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncPlan {
    /// Agreed `(revision, digest)` per tensor.
    pub agreed: Vec<(u64, Digest)>,
    /// Who sends what to whom.
    pub transfers: Vec<Transfer>,
}

/// What one collective waits on.
#[derive(Default)]
pub struct OpSlot {
    /// Fired when the collective must stop (view change, master abort, removal).
    pub abort: AbortSignal,
    decision: watch::Sender<Option<Decision>>,
    plan: watch::Sender<Option<SyncPlan>>,
}

impl OpSlot {
    /// Waits for the master's decision; a fired abort counts as an abort decision.
    pub async fn decision(&self) -> std::result::Result<(), Error> {
        let mut rx = self.decision.subscribe();
        tokio::select! {
            biased;
            d = rx.wait_for(Option::is_some) => match d.ok().and_then(|d| d.clone()) {
                Some(Decision::Commit) => Ok(()),
                Some(Decision::Abort(reason)) => Err(abort_error(reason)),
                None => Err(Error::Removed { reason: "control connection closed".into() }),
            },
            e = self.abort.wait() => Err(e),
        }
    }

    /// Waits for the sync plan, or an abort.
    pub async fn sync_plan(&self) -> Result<SyncPlan> {
        let mut rx = self.plan.subscribe();
        tokio::select! {
            biased;
            e = self.abort.wait() => Err(e),
            p = rx.wait_for(Option::is_some) => p
                .ok()
                .and_then(|p| p.clone())
                .ok_or_else(|| Error::Removed { reason: "control connection closed".into() }),
        }
    }
}

/// The error a peer's collective returns for the master's abort reason.
pub fn abort_error(reason: AbortReason) -> Error {
    match reason {
        AbortReason::PeerLost { rank, detail } => Error::PeerLost { rank: rank as usize, reason: detail },
        AbortReason::Mismatch { detail } => Error::Mismatch { detail },
        AbortReason::Failed { rank, detail } => Error::Aborted { reason: format!("rank {rank} failed: {detail}") },
    }
}

/// The latest view, how many topology rounds have ended (update_topology waits for the
/// next one), and whether this peer is still a member.
#[derive(Clone, Debug, Default)]
pub struct ViewState {
    /// The view; `None` until admitted.
    pub view: Option<View>,
    /// Topology rounds completed so far.
    pub rounds: u64,
    /// Why this peer is no longer a member, once it is not.
    pub gone: Option<String>,
}

struct Shared {
    view: watch::Sender<ViewState>,
    pending_joiners: AtomicU32,
    ops: Mutex<HashMap<OpKey, Arc<OpSlot>>>,
}

impl Shared {
    fn ops(&self) -> std::sync::MutexGuard<'_, HashMap<OpKey, Arc<OpSlot>>> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, key: OpKey) -> Arc<OpSlot> {
        let slot = self.ops().entry(key).or_default().clone();
        // A view change or removal that happened just before the slot existed did not
        // fire it; `on_view` and `on_gone` publish their state before firing, so
        // checking after inserting catches every such case.
        let state = self.view.borrow();
        if let Some(reason) = &state.gone {
            slot.abort.fire(Error::Removed { reason: reason.clone() });
        } else if let Some(epoch) = state.view.as_ref().map(|v| v.epoch).filter(|&e| e > key.0) {
            slot.abort.fire(Error::Aborted { reason: format!("the view changed to epoch {epoch}") });
        }
        slot
    }

    fn on_message(&self, msg: ToPeer) {
        match msg {
            ToPeer::Pending => {}
            ToPeer::PendingJoiners { count } => self.pending_joiners.store(count, Ordering::Relaxed),
            ToPeer::View { view, removed } => self.on_view(view, removed),
            ToPeer::Outcome { epoch, seq, decision } => {
                let slot = self.slot((epoch, seq));
                if let Decision::Abort(reason) = &decision {
                    slot.abort.fire(abort_error(reason.clone()));
                }
                slot.decision.send_replace(Some(decision));
            }
            ToPeer::SyncPlan { epoch, seq, agreed, transfers } => {
                self.slot((epoch, seq)).plan.send_replace(Some(SyncPlan { agreed, transfers }));
            }
            ToPeer::Refused { reason } => self.on_gone(reason),
            ToPeer::Heartbeat => {}
            ToPeer::TopologyDone { .. } => self.view.send_modify(|s| s.rounds += 1),
        }
    }

    fn on_view(&self, view: View, removed: Vec<Removal>) {
        let reason = match removed.first() {
            Some(r) => Error::PeerLost { rank: r.rank as usize, reason: r.detail.clone() },
            None => Error::Aborted { reason: format!("the view changed to epoch {}", view.epoch) },
        };
        let epoch = view.epoch;
        self.pending_joiners.store(0, Ordering::Relaxed);
        // Publish first, then fire: see `slot`.
        self.view.send_modify(|s| s.view = Some(view));
        self.ops().retain(|key, slot| {
            if key.0 < epoch {
                slot.abort.fire(reason.clone());
                false
            } else {
                true
            }
        });
    }

    fn on_gone(&self, reason: String) {
        let err = Error::Removed { reason: reason.clone() };
        // Publish first, then fire: see `slot`.
        self.view.send_modify(|s| {
            if s.gone.is_none() {
                s.gone = Some(reason);
            }
        });
        for slot in self.ops().values() {
            slot.abort.fire(err.clone());
        }
    }
}

/// Default [`ControlConfig::heartbeat_interval`] in milliseconds.
pub const DEFAULT_HEARTBEAT_MS: u64 = 150;

/// Settings of a control connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlConfig {
    /// How often to send a heartbeat; keep it well below the master's peer timeout.
    pub heartbeat_interval: Duration,
    /// How long to wait for admission before giving up; `None` waits forever.
    pub join_timeout: Option<Duration>,
    /// With no message from the master for this long (it sends a heartbeat every
    /// 250 ms), this peer considers itself cut off: its collectives fail with
    /// [`Error::Removed`]. The master removes a silent peer after its own timeout, so a
    /// cut-off peer cannot keep a result the others discarded.
    pub master_timeout: Duration,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            heartbeat_interval: Duration::from_millis(DEFAULT_HEARTBEAT_MS),
            join_timeout: None,
            master_timeout: Duration::from_millis(2000),
        }
    }
}

/// A peer's live connection to the master.
pub struct ControlClient {
    id: PeerId,
    out: mpsc::UnboundedSender<ToMaster>,
    shared: Arc<Shared>,
    link: Arc<dyn Link>,
}

impl ControlClient {
    /// Connects to the master at `master`, asks to join as `id` with data links
    /// accepted at `data_addr`, and waits until admitted. Call inside a tokio runtime.
    pub async fn join(
        endpoint: &dyn Endpoint,
        master: SocketAddr,
        id: PeerId,
        data_addr: SocketAddr,
        config: ControlConfig,
    ) -> Result<ControlClient> {
        let link = endpoint
            .connect(master, Bytes::from_static(CONTROL_HELLO))
            .await
            .map_err(|e| Error::JoinFailed { reason: format!("cannot reach the master at {master}: {e}") })?;
        let shared = Arc::new(Shared {
            view: watch::channel(ViewState::default()).0,
            pending_joiners: AtomicU32::new(0),
            ops: Mutex::new(HashMap::new()),
        });
        let (out, out_rx) = mpsc::unbounded_channel();
        let _ = out.send(ToMaster::Join { id, data_addr });
        tokio::spawn(write_loop(link.clone(), out_rx, config.heartbeat_interval));
        tokio::spawn(read_loop(link.clone(), shared.clone(), config.master_timeout));
        let client = ControlClient { id, out, shared, link };
        let admitted = async {
            let mut rx = client.shared.view.subscribe();
            let state = rx.wait_for(|s| s.view.is_some() || s.gone.is_some()).await;
            state.ok().and_then(|s| s.gone.clone())
        };
        let refused = match config.join_timeout {
            Some(t) => {
                tokio::time::timeout(t, admitted).await.unwrap_or_else(|_| Some(format!("not admitted within {t:?}")))
            }
            None => admitted.await,
        };
        match refused {
            None => Ok(client),
            Some(reason) => {
                client.link.close();
                Err(Error::JoinFailed { reason })
            }
        }
    }

    /// This peer's id.
    pub fn id(&self) -> PeerId {
        self.id
    }

    /// The current view state.
    pub fn state(&self) -> ViewState {
        self.shared.view.borrow().clone()
    }

    /// The current view, or the reason this peer is no longer a member.
    pub fn view(&self) -> Result<View> {
        let s = self.state();
        match (s.gone, s.view) {
            (Some(reason), _) => Err(Error::Removed { reason }),
            (None, Some(v)) => Ok(v),
            (None, None) => Err(Error::Removed { reason: "not admitted yet".into() }),
        }
    }

    /// Joiners waiting for admission, as last announced by the master.
    pub fn pending_joiners(&self) -> u32 {
        self.shared.pending_joiners.load(Ordering::Relaxed)
    }

    /// Sends `msg` to the master (never blocks).
    pub fn send(&self, msg: ToMaster) {
        let _ = self.out.send(msg); // if the writer is gone, the reader reports removal
    }

    /// The slot of collective `key`.
    pub fn slot(&self, key: OpKey) -> Arc<OpSlot> {
        self.shared.slot(key)
    }

    /// Forgets a finished collective's slot.
    pub fn forget(&self, key: OpKey) {
        self.shared.ops().remove(&key);
    }

    /// Waits until more than `seen` topology rounds have completed, or removal.
    pub async fn round_after(&self, seen: u64) -> Result<View> {
        let mut rx = self.shared.view.subscribe();
        let s = rx.wait_for(|s| s.rounds > seen || s.gone.is_some()).await.map(|s| s.clone());
        match s {
            Ok(ViewState { gone: Some(reason), .. }) => Err(Error::Removed { reason }),
            Ok(ViewState { view: Some(v), .. }) => Ok(v),
            _ => Err(Error::Removed { reason: "control connection closed".into() }),
        }
    }

    /// Waits for a view of an epoch above `epoch`, or removal.
    pub async fn view_after(&self, epoch: u64) -> Result<View> {
        let mut rx = self.shared.view.subscribe();
        let s = rx
            .wait_for(|s| s.gone.is_some() || s.view.as_ref().is_some_and(|v| v.epoch > epoch))
            .await
            .map(|s| s.clone());
        match s {
            Ok(ViewState { gone: None, view: Some(v), .. }) => Ok(v),
            Ok(ViewState { gone: Some(reason), .. }) => Err(Error::Removed { reason }),
            _ => Err(Error::Removed { reason: "control connection closed".into() }),
        }
    }

    /// Leaves the group gracefully and closes the connection.
    pub async fn leave(&self) {
        self.send(ToMaster::Leave);
        // The master answers a leave by closing; wait for that, but not forever.
        let mut rx = self.shared.view.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|s| s.gone.is_some())).await;
        self.link.close();
    }
}

impl Drop for ControlClient {
    fn drop(&mut self) {
        self.link.close();
    }
}

async fn write_loop(link: Arc<dyn Link>, mut out: mpsc::UnboundedReceiver<ToMaster>, heartbeat: Duration) {
    // The first tick is one interval away, so the join always goes first.
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let msg = tokio::select! {
            biased;
            m = out.recv() => match m { Some(m) => m, None => break },
            _ = beat.tick() => ToMaster::Heartbeat,
        };
        if link.send(to_frame(msg.encode())).await.is_err() {
            break;
        }
    }
}

async fn read_loop(link: Arc<dyn Link>, shared: Arc<Shared>, master_timeout: Duration) {
    let reason = loop {
        match tokio::time::timeout(master_timeout, link.recv()).await {
            Ok(Ok(frame)) => match frame_body(&frame).and_then(ToPeer::decode) {
                Ok(msg) => shared.on_message(msg),
                Err(e) => break format!("undecodable message from the master: {e}"),
            },
            Ok(Err(e)) => break format!("connection to the master lost: {e}"),
            Err(_) => break format!("no word from the master for {} ms", master_timeout.as_millis()),
        }
    };
    shared.on_gone(reason);
    link.close();
}
