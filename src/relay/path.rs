//! One direction of one path through the relay, as a state machine with no I/O: a
//! packet goes in with the time it arrived, and out comes when it is to be delivered,
//! or why it is dropped. The relay's sockets only carry out these verdicts.

use std::time::{Duration, Instant};

use crate::rng::SplitMix64;

/// What a path does to the packets that cross it, in one direction. The default
/// passes everything at once, like loopback.
///
/// ```
/// use std::time::Duration;
/// use phalanx::relay::Shaping;
/// // A transatlantic path: 25 ms one way, 400 Mbit/s, 0.1 % loss.
/// let wan = Shaping::default().delay(Duration::from_millis(25)).rate_mbit(400.0).loss(0.001);
/// assert_eq!(wan.rate_bps, Some(400_000_000));
/// assert!(!Shaping::cut().passes());
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Shaping {
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Extra delay drawn uniformly from `0..=jitter` per packet.
    pub jitter: Duration,
    /// Whether a packet with less jitter may overtake an earlier one. Off by default: a
    /// jittered packet then waits for the one before it, as on most real paths.
    pub reorder: bool,
    /// Bottleneck rate in bits per second; `None` for no limit.
    pub rate_bps: Option<u64>,
    /// Probability in `[0, 1]` that a packet is lost.
    pub loss: f64,
    /// The longest a packet waits for the bottleneck before the queue drops it (a tail
    /// drop, as a router's buffer does).
    pub queue: Duration,
    /// Every packet is dropped: a partition.
    pub blocked: bool,
}

impl Default for Shaping {
    fn default() -> Shaping {
        Shaping {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            reorder: false,
            rate_bps: None,
            loss: 0.0,
            queue: Duration::from_millis(100),
            blocked: false,
        }
    }
}

impl Shaping {
    /// A path that drops everything: one side of a partition.
    pub fn cut() -> Shaping {
        Shaping { blocked: true, ..Shaping::default() }
    }

    /// With a fixed one-way `delay`.
    pub fn delay(mut self, delay: Duration) -> Shaping {
        self.delay = delay;
        self
    }

    /// With uniform jitter up to `jitter`; `reorder` lets packets overtake each other.
    pub fn jitter(mut self, jitter: Duration, reorder: bool) -> Shaping {
        self.jitter = jitter;
        self.reorder = reorder;
        self
    }

    /// With a bottleneck of `mbit` megabits per second.
    pub fn rate_mbit(mut self, mbit: f64) -> Shaping {
        self.rate_bps = Some((mbit * 1e6).max(1.0) as u64);
        self
    }

    /// Losing each packet with probability `p` (clamped to `[0, 1]`).
    pub fn loss(mut self, p: f64) -> Shaping {
        self.loss = if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
        self
    }

    /// Whether any packet can cross.
    pub fn passes(&self) -> bool {
        !self.blocked && self.loss < 1.0
    }
}

/// Why a packet did not cross.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    /// The path is cut.
    Cut,
    /// Lost at random.
    Loss,
    /// The bottleneck's queue was full.
    Queue,
}

/// Packets and bytes counted on one path, by fate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathStats {
    /// Packets delivered (or scheduled for delivery).
    pub delivered: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Dropped by a cut.
    pub cut: u64,
    /// Dropped at random.
    pub lost: u64,
    /// Dropped by the full queue.
    pub queue_drops: u64,
}

/// The state of one direction of one path: when its bottleneck is next free, when
/// its last packet arrives, and its random stream.
#[derive(Debug)]
pub(crate) struct Path {
    busy_until: Option<Instant>,
    last_arrival: Option<Instant>,
    rng: SplitMix64,
    pub(crate) stats: PathStats,
}

impl Path {
    /// A path whose random draws come from `seed`.
    pub(crate) fn new(seed: u64) -> Path {
        Path { busy_until: None, last_arrival: None, rng: SplitMix64(seed), stats: PathStats::default() }
    }

    /// A packet of `len` bytes entered the path at `now`: when it arrives at the other
    /// end, or why it never does.
    pub(crate) fn admit(&mut self, shaping: &Shaping, now: Instant, len: usize) -> Result<Instant, Drop> {
        let verdict = self.verdict(shaping, now, len);
        match verdict {
            Ok(_) => {
                self.stats.delivered += 1;
                self.stats.bytes += len as u64;
            }
            Err(Drop::Cut) => self.stats.cut += 1,
            Err(Drop::Loss) => self.stats.lost += 1,
            Err(Drop::Queue) => self.stats.queue_drops += 1,
        }
        verdict
    }

