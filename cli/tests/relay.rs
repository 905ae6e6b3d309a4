//! `phalanx relay` as a process between `phalanx master` and `phalanx worker`s on
//! 127.0.0.1: the workers reach the master and each other only through it, with delay,
//! jitter and loss, and every all-reduce they report is still the exact sum.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

fn free_addr() -> SocketAddr {
    phalanx::relay::free_udp_addr().expect("a free port")
}

#[test]
fn workers_through_a_lossy_relay_compute_exact_sums() {
    let _serial = serial();
    const LEN: usize = 1 << 16;
    let mut c = Cluster::start(None);
    let master_front = free_addr();
    let peers: Vec<(SocketAddr, SocketAddr)> = (0..2).map(|_| (free_addr(), free_addr())).collect();
    let mut args: Vec<String> = ["relay", "--delay-ms", "3", "--jitter-ms", "3", "--loss", "0.02", "--seed", "5"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push("--stats-every-s".into());
    args.push("1".into());
    for (front, target) in
        [(master_front, c.master)].into_iter().chain(peers.iter().map(|&(bind, front)| (front, bind)))
    {
        args.extend(["--route".to_string(), format!("{front}={target}")]);
    }
    let relay = c.spawn("relay", &args, 0);
    c.wait(Duration::from_secs(20), "the relay's three routes", |c| {
        (c.log(relay).iter().filter(|e| e.is("route")).count() == 3).then_some(())
    });
    c.master = master_front; // workers dial the master through the relay
    let ws: Vec<usize> = peers
        .iter()
        .enumerate()
        .map(|(k, (bind, front))| {
            let (bind, front) = (bind.to_string(), front.to_string());
            c.worker(
                &format!("w{k}"),
                LEN,
                &["--bind", &bind, "--advertise", &front, "--step-delay-ms", "10", "--shm", "off"],
            )
        })
        .collect();
    c.wait(Duration::from_secs(30), "both workers to join", |c| ws.iter().all(|&w| c.id(w).is_some()).then_some(()));
    let two = c.ids(&ws);
    steps_over(&mut c, Duration::from_secs(40), &ws, &[0, 0], &two, 5);
    c.check_steps(&ws);
    // The relay carried the data links and lost some of their packets.
    c.wait(Duration::from_secs(5), "the relay's counters", |c| {
        let paths: Vec<_> = c.log(relay).iter().filter(|e| e.is("path")).collect();
        let between_workers = paths.iter().any(|e| {
            let (from, to) = (e.str("from"), e.str("to"));
            peers.iter().any(|(a, _)| a.to_string() == from) && peers.iter().any(|(b, _)| b.to_string() == to)
        });
        let lost: u64 = paths.iter().map(|e| e.u64("lost")).sum();
        (between_workers && lost > 0).then_some(())
    });
}
