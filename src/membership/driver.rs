//! The driver of a peer's control connection: one connection's read and write loops,
//! and, when the master is lost, rejoining one (the same address restarted, or a
//! standby) with what [`PeerState::rejoin`](super::peer::PeerState::rejoin) says.
//!
//! It decides nothing: the state machine says whether the master is lost, whether to
//! look for another, and when to give up. The driver only moves bytes and picks the
//! next address: the one it followed first (a restart comes back there), then the
//! others in order, with a pause after each full round so that it never spins.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{oneshot, watch};

use super::client::{now, Shared};
use super::codec::{frame_body, to_frame, CONTROL_HELLO};
use super::outbox::Outbox;
use super::protocol::{ToMaster, ToPeer};
use crate::error::{Error, Result};
use crate::transport::endpoint::Endpoint;
use crate::transport::Link;

/// How long one try to reach a master may take when several are known.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The pause after every known master failed once, before trying them again.
const ROUND_PAUSE: Duration = Duration::from_millis(200);

/// How long to wait at one master for its takeover before trying the next: a master
/// that cannot gather a majority (one that fenced itself off, see
/// `MasterConfig::fence`) must not hold a peer that a standby would take.
const TAKEOVER_WAIT: Duration = Duration::from_secs(3);

/// Everything the driver owns.
pub(super) struct Driver {
    pub endpoint: Arc<dyn Endpoint>,
    /// The primary first, then the standbys.
    pub masters: Vec<SocketAddr>,
    /// The index of the master followed now.
    pub current: usize,
    pub link: Arc<dyn Link>,
    pub shared: Arc<Shared>,
    pub outbox: Arc<Outbox>,
    pub heartbeat: Duration,
    pub data_addr: SocketAddr,
    pub stopped: watch::Receiver<bool>,
    pub master: watch::Sender<SocketAddr>,
    /// Changes when the followed master's process is known to be gone.
    pub master_gone: watch::Receiver<u64>,
}

/// Connects to the first of `masters` that answers (each within a timeout when there
/// are several).
pub(super) async fn first_reachable(endpoint: &dyn Endpoint, masters: &[SocketAddr]) -> Result<(Arc<dyn Link>, usize)> {
    let mut failures = Vec::new();
    for (i, &addr) in masters.iter().enumerate() {
        let limit = (masters.len() > 1).then_some(CONNECT_TIMEOUT);
        match connect(endpoint, addr, limit).await {
            Ok(link) => return Ok((link, i)),
            Err(e) => failures.push(format!("{addr}: {e}")),
        }
    }
    Err(Error::JoinFailed { reason: format!("cannot reach a master ({})", failures.join("; ")) })
}

/// Opens a control connection to the master at `addr`, within `limit` if given.
async fn connect(
    endpoint: &dyn Endpoint,
    addr: SocketAddr,
    limit: Option<Duration>,
) -> std::result::Result<Arc<dyn Link>, String> {
    let connecting = endpoint.connect(addr, Bytes::from_static(CONTROL_HELLO));
    match limit {
        None => connecting.await.map_err(|e| e.to_string()),
        Some(limit) => match tokio::time::timeout(limit, connecting).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {limit:?}")),
        },
    }
}

/// Runs connections until this peer is gone or the client stops.
pub(super) async fn drive(mut d: Driver) {
    let _closing = Closing(d.outbox.clone());
    loop {
        let (stop_writer, writer_stopped) = oneshot::channel();
        let writer = tokio::spawn(write_loop(d.link.clone(), d.outbox.clone(), d.heartbeat, writer_stopped));
        d.master_gone.borrow_and_update(); // news of a master before this one is old
        let lost = tokio::select! {
            lost = read_loop(&*d.link, &d.shared) => lost,
            _ = d.stopped.changed() => None,
            _ = d.master_gone.changed() => Some("the master's process is gone (liveness connection closed)".into()),
        };
        tracing::debug!(peer = d.shared.lock().peer.id(), ?lost, "control connection ended");
        d.link.close();
        let _ = stop_writer.send(());
        if writer.await.is_err() {
            return;
        }
        if *d.stopped.borrow() {
            return;
        }
        if let Some(reason) = lost {
            d.shared.apply(|p| ((), p.master_lost(reason, now())));
        }
        if !d.shared.lock().peer.rejoining() {
            return; // gone: the state machine has recorded why
        }
        tracing::debug!(peer = d.shared.lock().peer.id(), "master lost: rejoining");
        // What the lost master never got is settled by the rejoin itself.
        d.outbox.clear();
        let Some((link, current)) = rejoin(&d).await else { return };
        tracing::info!(peer = d.shared.lock().peer.id(), master = %d.masters[current], "rejoined a master");
        d.link = link;
        d.current = current;
        d.master.send_replace(d.masters[current]);
    }
}

/// Closes the outbox when the driver ends, however it ends: nothing takes its
/// messages any more, so none may pile up.
struct Closing(Arc<Outbox>);

