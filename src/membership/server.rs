//! The master's driver: runs [`MasterState`] over an [`Endpoint`].
//!
//! Each control connection gets a reader task (decode, forward to the core loop) and a
//! writer task (encode, send), so a slow peer never stalls the master. The core loop
//! owns the state and wakes on messages, disconnections and the next timeout; it never
//! polls.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::codec::{frame_body, to_frame, CONTROL_HELLO};
use super::hold::Hold;
use super::master::{ConnId, MasterConfig, MasterState, Output};
use super::protocol::{ToMaster, ToPeer};
use super::PeerId;
use crate::transport::endpoint::Endpoint;
use crate::transport::Link;

/// A running master; dropping it (or calling [`MasterServer::shutdown`]) stops it.
pub struct MasterServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
}

impl MasterServer {
    /// Starts a master on `endpoint`, on the current tokio runtime.
    pub fn spawn(endpoint: Arc<dyn Endpoint>, config: MasterConfig) -> MasterServer {
        MasterServer::start(endpoint, config, None)
    }

    /// [`MasterServer::spawn`], also accepting the peers' liveness connections on
    /// `listener` (see `membership::liveness`), authenticated with `secret`: a peer whose
    /// connection closes is removed at once.
    pub(crate) fn spawn_with_liveness(
        endpoint: Arc<dyn Endpoint>,
        config: MasterConfig,
        listener: tokio::net::TcpListener,
        secret: Option<Arc<[u8]>>,
    ) -> MasterServer {
        MasterServer::start(endpoint, config, Some((listener, secret)))
    }

    fn start(
        endpoint: Arc<dyn Endpoint>,
        config: MasterConfig,
        liveness: Option<(tokio::net::TcpListener, Option<Arc<[u8]>>)>,
    ) -> MasterServer {
        let addr = endpoint.local_addr();
        let (stop, stopped) = watch::channel(false);
        let (gone_tx, gone) = mpsc::unbounded_channel();
        if let Some((listener, secret)) = liveness {
            let serving = tokio::spawn(super::liveness::serve(listener, secret, gone_tx));
            let mut stopped = stopped.clone();
            tokio::spawn(async move {
                let _ = stopped.changed().await;
                serving.abort();
            });
        }
        tokio::spawn(run(endpoint, config, stopped, gone));
        MasterServer { addr, stop }
    }

    /// The address peers connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the master; its connections close.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }
}

