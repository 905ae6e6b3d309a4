//! A master and its peers as state machines wired together, with no runtime and no
//! sockets: the way quinn-proto's tests pair a client and a server.
//!
//! [`Pair`] delivers every [`Output`] of the master to the peer it names at once and in
//! order, records it, and keeps a fake clock. Tests drive it message by message and
//! assert the exact messages and decisions; the simulator ([`crate::sim`]) routes its
//! executors' reports through one, so that simulated collectives commit by the
//! production protocol.

use std::time::Instant;

use super::master::{ConnId, MasterConfig, MasterState, Output};
use super::peer::{OpKey, PeerConfig, PeerState};
use super::protocol::{ToMaster, ToPeer};
use super::view::PeerId;
use crate::error::Error;

/// A master and peers `0..n`, peer `i` on control connection `i + 1`.
#[derive(Debug)]
pub struct Pair {
    /// The master.
    pub master: MasterState,
    /// The peers, in the order they were added.
    pub peers: Vec<PeerState>,
    /// Every message the master sent each peer, in order.
    pub inbox: Vec<Vec<ToPeer>>,
    /// Every abort each peer's state ordered (the driver would fire these), in order.
    pub aborts: Vec<Vec<(OpKey, Error)>>,
    /// The fake clock.
    pub now: Instant,
}

impl Pair {
    /// A master with no peers.
    pub fn new(config: MasterConfig) -> Pair {
        Pair {
            master: MasterState::new(config),
            peers: Vec::new(),
            inbox: Vec::new(),
            aborts: Vec::new(),
            now: Instant::now(),
        }
    }

    /// A group of `n` members formed in one view (epoch 1), ranked by id: peer `i`
    /// has id `i` and rank `i`.
    pub fn group(n: usize, config: PeerConfig) -> Pair {
        let mut pair = Pair::new(MasterConfig { initial_peers: n, ..MasterConfig::default() });
        for id in 0..n as PeerId {
            pair.join(id, config);
        }
        pair
    }

    /// The control connection of peer `i`.
    pub fn conn(i: usize) -> ConnId {
        i as ConnId + 1
    }

    /// Adds a peer with `id`, which sends its join; returns its index.
    pub fn join(&mut self, id: PeerId, config: PeerConfig) -> usize {
        self.peers.push(PeerState::new(id, config, self.now));
        self.inbox.push(Vec::new());
        self.aborts.push(Vec::new());
        let i = self.peers.len() - 1;
        let addr = ([127, 0, 0, 1], 7000 + i as u16).into();
        self.send(i, ToMaster::Join { id, data_addr: addr });
        i
    }

    /// Peer `i` sends `msg`; the master's outputs are delivered and returned.
    pub fn send(&mut self, i: usize, msg: ToMaster) -> Vec<Output> {
        let out = self.master.handle(Self::conn(i), msg, self.now);
        self.deliver(&out);
        out
    }

    /// The master dies and a fresh one (restarted, or a standby) takes its place; every
    /// peer notices it lost its master. Peers then [`Pair::rejoin`] it.
    #[cfg(test)]
    pub fn replace_master(&mut self, config: MasterConfig) {
        self.master = MasterState::new(config);
        for (i, p) in self.peers.iter_mut().enumerate() {
            self.aborts[i].extend(p.master_lost("the master died".into(), self.now));
        }
    }

    /// Peer `i` rejoins the master with its own state; the master's outputs are returned.
    #[cfg(test)]
    pub fn rejoin(&mut self, i: usize) -> Vec<Output> {
        let msg = self.peers[i].rejoin(([127, 0, 0, 1], 7000 + i as u16).into()).expect("a member has a view"); // ok: test harness (cfg test/testing)
        self.send(i, msg)
    }

    /// Peer `i`'s control connection breaks (a crash, as the master sees it).
    pub fn disconnect(&mut self, i: usize) -> Vec<Output> {
        let out = self.master.disconnected(Self::conn(i));
        self.deliver(&out);
        out
    }

    /// Moves the clock on by `d` and lets the master and every peer act on it.
    #[cfg(test)]
    pub fn advance(&mut self, d: std::time::Duration) -> Vec<Output> {
        self.now += d;
        let out = self.master.tick(self.now);
        self.deliver(&out);
        for (i, p) in self.peers.iter_mut().enumerate() {
            self.aborts[i].extend(p.tick(self.now));
        }
        out
    }

    /// Delivers the master's outputs: a message to its peer; a close as the refusal the
    /// driver sends before closing.
    pub fn deliver(&mut self, out: &[Output]) {
        for o in out {
            let (conn, msg) = match o {
                Output::Send(c, m) => (*c, m.clone()),
                Output::Close(c, reason) => (*c, ToPeer::Refused { reason: reason.clone() }),
                Output::Release(c) => {
                    let i = (*c - 1) as usize;
                    if let Some(p) = self.peers.get_mut(i) {
                        self.aborts[i].extend(p.master_lost("released by the master".into(), self.now));
                    }
                    continue;
                }
            };
            let i = (conn - 1) as usize;
            if let Some(p) = self.peers.get_mut(i) {
                self.inbox[i].push(msg.clone());
                self.aborts[i].extend(p.handle(msg, self.now));
                // What the peer's state sends on its own (a `ViewSeen`) goes out now,
                // after the message that caused it, as the driver sends it.
                for reply in p.take_outbox() {
                    self.send(i, reply);
                }
            }
        }
    }

    /// Takes the messages peer `i` received since the last call.
    #[cfg(test)]
    pub fn take_inbox(&mut self, i: usize) -> Vec<ToPeer> {
        std::mem::take(&mut self.inbox[i])
    }
}
