//! A peer's control connection to the master: the driver of [`PeerState`].
//!
//! [`ControlClient`] owns the connection's read and write loops and one [`PeerState`].
//! Every message from the master goes through the state machine; the aborts it orders
//! fire the collectives' [`AbortSignal`]s, and every change wakes the tasks waiting on
//! the state (for an admission, a decision, a sync plan, a view or a topology round).
//! Nothing here decides anything: the rules are in [`super::peer`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::driver;
use super::outbox::Outbox;
use super::peer::{Begun, OpKey, OpKind, PeerConfig, PeerState, Retry, SyncPlan, Topology};
use super::protocol::ToMaster;
use super::view::{PeerId, View};
use crate::error::{Error, Result};
use crate::exec::AbortSignal;
use crate::transport::endpoint::Endpoint;

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
    /// When the master is lost, look this long for a master to rejoin (the same
    /// address, restarted, or a standby; see `membership::driver`) before giving up
    /// with [`Error::Removed`]; `None` gives up at once. Default
    /// [`DEFAULT_REJOIN_WITHIN_MS`].
    pub rejoin_within: Option<Duration>,
}

/// Default [`ControlConfig::rejoin_within`] in milliseconds: time for a supervisor to
/// restart a master, or for a standby to be found.
pub const DEFAULT_REJOIN_WITHIN_MS: u64 = 10_000;

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            heartbeat_interval: Duration::from_millis(DEFAULT_HEARTBEAT_MS),
            join_timeout: None,
            master_timeout: PeerConfig::default().master_timeout,
            rejoin_within: Some(Duration::from_millis(DEFAULT_REJOIN_WITHIN_MS)),
        }
    }
}

/// The state machine and the abort signals of the collectives in flight.
pub(super) struct Core {
    pub(super) peer: PeerState,
    signals: HashMap<OpKey, AbortSignal>,
}

pub(super) struct Shared {
    core: Mutex<Core>,
    /// The writer's queue: what the state decides to send goes there under the lock,
    /// so it keeps its place among the caller's messages.
    outbox: Arc<Outbox>,
    /// Bumped after every change of `core`; waiters re-check on it.
    changed: watch::Sender<()>,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `f` to the state, fires the aborts it orders and wakes the waiters.
    pub(super) fn apply<T>(&self, f: impl FnOnce(&mut PeerState) -> (T, Vec<(OpKey, Error)>)) -> T {
        let value = {
            let mut core = self.lock();
            let (value, aborts) = f(&mut core.peer);
            for msg in core.peer.take_outbox() {
                self.outbox.push(msg);
            }
            for (key, e) in aborts {
                if let Some(signal) = core.signals.get(&key) {
                    signal.fire(e);
                }
            }
            value
        };
        self.changed.send_replace(());
        value
    }

    /// Waits until `f` returns `Some` on the state.
    async fn wait<T>(&self, mut f: impl FnMut(&PeerState) -> Option<T>) -> T {
        let mut rx = self.changed.subscribe();
        loop {
            if let Some(t) = f(&self.lock().peer) {
                return t;
            }
            // The sender lives in `self`: `changed` fails only if it is dropped, which
            // cannot happen while we borrow it; treat it as a change regardless.
            let _ = rx.changed().await;
        }
    }
}

/// Why a try at joining failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failed {
    /// No master answered (or one refused the handshake: a wrong secret).
    Unreachable,
    /// The master answered, then was lost before it admitted this peer.
    Lost,
    /// The master refused this peer.
    Refused,
}

/// A peer's live connection to the master.
pub struct ControlClient {
    id: PeerId,
    shared: Arc<Shared>,
    /// Stops the driver, which closes its connection.
    stop: watch::Sender<bool>,
    /// The master followed now.
    master: watch::Receiver<SocketAddr>,
    /// Bumped when the master's process is known to be gone.
    master_gone: watch::Sender<u64>,
}

