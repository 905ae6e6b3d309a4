//! TLS links after the handshake: frames sealed in place with the session's keys.
//!
//! rustls authenticates the connection and agrees its keys (TLS 1.3); then, as kernel
//! TLS does, the link takes the traffic secrets out of rustls
//! (`dangerous_extract_secrets`) and seals and opens its records itself, in the
//! link's own buffers. rustls would copy every byte once more on each side (plaintext
//! into its record buffer on send, out of its deframer on receive); here a large
//! payload is sealed where the executor left it and opened where the socket put it.
//!
//! The protection is TLS 1.3's: AES-GCM (or ChaCha20-Poly1305, whichever suite the
//! handshake chose) with each direction's key, the nonce its IV XOR the record's
//! sequence number, continued from where rustls left off, so no nonce is used twice
//! under one key. A record is `u32` ciphertext length (little-endian), ciphertext,
//! 16-byte tag; the length is the additional data, so it cannot be changed, and a
//! dropped, reordered, replayed or altered record fails to open (the sequence number
//! no longer matches) and takes the link down. A frame is one record when its payload
//! is small (prefix and payload together), else two (the prefix, then the payload).

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::frames::{fill, mid_frame, read_exactly, Chunk, FrameReader, ReadAhead, SMALL_PAYLOAD};
use super::TcpError;
use crate::transport::buffers::{BufferPool, RECEIVE_POOL_BYTES};
use crate::transport::{decode_prefix, Frame, LinkError, PREFIX_LEN};

/// The AEAD tag after each record's ciphertext.
pub(super) const TAG_LEN: usize = 16;
/// The record's length prefix.
const HEAD_LEN: usize = 4;

/// One direction's key, IV and next sequence number.
struct Direction {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl Direction {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Result<Direction, TcpError> {
        let (alg, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&aead::CHACHA20_POLY1305, key, iv),
            _ => return Err(TcpError::Setup("the TLS handshake chose a cipher suite links cannot seal".into())),
        };
        let key =
            UnboundKey::new(alg, key.as_ref()).map_err(|_| TcpError::Setup("a TLS key of the wrong size".into()))?;
        let iv = iv.as_ref().try_into().map_err(|_| TcpError::Setup("a TLS IV of the wrong size".into()))?;
        Ok(Direction { key: LessSafeKey::new(key), iv, seq })
    }

    /// The next record's nonce (TLS 1.3: the IV XOR the sequence number).
    fn nonce(&mut self) -> Result<Nonce, &'static str> {
        let mut n = self.iv;
        for (b, s) in n[NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq = self.seq.checked_add(1).ok_or("the record sequence number ran out")?;
        Ok(Nonce::assume_unique_for_key(n))
    }
}

/// Seals the records this end sends.
pub(super) struct Sealer(Direction);

/// Opens the records this end receives.
pub(super) struct Opener(Direction);

/// The sealer and opener of a connection whose handshake is complete.
pub(super) fn keys(secrets: ExtractedSecrets) -> Result<(Sealer, Opener), TcpError> {
    Ok((Sealer(Direction::new(secrets.tx)?), Opener(Direction::new(secrets.rx)?)))
}

impl Sealer {
    /// Seals `data` in place; returns the record's length prefix and tag.
    pub(super) fn seal(&mut self, data: &mut [u8]) -> std::io::Result<([u8; HEAD_LEN], [u8; TAG_LEN])> {
        let bad = |why: &str| std::io::Error::other(why.to_string());
        let len = u32::try_from(data.len() + TAG_LEN).map_err(|_| bad("a record above 4 GiB"))?;
        let head = len.to_le_bytes();
        let nonce = self.0.nonce().map_err(bad)?;
        let tag =
            self.0.key.seal_in_place_separate_tag(nonce, Aad::from(head), data).map_err(|_| bad("sealing failed"))?;
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Ok((head, out))
    }
}

impl Opener {
    /// Opens `record` (ciphertext and tag, after the length prefix `head`) in place and
    /// cuts it to its plaintext.
    pub(super) fn open(&mut self, head: [u8; HEAD_LEN], record: &mut Chunk) -> Result<(), LinkError> {
        let nonce = self.0.nonce().map_err(|e| LinkError::Closed(e.into()))?;
        let plain = self.0.key.open_in_place(nonce, Aad::from(head), record).map_err(|_| {
            LinkError::Closed(
                "a record failed authentication: the connection was altered, or is not this session's".into(),
            )
        })?;
        let n = plain.len();
        record.truncate(n);
        Ok(())
    }
}

