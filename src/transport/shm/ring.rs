//! A single-producer, single-consumer byte ring in shared memory: one direction of a
//! link.
//!
//! The writer owns the bytes from its write index up to the reader's read index plus
//! the ring's size; the reader owns the bytes from the read index up to the write
//! index. Each side keeps its own index privately and only *publishes* it (a release
//! store) after the bytes it covers are written or consumed, and reads the other's with
//! an acquire load, so a byte is never read before it is written, nor overwritten
//! before it is read. Indices count bytes since the start and never wrap (`u64`).
//!
//! A peer that writes nonsense into the indices (a bug, or memory scribbled on) is
//! caught: an index that would give more than the ring's size to either side is
//! reported as [`Corrupt`], and the link is closed. A peer killed mid-write leaves bytes
//! it never published, which the reader never sees.
//!
//! After publishing, a side bumps its futex word and wakes the other (see
//! [`super::futex`]); the other waits on that word while it can make no progress.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::futex;
use super::loan::Loans;
use super::segment::Mapping;

/// The shared state of one ring: each index on its own cache line with the futex word
/// bumped after it changes.
#[repr(C, align(64))]
pub(crate) struct RingCtl {
    /// Bytes the writer has published, since the start.
    pub(crate) write: AtomicU64,
    /// Bumped after every publish of `write` (and by a closing side): the reader waits
    /// on it.
    pub(crate) written: AtomicU32,
    _pad0: [u8; 52],
    /// Bytes the reader has consumed, since the start.
    pub(crate) read: AtomicU64,
    /// Bumped after every publish of `read` (and by a closing side): the writer waits
    /// on it.
    pub(crate) consumed: AtomicU32,
    _pad1: [u8; 52],
}

impl RingCtl {
    /// Wakes both sides' waiters (after a flag they should look at changed).
    pub(crate) fn wake_all(&self) {
        futex::bump_and_wake(&self.written);
        futex::bump_and_wake(&self.consumed);
    }
}

/// The other side's index is impossible: the ring cannot be trusted any more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Corrupt(pub(crate) String);

/// One ring of a mapping.
struct RingMem {
    map: Arc<Mapping>,
    index: usize,
    cap: usize,
}

impl RingMem {
    fn ctl(&self) -> &RingCtl {
        self.map.ring_ctl(self.index)
    }

    /// Copies `src` into the ring at stream position `at`, wrapping at the end.
    /// The caller owns the `src.len()` bytes from `at` (at most the ring's size).
    fn copy_in(&self, at: u64, src: &[u8]) {
        assert!(src.len() <= self.cap);
        let start = (at % self.cap as u64) as usize;
        let first = src.len().min(self.cap - start);
        let data = self.map.ring_data(self.index);
        // SAFETY: `start + first <= cap` and `src.len() - first <= cap - first`, so both
        // copies stay inside this ring's `cap` data bytes, which the mapping (held by
        // `self`) keeps valid. The ring protocol gives these bytes to the writer alone
        // (the reader does not look at them until they are published), and `src` is
        // local memory, so the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), data.add(start), first);
            std::ptr::copy_nonoverlapping(src.as_ptr().add(first), data, src.len() - first);
        }
    }

    /// Copies bytes of the ring from stream position `at` into `dst`, wrapping.
    fn copy_out(&self, at: u64, dst: &mut [u8]) {
        assert!(dst.len() <= self.cap);
        let start = (at % self.cap as u64) as usize;
        let first = dst.len().min(self.cap - start);
        let data = self.map.ring_data(self.index);
        // SAFETY: bounds as in `copy_in`; the bytes were published by the writer, which
        // does not touch them again until the reader publishes its read index past
        // them, and `dst` is local memory.
        unsafe {
            std::ptr::copy_nonoverlapping(data.add(start), dst.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(data, dst.as_mut_ptr().add(first), dst.len() - first);
        }
    }
}

