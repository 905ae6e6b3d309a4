//! Shared helpers of the networked tests (sub-group, point-to-point, group_mem, scan,
//! quantized, sparse_comm): a master and peers in one process over the in-memory
//! network, and a watchdog.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use phalanx::comm::{ConnectOptions, RetryPolicy};
use phalanx::membership::master::MasterConfig;
use phalanx::transport::endpoint::Endpoint;
use phalanx::transport::memnet::MemNetwork;
use phalanx::Communicator;
use phalanx::MasterServer;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

pub struct Cluster {
    net: MemNetwork,
    _rt: tokio::runtime::Runtime,
    _master: MasterServer,
}

pub fn cluster() -> Cluster {
    let net = MemNetwork::new(16);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let ep = net.endpoint(addr(1));
    let master = rt.block_on(async { MasterServer::spawn(ep, MasterConfig::default()) });
    Cluster { net, _rt: rt, _master: master }
}

/// A peer connecting from `port` (joins the master and blocks until admitted).
pub fn join(c: &Cluster, port: u16, retry: RetryPolicy) -> Communicator {
    let net = c.net.clone();
    let options = ConnectOptions { retry, ..ConnectOptions::default() };
    Communicator::connect_with(move || Ok(net.endpoint(addr(port)) as Arc<dyn Endpoint>), addr(1), options).unwrap()
}

/// Runs `joiner` (which blocks until admitted) while the members admit it with an
/// update_topology each, then has the newcomer take its own first round.
pub fn admit(comms: &mut Vec<Communicator>, joiner: impl FnOnce() -> Communicator + Send) {
    let new = std::thread::scope(|s| {
        let h = s.spawn(joiner);
        while comms[0].peers_pending() == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        for comm in comms.iter_mut() {
            s.spawn(move || comm.update_topology().unwrap());
        }
        h.join().unwrap()
    });
    let mut new = new;
    // The round that admitted the joiner counts as its own: its first call returns at
    // once (a training loop calls update_topology at the top of each step anyway).
    new.update_topology().unwrap();
    comms.push(new);
}

/// `n` peers on ports 100.., admitted one by one (no check of their ranks).
pub fn group(c: &Cluster, n: u16, retry: RetryPolicy) -> Vec<Communicator> {
    let mut comms = vec![join(c, 100, retry)];
    for i in 1..n {
        admit(&mut comms, || join(c, 100 + i, retry));
    }
    comms
}

/// `n` networked peers (ranks 0..n in join order, checked).
pub fn net_group(c: &Cluster, n: u16, retry: RetryPolicy) -> Vec<Communicator> {
    let comms = group(c, n, retry);
    for (r, c) in comms.iter().enumerate() {
        assert_eq!(c.rank(), r);
    }
    comms
}

/// Runs `f`, aborting the whole test process if it takes longer than `secs`: a hung
/// call must fail the run, not stall it.
pub fn with_timeout<T>(secs: u64, f: impl FnOnce() -> T) -> T {
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if wait.recv_timeout(Duration::from_secs(secs)) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            eprintln!("test exceeded {secs} s: aborting");
            std::process::abort();
        }
    });
    let out = f();
    let _ = done.send(());
    let _ = watchdog.join();
    out
}

/// Runs `f(rank, comm)` for every communicator on its own thread; results in rank order.
pub fn each<T: Send>(comms: &mut [Communicator], f: impl Fn(usize, &mut Communicator) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let f = &f;
        let hs: Vec<_> = comms.iter_mut().enumerate().map(|(r, c)| s.spawn(move || f(r, c))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}
