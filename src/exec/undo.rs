//! [`Undo`]: what a call overwrote in the caller's buffer, saved just before each write,
//! so that a failed attempt can put the buffer back.
//!
//! The executor is the only writer of the caller's buffer during an attempt: every
//! received chunk it copies or reduces, a local copy or reduction, a coded chunk's
//! decoded values, the final division of an average. Each of those first hands the
//! bytes it is about to overwrite to [`Undo::save`], which keeps the first content of
//! each byte (a range saved once is not saved again, also across retries: the buffer
//! holds that same content again after [`Undo::restore`]).
//!
//! Before, the peer copied the whole buffer before every call. Now only what a call
//! writes is copied, and each chunk just before its write, when the copy or reduction
//! that follows reads it anyway. A root's broadcast or a sub-range write copies less
//! (16 MiB broadcast on shared memory, 1.16–1.28× faster here); an all-reduce writes
//! every byte and copies the same amount as before, in the same time within this
//! machine's noise. The copy itself is the price of the restore-on-error contract:
//! without it a 16 or 64 MiB shared-memory all-reduce ran 1.3–1.5× faster here
//! (`docs/PERF.md`, "What a call saves before it writes").

use std::ops::Range;

/// The saved bytes of one call's buffer; see the [module docs](self).
#[derive(Debug, Default)]
pub(crate) struct Undo {
    /// First content of the saved ranges, at their offsets in the buffer.
    saved: Vec<u8>,
    /// The saved byte ranges: sorted, disjoint, not adjacent.
    ranges: Vec<Range<usize>>,
    /// Length of the current call's buffer.
    len: usize,
    /// Calls in a row whose buffer was at most half of `saved`.
    idle: u32,
}

/// A kept allocation is let go after this many calls in a row that needed at most half
/// of it.
const IDLE_CALLS: u32 = 64;

impl Undo {
    /// Starts a call on a buffer of `len` bytes: forgets what the last call saved.
    ///
    /// The allocation is kept from call to call: a fresh one of a large buffer is a fresh
    /// mapping, which costs a page fault per page it touches. It is replaced by a smaller
    /// one after [`IDLE_CALLS`] calls in a row that needed at most half of it, so a peer
    /// does not hold the saved copy of a large buffer it no longer uses. A fresh
    /// allocation is zeroed memory from the allocator (`calloc`): its pages cost nothing
    /// until a save touches them.
    pub(crate) fn begin(&mut self, len: usize) {
        self.ranges.clear();
        self.len = len;
        if len > self.saved.len() {
            self.saved = vec![0; len];
            self.idle = 0;
        } else if len <= self.saved.len() / 2 {
            self.idle += 1;
            if self.idle >= IDLE_CALLS {
                self.saved = vec![0; len];
                self.idle = 0;
            }
        } else {
            self.idle = 0;
        }
    }

    /// Saves the bytes of `current`, the buffer's bytes at offset `at`, that no earlier
    /// save of this call covered. Bytes outside the buffer [`Undo::begin`] announced are
    /// ignored (the executor checks its ranges against the buffer first).
    pub(crate) fn save(&mut self, at: usize, current: &[u8]) {
        let end = (at + current.len()).min(self.len);
        let mut from = at;
        // The first saved range that ends at or after `from`.
        let mut i = self.ranges.partition_point(|r| r.end < from);
        while from < end {
            let gap_end = match self.ranges.get(i) {
                Some(r) if r.start <= from => {
                    from = r.end;
                    i += 1;
                    continue;
                }
                Some(r) => r.start.min(end),
                None => end,
            };
            copy_streaming(&mut self.saved[from..gap_end], &current[from - at..gap_end - at]);
            self.insert(from..gap_end);
            i = self.ranges.partition_point(|r| r.end < gap_end);
            from = gap_end;
        }
    }

    /// Records `r` as saved, merging it with the ranges it touches.
    fn insert(&mut self, r: Range<usize>) {
        let first = self.ranges.partition_point(|s| s.end < r.start);
        let last = self.ranges.partition_point(|s| s.start <= r.end);
        let merged =
            if first < last { self.ranges[first].start.min(r.start)..self.ranges[last - 1].end.max(r.end) } else { r };
        self.ranges.splice(first..last, [merged]);
    }

    /// Puts the saved bytes back into `buf`. They stay saved: `buf` holds them again, so
    /// a retry that overwrites them keeps the same first content.
    pub(crate) fn restore(&self, buf: &mut [u8]) {
        for r in &self.ranges {
            if r.end <= buf.len() {
                buf[r.clone()].copy_from_slice(&self.saved[r.clone()]);
            }
        }
    }

    /// How many bytes this call has saved.
    #[cfg(test)]
    pub(crate) fn saved_bytes(&self) -> usize {
        self.ranges.iter().map(|r| r.len()).sum()
    }
}

