//! Zero-copy access to the memory of Python arrays.
//!
//! Three ways in, tried in this order:
//! 1. numpy's array interface (`__array_interface__`): numpy arrays and array-likes;
//! 2. DLPack (`__dlpack__` / `__dlpack_device__`, read by [`crate::dlpack`]): CPU torch
//!    tensors, JAX arrays, ...;
//! 3. the buffer protocol (`memoryview(obj)`, viewed through `numpy.asarray`, which does
//!    not copy): `bytearray`, `array.array`, `memoryview`, ...
//!
//! The stable ABI (abi3) of Python 3.9 has no `PyObject_GetBuffer`, hence the array
//! interface rather than the C buffer API; every path yields the address of the caller's
//! memory, never a copy. The memory stays valid while the returned [`ArrayRef`] (which
//! holds references to the objects that own it) lives.

use phalanx::DType;
use pyo3::exceptions::{PyAttributeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::dlpack::{self, DL_CPU, DL_CUDA_HOST};

/// The memory of one Python array: C-contiguous bytes of one element type.
pub struct ArrayRef<'py> {
    /// Objects that keep the memory alive (the array, a DLPack capsule, a memoryview).
    owners: Vec<Bound<'py, PyAny>>,
    ptr: *mut u8,
    /// Length in bytes.
    pub len: usize,
    /// Element type.
    pub dtype: DType,
    /// Shape, in elements.
    pub shape: Vec<usize>,
    /// Whether the producer marked the memory read-only.
    pub readonly: bool,
}

impl ArrayRef<'_> {
    /// The memory as a raw slice that may cross `Python::detach`.
    pub fn raw(&self) -> RawSlice {
        RawSlice { ptr: self.ptr, len: self.len }
    }

    /// The memory as bytes. The caller must not let Python code write to the array
    /// while the slice lives (it holds the GIL, or the array is its own).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `owners` keeps the memory alive for `self`'s lifetime; see `RawSlice`.
        unsafe { self.raw().as_slice() }
    }
}

