//! The executor's protocol layer: how one chunk of the working buffer becomes a frame
//! payload and back.
//!
//! The step interpreter ([`super::Ctx::run_step`]) cuts every transfer into chunks and
//! moves frames; a [`Wire`] decides what a chunk's frame holds. [`Wire::Raw`] sends the
//! buffer's bytes as they are; [`Wire::Coded`] sends a min-max frame ([`crate::quant`]).
//! A new protocol (an LL-style or compressed one) is one new variant here, with no plan
//! and no interpreter changes.

use std::ops::Range;

use bytes::Bytes;

use super::Call;
use crate::dtype::{Order, ReduceOp};
use crate::error::{Error, Result};
use crate::plan::{Action, Rank};
use crate::quant::Codec;

/// The per-frame protocol of one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Wire {
    /// A chunk's frame is the chunk's bytes.
    Raw,
    /// A chunk's frame is its min-max quantization; elements are `f32`.
    Coded(Codec),
}

impl Wire {
    /// The protocol of `call`, checking that the call suits it.
    pub(super) fn for_call(call: &Call<'_>) -> Result<Wire> {
        let Some(codec) = call.codec else { return Ok(Wire::Raw) };
        if call.dtype != codec.dtype() || !matches!(call.op, ReduceOp::Sum | ReduceOp::Avg) || call.custom.is_some() {
            return Err(Error::InvalidArgument(format!(
                "a quantized call takes {} elements and sum or avg, not {} and {:?}{}",
                codec.dtype(),
                call.dtype,
                call.op,
                if call.custom.is_some() { " with a custom operator" } else { "" }
            )));
        }
        Ok(Wire::Coded(codec))
    }

    /// Checks that an exchange may send `send` while receiving `recv` (element ranges)
    /// in step `step`. Raw frames allow overlapping ranges (the send reads a snapshot);
    /// coded ones do not, since encoding rewrites the sent range.
    pub(super) fn check_exchange(&self, step: usize, send: &Range<usize>, recv: &Range<usize>) -> Result<()> {
        let overlap = send.start < recv.end && recv.start < send.end;
        match self {
            Wire::Coded(_) if overlap => Err(Error::InvalidArgument(format!(
                "step {step}: a quantized exchange needs disjoint ranges, not {send:?} and {recv:?}"
            ))),
            _ => Ok(()),
        }
    }

    /// Bytes of the frame that carries a chunk of `elements` elements of
    /// `element_bytes` bytes each.
    pub(super) fn frame_len(&self, elements: usize, element_bytes: usize) -> usize {
        match self {
            Wire::Raw => elements * element_bytes,
            Wire::Coded(codec) => codec.encoded_len(elements),
        }
    }

    /// The frame to send for `chunk`. A coded chunk is replaced by its decoded values,
    /// so that the sender holds bitwise what its receiver decodes.
    pub(super) fn encode(&self, chunk: &mut [u8]) -> Result<Bytes> {
        match self {
            Wire::Raw => Ok(Bytes::copy_from_slice(chunk)),
            Wire::Coded(codec) => codec.encode_replace_bytes(chunk),
        }
    }

    /// Applies a frame received from `peer` to `chunk`: [`Action::Copy`] (and
    /// [`Action::CopyKeep`]) overwrites the
    /// chunk with the frame's values, [`Action::Reduce`] combines them into it with
    /// `reduce(order, chunk, values)` (raw frames) or by float addition (coded frames,
    /// whose calls are sums: both orders give the same bits for finite values).
    pub(super) fn decode(
        &self,
        peer: Rank,
        frame: &[u8],
        chunk: &mut [u8],
        action: Action,
        reduce: impl FnOnce(Order, &mut [u8], &[u8]) -> Result<()>,
    ) -> Result<()> {
        match (self, action) {
            (Wire::Raw, Action::Copy | Action::CopyKeep) => {
                chunk.copy_from_slice(frame);
                Ok(())
            }
            (Wire::Raw, Action::Reduce(order)) => reduce(order, chunk, frame),
            (Wire::Coded(codec), Action::Copy | Action::CopyKeep) => {
                codec.decode_bytes(frame, chunk).map_err(|e| Error::Protocol { peer, detail: e.to_string() })
            }
            (Wire::Coded(codec), Action::Reduce(_)) => {
                codec.decode_add_bytes(frame, chunk).map_err(|e| Error::Protocol { peer, detail: e.to_string() })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::Quantization;

    #[test]
    fn raw_frames_are_the_bytes_and_coded_frames_decode_to_the_sent_values() {
        let mut chunk: Vec<u8> = bytemuck::cast_slice(&[1.0f32, -2.5, 3.25]).to_vec();
        let raw = Wire::Raw.encode(&mut chunk.clone()).unwrap();
        assert_eq!(&raw[..], &chunk[..]);
        assert_eq!(Wire::Raw.frame_len(3, 4), 12);
        let wire = Wire::Coded(Codec::new(Quantization::U16));
        let frame = wire.encode(&mut chunk).unwrap();
        assert_eq!(frame.len(), wire.frame_len(3, 4));
        let mut out = vec![0u8; chunk.len()];
        let no_reduce = |_: Order, _: &mut [u8], _: &[u8]| -> Result<()> { unreachable!() };
        wire.decode(1, &frame, &mut out, Action::Copy, no_reduce).unwrap();
        assert_eq!(out, chunk, "the sender holds what the receiver decodes");
        let err = wire.decode(1, &frame[1..], &mut out, Action::Copy, no_reduce).unwrap_err();
        assert!(matches!(err, Error::Protocol { peer: 1, .. }), "{err:?}");
    }
}
