//! What the two ends say to set a shared-memory link up: the connector's hello wraps
//! the caller's hello with an offer (or a plain "no offer"), and the acceptor answers an
//! offer with one frame on the network link.
//!
//! Hello: `phx-shm/1`, a flag byte (1: an offer follows), then for an offer the host
//! identity (u16 length + bytes), the connector's pid (u32), the segment name (u16
//! length + bytes), the ring size and the two token words (u64 each), all
//! little-endian; the rest is the caller's hello, handed to the acceptor's caller as is.
//!
//! Answer: `phx-shm/1 ok` and the acceptor's pid (u32), or `phx-shm/1 no`.

use std::hash::{BuildHasher, Hasher};

use bytes::{BufMut, Bytes, BytesMut};

use super::segment::SegmentName;
use crate::transport::{Frame, Header};

const MAGIC: &[u8] = b"phx-shm/1";
const YES: &[u8] = b"phx-shm/1 ok";
const NO: &[u8] = b"phx-shm/1 no";

/// A connector's offer of a segment it created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Offer {
    /// The connector's [`host_identity`].
    pub(crate) identity: String,
    pub(crate) pid: u32,
    pub(crate) name: SegmentName,
    pub(crate) ring_bytes: u64,
    pub(crate) token: [u64; 2],
}

/// The connector's hello: `inner` with `offer`, if any.
pub(crate) fn wrap(offer: Option<&Offer>, inner: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(MAGIC.len() + 128 + inner.len());
    out.put_slice(MAGIC);
    match offer {
        None => out.put_u8(0),
        Some(o) => {
            out.put_u8(1);
            out.put_u16_le(o.identity.len().min(u16::MAX as usize) as u16);
            out.put_slice(&o.identity.as_bytes()[..o.identity.len().min(u16::MAX as usize)]);
            out.put_u32_le(o.pid);
            out.put_u16_le(o.name.as_str().len() as u16);
            out.put_slice(o.name.as_str().as_bytes());
            out.put_u64_le(o.ring_bytes);
            out.put_u64_le(o.token[0]);
            out.put_u64_le(o.token[1]);
        }
    }
    out.put_slice(inner);
    out.freeze()
}

/// Splits a connector's hello: `Ok(None)` when it is not wrapped at all (a connector
/// without this layer), else the offer (if any) and the caller's hello.
#[allow(clippy::type_complexity)] // one use, spelled out in the docs
pub(crate) fn unwrap(hello: &Bytes) -> Result<Option<(Option<Offer>, Bytes)>, String> {
    let Some(rest) = hello.strip_prefix(MAGIC) else { return Ok(None) };
    let mut r = Reader(rest);
    let offer = match r.u8()? {
        0 => None,
        1 => {
            let len = r.u16()? as usize;
            let identity = String::from_utf8(r.take(len)?.to_vec()).map_err(|_| "identity not UTF-8")?;
            let pid = r.u32()?;
            let len = r.u16()? as usize;
            let name = std::str::from_utf8(r.take(len)?).map_err(|_| "segment name not UTF-8")?;
            let name = SegmentName::parse(name).ok_or_else(|| format!("bad segment name {name:?}"))?;
            let ring_bytes = r.u64()?;
            let token = [r.u64()?, r.u64()?];
            Some(Offer { identity, pid, name, ring_bytes, token })
        }
        other => return Err(format!("bad offer flag {other}")),
    };
    let at = hello.len() - r.0.len();
    Ok(Some((offer, hello.slice(at..))))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("shared-memory hello cut short".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        let mut b = [0u8; 2];
        b.copy_from_slice(self.take(2)?);
        Ok(u16::from_le_bytes(b))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }
}

/// The acceptor's answer: yes (with its pid) or no.
pub(crate) fn answer(accepted_by: Option<u32>) -> Frame {
    let payload = match accepted_by {
        Some(pid) => {
            let mut p = BytesMut::from(YES);
            p.put_u32_le(pid);
            p.freeze()
        }
        None => Bytes::from_static(NO),
    };
    Frame { header: Header::default(), payload }
}

/// Reads an answer: `Ok(Some(pid))` for yes, `Ok(None)` for no.
pub(crate) fn parse_answer(frame: &Frame) -> Result<Option<u32>, String> {
    if frame.payload == NO {
        return Ok(None);
    }
    let pid = frame.payload.strip_prefix(YES).ok_or("not an answer to a shared-memory offer")?;
    let pid: [u8; 4] = pid.try_into().map_err(|_| "bad pid in a shared-memory answer")?;
    Ok(Some(u32::from_le_bytes(pid)))
}

/// Who this process is, as far as sharing memory goes: the kernel's boot id (one per
/// boot of one machine), the machine id, and the PID namespace (pids, for the pidfd
/// that watches the peer, mean the same on both ends only within one). `None` when the
/// kernel does not say.
pub(crate) fn host_identity() -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let pid_ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let machine = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    Some(format!("{}/{}/{}", boot.trim(), machine.trim(), pid_ns.display()))
}

/// 64 bits no other process will pick (segment names and tokens; not secrets).
pub(crate) fn random_u64() -> u64 {
    // RandomState is seeded from the OS once per process and advanced per instance.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer() -> Offer {
        Offer {
            identity: host_identity().unwrap(),
            pid: 42,
            name: SegmentName::fresh(7),
            ring_bytes: 1 << 20,
            token: [3, 4],
        }
    }

    #[test]
    fn hellos_round_trip() {
        let inner = Bytes::from_static(b"phalanx-data/1:12345678");
        assert_eq!(unwrap(&wrap(Some(&offer()), &inner)).unwrap(), Some((Some(offer()), inner.clone())));
        assert_eq!(unwrap(&wrap(None, &inner)).unwrap(), Some((None, inner.clone())));
        assert_eq!(unwrap(&inner).unwrap(), None, "a plain hello passes through");
    }

    #[test]
    fn cut_or_bad_hellos_are_refused() {
        let full = wrap(Some(&offer()), b"x");
        for cut in MAGIC.len()..full.len() - 1 {
            // Every prefix is refused, except those that end right after the offer.
            if let Ok(Some((Some(_), _))) = unwrap(&full.slice(..cut)) {
                assert_eq!(cut, full.len() - 1);
            }
        }
        let mut bad = BytesMut::from(MAGIC);
        bad.put_u8(9);
        assert!(unwrap(&bad.freeze()).is_err());
        let evil = Offer { name: SegmentName::fresh(1), ..offer() };
        let mut raw = wrap(Some(&evil), b"").to_vec();
        let name_at = raw.windows(8).position(|w| w == b"phalanx-").unwrap();
        raw[name_at + 8] = b'/';
        assert!(unwrap(&Bytes::from(raw)).unwrap_err().contains("segment name"));
    }

    #[test]
    fn answers_round_trip() {
        assert_eq!(parse_answer(&answer(Some(77))).unwrap(), Some(77));
        assert_eq!(parse_answer(&answer(None)).unwrap(), None);
        assert!(parse_answer(&Frame { header: Header::default(), payload: "hi".into() }).is_err());
    }

    #[test]
    fn identity_is_stable_and_randoms_differ() {
        assert_eq!(host_identity(), host_identity());
        assert_ne!(random_u64(), random_u64());
    }
}
