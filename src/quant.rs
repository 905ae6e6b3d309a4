//! Min-max quantization of transmitted chunks: the codec of the quantized all-reduce.
//!
//! A chunk of `f32` elements travels as one frame:
//!
//! ```text
//! [min: f32 LE][max: f32 LE][code_0][code_1]…    codes: u8, or u16 LE
//! ```
//!
//! with `Δ = (max - min) / (2^bits - 1)` and `code = round((x - min) / Δ)`; the
//! receiver decodes `min + code·Δ`. The arithmetic of both directions runs in `f64` (so a
//! range as wide as `f32::MAX - f32::MIN` does not overflow) and the decoded value is
//! rounded to `f32` and clamped to `[min, max]`. Decoding is a pure function of the
//! frame's bytes, so every peer that decodes the same frame gets the same bits: the
//! executor relies on it for bit parity (see [`crate::exec`]).
//!
//! # Edge cases
//!
//! - A constant chunk (`max == min`) has `Δ = 0`: every code is 0 and decodes exactly.
//! - An empty chunk is a frame of `min = max = 0` and no codes.
//! - A chunk holding a NaN or an infinity cannot be quantized: [`Codec::encode_replace`]
//!   returns [`Error::InvalidArgument`] (a partial sum that overflows to infinity is
//!   reported the same way), and the collective fails on every rank with the buffers
//!   restored.
//! - A frame whose length does not match its chunk, or whose header is not finite or has
//!   `min > max`, is a protocol error ([`Codec::decode`] never panics).
//!
//! ```
//! use phalanx::quant::{Codec, Quantization};
//! let codec = Codec::new(Quantization::U8);
//! let mut x = [0.0f32, 0.5, 1.0, 0.25];
//! let frame = codec.encode_replace(&mut x).unwrap();
//! assert_eq!(frame.len(), codec.encoded_len(4)); // 8 header bytes + 4 one-byte codes
//! // `x` now holds the decoded values, exactly what a receiver decodes.
//! let mut y = [0.0f32; 4];
//! codec.decode(&frame, &mut y).unwrap();
//! assert_eq!(x, y);
//! assert!((x[1] - 0.5).abs() <= 1.0 / 255.0);
//! ```

use std::fmt;

use bytes::Bytes;

use crate::dtype::DType;
use crate::error::{Error, Result};

/// Code width of a quantized all-reduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Quantization {
    /// 8-bit codes: 255 steps per chunk range, a quarter of the `f32` bytes.
    U8,
    /// 16-bit codes: 65535 steps per chunk range, half of the `f32` bytes.
    U16,
}

impl Quantization {
    /// Bits per code (8 or 16); also this width's code in fingerprints and the C ABI.
    pub const fn bits(self) -> u32 {
        match self {
            Quantization::U8 => 8,
            Quantization::U16 => 16,
        }
    }

    /// The width with `bits` bits per code, if there is one (8 or 16).
    pub fn from_bits(bits: u32) -> Option<Quantization> {
        match bits {
            8 => Some(Quantization::U8),
            16 => Some(Quantization::U16),
            _ => None,
        }
    }

    /// Bytes per code.
    pub const fn code_bytes(self) -> usize {
        self.bits() as usize / 8
    }

    /// The largest code, `2^bits - 1`: the number of steps across a chunk's range.
    pub const fn levels(self) -> u32 {
        (1u32 << self.bits()) - 1
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Quantization::U8 => "u8",
            Quantization::U16 => "u16",
        })
    }
}

impl std::str::FromStr for Quantization {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "u8" | "8" => Ok(Quantization::U8),
            "u16" | "16" => Ok(Quantization::U16),
            other => Err(format!("unknown quantization {other:?} (expected u8 or u16)")),
        }
    }
}

/// Bytes of a frame's header: `min` and `max` as `f32`.
pub const HEADER_BYTES: usize = 8;

