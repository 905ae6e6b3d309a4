//! Device memory and the device-side backup: what the fault contract needs besides the
//! collectives themselves.
//!
//! The CPU path restores a caller's buffer when a collective aborts; the device path
//! does the same with a copy kept in device memory ([`Backup`], [`with_backup`]): taken
//! on the communicator's stream before the collective, copied back after the
//! communicator was aborted (so that no kernel waiting on a lost peer holds the copy
//! behind it). [`DeviceMemory`] is what that and the hierarchical all-reduce's host
//! staging need from a backend: allocate, copy on the stream, move to and from the host,
//! and wait for the stream without spinning.

use super::{DeviceComm, DeviceError};
use crate::dtype::DType;

/// Device memory operations of a communicator's backend, on its stream.
pub trait DeviceMemory: DeviceComm {
    /// The elements of `buf`.
    fn len_of(buf: &Self::Buffer) -> usize;
    /// Their type.
    fn dtype_of(buf: &Self::Buffer) -> DType;
    /// A new buffer of `len` elements of `dtype`, owned (freed when dropped); its
    /// contents are undefined until written.
    fn alloc(&mut self, len: usize, dtype: DType) -> Result<Self::Buffer, DeviceError>;
    /// Enqueues a copy of the first `len` elements of `src` over those of `dst`.
    fn copy_prefix(&mut self, src: &Self::Buffer, dst: &mut Self::Buffer, len: usize) -> Result<(), DeviceError>;
    /// Copies `src` into host memory `dst` (its size in bytes) and waits for it.
    fn download(&mut self, src: &Self::Buffer, dst: &mut [u8]) -> Result<(), DeviceError>;
    /// Copies host memory `src` into `dst` (its size in bytes) and waits for it.
    fn upload(&mut self, src: &[u8], dst: &mut Self::Buffer) -> Result<(), DeviceError>;
    /// Waits until everything enqueued so far has run, sleeping between checks. While
    /// the communicator lives, its asynchronous error ends the wait with that error
    /// (its kernels would never finish); after an abort only the stream is waited for.
    fn finish(&mut self) -> Result<(), DeviceError>;
}

/// Checks that a host range of `bytes` holds exactly `len` elements of `dtype`.
pub(crate) fn check_host_len(bytes: usize, len: usize, dtype: DType) -> Result<(), DeviceError> {
    if bytes != len * dtype.size() {
        return Err(DeviceError::InvalidArgument(format!(
            "a host range of {bytes} bytes for {len} elements of {dtype:?} ({} bytes)",
            len * dtype.size()
        )));
    }
    Ok(())
}

/// A copy of a device buffer, kept in device memory, to put back after a failure.
pub struct Backup<B> {
    copy: B,
    len: usize,
}

impl<B> Backup<B> {
    /// Enqueues a copy of `buf` on `comm`'s stream (it runs before anything enqueued
    /// later, the collective included).
    pub fn take<C: DeviceMemory<Buffer = B>>(comm: &mut C, buf: &B) -> Result<Backup<B>, DeviceError> {
        let len = C::len_of(buf);
        let mut copy = comm.alloc(len, C::dtype_of(buf))?;
        comm.copy_prefix(buf, &mut copy, len)?;
        Ok(Backup { copy, len })
    }

    /// Copies the backup over `buf` and waits for it. Call it once `comm` is aborted (or
    /// its work finished): a kernel stuck on a lost peer would hold the copy forever.
    pub fn restore<C: DeviceMemory<Buffer = B>>(&self, comm: &mut C, buf: &mut B) -> Result<(), DeviceError> {
        if C::len_of(buf) != self.len {
            return Err(DeviceError::InvalidArgument(format!(
                "a backup of {} elements for a buffer of {}",
                self.len,
                C::len_of(buf)
            )));
        }
        comm.copy_prefix(&self.copy, buf, self.len)?;
        comm.finish()
    }
}

/// Runs `collective` on `buf` (the buffer it writes) with a device-side backup, and
/// waits for it to finish. On failure the communicator is aborted (the caller then
/// re-creates one: the session does it at the next view), `buf` is put back as it was,
/// and the collective's error is returned. Should the restore itself fail, the error
/// says both.
///
/// ```
/// use phalanx::device::memory::with_backup;
/// use phalanx::device::standin::StandIn;
/// use phalanx::device::{Capabilities, DeviceBackend, DeviceComm};
/// use phalanx::ReduceOp;
/// use std::time::Duration;
///
/// let backend = StandIn::new(Capabilities::ALL, Duration::from_secs(5));
/// let id = backend.unique_id()?;
/// let mut comm = backend.init(&id, 0, 1)?;
/// let mut buf = vec![1.0_f32, 2.0];
/// with_backup(&mut comm, &mut buf, |c, b| c.all_reduce(b, ReduceOp::Sum))?;
/// assert_eq!(buf, [1.0, 2.0]);
/// # Ok::<(), phalanx::device::DeviceError>(())
/// ```
pub fn with_backup<C: DeviceMemory>(
    comm: &mut C,
    buf: &mut C::Buffer,
    collective: impl FnOnce(&mut C, &mut C::Buffer) -> Result<(), DeviceError>,
) -> Result<(), DeviceError> {
    with_backups(comm, std::slice::from_mut(buf), |_| true, |c, bufs| collective(c, &mut bufs[0]))
}

