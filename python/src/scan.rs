//! All-scan for Python: `Communicator.all_scan` and `Communicator.all_scan_linear_attention`
//! (the `#[pymethods]` stubs in `communicator.rs` call these).

use phalanx::comm::ScanOptions;
use phalanx::plan::scan::Algorithm;
use phalanx::DType;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::args::parse_op;
use crate::array;
use crate::communicator::Communicator;

/// Scan options from the Python arguments.
pub(crate) fn options(inclusive: bool, reverse: bool, algorithm: &str, blocks: usize) -> PyResult<ScanOptions> {
    let algorithm = match (algorithm.to_ascii_lowercase().as_str(), blocks) {
        ("auto", 0) => Algorithm::Auto,
        ("chain", blocks) => Algorithm::Chain { blocks: blocks.max(1) },
        ("doubling" | "recursive_doubling", 0) => Algorithm::RecursiveDoubling,
        ("auto" | "doubling" | "recursive_doubling", _) => {
            return Err(PyValueError::new_err("blocks applies to algorithm=\"chain\" only"))
        }
        (other, _) => {
            return Err(PyValueError::new_err(format!(
                "unknown algorithm {other:?}: use \"auto\", \"chain\" or \"doubling\""
            )))
        }
    };
    Ok(ScanOptions { inclusive, reverse, algorithm })
}

/// See `Communicator.all_scan` in `communicator.rs`.
pub(crate) fn all_scan(
    comm: &Communicator,
    py: Python<'_>,
    obj: &Bound<'_, PyAny>,
    op: &str,
    options: ScanOptions,
) -> PyResult<()> {
    let op = parse_op(op)?;
    let a = array::array(obj, "array", true)?;
    let (raw, dtype) = (a.raw(), a.dtype);
    // SAFETY: `a` keeps the memory alive until after the call; nothing else holds a
    // slice of it.
    comm.with(py, move |c| c.all_scan_raw(unsafe { raw.as_mut_slice() }, dtype, op, options))?;
    drop(a);
    Ok(())
}

/// See `Communicator.all_scan_linear_attention` in `communicator.rs`.
pub(crate) fn all_scan_linear_attention(
    comm: &Communicator,
    py: Python<'_>,
    a_obj: &Bound<'_, PyAny>,
    s_obj: &Bound<'_, PyAny>,
    options: ScanOptions,
) -> PyResult<()> {
    let a = array::array(a_obj, "a", true)?;
    let s = array::array(s_obj, "s", true)?;
    if a.dtype != DType::F32 || s.dtype != DType::F32 {
        return Err(PyTypeError::new_err(format!("a and s must be float32, got {} and {}", a.dtype, s.dtype)));
    }
    let d_k = a.len / 4;
    let (rows, d_v) = match s.shape.as_slice() {
        [rows, d_v] => (*rows, *d_v),
        other => return Err(PyValueError::new_err(format!("s must have shape (d_k, d_v), got {other:?}"))),
    };
    if a.shape.len() != 1 || rows != d_k {
        return Err(PyValueError::new_err(format!(
            "a must have shape (d_k,) with d_k = s.shape[0] = {rows}, got {:?}",
            a.shape
        )));
    }
    if a.raw().overlaps(s.raw()) {
        return Err(PyValueError::new_err("a and s share memory; pass separate arrays"));
    }
    let (ra, rs) = (a.raw(), s.raw());
    comm.with(py, move |c| {
        // SAFETY: `a` and `s` keep the memory alive until after the call, they do not
        // overlap (checked above), and nothing else holds a slice of them.
        let (ab, sb) = unsafe { (ra.as_mut_slice(), rs.as_mut_slice()) };
        // Copies: the arrays need not be 4-byte aligned.
        let mut av: Vec<f32> = bytemuck::pod_collect_to_vec(ab);
        let mut sv: Vec<f32> = bytemuck::pod_collect_to_vec(sb);
        c.all_scan_linear_attention(&mut av, &mut sv, d_v, options)?;
        ab.copy_from_slice(bytemuck::cast_slice(&av));
        sb.copy_from_slice(bytemuck::cast_slice(&sv));
        Ok(())
    })?;
    drop((a, s));
    Ok(())
}
