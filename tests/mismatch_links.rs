//! A mismatched first collective must not break the data link it was opening.
//!
//! Two fresh peers over real QUIC make a mismatched all-reduce before any data link
//! exists between them, then a matching one. The master aborts the mismatch while the
//! peer with the smaller id may still be connecting to the other; that connection must
//! survive the abort. (It did not: the abort dropped the half-open connection, the
//! other side had already accepted it, and the next collective failed with "PeerLost:
//! closed by the peer (code 0)" although nobody was lost; the Python tests retried it.)

mod common;

use std::time::Duration;

use common::with_timeout;
use phalanx::comm::ConnectOptions;
use phalanx::{Communicator, Error, Master, MasterConfig, QuicConfig, ReduceOp};

const SECRET: &str = "mismatch-links-secret-0123456789abcdef";

/// Iterations: each one a fresh master and two fresh peers.
const ROUNDS: usize = 200;

#[test]
fn a_mismatch_before_the_first_link_never_breaks_the_next_collective() {
    with_timeout(600, || {
        let mut failures = Vec::new();
        for round in 0..ROUNDS {
            let config = MasterConfig { initial_peers: 2, ..MasterConfig::default() };
            let master =
                Master::start("127.0.0.1:0".parse().unwrap(), QuicConfig::with_secret(SECRET), config).unwrap();
            let addr = master.addr();
            let outcomes: Vec<(Error, Result<Vec<f32>, Error>)> = std::thread::scope(|s| {
                let peers: Vec<_> = (1..=2u64)
                    .map(|id| {
                        s.spawn(move || {
                            let options = ConnectOptions::new().secret(SECRET).peer_id(id);
                            let mut c = Communicator::connect(addr, options).expect("connect");
                            // Sizes differ: a mismatch, decided by the master at once.
                            let mut x = vec![1f32; if id == 1 { 10 } else { 20 }];
                            let mismatch = c.all_reduce(&mut x, ReduceOp::Sum).unwrap_err();
                            let mut y = vec![id as f32; 1000];
                            let next = c.all_reduce(&mut y, ReduceOp::Sum).map(|()| y);
                            (mismatch, next)
                        })
                    })
                    .collect();
                peers.into_iter().map(|p| p.join().unwrap()).collect()
            });
            for (peer, (mismatch, next)) in outcomes.into_iter().enumerate() {
                assert!(matches!(mismatch, Error::Mismatch { .. }), "round {round}, peer {peer}: {mismatch:?}");
                match next {
                    Ok(y) => assert!(y.iter().all(|&v| v == 3.0), "round {round}, peer {peer}: wrong sum"),
                    Err(e) => failures.push(format!("round {round}, peer {peer}: {e}")),
                }
            }
            drop(master);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(failures.is_empty(), "{} of {ROUNDS} rounds failed after a mismatch: {failures:#?}", failures.len());
    });
}
