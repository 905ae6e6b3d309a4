//! The relay over real UDP sockets on 127.0.0.1 (the shaping itself is tested without
//! sockets in `path.rs`).

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use super::*;

fn socket() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    s
}

/// Receives one datagram, or `None` after the read timeout.
fn recv(s: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = [0u8; 2048];
    s.recv_from(&mut buf).ok().map(|(n, from)| (buf[..n].to_vec(), from))
}

#[test]
fn a_dialer_reaches_the_target_and_hears_back_through_the_front() {
    let relay = Relay::start(1, Shaping::default()).unwrap();
    let (client, target) = (socket(), socket());
    let front = relay.front(target.local_addr().unwrap()).unwrap();
    client.send_to(b"ping", front).unwrap();
    let (got, upstream) = recv(&target).expect("the target hears the dialer");
    assert_eq!(got, b"ping");
    assert_ne!(upstream, client.local_addr().unwrap(), "the target sees the relay's upstream socket");
    target.send_to(b"pong", upstream).unwrap();
    assert_eq!(recv(&client), Some((b"pong".to_vec(), front)), "replies come from the front");
    let stats = relay.stats();
    let (c, t) = (client.local_addr().unwrap(), target.local_addr().unwrap());
    assert!(stats.iter().any(|(k, s)| *k == (c, t) && s.delivered == 1 && s.bytes == 4), "{stats:?}");
    assert!(stats.iter().any(|(k, s)| *k == (t, c) && s.delivered == 1), "{stats:?}");
}

#[test]
fn delay_holds_packets_back_and_keeps_their_order() {
    let relay = Relay::start(2, Shaping::default().delay(Duration::from_millis(40))).unwrap();
    let (client, target) = (socket(), socket());
    let front = relay.front(target.local_addr().unwrap()).unwrap();
    let sent = Instant::now();
    for i in 0..20u8 {
        client.send_to(&[i], front).unwrap();
    }
    let got: Vec<u8> = (0..20).filter_map(|_| recv(&target)).map(|(d, _)| d[0]).collect();
    // A lower bound, not a timing benchmark: nothing may arrive before its delay.
    assert!(sent.elapsed() >= Duration::from_millis(40));
    assert_eq!(got, (0..20).collect::<Vec<u8>>());
}

#[test]
fn a_cut_path_carries_nothing_until_healed_and_only_that_path_is_cut() {
    let relay = Relay::start(3, Shaping::default()).unwrap();
    let (a, b, target) = (socket(), socket(), socket());
    let t = target.local_addr().unwrap();
    let front = relay.front(t).unwrap();
    relay.partition(&[&[a.local_addr().unwrap()], &[t]]);
    a.send_to(b"lost", front).unwrap();
    b.send_to(b"kept", front).unwrap();
    assert_eq!(recv(&target).map(|(d, _)| d), Some(b"kept".to_vec()));
    assert_eq!(recv(&target), None, "the cut dialer's packet never arrives");
    relay.heal_between(t, a.local_addr().unwrap());
    a.send_to(b"again", front).unwrap();
    assert_eq!(recv(&target).map(|(d, _)| d), Some(b"again".to_vec()));
    let cut: u64 = relay.stats().iter().map(|(_, s)| s.cut).sum();
    assert_eq!(cut, 1);
}
