//! [`DeviceMemory`] of the CPU stand-in: its "device" buffers are host `Vec<f32>`s and its
//! collectives run to completion before they return, so copies are immediate and
//! [`DeviceMemory::finish`] has nothing to wait for.

use super::memory::{check_host_len, DeviceMemory};
use super::standin::StandInComm;
use super::DeviceError;
use crate::dtype::DType;

impl DeviceMemory for StandInComm {
    fn len_of(buf: &Vec<f32>) -> usize {
        buf.len()
    }

    fn dtype_of(_: &Vec<f32>) -> DType {
        DType::F32
    }

    fn alloc(&mut self, len: usize, dtype: DType) -> Result<Vec<f32>, DeviceError> {
        if dtype != DType::F32 {
            return Err(DeviceError::InvalidArgument(format!("the stand-in holds f32 buffers only, not {dtype:?}")));
        }
        Ok(vec![0.0; len])
    }

    fn copy_prefix(&mut self, src: &Vec<f32>, dst: &mut Vec<f32>, len: usize) -> Result<(), DeviceError> {
        if len > src.len() || len > dst.len() {
            return Err(DeviceError::InvalidArgument(format!(
                "a copy of {len} elements from {} into {}",
                src.len(),
                dst.len()
            )));
        }
        dst[..len].copy_from_slice(&src[..len]);
        Ok(())
    }

    fn download(&mut self, src: &Vec<f32>, dst: &mut [u8]) -> Result<(), DeviceError> {
        check_host_len(dst.len(), src.len(), DType::F32)?;
        dst.copy_from_slice(bytemuck::cast_slice(src));
        Ok(())
    }

    fn upload(&mut self, src: &[u8], dst: &mut Vec<f32>) -> Result<(), DeviceError> {
        check_host_len(src.len(), dst.len(), DType::F32)?;
        // The host bytes may not be aligned for f32: read them element by element.
        for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
            *d = f32::from_ne_bytes([s[0], s[1], s[2], s[3]]);
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
}
