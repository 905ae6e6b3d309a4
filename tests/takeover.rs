//! A lost master is not the end of the group: peers rejoin a master restarted on the same
//! address, or a standby, which rebuilds the view from their state; the run goes on with
//! no step lost, repeated or diverged. Peers and masters run in one process over the
//! in-memory network; a master "dies" with its runtime, every connection dropped at
//! once, as a SIGKILL would drop them (`cli/tests/churn.rs` does it with processes).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{each, with_timeout};
use phalanx::comm::ConnectOptions;
use phalanx::membership::master::MasterConfig;
use phalanx::transport::endpoint::Endpoint;
use phalanx::transport::memnet::MemNetwork;
use phalanx::{Communicator, MasterServer, ReduceOp};

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A master at `at` on a runtime of its own; dropping the pair kills it.
fn master(net: &MemNetwork, at: SocketAddr) -> (tokio::runtime::Runtime, MasterServer) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let ep = net.endpoint(at);
    // The first view forms of the three peers the tests start together.
    let config = MasterConfig { initial_peers: 3, ..MasterConfig::default() };
    let server = rt.block_on(async { MasterServer::spawn(ep, config) });
    (rt, server)
}

/// Kills a master: its runtime goes, and every connection with it.
fn kill(net: &MemNetwork, master: (tokio::runtime::Runtime, MasterServer), at: SocketAddr) {
    let (rt, server) = master;
    drop(server);
    rt.shutdown_background();
    net.unbind(at);
}

/// `n` peers (the masters' `initial_peers`) on ports 100.. that follow `primary` (then
/// `standby`), formed into one view.
fn peers(net: &MemNetwork, primary: SocketAddr, standby: Option<SocketAddr>, n: u16) -> Vec<Communicator> {
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let net = net.clone();
            let mut options = ConnectOptions::default();
            options.standby_masters.extend(standby);
            std::thread::spawn(move || {
                let ep = move || Ok(net.endpoint(addr(100 + i)) as Arc<dyn Endpoint>);
                Communicator::connect_with(ep, primary, options).unwrap()
            })
        })
        .collect();
    let mut comms: Vec<Communicator> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(comms.iter().all(|c| c.size() == n as usize));
    each(&mut comms, |_, c| c.update_topology().unwrap());
    comms
}

const LEN: usize = 4096;
const STEPS: u64 = 24;

/// A training loop: every step settles the view, all-reduces a gradient that depends on
/// the step only, and adds the sum to the model; a retryable error retries the step.
/// `steps_done` counts peer 0's steps, for the test to time its fault.
fn train(rank: usize, c: &mut Communicator, steps_done: &AtomicU64) -> (Vec<f32>, u32) {
    let mut model = vec![0f32; LEN];
    let (mut step, mut failures) = (0u64, 0u32);
    while step < STEPS {
        let result = c.update_topology().and_then(|()| {
            let mut grad = vec![(step + 1) as f32; LEN];
            c.all_reduce(&mut grad, ReduceOp::Sum).map(|()| grad)
        });
        match result {
            Ok(sum) => {
                model.iter_mut().zip(&sum).for_each(|(m, g)| *m += g);
                step += 1;
                if rank == 0 {
                    steps_done.store(step, Ordering::SeqCst);
                }
            }
            Err(e) if e.is_retryable() => failures += 1,
            Err(e) => panic!("rank {rank} at step {step}: {e}"),
        }
    }
    (model, failures)
}

/// What every model must hold: `n` contributions of every step, each exactly once.
fn expected(n: usize) -> Vec<f32> {
    let total: f32 = (1..=STEPS).map(|s| (s as f32) * n as f32).sum();
    vec![total; LEN]
}

fn wait_for_step(steps_done: &AtomicU64, step: u64) {
    while steps_done.load(Ordering::SeqCst) < step {
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_master_killed_mid_run_and_restarted_loses_no_step() {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).try_init();
    with_timeout(60, || {
        let net = MemNetwork::new(64);
        let at = addr(1);
        let first = master(&net, at);
        let mut comms = peers(&net, at, None, 3);
        let epoch_before = comms[0].epoch();
        let steps_done = AtomicU64::new(0);
        let results = std::thread::scope(|s| {
            let trainers = s.spawn(|| each(&mut comms, |r, c| train(r, c, &steps_done)));
            wait_for_step(&steps_done, 8);
            kill(&net, first, at);
            std::thread::sleep(Duration::from_millis(300));
            let restarted = master(&net, at);
            let results = trainers.join().unwrap();
            (results, restarted)
        });
        let (results, _restarted) = results;
        for (r, (model, _)) in results.iter().enumerate() {
            assert_eq!(model, &expected(3), "rank {r}: a step was lost or repeated");
        }
        assert!(comms.iter().all(|c| c.size() == 3 && c.epoch() > epoch_before), "the new master's view");
    });
}

#[test]
fn a_standby_takes_over_when_the_primary_dies() {
    with_timeout(60, || {
        let net = MemNetwork::new(64);
        let (primary, standby_at) = (addr(1), addr(2));
        let first = master(&net, primary);
        let _standby = master(&net, standby_at);
        let mut comms = peers(&net, primary, Some(standby_at), 3);
        let steps_done = AtomicU64::new(0);
        let results = std::thread::scope(|s| {
            let trainers = s.spawn(|| each(&mut comms, |r, c| train(r, c, &steps_done)));
            wait_for_step(&steps_done, 8);
            kill(&net, first, primary);
            trainers.join().unwrap()
        });
        for (r, (model, _)) in results.iter().enumerate() {
            assert_eq!(model, &expected(3), "rank {r}: a step was lost or repeated");
        }
        // A newcomer that still names the dead primary first finds the group at the standby.
        let net2 = net.clone();
        let options = ConnectOptions::default().standby_master(standby_at);
        let joiner = std::thread::spawn(move || {
            let ep = move || Ok(net2.endpoint(addr(200)) as Arc<dyn Endpoint>);
            Communicator::connect_with(ep, primary, options)
        });
        while comms[0].peers_pending() == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        each(&mut comms, |_, c| c.update_topology().unwrap());
        let mut joiner = joiner.join().unwrap().unwrap();
        assert_eq!(joiner.size(), 4);
        joiner.update_topology().unwrap();
    });
}
