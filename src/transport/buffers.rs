//! [`BufferPool`]: the large frame buffers a link reuses.
//!
//! A fresh allocation of a large payload (the executor's 256 KiB chunks) is, with glibc's
//! allocator, a fresh mapping, faulted in page by page on its first write and unmapped
//! when freed: in `perf`, about a tenth of a shared-memory or TCP all-reduce's CPU went
//! to those faults. A link instead reads each large frame it receives into a buffer of
//! its pool, which the frame gives back when its last [`Bytes`] is dropped; a TLS link
//! also seals the chunks it sends in pooled buffers, which it takes back once they are
//! on the socket. A frame someone holds keeps its buffer; the pool only
//! gets back what is let go, and keeps at most a byte budget of free buffers.
//!
//! A receiving link's pool needs about as many buffers as frames are out at once: the
//! demultiplexer queues up to [`DEFAULT_QUEUE_FRAMES`](super::demux::DEFAULT_QUEUE_FRAMES)
//! per collective (4 MiB of 256 KiB chunks), the read task holds one and the executor one
//! or two. With a pool of 4 buffers, most frames of a 16 MiB shared-memory all-reduce
//! were fresh mappings (75 % of the run's page faults; `docs/PERF.md`).
//! [`RECEIVE_POOL_BYTES`] covers that. A pool holds free buffers only up to what was
//! out at once, so its budget is a cap, not a reservation.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Buffers of at least this many bytes are pooled; smaller ones come from the allocator,
/// which serves them from its free lists without new mappings.
pub(crate) const POOLED_BYTES: usize = 64 << 10;

/// The free bytes a receiving link's pool keeps at most: the default demultiplexer
/// queue's 4 MiB, the frames in the read task and the executor's hands, and room for a
/// larger queue.
pub(crate) const RECEIVE_POOL_BYTES: usize = 8 << 20;

/// Large frame buffers for reuse; see the [module docs](self).
#[derive(Debug)]
pub(crate) struct BufferPool {
    free: Mutex<Free>,
    keep_bytes: usize,
}

/// The free buffers and their total capacity.
#[derive(Debug, Default)]
struct Free {
    buffers: Vec<Vec<u8>>,
    bytes: usize,
}

impl BufferPool {
    /// A pool that keeps free buffers of at most `keep_bytes` in all.
    pub(crate) fn new(keep_bytes: usize) -> Arc<BufferPool> {
        Arc::new(BufferPool { free: Mutex::new(Free::default()), keep_bytes })
    }

    /// An empty buffer with room for `len` bytes: a free one that is large enough, or a
    /// new one (a free one that is too small is let go, so the pool follows the sizes).
    pub(crate) fn take(&self, len: usize) -> Vec<u8> {
        if len >= POOLED_BYTES {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(mut buf) = free.buffers.pop() {
                free.bytes -= buf.capacity();
                drop(free);
                if buf.capacity() >= len {
                    buf.clear();
                    return buf;
                }
            }
        }
        Vec::with_capacity(len)
    }

    /// Takes `buf` back for a later [`BufferPool::take`], if it is large and the pool
    /// has room.
    pub(crate) fn give(&self, buf: Vec<u8>) {
        if buf.capacity() < POOLED_BYTES {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.bytes + buf.capacity() <= self.keep_bytes {
            free.bytes += buf.capacity();
            free.buffers.push(buf);
        }
    }

    /// How many free buffers the pool holds.
    #[cfg(test)]
    pub(crate) fn free_count(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).buffers.len()
    }

    /// `buf` as a frame payload: a large one gives its buffer back to this pool when the
    /// payload's last [`Bytes`] drops.
    pub(crate) fn bytes(self: &Arc<BufferPool>, buf: Vec<u8>) -> Bytes {
        if buf.capacity() >= POOLED_BYTES {
            Bytes::from_owner(Pooled { buf, pool: self.clone() })
        } else {
            Bytes::from(buf)
        }
    }
}

/// A payload in a pooled buffer, given back when its last `Bytes` drops.
struct Pooled {
    buf: Vec<u8>,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_payload_gives_its_buffer_back_and_a_held_one_keeps_it() {
        let pool = BufferPool::new(2 * 100_000);
        let mut first = pool.take(100_000);
        first.extend_from_slice(&[7; 100_000]);
        let held = pool.bytes(first);
        let second = pool.bytes(pool.take(100_000));
        assert_ne!(held.as_ptr(), second.as_ptr());
        let at = second.as_ptr();
        drop(second);
        let third = pool.take(90_000);
        assert_eq!(third.as_ptr(), at, "the dropped payload's buffer is reused");
        assert!(held.iter().all(|&b| b == 7), "a held payload is never reused");
    }

    #[test]
    fn small_buffers_and_what_exceeds_the_budget_are_let_go() {
        let pool = BufferPool::new(POOLED_BYTES + POOLED_BYTES / 2);
        pool.give(Vec::with_capacity(100));
        assert_eq!(pool.free_count(), 0);
        pool.give(Vec::with_capacity(POOLED_BYTES));
        pool.give(Vec::with_capacity(POOLED_BYTES));
        assert_eq!(pool.free_count(), 1, "a second buffer would exceed the budget");
        // Too small for the request: let go, and a new one is made.
        assert!(pool.take(2 * POOLED_BYTES).capacity() >= 2 * POOLED_BYTES);
        assert_eq!(pool.free_count(), 0);
        assert_eq!(pool.free.lock().unwrap().bytes, 0);
    }

    #[test]
    fn a_pool_keeps_as_many_buffers_as_were_out_at_once_within_its_budget() {
        let pool = BufferPool::new(RECEIVE_POOL_BYTES);
        let chunk = 256 << 10;
        let out: Vec<Bytes> = (0..20).map(|_| pool.bytes(pool.take(chunk))).collect();
        drop(out);
        assert_eq!(pool.free_count(), 20, "a queue of 16 frames and a few in hand are all kept");
        let again: Vec<Bytes> = (0..40).map(|_| pool.bytes(pool.take(chunk))).collect();
        drop(again);
        assert_eq!(pool.free_count(), RECEIVE_POOL_BYTES / chunk, "capped by the budget");
    }
}
