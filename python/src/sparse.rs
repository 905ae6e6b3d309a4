//! Python functions of the sparse collectives and all-to-all, module-level (they take the
//! communicator first): `all_to_all`, `all_to_all_v`, `sparse_all_reduce`,
//! `sparse_all_gather`, `sparse_reduce_scatter`, and the result class `SparseReduced`.

use phalanx::comm::SparseReduced as CoreReduced;
use phalanx::plan::sparse::Placement;
use phalanx::DType;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::array::array as array_ref;
use crate::{check_pair, numpy_dtype, parse_op, Communicator};

/// A numpy array of `dtype` holding a copy of `bytes`.
fn to_numpy<'py>(py: Python<'py>, bytes: &[u8], dtype: DType) -> PyResult<Bound<'py, PyAny>> {
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

/// All-to-all with equal parts: part `j` of `input` goes to rank `j`; part `i` of
/// `output` comes from rank `i`. Both hold `size * part` elements of one type.
#[pyfunction]
pub fn all_to_all(
    py: Python<'_>,
    comm: &Communicator,
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

/// All-to-all with uneven parts: `send_counts[j]` elements of `input` (parts in rank
/// order) go to rank `j`. Returns `(received, recv_counts)`: a new array of `input`'s
/// type with the parts from each rank in rank order, and how many came from each.
#[pyfunction]
pub fn all_to_all_v<'py>(
    py: Python<'py>,
    comm: &Communicator,
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

/// Sums sparse vectors of dimension `dim` given as `(indices[k], values[k])` pairs:
/// `indices` a uint32 array, `values` an array of any element type. Every peer gets the
/// same sums, bit for bit; each index is summed in ascending rank order (sparse path).
/// Past the density crossover 2·b_v / (n·(b_i + b_v)) the dense exchange runs instead.
#[pyfunction]
pub fn sparse_all_reduce(
    py: Python<'_>,
    comm: &Communicator,
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

/// Sparse all-gather (FSSDP's spAG), in place: `array` holds a slot for every chunk, in
/// order (`sum(lens)` elements); chunk `c` has `lens[c]` elements, is owned by rank
/// `owners[c]` and is also held by the ranks in `holders[c]`. Afterwards every holder's
/// slot holds the owner's bytes; other slots are unchanged.
#[pyfunction]
pub fn sparse_all_gather(
    py: Python<'_>,
    comm: &Communicator,
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

/// Sparse reduce-scatter (FSSDP's spRS), in place, with the placement as for
/// `sparse_all_gather`: each owner's slot becomes the combination (`op`, not "avg") of
/// all holders' slots of its chunk, in ascending rank order. Other slots are unchanged.
#[pyfunction]
#[pyo3(signature = (comm, array, lens, owners, holders, op = "sum"))]
pub fn sparse_reduce_scatter(
    py: Python<'_>,
    comm: &Communicator,
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
pub fn _check_placement(size: usize, lens: Vec<usize>, owners: Vec<usize>, holders: Vec<Vec<usize>>) -> PyResult<usize> {
    Ok(placement(size, lens, owners, holders)?.transfers())
}

/// Registers this file's functions and class in the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<SparseReduced>()?;
    m.add_function(wrap_pyfunction!(all_to_all, m)?)?;
    m.add_function(wrap_pyfunction!(all_to_all_v, m)?)?;
    m.add_function(wrap_pyfunction!(sparse_all_reduce, m)?)?;
    m.add_function(wrap_pyfunction!(sparse_all_gather, m)?)?;
    m.add_function(wrap_pyfunction!(sparse_reduce_scatter, m)?)?;
    m.add_function(wrap_pyfunction!(_check_placement, m)?)?;
    Ok(())
}
