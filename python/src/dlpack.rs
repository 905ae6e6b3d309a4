//! DLPack (dlpack.h) as phalanx reads it: the capsule a producer's `__dlpack__` returns,
//! its tensor's device, element type, shape and first byte, for CPU memory
//! ([`crate::array`]) and for CUDA memory (the NCCL backend of `DeviceCommunicator`).
//!
//! Capsules are read, never consumed: the producer's deleter runs when the capsule dies,
//! after phalanx is done with the memory, and the caller keeps the capsule (and the
//! array) alive for the call. Both capsule kinds are read: `"dltensor"` (a
//! `DLManagedTensor`, DLPack < 1.0, what producers return when called without
//! `max_version`, as here) and `"dltensor_versioned"` (a `DLManagedTensorVersioned`,
//! DLPack 1.x, whose flags may mark the tensor read-only).
//!
//! CUDA streams follow the array API's `__dlpack__(stream=...)`: the consumer names the
//! stream it will use and the producer orders its pending work before it; `None` and 1
//! are the legacy default stream, 2 the per-thread default stream, a larger integer a
//! `cudaStream_t`.

use std::ffi::c_void;

use phalanx::DType;
use pyo3::exceptions::{PyBufferError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyDict};

/// `DLDevice`.
#[repr(C)]
pub(crate) struct DLDevice {
    pub(crate) device_type: i32,
    pub(crate) device_id: i32,
}

/// `DLDataType`: type code, bits, lanes.
#[repr(C)]
pub(crate) struct DLDataType {
    pub(crate) code: u8,
    pub(crate) bits: u8,
    pub(crate) lanes: u16,
}

/// `DLTensor`.
#[repr(C)]
pub(crate) struct DLTensor {
    pub(crate) data: *mut c_void,
    pub(crate) device: DLDevice,
    pub(crate) ndim: i32,
    pub(crate) dtype: DLDataType,
    pub(crate) shape: *const i64,
    pub(crate) strides: *const i64,
    pub(crate) byte_offset: u64,
}

/// `DLPackVersion`.
#[repr(C)]
pub(crate) struct DLPackVersion {
    pub(crate) major: u32,
    pub(crate) minor: u32,
}

/// `DLManagedTensorVersioned` (DLPack 1.x): the tensor comes after the version, the
/// manager's context, its deleter and the flags.
#[repr(C)]
pub(crate) struct DLManagedTensorVersioned {
    pub(crate) version: DLPackVersion,
    pub(crate) manager_ctx: *mut c_void,
    pub(crate) deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    pub(crate) flags: u64,
    pub(crate) dl_tensor: DLTensor,
}

/// `kDLCPU`.
pub(crate) const DL_CPU: i32 = 1;
/// `kDLCUDA`: memory of a CUDA device.
pub(crate) const DL_CUDA: i32 = 2;
/// `kDLCUDAHost`: pinned host memory, readable from the CPU.
pub(crate) const DL_CUDA_HOST: i32 = 3;
/// `DLPACK_FLAG_BITMASK_READ_ONLY`.
const FLAG_READ_ONLY: u64 = 1;

/// A DLPack device type's name, for error messages.
pub(crate) fn device_name(device_type: i32) -> &'static str {
    match device_type {
        DL_CPU => "CPU",
        DL_CUDA => "CUDA",
        DL_CUDA_HOST => "CUDA host (pinned)",
        4 => "OpenCL",
        7 => "Vulkan",
        8 => "Metal",
        10 => "ROCm",
        13 => "CUDA managed",
        14 => "oneAPI",
        _ => "another device",
    }
}

/// What a DLPack tensor describes: where its first byte is, and its layout, checked to
/// be C-contiguous.
#[derive(Debug)]
pub(crate) struct DlView {
    /// `(device_type, device_id)`.
    pub(crate) device: (i32, i32),
    /// `data + byte_offset`.
    pub(crate) ptr: *mut u8,
    /// Element type.
    pub(crate) dtype: DType,
    /// Shape, in elements.
    pub(crate) shape: Vec<usize>,
    /// Length in bytes.
    pub(crate) len: usize,
    /// Whether the producer marked it read-only (versioned capsules only).
    pub(crate) readonly: bool,
}

/// Why a tensor cannot be read: an element type phalanx lacks (described by its DLPack
/// code; the caller names it better when it can), or another error.
#[derive(Debug)]
pub(crate) enum Refused {
    /// `(code, bits, lanes)`.
    Dtype(u8, u8, u16),
    /// Ready to raise.
    Err(PyErr),
}

