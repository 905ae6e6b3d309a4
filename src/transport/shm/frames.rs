//! Frames on a ring: [`Header::encode`] (32 bytes), the payload length (u64,
//! little-endian), the payload; written and read piece by piece, so a frame of any size
//! (up to the receiver's limit) crosses a ring of any size, and only a whole frame is
//! ever handed on.

use std::sync::Arc;

use bytes::Bytes;

use super::ring::{Corrupt, RingReader, RingWriter};
use crate::transport::buffers::{BufferPool, POOLED_BYTES, RECEIVE_POOL_BYTES};
use crate::transport::{decode_prefix, encode_prefix, prefix_of, Frame, Header, LinkError, PREFIX_LEN};

/// A frame being written into a ring: its payload owned ([`Bytes`], the default) or
/// borrowed from the caller (`&[u8]`, see `Link::send_slice`).
pub(crate) struct OutFrame<P = Bytes> {
    prefix: [u8; PREFIX_LEN],
    payload: P,
    /// Bytes of prefix and payload in the ring so far.
    pos: usize,
}

impl OutFrame {
    pub(crate) fn new(frame: Frame) -> OutFrame {
        OutFrame { prefix: encode_prefix(&frame), payload: frame.payload, pos: 0 }
    }
}

impl<'a> OutFrame<&'a [u8]> {
    /// A frame whose payload is read from `payload` as it is written.
    pub(crate) fn borrowed(header: &Header, payload: &'a [u8]) -> OutFrame<&'a [u8]> {
        OutFrame { prefix: prefix_of(header, payload.len()), payload, pos: 0 }
    }

    /// The same frame, written as far as it is, with its payload copied: for a writer
    /// that cannot finish it while the caller's bytes are lent.
    pub(crate) fn into_owned(self) -> OutFrame {
        OutFrame { prefix: self.prefix, payload: Bytes::copy_from_slice(self.payload), pos: self.pos }
    }
}

impl<P: AsRef<[u8]>> OutFrame<P> {
    /// Whether none of the frame is in the ring yet.
    pub(crate) fn is_unstarted(&self) -> bool {
        self.pos == 0
    }

    /// Writes as much of the rest of the frame as fits and publishes it. Returns the
    /// bytes written and whether the whole frame is now in the ring.
    pub(crate) fn write_to(&mut self, ring: &mut RingWriter) -> Result<(usize, bool), Corrupt> {
        let mut pending = 0;
        if self.pos < PREFIX_LEN {
            self.pos += ring.write(&self.prefix[self.pos..], &mut pending)?;
        }
        if self.pos >= PREFIX_LEN {
            self.pos += ring.write(&self.payload.as_ref()[self.pos - PREFIX_LEN..], &mut pending)?;
        }
        ring.publish(pending);
        Ok((pending, self.pos == PREFIX_LEN + self.payload.as_ref().len()))
    }
}

/// A frame being read out of a ring.
pub(crate) struct InFrame {
    prefix: [u8; PREFIX_LEN],
    /// Prefix bytes read so far.
    have: usize,
    /// Once the prefix is in: the header, the payload length and the bytes read so far
    /// (in a buffer of that capacity).
    body: Option<(Header, usize, Vec<u8>)>,
    max_frame_bytes: usize,
    /// Large payloads are read into its buffers (see [`BufferPool`]).
    buffers: Arc<BufferPool>,
}

impl InFrame {
    /// Reads frames of at most `max_frame_bytes` (header included).
    pub(crate) fn new(max_frame_bytes: usize) -> InFrame {
        InFrame {
            prefix: [0; PREFIX_LEN],
            have: 0,
            body: None,
            max_frame_bytes,
            buffers: BufferPool::new(RECEIVE_POOL_BYTES),
        }
    }

    /// Whether part of a frame has been read.
    pub(crate) fn is_partial(&self) -> bool {
        self.have > 0
    }

