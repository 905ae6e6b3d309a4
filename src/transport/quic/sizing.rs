//! Sizing a link for its path: how many connections, and how large each connection's
//! windows, from the round-trip time measured while the link was set up.
//!
//! A long fat pipe (a WAN path of tens of milliseconds and hundreds of Mbit/s) needs
//! windows of a few bandwidth-delay products to stay full while lost packets are
//! recovered, but the same windows on loopback only hold memory. So a link starts with
//! the small [`QuicConfig::min_window`] and, once its handshake has measured the round
//! trip, each connection's receive and send windows become
//! `WINDOW_RTTS × window_rate × RTT / connections`, clamped between that floor and the
//! configured windows (the ceilings). See [`QuicConfig::window_rate_bps`] and
//! [`QuicConfig::connections_per_link`].

use std::time::Duration;

use quinn::VarInt;

use super::{Congestion, QuicConfig, MAX_STRIPES};

/// Round trips of data at the sizing rate a link's windows hold, in all: one is the
/// data in flight, the rest keeps the pipe full while a lost packet is detected and
/// resent (about one more round trip, during which the receiver holds everything that
/// arrives behind the hole) and absorbs a round trip inflated by a queue.
pub const WINDOW_RTTS: u64 = 4;

/// Most connections an automatic link uses.
pub const AUTO_MAX_CONNECTIONS: usize = 4;

/// Below this round trip (loopback, a LAN) an automatic link has one connection.
pub const AUTO_WAN_RTT: Duration = Duration::from_millis(5);

/// With a loss-based controller (CUBIC, NewReno), one more automatic connection per
/// this much round trip beyond [`AUTO_WAN_RTT`]: random loss caps each such flow near
/// `MSS / RTT · 1.2 / √p`, so a longer path needs more of them.
pub const AUTO_RTT_PER_CONNECTION: Duration = Duration::from_millis(10);

/// With BBR, one automatic connection per this much of
/// [`window_rate_bps`](QuicConfig::window_rate_bps): what one connection's encryption
/// carries on one core (raw QUIC moves about 0.24 GB/s on one core here). BBR itself
/// fills a long fat pipe with one connection; more of them only compete for the path's
/// queue (4 on the test relay took twice as long as 1, docs/PERF.md).
pub const AUTO_RATE_PER_CONNECTION: u64 = 2_000_000_000;

/// How one link is set up: its connections and each one's windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkSizing {
    /// The round trip measured at setup (smoothed, as quinn's `Connection::rtt`).
    pub rtt: Duration,
    /// QUIC connections the link stripes its frames over.
    pub connections: usize,
    /// Each connection's receive window: unread bytes the peer may send on it.
    pub receive_window: u64,
    /// Each connection's send window: unacknowledged bytes this end keeps in flight.
    pub send_window: u64,
}

impl QuicConfig {
    /// Connections a link whose round trip measured `rtt` uses: the explicit
    /// [`connections_per_link`](QuicConfig::connections_per_link), else one below
    /// [`AUTO_WAN_RTT`], and beyond it, with BBR, one per started
    /// [`AUTO_RATE_PER_CONNECTION`] of [`window_rate_bps`](QuicConfig::window_rate_bps),
    /// with CUBIC or NewReno one more per [`AUTO_RTT_PER_CONNECTION`]; at most
    /// [`AUTO_MAX_CONNECTIONS`].
    pub fn connections_for(&self, rtt: Duration) -> usize {
        if let Some(n) = self.connections_per_link {
            return n.clamp(1, MAX_STRIPES);
        }
        if rtt < AUTO_WAN_RTT {
            return 1;
        }
        let n = match self.congestion {
            Congestion::Bbr => self.window_rate_bps.map_or(1, |r| r.div_ceil(AUTO_RATE_PER_CONNECTION)),
            Congestion::Cubic | Congestion::NewReno => {
                let beyond = (rtt - AUTO_WAN_RTT).as_nanos() / AUTO_RTT_PER_CONNECTION.as_nanos();
                u64::try_from(beyond).unwrap_or(u64::MAX).saturating_add(2)
            }
        };
        usize::try_from(n).unwrap_or(usize::MAX).clamp(1, AUTO_MAX_CONNECTIONS)
    }