/// [`with_backup`] for a collective of several buffers (send/recv, all-to-all): a backup
/// of each buffer `i` for which `written(i)` holds, all put back on failure.
pub fn with_backups<C: DeviceMemory>(
    comm: &mut C,
    bufs: &mut [C::Buffer],
    written: impl Fn(usize) -> bool,
    collective: impl FnOnce(&mut C, &mut [C::Buffer]) -> Result<(), DeviceError>,
) -> Result<(), DeviceError> {
    let mut backups = Vec::new();
    for (i, b) in bufs.iter().enumerate().filter(|(i, _)| written(*i)) {
        backups.push((i, Backup::take(comm, b)?));
    }
    let outcome = collective(comm, bufs).and_then(|()| comm.finish());
    let Err(error) = outcome else { return Ok(()) };
    // Abort first: the restores are enqueued behind the collective's kernels.
    let _ = comm.abort();
    for (i, backup) in &backups {
        if let Err(r) = backup.restore(comm, &mut bufs[*i]) {
            return Err(DeviceError::Aborted {
                reason: format!("{error}; and buffer {i} could not be restored from its backup: {r}"),
            });
        }
    }
    Err(error)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::device::standin::StandIn;
    use crate::device::{Capabilities, DeviceBackend};
    use crate::dtype::ReduceOp;

    #[test]
    fn a_failed_collective_leaves_the_buffer_as_it_was() {
        let backend = StandIn::new(Capabilities::ALL, Duration::from_secs(5));
        let id = backend.unique_id().unwrap();
        let mut comm = backend.init(&id, 0, 1).unwrap();
        let mut buf = vec![1.0_f32, 2.0, 3.0];
        // The collective writes part of the buffer, then fails (a peer lost half-way).
        let e = with_backup(&mut comm, &mut buf, |_, b| {
            b[1] = 99.0;
            Err(DeviceError::Call { call: "ncclAllReduce", code: 6, message: "remote error".into() })
        })
        .unwrap_err();
        assert!(matches!(e, DeviceError::Call { code: 6, .. }), "{e}");
        assert_eq!(buf, [1.0, 2.0, 3.0]);
        // The communicator was aborted: the next collective fails until one is re-made.
        assert!(comm.all_reduce(&mut buf, ReduceOp::Sum).is_err());
    }

    #[test]
    fn a_successful_collective_keeps_its_result() {
        let backend = StandIn::new(Capabilities::ALL, Duration::from_secs(5));
        let id = backend.unique_id().unwrap();
        let mut comm = backend.init(&id, 0, 1).unwrap();
        let mut buf = vec![1.0_f32, 2.0];
        with_backup(&mut comm, &mut buf, |_, b| {
            b[0] = 5.0;
            Ok(())
        })
        .unwrap();
        assert_eq!(buf, [5.0, 2.0]);
    }

    #[test]
    fn memory_operations_check_their_lengths() {
        let backend = StandIn::new(Capabilities::ALL, Duration::from_secs(5));
        let id = backend.unique_id().unwrap();
        let mut comm = backend.init(&id, 0, 1).unwrap();
        let mut a = comm.alloc(3, DType::F32).unwrap();
        assert_eq!(a.len(), 3);
        comm.upload(bytemuck::cast_slice(&[1.0_f32, 2.0, 3.0]), &mut a).unwrap();
        let mut back = [0.0_f32; 3];
        comm.download(&a, bytemuck::cast_slice_mut(&mut back)).unwrap();
        assert_eq!(back, [1.0, 2.0, 3.0]);
        assert!(comm.upload(&[0; 8], &mut a).is_err(), "8 bytes are not 3 floats");
        assert!(comm.download(&a, &mut [0; 4]).is_err());
        let mut b = comm.alloc(2, DType::F32).unwrap();
        assert!(comm.copy_prefix(&a, &mut b, 3).is_err(), "3 elements do not fit 2");
        comm.copy_prefix(&a, &mut b, 2).unwrap();
        assert_eq!(b, [1.0, 2.0]);
        assert!(comm.alloc(2, DType::F64).is_err(), "the stand-in holds f32 only");
        let backup = Backup::take(&mut comm, &a).unwrap();
        assert!(backup.restore(&mut comm, &mut b).is_err(), "a backup of 3 for a buffer of 2");
    }
}
