//! The device communicator through the real master: 4 networked in-process peers (the
//! in-memory network) each run a `DeviceSession` on the CPU stand-in backend, the unique
//! id of each epoch carried by the master's protocol. The ids agree, a peer lost in the
//! middle of a device collective fails it on the survivors, who recover over the next
//! view, a joiner is added at `update_topology`; the sums are exact after each, for each
//! capability mix (shrink and grow, shrink only like NCCL 2.28.3, neither).
//!
//! A device failure with nobody lost recovers in the same epoch (the next generation of
//! the view's communicator), whether every member or only some saw it; a master killed
//! and restarted while members wait for the id, or after it relayed the id, leaves every
//! member on the same id.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{admit, cluster, join, net_group, with_timeout};
use phalanx::comm::{ConnectOptions, RetryPolicy};
use phalanx::device::session::DeviceSession;
use phalanx::device::standin::StandIn;
use phalanx::device::{Capabilities, DeviceComm, DeviceError, UniqueId};
use phalanx::membership::master::MasterConfig;
use phalanx::transport::endpoint::Endpoint;
use phalanx::transport::memnet::MemNetwork;
use phalanx::MasterServer;
use phalanx::{Communicator, ReduceOp};

type Session = DeviceSession<StandIn>;

/// Every peer syncs its device communicator to its view (one thread each); returns each
/// one's (unique id, rank, size).
fn sync_all(comms: &mut [Communicator], sessions: &mut [Session]) -> Vec<(UniqueId, usize, usize)> {
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter_mut()
            .zip(sessions.iter_mut())
            .map(|(c, d)| {
                s.spawn(move || {
                    let dev = d.sync(c).expect("sync");
                    (dev.id(), dev.rank(), dev.size())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    })
}

/// Every peer all-reduces `rank + 1` on its device communicator.
fn all_reduce(sessions: &mut [Session]) -> Vec<Result<Vec<f32>, DeviceError>> {
    std::thread::scope(|s| {
        let hs: Vec<_> = sessions
            .iter_mut()
            .map(|d| {
                s.spawn(move || {
                    let dev = d.comm().ok_or(DeviceError::Aborted { reason: "not ready".into() })?;
                    let mut buf = vec![dev.rank() as f32 + 1.0; 8];
                    dev.all_reduce(&mut buf, ReduceOp::Sum).map(|()| buf)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    })
}

fn each_update_topology(comms: &mut [Communicator]) {
    std::thread::scope(|s| {
        for c in comms.iter_mut() {
            s.spawn(move || c.update_topology().expect("update_topology"));
        }
    });
}

fn life(caps: Capabilities) {
    let c = cluster();
    let backend = StandIn::new(caps, Duration::from_secs(20));
    let mut comms = net_group(&c, 4, RetryPolicy::Never);
    let mut sessions: Vec<Session> = comms.iter().map(|c| DeviceSession::new(c.peer_id(), backend.clone())).collect();

    // One id for the view, through the master; ranks follow the view's.
    let got = sync_all(&mut comms, &mut sessions);
    let first = got[0].0;
    for (r, (id, rank, size)) in got.iter().enumerate() {
        assert_eq!((*id, *rank, *size), (first, r, 4), "{caps:?}");
    }
    assert!(all_reduce(&mut sessions).into_iter().all(|r| r == Ok(vec![10.0; 8])), "{caps:?}");

    // Peer 3 dies while the others are in a device collective: NCCL reports the lost
    // rank on the survivors (the stand-in is told, as it cannot see a process die).
    let (dead, dead_session) = (comms.pop().expect("peer 3"), sessions.pop().expect("session 3"));
    let errors = std::thread::scope(|s| {
        let h = s.spawn(|| all_reduce(&mut sessions));
        drop(dead);
        drop(dead_session);
        backend.fail(&first, "rank 3 lost");
        h.join().expect("thread")
    });
    for (d, r) in sessions.iter_mut().zip(errors) {
        let e = r.expect_err("the collective lost a rank");
        assert!(matches!(e, DeviceError::Call { .. }), "{e:?}");
        d.failed(e);
        assert!(d.comm().is_none(), "a failed communicator is not handed out");
    }
    each_update_topology(&mut comms);
    let got = sync_all(&mut comms, &mut sessions);
    for (r, (id, rank, size)) in got.iter().enumerate() {
        assert_eq!((*id, *rank, *size), (got[0].0, r, 3), "{caps:?}");
    }
    assert_ne!(got[0].0, first, "a new communicator: {caps:?}");
    assert!(all_reduce(&mut sessions).into_iter().all(|r| r == Ok(vec![6.0; 8])), "{caps:?}");

    // A joiner, admitted at update_topology: grown where NCCL has grow, else a fresh init.
    admit(&mut comms, || join(&c, 200, RetryPolicy::Never));
    sessions.push(DeviceSession::new(comms[3].peer_id(), backend.clone()));
    let got = sync_all(&mut comms, &mut sessions);
    for (r, (id, rank, size)) in got.iter().enumerate() {
        assert_eq!((*id, *rank, *size), (got[0].0, r, 4), "{caps:?}");
    }
    assert!(all_reduce(&mut sessions).into_iter().all(|r| r == Ok(vec![10.0; 8])), "{caps:?}");
}

#[test]
fn four_peers_live_through_a_loss_and_a_join_with_ids_from_the_master() {
    with_timeout(60, || {
        let nccl_2_28_3 = Capabilities {
            init_config: true,
            abort: true,
            async_error: true,
            shrink: true,
            revoke: false,
            grow: false,
        };
        for caps in [Capabilities::ALL, nccl_2_28_3, Capabilities::default()] {
            life(caps);
        }
    });
}

const NCCL_2_28_3: Capabilities =
    Capabilities { init_config: true, abort: true, async_error: true, shrink: true, revoke: false, grow: false };

/// Every member's all-reduce gives `expect` on its ready communicator.
fn all_exact(sessions: &mut [Session], expect: f32) -> bool {
    all_reduce(sessions).into_iter().all(|r| r == Ok(vec![expect; 8]))
}

/// An NCCL error while every peer lives: every member's collective fails, each hands the
/// error to its session and syncs again, with no `update_topology` and no new view: the
/// next generation, one new id for all, exact sums.
#[test]
fn a_device_failure_with_nobody_lost_recovers_in_the_same_epoch() {
    with_timeout(60, || {
        for caps in [Capabilities::ALL, NCCL_2_28_3, Capabilities::default()] {
            let c = cluster();
            let backend = StandIn::new(caps, Duration::from_secs(20));
            let mut comms = net_group(&c, 4, RetryPolicy::Never);
            let mut sessions: Vec<Session> =
                comms.iter().map(|c| DeviceSession::new(c.peer_id(), backend.clone())).collect();
            let first = sync_all(&mut comms, &mut sessions)[0].0;
            let epoch = comms[0].epoch();
            assert!(all_exact(&mut sessions, 10.0), "{caps:?}");

            backend.fail(&first, "an NCCL error, nobody lost");
            let errors = all_reduce(&mut sessions);
            for (d, r) in sessions.iter_mut().zip(errors) {
                let e = r.expect_err("the communicator failed");
                assert!(matches!(e, DeviceError::Call { .. }), "{e:?}");
                d.failed(e);
                assert!(d.comm().is_none(), "a failed communicator is not handed out");
            }
            let got = sync_all(&mut comms, &mut sessions);
            for (r, (id, rank, size)) in got.iter().enumerate() {
                assert_eq!((*id, *rank, *size), (got[0].0, r, 4), "{caps:?}");
            }
            assert_ne!(got[0].0, first, "a fresh communicator: {caps:?}");
            assert!(comms.iter().all(|c| c.epoch() == epoch), "no new view: {caps:?}");
            assert!(sessions.iter().all(|s| s.generation() == (epoch, 1)), "{caps:?}");
            assert!(all_exact(&mut sessions, 10.0), "{caps:?}");
        }
    });
}

/// A peer dies while the others make their communicator (NCCL-like: creation waits for
/// every rank, and this one never comes): the view moves on without it, the others give
/// the creation up with a retryable `Aborted` instead of waiting forever, and recover
/// over the next view.
#[test]
fn a_creation_waiting_for_a_lost_peer_is_given_up_when_the_view_moves() {
    with_timeout(60, || {
        let c = cluster();
        let backend = StandIn::new(NCCL_2_28_3, Duration::from_secs(20)).with_collective_creation();
        let mut comms = net_group(&c, 3, RetryPolicy::Never);
        let mut sessions: Vec<Session> =
            comms.iter().map(|c| DeviceSession::new(c.peer_id(), backend.clone())).collect();
        let (dead, dead_session) = (comms.pop().expect("peer 2"), sessions.pop().expect("session 2"));
        let epoch = comms[0].epoch();
        let results = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter_mut()
                .zip(sessions.iter_mut())
                .map(|(c, d)| s.spawn(move || d.sync(c).map(|_| ()).map_err(|e| e.to_string())))
                .collect();
            // Both wait on the creation (peer 2 never makes its communicator); then it dies.
            std::thread::sleep(Duration::from_millis(200));
            drop(dead);
            drop(dead_session);
            hs.into_iter().map(|h| h.join().expect("thread")).collect::<Vec<_>>()
        });
        for r in results {
            let e = r.expect_err("the creation cannot complete");
            assert!(e.contains("moved"), "{e}");
        }
        each_update_topology(&mut comms);
        assert!(comms.iter().all(|c| c.epoch() > epoch && c.size() == 2));
        let got = sync_all(&mut comms, &mut sessions);
        assert_eq!(got[0].0, got[1].0);
        assert!(all_exact(&mut sessions, 3.0));
    });
}

/// Syncs, then all-reduces `rank + 1`; a failed collective goes to `failed` and the step
/// is tried again, 3 times at most. Returns the sum, or the last error.
fn recovering_step(c: &mut Communicator, d: &mut Session) -> Result<Vec<f32>, String> {
    let mut last = String::new();
    for _ in 0..3 {
        let dev = d.sync(c).map_err(|e| e.to_string())?;
        let mut buf = vec![dev.rank() as f32 + 1.0; 8];
        match dev.all_reduce(&mut buf, ReduceOp::Sum) {
            Ok(()) => return Ok(buf),
            Err(e) => {
                last = e.to_string();
                d.failed(e);
            }
        }
    }
    Err(last)
}

/// Only peers 0 and 1 see the failure (an async error check, say). First, peers 2 and 3
/// had started nothing: at their next `sync` they follow the generation the others made.
/// Then again with peers 2 and 3 already waiting in a collective on the old
/// communicator: the others' abort fails it (no deadlock), and they follow too.
#[test]
fn a_failure_seen_by_some_members_is_followed_by_the_others() {
    with_timeout(60, || {
        let c = cluster();
        let backend = StandIn::new(NCCL_2_28_3, Duration::from_secs(20));
        let mut comms = net_group(&c, 4, RetryPolicy::Never);
        let mut sessions: Vec<Session> =
            comms.iter().map(|c| DeviceSession::new(c.peer_id(), backend.clone())).collect();
        let first = sync_all(&mut comms, &mut sessions)[0].0;
        let epoch = comms[0].epoch();
        let seen = || DeviceError::Call { call: "ncclCommGetAsyncError", code: 6, message: "remote error".into() };

        // Peers 0 and 1 renew, alone (the id needs no other member), one after the other.
        for p in 0..2 {
            sessions[p].failed(seen());
            assert_eq!(sessions[p].sync(&mut comms[p]).expect("sync").size(), 4);
        }
        let renewed = sessions[0].comm().expect("ready").id();
        assert_ne!(renewed, first);
        assert_eq!(sessions[1].comm().expect("ready").id(), renewed, "the first offer won");
        // Peers 2 and 3 never saw the failure: once the master's relay of generation 1
        // reached them, their next sync follows it. (Before, a sync returns the old
        // communicator, whose next collective fails: the second half below.)
        for p in 2..4 {
            while comms[p].device_relayed(epoch).is_none_or(|(g, ..)| g < 1) {
                std::thread::sleep(Duration::from_millis(2));
            }
            assert_eq!(sessions[p].generation(), (epoch, 0));
            assert_eq!(sessions[p].sync(&mut comms[p]).expect("sync").id(), renewed);
        }
        assert!(sessions.iter().all(|s| s.generation() == (epoch, 1)));
        assert!(all_exact(&mut sessions, 10.0));

        // Again, with peers 2 and 3 already in a collective on generation 1.
        let results = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter_mut()
                .zip(sessions.iter_mut())
                .enumerate()
                .map(|(p, (c, d))| {
                    s.spawn(move || {
                        if p < 2 {
                            d.failed(seen());
                            return recovering_step(c, d);
                        }
                        let dev = d.comm().ok_or("not ready")?;
                        let mut buf = vec![dev.rank() as f32 + 1.0; 8];
                        // Stuck on ranks 0 and 1, until their abort fails the communicator.
                        let e = dev.all_reduce(&mut buf, ReduceOp::Sum).expect_err("left by ranks 0 and 1");
                        d.failed(e);
                        recovering_step(c, d)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("thread")).collect::<Vec<_>>()
        });
        for (p, r) in results.into_iter().enumerate() {
            assert_eq!(r, Ok(vec![10.0; 8]), "peer {p}");
        }
        let id = sessions[0].comm().expect("ready").id();
        assert!(sessions.iter_mut().all(|s| s.comm().map(|c| c.id()) == Some(id)), "one id for all");
        assert!(sessions.iter().all(|s| s.generation() == (epoch, 2)));
        assert!(comms.iter().all(|c| c.epoch() == epoch), "no new view");
    });
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A master of 3 at `at` on a runtime of its own; dropping the pair kills it.
fn master(net: &MemNetwork, at: SocketAddr) -> (tokio::runtime::Runtime, MasterServer) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let config = MasterConfig { initial_peers: 3, ..MasterConfig::default() };
    let server = rt.block_on(async { MasterServer::spawn(net.endpoint(at), config) });
    (rt, server)
}

/// Kills a master (every connection dropped at once, as a SIGKILL would) and restarts
/// it on the same address after a pause.
fn restart(
    net: &MemNetwork,
    old: (tokio::runtime::Runtime, MasterServer),
    at: SocketAddr,
) -> (tokio::runtime::Runtime, MasterServer) {
    let (rt, server) = old;
    drop(server);
    rt.shutdown_background();
    net.unbind(at);
    std::thread::sleep(Duration::from_millis(300));
    master(net, at)
}

/// 3 peers of the master at `at`, formed into one view, each with a session.
fn three(net: &MemNetwork, at: SocketAddr, backend: &StandIn) -> (Vec<Communicator>, Vec<Session>) {
    three_with(net, at, backend, ConnectOptions::default())
}

fn three_with(
    net: &MemNetwork,
    at: SocketAddr,
    backend: &StandIn,
    options: ConnectOptions,
) -> (Vec<Communicator>, Vec<Session>) {
    let handles: Vec<_> = (0..3u16)
        .map(|i| {
            let (net, options) = (net.clone(), options.clone());
            std::thread::spawn(move || {
                let ep = move || Ok(net.endpoint(addr(100 + i)) as Arc<dyn Endpoint>);
                Communicator::connect_with(ep, at, options).expect("connect")
            })
        })
        .collect();
    let mut comms: Vec<Communicator> = handles.into_iter().map(|h| h.join().expect("thread")).collect();
    comms.sort_by_key(Communicator::rank);
    each_update_topology(&mut comms);
    let sessions = comms.iter().map(|c| DeviceSession::new(c.peer_id(), backend.clone())).collect();
    (comms, sessions)
}

/// The master is killed and restarted while peers 1 and 2 wait in `sync` for the id
/// (peer 0, the view's maker, had not offered it yet): the takeover moves the view with
/// the members unchanged, the waiters follow it by themselves, and every member ends
/// with the same id, made for the new epoch (the stand-in's creation completes only once
/// every rank made its communicator from that id, as NCCL's).
#[test]
fn members_waiting_for_the_id_when_the_master_is_replaced_end_with_one_id() {
    with_timeout(60, || {
        let net = MemNetwork::new(64);
        let at = addr(1);
        let first = master(&net, at);
        // Creation completes once all three made their communicator from one id.
        let backend = StandIn::new(NCCL_2_28_3, Duration::from_secs(20)).with_collective_creation();
        let (mut comms, mut sessions) = three(&net, at, &backend);
        let before = comms[0].epoch();
        let (c0, rest) = comms.split_first_mut().expect("3");
        let (d0, waiting) = sessions.split_first_mut().expect("3");
        let _restarted = std::thread::scope(|s| {
            let waiters: Vec<_> = rest
                .iter_mut()
                .zip(waiting.iter_mut())
                .map(|(c, d)| s.spawn(move || d.sync(c).map(|dev| dev.id()).map_err(|e| e.to_string())))
                .collect();
            std::thread::sleep(Duration::from_millis(100));
            let restarted = restart(&net, first, at);
            let id0 = d0.sync(c0).expect("the maker's sync").id();
            for w in waiters {
                assert_eq!(w.join().expect("thread"), Ok(id0), "every member has the maker's id");
            }
            restarted
        });
        assert!(comms.iter().all(|c| c.epoch() > before && c.size() == 3), "the new master's view");
        assert!(all_exact(&mut sessions, 6.0));
    });
}

/// The master relayed the id of the view and peer 0 made its communicator from it; the
/// master dies before peers 1 and 2 made theirs. The master restarted on its address
/// (or, the second time, a standby) relays that id again for its view (the same
/// members): peers 1 and 2 make theirs from it and the three all-reduce together, peer 0
/// still on the communicator it made before the takeover; at its next sync peer 0 keeps
/// it (no second init from one id).
#[test]
fn an_id_relayed_before_the_master_died_is_the_one_after_the_takeover() {
    with_timeout(60, || {
        relayed_then_replaced(false);
        relayed_then_replaced(true);
    });
}

fn relayed_then_replaced(standby: bool) {
    let net = MemNetwork::new(64);
    let (at, standby_at) = (addr(1), addr(2));
    let first = master(&net, at);
    let _standby = standby.then(|| master(&net, standby_at));
    let backend = StandIn::new(NCCL_2_28_3, Duration::from_secs(20));
    let options = match standby {
        true => ConnectOptions::default().standby_master(standby_at),
        false => ConnectOptions::default(),
    };
    let (mut comms, mut sessions) = three_with(&net, at, &backend, options);
    let before = comms[0].epoch();
    let made = sessions[0].sync(&mut comms[0]).expect("the maker's sync").id();
    // The relay reached every member (each has it, none made its communicator yet).
    for c in &comms {
        while c.device_relayed(before).is_none() {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let _restarted = match standby {
        false => Some(restart(&net, first, at)),
        true => {
            let (rt, server) = first;
            drop(server);
            rt.shutdown_background();
            net.unbind(at);
            None
        }
    };
    // The takeover is done everywhere before peers 1 and 2 ask for the id: only the
    // new master can give it to them now.
    for c in &comms {
        while c.epoch() == before {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let (_, rest) = comms.split_first_mut().expect("3");
    let (d0, others) = sessions.split_first_mut().expect("3");
    let sums = std::thread::scope(|s| {
        let hs: Vec<_> = rest
            .iter_mut()
            .zip(others.iter_mut())
            .map(|(c, d)| {
                s.spawn(move || {
                    let dev = d.sync(c).map_err(|e| e.to_string())?;
                    assert_eq!(dev.id(), made);
                    let mut buf = vec![dev.rank() as f32 + 1.0; 8];
                    dev.all_reduce(&mut buf, ReduceOp::Sum).map(|()| buf).map_err(|e| e.to_string())
                })
            })
            .collect();
        let dev = d0.comm().expect("peer 0's communicator");
        let mut buf = vec![1.0; 8];
        let mine = dev.all_reduce(&mut buf, ReduceOp::Sum).map(|()| buf).map_err(|e| e.to_string());
        std::iter::once(mine).chain(hs.into_iter().map(|h| h.join().expect("thread"))).collect::<Vec<_>>()
    });
    assert!(sums.iter().all(|r| r == &Ok(vec![6.0; 8])), "{sums:?}");
    // Peer 0 moves to the new view: the same communicator, relabelled.
    assert_eq!(sessions[0].sync(&mut comms[0]).expect("sync").id(), made);
    assert!(comms.iter().all(|c| c.epoch() > before));
    assert!(sessions.iter().all(|s| s.generation() == (comms[0].epoch(), 0)));
    assert!(all_exact(&mut sessions, 6.0));
}

/// Peers 0 and 1 make their communicator (NCCL-like: creation waits for every rank) and
/// peer 2 never does; the master dies and none takes over: once the peers are no longer
/// members, they give the creation up with `Removed` instead of waiting forever.
#[test]
fn a_creation_is_given_up_once_the_peer_is_removed() {
    with_timeout(60, || {
        let net = MemNetwork::new(64);
        let at = addr(1);
        let first = master(&net, at);
        let backend = StandIn::new(NCCL_2_28_3, Duration::from_secs(20)).with_collective_creation();
        let options = ConnectOptions::default().rejoin_within(Some(Duration::from_millis(200)));
        let (mut comms, mut sessions) = three_with(&net, at, &backend, options);
        let results = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter_mut()
                .zip(sessions.iter_mut())
                .take(2)
                .map(|(c, d)| s.spawn(move || d.sync(c).map(|_| ()).map_err(|e| e.to_string())))
                .collect();
            std::thread::sleep(Duration::from_millis(200));
            let (rt, server) = first;
            drop(server);
            rt.shutdown_background();
            net.unbind(at);
            hs.into_iter().map(|h| h.join().expect("thread")).collect::<Vec<_>>()
        });
        for r in results {
            let e = r.expect_err("nobody took over");
            assert!(e.contains("removed") || e.contains("no longer a member"), "{e}");
        }
    });
}
