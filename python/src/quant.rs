//! `Communicator.all_reduce_quantized`: the quantized all-reduce from Python.

use phalanx::quant::Quantization;
use phalanx::{DType, ReduceOp};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::args::parse_op;
use crate::array;
use crate::communicator::Communicator;

/// The body of `Communicator.all_reduce_quantized` (see its docs in `communicator.rs`).
pub(crate) fn all_reduce_quantized(
    comm: &Communicator,
    py: Python<'_>,
    array: &Bound<'_, PyAny>,
    op: &str,
    bits: u32,
) -> PyResult<()> {
    let op = parse_op(op)?;
    if !matches!(op, ReduceOp::Sum | ReduceOp::Avg) {
        return Err(PyValueError::new_err("all_reduce_quantized supports op=\"sum\" and op=\"avg\""));
    }
    let quantization = Quantization::from_bits(bits)
        .ok_or_else(|| PyValueError::new_err(format!("bits must be 8 or 16, not {bits}")))?;
    let a = array::array(array, "array", true)?;
    if a.dtype != DType::F32 {
        return Err(PyTypeError::new_err(format!("all_reduce_quantized takes float32 arrays, not {}", a.dtype)));
    }
    let raw = a.raw();
    // SAFETY: `a` keeps the memory alive until after the call; nothing else holds a slice
    // of it.
    comm.with(py, move |c| c.all_reduce_quantized_raw(unsafe { raw.as_mut_slice() }, DType::F32, op, quantization))?;
    drop(a);
    Ok(())
}