impl RingMem {
    /// [`RingMem::copy_out`] into memory not initialised yet; every byte of `dst` is
    /// written.
    fn copy_out_uninit(&self, at: u64, dst: &mut [std::mem::MaybeUninit<u8>]) {
        assert!(dst.len() <= self.cap);
        let start = (at % self.cap as u64) as usize;
        let first = dst.len().min(self.cap - start);
        let data = self.map.ring_data(self.index);
        let out = dst.as_mut_ptr().cast::<u8>();
        // SAFETY: as in `copy_out`; writing plain bytes into `MaybeUninit<u8>` memory
        // of `dst` is always allowed, and the two copies cover it exactly.
        unsafe {
            std::ptr::copy_nonoverlapping(data.add(start), out, first);
            std::ptr::copy_nonoverlapping(data, out.add(first), dst.len() - first);
        }
    }
}

/// The writing side of a ring.
pub(crate) struct RingWriter {
    mem: RingMem,
    /// Our write index (the shared one is only ever published from this).
    written: u64,
}

/// The reading side of a ring.
pub(crate) struct RingReader {
    mem: RingMem,
    /// Our read index: what we have read, copied or lent. The shared one is published
    /// through `loans`, up to the first payload still lent.
    read: u64,
    loans: Arc<Loans>,
}

/// The writer and the reader of ring `index` of `map`, starting at the indices the
/// segment holds (zero in a fresh one).
pub(crate) fn ends(map: &Arc<Mapping>, index: usize) -> (RingWriter, RingReader) {
    let mem = || RingMem { map: map.clone(), index, cap: map.ring_bytes() };
    let ctl = map.ring_ctl(index);
    let writer = RingWriter { written: ctl.write.load(Ordering::Acquire), mem: mem() };
    let read = ctl.read.load(Ordering::Acquire);
    let reader = RingReader { read, mem: mem(), loans: Loans::new(map.clone(), index, read) };
    (writer, reader)
}

impl RingWriter {
    /// Bytes that may be written now.
    pub(crate) fn free(&self) -> Result<usize, Corrupt> {
        let read = self.mem.ctl().read.load(Ordering::Acquire);
        let used = self.written.wrapping_sub(read);
        if used > self.mem.cap as u64 {
            return Err(Corrupt(format!("read index {read} is not within a ring of the write index {}", self.written)));
        }
        Ok(self.mem.cap - used as usize)
    }

    /// Copies as much of `src` as fits into the ring, without publishing it yet;
    /// returns how many bytes. [`RingWriter::publish`] hands them to the reader.
    pub(crate) fn write(&mut self, src: &[u8], unpublished: &mut usize) -> Result<usize, Corrupt> {
        let n = (self.free()? - *unpublished).min(src.len());
        self.mem.copy_in(self.written + *unpublished as u64, &src[..n]);
        *unpublished += n;
        Ok(n)
    }

    /// Publishes `bytes` written by [`RingWriter::write`] and wakes the reader.
    pub(crate) fn publish(&mut self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        self.written += bytes as u64;
        let ctl = self.mem.ctl();
        ctl.write.store(self.written, Ordering::Release);
        futex::bump_and_wake(&ctl.written);
    }
}

impl RingReader {
    /// Bytes published and not yet consumed.
    pub(crate) fn available(&self) -> Result<usize, Corrupt> {
        let write = self.mem.ctl().write.load(Ordering::Acquire);
        let ready = write.wrapping_sub(self.read);
        if ready > self.mem.cap as u64 {
            return Err(Corrupt(format!("write index {write} is not within a ring of the read index {}", self.read)));
        }
        Ok(ready as usize)
    }

    /// Copies up to `dst.len()` published bytes into `dst`, without giving their room
    /// back yet; returns how many. [`RingReader::consume`] gives it back.
    pub(crate) fn read(&mut self, dst: &mut [u8], unconsumed: &mut usize) -> Result<usize, Corrupt> {
        let n = (self.available()? - *unconsumed).min(dst.len());
        self.mem.copy_out(self.read + *unconsumed as u64, &mut dst[..n]);
        *unconsumed += n;
        Ok(n)
    }

    /// Appends up to `want` published bytes to `dst` (which must have room for them:
    /// its spare capacity is filled, so nothing is zeroed first), without giving their
    /// room back yet; returns how many.
    pub(crate) fn read_append(
        &mut self,
        dst: &mut Vec<u8>,
        want: usize,
        unconsumed: &mut usize,
    ) -> Result<usize, Corrupt> {
        let n = (self.available()? - *unconsumed).min(want).min(dst.capacity() - dst.len());
        let at = self.read + *unconsumed as u64;
        let spare = &mut dst.spare_capacity_mut()[..n];
        self.mem.copy_out_uninit(at, spare);
        // SAFETY: `copy_out_uninit` initialised all `n` bytes of the spare capacity just
        // after the vector's length.
        unsafe { dst.set_len(dst.len() + n) };
        *unconsumed += n;
        Ok(n)
    }

