//! Networked groups over real QUIC on 127.0.0.1 with every packet through the test
//! relay (`phalanx::relay`): loss, jitter and reordering slow collectives down but never
//! corrupt them, and a peer cut off from the master is removed, told so, and can join
//! again once the network heals.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::with_timeout;
use phalanx::comm::ConnectOptions;
use phalanx::relay::{free_udp_addr, Relay, Shaping};
use phalanx::transport::shm::SharedMemory;
use phalanx::{Communicator, Error, Master, MasterConfig, QuicConfig, ReduceOp};
use std::sync::atomic::{AtomicBool, Ordering};

const SECRET: &str = "relay-test-secret-0123456789abcdef";

/// A master and the relay's front for it.
struct Net {
    relay: Relay,
    master: Master,
    master_front: SocketAddr,
}

/// The first view forms once `initial_peers` have joined.
fn net(seed: u64, shaping: Shaping, peer_timeout: Duration, initial_peers: usize) -> Net {
    let relay = Relay::start(seed, shaping).unwrap();
    let config = MasterConfig { peer_timeout, initial_peers, ..MasterConfig::default() };
    let master = Master::start("127.0.0.1:0".parse().unwrap(), QuicConfig::with_secret(SECRET), config).unwrap();
    let master_front = relay.front(master.addr()).unwrap();
    Net { relay, master, master_front }
}

impl Net {
    /// Options of a peer that the others and the master reach only through the relay;
    /// returns them with the peer's real (bound) address.
    fn peer(&self, id: u64) -> (ConnectOptions, SocketAddr) {
        let bind = free_udp_addr().unwrap();
        let front = self.relay.front(bind).unwrap();
        let options = ConnectOptions::new()
            .secret(SECRET)
            .peer_id(id)
            .bind(bind)
            .advertise(front)
            .heartbeat(Duration::from_millis(100))
            .master_timeout(Duration::from_secs(2))
            // A peer cut off from the master looks for it this long before it is told.
            .rejoin_within(Some(Duration::from_secs(3)))
            // The relay stands in for a network between hosts: keep data on it.
            .shared_memory(SharedMemory::Off);
        (options, bind)
    }

    /// The first view's peers (as many as the master waits for), ranked by id.
    fn group(&self, ids: &[u64]) -> Vec<(Communicator, SocketAddr)> {
        let front = self.master_front;
        let mut peers: Vec<_> = std::thread::scope(|s| {
            let joins: Vec<_> = ids
                .iter()
                .map(|&id| {
                    let (options, bind) = self.peer(id);
                    s.spawn(move || (Communicator::connect(front, options).expect("connect"), bind))
                })
                .collect();
            joins.into_iter().map(|j| j.join().unwrap()).collect()
        });
        peers.sort_by_key(|(c, _)| c.rank());
        peers
    }
}

fn on_each<T: Send>(peers: &mut [(Communicator, SocketAddr)], f: impl Fn(&mut Communicator) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let hs: Vec<_> = peers.iter_mut().map(|(c, _)| s.spawn(|| f(c))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Integers in floats: every order of summation gives the same exact result.
fn input(rank: usize, round: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7 + rank * 13 + round) % 1000) as f32).collect()
}

#[test]
fn collectives_stay_exact_under_loss_jitter_and_reordering() {
    with_timeout(180, || {
        let lossy =
            Shaping::default().delay(Duration::from_millis(2)).jitter(Duration::from_millis(20), true).loss(0.05);
        let n = net(7, lossy, Duration::from_secs(3), 3);
        let mut peers = n.group(&[1, 2, 3]);
        for round in 0..3 {
            for len in [1000, 100_000] {
                let outs = on_each(&mut peers, |c| {
                    let mut x = input(c.rank(), round, len);
                    c.all_reduce(&mut x, ReduceOp::Sum).map(|()| x)
                });
                let inputs: Vec<Vec<f32>> = (0..3).map(|r| input(r, round, len)).collect();
                let want: Vec<f32> = (0..len).map(|i| inputs.iter().map(|x| x[i]).sum()).collect();
                for (r, out) in outs.into_iter().enumerate() {
                    assert_eq!(out.as_deref(), Ok(&want[..]), "rank {r}, round {round}, {len} elements");
                }
            }
        }
        let stats = n.relay.stats();
        let (lost, delivered): (u64, u64) = stats.iter().fold((0, 0), |(l, d), (_, s)| (l + s.lost, d + s.delivered));
        assert!(lost > 0 && delivered > 0, "the relay carried the traffic and lost some: {stats:?}");
        eprintln!("relay: {delivered} packets delivered, {lost} lost");
    });
}