/// The min-max codec for one code width. Elements are `f32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Codec {
    /// The code width.
    pub quantization: Quantization,
}

impl Codec {
    /// The codec with the given code width.
    pub const fn new(quantization: Quantization) -> Codec {
        Codec { quantization }
    }

    /// The element type the codec reads and writes.
    pub const fn dtype(&self) -> DType {
        DType::F32
    }

    /// Bytes of the frame that carries `elements` elements.
    pub const fn encoded_len(&self, elements: usize) -> usize {
        HEADER_BYTES + elements * self.quantization.code_bytes()
    }

    /// Quantizes `x` into a frame and replaces every element of `x` by its decoded value
    /// (bitwise what [`Codec::decode`] of the frame gives). Fails, leaving `x` as it was,
    /// when `x` holds a NaN or an infinity.
    pub fn encode_replace(&self, x: &mut [f32]) -> Result<Bytes> {
        let (min, max) = finite_range(x)?;
        let mut out = vec![0u8; self.encoded_len(x.len())];
        out[..4].copy_from_slice(&min.to_le_bytes());
        out[4..HEADER_BYTES].copy_from_slice(&max.to_le_bytes());
        let levels = self.quantization.levels();
        let step = Step::new(min, max, levels);
        // Codes first, in f32 where the range fits (a vectorised loop), then the decoded
        // values from the codes with the receivers' very function: bit parity depends on
        // decoding alone, the encoder may round as it likes.
        let fast = ((max - min).is_finite()).then(|| {
            let scale = if max > min { levels as f32 / (max - min) } else { 0.0 };
            (min, scale, levels as f32)
        });
        let codes = &mut out[HEADER_BYTES..];
        match (self.quantization, fast) {
            (Quantization::U8, Some((min, scale, levels))) => {
                for (v, c) in x.iter().zip(codes.iter_mut()) {
                    *c = ((v - min) * scale + 0.5).max(0.0).min(levels) as u8;
                }
            }
            (Quantization::U16, Some((min, scale, levels))) => {
                for (v, c) in x.iter().zip(codes.chunks_exact_mut(2)) {
                    let code = ((v - min) * scale + 0.5).max(0.0).min(levels) as u16;
                    c.copy_from_slice(&code.to_le_bytes());
                }
            }
            (Quantization::U8, None) => x.iter().zip(codes.iter_mut()).for_each(|(v, c)| *c = step.code(*v) as u8),
            (Quantization::U16, None) => x
                .iter()
                .zip(codes.chunks_exact_mut(2))
                .for_each(|(v, c)| c.copy_from_slice(&(step.code(*v) as u16).to_le_bytes())),
        }
        match self.quantization {
            Quantization::U8 => x.iter_mut().zip(&out[HEADER_BYTES..]).for_each(|(v, &c)| *v = step.value(c as u32)),
            Quantization::U16 => x
                .iter_mut()
                .zip(out[HEADER_BYTES..].chunks_exact(2))
                .for_each(|(v, c)| *v = step.value(u16::from_le_bytes([c[0], c[1]]) as u32)),
        }
        Ok(Bytes::from(out))
    }

    /// Decodes `frame` into `dst`, whose length says how many codes the frame must hold.
    pub fn decode(&self, frame: &[u8], dst: &mut [f32]) -> Result<()> {
        let step = self.header(frame, dst.len())?;
        let codes = &frame[HEADER_BYTES..];
        match self.quantization {
            Quantization::U8 => dst.iter_mut().zip(codes).for_each(|(v, &c)| *v = step.value(c as u32)),
            Quantization::U16 => dst
                .iter_mut()
                .zip(codes.chunks_exact(2))
                .for_each(|(v, c)| *v = step.value(u16::from_le_bytes([c[0], c[1]]) as u32)),
        }
        Ok(())
    }