impl Drop for Closing {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Reads the master's messages into the state machine until the connection ends or the
/// state says the master is lost; returns why it ended if the state does not know yet.
async fn read_loop(link: &dyn Link, shared: &Shared) -> Option<String> {
    loop {
        let deadline = shared.lock().peer.next_deadline();
        let received = match deadline {
            Some(d) => tokio::time::timeout_at(tokio::time::Instant::from_std(d), link.recv()).await,
            None => Ok(link.recv().await),
        };
        match received {
            Ok(Ok(frame)) => match frame_body(&frame).and_then(ToPeer::decode) {
                Ok(msg) => shared.apply(|p| ((), p.handle(msg, now()))),
                Err(e) => return Some(format!("undecodable message from the master: {e}")),
            },
            Ok(Err(e)) => {
                let reason = format!("connection to the master lost: {e}");
                // A refusal was already recorded (the peer is gone); otherwise the master is lost.
                return shared.lock().peer.gone().is_none().then_some(reason);
            }
            Err(_) => {
                let stop = shared.apply(|p| {
                    let aborts = p.tick(now());
                    (p.gone().is_some() || p.rejoining(), aborts)
                });
                if stop {
                    return None;
                }
            }
        }
    }
}

/// Sends the outbox's messages and a heartbeat every `heartbeat`, until the link fails
/// or `stop` fires.
///
/// Messages go out in the order they were queued, always, each batch together (one
/// packet where the link can); which messages wait for the next, and for how long, is
/// the [`Outbox`]'s rule.
async fn write_loop(link: Arc<dyn Link>, outbox: Arc<Outbox>, heartbeat: Duration, mut stop: oneshot::Receiver<()>) {
    // The first tick is one interval away, so the join always goes first.
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let batch = tokio::select! {
            biased;
            _ = &mut stop => return,
            batch = outbox.next() => batch,
            _ = beat.tick() => {
                outbox.push(ToMaster::Heartbeat);
                continue;
            }
        };
        let frames = batch.into_iter().map(|msg| to_frame(msg.encode())).collect();
        // A send may wait on a connection that no longer moves (a partition): the stop
        // must still get through.
        let sent = tokio::select! {
            biased;
            _ = &mut stop => return,
            sent = link.send_many(frames) => sent,
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Looks for a master to rejoin until one took over with this peer in its view, or the
/// state machine gives up (the peer is then gone). Returns the new connection and the
/// index of its master.
async fn rejoin(d: &Driver) -> Option<(Arc<dyn Link>, usize)> {
    let n = d.masters.len();
    for attempt in 0.. {
        let gone = d.shared.apply(|p| {
            let aborts = p.tick(now());
            (!p.rejoining(), aborts)
        });
        if gone || *d.stopped.borrow() {
            return None;
        }
        if attempt > 0 && attempt % n == 0 {
            tokio::time::sleep(ROUND_PAUSE).await;
        }
        let i = (d.current + attempt) % n;
        // Whatever waits in a try (a send into a partition) ends with the search.
        let deadline = d.shared.lock().peer.next_deadline()?;
        let tried =
            tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), try_rejoin(d, d.masters[i])).await;
        match tried.unwrap_or_else(|_| Err("no takeover before the deadline".into())) {
            Ok(link) => return Some((link, i)),
            Err(why) => tracing::debug!(master = %d.masters[i], "no rejoin: {why}"),
        }
    }
    None
}

/// One try at the master at `addr`: connect, send the rejoin, heartbeat while it waits
/// for the rest of the group, and feed its answers to the state until the takeover's
/// view arrives.
async fn try_rejoin(d: &Driver, addr: SocketAddr) -> std::result::Result<Arc<dyn Link>, String> {
    let link = connect(&*d.endpoint, addr, Some(CONNECT_TIMEOUT)).await?;
    let Some(msg) = d.shared.lock().peer.rejoin(d.data_addr) else { return Err("nothing to rejoin with".into()) };
    // (A vote made from here on is deferred, and sent below once the takeover is done.)
    if let Err(e) = link.send(to_frame(msg.encode())).await {
        return Err(e.to_string());
    }
    let beats = tokio::spawn(heartbeats(link.clone(), d.heartbeat));
    let result = await_takeover(&*link, &d.shared).await;
    beats.abort();
    match result {
        Ok(()) => {
            let vote = d.shared.lock().peer.take_deferred_vote();
            if let Some(vote) = vote {
                link.send(to_frame(vote.encode())).await.map_err(|e| e.to_string())?;
            }
            Ok(link)
        }
        Err(e) => {
            link.close();
            Err(e)
        }
    }
}

async fn heartbeats(link: Arc<dyn Link>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        if link.send(to_frame(ToMaster::Heartbeat.encode())).await.is_err() {
            return;
        }
    }
}

/// Feeds a rejoined master's messages to the state until it is no longer rejoining.
async fn await_takeover(link: &dyn Link, shared: &Shared) -> std::result::Result<(), String> {
    let wait_until = now() + TAKEOVER_WAIT;
    loop {
        let Some(deadline) = shared.lock().peer.next_deadline() else { return Err("gone".into()) };
        let deadline = deadline.min(wait_until);
        let frame = match tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), link.recv()).await {
            Ok(Ok(frame)) => frame,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("no takeover in time: trying the next master".into()),
        };
        let msg = frame_body(&frame).and_then(ToPeer::decode).map_err(|e| e.to_string())?;
        let refused = matches!(msg, ToPeer::Refused { .. });
        let rejoining = shared.apply(|p| {
            let aborts = p.handle(msg, now());
            (p.rejoining(), aborts)
        });
        if refused {
            return Err("refused".into());
        }
        if !rejoining {
            return Ok(());
        }
    }
}
