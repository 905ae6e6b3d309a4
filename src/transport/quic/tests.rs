//! Helpers the QUIC tests share, and the tests of an endpoint pair as a whole.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use bytes::Bytes;

use super::{QuicConfig, QuicEndpoint, QuicError, QuicLink};
use crate::transport::{conformance, Frame, Header, Link};

const LIMIT: Duration = Duration::from_secs(60);

pub(super) fn localhost() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
}

pub(super) fn secret_config() -> QuicConfig {
    QuicConfig::with_secret("test secret: 32 random bytes in real life")
}

/// A connected pair of links: (client end, server end, hello seen by the server).
pub(super) async fn pair(client: QuicConfig, server: QuicConfig) -> (QuicLink, QuicLink, Bytes) {
    let server = QuicEndpoint::bind(localhost(), server).unwrap();
    let client = QuicEndpoint::bind(localhost(), client).unwrap();
    let addr = server.local_addr().unwrap();
    let (a, accepted) = tokio::join!(client.connect(addr, Bytes::from_static(b"rank 1 of epoch 7")), server.accept());
    let (b, hello) = accepted.unwrap();
    (a.unwrap(), b, hello)
}

pub(super) async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f).await.expect("test timed out")
}

pub(super) fn frame(i: u64, len: usize) -> Frame {
    Frame { header: Header { epoch: 1, seq: 2, call: 3, index: i }, payload: Bytes::from(vec![i as u8; len]) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_arrives() {
    bounded(async {
        let (a, b, hello) = pair(secret_config(), secret_config()).await;
        assert_eq!(hello, "rank 1 of epoch 7");
        a.send(frame(5, 3)).await.unwrap();
        assert_eq!(b.recv().await.unwrap(), frame(5, 3));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn os_default_socket_buffers_work() {
    bounded(async {
        let cfg = QuicConfig { socket_buffer_bytes: 0, ..secret_config() };
        let (a, b, _) = pair(cfg.clone(), cfg).await;
        conformance::ordered_both_ways(&a, &b, 1 << 20).await;
    })
    .await;
}

#[test]
fn bind_outside_a_runtime_is_an_error() {
    assert!(matches!(QuicEndpoint::bind(localhost(), QuicConfig::default()), Err(QuicError::Setup(_))));
}

/// `send_many` on a link of one stripe: the frames arrive in order, before what is sent
/// after them; a batch with a frame above the limit is refused whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_sent_together_arrive_in_order() {
    bounded(async {
        let cfg = QuicConfig { max_frame_bytes: 4096, ..secret_config() };
        let (a, b, _) = pair(cfg.clone(), cfg).await;
        a.send_many(vec![frame(0, 10), frame(1, 0), frame(2, 2000)]).await.unwrap();
        let refused = a.send_many(vec![frame(3, 10), frame(4, 8192)]).await;
        assert!(matches!(refused, Err(crate::transport::LinkError::FrameTooLarge { .. })), "{refused:?}");
        a.send(frame(5, 7)).await.unwrap();
        for want in [frame(0, 10), frame(1, 0), frame(2, 2000), frame(5, 7)] {
            assert_eq!(b.recv().await.unwrap(), want);
        }
    })
    .await;
}
