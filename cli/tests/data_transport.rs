//! Data links over TCP between real processes: `phalanx worker`s on 127.0.0.1 that run
//! their all-reduces over TCP+TLS (and plaintext TCP, and QUIC, mixed in one group),
//! checked bitwise against the sums recomputed from the member list, including after a
//! member is SIGKILLed mid-run. One test at a time, every wait bounded, children
//! SIGKILLed and reaped at the end.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;

const SECRET: &str = "data transport test secret, 32 random bytes in real life";

/// Three TCP+TLS workers reduce 1 MiB gradients (several chunks per step); one is
/// SIGKILLed and the two survivors go on over their TCP links without it.
#[test]
fn all_reduce_over_tcp_data_links_survives_a_kill() {
    let _serial = serial();
    const LEN: usize = 1 << 18;
    let mut c = Cluster::start(Some(SECRET));
    let ws = workers(&mut c, 3, LEN, &["--secret", SECRET, "--data-transport", "tcp", "--step-delay-ms", "5"]);
    c.wait(Duration::from_secs(30), "workers to join", |c| ws.iter().all(|&w| c.id(w).is_some()).then_some(()));
    let three = c.ids(&ws);
    steps_over(&mut c, Duration::from_secs(30), &ws, &[0, 0, 0], &three, 3);
    // The links really are TCP (no silent fallback to QUIC): each worker holds its
    // liveness connection to the master and one data connection per other worker.
    for &w in &ws {
        let open = established_tcp(&c.pid(w));
        assert!(open >= 3, "{} holds {open} established TCP connections, not 1 + 2", c.procs[w].name);
    }

    let (victim, survivors) = (ws[2], [ws[0], ws[1]]);
    let marks: Vec<usize> = survivors.iter().map(|&w| c.log(w).len()).collect();
    let killed = Instant::now();
    c.procs[victim].child.kill().expect("SIGKILL the victim");
    let two = c.ids(&survivors);
    let at = steps_over(&mut c, Duration::from_secs(20), &survivors, &marks, &two, 2);
    let took = at.iter().max().expect("survivors").duration_since(killed);
    eprintln!("tcp data links: survivors' first step without the killed peer {} ms after the kill", took.as_millis());
    c.check_steps(&ws);
}

/// Members that chose different data transports still form one group: TCP+TLS members
/// reach a plaintext member and a QUIC member over QUIC (the fallback), and each other
/// over TCP; every sum is exact.
#[test]
fn members_with_different_data_transports_reduce_together() {
    let _serial = serial();
    const LEN: usize = 1 << 16;
    let mut c = Cluster::start(Some(SECRET));
    let transports = ["tcp", "tcp", "tcp-plain", "quic"];
    let first = c.worker("w0", LEN, &["--secret", SECRET, "--data-transport", transports[0]]);
    c.wait(Duration::from_secs(20), "w0 to join", |c| c.id(first));
    let mut ws = vec![first];
    for (k, t) in transports.iter().enumerate().skip(1) {
        ws.push(c.worker(&format!("w{k}-{t}"), LEN, &["--secret", SECRET, "--data-transport", t]));
    }
    c.wait(Duration::from_secs(30), "workers to join", |c| ws.iter().all(|&w| c.id(w).is_some()).then_some(()));
    let all = c.ids(&ws);
    steps_over(&mut c, Duration::from_secs(40), &ws, &[0; 4], &all, 3);
    // The two TCP+TLS members reach each other over TCP; the others only hold their
    // liveness connection to the master (their data links run over QUIC).
    for (&w, t) in ws.iter().zip(transports) {
        let open = established_tcp(&c.pid(w));
        match t {
            "tcp" => assert!(open >= 2, "{} holds {open} established TCP connections", c.procs[w].name),
            _ => assert_eq!(open, 1, "{} holds {open} established TCP connections", c.procs[w].name),
        }
    }
    c.check_steps(&ws);
}

/// Two plaintext-TCP members reduce together.
#[test]
fn all_reduce_over_plaintext_tcp() {
    let _serial = serial();
    const LEN: usize = 1 << 18;
    let mut c = Cluster::start(Some(SECRET));
    let ws = workers(&mut c, 2, LEN, &["--secret", SECRET, "--data-transport", "tcp-plain"]);
    c.wait(Duration::from_secs(30), "workers to join", |c| ws.iter().all(|&w| c.id(w).is_some()).then_some(()));
    let both = c.ids(&ws);
    steps_over(&mut c, Duration::from_secs(30), &ws, &[0, 0], &both, 3);
    for &w in &ws {
        let open = established_tcp(&c.pid(w));
        assert!(open >= 2, "{} holds {open} established TCP connections, not 1 + 1", c.procs[w].name);
    }
    c.check_steps(&ws);
}

/// Established TCP connections of process `pid`: its socket inodes (`/proc/PID/fd`)
/// found in state 01 in `/proc/net/tcp` and `tcp6`.
fn established_tcp(pid: &str) -> usize {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    l.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')).map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .flat_map(|table| {
            std::fs::read_to_string(table).unwrap_or_default().lines().skip(1).map(str::to_string).collect::<Vec<_>>()
        })
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 9 && fields[3] == "01" && inodes.contains(fields[9])
        })
        .count()
}
