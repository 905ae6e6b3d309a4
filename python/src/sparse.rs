//! The sparse collectives and all-to-all for Python: `Communicator.all_to_all`,
//! `all_to_all_v`, `sparse_all_reduce`, `sparse_all_gather` and `sparse_reduce_scatter`
//! (the methods in `communicator.rs` call these) and the result class `SparseReduced`.
//! The older module-level functions of the same names, which take the communicator
//! first, are those methods (`phalanx/__init__.py`).

use phalanx::comm::SparseReduced as CoreReduced;
use phalanx::plan::sparse::Placement;
use phalanx::DType;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::args::parse_op;
use crate::array::array as array_ref;
use crate::array::{check_pair, numpy_dtype};
use crate::communicator::Communicator;

/// A numpy array of `dtype` holding a copy of `bytes`.
pub(crate) fn to_numpy<'py>(py: Python<'py>, bytes: &[u8], dtype: DType) -> PyResult<Bound<'py, PyAny>> {
    let np = py.import("numpy")?;
    let dt = numpy_dtype(py, dtype)?;
    np.call_method1("frombuffer", (PyBytes::new(py, bytes), dt))?.call_method0("copy")
}

/// The placement of `len(lens)` chunks over a group of `size`: chunk `c` has `lens[c]`
/// elements, is owned by `owners[c]` and also held by the ranks in `holders[c]`.
fn placement(size: usize, lens: Vec<usize>, owners: Vec<usize>, holders: Vec<Vec<usize>>) -> PyResult<Placement> {
    let p = Placement::new(size, lens, owners).map_err(|e| PyValueError::new_err(e.to_string()))?;
    p.widen(&holders).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// See `Communicator.all_to_all`.
pub(crate) fn all_to_all(
    comm: &Communicator,
    py: Python<'_>,
    input: &Bound<'_, PyAny>,
    output: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let (i, o) = (array_ref(input, "input", false)?, array_ref(output, "output", true)?);
    check_pair(&i, &o)?;
    let (ri, ro, dtype) = (i.raw(), o.raw(), i.dtype);
    // SAFETY: `i` and `o` outlive the call and do not overlap (checked).
    comm.with(py, move |c| c.all_to_all_raw(unsafe { ri.as_slice() }, unsafe { ro.as_mut_slice() }, dtype))?;
    drop((i, o));
    Ok(())
}

/// See `Communicator.all_to_all_v`.
pub(crate) fn all_to_all_v<'py>(
    comm: &Communicator,
    py: Python<'py>,
    input: &Bound<'py, PyAny>,
    send_counts: Vec<usize>,
) -> PyResult<(Bound<'py, PyAny>, Vec<usize>)> {
    let i = array_ref(input, "input", false)?;
    let (ri, dtype) = (i.raw(), i.dtype);
    // SAFETY: `i` outlives the call.
    let (bytes, counts) = comm.with(py, move |c| c.all_to_all_v_raw(unsafe { ri.as_slice() }, &send_counts, dtype))?;
    drop(i);
    Ok((to_numpy(py, &bytes, dtype)?, counts))
}

/// The result of `sparse_all_reduce`: the sums, and which exchange ran.
#[pyclass(frozen, module = "phalanx")]
pub struct SparseReduced {
    dim: usize,
    dtype: DType,
    /// The sorted union of the indices (sparse path), or None (dense path).
    indices: Option<Vec<u32>>,
    /// The sums at `indices`, or the dense vector.
    values: Vec<u8>,
}

#[pymethods]
impl SparseReduced {
    /// Whether the density passed the crossover and the dense exchange ran.
    #[getter]
    fn is_dense(&self) -> bool {
        self.indices.is_none()
    }

