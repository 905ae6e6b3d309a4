//! Frame payloads lent straight out of a ring: the receiver reduces or copies from the
//! peer's ring instead of from a copy of it.
//!
//! A reader that finds a large frame whole and contiguous in its ring hands its payload
//! on as a [`Bytes`] over the ring's memory (a [`RingLoan`]) and moves its own read
//! position past it, but does not give the room back to the writer yet: the ring's
//! shared read index is published only up to the first payload still lent. When the
//! last `Bytes` of a loan drops, the loan is returned, and the read index moves up to
//! the next loan still out (or to where the reader is). So the writer never overwrites
//! a lent payload, and the ring's protocol (a byte is written only below the published
//! read index plus the ring's size) is unchanged for the peer.
//!
//! The price: a payload that someone holds keeps its room, and every byte after it, from
//! the writer. Whoever keeps frames beyond the moment it consumes them (the executor's
//! kept and held frames) copies them first ([`Link::lends_frames`]); the demultiplexer's
//! queues hold a bounded number of frames, which the executor drains in order. See the
//! [`super`] module docs.
//!
//! [`Link::lends_frames`]: crate::transport::Link::lends_frames

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::futex;
use super::segment::Mapping;

/// The loans of one ring's reader and the publishing of its read index.
pub(crate) struct Loans {
    map: Arc<Mapping>,
    index: usize,
    /// Stream positions, in order, that the reader has consumed up to: `(end, free)`,
    /// `free` once nothing before `end` is lent any more from this entry's part.
    out: Mutex<VecDeque<(u64, bool)>>,
    /// The reader's own position (published bytes it has looked at), for the thread
    /// that waits for new data: the shared read index lags behind it while loans are out.
    parsed: AtomicU64,
}

impl Loans {
    /// The loans of ring `index` of `map`, whose reader is at `read`.
    pub(crate) fn new(map: Arc<Mapping>, index: usize, read: u64) -> Arc<Loans> {
        Arc::new(Loans { map, index, out: Mutex::new(VecDeque::new()), parsed: AtomicU64::new(read) })
    }

    /// The reader's position: everything before it has been read (copied or lent).
    pub(crate) fn parsed(&self) -> u64 {
        self.parsed.load(Ordering::Acquire)
    }

    /// The reader consumed everything up to `end` without lending it: its room goes
    /// back to the writer now, unless a loan before it is still out.
    pub(crate) fn advance(&self, end: u64) {
        self.parsed.store(end, Ordering::Release);
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if out.is_empty() {
            drop(out);
            self.publish(end);
        } else {
            out.push_back((end, true));
        }
    }

    /// Lends the `len` bytes of ring data at `start` (offset in the ring), which end at
    /// stream position `end`: the reader has moved past them.
    ///
    /// The caller has checked that the writer published them and that they do not wrap.
    pub(crate) fn lend(self: &Arc<Loans>, start: usize, len: usize, end: u64) -> Bytes {
        debug_assert!(start + len <= self.map.ring_bytes());
        self.parsed.store(end, Ordering::Release);
        self.out.lock().unwrap_or_else(|e| e.into_inner()).push_back((end, false));
        Bytes::from_owner(RingLoan { loans: self.clone(), start, len, end })
    }

    /// The loan that ends at `end` is back: publishes the read index up to the first
    /// loan still out.
    fn give_back(&self, end: u64) {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = out.iter_mut().find(|(e, _)| *e == end) {
            entry.1 = true;
        }
        let mut upto = None;
        while let Some(&(e, true)) = out.front() {
            upto = Some(e);
            out.pop_front();
        }
        drop(out);
        if let Some(end) = upto {
            self.publish(end);
        }
    }

    /// How many loans are out (tests).
    #[cfg(test)]
    pub(crate) fn out(&self) -> usize {
        self.out.lock().unwrap_or_else(|e| e.into_inner()).iter().filter(|(_, free)| !free).count()
    }

    fn publish(&self, end: u64) {
        let ctl = self.map.ring_ctl(self.index);
        // Positions only grow; a late publish of an earlier position never moves the
        // index back (publishes happen under `out`'s lock or with no loan out, in order).
        ctl.read.fetch_max(end, Ordering::AcqRel);
        futex::bump_and_wake(&ctl.consumed);
    }
}

/// A payload lent from a ring; returned to its [`Loans`] when dropped.
struct RingLoan {
    loans: Arc<Loans>,
    start: usize,
    len: usize,
    end: u64,
}

impl AsRef<[u8]> for RingLoan {
    fn as_ref(&self) -> &[u8] {
        let data = self.loans.map.ring_data(self.loans.index);
        // SAFETY: `start + len` is within the ring's data (checked by the reader before
        // lending), which the mapping held through `loans` keeps mapped. The writer
        // published these bytes before the reader lent them and, by the ring's protocol,
        // writes them again only once the shared read index passes `end`, which happens
        // only after this loan is returned (its drop). A peer that broke the protocol
        // could change them under us: a same-host peer is trusted with the memory it
        // shares (see the module docs of `shm`).
        unsafe { std::slice::from_raw_parts(data.add(self.start), self.len) }
    }
}

impl Drop for RingLoan {
    fn drop(&mut self) {
        self.loans.give_back(self.end);
    }
}
