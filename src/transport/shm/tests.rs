//! Tests of whole shared-memory endpoints over QUIC in this process: the offer, its
//! refusals, the conformance suite over a negotiated link, and what is left in
//! `/dev/shm`.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{SharedMemory, ShmConfig, ShmEndpoint};
use crate::transport::endpoint::Endpoint;
use crate::transport::quic::{QuicConfig, QuicEndpoint};
use crate::transport::{conformance, Frame, Header, Link};

const LIMIT: Duration = Duration::from_secs(60);

fn localhost() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
}

fn quic() -> Arc<dyn Endpoint> {
    Arc::new(QuicEndpoint::bind(localhost(), QuicConfig::with_secret("shm tests")).unwrap())
}

fn config(mode: SharedMemory) -> ShmConfig {
    ShmConfig { mode, ring_bytes: 64 << 10, ..ShmConfig::default() }
}

/// Segment files of this process still in /dev/shm.
fn leftovers() -> Vec<String> {
    let mine = format!("phalanx-{}-", std::process::id());
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(&mine)).collect()
        })
        .unwrap_or_default()
}

/// A connected pair: (connector's end, acceptor's end, the two endpoints).
async fn pair(
    client: ShmEndpoint,
    server: ShmEndpoint,
) -> (Arc<dyn Link>, Arc<dyn Link>, Arc<ShmEndpoint>, Arc<ShmEndpoint>) {
    let (client, server) = (Arc::new(client), Arc::new(server));
    let addr = server.local_addr();
    let (a, accepted) = tokio::join!(client.connect(addr, Bytes::from_static(b"the caller's hello")), server.accept());
    let (b, hello) = accepted.unwrap();
    assert_eq!(hello, Bytes::from_static(b"the caller's hello"), "the caller's hello arrives unchanged");
    (a.unwrap(), b, client, server)
}

fn run(test: impl std::future::Future<Output = ()>) {
    let _files = super::segment::files_lock();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async { tokio::time::timeout(LIMIT, test).await.expect("test timed out") });
}

fn both(mode_a: SharedMemory, mode_b: SharedMemory) -> (ShmEndpoint, ShmEndpoint) {
    (ShmEndpoint::new(quic(), config(mode_a)), ShmEndpoint::new(quic(), config(mode_b)))
}

#[test]
fn conformance_over_a_negotiated_link() {
    run(async {
        let (c, s) = both(SharedMemory::Auto, SharedMemory::Auto);
        let (a, b, c, s) = pair(c, s).await;
        assert_eq!((c.shared_memory_links(), s.shared_memory_links()), (1, 1));
        assert!(leftovers().is_empty(), "segment files left: {:?}", leftovers());
        conformance::ordered_both_ways(&*a, &*b, 1 << 20).await;
        conformance::bounded(&*a, &*b, 8, 16 << 10).await;
        conformance::close_is_seen(&*a, &*b).await;
        let (c2, s2) = both(SharedMemory::Auto, SharedMemory::Auto);
        let (a, b, _, _) = pair(c2, s2).await;
        conformance::close_is_seen(&*b, &*a).await;
    });
}

#[test]
fn off_on_either_side_keeps_the_network() {
    for (x, y) in [(SharedMemory::Off, SharedMemory::Auto), (SharedMemory::Auto, SharedMemory::Off)] {
        run(async move {
            let (c, s) = both(x, y);
            let (a, b, c, s) = pair(c, s).await;
            assert_eq!((c.shared_memory_links(), s.shared_memory_links()), (0, 0));
            let f = Frame { header: Header { index: 3, ..Header::default() }, payload: Bytes::from_static(b"net") };
            a.send(f.clone()).await.unwrap();
            assert_eq!(b.recv().await.unwrap(), f);
            conformance::ordered_both_ways(&*a, &*b, 1 << 16).await;
        });
    }
    let _files = super::segment::files_lock();
    assert!(leftovers().is_empty(), "segment files left: {:?}", leftovers());
}

#[test]
fn another_host_keeps_the_network() {
    run(async {
        let (c, mut s) = both(SharedMemory::Auto, SharedMemory::Auto);
        s.set_identity_for_test(Some("another boot".into()));
        let (a, b, c, s) = pair(c, s).await;
        assert_eq!((c.shared_memory_links(), s.shared_memory_links()), (0, 0));
        conformance::ordered_both_ways(&*a, &*b, 1 << 16).await;
    });
    let _files = super::segment::files_lock();
    assert!(leftovers().is_empty(), "segment files left: {:?}", leftovers());
}

#[test]
fn a_plain_endpoint_can_connect_to_a_wrapped_one() {
    run(async {
        let client = quic();
        let server = Arc::new(ShmEndpoint::new(quic(), config(SharedMemory::Auto)));
        let addr = server.local_addr();
        let (a, accepted) = tokio::join!(client.connect(addr, Bytes::from_static(b"plain")), server.accept());
        let (b, hello) = accepted.unwrap();
        assert_eq!(hello, Bytes::from_static(b"plain"));
        conformance::ordered_both_ways(&*a.unwrap(), &*b, 1 << 16).await;
    });
}

#[test]
fn a_connect_that_fails_leaves_no_segment() {
    run(async {
        let client = ShmEndpoint::new(
            quic(),
            ShmConfig { handshake_timeout: Duration::from_secs(2), ..config(SharedMemory::Auto) },
        );
        // Nobody listens there (a bound socket that never answers).
        let silent = std::net::UdpSocket::bind(localhost()).unwrap();
        let r = client.connect(silent.local_addr().unwrap(), Bytes::new()).await;
        assert!(r.is_err());
    });
    let _files = super::segment::files_lock();
    assert!(leftovers().is_empty(), "segment files left: {:?}", leftovers());
}

#[test]
fn dropping_one_end_closes_the_other() {
    run(async {
        let (c, s) = both(SharedMemory::Auto, SharedMemory::Auto);
        let (a, b, _c, _s) = pair(c, s).await;
        drop(a);
        let r = tokio::time::timeout(Duration::from_secs(5), b.recv()).await.expect("recv must end");
        assert!(r.is_err());
    });
}