    /// Decodes `frame` and adds the values into `acc` (`acc = decoded + acc`, the
    /// incoming operand on the left as the ring's reduce-scatter orders it).
    pub fn decode_add(&self, frame: &[u8], acc: &mut [f32]) -> Result<()> {
        let step = self.header(frame, acc.len())?;
        let codes = &frame[HEADER_BYTES..];
        match self.quantization {
            Quantization::U8 => acc.iter_mut().zip(codes).for_each(|(v, &c)| *v += step.value(c as u32)),
            Quantization::U16 => acc
                .iter_mut()
                .zip(codes.chunks_exact(2))
                .for_each(|(v, c)| *v += step.value(u16::from_le_bytes([c[0], c[1]]) as u32)),
        }
        Ok(())
    }

    /// [`Codec::encode_replace`] on the bytes of `f32` elements (any alignment).
    pub fn encode_replace_bytes(&self, x: &mut [u8]) -> Result<Bytes> {
        with_f32_mut(x, |x| self.encode_replace(x))
    }

    /// [`Codec::decode`] into the bytes of `f32` elements (any alignment).
    pub fn decode_bytes(&self, frame: &[u8], dst: &mut [u8]) -> Result<()> {
        with_f32_mut(dst, |dst| self.decode(frame, dst))
    }

    /// [`Codec::decode_add`] into the bytes of `f32` elements (any alignment).
    pub fn decode_add_bytes(&self, frame: &[u8], acc: &mut [u8]) -> Result<()> {
        with_f32_mut(acc, |acc| self.decode_add(frame, acc))
    }

    /// Checks a frame's length and header for a chunk of `elements` elements.
    fn header(&self, frame: &[u8], elements: usize) -> Result<Step> {
        let want = self.encoded_len(elements);
        if frame.len() != want {
            return Err(Error::InvalidArgument(format!(
                "quantized frame of {} bytes for {elements} elements ({want} expected)",
                frame.len()
            )));
        }
        let min = f32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]);
        let max = f32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
        if !(min.is_finite() && max.is_finite() && min <= max) {
            return Err(Error::InvalidArgument(format!("quantized frame with invalid range [{min}, {max}]")));
        }
        Ok(Step::new(min, max, self.quantization.levels()))
    }
}

/// Applies `f` to `bytes` viewed as `f32`s, through an aligned copy when they are not
/// aligned (trailing bytes short of an element are left alone).
fn with_f32_mut<R>(bytes: &mut [u8], f: impl FnOnce(&mut [f32]) -> R) -> R {
    let len = bytes.len() / 4 * 4;
    let bytes = &mut bytes[..len];
    match bytemuck::try_cast_slice_mut::<u8, f32>(bytes) {
        Ok(typed) => f(typed),
        Err(_) => {
            let mut tmp: Vec<f32> = bytemuck::allocation::pod_collect_to_vec(bytes);
            let r = f(&mut tmp);
            bytes.copy_from_slice(bytemuck::cast_slice(&tmp));
            r
        }
    }
}

/// The minimum and maximum of `x` (0 and 0 when empty), or an error at its first
/// non-finite element.
fn finite_range(x: &[f32]) -> Result<(f32, f32)> {
    let (mut min, mut max) = match x.first() {
        Some(&v) => (v, v),
        None => return Ok((0.0, 0.0)),
    };
    // Branch-free loops that vectorise: a NaN is skipped by the comparisons but counted,
    // an infinity shows in the min or max.
    const LANES: usize = 16;
    let (mut mins, mut maxs, mut nans) = ([min; LANES], [max; LANES], [0u32; LANES]);
    let mut blocks = x.chunks_exact(LANES);
    for block in &mut blocks {
        for k in 0..LANES {
            let v = block[k];
            mins[k] = if v < mins[k] { v } else { mins[k] };
            maxs[k] = if v > maxs[k] { v } else { maxs[k] };
            nans[k] += v.is_nan() as u32;
        }
    }
    for (k, &v) in blocks.remainder().iter().enumerate() {
        mins[k] = if v < mins[k] { v } else { mins[k] };
        maxs[k] = if v > maxs[k] { v } else { maxs[k] };
        nans[k] += v.is_nan() as u32;
    }
    let nans: u32 = nans.iter().sum();
    for k in 0..LANES {
        min = if mins[k] < min { mins[k] } else { min };
        max = if maxs[k] > max { maxs[k] } else { max };
    }
    if nans > 0 || !min.is_finite() || !max.is_finite() {
        let (i, v) = x.iter().enumerate().find(|(_, v)| !v.is_finite()).unwrap_or((0, &x[0])); // ok: x non-empty
        return Err(Error::InvalidArgument(format!(
            "quantized all-reduce needs finite values, element {i} of a chunk is {v}"
        )));
    }
    Ok((min, max))
}