    /// Reads what is published of the current frame and gives its room back. Returns
    /// the bytes read and the frame once it is whole; a length above the limit fails.
    pub(crate) fn read_from(&mut self, ring: &mut RingReader) -> Result<(usize, Option<Frame>), LinkError> {
        let corrupt = |c: Corrupt| LinkError::Malformed(format!("shared-memory ring: {}", c.0));
        let mut pending = 0;
        // Bytes of a frame whose payload was lent (its prefix consumed, its payload not).
        let mut lent = 0;
        let result = (|| {
            if self.have < PREFIX_LEN {
                self.have += ring.read(&mut self.prefix[self.have..], &mut pending).map_err(corrupt)?;
                if self.have < PREFIX_LEN {
                    return Ok(None);
                }
                let (header, len) = decode_prefix(&self.prefix, self.max_frame_bytes)?;
                // A large payload that is all there, in one piece, is lent straight
                // out of the ring (see `super::loan`); anything else is copied.
                if len >= POOLED_BYTES {
                    if let Some(payload) = ring.lend(&mut pending, len).map_err(corrupt)? {
                        self.have = 0;
                        lent = PREFIX_LEN + len;
                        return Ok(Some(Frame { header, payload }));
                    }
                }
                // Filled by copies, never zeroed.
                self.body = Some((header, len, self.buffers.take(len)));
            }
            let Some((_, len, payload)) = self.body.as_mut() else {
                return Err(LinkError::Malformed("frame body missing".into()));
            };
            let want = *len - payload.len();
            ring.read_append(payload, want, &mut pending).map_err(corrupt)?;
            if payload.len() < *len {
                return Ok(None);
            }
            let (header, _, payload) = self.body.take().ok_or_else(|| LinkError::Malformed("frame body".into()))?;
            self.have = 0;
            Ok(Some(Frame { header, payload: self.buffers.bytes(payload) }))
        })();
        ring.consume(pending);
        result.map(|frame| (pending + lent, frame))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::transport::shm::ring::{ends, RingWriter};
    use crate::transport::shm::segment::Mapping;

    fn frame(i: u64, len: usize) -> Frame {
        let payload: Vec<u8> = (0..len).map(|b| (b as u64 * 13 + i) as u8).collect();
        Frame { header: Header { epoch: i, seq: 2 * i, call: 3, index: i }, payload: Bytes::from(payload) }
    }

    /// Pushes `frames` through a ring of `cap` bytes, alternating writer and reader on
    /// one thread, and returns what came out.
    fn through(cap: usize, frames: &[Frame], max: usize) -> Result<Vec<Frame>, LinkError> {
        let map = Arc::new(Mapping::heap(cap, [0, 0]).unwrap());
        let (mut w, _) = ends(&map, 0);
        let (_, mut r) = ends(&map, 0);
        let mut out = Vec::new();
        let mut reading = InFrame::new(max);
        for f in frames {
            let mut sending = OutFrame::new(f.clone());
            loop {
                let (_, done) = sending.write_to(&mut w).unwrap();
                loop {
                    let (n, got) = reading.read_from(&mut r)?;
                    out.extend(got);
                    if n == 0 {
                        break;
                    }
                }
                if done {
                    break;
                }
            }
        }
        assert!(!reading.is_partial());
        Ok(out)
    }

    #[test]
    fn frames_larger_than_the_ring_are_split() {
        let frames: Vec<Frame> = [0usize, 1, 40, 4095, 4096, 100_000, 7].iter().map(|&l| frame(l as u64, l)).collect();
        assert_eq!(through(4096, &frames, 1 << 20).unwrap(), frames);
    }

    #[test]
    fn many_small_frames_wrap() {
        let frames: Vec<Frame> = (0..500).map(|i| frame(i, (i as usize * 37) % 300)).collect();
        assert_eq!(through(4096, &frames, 1 << 20).unwrap(), frames);
    }

    #[test]
    fn large_payloads_reuse_the_buffers_of_dropped_frames_and_never_a_held_one() {
        // Frames larger than the ring cross it in pieces: copied, into pooled buffers.
        let map = Arc::new(Mapping::heap(128 << 10, [0, 0]).unwrap());
        let (mut w, mut r) = ends(&map, 0);
        let mut reading = InFrame::new(1 << 20);
        let mut next = |i: u64| {
            let sent = frame(i, 200 << 10);
            let mut sending = OutFrame::new(sent.clone());
            loop {
                let (_, done) = sending.write_to(&mut w).unwrap();
                if let (_, Some(got)) = reading.read_from(&mut r).unwrap() {
                    assert!(done);
                    assert_eq!(got, sent);
                    return got;
                }
            }
        };
        let held = next(1);
        let second = next(2);
        assert_ne!(held.payload.as_ptr(), second.payload.as_ptr(), "a held frame's buffer is not reused");
        let at = second.payload.as_ptr();
        drop(second);
        let third = next(3);
        assert_eq!(third.payload.as_ptr(), at, "a dropped frame's buffer is reused");
        assert_eq!(held, frame(1, 200 << 10), "the held frame is intact");
    }

    /// Large payloads that are whole and in one piece are lent from the ring: the
    /// writer gets their room back only when they are dropped, in ring order, and a
    /// lent payload stays intact while the writer fills the rest of the ring.
    #[test]
    fn payloads_lent_from_the_ring_keep_their_room_until_dropped() {
        let cap = 1 << 20;
        let map = Arc::new(Mapping::heap(cap, [0, 0]).unwrap());
        let (mut w, mut r) = ends(&map, 0);
        let watch = crate::transport::shm::ring::watch_reading(&r);
        let loans = r.loans();
        let mut reading = InFrame::new(cap);
        let data = map.ring_data(0) as usize..map.ring_data(0) as usize + cap;
        let mut next = |w: &mut RingWriter, f: &Frame| {
            assert!(OutFrame::new(f.clone()).write_to(w).unwrap().1);
            reading.read_from(&mut r).unwrap().1.unwrap()
        };
        let (a, b, c) = (frame(1, 300 << 10), frame(2, 300 << 10), frame(3, 100));
        let got_a = next(&mut w, &a);
        let got_b = next(&mut w, &b);
        let got_c = next(&mut w, &c);
        assert!(data.contains(&(got_a.payload.as_ptr() as usize)), "a is lent from the ring");
        assert!(data.contains(&(got_b.payload.as_ptr() as usize)), "b is lent from the ring");
        assert!(!data.contains(&(got_c.payload.as_ptr() as usize)), "a small payload is copied");
        assert_eq!((loans.out(), watch.has_data()), (2, false), "all read, two payloads out");
        let used = |w: &RingWriter| cap - w.free().unwrap();
        // a's prefix came back when it was read (no loan before it); from a's payload on,
        // nothing while a is out.
        let all = 2 * PREFIX_LEN + (600 << 10) + 100;
        assert_eq!(used(&w), all, "nothing given back while a is out");
        drop(got_b);
        assert_eq!(used(&w), all, "b's room waits for a, which comes before it");
        // The writer fills what is free; a's bytes do not move.
        let filler = frame(4, cap - all - PREFIX_LEN);
        assert!(OutFrame::new(filler.clone()).write_to(&mut w).unwrap().1);
        assert_eq!(w.free().unwrap(), 0);
        assert_eq!(got_a, a, "a lent payload is intact while the writer fills the ring");
        drop(got_a);
        assert_eq!(used(&w), PREFIX_LEN + filler.payload.len(), "a, b and c given back at once");
        assert_eq!(loans.out(), 0);
        assert!(watch.has_data(), "the filler is waiting");
        assert_eq!(reading.read_from(&mut r).unwrap().1.unwrap(), filler);
        assert_eq!(got_c, c);
    }

    #[test]
    fn a_length_over_the_limit_is_refused() {
        let err = through(4096, &[frame(1, 200)], Header::LEN + 100).unwrap_err();
        assert_eq!(err, LinkError::FrameTooLarge { len: Header::LEN + 200, limit: Header::LEN + 100 });
    }

    #[test]
    fn a_half_written_frame_is_never_handed_on() {
        let map = Arc::new(Mapping::heap(4096, [0, 0]).unwrap());
        let (mut w, mut r) = ends(&map, 0);
        // The writer "dies" after 3000 of the frame's bytes are published.
        let mut sending = OutFrame::new(frame(1, 10_000));
        let (n, done) = sending.write_to(&mut w).unwrap();
        assert!(!done && n == 4096);
        let mut reading = InFrame::new(1 << 20);
        assert_eq!(reading.read_from(&mut r).unwrap(), (4096, None));
        assert_eq!(reading.read_from(&mut r).unwrap(), (0, None));
        assert!(reading.is_partial());
    }
}
