//! Framing: the `u32` length prefix of every control message, and control messages as
//! the payload of a [`Frame`] with a zeroed header.

use bytes::Bytes;

use super::{Codec, WireError, MAX_MESSAGE_BYTES};
use crate::membership::protocol::{ToMaster, ToPeer};
use crate::transport::{Frame, Header};

/// Encodes a message with its `u32` length prefix.
pub fn framed<T: Codec>(msg: &T) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    msg.encode(&mut out);
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_le_bytes());
    out
}

/// Reads the body length from a 4-byte prefix, checked against [`MAX_MESSAGE_BYTES`].
pub fn body_len(prefix: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge { what: "message", len, limit: MAX_MESSAGE_BYTES });
    }
    Ok(len)
}

/// Wraps an encoded control message (with its length prefix) in a frame.
pub(crate) fn to_frame(encoded: Vec<u8>) -> Frame {
    Frame { header: Header::default(), payload: Bytes::from(encoded) }
}

/// The body of a control frame, after checking its length prefix.
pub(crate) fn frame_body(frame: &Frame) -> Result<&[u8], WireError> {
    let p = &frame.payload;
    let prefix: [u8; 4] = p.get(..4).and_then(|b| b.try_into().ok()).ok_or(WireError::Truncated(0))?;
    let len = body_len(prefix)?;
    if len != p.len() - 4 {
        return Err(WireError::Truncated(p.len()));
    }
    Ok(&p[4..])
}

/// The framed forms the drivers send: `msg.encode()` is [`framed`]`(&msg)`, and
/// `decode` reads a body without its prefix. (Inherent, so they shadow
/// [`Codec::encode`] in method calls; call that as `Codec::encode(&msg, &mut buf)`.)
macro_rules! framed_message {
    ($($t:ty),*) => {$(
        impl $t {
            /// Encodes the message with its length prefix.
            pub fn encode(&self) -> Vec<u8> {
                framed(self)
            }

            /// Decodes a message body (without its length prefix).
            pub fn decode(body: &[u8]) -> Result<$t, WireError> {
                <$t as Codec>::read_bytes(body)
            }
        }
    )*};
}
framed_message!(ToMaster, ToPeer);
