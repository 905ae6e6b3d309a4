//! A networked peer keeps its restore-on-error backup allocation across calls: calls
//! that reuse it, grow it or bypass it must all still restore the caller's buffer
//! exactly when the collective fails.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
    let net = net.clone();
    let options = ConnectOptions { retry: RetryPolicy::Never, ..ConnectOptions::default() };
    Communicator::connect_with(move || Ok(net.endpoint(addr(port)) as Arc<dyn Endpoint>), addr(1), options).unwrap()
}

/// Two members: the second joins while the first admits it.
fn pair(net: &MemNetwork) -> (Communicator, Communicator) {
    let mut a = join(net, 100);
    let b = std::thread::scope(|s| {
        let h = s.spawn(|| join(net, 101));
        while a.peers_pending() == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        a.update_topology().unwrap();
        h.join().unwrap()
    });
    (a, b)
}

/// Runs an all-reduce of `len` elements on both; returns a's result.
fn both(a: &mut Communicator, b: &mut Communicator, len: usize) -> Vec<f32> {
    std::thread::scope(|s| {
        let hb = s.spawn(|| {
            let mut x = vec![2f32; len];
            b.all_reduce(&mut x, ReduceOp::Sum).unwrap();
        });
        let mut x: Vec<f32> = (0..len).map(|i| i as f32).collect();
        a.all_reduce(&mut x, ReduceOp::Sum).unwrap();
        hb.join().unwrap();
        x
    })
}

#[test]
fn buffers_are_restored_whatever_the_backup_allocation() {
    let net = MemNetwork::new(16);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let _master = rt.block_on(async { MasterServer::spawn(net.endpoint(addr(1)), MasterConfig::default()) });
    let (mut a, mut b) = pair(&net);

    // Grow the kept allocation, then reuse it (more than half of it), then bypass it.
    for len in [1 << 16, 3 << 14, 1 << 10] {
        let x = both(&mut a, &mut b, len);
        assert!(x.iter().enumerate().all(|(i, &v)| v == i as f32 + 2.0), "len {len}");
    }

    // Mismatched lengths: both calls fail, and each must leave its buffer as it was,
    // whether the backup reused the kept allocation, bypassed it or grew it.
    for len in [3 << 14, 1 << 10, 1 << 16, 1 << 17] {
        let original: Vec<f32> = (0..len).map(|i| (i as f32) * 0.5 - 7.0).collect();
        let (err_a, err_b) = std::thread::scope(|s| {
            let hb = s.spawn(|| {
                let theirs: Vec<f32> = vec![3.0; len + 1];
                let mut y = theirs.clone();
                let err = b.all_reduce(&mut y, ReduceOp::Sum).unwrap_err();
                assert_eq!(y, theirs, "len {len}: b's buffer not restored");
                err
            });
            let mut x = original.clone();
            let err = a.all_reduce(&mut x, ReduceOp::Sum).unwrap_err();
            assert_eq!(x, original, "len {len}: a's buffer not restored");
            (err, hb.join().unwrap())
        });
        assert!(matches!(err_a, Error::Mismatch { .. }), "len {len}: {err_a}");
        assert!(matches!(err_b, Error::Mismatch { .. }), "len {len}: {err_b}");
    }
    // And the pair still works afterwards.
    let x = both(&mut a, &mut b, 1 << 12);
    assert!(x.iter().enumerate().all(|(i, &v)| v == i as f32 + 2.0));
}