impl From<PyErr> for Refused {
    fn from(e: PyErr) -> Refused {
        Refused::Err(e)
    }
}

/// The element type of a DLPack `(code, bits, lanes)`.
fn dtype_of(code: u8, bits: u8, lanes: u16) -> Option<DType> {
    Some(match (code, bits, lanes) {
        (0, 8, 1) => DType::I8,
        (0, 16, 1) => DType::I16,
        (0, 32, 1) => DType::I32,
        (0, 64, 1) => DType::I64,
        (1, 8, 1) => DType::U8,
        (1, 16, 1) => DType::U16,
        (1, 32, 1) => DType::U32,
        (1, 64, 1) => DType::U64,
        (2, 16, 1) => DType::F16,
        (2, 32, 1) => DType::F32,
        (2, 64, 1) => DType::F64,
        (4, 16, 1) => DType::BF16,
        _ => return None,
    })
}

/// Reads a `DLTensor` (no Python involved): its element type, shape and strides, checked
/// C-contiguous, and its first byte. `what` names it in errors.
///
/// # Safety
/// `t.shape` (and `t.strides` unless NULL) hold `t.ndim` entries.
pub(crate) unsafe fn read_tensor(t: &DLTensor, readonly: bool, what: &str) -> Result<DlView, Refused> {
    let (code, bits, lanes) = (t.dtype.code, t.dtype.bits, t.dtype.lanes);
    let dtype = dtype_of(code, bits, lanes).ok_or(Refused::Dtype(code, bits, lanes))?;
    let ndim = usize::try_from(t.ndim).map_err(|_| PyValueError::new_err(format!("{what}: negative ndim")))?;
    let read = |p: *const i64| -> Vec<i64> {
        if p.is_null() || ndim == 0 {
            Vec::new()
        } else {
            // SAFETY: DLPack promises `ndim` entries behind non-null shape and strides
            // (the caller's contract).
            unsafe { std::slice::from_raw_parts(p, ndim) }.to_vec()
        }
    };
    let shape: Vec<usize> = read(t.shape)
        .into_iter()
        .map(usize::try_from)
        .collect::<Result<_, _>>()
        .map_err(|_| PyValueError::new_err(format!("{what}: negative dimension")))?;
    let strides: Option<Vec<isize>> = (!t.strides.is_null() && ndim > 0)
        .then(|| read(t.strides).into_iter().map(|s| s as isize * dtype.size() as isize).collect());
    crate::array::check_c_contiguous(what, &shape, strides.as_deref(), dtype.size())?;
    let len = crate::array::byte_len(what, &shape, dtype.size())?;
    let ptr = (t.data as *mut u8).wrapping_add(t.byte_offset as usize);
    Ok(DlView { device: (t.device.device_type, t.device.device_id), ptr, dtype, shape, len, readonly })
}

/// The tensor of a DLPack capsule of either kind, not consumed.
fn capsule_view(capsule: &Bound<'_, PyAny>, what: &str) -> Result<DlView, Refused> {
    let cap = capsule.cast::<PyCapsule>().map_err(PyErr::from)?;
    if cap.is_valid_checked(Some(c"dltensor_versioned")) {
        let managed = cap.pointer_checked(Some(c"dltensor_versioned"))?.cast::<DLManagedTensorVersioned>();
        // SAFETY: a "dltensor_versioned" capsule holds a DLManagedTensorVersioned, valid
        // while the (unconsumed) capsule lives, which the caller holds.
        let m = unsafe { managed.as_ref() };
        if m.version.major != 1 {
            return Err(Refused::Err(PyTypeError::new_err(format!(
                "{what}: DLPack {}.{} capsule; phalanx reads DLPack 1.x",
                m.version.major, m.version.minor
            ))));
        }
        // SAFETY: a producer's tensor holds `ndim` shape (and stride) entries.
        return unsafe { read_tensor(&m.dl_tensor, m.flags & FLAG_READ_ONLY != 0, what) };
    }
    let managed = cap.pointer_checked(Some(c"dltensor"))?.cast::<DLTensor>();
    // SAFETY: a "dltensor" capsule holds a DLManagedTensor, whose first field is the
    // DLTensor; valid while the (unconsumed) capsule lives, which the caller holds.
    let t = unsafe { managed.as_ref() };
    // SAFETY: as above.
    unsafe { read_tensor(t, false, what) }
}

/// `obj.__dlpack_device__()`.
pub(crate) fn device_of(obj: &Bound<'_, PyAny>) -> PyResult<(i32, i32)> {
    obj.call_method0("__dlpack_device__")?.extract()
}

