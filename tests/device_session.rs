//! The device communicator through the real master: 4 networked in-process peers (the
//! in-memory network) each run a `DeviceSession` on the CPU stand-in backend, the unique
//! id of each epoch carried by the master's protocol. The ids agree, a peer lost in the
//! middle of a device collective fails it on the survivors, who recover over the next
//! view, a joiner is added at `update_topology`; the sums are exact after each, for each
//! capability mix (shrink and grow, shrink only like NCCL 2.28.3, neither).

mod common;

use std::time::Duration;

use common::{admit, cluster, join, net_group, with_timeout};
use phalanx::comm::RetryPolicy;
use phalanx::device::session::DeviceSession;
use phalanx::device::standin::StandIn;
use phalanx::device::{Capabilities, DeviceComm, DeviceError, UniqueId};
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
