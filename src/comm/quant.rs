//! Quantized all-reduce on a [`Communicator`]: transfers carry 8- or 16-bit min-max
//! codes instead of `f32`s (see [`crate::quant`] for the codec and [`crate::exec`] for
//! the bit-parity rules).

use super::{elements, Communicator};
use crate::collective::Collective;
use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, Result};
use crate::quant::Quantization;

impl Communicator {
    /// Sums (`Sum`) or averages (`Avg`) `buf` over all ranks like
    /// [`Communicator::all_reduce`], sending every chunk as min-max codes of
    /// `quantization`'s width: a quarter (`U8`) or half (`U16`) of the bytes on the wire.
    ///
    /// The result is approximate but **bitwise identical on every rank**. It runs the ring
    /// plan whatever the tuning says; each element's error is at most `n·Δ/2` (plus `f32`
    /// rounding of the sums), within the bound `(n-1)·Δ + Δ`, where `Δ` is the largest
    /// quantization step, `(max - min) / (2^bits - 1)`, of the chunks it travelled in.
    /// The range of any partial sum is at most the sum of the ranks' ranges, which bounds
    /// `Δ` from the inputs. A group of one transmits nothing and returns `buf` exactly.
    ///
    /// Every rank must pass the same length, `op` and `quantization` (they are part of
    /// the fingerprint: a disagreement is [`Error::Mismatch`] on every rank). Other
    /// operators are [`Error::InvalidArgument`]. A NaN or infinity in the input, or a
    /// partial sum that overflows, fails the call on every rank with
    /// [`Error::InvalidArgument`] (on the rank that met it; the others get the group's
    /// abort), buffers restored. Lost peers, restores and retries behave as for
    /// [`Communicator::all_reduce`].
    ///
    /// ```
    /// use phalanx::quant::Quantization;
    /// use phalanx::{Communicator, ReduceOp};
    /// let comms = Communicator::local_group(2, Default::default()).unwrap();
    /// let out: Vec<Vec<f32>> = std::thread::scope(|s| {
    ///     let hs: Vec<_> = comms
    ///         .into_iter()
    ///         .map(|mut c| s.spawn(move || {
    ///             let mut x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.01).sin() + c.rank() as f32).collect();
    ///             c.all_reduce_quantized(&mut x, ReduceOp::Sum, Quantization::U8).unwrap();
    ///             x
    ///         }))
    ///         .collect();
    ///     hs.into_iter().map(|h| h.join().unwrap()).collect()
    /// });
    /// assert_eq!(out[0], out[1]); // bitwise identical on both ranks
    /// for (i, v) in out[0].iter().enumerate() {
    ///     let exact = 2.0 * (i as f32 * 0.01).sin() + 1.0;
    ///     assert!((v - exact).abs() < 0.05, "{v} vs {exact}");
    /// }
    /// ```
    pub fn all_reduce_quantized(&mut self, buf: &mut [f32], op: ReduceOp, quantization: Quantization) -> Result<()> {
        self.all_reduce_quantized_raw(bytemuck::cast_slice_mut(buf), DType::F32, op, quantization)
    }

    /// [`Communicator::all_reduce_quantized`] on the bytes of elements of type `dtype`,
    /// for bindings that know the type only at run time. `dtype` must be `F32`.
    pub fn all_reduce_quantized_raw(
        &mut self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        quantization: Quantization,
    ) -> Result<()> {
        if dtype != DType::F32 {
            return Err(Error::InvalidArgument(format!("quantized all-reduce takes f32 elements, not {dtype}")));
        }
        if !matches!(op, ReduceOp::Sum | ReduceOp::Avg) {
            return Err(Error::InvalidArgument(format!("quantized all-reduce supports sum and avg, not {op:?}")));
        }
        let len = elements(buf.len(), dtype, "buffer")?;
        if self.size() == 1 {
            // Nothing is transmitted, so nothing is quantized; the input rule still holds.
            let x: Vec<f32> = bytemuck::allocation::pod_collect_to_vec(buf);
            if let Some(i) = x.iter().position(|v| !v.is_finite()) {
                return Err(Error::InvalidArgument(format!(
                    "quantized all-reduce needs finite values, element {i} is {}",
                    x[i]
                )));
            }
        }
        self.run(&Collective::QuantizedAllReduce { len, quantization }, dtype, op, buf)?;
        Ok(())
    }
}