/// `obj.__dlpack__(stream=stream)` (no keyword for `None`, as CPU producers require) and
/// its tensor: the capsule comes back with the view, to be kept alive with `obj`.
pub(crate) fn export<'py>(
    obj: &Bound<'py, PyAny>,
    what: &str,
    stream: Option<i64>,
) -> Result<(Bound<'py, PyAny>, DlView), Refused> {
    let py = obj.py();
    let capsule = match stream {
        None => obj.call_method0("__dlpack__"),
        Some(s) => {
            let kwargs = PyDict::new(py);
            kwargs.set_item("stream", s)?;
            obj.call_method("__dlpack__", (), Some(&kwargs))
        }
    };
    let capsule = match capsule {
        Ok(c) => c,
        Err(e) if e.is_instance_of::<PyBufferError>(py) => {
            return Err(PyValueError::new_err(format!("{what} cannot be shared for in-place use: {e}")).into())
        }
        Err(e) => return Err(e.into()),
    };
    let view = capsule_view(&capsule, what)?;
    Ok((capsule, view))
}

/// The memory of a CUDA tensor: the NCCL backend's buffer. Valid while `owners` (the
/// array and its unconsumed capsule) live.
pub(crate) struct CudaRef<'py> {
    /// The array and its DLPack capsule.
    #[allow(dead_code)] // held, never read: they keep the memory alive
    owners: Vec<Bound<'py, PyAny>>,
    /// The device address of the first element.
    pub(crate) addr: usize,
    /// Length in bytes.
    pub(crate) len: usize,
    /// Element type.
    pub(crate) dtype: DType,
    /// The CUDA device (`device_id` of DLPack).
    pub(crate) device_id: i32,
}

/// The array API's `__dlpack__` stream for a CUDA stream given by the caller: `None`
/// (the legacy default stream, NULL as a `cudaStream_t`) and 0 are 1; 1 (legacy
/// default), 2 (per-thread default) and stream handles are passed as they are, and are
/// also their `cudaStream_t` (`cudaStreamLegacy` is 0x1, `cudaStreamPerThread` 0x2).
/// Returns `(protocol stream, cudaStream_t)`; negative values are refused.
pub(crate) fn cuda_stream(stream: Option<i64>) -> PyResult<(i64, usize)> {
    match stream {
        None | Some(0) => Ok((1, 0)),
        Some(s) if s > 0 => Ok((s, s as usize)),
        Some(s) => Err(PyValueError::new_err(format!(
            "stream {s}: pass a cudaStream_t (e.g. torch.cuda.current_stream().cuda_stream), or None for the \
             legacy default stream"
        ))),
    }
}

/// `obj`'s CUDA memory through DLPack, for the NCCL backend: `__dlpack_device__` must be
/// `(kDLCUDA, id)`, the producer is asked for the capsule with `stream` (the array API's
/// value, see [`cuda_stream`]) so that its pending work is ordered before the stream's,
/// and the tensor must be C-contiguous, of a phalanx element type and, if `writable`,
/// not read-only. Anything else is a `TypeError` or `ValueError` naming what was given.
pub(crate) fn cuda_array<'py>(
    obj: &Bound<'py, PyAny>,
    what: &str,
    stream: i64,
    writable: bool,
) -> PyResult<CudaRef<'py>> {
    let not_cuda = |t: i32| {
        PyTypeError::new_err(format!(
            "{what} is in {} memory (DLPack device type {t}), but the NCCL backend works on CUDA tensors \
             (device type {DL_CUDA}): move it first (e.g. tensor.cuda()) or use backend=\"standin\"",
            device_name(t)
        ))
    };
    if !obj.hasattr("__dlpack__")? || !obj.hasattr("__dlpack_device__")? {
        return Err(PyTypeError::new_err(format!(
            "{what} must be a CUDA tensor with __dlpack__ and __dlpack_device__ (torch, cupy) on the NCCL backend, \
             not {}",
            obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "this type".into())
        )));
    }
    let (device_type, _) = device_of(obj)?;
    if device_type != DL_CUDA {
        return Err(not_cuda(device_type));
    }
    let (capsule, view) = export(obj, what, Some(stream)).map_err(|r| refused(obj, what, r))?;
    if view.device.0 != DL_CUDA {
        return Err(not_cuda(view.device.0));
    }
    if writable && view.readonly {
        return Err(PyValueError::new_err(format!(
            "{what} is read-only, but phalanx writes the result into it in place"
        )));
    }
    let owners = vec![obj.clone(), capsule];
    Ok(CudaRef { owners, addr: view.ptr as usize, len: view.len, dtype: view.dtype, device_id: view.device.1 })
}