    /// Gives the room of `bytes` read by [`RingReader::read`] back to the writer (once
    /// no payload before them is lent) and wakes it.
    pub(crate) fn consume(&mut self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        self.read += bytes as u64;
        self.loans.advance(self.read);
    }

    /// Consumes the `*unconsumed` bytes read so far and lends the next `len` published
    /// bytes as a payload, when all of them are published and do not wrap around the
    /// ring's end; `None` (nothing consumed) otherwise. See [`super::loan`].
    pub(crate) fn lend(&mut self, unconsumed: &mut usize, len: usize) -> Result<Option<Bytes>, Corrupt> {
        let at = self.read + *unconsumed as u64;
        let start = (at % self.mem.cap as u64) as usize;
        if self.available()? - *unconsumed < len || start + len > self.mem.cap {
            return Ok(None);
        }
        self.consume(std::mem::take(unconsumed));
        self.read += len as u64;
        Ok(Some(self.loans.lend(start, len, self.read)))
    }

    /// The loans of this reader, for the thread that waits for its data.
    pub(crate) fn loans(&self) -> Arc<Loans> {
        self.loans.clone()
    }
}

/// A read-only view of a ring for a thread that only waits on it: whether published
/// bytes are waiting to be consumed, and the futex word to sleep on until they are.
pub(crate) struct RingWatch {
    mem: RingMem,
    /// The reader's loans, whose position says what it has read (the shared read index
    /// lags behind while payloads are lent); `None` on the writing side.
    loans: Option<Arc<Loans>>,
}

/// A watch of ring `index` of `map`, for its writing side.
pub(crate) fn watch(map: &Arc<Mapping>, index: usize) -> RingWatch {
    RingWatch { mem: RingMem { map: map.clone(), index, cap: map.ring_bytes() }, loans: None }
}

/// A watch of the ring `reader` reads.
pub(crate) fn watch_reading(reader: &RingReader) -> RingWatch {
    RingWatch {
        mem: RingMem { map: reader.mem.map.clone(), index: reader.mem.index, cap: reader.mem.cap },
        loans: Some(reader.loans()),
    }
}

impl RingWatch {
    /// The futex word the writer bumps after publishing, read before [`Self::has_data`].
    pub(crate) fn data_word(&self) -> u32 {
        self.mem.ctl().written.load(Ordering::Acquire)
    }

    /// Whether the writer has published bytes the reader has not read.
    pub(crate) fn has_data(&self) -> bool {
        let ctl = self.mem.ctl();
        let read = match &self.loans {
            Some(loans) => loans.parsed(),
            None => ctl.read.load(Ordering::Acquire),
        };
        ctl.write.load(Ordering::Acquire) != read
    }

    /// Sleeps until the writer publishes (or `timeout`), unless the word moved past `seen`.
    pub(crate) fn wait_for_data(&self, seen: u32, timeout: Duration) {
        futex::wait(&self.mem.ctl().written, seen, timeout);
    }

    /// The futex word the reader bumps after consuming, read before trying to write.
    pub(crate) fn room_word(&self) -> u32 {
        self.mem.ctl().consumed.load(Ordering::Acquire)
    }

    /// Whether at least `bytes` of the ring are free for the writer (a corrupt index
    /// counts as room: the writer then finds the corruption itself).
    pub(crate) fn has_room(&self, bytes: usize) -> bool {
        let ctl = self.mem.ctl();
        let used = ctl.write.load(Ordering::Acquire).wrapping_sub(ctl.read.load(Ordering::Acquire));
        used > self.mem.cap as u64 || self.mem.cap - used as usize >= bytes
    }

    /// The ring's size in bytes.
    pub(crate) fn capacity(&self) -> usize {
        self.mem.cap
    }