/// A pointer and a length: the memory of an [`ArrayRef`], sendable into
/// `Python::detach` (raw pointers are not `Send`).
#[derive(Clone, Copy)]
pub struct RawSlice {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a RawSlice is only dereferenced while the ArrayRef that made it is alive (the
// callers keep it on their stack across `detach`), so the memory it points to is valid;
// which thread touches it does not matter for plain bytes.
unsafe impl Send for RawSlice {}

impl RawSlice {
    /// The bytes.
    ///
    /// # Safety
    /// The [`ArrayRef`] that made this slice must outlive the result, and nothing may
    /// write to the memory meanwhile.
    pub unsafe fn as_slice<'a>(self) -> &'a [u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: per the caller's contract, ptr..ptr+len is live, initialised memory.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, mutably.
    ///
    /// # Safety
    /// As [`RawSlice::as_slice`], and nothing else may read or write the memory
    /// meanwhile (no other slice of it is live).
    pub unsafe fn as_mut_slice<'a>(self) -> &'a mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: per the caller's contract, ptr..ptr+len is live and unaliased.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Whether the two share any byte.
    pub fn overlaps(self, other: RawSlice) -> bool {
        let (a, b) = (self.ptr as usize, other.ptr as usize);
        self.len > 0 && other.len > 0 && a < b + other.len && b < a + self.len
    }
}

/// The memory of `obj`, which must be C-contiguous and, if `writable`, writable.
/// `what` names the argument in error messages.
pub fn array<'py>(obj: &Bound<'py, PyAny>, what: &str, writable: bool) -> PyResult<ArrayRef<'py>> {
    let a = if let Some(a) = from_array_interface(obj, what)? {
        a
    } else if obj.hasattr("__dlpack__")? {
        from_dlpack(obj, what)?
    } else {
        from_buffer(obj, what)?
    };
    if writable && a.readonly {
        return Err(PyValueError::new_err(format!(
            "{what} is read-only, but phalanx writes the result into it in place; pass a writable array \
             (for example a copy: x.copy())"
        )));
    }
    Ok(a)
}

/// Supported element types, for error messages.
const SUPPORTED: &str = "float16, bfloat16, float32, float64, int8, int16, int32, int64, uint8, uint16, uint32, uint64";

/// numpy's dtype name of `obj` (`"complex128"`), if it has one.
fn dtype_name(obj: &Bound<'_, PyAny>) -> Option<String> {
    obj.getattr("dtype").ok()?.getattr("name").ok()?.extract().ok()
}

pub(crate) fn unsupported(obj: &Bound<'_, PyAny>, what: &str, code: &str) -> PyErr {
    let name = dtype_name(obj).unwrap_or_else(|| code.to_string());
    PyTypeError::new_err(format!(
        "{what} has element type {name}, which phalanx does not support; supported: {SUPPORTED}"
    ))
}

/// The element type of an array-interface type string such as `"<f4"`.
fn dtype_of_typestr(obj: &Bound<'_, PyAny>, what: &str, typestr: &str) -> PyResult<DType> {
    let b = typestr.as_bytes();
    let size: Option<usize> = typestr.get(2..).and_then(|s| s.parse().ok());
    let (Some(&order), Some(&kind), Some(size)) = (b.first(), b.get(1), size) else {
        return Err(unsupported(obj, what, typestr));
    };
    let native = match order {
        b'|' | b'=' => true,
        b'<' => cfg!(target_endian = "little"),
        b'>' => cfg!(target_endian = "big"),
        _ => false,
    };
    if !native && size > 1 {
        return Err(PyTypeError::new_err(format!(
            "{what} has non-native byte order ({typestr}); convert it first, e.g. x.astype(x.dtype.newbyteorder('='))"
        )));
    }
    let dtype = match (kind, size) {
        (b'f', 2) => DType::F16,
        (b'f', 4) => DType::F32,
        (b'f', 8) => DType::F64,
        (b'i', 1) => DType::I8,
        (b'i', 2) => DType::I16,
        (b'i', 4) => DType::I32,
        (b'i', 8) => DType::I64,
        (b'u', 1) => DType::U8,
        (b'u', 2) => DType::U16,
        (b'u', 4) => DType::U32,
        (b'u', 8) => DType::U64,
        // ml_dtypes' bfloat16 shows as two opaque bytes; its dtype's name tells.
        (b'V', 2) if dtype_name(obj).as_deref() == Some("bfloat16") => DType::BF16,
        _ => return Err(unsupported(obj, what, typestr)),
    };
    Ok(dtype)
}

/// Checks that `strides` (in bytes; `None` means C-contiguous) describe a C-contiguous
/// layout of `shape`.
pub(crate) fn check_c_contiguous(
    what: &str,
    shape: &[usize],
    strides: Option<&[isize]>,
    itemsize: usize,
) -> PyResult<()> {
    let Some(strides) = strides else { return Ok(()) };
    if shape.contains(&0) {
        return Ok(());
    }
    let mut expected = itemsize as isize;
    for (&dim, &stride) in shape.iter().zip(strides).rev() {
        if dim != 1 && stride != expected {
            return Err(PyValueError::new_err(format!(
                "{what} is not C-contiguous (shape {shape:?}, strides {strides:?}); phalanx works in place on \
                 contiguous memory: pass numpy.ascontiguousarray(x) (a copy) and use the result"
            )));
        }
        expected = expected.saturating_mul(dim as isize);
    }
    Ok(())
}

pub(crate) fn byte_len(what: &str, shape: &[usize], itemsize: usize) -> PyResult<usize> {
    shape
        .iter()
        .try_fold(itemsize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| PyValueError::new_err(format!("{what}: shape {shape:?} overflows")))
}

/// Through `__array_interface__`, or `None` when `obj` has none.
fn from_array_interface<'py>(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<Option<ArrayRef<'py>>> {
    let py = obj.py();
    let iface = match obj.getattr("__array_interface__") {
        Ok(i) => i,
        Err(e) if e.is_instance_of::<PyAttributeError>(py) => return Ok(None),
        Err(e) => return Err(e),
    };
    let typestr: String = iface.get_item("typestr")?.extract()?;
    let shape: Vec<usize> = iface.get_item("shape")?.extract()?;
    let strides: Option<Vec<isize>> = match iface.get_item("strides") {
        Ok(s) => s.extract()?,
        Err(_) => None,
    };
    let Ok((addr, readonly)) = iface.get_item("data")?.extract::<(usize, bool)>() else {
        return Err(PyTypeError::new_err(format!(
            "{what}: its __array_interface__ gives no data pointer; pass a numpy array"
        )));
    };
    let dtype = dtype_of_typestr(obj, what, &typestr)?;
    check_c_contiguous(what, &shape, strides.as_deref(), dtype.size())?;
    let len = byte_len(what, &shape, dtype.size())?;
    Ok(Some(ArrayRef { owners: vec![obj.clone()], ptr: addr as *mut u8, len, dtype, shape, readonly }))
}

/// Through DLPack (see [`crate::dlpack`]): CPU or pinned host memory only; the capsule
/// is kept (not consumed), so the producer frees the tensor's DLPack wrapper when the
/// capsule dies, after we are done with the memory.
fn from_dlpack<'py>(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<ArrayRef<'py>> {
    let host = |t: i32| t == DL_CPU || t == DL_CUDA_HOST;
    let not_host = |t: i32| {
        PyTypeError::new_err(format!(
            "{what} lives on DLPack device type {t} ({}), not in CPU memory; this call works on CPU memory: \
             move it first (e.g. tensor.cpu())",
            dlpack::device_name(t)
        ))
    };
    let (device, _id) = dlpack::device_of(obj)?;
    if !host(device) {
        return Err(not_host(device));
    }
    let (capsule, v) = dlpack::export(obj, what, None).map_err(|r| dlpack::refused(obj, what, r))?;
    if !host(v.device.0) {
        return Err(not_host(v.device.0));
    }
    let owners = vec![obj.clone(), capsule];
    Ok(ArrayRef { owners, ptr: v.ptr, len: v.len, dtype: v.dtype, shape: v.shape, readonly: v.readonly })
}

/// Through the buffer protocol: `numpy.asarray(memoryview(obj))` is a view, not a copy.
fn from_buffer<'py>(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<ArrayRef<'py>> {
    let py = obj.py();
    let not_an_array = || {
        PyTypeError::new_err(format!(
            "{what} must be a numpy array, a CPU tensor (DLPack) or an object with the buffer protocol, not {}",
            obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "this type".into())
        ))
    };
    let view = py.import("builtins")?.getattr("memoryview")?.call1((obj,)).map_err(|_| not_an_array())?;
    let numpy = py.import("numpy").map_err(|_| {
        PyTypeError::new_err(format!("{what}: objects other than arrays need numpy (pip install numpy)"))
    })?;
    let arr = numpy.call_method1("asarray", (&view,))?;
    let mut a = from_array_interface(&arr, what)?.ok_or_else(not_an_array)?;
    a.owners.push(view);
    a.owners.push(obj.clone());
    Ok(a)
}