/// The Python error of a refusal; `obj` names an unsupported element type.
pub(crate) fn refused(obj: &Bound<'_, PyAny>, what: &str, r: Refused) -> PyErr {
    match r {
        Refused::Dtype(code, bits, lanes) => {
            crate::array::unsupported(obj, what, &format!("DLPack type code {code}, {bits} bits, {lanes} lanes"))
        }
        Refused::Err(e) => e,
    }
}

/// Test hook (not API): what the NCCL backend would read from `obj` with `stream`:
/// `(device address, bytes, element type name, device id)`. Lets the tests check the
/// DLPack path of CUDA tensors with a fake producer on a machine with no GPU.
#[pyfunction]
#[pyo3(signature = (obj, stream = None))]
pub(crate) fn _dlpack_cuda_view(obj: &Bound<'_, PyAny>, stream: Option<i64>) -> PyResult<(usize, usize, String, i32)> {
    let (protocol, _) = cuda_stream(stream)?;
    let a = cuda_array(obj, "array", protocol, true)?;
    Ok((a.addr, a.len, a.dtype.to_string(), a.device_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(data: usize, shape: &[i64], strides: Option<&[i64]>, code: u8, bits: u8) -> DLTensor {
        DLTensor {
            data: data as *mut c_void,
            device: DLDevice { device_type: DL_CUDA, device_id: 3 },
            ndim: shape.len() as i32,
            dtype: DLDataType { code, bits, lanes: 1 },
            shape: shape.as_ptr(),
            strides: strides.map_or(std::ptr::null(), |s| s.as_ptr()),
            byte_offset: 64,
        }
    }

    #[test]
    fn a_hand_built_cuda_tensor_reads_back() {
        let shape = [2i64, 3];
        let t = tensor(0x7000_0000, &shape, None, 2, 32);
        // SAFETY: shape holds ndim entries; no strides.
        let v = unsafe { read_tensor(&t, false, "x") }.expect("readable");
        assert_eq!(v.device, (DL_CUDA, 3));
        assert_eq!(v.ptr as usize, 0x7000_0000 + 64);
        assert_eq!((v.dtype, v.shape.as_slice(), v.len), (DType::F32, &[2usize, 3][..], 24));
        // Strides in elements, C order: accepted; transposed: refused.
        let (c, f) = ([3i64, 1], [1i64, 2]);
        // SAFETY: shape and strides hold ndim entries.
        assert!(unsafe { read_tensor(&tensor(0, &shape, Some(&c), 4, 16), false, "x") }.is_ok());
        // SAFETY: as above.
        assert!(matches!(
            unsafe { read_tensor(&tensor(0, &shape, Some(&f), 2, 32), false, "x") },
            Err(Refused::Err(_))
        ));
        // SAFETY: as above.
        assert!(matches!(
            unsafe { read_tensor(&tensor(0, &shape, None, 5, 64), false, "x") },
            Err(Refused::Dtype(5, 64, 1))
        ));
    }

    #[test]
    fn the_versioned_layout_puts_the_tensor_after_the_flags() {
        // dlpack.h 1.x on a 64-bit target: version (8), manager_ctx (8), deleter (8),
        // flags (8), then the DLTensor.
        assert_eq!(std::mem::offset_of!(DLManagedTensorVersioned, flags), 24);
        assert_eq!(std::mem::offset_of!(DLManagedTensorVersioned, dl_tensor), 32);
        assert_eq!(std::mem::offset_of!(DLTensor, device), 8);
        assert_eq!(std::mem::offset_of!(DLTensor, dtype), 20);
        assert_eq!(std::mem::offset_of!(DLTensor, shape), 24);
        assert_eq!(std::mem::offset_of!(DLTensor, byte_offset), 40);
        assert_eq!(std::mem::size_of::<DLTensor>(), 48);
    }

    #[test]
    fn streams_follow_the_array_api() {
        assert_eq!(cuda_stream(None).ok(), Some((1, 0)));
        assert_eq!(cuda_stream(Some(0)).ok(), Some((1, 0)));
        assert_eq!(cuda_stream(Some(2)).ok(), Some((2, 2)));
        assert_eq!(cuda_stream(Some(0x5555_0000)).ok(), Some((0x5555_0000, 0x5555_0000)));
        assert!(cuda_stream(Some(-1)).is_err());
    }
}
