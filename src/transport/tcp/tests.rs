//! Tests of the TCP transport: conformance in both security modes, authentication,
//! mode mismatch, limits, a crashed peer, and the fallback to QUIC.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::transport::quic::{QuicConfig, QuicEndpoint};
use crate::transport::{conformance, Frame, Header};

const LIMIT: Duration = Duration::from_secs(60);
const SECRET: &str = "test secret: 32 random bytes in real life";

fn localhost() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
}

fn tls() -> TcpConfig {
    TcpConfig::with_secret(SECRET)
}

fn plain() -> TcpConfig {
    TcpConfig { security: TcpSecurity::Plaintext, ..tls() }
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f).await.expect("test timed out")
}

fn frame(i: u64, len: usize) -> Frame {
    Frame { header: Header { epoch: 1, seq: 2, call: 3, index: i }, payload: Bytes::from(vec![i as u8; len]) }
}

/// A connected pair of links: (client end, server end, hello seen by the server).
async fn pair(client: TcpConfig, server: TcpConfig) -> (TcpLink, TcpLink, Bytes) {
    let server = TcpEndpoint::bind(localhost(), server).unwrap();
    let client = TcpEndpoint::bind(localhost(), client).unwrap();
    let (a, accepted) =
        tokio::join!(client.connect(server.local_addr(), Bytes::from_static(b"rank 1")), server.accept());
    let (b, hello) = accepted.unwrap();
    (a.unwrap(), b, hello)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_ordered_both_ways() {
    bounded(async {
        for cfg in [tls(), plain()] {
            let (a, b, hello) = pair(cfg.clone(), cfg.clone()).await;
            assert_eq!(hello, "rank 1");
            assert_eq!((a.security(), b.security()), (cfg.security, cfg.security));
            conformance::ordered_both_ways(&a, &b, 1 << 20).await;
            // Payloads above the read buffer's slicing size, read straight into their own.
            conformance::ordered_both_ways(&a, &b, 3 << 20).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_bounded() {
    bounded(async {
        for security in [TcpSecurity::Tls, TcpSecurity::Plaintext] {
            let cfg = TcpConfig { socket_buffer_bytes: 64 << 10, security, ..tls() };
            let (a, b, _) = pair(cfg.clone(), cfg).await;
            // Linux doubles the 64 KiB buffers: 256 KiB in the two kernels' buffers is
            // 16 frames of 16 KiB, plus one queued and one in hand on each side, plus
            // what the TLS layer holds.
            conformance::bounded(&a, &b, 28, 16 << 10).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_bounded_default_buffers() {
    bounded(async {
        let (a, b, _) = pair(tls(), tls()).await;
        // 2 × 8 MiB of kernel buffers is 16 frames of 1 MiB, plus 4 queued or in hand.
        conformance::bounded(&a, &b, 24, 1 << 20).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_close_is_seen() {
    bounded(async {
        for cfg in [tls(), plain()] {
            let (a, b, _) = pair(cfg.clone(), cfg.clone()).await;
            conformance::close_is_seen(&a, &b).await;
            let (a, b, _) = pair(cfg.clone(), cfg).await;
            conformance::close_is_seen(&b, &a).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_refused_and_honest_peers_served() {
    bounded(async {
        for security in [TcpSecurity::Tls, TcpSecurity::Plaintext] {
            let server = TcpEndpoint::bind(localhost(), TcpConfig { security, ..tls() }).unwrap();
            let addr = server.local_addr();

            let wrong =
                TcpEndpoint::bind(localhost(), TcpConfig { security, ..TcpConfig::with_secret("guess") }).unwrap();
            let err = wrong.connect(addr, Bytes::from_static(b"evil")).await.unwrap_err();
            assert!(matches!(err, TcpError::Auth(_)), "{err}");
            assert!(err.to_string().contains("secret"), "{err}");
            assert!(!err.is_unsupported(), "a wrong secret must not fall back to another transport");

            let none = TcpEndpoint::bind(localhost(), TcpConfig { security, ..TcpConfig::default() }).unwrap();
            let err = none.connect(addr, Bytes::from_static(b"evil")).await.unwrap_err();
            assert!(matches!(err, TcpError::Auth(_)), "{err}");

            let honest = TcpEndpoint::bind(localhost(), TcpConfig { security, ..tls() }).unwrap();
            let (a, accepted) = tokio::join!(honest.connect(addr, Bytes::from_static(b"honest")), server.accept());
            let (a, (b, hello)) = (a.unwrap(), accepted.unwrap());
            // The strangers never reached `accept`.
            assert_eq!(hello, "honest");
            b.send(frame(1, 10)).await.unwrap();
            assert_eq!(a.recv().await.unwrap(), frame(1, 10));
        }
    })
    .await;
}

/// A client with a secret refuses a server that cannot prove it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_server_without_secret() {
    bounded(async {
        for security in [TcpSecurity::Tls, TcpSecurity::Plaintext] {
            let server = TcpEndpoint::bind(localhost(), TcpConfig { security, ..TcpConfig::default() }).unwrap();
            let client = TcpEndpoint::bind(localhost(), TcpConfig { security, ..tls() }).unwrap();
            let err = client.connect(server.local_addr(), Bytes::new()).await.unwrap_err();
            assert!(matches!(err, TcpError::Auth(_)), "{err}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modes_that_differ_are_a_typed_error() {
    bounded(async {
        let server = TcpEndpoint::bind(localhost(), plain()).unwrap();
        let client = TcpEndpoint::bind(localhost(), tls()).unwrap();
        let err = client.connect(server.local_addr(), Bytes::new()).await.unwrap_err();
        assert!(
            matches!(err, TcpError::ModeMismatch { ours: TcpSecurity::Tls, theirs: TcpSecurity::Plaintext, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("plaintext TCP"), "{err}");
        // Nothing listening at all.
        let gone = server.local_addr();
        drop(server);
        // The listener closes once its task has been cancelled.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let err = client.connect(gone, Bytes::new()).await.unwrap_err();
        assert!(matches!(err, TcpError::Refused(_)), "{err}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_and_hellos_are_refused() {
    bounded(async {
        let small = TcpConfig { max_frame_bytes: Header::LEN + 100, max_hello_bytes: 8, ..tls() };
        let (a, b, _) = pair(tls(), small.clone()).await;
        let err = b.send(frame(0, 101)).await.unwrap_err();
        assert_eq!(err, LinkError::FrameTooLarge { len: Header::LEN + 101, limit: Header::LEN + 100 });
        a.send(frame(0, 100)).await.unwrap();
        a.send(frame(1, 1000)).await.unwrap();
        assert_eq!(b.recv().await.unwrap(), frame(0, 100));
        let err = b.recv().await.unwrap_err();
        assert_eq!(err, LinkError::FrameTooLarge { len: Header::LEN + 1000, limit: Header::LEN + 100 });
        assert!(matches!(b.recv().await, Err(LinkError::Closed(_))));
        // The receiver dropped the connection: the sender sees it closed.
        assert!(matches!(a.recv().await, Err(LinkError::Closed(_))));

        let server = TcpEndpoint::bind(localhost(), small).unwrap();
        let client = TcpEndpoint::bind(localhost(), tls()).unwrap();
        let err = client.connect(server.local_addr(), Bytes::from(vec![0u8; 100])).await.unwrap_err();
        assert!(matches!(err, TcpError::Protocol(_)), "{err}");
        let err = client.connect(server.local_addr(), Bytes::from(vec![0u8; 100 << 10])).await.unwrap_err();
        assert!(matches!(err, TcpError::HelloTooLarge { .. }), "{err}");
    })
    .await;
}

/// A peer whose process dies in the middle of a large frame: the survivor's pending
/// `recv` fails with `Closed` at once (the kernel closes a dead process's connections;
/// no timeout is involved), and its sends fail soon after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_killed_mid_transfer_is_closed_promptly() {
    bounded(async {
        for cfg in [tls(), plain()] {
            let cfg = TcpConfig { socket_buffer_bytes: 64 << 10, ..cfg };
            let server = TcpEndpoint::bind(localhost(), cfg.clone()).unwrap();
            let addr = server.local_addr();
            let (started_tx, started_rx) = tokio::sync::oneshot::channel();
            let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
            let client_cfg = cfg.clone();
            // The "process": its own runtime, dropped mid-send, which drops its sockets
            // as the kernel does when a process dies.
            let dying = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                let held = rt.block_on(async {
                    let endpoint = TcpEndpoint::bind(localhost(), client_cfg).unwrap();
                    let link = Arc::new(endpoint.connect(addr, Bytes::new()).await.unwrap());
                    for i in 0..3 {
                        link.send(frame(i, 5)).await.unwrap();
                    }
                    // The survivor calls no `recv` yet: its reader holds two small frames
                    // and the kernels' buffers fill up, so this send stays inside its
                    // frame until the end.
                    let sending = link.clone();
                    tokio::spawn(async move { sending.send(frame(3, 32 << 20)).await });
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    started_tx.send(()).unwrap();
                    let _ = kill_rx.await;
                    (endpoint, link)
                });
                // The runtime goes first, with the send in the middle of its frame:
                // nothing sends a close of its own.
                drop(rt);
                drop(held);
            });
            let (b, _) = server.accept().await.unwrap();
            started_rx.await.unwrap();
            let killed = Instant::now();
            kill_tx.send(()).unwrap();
            for i in 0..3 {
                assert!(matches!(b.recv().await, Ok(f) if f == frame(i, 5)), "frame {i}");
            }
            match b.recv().await {
                Err(LinkError::Closed(why)) => assert!(why.contains("inside a frame"), "{why}"),
                Err(e) => panic!("{e}"),
                Ok(f) => panic!("a torn frame was delivered ({} bytes)", f.payload.len()),
            }
            assert!(killed.elapsed() < Duration::from_secs(5), "took {:?}", killed.elapsed());
            tokio::task::spawn_blocking(move || dying.join().unwrap()).await.unwrap();
            let mut failed = false;
            for i in 0..100 {
                if b.send(frame(i, 8)).await.is_err() {
                    failed = true;
                    break;
                }
            }
            assert!(failed, "sends to a dead peer kept succeeding");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recv_and_send_are_cancel_safe() {
    bounded(async {
        let cfg = TcpConfig { socket_buffer_bytes: 64 << 10, ..tls() };
        let (a, b, _) = pair(cfg.clone(), cfg).await;
        crate::transport::conformance::cancel_safe(&a, &b, frame).await;
    })
    .await;
}

/// The data endpoint of a TCP member: links to a member that runs QUIC only, or TCP in
/// the other mode, fall back to QUIC; a wrong secret does not; links in from either
/// transport are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_or_quic_falls_back_only_where_there_is_no_tcp_path() {
    bounded(async {
        let quic_cfg = QuicConfig::with_secret(SECRET);
        let member = |security: TcpSecurity, quic_cfg: QuicConfig| {
            let quic = Arc::new(QuicEndpoint::bind(localhost(), quic_cfg.clone()).unwrap());
            let tcp = TcpEndpoint::bind(quic.local_addr().unwrap(), TcpConfig::from_quic(&quic_cfg, security)).unwrap();
            TcpOrQuic::new(tcp, quic)
        };
        let a = member(TcpSecurity::Tls, quic_cfg.clone());
        assert_eq!(a.tcp().local_addr(), Endpoint::local_addr(&a));

        // A QUIC-only member: no TCP listener on its port.
        let quic_only = QuicEndpoint::bind(localhost(), quic_cfg.clone()).unwrap();
        let (l, accepted) = tokio::join!(
            Endpoint::connect(&a, quic_only.local_addr().unwrap(), Bytes::from_static(b"x")),
            quic_only.accept()
        );
        let (l, (r, hello)) = (l.unwrap(), accepted.unwrap());
        assert_eq!(hello, "x");
        l.send(frame(1, 100)).await.unwrap();
        assert_eq!(r.recv().await.unwrap(), frame(1, 100));

        // A plaintext member: the modes differ, so QUIC.
        let p = member(TcpSecurity::Plaintext, quic_cfg.clone());
        let (l, accepted) =
            tokio::join!(Endpoint::connect(&a, Endpoint::local_addr(&p), Bytes::from_static(b"y")), p.accept());
        let (l, (r, hello)) = (l.unwrap(), accepted.unwrap());
        assert_eq!(hello, "y");
        r.send(frame(2, 100)).await.unwrap();
        assert_eq!(l.recv().await.unwrap(), frame(2, 100));

        // A member of the same mode: over TCP, and accepted on either side.
        let b = member(TcpSecurity::Tls, quic_cfg.clone());
        let (l, accepted) =
            tokio::join!(Endpoint::connect(&a, Endpoint::local_addr(&b), Bytes::from_static(b"z")), b.accept());
        let (l, (r, _)) = (l.unwrap(), accepted.unwrap());
        l.send(frame(3, 1 << 20)).await.unwrap();
        assert_eq!(r.recv().await.unwrap(), frame(3, 1 << 20));
        let (l, accepted) = tokio::join!(quic_only.connect(Endpoint::local_addr(&b), Bytes::new()), b.accept());
        let (l, (r, _)) = (l.unwrap(), accepted.unwrap());
        l.send(frame(4, 10)).await.unwrap();
        assert_eq!(r.recv().await.unwrap(), frame(4, 10));

        // A stranger's secret: refused, and not retried over QUIC.
        let stranger = member(TcpSecurity::Tls, QuicConfig::with_secret("guess"));
        let Err(err) = Endpoint::connect(&stranger, Endpoint::local_addr(&b), Bytes::new()).await else {
            panic!("a stranger connected");
        };
        assert!(err.to_string().contains("authentication failed"), "{err}");
    })
    .await;
}

#[test]
fn bad_configs_are_refused() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _guard = rt.enter();
    for cfg in [TcpConfig::with_secret(""), TcpConfig { max_frame_bytes: 3, ..TcpConfig::default() }] {
        assert!(matches!(TcpEndpoint::bind(localhost(), cfg), Err(TcpError::Setup(_))));
    }
    drop(_guard);
    assert!(matches!(TcpEndpoint::bind(localhost(), TcpConfig::default()), Err(TcpError::Setup(_))));
    let shown = format!("{:?}", TcpConfig::with_secret("hunter2"));
    assert!(!shown.contains("hunter2"), "{shown}");
}

/// TLS links seal a large payload in place when the frame holds it alone; a payload
/// someone else still holds (a broadcast's one buffer sent to several peers) is copied
/// first: the holder's bytes stay as they were, and both arrive intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealing_in_place_never_touches_a_shared_payload() {
    bounded(async {
        let (a, b, _) = pair(tls(), tls()).await;
        let shared = Bytes::from((0..(1u32 << 20)).map(|i| i as u8).collect::<Vec<u8>>());
        let kept = shared.clone();
        for i in 0..2 {
            let f = Frame { header: Header { epoch: 1, seq: 2, call: 3, index: i }, payload: shared.clone() };
            a.send(f).await.unwrap();
        }
        a.send(frame(9, 3 << 20)).await.unwrap(); // held by the frame alone
        for i in 0..2 {
            let got = b.recv().await.unwrap();
            assert_eq!(got.header.index, i);
            assert!(got.payload == kept, "frame {i} arrived intact");
        }
        assert_eq!(b.recv().await.unwrap(), frame(9, 3 << 20));
        assert!(shared == kept && shared[..4] == [0, 1, 2, 3], "the sender's buffer is untouched");
    })
    .await;
}

/// A plaintext link writes a sent slice from where it lies (its seal pool stays empty);
/// a TLS link seals a copy in a pooled buffer and has it back once the frame is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sent_slices_are_written_in_place_or_sealed_in_reused_buffers() {
    bounded(async {
        for (cfg, copies) in [(tls(), true), (plain(), false)] {
            let (a, b, _) = pair(cfg.clone(), cfg).await;
            for i in 0..8 {
                let f = frame(i, 256 << 10);
                let (sent, got) = tokio::join!(a.send_slice(f.header, &f.payload), b.recv());
                sent.unwrap();
                assert_eq!(got.unwrap(), f);
                // Given back by the send itself, before it returned.
                assert_eq!(a.writer.pool.free_count(), usize::from(copies), "frame {i}");
            }
        }
    })
    .await;
}

/// A send cancelled in the middle of its frame (the peer is not reading, the socket
/// took part of it) hands over the whole frame: the rest goes out in the background,
/// before the next frame, on plaintext and TLS links alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_cancelled_mid_frame_still_delivers_it_whole() {
    bounded(async {
        for cfg in [tls(), plain()] {
            let cfg = TcpConfig { socket_buffer_bytes: 64 << 10, ..cfg };
            let (a, b, _) = pair(cfg.clone(), cfg).await;
            // Two small frames stop b's reader (one in its hand, one handed over), so
            // the big one fills the kernels' buffers and stops there.
            for i in 0..2 {
                a.send(frame(i, 5)).await.unwrap();
            }
            let big = frame(1, 4 << 20);
            let cut = tokio::time::timeout(Duration::from_millis(100), a.send_slice(big.header, &big.payload)).await;
            assert!(cut.is_err(), "4 MiB went into 64 KiB socket buffers with nobody reading");
            let after = async {
                a.send(frame(2, 10)).await.unwrap();
                a.send_slice(frame(3, 300 << 10).header, &frame(3, 300 << 10).payload).await.unwrap();
            };
            let got = async {
                let mut got = Vec::new();
                for _ in 0..5 {
                    got.push(b.recv().await.unwrap());
                }
                got
            };
            let ((), got) = tokio::join!(after, got);
            assert_eq!(got, [frame(0, 5), frame(1, 5), big, frame(2, 10), frame(3, 300 << 10)]);
        }
    })
    .await;
}