/// Copies `src` into `dst` (of the same length: a mismatch panics, as with
/// `copy_from_slice`), writing around the caches where the
/// platform can: the saved bytes are read again only after a failure, so a normal copy
/// would only evict the chunks the executor is working on, and pay to read each
/// destination line before writing it. A chunk saved and then reduced ran 1.3× faster
/// this way on the 2-vCPU Xeon (`docs/PERF.md`, "What a call saves before it writes").
fn copy_streaming(dst: &mut [u8], src: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    if dst.len() >= STREAMING_MIN {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        // The caller passes equal lengths (`save`); this makes `src` exactly as long.
        let src = &src[..dst.len()];
        let len = dst.len();
        // Non-temporal stores need 16-byte aligned destinations: a plain copy does the
        // bytes before the first aligned one and after the last whole 16.
        let head = dst.as_ptr().align_offset(16).min(len);
        let body = (len - head) / 16 * 16;
        dst[..head].copy_from_slice(&src[..head]);
        // SAFETY: SSE2 is part of the x86_64 baseline, so the intrinsics exist on every
        // CPU this code runs on. `dst[head..head + body]` and `src[head..head + body]` are
        // in bounds (`head + body <= len`), `dst + head` is 16-byte aligned (as
        // `_mm_stream_si128` requires) and every store is 16 bytes at a multiple of 16
        // from it; loads are unaligned. `dst` is borrowed mutably and `src` shared, so
        // they do not overlap. The fence orders the streaming stores before whatever
        // follows (a restore may run on another thread after this task moves).
        unsafe {
            let d = dst.as_mut_ptr().add(head).cast::<__m128i>();
            let s = src.as_ptr().add(head).cast::<__m128i>();
            for i in 0..body / 16 {
                _mm_stream_si128(d.add(i), _mm_loadu_si128(s.add(i)));
            }
            _mm_sfence();
        }
        dst[head + body..].copy_from_slice(&src[head + body..]);
        return;
    }
    dst.copy_from_slice(src);
}

/// Copies shorter than this are plain copies: small enough to stay in cache anyway.
const STREAMING_MIN: usize = 16 << 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streaming_copy_copies_every_byte_whatever_the_alignment() {
        let src: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 251) as u8).collect();
        for (at, len) in [(0, 100_000), (1, 70_001), (7, STREAMING_MIN), (15, STREAMING_MIN + 17), (3, 100)] {
            let mut dst = vec![0u8; 100_016];
            copy_streaming(&mut dst[at..at + len], &src[..len]);
            assert_eq!(&dst[at..at + len], &src[..len], "at {at}, len {len}");
            assert!(dst[..at].iter().chain(&dst[at + len..]).all(|&b| b == 0), "nothing outside, at {at}");
        }
    }

    #[test]
    fn each_byte_keeps_its_first_content_and_only_saved_bytes_are_restored() {
        let original: Vec<u8> = (0..100).collect();
        let mut buf = original.clone();
        let mut undo = Undo::default();
        undo.begin(buf.len());
        // Out of order, overlapping, adjacent.
        for (at, len) in [(40, 10), (10, 5), (45, 20), (15, 5), (0, 3), (60, 10)] {
            undo.save(at, &buf[at..at + len]);
            buf[at..at + len].fill(0xee);
        }
        assert_eq!(undo.ranges, vec![0..3, 10..20, 40..70]);
        assert_eq!(undo.saved_bytes(), 3 + 10 + 30);
        // A byte written without a save (a bug the executor must not have) stays written:
        // restore touches only what was saved.
        buf[80] = 0xee;
        undo.restore(&mut buf);
        let mut want = original.clone();
        want[80] = 0xee;
        assert_eq!(buf, want);
    }

    #[test]
    fn a_retry_after_restore_keeps_the_first_content_and_begin_forgets_it() {
        let mut buf = vec![7u8; 64];
        let mut undo = Undo::default();
        undo.begin(64);
        undo.save(0, &buf[..32]);
        buf[..32].fill(1);
        undo.restore(&mut buf);
        assert_eq!(buf, vec![7; 64]);
        // Second attempt: the range is saved already; the restore still gives 7s.
        undo.save(0, &buf[..64]);
        buf.fill(2);
        undo.restore(&mut buf);
        assert_eq!(buf, vec![7; 64]);
        // A new call saves afresh.
        buf.fill(3);
        undo.begin(64);
        assert_eq!(undo.saved_bytes(), 0);
        undo.save(8, &buf[8..16]);
        buf[8..16].fill(4);
        undo.restore(&mut buf);
        assert_eq!(buf, vec![3; 64]);
    }

    #[test]
    fn the_allocation_is_kept_and_let_go_after_idle_calls() {
        let mut undo = Undo::default();
        undo.begin(1 << 20);
        let at = undo.saved.as_ptr();
        undo.begin(600 << 10);
        assert_eq!(undo.saved.as_ptr(), at, "more than half: kept");
        for _ in 0..IDLE_CALLS - 1 {
            undo.begin(4096);
        }
        assert_eq!(undo.saved.len(), 1 << 20, "still kept");
        undo.begin(4096);
        assert_eq!(undo.saved.len(), 4096, "let go after {IDLE_CALLS} small calls");
    }

    #[test]
    fn saves_past_the_announced_length_are_ignored() {
        let mut undo = Undo::default();
        undo.begin(10);
        undo.save(8, &[1, 2, 3, 4]);
        assert_eq!(undo.ranges, vec![8..10]);
        undo.save(20, &[1]);
        assert_eq!(undo.saved_bytes(), 2);
    }
}