/// Writes sealed records during the setup (the server's acknowledgement), before the
/// link's [`Writer`](super::writer::Writer) takes the half and the sealer.
pub(super) struct SealedWriter<W> {
    write: W,
    sealer: Sealer,
}

impl<W> SealedWriter<W> {
    pub(super) fn new(write: W, sealer: Sealer) -> SealedWriter<W> {
        SealedWriter { write, sealer }
    }

    /// The connection's half and the sealer, for the link's [`Writer`](super::writer::Writer).
    pub(super) fn into_parts(self) -> (W, Sealer) {
        (self.write, self.sealer)
    }
}

impl<W: AsyncWrite + Unpin + Send + 'static> SealedWriter<W> {
    /// Writes one record of `data` (sealed in place) without flushing.
    async fn record(&mut self, data: &mut [u8]) -> std::io::Result<()> {
        let (head, tag) = self.sealer.seal(data)?;
        let mut bytes = Buf::chain(Buf::chain(&head[..], &data[..]), &tag[..]);
        self.write.write_all_buf(&mut bytes).await
    }

    /// Writes `data` as one record and flushes: the setup's acknowledgement.
    pub(super) async fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        let mut data = data.to_vec();
        self.record(&mut data).await?;
        self.write.flush().await
    }
}

/// Reads frames from sealed records; see the module docs.
pub(super) struct SealedReader<R> {
    read: R,
    opener: Opener,
    buf: BytesMut,
    pool: Arc<BufferPool>,
    ahead: ReadAhead,
}

impl<R: AsyncRead + Unpin + Send + 'static> SealedReader<R> {
    pub(super) fn new(read: R, opener: Opener) -> SealedReader<R> {
        SealedReader {
            read,
            opener,
            buf: BytesMut::with_capacity(super::frames::READ_CHUNK),
            pool: BufferPool::new(RECEIVE_POOL_BYTES),
            ahead: ReadAhead::Buffered,
        }
    }

    /// Reads and opens the next record of at most `max` plaintext bytes.
    pub(super) async fn record(&mut self, max: usize) -> Result<Chunk, LinkError> {
        fill(&mut self.read, &mut self.buf, HEAD_LEN, self.ahead).await?;
        let mut head = [0u8; HEAD_LEN];
        head.copy_from_slice(&self.buf.split_to(HEAD_LEN));
        let len = u32::from_le_bytes(head) as usize;
        if !(TAG_LEN..=max.saturating_add(TAG_LEN)).contains(&len) {
            return Err(LinkError::Closed(format!("a record of {len} bytes (at most {} here)", max + TAG_LEN)));
        }
        let mut record =
            read_exactly(&mut self.read, &mut self.buf, len, &self.pool, self.ahead).await.map_err(mid_frame)?;
        self.opener.open(head, &mut record)?;
        Ok(record)
    }
}

