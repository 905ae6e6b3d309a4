//! A UDP relay for tests and benchmarks between processes on 127.0.0.1: it adds delay,
//! jitter, reordering, a bottleneck rate, loss and partitions, since the kernel here
//! has no netem. QUIC runs over UDP, so every phalanx link can be sent through it.
//!
//! # How traffic goes through it
//!
//! [`Relay::front`] opens a front address for a target (the master's address, or a
//! peer's data address). Whoever dials the front reaches the target; the relay keeps
//! one upstream socket per dialer, so replies find their way back, as a NAT does. A
//! peer is reached through the relay when the others dial its front, so it advertises
//! the front instead of its bound address
//! ([`ConnectOptions::advertise`](crate::ConnectOptions::advertise)), and it reaches
//! the master through the master's front.
//!
//! Paths are named by the real addresses at their ends: the dialer's bound address and
//! the target's. Each direction of each path has its own [`Shaping`] (the relay's
//! default unless set) and its own random stream drawn from the relay's seed.
//!
//! ```no_run
//! use std::time::Duration;
//! use phalanx::relay::{Relay, Shaping};
//! # fn main() -> std::io::Result<()> {
//! let master: std::net::SocketAddr = "127.0.0.1:7000".parse().unwrap();
//! let relay = Relay::start(42, Shaping::default().delay(Duration::from_millis(25)))?;
//! let front = relay.front(master)?; // peers dial this instead of the master
//! let peer: std::net::SocketAddr = "127.0.0.1:7101".parse().unwrap();
//! relay.cut_between(peer, master); // the peer loses the master, not its peers
//! relay.heal();
//! # let _ = front; Ok(()) }
//! ```

mod path;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use self::path::Path;
pub use self::path::{Drop, PathStats, Shaping};

/// The largest datagram the relay carries (UDP's own limit).
const MAX_DATAGRAM: usize = 65_535;

/// Receive and send buffer sizes asked for every relay socket (the OS may cap them:
/// Linux's `net.core.rmem_max`). With the default of about 208 KiB a relay thread that
/// waits 4 ms for a CPU at 400 Mbit/s overflows its socket, and the kernel drops
/// datagrams that no path's [`Shaping`] decided to drop and no [`PathStats`] counts.
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// A non-blocking UDP socket bound at `addr` with [`SOCKET_BUFFER_BYTES`] of buffers
/// (best effort), as a tokio socket of the current runtime.
fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    socket.set_nonblocking(true)?;
    // Best effort, as for QUIC endpoints: smaller buffers still work. Not through
    // quinn-udp's socket state, which would also turn on UDP GRO: the relay would then
    // read several coalesced datagrams as one and forward them as one, which no QUIC
    // receiver can parse.
    let sock = socket2::SockRef::from(&socket);
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    UdpSocket::from_std(socket)
}

/// A running relay. Dropping it stops every front and forgets every flow.
pub struct Relay {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

/// A directed path: (from, to), by real addresses.
type PathKey = (SocketAddr, SocketAddr);

struct Shared {
    seed: u64,
    rules: Mutex<Rules>,
    /// Packets to deliver later, to the scheduler task.
    due: mpsc::UnboundedSender<Due>,
}

#[derive(Default)]
struct Rules {
    default: Shaping,
    set: HashMap<PathKey, Shaping>,
    paths: HashMap<PathKey, Path>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Rules> {
        self.rules.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets the path `key` decide on a packet from `socket` to `dest`: `Some(data)` to
    /// send now; later packets go to the scheduler, dropped ones nowhere.
    fn forward<'a>(&self, key: PathKey, socket: &Arc<UdpSocket>, dest: SocketAddr, data: &'a [u8]) -> Option<&'a [u8]> {
        let now = Instant::now();
        let verdict = {
            let mut rules = self.lock();
            let Rules { default, set, paths } = &mut *rules;
            let shaping = set.get(&key).unwrap_or(default);
            // Each path's stream is drawn once, when its first packet comes.
            let new_path =
                || Path::new(self.seed ^ crate::collective::fnv1a(format!("{}>{}", key.0, key.1).into_bytes()));
            paths.entry(key).or_insert_with(new_path).admit(shaping, now, data.len())
        };
        match verdict {
            // Due now: no trip through the timer, whose granularity is a millisecond.
            Ok(at) if at <= now => Some(data),
            Ok(at) => {
                let _ = self.due.send(Due { at, socket: socket.clone(), dest, data: data.to_vec() });
                None
            }
            Err(_) => None,
        }
    }
}

/// A packet waiting for its delivery time.
struct Due {
    at: Instant,
    socket: Arc<UdpSocket>,
    dest: SocketAddr,
    data: Vec<u8>,
}

