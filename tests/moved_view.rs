//! A caller sizes its arguments from the view it settled with `update_topology`. When
//! the view moves under it before the call (a member leaves), the call must fail with
//! the retryable `Aborted` that sends it back to `update_topology` — never with an
//! `InvalidArgument` about counts it computed correctly a moment before.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use phalanx::comm::{ConnectOptions, RetryPolicy};
use phalanx::membership::master::MasterConfig;
use phalanx::transport::endpoint::Endpoint;
use phalanx::transport::memnet::MemNetwork;
use phalanx::MasterServer;
use phalanx::{Communicator, Error, ReduceOp};

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn join(net: &MemNetwork, port: u16) -> Communicator {
    join_with(net, port, ConnectOptions { retry: RetryPolicy::Never, ..ConnectOptions::default() })
}

fn join_with(net: &MemNetwork, port: u16, options: ConnectOptions) -> Communicator {
    let net = net.clone();
    Communicator::connect_with(move || Ok(net.endpoint(addr(port)) as Arc<dyn Endpoint>), addr(1), options).unwrap()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Every member calls `update_topology` at once.
fn settle(comms: &mut [Communicator]) {
    std::thread::scope(|s| {
        for c in comms.iter_mut() {
            s.spawn(move || c.update_topology().unwrap());
        }
    });
}

fn barrier(comms: &mut [Communicator]) {
    std::thread::scope(|s| {
        for c in comms.iter_mut() {
            s.spawn(move || c.barrier().unwrap());
        }
    });
}

#[test]
fn a_view_that_moved_since_the_last_round_fails_retryably_not_as_a_bad_argument() {
    let net = MemNetwork::new(16);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let _master = rt.block_on(async { MasterServer::spawn(net.endpoint(addr(1)), MasterConfig::default()) });

    // Three members, admitted one at a time through the members' rounds.
    let mut comms = vec![join(&net, 100)];
    for port in [101, 102] {
        let joiner = std::thread::scope(|s| {
            let h = s.spawn(|| join(&net, port));
            wait_until("the joiner is pending", || comms[0].peers_pending() == 1);
            settle(&mut comms);
            h.join().unwrap()
        });
        comms.push(joiner);
        // A barrier in the new view: a joiner's admitting round counts as its own
        // update_topology, so the next round needs every member past it.
        barrier(&mut comms);
    }
    let n = comms[0].size();
    assert_eq!(n, 3);

    // The last member leaves; the others see the live view move.
    let epoch = comms[0].epoch();
    drop(comms.pop());
    wait_until("the view moved", || comms.iter().all(|c| c.epoch() > epoch));

    // Arguments sized for the three the caller settled with: every sized call fails
    // with the retryable abort, buffers untouched.
    let input = vec![1f32; 2 * n];
    let mut out = vec![7f32; 2];
    let err = comms[0].reduce_scatter_v(&input, &mut out, &vec![2; n], ReduceOp::Sum).unwrap_err();
    assert!(matches!(&err, Error::Aborted { reason } if reason.contains("update_topology")), "{err:?}");
    assert!(err.is_retryable());
    assert_eq!(out, vec![7.0; 2]);
    let mut gathered = vec![0f32; 2 * n];
    let err = comms[0].all_gather(&[1f32, 2.0], &mut gathered).unwrap_err();
    assert!(matches!(err, Error::Aborted { .. }), "{err:?}");
    let err = comms[0].broadcast(&mut [0f32; 4], n - 1).unwrap_err();
    assert!(matches!(err, Error::Aborted { .. }), "root {} of the old view: {err:?}", n - 1);
    let err = comms[0].sub_all_reduce(&[0, n - 1], &mut [0f32; 4], ReduceOp::Sum).unwrap_err();
    assert!(matches!(err, Error::Aborted { .. }), "{err:?}");

    // Settled again, the same calls sized for the new view run.
    settle(&mut comms);
    assert_eq!(comms[0].size(), 2);
    let results: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .iter_mut()
            .map(|c| {
                s.spawn(move || {
                    let mut out = vec![0f32; 2];
                    c.reduce_scatter(&[1.0, 2.0, 3.0, 4.0], &mut out, ReduceOp::Sum).unwrap();
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results, vec![vec![2.0, 4.0], vec![6.0, 8.0]]);
}

#[test]
fn a_closed_group_fails_every_call_after_a_loss_and_never_shrinks() {
    // torch.distributed's contract (ConnectOptions::closed): the world formed once and
    // never moves; a loss fails every later call with PeerLost.
    let net = MemNetwork::new(16);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let config = MasterConfig { initial_peers: 3, ..MasterConfig::default() };
    let _master = rt.block_on(async { MasterServer::spawn(net.endpoint(addr(1)), config) });
    let mut comms: Vec<Communicator> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3u16)
            .map(|i| {
                let net = &net;
                s.spawn(move || join_with(net, 100 + i, ConnectOptions::new().peer_id(u64::from(i)).closed(true)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Ranks follow the ids the peers chose, whatever their arrival order.
    assert_eq!(comms.iter().map(Communicator::rank).collect::<Vec<_>>(), vec![0, 1, 2]);
    barrier(&mut comms);

    let epoch = comms[0].epoch();
    drop(comms.pop());
    let lost = |c: &mut Communicator| {
        let mut x = [1f32; 4];
        let err = c.all_reduce(&mut x, ReduceOp::Sum).unwrap_err();
        assert_eq!(x, [1.0; 4], "buffer restored");
        err
    };
    wait_until("the loss is seen", || {
        let mut x = [1f32; 4];
        comms[0].all_reduce(&mut x, ReduceOp::Sum).is_err()
    });
    for c in &mut comms {
        let err = lost(c);
        assert!(matches!(err, Error::PeerLost { rank: 2, .. }), "{err:?}");
        assert_eq!((c.size(), c.epoch()), (3, epoch), "the formed view stays");
    }
    // update_topology does not shrink it either: it reports the loss too.
    assert!(matches!(comms[1].update_topology(), Err(Error::PeerLost { rank: 2, .. })));
    assert!(matches!(lost(&mut comms[1]), Error::PeerLost { .. }));
}