/// Two arrays of one collective: same element type, no shared memory.
pub(crate) fn check_pair(input: &ArrayRef<'_>, output: &ArrayRef<'_>) -> PyResult<()> {
    if input.dtype != output.dtype {
        return Err(PyTypeError::new_err(format!(
            "input has element type {} but output has {}; they must match",
            input.dtype, output.dtype
        )));
    }
    if input.raw().overlaps(output.raw()) {
        return Err(PyValueError::new_err("input and output share memory; pass separate arrays"));
    }
    Ok(())
}

/// The numpy dtype of a phalanx element type (bfloat16 through ml_dtypes).
pub(crate) fn numpy_dtype<'py>(py: Python<'py>, dtype: DType) -> PyResult<Bound<'py, PyAny>> {
    let name = match dtype {
        DType::F32 => "float32",
        DType::F64 => "float64",
        DType::F16 => "float16",
        DType::I8 => "int8",
        DType::I16 => "int16",
        DType::I32 => "int32",
        DType::I64 => "int64",
        DType::U8 => "uint8",
        DType::U16 => "uint16",
        DType::U32 => "uint32",
        DType::U64 => "uint64",
        DType::BF16 => {
            return py.import("ml_dtypes").and_then(|m| m.getattr("bfloat16")).map_err(|_| {
                PyTypeError::new_err(
                    "reading a bfloat16 tensor as a numpy array needs ml_dtypes (pip install ml_dtypes)",
                )
            })
        }
    };
    Ok(PyString::new(py, name).into_any())
}
