//! The control protocol's binary codec, in the style of rustls's `msgs/codec.rs`.
//!
//! Every message is one length-delimited record: `u32` length (little-endian), then a
//! `u8` tag and the fields. Each protocol type implements [`Codec`]: it appends itself to
//! a buffer and reads itself from a [`Reader`]. The reader checks every length and count
//! against [`MAX_MESSAGE_BYTES`], [`MAX_STRING_BYTES`] or the input left before
//! allocating, and decoders return [`WireError`], never panic: the master reads these
//! from the network.
//!
//! On a [`Link`](crate::transport::Link) a control message rides as the payload of a
//! frame with a zeroed header ([`to_frame`], [`frame_body`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

mod frame;
mod messages;
pub use frame::{body_len, framed};
pub(crate) use frame::{frame_body, to_frame};

/// The largest control message accepted, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// The longest string field accepted, in bytes.
pub const MAX_STRING_BYTES: usize = 4096;

/// The hello a peer sends when it opens its control connection.
pub const CONTROL_HELLO: &[u8] = b"phalanx-control/1";

/// Why a decode failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The input ended inside a field.
    #[error("message truncated at byte {0}")]
    Truncated(usize),
    /// A length or count exceeds its limit.
    #[error("{what} of {len} exceeds the limit of {limit}")]
    TooLarge {
        /// Which field.
        what: &'static str,
        /// Its claimed size.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// An unknown tag or enum code.
    #[error("unknown {what} code {code}")]
    UnknownCode {
        /// Which field.
        what: &'static str,
        /// The code.
        code: u8,
    },
    /// Bytes left over after the last field.
    #[error("{0} trailing bytes")]
    Trailing(usize),
    /// A string field is not UTF-8.
    #[error("string field is not UTF-8")]
    BadUtf8,
}

/// A value with a binary encoding.
pub trait Codec: Sized {
    /// The fewest bytes an encoding takes. A received count of items is checked
    /// against the input left, at this size per item, before anything is allocated.
    const MIN_LEN: usize;

    /// Appends the encoding to `bytes`.
    fn encode(&self, bytes: &mut Vec<u8>);

    /// Reads one value, leaving the reader after it.
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError>;

    /// The encoding as a new buffer.
    fn get_encoding(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        self.encode(&mut bytes);
        bytes
    }

    /// Reads one value that must span all of `bytes`.
    fn read_bytes(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::init(bytes);
        let value = Self::read(&mut r)?;
        r.expect_empty()?;
        Ok(value)
    }
}

/// A cursor over received bytes.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    cursor: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `bytes`.
    pub fn init(bytes: &'a [u8]) -> Reader<'a> {
        Reader { buf: bytes, cursor: 0 }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end =
            self.cursor.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or(WireError::Truncated(self.cursor))?;
        let out = &self.buf[self.cursor..end];
        self.cursor = end;
        Ok(out)
    }

    /// The next `N` bytes, as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// The number of bytes not yet read.
    pub fn left(&self) -> usize {
        self.buf.len() - self.cursor
    }

    /// Fails if any bytes are left.
    pub fn expect_empty(&self) -> Result<(), WireError> {
        match self.left() {
            0 => Ok(()),
            n => Err(WireError::Trailing(n)),
        }
    }

    /// A `u32` count of items of at least `item_bytes` each, checked against the input left.
    pub fn count(&mut self, what: &'static str, item_bytes: usize) -> Result<usize, WireError> {
        let n = u32::read(self)? as usize;
        let left = self.left();
        if n.saturating_mul(item_bytes.max(1)) > left {
            return Err(WireError::TooLarge { what, len: n, limit: left / item_bytes.max(1) });
        }
        Ok(n)
    }

    /// A counted list (see [`encode_vec`]); `what` names it in errors.
    pub fn read_vec<T: Codec>(&mut self, what: &'static str) -> Result<Vec<T>, WireError> {
        let n = self.count(what, T::MIN_LEN)?;
        (0..n).map(|_| T::read(self)).collect()
    }
}

