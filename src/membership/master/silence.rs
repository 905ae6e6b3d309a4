//! How long a peer may stay silent: a timeout that adapts to how regularly the peer's
//! messages have been arriving, in the spirit of the phi-accrual failure detector.
//!
//! Each peer's inter-arrival times feed an exponentially weighted mean and variance.
//! The timeout is the mean plus [`SIGMAS`] standard deviations, never below the
//! configured floor ([`MasterConfig::peer_timeout`](super::MasterConfig::peer_timeout))
//! and never above the ceiling
//! ([`MasterConfig::max_peer_timeout`](super::MasterConfig::max_peer_timeout)). A peer
//! on a quiet LAN, whose heartbeats come like clockwork, keeps the floor, so a frozen
//! process is removed as fast as before; a peer on a loaded machine or a jittery WAN,
//! whose heartbeats come late now and then, earns a longer timeout instead of a false
//! removal. (A dead process does not wait for either: its liveness connection closes.)

use std::time::{Duration, Instant};

/// Standard deviations of slack beyond the mean interval.
pub const SIGMAS: f64 = 6.0;

/// Intervals seen before the timeout adapts; until then the floor holds.
const WARM_UP: u32 = 8;

/// Weight of a new interval in the running mean and variance.
const ALPHA: f64 = 1.0 / 16.0;

/// The arrival statistics of one peer.
#[derive(Clone, Debug, Default)]
pub(super) struct Arrivals {
    last: Option<Instant>,
    samples: u32,
    /// Mean and variance of the intervals, in seconds and seconds squared.
    mean: f64,
    var: f64,
}

impl Arrivals {
    /// A message from the peer arrived at `now`.
    pub(super) fn heard(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let x = now.saturating_duration_since(last).as_secs_f64();
            if self.samples == 0 {
                self.mean = x;
            } else {
                // West's exponentially weighted update of mean and variance.
                let d = x - self.mean;
                self.mean += ALPHA * d;
                self.var = (1.0 - ALPHA) * (self.var + ALPHA * d * d);
            }
            self.samples = self.samples.saturating_add(1);
        }
        self.last = Some(now);
    }

    /// How long the peer may now stay silent: between `floor` and `ceiling` (the
    /// ceiling is raised to the floor when below it).
    pub(super) fn timeout(&self, floor: Duration, ceiling: Duration) -> Duration {
        if self.samples < WARM_UP {
            return floor;
        }
        let adapted = Duration::from_secs_f64((self.mean + SIGMAS * self.var.sqrt()).max(0.0));
        adapted.clamp(floor, ceiling.max(floor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn fed(intervals: impl IntoIterator<Item = u64>) -> Arrivals {
        let mut a = Arrivals::default();
        let mut t = Instant::now();
        a.heard(t);
        for i in intervals {
            t += ms(i);
            a.heard(t);
        }
        a
    }

    #[test]
    fn steady_heartbeats_keep_the_floor_and_jittery_ones_earn_slack() {
        let (floor, ceiling) = (ms(750), ms(3000)); // a WAN's ceiling, not the default
        assert_eq!(fed([]).timeout(floor, ceiling), floor);
        let steady = fed((0..100).map(|i| 150 + i % 3));
        assert_eq!(steady.timeout(floor, ceiling), floor);
        // A loaded machine: a late heartbeat (700 ms) every fourth.
        let jittery = fed((0..100).map(|i| if i % 4 == 0 { 700 } else { 150 }));
        let t = jittery.timeout(floor, ceiling);
        assert!(t > ms(1000) && t < ceiling, "{t:?}");
        // A wildly irregular peer is held to the ceiling.
        assert_eq!(fed((0..100).map(|i| if i % 2 == 0 { 2500 } else { 10 })).timeout(floor, ceiling), ceiling);
        // A ceiling below the floor does not lower the floor.
        assert_eq!(jittery.timeout(floor, ms(100)), floor);
    }

    #[test]
    fn the_floor_holds_until_enough_intervals_were_seen() {
        let few = fed([2000; 7]);
        assert_eq!(few.timeout(ms(750), ms(3000)), ms(750));
    }
}