/// One chunk's quantization step: the map between values and codes.
#[derive(Clone, Copy, Debug)]
struct Step {
    min: f64,
    /// `Δ`, 0 for a constant chunk.
    delta: f64,
    /// `1 / Δ` (computed as `levels / (max - min)`), 0 for a constant chunk.
    inv: f64,
    levels: f64,
    lo: f32,
    hi: f32,
}

impl Step {
    fn new(min: f32, max: f32, levels: u32) -> Step {
        let range = max as f64 - min as f64;
        let delta = range / levels as f64;
        let inv = if range > 0.0 { levels as f64 / range } else { 0.0 };
        Step { min: min as f64, delta, inv, levels: levels as f64, lo: min, hi: max }
    }

    /// `round((x - min) / Δ)`, clamped to the codes.
    #[inline(always)]
    fn code(&self, x: f32) -> u32 {
        // The operand is ≥ 0 up to rounding: adding ½ and truncating rounds half up.
        (((x as f64 - self.min) * self.inv + 0.5).clamp(0.0, self.levels)) as u32
    }

    /// `min + code·Δ`, rounded to `f32` and clamped to the chunk's range.
    #[inline(always)]
    fn value(&self, code: u32) -> f32 {
        ((self.min + code as f64 * self.delta) as f32).clamp(self.lo, self.hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(q: Quantization, x: &[f32]) -> (Bytes, Vec<f32>) {
        let codec = Codec::new(q);
        let mut replaced = x.to_vec();
        let frame = codec.encode_replace(&mut replaced).unwrap();
        let mut decoded = vec![f32::NAN; x.len()];
        codec.decode(&frame, &mut decoded).unwrap();
        assert_eq!(bytemuck::cast_slice::<f32, u32>(&replaced), bytemuck::cast_slice::<f32, u32>(&decoded));
        (frame, decoded)
    }

    #[test]
    fn constant_and_empty_chunks_are_exact() {
        for q in [Quantization::U8, Quantization::U16] {
            for c in [0.0f32, -3.5, 1e30, f32::MIN_POSITIVE] {
                let (frame, dec) = round_trip(q, &[c; 5]);
                assert_eq!(dec, vec![c; 5]);
                assert!(frame[HEADER_BYTES..].iter().all(|&b| b == 0), "constant chunk codes are 0");
            }
            let (frame, dec) = round_trip(q, &[]);
            assert_eq!(frame.len(), HEADER_BYTES);
            assert!(dec.is_empty());
        }
    }

    #[test]
    fn extremes_are_exact_and_codes_span_the_range() {
        for q in [Quantization::U8, Quantization::U16] {
            let (frame, dec) = round_trip(q, &[-2.0, 6.0, 2.0]);
            assert_eq!((dec[0], dec[1]), (-2.0, 6.0), "min and max decode exactly");
            let half_step = 8.0 / q.levels() as f32 / 2.0;
            assert!((dec[2] - 2.0).abs() <= half_step * 1.0001, "midpoint within half a step: {}", dec[2]);
            let codes: Vec<u32> = match q {
                Quantization::U8 => frame[8..].iter().map(|&c| c as u32).collect(),
                Quantization::U16 => frame[8..].chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect(),
            };
            assert_eq!(codes[0], 0);
            assert_eq!(codes[1], q.levels());
            assert_eq!(codes[2], q.levels().div_ceil(2), "round half up");
        }
    }

    #[test]
    fn widest_range_does_not_overflow() {
        let (_, dec) = round_trip(Quantization::U16, &[f32::MIN, f32::MAX, 0.0]);
        assert_eq!((dec[0], dec[1]), (f32::MIN, f32::MAX));
        assert!(dec[2].abs() <= (f32::MAX as f64 * 2.0 / 65535.0) as f32);
    }

    #[test]
    fn non_finite_input_is_an_error_and_leaves_input() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = [1.0f32, bad, 2.0];
            let err = Codec::new(Quantization::U8).encode_replace(&mut x).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(ref m) if m.contains("element 1")), "{err}");
            assert_eq!(x[0], 1.0);
            assert_eq!(x[2], 2.0);
        }
    }

    #[test]
    fn malformed_frames_are_errors() {
        let codec = Codec::new(Quantization::U16);
        let mut x = [1.0f32, 2.0];
        let frame = codec.encode_replace(&mut x).unwrap();
        let mut dst = [0.0f32; 3];
        assert!(codec.decode(&frame, &mut dst).is_err(), "length mismatch");
        assert!(codec.decode(&frame[..5], &mut dst[..0]).is_err(), "short header");
        let mut swapped = frame.to_vec();
        swapped[..4].copy_from_slice(&5.0f32.to_le_bytes());
        assert!(codec.decode(&swapped, &mut dst[..2]).is_err(), "min > max");
        let mut nan = frame.to_vec();
        nan[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(codec.decode_add(&nan, &mut dst[..2]).is_err(), "NaN max");
    }

    #[test]
    fn frame_sizes() {
        assert_eq!(Codec::new(Quantization::U8).encoded_len(100), 108);
        assert_eq!(Codec::new(Quantization::U16).encoded_len(100), 208);
        assert_eq!("u16".parse::<Quantization>(), Ok(Quantization::U16));
        assert!("u4".parse::<Quantization>().is_err());
        assert_eq!(Quantization::from_bits(8), Some(Quantization::U8));
        assert_eq!(Quantization::from_bits(32), None);
    }

    proptest! {
        #[test]
        fn round_trip_error_is_at_most_half_a_step(
            x in prop::collection::vec(-1e6f32..1e6, 1..300),
            wide in any::<bool>(),
        ) {
            let q = if wide { Quantization::U16 } else { Quantization::U8 };
            let (_, dec) = round_trip(q, &x);
            let (min, max) = finite_range(&x).unwrap();
            let delta = (max as f64 - min as f64) / q.levels() as f64;
            for (a, b) in x.iter().zip(&dec) {
                // Half a step, plus the f32 rounding of the encoder's arithmetic (a few
                // ulps of the code) and of the decoded value.
                let tol = delta * (0.5 + 8.0 * q.levels() as f64 * f32::EPSILON as f64)
                    + (a.abs().max(b.abs()) as f64) * f32::EPSILON as f64;
                prop_assert!(((*a as f64) - (*b as f64)).abs() <= tol, "{a} -> {b}, step {delta}");
                prop_assert!(*b >= min && *b <= max);
            }
        }

        #[test]
        fn decode_add_is_decode_then_add(
            x in prop::collection::vec(-100f32..100.0, 0..50),
            acc0 in -10f32..10.0,
        ) {
            let codec = Codec::new(Quantization::U8);
            let (frame, dec) = round_trip(Quantization::U8, &x);
            let mut acc = vec![acc0; x.len()];
            codec.decode_add(&frame, &mut acc).unwrap();
            let want: Vec<f32> = dec.iter().map(|d| d + acc0).collect();
            prop_assert_eq!(acc, want);
        }
    }
}
