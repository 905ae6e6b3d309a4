//! Quantized all-reduce from C: `phx_comm_all_reduce_quantized`.

use std::ffi::{c_int, c_void};

use phalanx::quant::Quantization;
use phalanx::DType;

use crate::args::{bytes_mut, handle_mut, reduce_op};
use crate::comm::phx_comm;
use crate::status::{guard, invalid};

/// 8-bit codes for `phx_comm_all_reduce_quantized`: a quarter of the float bytes.
pub const PHX_QUANT_U8: c_int = 8;
/// 16-bit codes for `phx_comm_all_reduce_quantized`: half of the float bytes.
pub const PHX_QUANT_U16: c_int = 16;

/// Sums (`PHX_OP_SUM`) or averages (`PHX_OP_AVG`) `count` floats over all members,
/// sending min-max codes of `bits` bits (`PHX_QUANT_U8` or `PHX_QUANT_U16`) per element
/// instead of floats. The result is approximate (each element off by at most about
/// `n` quantization steps of its chunk's range, `n` the group size) but bitwise identical
/// on every member. Other operators or widths are `PHX_ERR_INVALID_ARGUMENT`, and so is
/// a NaN or infinity in any member's input (every member fails; buffers are restored).
/// Every member must pass the same `count`, `op_code` and `bits`.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `buf` is NULL or valid
/// for reads and writes of `count` floats, touched by no one else during the call.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_all_reduce_quantized(
    comm: *mut phx_comm,
    buf: *mut f32,
    count: usize,
    op_code: c_int,
    bits: c_int,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        let op = reduce_op(op_code)?;
        let quantization = u32::try_from(bits)
            .ok()
            .and_then(Quantization::from_bits)
            .ok_or_else(|| invalid(format!("unknown quantization width {bits} (8 or 16)")))?;
        // SAFETY: NULL or valid for `count` floats (the caller's contract).
        let buf = unsafe { bytes_mut(buf.cast::<c_void>(), count, DType::F32, "buf") }?;
        comm.all_reduce_quantized_raw(buf, DType::F32, op, quantization)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_match_phalanx() {
        assert_eq!(Quantization::from_bits(PHX_QUANT_U8 as u32), Some(Quantization::U8));
        assert_eq!(Quantization::from_bits(PHX_QUANT_U16 as u32), Some(Quantization::U16));
    }
}