#[test]
fn a_peer_cut_from_the_master_is_removed_told_and_rejoins_after_healing() {
    with_timeout(180, || {
        let n = net(8, Shaping::default(), Duration::from_millis(750), 3);
        let mut peers = n.group(&[1, 2, 3]);
        let (victim_addr, master_addr) = (peers[2].1, n.master.addr());
        // Peer 3 loses the master but not its peers.
        n.relay.cut_between(victim_addr, master_addr);
        let cut_at = Instant::now();
        let mut victim = peers.pop().unwrap();
        let survivors = std::thread::scope(|s| {
            let lone = s.spawn(move || {
                // Its collective cannot commit; it ends with an error, never a hang.
                let mut x = vec![1f32; 1000];
                let e = loop {
                    match victim.0.all_reduce(&mut x, ReduceOp::Sum) {
                        Err(e @ Error::Removed { .. }) => break e,
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                        Ok(()) => x = vec![1f32; 1000],
                    }
                };
                (e, cut_at.elapsed())
            });
            // The others go on without it once the master removed it. They stop at the
            // first collective that ran over the two of them, as its result says: an
            // eager collective of the old view may return after the new view came, so
            // the view's size after the call does not tell (and differs between them).
            let outs = on_each(&mut peers, |c| loop {
                let mut x = vec![c.rank() as f32 + 1.0; 1000];
                match c.all_reduce(&mut x, ReduceOp::Sum) {
                    Ok(()) if x[0] == 3.0 => return x,
                    Ok(()) => {}
                    Err(e) if e.is_retryable() => {
                        let _ = c.update_topology();
                    }
                    Err(e) => panic!("survivor failed: {e:?}"),
                }
            });
            let (e, took) = lone.join().unwrap();
            eprintln!("cut-off peer told after {took:?}: {e}");
            // The master timeout, the search for a master to rejoin, and slack.
            assert!(took < Duration::from_secs(10), "the cut-off peer waited {took:?}");
            outs
        });
        assert!(survivors.iter().all(|x| x.iter().all(|&v| v == 3.0)), "1 + 2 over the survivors");

        // The network heals: the peer joins again as a new member and computes with all.
        n.relay.heal();
        let (options, _) = n.peer(4);
        let front = n.master_front;
        let mut everyone = std::thread::scope(|s| {
            let joiner = s.spawn(move || Communicator::connect(front, options).expect("rejoin"));
            while peers[0].0.peers_pending() == 0 {
                std::thread::sleep(Duration::from_millis(10));
            }
            on_each(&mut peers, |c| c.update_topology().unwrap());
            let mut joined = joiner.join().unwrap();
            joined.update_topology().unwrap();
            peers.push((joined, "127.0.0.1:9".parse().unwrap()));
            peers
        });
        let outs = on_each(&mut everyone, |c| {
            let mut x = vec![1f32; 500];
            c.all_reduce(&mut x, ReduceOp::Sum).map(|()| (c.size(), x[0]))
        });
        assert!(outs.iter().all(|o| *o == Ok((3, 3.0))), "{outs:?}");
    });
}