    /// The windows of each of `connections` connections of a link whose round trip
    /// measured `rtt`: the configured windows as they are without a
    /// [`window_rate_bps`](QuicConfig::window_rate_bps), else [`WINDOW_RTTS`] round trips
    /// at that rate, shared by the connections, between
    /// [`min_window`](QuicConfig::min_window) and the configured windows.
    pub fn sizing(&self, rtt: Duration, connections: usize) -> LinkSizing {
        let connections = connections.max(1);
        let receive_ceiling = self.receive_window.min(self.stream_receive_window);
        let Some(rate) = self.window_rate_bps else {
            return LinkSizing { rtt, connections, receive_window: receive_ceiling, send_window: self.send_window };
        };
        let link = (rate / 8) as u128 * WINDOW_RTTS as u128 * rtt.as_nanos() / 1_000_000_000;
        let each = u64::try_from(link / connections as u128).unwrap_or(u64::MAX);
        let within = |ceiling: u64| each.clamp(self.min_window.min(ceiling), ceiling);
        LinkSizing { rtt, connections, receive_window: within(receive_ceiling), send_window: within(self.send_window) }
    }

    /// The windows a connection starts with, before its round trip is known: the floor
    /// with a [`window_rate_bps`](QuicConfig::window_rate_bps) (a window cannot shrink
    /// below what was granted, so it starts small and grows), else the configured ones.
    pub(super) fn initial_windows(&self) -> (u64, u64) {
        match self.window_rate_bps {
            Some(_) => (
                self.min_window.min(self.receive_window).min(self.stream_receive_window),
                self.min_window.min(self.send_window),
            ),
            None => (self.receive_window, self.send_window),
        }
    }
}

