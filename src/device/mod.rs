//! The device (GPU) path: the operations phalanx needs from NCCL, behind one trait.
//!
//! - [`DeviceBackend`] creates communicators from a [`UniqueId`] for a rank and size;
//!   [`DeviceComm`] runs collectives on the backend's buffers and reports and recovers
//!   from failures (abort, revoke, shrink, grow, the asynchronous error state).
//! - [`standin`]: an in-process CPU implementation (always compiled) so that the
//!   membership protocol and the hierarchical plan are tested with no GPU.
//! - `nccl` (feature `nccl`): the real implementation over a libnccl loaded at run time,
//!   found by [`discovery`] and checked by [`gating`] before any call into it.
//! - [`membership`]: the sans-IO decisions (unique id per epoch, abort/revoke, shrink
//!   or fresh init, grow or fresh init); [`driver`] carries them out on a backend;
//!   [`session`] keeps a driver in step with a [`crate::Communicator`]'s views, each
//!   view's unique id carried by the master; [`hier`]: the hierarchical all-reduce plan;
//!   [`op`]: a collective as data, run on either backend (the C and Python faces).

use std::time::{Duration, Instant};

use crate::dtype::ReduceOp;

pub mod discovery;
pub mod driver;
pub mod error;
pub mod gating;
pub mod hier;
pub mod membership;
pub mod memory;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod op;
pub mod session;
pub mod standin;
mod standin_memory;

pub use error::{Attempt, DeviceError};
pub use gating::{Capabilities, NcclVersion};

/// NCCL's unique id (`ncclUniqueId`, 128 opaque bytes): made by one rank for each
/// communicator (each epoch), handed to every other rank through the master.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct UniqueId(pub [u8; 128]);

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The first bytes are enough to tell ids apart in logs and assertions.
        write!(f, "UniqueId({:02x?}..)", &self.0[..8])
    }
}

/// The asynchronous state of a communicator (`ncclCommGetAsyncError`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AsyncState {
    /// No error; nothing pending.
    Ready,
    /// A non-blocking call (creation, a collective) is still in progress.
    InProgress,
    /// The communicator failed; it must be aborted and re-created.
    Failed(DeviceError),
}

/// Creates device communicators.
pub trait DeviceBackend {
    /// The communicator this backend creates.
    type Comm: DeviceComm;

    /// What the backend (the loaded NCCL) can do: it decides between shrink and a fresh
    /// init, grow and a fresh init, revoke and abort.
    fn capabilities(&self) -> Capabilities;

    /// A new unique id (`ncclGetUniqueId`), made by one rank and sent to the others.
    fn unique_id(&self) -> Result<UniqueId, DeviceError>;

    /// Joins the communicator of `id` as `rank` of `size` (`ncclCommInitRankConfig`,
    /// non-blocking where available); returns once it is ready.
    fn init(&self, id: &UniqueId, rank: usize, size: usize) -> Result<Self::Comm, DeviceError>;

    /// Joins a communicator that running ranks grow to `size` with `id`
    /// (`ncclCommGrow` with no parent). [`DeviceError::Unsupported`] without grow.
    fn join_grown(&self, id: &UniqueId, rank: usize, size: usize) -> Result<Self::Comm, DeviceError>;
}

/// A device communicator: NCCL's collectives on the backend's buffers, and its failure
/// handling. A collective that fails leaves the communicator unusable: abort it and
/// re-create one (shrink, or a fresh init over the survivors).
pub trait DeviceComm: Send + Sized {
    /// A buffer in device memory (a host `Vec<f32>` in the stand-in).
    type Buffer;

    /// This rank.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;

    /// Reduces `buf` over every rank, in place.
    fn all_reduce(&mut self, buf: &mut Self::Buffer, op: ReduceOp) -> Result<(), DeviceError>;
    /// Reduces `send` (`size` equal shards) over every rank; shard `rank` lands in `recv`.
    fn reduce_scatter(&mut self, send: &Self::Buffer, recv: &mut Self::Buffer, op: ReduceOp)
        -> Result<(), DeviceError>;
    /// Concatenates every rank's `send`, in rank order, into `recv`.
    fn all_gather(&mut self, send: &Self::Buffer, recv: &mut Self::Buffer) -> Result<(), DeviceError>;
    /// Copies `root`'s `buf` into every rank's `buf`.
    fn broadcast(&mut self, buf: &mut Self::Buffer, root: usize) -> Result<(), DeviceError>;
    /// Reduces `buf` over every rank into `root`'s `buf` (the others' are unchanged).
    fn reduce(&mut self, buf: &mut Self::Buffer, root: usize, op: ReduceOp) -> Result<(), DeviceError>;
    /// Sends and receives as one group (`ncclGroupStart`/`End` around `ncclSend` and
    /// `ncclRecv`): each `(peer, buffer)` of `sends` goes to `peer`, each of `recvs` is
    /// filled from `peer`. All-to-all is one such group.
    fn send_recv(
        &mut self,
        sends: &[(usize, &Self::Buffer)],
        recvs: &mut [(usize, &mut Self::Buffer)],
    ) -> Result<(), DeviceError>;

    /// Aborts every pending operation and tears the communicator down
    /// (`ncclCommAbort`), so that no rank waits on a lost peer forever.
    fn abort(&mut self) -> Result<(), DeviceError>;
    /// Revokes pending operations but keeps the communicator for a shrink
    /// (`ncclCommRevoke`); [`DeviceError::Unsupported`] without it.
    fn revoke(&mut self) -> Result<(), DeviceError>;
    /// The communicator of the ranks not in `exclude` (`ncclCommShrink`), with ranks
    /// renumbered in order; [`DeviceError::Unsupported`] without it.
    fn shrink(&mut self, exclude: &[usize]) -> Result<Self, DeviceError>;
    /// This communicator grown to `size` ranks with `id` (`ncclCommGrow`); this rank
    /// keeps its number. [`DeviceError::Unsupported`] without it.
    fn grow(&mut self, id: &UniqueId, size: usize) -> Result<Self, DeviceError>;
    /// The asynchronous error state (`ncclCommGetAsyncError`).
    fn async_state(&self) -> Result<AsyncState, DeviceError>;
}

/// Waits until `poll` (a communicator's [`DeviceComm::async_state`]) no longer reads
/// [`AsyncState::InProgress`], sleeping `interval` between checks (never spinning), for
/// at most `timeout`. Returns the last state (`InProgress` on timeout), or the error of
/// reading it.
pub fn wait_settled(
    mut poll: impl FnMut() -> Result<AsyncState, DeviceError>,
    interval: Duration,
    timeout: Duration,
) -> Result<AsyncState, DeviceError> {
    // A timeout too large to add to the clock means no deadline.
    let deadline = Instant::now().checked_add(timeout);
    // A zero interval would spin: a millisecond is the shortest pause.
    let interval = interval.max(Duration::from_millis(1));
    loop {
        let state = poll()?;
        let now = Instant::now();
        let left = deadline.map(|d| d.saturating_duration_since(now));
        if state != AsyncState::InProgress || left == Some(Duration::ZERO) {
            return Ok(state);
        }
        std::thread::sleep(left.map_or(interval, |l| interval.min(l)));
    }
}

#[cfg(test)]
mod membership_tests;
#[cfg(test)]
mod standin_tests;