    /// The union of the indices, ascending (uint32), or None after the dense exchange.
    #[getter]
    fn indices<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        self.indices.as_ref().map(|i| to_numpy(py, bytemuck::cast_slice(i), DType::U32)).transpose()
    }

    /// The sums at `indices`, or the whole dense vector after the dense exchange.
    #[getter]
    fn values<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_numpy(py, &self.values, self.dtype)
    }

    /// The sums as a dense vector of `dim` elements (zeros elsewhere).
    fn to_dense<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match &self.indices {
            None => to_numpy(py, &self.values, self.dtype),
            Some(indices) => {
                let size = self.dtype.size();
                let mut dense = vec![0u8; self.dim * size];
                for (k, &i) in indices.iter().enumerate() {
                    let at = i as usize * size;
                    dense[at..at + size].copy_from_slice(&self.values[k * size..(k + 1) * size]);
                }
                to_numpy(py, &dense, self.dtype)
            }
        }
    }

    fn __repr__(&self) -> String {
        match &self.indices {
            None => format!("SparseReduced(dense, dim={})", self.dim),
            Some(i) => format!("SparseReduced(sparse, dim={}, nnz={})", self.dim, i.len()),
        }
    }
}

/// See `Communicator.sparse_all_reduce`.
pub(crate) fn sparse_all_reduce(
    comm: &Communicator,
    py: Python<'_>,
    dim: usize,
    indices: &Bound<'_, PyAny>,
    values: &Bound<'_, PyAny>,
) -> PyResult<SparseReduced> {
    let (i, v) = (array_ref(indices, "indices", false)?, array_ref(values, "values", false)?);
    if i.dtype != DType::U32 {
        return Err(PyTypeError::new_err(format!(
            "indices must be uint32, got {} (use numpy.asarray_ref(indices, dtype=numpy.uint32))",
            i.dtype
        )));
    }
    let idx: Vec<u32> = bytemuck::pod_collect_to_vec(i.bytes());
    let (rv, dtype) = (v.raw(), v.dtype);
    // SAFETY: `v` outlives the call.
    let out = comm.with(py, move |c| c.sparse_all_reduce_raw(dim, &idx, unsafe { rv.as_slice() }, dtype))?;
    drop((i, v));
    Ok(match out {
        CoreReduced::Sparse { indices, values } => SparseReduced { dim, dtype, indices: Some(indices), values },
        CoreReduced::Dense(values) => SparseReduced { dim, dtype, indices: None, values },
    })
}

/// See `Communicator.sparse_all_gather`.
pub(crate) fn sparse_all_gather(
    comm: &Communicator,
    py: Python<'_>,
    array: &Bound<'_, PyAny>,
    lens: Vec<usize>,
    owners: Vec<usize>,
    holders: Vec<Vec<usize>>,
) -> PyResult<()> {
    let a = array_ref(array, "array", true)?;
    let (raw, dtype) = (a.raw(), a.dtype);
    comm.with(py, move |c| {
        let p = Placement::new(c.size(), lens, owners).and_then(|p| p.widen(&holders))?;
        // SAFETY: `a` outlives the call; nothing else holds a slice of it.
        c.sparse_all_gather_raw(&p, unsafe { raw.as_mut_slice() }, dtype)
    })?;
    drop(a);
    Ok(())
}

/// See `Communicator.sparse_reduce_scatter`.
pub(crate) fn sparse_reduce_scatter(
    comm: &Communicator,
    py: Python<'_>,
    array: &Bound<'_, PyAny>,
    lens: Vec<usize>,
    owners: Vec<usize>,
    holders: Vec<Vec<usize>>,
    op: &str,
) -> PyResult<()> {
    let op = parse_op(op)?;
    let a = array_ref(array, "array", true)?;
    let (raw, dtype) = (a.raw(), a.dtype);
    comm.with(py, move |c| {
        let p = Placement::new(c.size(), lens, owners).and_then(|p| p.widen(&holders))?;
        // SAFETY: `a` outlives the call; nothing else holds a slice of it.
        c.sparse_reduce_scatter_raw(&p, unsafe { raw.as_mut_slice() }, dtype, op)
    })?;
    drop(a);
    Ok(())
}

/// Checks a placement without a communicator (for tests and early errors).
#[pyfunction]
pub fn _check_placement(
    size: usize,
    lens: Vec<usize>,
    owners: Vec<usize>,
    holders: Vec<Vec<usize>>,
) -> PyResult<usize> {
    Ok(placement(size, lens, owners, holders)?.transfers())
}

/// Registers this file's class and placement check in the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<SparseReduced>()?;
    m.add_function(wrap_pyfunction!(_check_placement, m)?)?;
    Ok(())
}