    fn verdict(&mut self, s: &Shaping, now: Instant, len: usize) -> Result<Instant, Drop> {
        if s.blocked {
            return Err(Drop::Cut);
        }
        // Draw for loss and jitter on every packet, so that one path's fates depend on
        // its own packets only.
        let (lost, jitter) = (self.rng.unit() < s.loss, self.rng.unit());
        let departs = match s.rate_bps {
            Some(rate) => {
                let start = self.busy_until.filter(|&t| t > now).unwrap_or(now);
                if start - now > s.queue {
                    return Err(Drop::Queue);
                }
                let on_wire = Duration::from_nanos((len as u64 * 8).saturating_mul(1_000_000_000) / rate.max(1));
                self.busy_until = Some(start + on_wire);
                start + on_wire
            }
            None => now,
        };
        // A lost packet still took its turn at the bottleneck (it was lost beyond it).
        if lost {
            return Err(Drop::Loss);
        }
        let mut arrives = departs + s.delay + s.jitter.mul_f64(jitter);
        if !s.reorder {
            arrives = arrives.max(self.last_arrival.unwrap_or(arrives));
        }
        self.last_arrival = Some(self.last_arrival.map_or(arrives, |t| t.max(arrives)));
        Ok(arrives)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn delay_and_rate_set_the_arrival_and_a_full_queue_drops() {
        let t0 = Instant::now();
        // 8 Mbit/s: a 1000-byte packet takes 1 ms on the wire, then 10 ms of delay.
        let s = Shaping { queue: ms(3), ..Shaping::default().delay(ms(10)).rate_mbit(8.0) };
        let mut p = Path::new(1);
        assert_eq!(p.admit(&s, t0, 1000), Ok(t0 + ms(11)));
        assert_eq!(p.admit(&s, t0, 1000), Ok(t0 + ms(12)), "queued behind the first");
        assert_eq!(p.admit(&s, t0, 1000), Ok(t0 + ms(13)));
        assert_eq!(p.admit(&s, t0, 1000), Ok(t0 + ms(14)), "waited 3 ms: the limit");
        assert_eq!(p.admit(&s, t0, 1000), Err(Drop::Queue), "would wait 4 ms");
        // Once the queue drained, packets go at once again.
        assert_eq!(p.admit(&s, t0 + ms(50), 1000), Ok(t0 + ms(61)));
        assert_eq!(p.stats, PathStats { delivered: 5, bytes: 5000, cut: 0, lost: 0, queue_drops: 1 });
    }

    #[test]
    fn loss_follows_its_probability_and_the_seed() {
        let s = Shaping::default().loss(0.05);
        let now = Instant::now();
        let fates = |seed| {
            let mut p = Path::new(seed);
            (0..20_000).map(|_| p.admit(&s, now, 100).is_ok()).collect::<Vec<_>>()
        };
        let lost = fates(3).iter().filter(|ok| !**ok).count();
        assert!((800..1200).contains(&lost), "{lost} of 20000 lost at 5 %");
        assert_eq!(fates(3), fates(3), "a seed repeats its fates");
        assert_ne!(fates(3), fates(4));
    }

    #[test]
    fn jitter_keeps_order_unless_reordering_is_allowed() {
        let now = Instant::now();
        let arrivals = |reorder| {
            let s = Shaping::default().delay(ms(5)).jitter(ms(20), reorder);
            let mut p = Path::new(9);
            (0..200).map(|i| p.admit(&s, now + Duration::from_micros(i * 10), 100).unwrap()).collect::<Vec<_>>()
        };
        let fifo = arrivals(false);
        assert!(fifo.windows(2).all(|w| w[0] <= w[1]));
        assert!(fifo.iter().all(|&t| t >= now + ms(5) && t <= now + ms(26)));
        let mixed = arrivals(true);
        assert!(mixed.windows(2).any(|w| w[0] > w[1]), "some packet overtakes another");
    }

    #[test]
    fn a_cut_drops_everything() {
        let mut p = Path::new(0);
        assert_eq!(p.admit(&Shaping::cut(), Instant::now(), 1), Err(Drop::Cut));
        assert_eq!(p.stats.cut, 1);
        assert!(!Shaping::default().loss(1.0).passes() && Shaping::default().passes());
    }
}