impl<R: AsyncRead + Unpin + Send + 'static> FrameReader for SealedReader<R> {
    async fn read_frame(&mut self, max_frame_bytes: usize) -> Result<Frame, LinkError> {
        let mut first = self.record(PREFIX_LEN + SMALL_PAYLOAD).await?.into_bytes_mut();
        if first.len() < PREFIX_LEN {
            return Err(LinkError::Closed(format!("a record of {} bytes where a frame begins", first.len())));
        }
        let prefix = first.split_to(PREFIX_LEN);
        let (header, len) = decode_prefix(&prefix, max_frame_bytes)?;
        let payload = if !first.is_empty() || len == 0 {
            first.freeze()
        } else {
            self.record(len).await.map_err(mid_frame)?.into_bytes(&self.pool)
        };
        if payload.len() != len {
            return Err(LinkError::Closed(format!("a frame of {len} bytes came with {}", payload.len())));
        }
        self.ahead = ReadAhead::after(len);
        Ok(Frame { header, payload })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(suite: fn(&[u8]) -> ConnectionTrafficSecrets) -> (Sealer, Opener) {
        let d = |seq, k: &[u8]| Direction::new((seq, suite(k))).unwrap();
        (Sealer(d(5, &[1; 32])), Opener(d(5, &[1; 32])))
    }

    fn key(k: &[u8]) -> [u8; 32] {
        k.try_into().unwrap()
    }

    // rustls makes 32-byte keys only from outside (AES-128's come from a handshake,
    // which the link tests run): AES-256-GCM and ChaCha20-Poly1305 here.
    fn aes256(k: &[u8]) -> ConnectionTrafficSecrets {
        ConnectionTrafficSecrets::Aes256Gcm { key: key(k).into(), iv: [7u8; 12].into() }
    }

    fn chacha(k: &[u8]) -> ConnectionTrafficSecrets {
        ConnectionTrafficSecrets::Chacha20Poly1305 { key: key(k).into(), iv: [7u8; 12].into() }
    }

    fn record(s: &mut Sealer, data: &[u8]) -> ([u8; HEAD_LEN], Chunk) {
        let mut d = data.to_vec();
        let (head, tag) = s.seal(&mut d).unwrap();
        d.extend_from_slice(&tag);
        (head, Chunk::Own(d))
    }

    #[test]
    fn records_open_in_order_and_only_unaltered() {
        for suite in [aes256 as fn(&[u8]) -> ConnectionTrafficSecrets, chacha] {
            let (mut s, mut o) = pair(suite);
            let (h1, mut r1) = record(&mut s, b"first frame");
            assert_ne!(&r1[..11], b"first frame", "sealed, not plain");
            assert_eq!(u32::from_le_bytes(h1) as usize, 11 + TAG_LEN);
            let (h2, r2) = record(&mut s, b"second");
            o.open(h1, &mut r1).unwrap();
            assert_eq!(&r1[..], b"first frame");
            // Altered ciphertext, an altered length, a replay: none opens.
            let (mut o2, mut o3) = (pair(suite).1, pair(suite).1);
            let mut bad = r2.clone();
            bad[0] ^= 1;
            assert!(o.open(h2, &mut bad).is_err());
            let (_, mut fresh) = record(&mut pair(suite).0, b"first frame");
            assert!(o2.open([0, 0, 0, 0], &mut fresh).is_err(), "the length is authenticated");
            let (h, mut first) = record(&mut pair(suite).0, b"first frame");
            o3.open(h, &mut first).unwrap();
            let (h, mut again) = record(&mut pair(suite).0, b"first frame");
            assert!(o3.open(h, &mut again).is_err(), "a replayed record (its sequence number passed)");
        }
    }

    /// A sealed reader, like the plain one, reads no further than it needs after a large
    /// frame (`frames::ReadAhead`), and opens every frame whole.
    #[tokio::test]
    async fn after_a_large_frame_the_sealed_reader_reads_no_further_than_it_needs() {
        use super::super::frames::tests::{header, payload, reads_no_further_than_needed, SIZES};
        use crate::transport::prefix_of;
        let (mut sealer, _) = pair(aes256);
        // As the link's writer lays frames out: one record when small, else the prefix's
        // and the payload's. A frame's span runs up to its payload's ciphertext.
        let (mut stream, mut spans) = (Vec::new(), Vec::new());
        for (i, &len) in SIZES.iter().enumerate() {
            let (start, prefix) = (stream.len(), prefix_of(&header(i), len));
            let mut put = |data: &[u8], stream: &mut Vec<u8>| {
                let (head, body) = record(&mut sealer, data);
                stream.extend_from_slice(&head);
                stream.extend_from_slice(&body);
            };
            if len <= SMALL_PAYLOAD {
                put(&[&prefix[..], &payload(i, len)].concat(), &mut stream);
                spans.push(start..stream.len());
            } else {
                put(&prefix, &mut stream);
                spans.push(start..stream.len() + HEAD_LEN);
                put(&payload(i, len), &mut stream);
            }
        }
        let make = |read| SealedReader::new(read, pair(aes256).1);
        reads_no_further_than_needed(&stream, &spans, make, |r| &r.read).await;
    }

    #[test]
    fn the_other_directions_key_does_not_open() {
        let (mut s, _) = pair(aes256);
        let mut o = Opener(Direction::new((5, aes256(&[2; 32]))).unwrap());
        let (h, mut r) = record(&mut s, b"data");
        assert!(o.open(h, &mut r).is_err());
    }
}