impl LinkSizing {
    /// Gives each of `conns` its windows.
    pub(super) fn apply(&self, conns: &[quinn::Connection]) {
        // Below the configured window, which fits a VarInt (checked by `transport`).
        let receive = VarInt::from_u64(self.receive_window).unwrap_or(VarInt::MAX);
        for conn in conns {
            conn.set_receive_window(receive);
            conn.set_send_window(self.send_window);
        }
        tracing::debug!(
            rtt_us = self.rtt.as_micros() as u64,
            connections = self.connections,
            receive_window = self.receive_window,
            send_window = self.send_window,
            "sized a QUIC link"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    use crate::transport::conformance;
    use crate::transport::quic::tests::{bounded, frame, localhost, pair, secret_config};
    use crate::transport::quic::QuicEndpoint;
    use crate::transport::Link;

    const MIB: u64 = 1 << 20;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn automatic_connections_follow_the_path_and_the_controller() {
        let bbr = QuicConfig::default();
        assert_eq!((bbr.connections_per_link, bbr.congestion), (None, Congestion::Bbr), "the defaults");
        for rtt in [Duration::from_micros(80), ms(2), ms(50), Duration::from_secs(3)] {
            assert_eq!(bbr.connections_for(rtt), 1, "BBR at 1 Gbit/s: one connection at {rtt:?}");
        }
        let fast = QuicConfig { window_rate_bps: Some(5_000_000_000), ..QuicConfig::default() };
        assert_eq!(fast.connections_for(ms(1)), 1, "loopback or a LAN: one");
        assert_eq!(fast.connections_for(ms(50)), 3, "5 Gbit/s: three cores' worth of encryption");
        let huge = QuicConfig { window_rate_bps: Some(100_000_000_000), ..QuicConfig::default() };
        assert_eq!(huge.connections_for(ms(50)), AUTO_MAX_CONNECTIONS);
        let cubic = QuicConfig { congestion: Congestion::Cubic, ..QuicConfig::default() };
        assert_eq!(cubic.connections_for(ms(1)), 1);
        assert_eq!(cubic.connections_for(ms(5)), 2);
        assert_eq!(cubic.connections_for(ms(15)), 3);
        assert_eq!(cubic.connections_for(ms(50)), AUTO_MAX_CONNECTIONS, "the test relay's 25 ms each way");
        assert_eq!(cubic.connections_for(Duration::MAX), AUTO_MAX_CONNECTIONS);
        for c in [Congestion::Bbr, Congestion::Cubic] {
            let fixed = QuicConfig { connections_per_link: Some(3), congestion: c, ..QuicConfig::default() };
            assert_eq!(fixed.connections_for(Duration::ZERO), 3, "an explicit count is honoured");
            assert_eq!(fixed.connections_for(Duration::from_secs(1)), 3);
        }
    }

    /// Through the relay at 15 ms each way, an automatic link measures the round trip
    /// during its first handshake and announces the count that follows from it; both
    /// ends size their windows from what they measured, and frames arrive in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_automatic_link_over_a_long_path_is_striped_and_sized() {
        use crate::relay::{Relay, Shaping};
        bounded(async {
            let relay = Relay::start(3, Shaping::default().delay(ms(15))).unwrap();
            for congestion in [Congestion::Cubic, Congestion::Bbr] {
                let cfg = QuicConfig { congestion, ..secret_config() };
                let server = QuicEndpoint::bind(localhost(), cfg.clone()).unwrap();
                let client = QuicEndpoint::bind(localhost(), cfg.clone()).unwrap();
                let front = relay.front(server.local_addr().unwrap()).unwrap();
                let (a, accepted) = tokio::join!(client.connect(front, Bytes::from_static(b"far")), server.accept());
                let (a, (b, hello)) = (a.unwrap(), accepted.unwrap());
                assert_eq!(hello, "far");
                let rtt = a.sizing().rtt;
                assert!(rtt >= ms(30), "measured {rtt:?} over a 30 ms round trip");
                assert_eq!(a.stripes(), cfg.connections_for(rtt), "{congestion}");
                assert_eq!(b.stripes(), a.stripes());
                let expected = if congestion == Congestion::Bbr { 1 } else { 3 };
                assert!(a.stripes() >= expected, "{congestion}: {} connections at {rtt:?}", a.stripes());
                // 4 round trips at 1 Gbit/s: 15 MB, more than the 2 MiB of loopback.
                assert!(b.sizing().receive_window > cfg.min_window);
                assert_eq!(b.sizing(), cfg.sizing(b.sizing().rtt, b.stripes()));
                conformance::ordered_both_ways(&a, &b, 64 << 10).await;
            }
        })
        .await;
    }

    #[test]
    fn windows_are_round_trips_at_the_rate_between_floor_and_ceiling() {
        let c = QuicConfig::default();
        let (rate, floor, ceiling) = (c.window_rate_bps.unwrap(), c.min_window, c.receive_window);
        assert!(floor < ceiling);
        // Loopback: the floor.
        let lo = c.sizing(Duration::from_micros(100), 1);
        assert_eq!((lo.receive_window, lo.send_window), (floor, floor));
        // In between: WINDOW_RTTS round trips at the rate, shared by the connections.
        let rtt = ms(10);
        let link = rate / 8 * WINDOW_RTTS * 10 / 1000;
        assert!(link > floor && link < ceiling, "the test's 10 ms is between floor and ceiling");
        assert_eq!(c.sizing(rtt, 1).receive_window, link);
        assert_eq!(c.sizing(rtt, 2).receive_window, (link / 2).max(floor));
        assert_eq!(c.sizing(rtt, 1).send_window, link.min(c.send_window));
        // A long fat pipe: the ceiling.
        let wan = c.sizing(ms(100), 1);
        assert_eq!(wan.receive_window, ceiling.min(c.stream_receive_window));
        assert_eq!(wan.send_window, c.send_window);
        assert_eq!((wan.rtt, wan.connections), (ms(100), 1));
        // The window of 400 Mbit/s at 50 ms (2.5 MB) fits, with room for recovery, in
        // each of the automatic connections at that round trip.
        let n = c.connections_for(ms(50));
        assert!(c.sizing(ms(50), n).receive_window * n as u64 >= 3 * 2_500_000);
    }

    #[test]
    fn without_a_rate_the_configured_windows_stay() {
        let c = QuicConfig { window_rate_bps: None, ..QuicConfig::default() };
        for rtt in [Duration::ZERO, ms(1), ms(500)] {
            let s = c.sizing(rtt, 2);
            assert_eq!(s.receive_window, c.receive_window.min(c.stream_receive_window));
            assert_eq!(s.send_window, c.send_window);
        }
        assert_eq!(c.initial_windows(), (c.receive_window, c.send_window));
    }

    #[test]
    fn a_floor_above_the_ceiling_yields_to_it() {
        let c =
            QuicConfig { min_window: 64 * MIB, receive_window: 4 * MIB, send_window: 2 * MIB, ..QuicConfig::default() };
        let s = c.sizing(Duration::ZERO, 1);
        assert_eq!((s.receive_window, s.send_window), (4 * MIB, 2 * MIB));
        assert_eq!(c.initial_windows(), (4 * MIB, 2 * MIB));
    }

    /// Frames of `len` bytes `a` accepts for a `b` that reads nothing, until a send
    /// blocks for 300 ms; then `b` reads them all, in order.
    async fn accepted(a: &dyn Link, b: &dyn Link, len: usize, at_most: u64) -> u64 {
        let mut sent = 0;
        while sent < at_most {
            match tokio::time::timeout(Duration::from_millis(300), a.send(frame(sent, len))).await {
                Ok(r) => r.unwrap(),
                Err(_) => break,
            }
            sent += 1;
        }
        for i in 0..sent {
            assert_eq!(b.recv().await.unwrap().header.index, i);
        }
        sent
    }

    const FRAME: usize = 16 << 10;

    /// The connection window sized after the handshake binds, not the stream window
    /// fixed before it: a link sized to its floor holds a floor's worth of frames.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_link_sized_small_holds_its_window_only() {
        bounded(async {
            // 1 bit/s: any round trip sizes the windows to the floor.
            let cfg = QuicConfig {
                connections_per_link: Some(1),
                window_rate_bps: Some(1),
                min_window: 256 << 10,
                ..secret_config()
            };
            let (a, b, _) = pair(cfg.clone(), cfg).await;
            assert_eq!(b.sizing().receive_window, 256 << 10);
            assert_eq!(b.sizing().connections, 1);
            // 16 frames of window, one cut by its edge, 4 queued or in hand: far below
            // the 1024 frames of the 16 MiB stream window.
            let n = accepted(&a, &b, FRAME, 1024).await;
            assert!((1..=16 + 1 + 4).contains(&n), "{n} frames");
        })
        .await;
    }

    /// A link sized to its ceiling grows beyond the floor it started with.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_link_sized_large_grows_past_its_start() {
        bounded(async {
            // One connection: a loaded machine may answer the handshake slowly enough to
            // look like a WAN, and this rate would then ask for several.
            let cfg = QuicConfig {
                connections_per_link: Some(1),
                window_rate_bps: Some(u64::MAX / 2),
                min_window: 64 << 10,
                receive_window: 1 << 20,
                send_window: 1 << 20,
                ..secret_config()
            };
            let (a, b, _) = pair(cfg.clone(), cfg).await;
            assert_eq!((b.sizing().receive_window, a.sizing().send_window), (1 << 20, 1 << 20));
            // 64 frames of window: more than the 4 + 6 of the floor, at most 64 + 5.
            let n = accepted(&a, &b, FRAME, 1024).await;
            assert!((4 + 1 + 4 + 1..=64 + 1 + 4).contains(&n), "{n} frames");
        })
        .await;
    }
}