impl Relay {
    /// Starts a relay with no fronts on a thread of its own. Paths shape as `default`
    /// until told otherwise; `seed` fixes every path's random stream.
    pub fn start(seed: u64, default: Shaping) -> std::io::Result<Relay> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("phalanx-relay")
            .enable_all()
            .build()?;
        let (due, queue) = mpsc::unbounded_channel();
        let rules = Rules { default, ..Rules::default() };
        let shared = Arc::new(Shared { seed, rules: Mutex::new(rules), due });
        runtime.spawn(deliver_when_due(queue));
        Ok(Relay { shared, runtime: Some(runtime) })
    }

    /// Opens a front on a free port of 127.0.0.1 for `target` and returns its address.
    pub fn front(&self, target: SocketAddr) -> std::io::Result<SocketAddr> {
        self.front_at(SocketAddr::from(([127, 0, 0, 1], 0)), target)
    }

    /// Opens a front at `listen` for `target` and returns its address.
    pub fn front_at(&self, listen: SocketAddr, target: SocketAddr) -> std::io::Result<SocketAddr> {
        let runtime = self.runtime.as_ref().expect("the runtime lives as long as the relay"); // ok: only Drop takes it
        let socket = {
            let _in_runtime = runtime.enter();
            Arc::new(bind_udp(listen)?)
        };
        let addr = socket.local_addr()?;
        runtime.spawn(front_loop(self.shared.clone(), socket, target));
        Ok(addr)
    }

    /// Shapes every path not set otherwise with `shaping`.
    pub fn set_default(&self, shaping: Shaping) {
        self.shared.lock().default = shaping;
    }

    /// Shapes the direction `from` → `to` with `shaping`.
    pub fn set(&self, from: SocketAddr, to: SocketAddr, shaping: Shaping) {
        self.shared.lock().set.insert((from, to), shaping);
    }

    /// Shapes both directions between `a` and `b` with `shaping`.
    pub fn set_between(&self, a: SocketAddr, b: SocketAddr, shaping: Shaping) {
        let mut rules = self.shared.lock();
        rules.set.insert((a, b), shaping.clone());
        rules.set.insert((b, a), shaping);
    }

    /// Cuts both directions between `a` and `b`.
    pub fn cut_between(&self, a: SocketAddr, b: SocketAddr) {
        self.set_between(a, b, Shaping::cut());
    }

    /// Cuts every path between members of different `sides` (a group split in parts).
    pub fn partition(&self, sides: &[&[SocketAddr]]) {
        for (i, side) in sides.iter().enumerate() {
            for other in &sides[i + 1..] {
                for &a in side.iter() {
                    for &b in other.iter() {
                        self.cut_between(a, b);
                    }
                }
            }
        }
    }

    /// Removes the cuts between `a` and `b` (both directions); other cuts stay.
    pub fn heal_between(&self, a: SocketAddr, b: SocketAddr) {
        let mut rules = self.shared.lock();
        for key in [(a, b), (b, a)] {
            if rules.set.get(&key).is_some_and(|s| s.blocked) {
                rules.set.remove(&key);
            }
        }
    }

    /// Removes every cut; paths shaped otherwise keep their shaping.
    pub fn heal(&self) {
        self.shared.lock().set.retain(|_, s| !s.blocked);
    }

    /// What each path has carried and dropped so far, by `(from, to)`.
    pub fn stats(&self) -> Vec<((SocketAddr, SocketAddr), PathStats)> {
        let mut all: Vec<_> = self.shared.lock().paths.iter().map(|(k, p)| (*k, p.stats)).collect();
        all.sort_by_key(|(k, _)| *k);
        all
    }
}

impl std::ops::Drop for Relay {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Reads what dialers send to a front and forwards it to `target`, one upstream socket
/// per dialer, whose replies go back through the front.
async fn front_loop(shared: Arc<Shared>, front: Arc<UdpSocket>, target: SocketAddr) {
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((len, from)) = front.recv_from(&mut buf).await else { continue };
        let upstream = match upstreams.get(&from) {
            Some(u) => u.clone(),
            None => {
                let Ok(u) = bind_udp(SocketAddr::new(target.ip(), 0)).map(Arc::new) else { continue };
                tokio::spawn(back_loop(shared.clone(), u.clone(), front.clone(), target, from));
                upstreams.insert(from, u.clone());
                u
            }
        };
        if let Some(now) = shared.forward((from, target), &upstream, target, &buf[..len]) {
            let _ = upstream.send_to(now, target).await;
        }
    }
}

/// Carries `target`'s replies to `dialer` through the front.
async fn back_loop(
    shared: Arc<Shared>,
    upstream: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    target: SocketAddr,
    dialer: SocketAddr,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((len, from)) = upstream.recv_from(&mut buf).await else { continue };
        if from == target {
            if let Some(now) = shared.forward((target, dialer), &front, dialer, &buf[..len]) {
                let _ = front.send_to(now, dialer).await;
            }
        }
    }
}

/// Sends each queued packet at its time, earliest first.
async fn deliver_when_due(mut queue: mpsc::UnboundedReceiver<Due>) {
    let mut heap: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut waiting: HashMap<u64, Due> = HashMap::new();
    let mut next_id = 0u64;
    loop {
        let next = heap.peek().map(|Reverse((at, _))| *at);
        tokio::select! {
            got = queue.recv() => {
                let Some(due) = got else { return };
                heap.push(Reverse((due.at, next_id)));
                waiting.insert(next_id, due);
                next_id += 1;
            }
            () = tokio::time::sleep_until(next.unwrap_or_else(Instant::now).into()), if next.is_some() => {
                let now = Instant::now();
                while let Some(Reverse((at, id))) = heap.peek().copied() {
                    if at > now {
                        break;
                    }
                    heap.pop();
                    if let Some(due) = waiting.remove(&id) {
                        // A send that fails (the receiver is gone) loses the packet, as a
                        // network would.
                        let _ = due.socket.send_to(&due.data, due.dest).await;
                    }
                }
            }
        }
    }
}

/// A free UDP address on 127.0.0.1, for a process that must know its address before
/// it binds (a peer that advertises its relay front): the port was free a moment ago
/// and is free again; another process could take it in between, which in tests on one
/// machine does not happen in practice.
pub fn free_udp_addr() -> std::io::Result<SocketAddr> {
    std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()
}

#[cfg(test)]
mod tests;