/// A group split 2/1 on its data paths, every member still talking to the master: the
/// two that lost their links to the third report it, the master removes it (a majority
/// of the others cannot reach it), and only the side of two commits from then on; the
/// third gets `Removed` and never completes a collective after the cut.
#[test]
fn a_split_group_goes_on_on_the_majority_side_only() {
    with_timeout(180, || {
        let n = net(9, Shaping::default(), Duration::from_millis(750), 3);
        // Quick link-failure detection: a path that carries nothing for 3 s is dead
        // (ten keep-alives missed, so a loaded machine does not kill a healthy one).
        let quic = QuicConfig {
            idle_timeout: Duration::from_secs(3),
            keep_alive: Some(Duration::from_millis(300)),
            handshake_timeout: Duration::from_secs(3),
            ..QuicConfig::with_secret(SECRET)
        };
        let front = n.master_front;
        let mut peers: Vec<(Communicator, SocketAddr)> = std::thread::scope(|s| {
            let joins: Vec<_> = [1u64, 2, 3]
                .iter()
                .map(|&id| {
                    let (options, bind) = n.peer(id);
                    let options = options.quic(quic.clone());
                    s.spawn(move || (Communicator::connect(front, options).expect("connect"), bind))
                })
                .collect();
            joins.into_iter().map(|j| j.join().unwrap()).collect()
        });
        peers.sort_by_key(|(c, _)| c.rank());
        // Links up, then the split: {1, 2} | {3} on the data paths only. 100k elements
        // take the ring, in which both 1 and 2 talk to 3, so both can witness the cut.
        let outs = on_each(&mut peers, |c| {
            let mut x = vec![1f32; 100_000];
            c.all_reduce(&mut x, ReduceOp::Sum).map(|()| x[0])
        });
        assert!(outs.iter().all(|o| *o == Ok(3.0)), "{outs:?}");
        let (a, b, c) = (peers[0].1, peers[1].1, peers[2].1);
        n.relay.partition(&[&[a, b], &[c]]);
        let committed_by_the_lone_one = AtomicBool::new(false);
        let results = std::thread::scope(|s| {
            let lone = &committed_by_the_lone_one;
            let handles: Vec<_> = peers
                .iter_mut()
                .enumerate()
                .map(|(r, (comm, _))| {
                    s.spawn(move || loop {
                        let mut x = vec![1f32; 100_000];
                        match comm.all_reduce(&mut x, ReduceOp::Sum) {
                            Ok(()) if r == 2 => lone.store(true, Ordering::Relaxed),
                            Ok(()) if comm.size() == 2 => return Ok(x[0]),
                            Ok(()) => {}
                            Err(e) if e.is_retryable() => {
                                let _ = comm.update_topology();
                            }
                            Err(e) => return Err(e),
                        }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
        });
        eprintln!("split: {results:?}");
        assert_eq!(results[0], Ok(2.0), "the majority side goes on");
        assert_eq!(results[1], Ok(2.0), "the majority side goes on");
        assert!(matches!(results[2], Err(Error::Removed { .. })), "the cut-off member is told: {:?}", results[2]);
        assert!(!committed_by_the_lone_one.load(Ordering::Relaxed), "the lone member committed after the cut");
    });
}

/// A primary cut off from two of its three peers (not from the third), with a standby
/// running: the primary fences itself (`MasterConfig::fence`: most of its view went
/// silent at once) instead of going on with the one peer it still hears; the two rejoin
/// the standby, which takes the group over, and the third follows them there (or, if it
/// comes too late, is told it was removed). The primary never decides alone for the peer
/// it kept: no two masters decide for the group.
#[test]
fn a_primary_cut_off_from_most_of_its_peers_steps_down_for_the_standby() {
    with_timeout(120, || {
        let relay = Relay::start(10, Shaping::default()).unwrap();
        let base =
            MasterConfig { peer_timeout: Duration::from_millis(750), initial_peers: 3, ..MasterConfig::default() };
        let primary = Master::start(
            "127.0.0.1:0".parse().unwrap(),
            QuicConfig::with_secret(SECRET),
            MasterConfig { fence: true, ..base },
        )
        .unwrap();
        let standby = Master::start(
            "127.0.0.1:0".parse().unwrap(),
            QuicConfig::with_secret(SECRET),
            MasterConfig { standby: true, fence: true, ..base },
        )
        .unwrap();
        let (primary_front, standby_front) =
            (relay.front(primary.addr()).unwrap(), relay.front(standby.addr()).unwrap());
        let mut peers: Vec<(Communicator, SocketAddr)> = std::thread::scope(|s| {
            let joins: Vec<_> = [1u64, 2, 3]
                .iter()
                .map(|&id| {
                    let bind = free_udp_addr().unwrap();
                    let options = ConnectOptions::new()
                        .secret(SECRET)
                        .peer_id(id)
                        .bind(bind)
                        .advertise(relay.front(bind).unwrap())
                        .heartbeat(Duration::from_millis(100))
                        .master_timeout(Duration::from_secs(2))
                        .standby_master(standby_front)
                        .rejoin_within(Some(Duration::from_secs(15)))
                        .shared_memory(SharedMemory::Off);
                    s.spawn(move || (Communicator::connect(primary_front, options).expect("connect"), bind))
                })
                .collect();
            joins.into_iter().map(|j| j.join().unwrap()).collect()
        });
        peers.sort_by_key(|(c, _)| c.rank());
        // Peers of rank 1 and 2 lose the primary; rank 0 still hears it.
        for (_, bind) in &peers[1..] {
            relay.cut_between(*bind, primary.addr());
        }
        let epoch_before = peers[0].0.epoch();
        let committed_alone = AtomicBool::new(false);
        let results = std::thread::scope(|s| {
            let alone = &committed_alone;
            let handles: Vec<_> = peers
                .iter_mut()
                .map(|(comm, _)| {
                    // Until a collective commits in a view after the cut.
                    // The sum counts the collective's members (x[1]) and those of them that
                    // began it after the view moved (x[0]): the same on every member, so
                    // they stop together. (An eager collective of the old view may return
                    // after the new view came, so the epoch after the call can differ.)
                    s.spawn(move || loop {
                        let moved = if comm.epoch() > epoch_before { 1f32 } else { 0f32 };
                        let mut x = vec![moved, 1f32];
                        match comm.all_reduce(&mut x, ReduceOp::Sum) {
                            Ok(()) if x[1] < 2.0 => {
                                alone.store(true, Ordering::Relaxed);
                                return Ok((1, x[1]));
                            }
                            Ok(()) if x[0] == x[1] => return Ok((x[1] as usize, x[1])),
                            Ok(()) => std::thread::sleep(Duration::from_millis(20)),
                            Err(e) if e.is_retryable() => {
                                let _ = comm.update_topology();
                            }
                            Err(e) => return Err(e),
                        }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
        });
        eprintln!("fenced primary: {results:?}");
        assert!(!committed_alone.load(Ordering::Relaxed), "the primary went on with the one peer it heard");
        for r in &results[1..] {
            assert!(matches!(r, Ok((n, sum)) if *n >= 2 && *sum == *n as f32), "the standby's side goes on: {r:?}");
        }
        match &results[0] {
            Ok((3, sum)) => assert_eq!(*sum, 3.0, "the kept peer followed the group to the standby"),
            Err(Error::Removed { .. }) => {}
            other => panic!("the peer the primary kept neither followed nor was told: {other:?}"),
        }
    });
}