impl Drop for MasterServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A master with a runtime of its own, over QUIC: the way to embed one in a process
/// (bindings, tests, a trainer that also coordinates).
///
/// ```
/// use phalanx::Master;
/// let master = Master::start("127.0.0.1:0".parse().unwrap(), Default::default(), Default::default()).unwrap();
/// assert_ne!(master.addr().port(), 0);
/// ```
pub struct Master {
    server: MasterServer,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Master {
    /// Binds `listen` and starts serving.
    pub fn start(
        listen: SocketAddr,
        quic: crate::transport::quic::QuicConfig,
        config: MasterConfig,
    ) -> Result<Master, crate::Error> {
        let setup = |e: String| crate::Error::InvalidArgument(format!("cannot start the master: {e}"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .thread_name("phalanx-master")
            .build()
            .map_err(|e| crate::Error::Runtime { reason: format!("cannot start the master's runtime: {e}") })?;
        let server = runtime.block_on(async {
            let secret = quic.secret.clone();
            let ep = crate::transport::quic::QuicEndpoint::bind(listen, quic).map_err(|e| setup(e.to_string()))?;
            let ep: Arc<dyn Endpoint> = Arc::new(ep);
            // The liveness listener takes the TCP port with the QUIC port's number, where
            // peers look for it; without it the master relies on heartbeats alone.
            if !config.liveness {
                return Ok::<_, crate::Error>(MasterServer::spawn(ep, config));
            }
            match tokio::net::TcpListener::bind(ep.local_addr()).await {
                Ok(listener) => Ok(MasterServer::spawn_with_liveness(ep, config, listener, secret)),
                Err(e) => {
                    tracing::warn!(addr = %ep.local_addr(), "no liveness listener ({e}): heartbeats only");
                    Ok(MasterServer::spawn(ep, config))
                }
            }
        })?;
        Ok(Master { server, runtime: Some(runtime) })
    }

    /// The address peers connect to.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        self.server.shutdown();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// What the core loop hands a connection's writer: an output, and whether it may wait
/// ([`MasterState::may_wait`]).
type Outgoing = (Output, bool);

/// What wakes a connection's writer.
enum Next {
    /// An output (`None`: the core loop is gone).
    Out(Option<Outgoing>),
    /// The held messages are due.
    Flush,
}

enum Event {
    New(ConnId, mpsc::UnboundedSender<Outgoing>),
    Msg(ConnId, ToMaster),
    Gone(ConnId),
}

async fn run(
    endpoint: Arc<dyn Endpoint>,
    config: MasterConfig,
    mut stopped: watch::Receiver<bool>,
    mut gone: mpsc::UnboundedReceiver<PeerId>,
) {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let acceptor = tokio::spawn(accept_loop(endpoint, events_tx));
    let mut state = MasterState::new(config);
    let mut writers: HashMap<ConnId, mpsc::UnboundedSender<Outgoing>> = HashMap::new();
    loop {
        let deadline = state.next_deadline().map(tokio::time::Instant::from_std);
        let mut outputs = tokio::select! {
            biased;
            _ = stopped.changed() => break,
            ev = events.recv() => match ev {
                None => break,
                Some(ev) => on_event(&mut state, &mut writers, ev),
            },
            Some(id) = gone.recv() => state.process_gone(id),
            _ = sleep_until(deadline) => state.tick(now()),
        };
        // The events already queued (a batch of held messages arrives together): handled
        // before the deadline and the timer are worked out again, at most a batch's worth
        // so that a stop or a timeout is never put off for long.
        for _ in 0..EVENTS_PER_TURN {
            match events.try_recv() {
                Ok(ev) => outputs.extend(on_event(&mut state, &mut writers, ev)),
                Err(_) => break,
            }
        }
        for out in outputs {
            tracing::trace!(?out, "master sends");
            let conn = match &out {
                Output::Send(c, _) | Output::Close(c, _) | Output::Release(c) => *c,
            };
            let closing = matches!(out, Output::Close(..) | Output::Release(_));
            let lazy = matches!(&out, Output::Send(_, msg) if state.may_wait(msg));
            if let Some(w) = writers.get(&conn) {
                let _ = w.send((out, lazy)); // a gone writer means a gone peer: nothing to tell
            }
            if closing {
                writers.remove(&conn);
            }
        }
    }
    acceptor.abort();
}

/// The most queued events the core loop handles in one turn after the one it waited for.
const EVENTS_PER_TURN: usize = 2 * super::hold::HOLD_MAX;

/// Handles one event: a new connection's writer, a message, a connection gone.
fn on_event(
    state: &mut MasterState,
    writers: &mut HashMap<ConnId, mpsc::UnboundedSender<Outgoing>>,
    ev: Event,
) -> Vec<Output> {
    match ev {
        Event::New(conn, w) => {
            writers.insert(conn, w);
            Vec::new()
        }
        Event::Msg(conn, msg) => {
            tracing::trace!(conn, ?msg, "master received");
            state.handle(conn, msg, now())
        }
        Event::Gone(conn) => {
            writers.remove(&conn);
            state.disconnected(conn)
        }
    }
}

/// The current time on tokio's clock, so that a paused clock (simulations) governs
/// timeouts too.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn accept_loop(endpoint: Arc<dyn Endpoint>, events: mpsc::UnboundedSender<Event>) {
    let mut next: ConnId = 1;
    while let Ok((link, hello)) = endpoint.accept().await {
        if hello.as_ref() != CONTROL_HELLO {
            link.close();
            continue;
        }
        let conn = next;
        next += 1;
        let (wtx, wrx) = mpsc::unbounded_channel();
        if events.send(Event::New(conn, wtx)).is_err() {
            return;
        }
        tokio::spawn(write_loop(link.clone(), wrx));
        tokio::spawn(read_loop(conn, link, events.clone()));
    }
}

async fn read_loop(conn: ConnId, link: Arc<dyn Link>, events: mpsc::UnboundedSender<Event>) {
    while let Ok(frame) = link.recv().await {
        let Ok(msg) = frame_body(&frame).and_then(ToMaster::decode) else {
            break; // undecodable: treat the peer as gone
        };
        if events.send(Event::Msg(conn, msg)).is_err() {
            return;
        }
    }
    link.close();
    let _ = events.send(Event::Gone(conn));
}

/// How often the master tells each peer it is alive.
pub const MASTER_HEARTBEAT: Duration = Duration::from_millis(250);

/// Sends a connection's outputs and a heartbeat every [`MASTER_HEARTBEAT`], until the
/// connection closes.
///
/// Messages go out in the order they came, always. One that may wait (an eager
/// collective's commit) waits up to [`EAGER_HOLD`](super::hold::EAGER_HOLD) for the
/// message after it ([`Hold`]), so that back-to-back small collectives' commits go out
/// together: one QUIC packet, and one wake-up of the peer, for several collectives
/// instead of one each. Any other message sends what waits at once, itself included.
async fn write_loop(link: Arc<dyn Link>, mut outputs: mpsc::UnboundedReceiver<Outgoing>) {
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + MASTER_HEARTBEAT, MASTER_HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut hold = Hold::default();
    loop {
        let next = tokio::select! {
            biased;
            out = outputs.recv() => Next::Out(out),
            _ = beat.tick() => Next::Out(Some((Output::Send(0, ToPeer::Heartbeat), false))),
            _ = hold.due() => Next::Flush,
        };
        match next {
            Next::Flush => {}
            Next::Out(None) | Next::Out(Some((Output::Release(_), _))) => break,
            Next::Out(Some((Output::Send(_, msg), lazy))) => {
                if !hold.push(msg, lazy) {
                    continue;
                }
            }
            Next::Out(Some((Output::Close(_, reason), _))) => {
                // What waits, then why, if the peer can still hear us; a partitioned peer
                // cannot, and then only the close (or its own master timeout) reaches it.
                hold.push(ToPeer::Refused { reason }, false);
                let last_words = link.send_many(hold.take().into_iter().map(|msg| to_frame(msg.encode())).collect());
                let _ = tokio::time::timeout(Duration::from_millis(500), last_words).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                break;
            }
        }
        // Together: the messages leave in one packet where the link can.
        let frames = hold.take().into_iter().map(|msg| to_frame(msg.encode())).collect();
        if link.send_many(frames).await.is_err() {
            break;
        }
    }
    link.close();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::hold::EAGER_HOLD;
    use crate::membership::protocol::Decision;
    use crate::transport::mem;

    fn commit(seq: u64) -> ToPeer {
        ToPeer::Outcome { epoch: 1, seq, decision: Decision::Commit }
    }

    async fn next(link: &dyn Link) -> ToPeer {
        let frame = link.recv().await.expect("recv");
        ToPeer::decode(frame_body(&frame).expect("frame")).expect("message")
    }

    /// Commits that may wait go out with the next message, in order, or once
    /// `EAGER_HOLD` is up; a message that may not wait is never held.
    #[tokio::test(start_paused = true)]
    async fn eager_commits_wait_for_the_next_message_in_order() {
        let (master, peer) = mem::pair(64);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(Arc::new(master), rx));
        for seq in [1, 2] {
            tx.send((Output::Send(1, commit(seq)), true)).expect("send");
        }
        assert!(tokio::time::timeout(EAGER_HOLD / 2, peer.recv()).await.is_err(), "held commits went out at once");
        tx.send((Output::Send(1, ToPeer::Pending), false)).expect("send");
        for want in [commit(1), commit(2), ToPeer::Pending] {
            assert_eq!(next(&peer).await, want);
        }
        // Alone, a held commit goes out once the hold is up.
        let start = tokio::time::Instant::now();
        tx.send((Output::Send(1, commit(3)), true)).expect("send");
        assert_eq!(next(&peer).await, commit(3));
        assert!(start.elapsed() >= EAGER_HOLD, "sent after {:?}", start.elapsed());
        // One that may not wait goes at once.
        tx.send((Output::Send(1, commit(4)), false)).expect("send");
        assert_eq!(tokio::time::timeout(EAGER_HOLD / 2, next(&peer)).await.expect("not held"), commit(4));
        // A close sends what waits first, then why.
        tx.send((Output::Send(1, commit(5)), true)).expect("send");
        tx.send((Output::Close(1, "bye".into()), false)).expect("send");
        assert_eq!(next(&peer).await, commit(5));
        assert_eq!(next(&peer).await, ToPeer::Refused { reason: "bye".into() });
    }
}