/// The current time on tokio's clock, so that a paused clock (simulations) governs
/// timeouts too.
pub(super) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl ControlClient {
    /// Connects to the first of `masters` that can be reached (the primary, then the
    /// standbys in order), asks to join as `id` with data links accepted at
    /// `data_addr`, and waits until admitted. The driver it starts rejoins a master from
    /// `masters` when this one is lost (see [`ControlConfig::rejoin_within`]). Call
    /// inside a tokio runtime.
    pub async fn join(
        endpoint: Arc<dyn Endpoint>,
        masters: &[SocketAddr],
        id: PeerId,
        data_addr: SocketAddr,
        config: ControlConfig,
        peer: PeerConfig,
    ) -> Result<ControlClient> {
        let peer = PeerConfig { master_timeout: config.master_timeout, rejoin_within: config.rejoin_within, ..peer };
        let joining = async {
            // A master lost before it admitted this peer: try again, here (a restart) or
            // at the next master, for as long as a member would look for one.
            let give_up = now() + config.rejoin_within.unwrap_or_default();
            let (mut start, mut again) = (0, false);
            loop {
                match Self::join_once(endpoint.clone(), masters, start, id, data_addr, config, peer).await {
                    Ok(client) => return Ok(client),
                    // Once a master was lost, one that is down for a restart is worth waiting for.
                    Err((e, why))
                        if (why == Failed::Lost || again && why == Failed::Unreachable) && now() < give_up =>
                    {
                        again = true;
                        tracing::debug!(peer = id, "master lost before admission ({e}); joining again");
                        start = (start + 1) % masters.len();
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err((e, _)) => return Err(e),
                }
            }
        };
        match config.join_timeout {
            Some(t) => tokio::time::timeout(t, joining)
                .await
                .unwrap_or_else(|_| Err(Error::JoinFailed { reason: format!("not admitted within {t:?}") })),
            None => joining.await,
        }
    }

    /// One try at joining, from the master `start` on; on failure, the error and why.
    async fn join_once(
        endpoint: Arc<dyn Endpoint>,
        masters: &[SocketAddr],
        start: usize,
        id: PeerId,
        data_addr: SocketAddr,
        config: ControlConfig,
        peer: PeerConfig,
    ) -> std::result::Result<ControlClient, (Error, Failed)> {
        let order: Vec<SocketAddr> = masters.iter().cycle().skip(start).take(masters.len()).copied().collect();
        // No master reachable, or one that refused the handshake (a wrong secret): no retry.
        let (link, current) =
            driver::first_reachable(&*endpoint, &order).await.map_err(|e| (e, Failed::Unreachable))?;
        // Control messages are few and small (one or two per collective); the writer
        // takes them as fast as the connection takes them.
        let outbox = Arc::new(Outbox::default());
        let shared = Arc::new(Shared {
            core: Mutex::new(Core { peer: PeerState::new(id, peer, now()), signals: HashMap::new() }),
            outbox: outbox.clone(),
            changed: watch::channel(()).0,
        });
        outbox.push(ToMaster::Join { id, data_addr });
        let (stop, stopped) = watch::channel(false);
        let (master_tx, master) = watch::channel(order[current]);
        let (master_gone, master_gone_rx) = watch::channel(0);
        tokio::spawn(driver::drive(driver::Driver {
            endpoint,
            masters: order.clone(),
            current,
            link,
            shared: shared.clone(),
            outbox,
            heartbeat: config.heartbeat_interval,
            data_addr,
            stopped,
            master: master_tx,
            master_gone: master_gone_rx,
        }));
        let client = ControlClient { id, shared, stop, master, master_gone };
        match client.shared.wait(|p| p.admission()).await {
            Ok(_) => Ok(client),
            Err(e) => {
                client.stop.send_replace(true);
                let why = if client.shared.lock().peer.refused() { Failed::Refused } else { Failed::Lost };
                let reason = match e {
                    Error::Removed { reason } => reason,
                    other => other.to_string(),
                };
                Err((Error::JoinFailed { reason }, why))
            }
        }
    }

    /// The master's process is gone (its liveness connection closed): the driver drops
    /// the connection at once and looks for a master to rejoin.
    pub fn master_process_gone(&self) {
        self.master_gone.send_modify(|n| *n += 1);
    }

    /// The address of the master this peer follows now (it changes when a master is
    /// lost and another takes over).
    pub fn master_changes(&self) -> watch::Receiver<SocketAddr> {
        self.master.clone()
    }

    /// This peer's id.
    pub fn id(&self) -> PeerId {
        self.id
    }

    /// The current view, or the reason this peer is no longer a member.
    pub fn view(&self) -> Result<View> {
        self.shared.lock().peer.view()
    }

    /// See [`PeerState::call_view`].
    pub fn call_view(&self) -> Result<View> {
        self.shared.lock().peer.call_view()
    }

    /// Joiners waiting for admission, as last announced by the master.
    pub fn pending_joiners(&self) -> u32 {
        self.shared.lock().peer.pending_joiners()
    }

    /// Sends `msg` to the master (never blocks; once the driver is gone, its reader has
    /// reported the removal and `msg` is dropped).
    pub fn send(&self, msg: ToMaster) {
        self.shared.outbox.push(msg);
    }

    /// Begins a collective: numbers it, tells the master, and returns it with the
    /// signal that stops it. With `ranks`, a collective whose per-rank counts assume
    /// that many ranks is refused (nothing numbered) unless it runs among that many.
    pub fn begin(&self, kind: OpKind<'_>, ranks: Option<usize>) -> Result<(Begun, AbortSignal)> {
        self.begin_as(kind, ranks, false)
    }

    /// [`ControlClient::begin`], as an eager collective with `eager` (see
    /// [`PeerState::begin_as`] and `comm::eager`).
    pub fn begin_as(&self, kind: OpKind<'_>, ranks: Option<usize>, eager: bool) -> Result<(Begun, AbortSignal)> {
        let mut core = self.shared.lock();
        if let Some(n) = ranks {
            let size = match &kind {
                OpKind::Sub { members, .. } => members.len(),
                _ => core.peer.call_view()?.size(),
            };
            if n != size {
                return Err(Error::InvalidArgument(format!("per-rank counts for {n} ranks in a group of {size}")));
            }
        }
        let begun = core.peer.begin_as(kind, eager)?;
        let signal = AbortSignal::new();
        if let Some(e) = &begun.doomed {
            signal.fire(e.clone());
        }
        core.signals.insert(begun.key, signal.clone());
        // Sent under the lock: a new view handled after this begin is announced
        // (`ToMaster::ViewSeen`) after it, which the master relies on.
        self.send(begun.msg.clone());
        Ok((begun, signal))
    }

    /// Reports that the eager collective `key` completed locally, without waiting;
    /// returns whether it counts as this peer's success (`false` when something
    /// stopped it first: then [`ControlClient::conclude`] is the way out).
    pub fn report_success(&self, key: OpKey) -> bool {
        let mut core = self.shared.lock();
        let end = core.peer.end(key, &Ok(()));
        let counted = end == ToMaster::OpEnd { epoch: key.0, seq: key.1, result: super::protocol::OpResult::Ok };
        self.send(end);
        counted && core.peer.outcome(key).is_none_or(|o| o.is_ok())
    }

    /// Waits for the decision on `key` (the master's, or a stop).
    pub async fn decision(&self, key: OpKey) -> Result<()> {
        self.shared.wait(|p| p.outcome(key)).await
    }

    /// Every member of eager collective `key` completed: see
    /// [`PeerState::returned_eagerly`].
    pub fn returned_eagerly(&self, key: OpKey) -> bool {
        let known = self.shared.lock().peer.returned_eagerly(key);
        self.shared.changed.send_replace(());
        known
    }

    /// Reports the local result of `key` and waits for the master's decision.
    ///
    /// A local mismatch is returned only once the master has decided (it aborts for
    /// every member on this report), so that a caller that gives up and exits at once
    /// cannot take the report down with it and leave the others to time out on a lost
    /// peer instead of getting the mismatch.
    pub async fn conclude(&self, key: OpKey, local: Result<()>) -> Result<()> {
        let end = self.shared.lock().peer.end(key, &local);
        self.send(end);
        // A local failure waits for the master's verdict too, and returns it: a link
        // that broke here may be a symptom (a member that already had its verdict and
        // went away), while the verdict names the cause, the same on every member.
        // The local detail of a mismatch says more than the verdict, so it stays.
        let verdict = self.shared.wait(|p| p.outcome(key)).await;
        match (local, verdict) {
            (Ok(()), verdict) => verdict,
            (Err(e @ Error::Mismatch { .. }), _) | (Err(e), Ok(())) => Err(e),
            (Err(_), Err(verdict)) => Err(verdict),
        }
    }

    /// Waits for the sync plan of `key`, or an abort.
    pub async fn sync_plan(&self, key: OpKey) -> Result<SyncPlan> {
        self.shared.wait(|p| p.sync_plan(key)).await
    }

    /// Forgets a finished collective.
    pub fn finish(&self, key: OpKey) {
        let mut core = self.shared.lock();
        core.peer.finish(key);
        core.signals.remove(&key);
    }

    /// Whether to run a failed collective again (see [`PeerState::retry`]).
    pub fn retry(&self, e: &Error, attempt: u32, max_attempts: u32, epoch: u64) -> Retry {
        self.shared.lock().peer.retry(e, attempt, max_attempts, epoch)
    }

    /// Takes part in a topology round (see `Communicator::update_topology`).
    pub async fn update_topology(&self) -> Result<()> {
        let seen = {
            let mut core = self.shared.lock();
            match core.peer.update_topology()? {
                Topology::Done => return Ok(()),
                Topology::Wait { msg, seen } => {
                    // While the peer rejoins, its vote travels in the rejoin, or after the
                    // takeover if the rejoin went first: a vote queued now could reach the
                    // new master after the takeover and count in the next round. Sent
                    // under the lock, so that the driver's drain, which follows the loss,
                    // removes any vote queued before it.
                    match core.peer.rejoining() {
                        true => core.peer.defer_vote(),
                        false => self.send(msg),
                    }
                    seen
                }
            }
        };
        self.shared.wait(|p| p.round_after(seen)).await.map(|_| ())
    }

    /// Offers `offer` (a device unique id this peer made, and its grow flag) for view
    /// `epoch`, generation `generation`, if any, and waits for the id the master relays
    /// for that generation or a newer one: the first one a member offered. An error once
    /// the view moved past `epoch` or this peer was removed.
    pub async fn device_id(
        &self,
        epoch: u64,
        generation: u32,
        offer: Option<([u8; 128], bool)>,
    ) -> Result<super::peer::GenerationId> {
        if let Some((id, grow)) = offer {
            // Recorded under the lock, so that a rejoin brings it if the master is lost.
            let core = &mut *self.shared.lock();
            self.send(core.peer.offer_device_id(epoch, generation, id, grow));
        }
        self.shared.wait(|p| p.device_id_at(epoch, generation)).await
    }

    /// The newest device id the master relayed for `epoch`, without waiting.
    pub fn device_relayed(&self, epoch: u64) -> Option<super::peer::GenerationId> {
        self.shared.lock().peer.device_relayed(epoch)
    }

    /// Waits for a view of an epoch above `epoch`, or removal.
    pub async fn view_after(&self, epoch: u64) -> Result<View> {
        self.shared.wait(|p| p.view_after(epoch)).await
    }

    /// Leaves the group gracefully and closes the connection.
    pub async fn leave(&self) {
        self.send(ToMaster::Leave);
        // The master answers a leave by closing; wait for that, but not forever.
        let gone = self.shared.wait(|p| p.gone().map(|_| ()));
        let _ = tokio::time::timeout(Duration::from_secs(2), gone).await;
        self.stop.send_replace(true);
    }
}

impl ControlClient {
    /// Stops the driver, which closes the connection: the master sees this peer gone at
    /// once. For the owner's drop: tasks still running (a non-blocking message whose
    /// handle was dropped) may hold clones of the client, and must not keep a dropped
    /// peer in the group.
    pub(crate) fn shut(&self) {
        self.stop.send_replace(true);
    }
}

impl Drop for ControlClient {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}