/// Appends a length or count as a `u32`. (Oversized ones saturate and fail decode.)
fn encode_len(n: usize, bytes: &mut Vec<u8>) {
    u32::try_from(n).unwrap_or(u32::MAX).encode(bytes);
}

/// Appends a list: its `u32` count, then the items.
pub fn encode_vec<T: Codec>(items: &[T], bytes: &mut Vec<u8>) {
    encode_len(items.len(), bytes);
    for item in items {
        item.encode(bytes);
    }
}

/// Reads a one-byte code and maps it, or fails with [`WireError::UnknownCode`].
fn read_code<T>(r: &mut Reader<'_>, what: &'static str, f: impl FnOnce(u8) -> Option<T>) -> Result<T, WireError> {
    let code = u8::read(r)?;
    f(code).ok_or(WireError::UnknownCode { what, code })
}

macro_rules! int_codec {
    ($($t:ty),*) => {$(
        impl Codec for $t {
            const MIN_LEN: usize = std::mem::size_of::<$t>();
            fn encode(&self, bytes: &mut Vec<u8>) {
                bytes.extend_from_slice(&self.to_le_bytes());
            }
            fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
                Ok(<$t>::from_le_bytes(r.array()?))
            }
        }
    )*};
}
int_codec!(u8, u16, u32, u64);

/// Fixed-size byte strings: digests.
impl<const N: usize> Codec for [u8; N] {
    const MIN_LEN: usize = N;
    fn encode(&self, bytes: &mut Vec<u8>) {
        bytes.extend_from_slice(self);
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        r.array()
    }
}

impl<A: Codec, B: Codec> Codec for (A, B) {
    const MIN_LEN: usize = A::MIN_LEN + B::MIN_LEN;
    fn encode(&self, bytes: &mut Vec<u8>) {
        self.0.encode(bytes);
        self.1.encode(bytes);
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok((A::read(r)?, B::read(r)?))
    }
}

/// A `u32` length and UTF-8 bytes. Encoding truncates to [`MAX_STRING_BYTES`] (on a
/// char boundary); decoding refuses longer strings.
impl Codec for String {
    const MIN_LEN: usize = 4;
    fn encode(&self, bytes: &mut Vec<u8>) {
        let s = truncate(self, MAX_STRING_BYTES);
        encode_len(s.len(), bytes);
        bytes.extend_from_slice(s.as_bytes());
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let n = u32::read(r)? as usize;
        if n > MAX_STRING_BYTES {
            return Err(WireError::TooLarge { what: "string", len: n, limit: MAX_STRING_BYTES });
        }
        String::from_utf8(r.take(n)?.to_vec()).map_err(|_| WireError::BadUtf8)
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Family (4 or 6), the address's octets, the port.
impl Codec for SocketAddr {
    const MIN_LEN: usize = 1 + 4 + 2;
    fn encode(&self, bytes: &mut Vec<u8>) {
        match self.ip() {
            IpAddr::V4(ip) => {
                4u8.encode(bytes);
                ip.octets().encode(bytes);
            }
            IpAddr::V6(ip) => {
                6u8.encode(bytes);
                ip.octets().encode(bytes);
            }
        }
        self.port().encode(bytes);
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let ip = match u8::read(r)? {
            4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(r.array::<16>()?)),
            code => return Err(WireError::UnknownCode { what: "address family", code }),
        };
        Ok(SocketAddr::new(ip, u16::read(r)?))
    }
}

/// A flag byte: 0 or 1; anything else is a corrupt message, not a `true`.
fn read_flag(r: &mut Reader<'_>) -> Result<bool, WireError> {
    match u8::read(r)? {
        0 => Ok(false),
        1 => Ok(true),
        code => Err(WireError::UnknownCode { what: "flag", code }),
    }
}

#[cfg(test)]
mod tests;