    /// Sleeps until the reader makes room (or `timeout`), unless the word moved past `seen`.
    pub(crate) fn wait_for_room(&self, seen: u32, timeout: Duration) {
        futex::wait(&self.mem.ctl().consumed, seen, timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(cap: usize) -> (RingWriter, RingReader, Arc<Mapping>) {
        let map = Arc::new(Mapping::heap(cap, [0, 0]).unwrap());
        let (w, r) = ends(&map, 0);
        (w, r, map)
    }

    fn write_all(w: &mut RingWriter, src: &[u8]) -> usize {
        let mut pending = 0;
        let n = w.write(src, &mut pending).unwrap();
        w.publish(pending);
        n
    }

    fn read_all(r: &mut RingReader, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        let mut pending = 0;
        let n = r.read(&mut out, &mut pending).unwrap();
        r.consume(pending);
        out.truncate(n);
        out
    }

    #[test]
    fn bytes_wrap_around_the_end() {
        let (mut w, mut r, _map) = ring(4096);
        let mut expect = Vec::new();
        let mut got = Vec::new();
        // 3000-byte pieces through a 4096-byte ring: most of them wrap.
        for i in 0..20u32 {
            let piece: Vec<u8> = (0..3000u32).map(|b| (b * 7 + i) as u8).collect();
            assert_eq!(write_all(&mut w, &piece), 3000);
            expect.extend_from_slice(&piece);
            got.extend(read_all(&mut r, 3000));
        }
        assert_eq!(got, expect);
    }

    #[test]
    fn a_full_ring_takes_nothing_until_read() {
        let (mut w, mut r, _map) = ring(4096);
        assert_eq!(write_all(&mut w, &[1u8; 5000]), 4096);
        assert_eq!(w.free().unwrap(), 0);
        assert_eq!(write_all(&mut w, &[2u8; 10]), 0);
        assert_eq!(read_all(&mut r, 100), vec![1u8; 100]);
        assert_eq!(w.free().unwrap(), 100);
        assert_eq!(write_all(&mut w, &[3u8; 200]), 100);
        assert_eq!(read_all(&mut r, 5000).len(), 4096);
    }

    #[test]
    fn unpublished_bytes_are_not_seen() {
        let (mut w, r, _map) = ring(4096);
        let mut pending = 0;
        assert_eq!(w.write(&[9u8; 100], &mut pending).unwrap(), 100);
        assert_eq!(r.available().unwrap(), 0, "written but not published");
        w.publish(pending);
        assert_eq!(r.available().unwrap(), 100);
    }

    #[test]
    fn read_append_fills_spare_capacity_across_the_wrap() {
        let (mut w, mut r, _map) = ring(4096);
        write_all(&mut w, &[1u8; 3000]);
        assert_eq!(read_all(&mut r, 3000).len(), 3000);
        let piece: Vec<u8> = (0..2000u32).map(|b| b as u8).collect();
        write_all(&mut w, &piece);
        let mut out = Vec::with_capacity(2000);
        let mut pending = 0;
        assert_eq!(r.read_append(&mut out, 1500, &mut pending).unwrap(), 1500);
        assert_eq!(r.read_append(&mut out, 1500, &mut pending).unwrap(), 500, "capacity bounds it");
        r.consume(pending);
        assert_eq!(out, piece);
        assert_eq!(r.available().unwrap(), 0);
    }

    #[test]
    fn impossible_indices_are_corrupt() {
        let (w, r, map) = ring(4096);
        map.ring_ctl(0).write.store(5000, Ordering::SeqCst);
        assert!(r.available().is_err());
        map.ring_ctl(0).read.store(1, Ordering::SeqCst);
        assert!(w.free().is_err(), "read past the writer");
    }

    #[test]
    fn watched_words_move_when_the_other_side_acts() {
        let (mut w, mut r, map) = ring(4096);
        let watch = watch(&map, 0);
        let (data, room) = (watch.data_word(), watch.room_word());
        assert!(!watch.has_data());
        write_all(&mut w, &[0u8; 64]);
        assert!(watch.has_data());
        assert_ne!(watch.data_word(), data);
        read_all(&mut r, 64);
        assert!(!watch.has_data());
        assert_ne!(watch.room_word(), room);
        // So waits on the old values return at once.
        let t = std::time::Instant::now();
        watch.wait_for_room(room, Duration::from_secs(10));
        watch.wait_for_data(data, Duration::from_secs(10));
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
