//! The runner's messages, pinned to the view an iteration began in: sends started and
//! waited for at the iteration's end, receives posted ahead ([`super::ahead`]).

use super::{At, Direction, RunError};
use crate::comm::PendingP2pRaw;
use crate::dtype::Element;
use crate::error::Error;
use crate::plan::Rank;
use crate::Communicator;

/// A communicator whose messages travel in one view only (see [`super::Runner::run`]).
pub(super) struct Pinned<'c> {
    pub(super) comm: &'c mut Communicator,
    epoch: u64,
    /// Sends started and not yet waited for: each pass's output leaves while the next
    /// passes compute, and the iteration waits for all of them before it returns.
    sending: Vec<Sending>,
}

/// An activation or gradient on its way to a neighbour stage.
struct Sending {
    at: At,
    dir: Direction,
    peer: Rank,
    pending: PendingP2pRaw,
}

impl<'c> Pinned<'c> {
    /// Pins `comm` to its current view.
    pub(super) fn new(comm: &'c mut Communicator) -> Pinned<'c> {
        let epoch = comm.epoch();
        Pinned { comm, epoch, sending: Vec::new() }
    }

    pub(super) fn send<T: Element>(&mut self, to: Rank, tag: u32, data: &[T]) -> Result<(), Error> {
        self.comm.send_in(self.epoch, to, tag, data)
    }

    /// Starts sending `data` and returns at once (see [`Pinned::sending`]).
    pub(super) fn isend<T: Element>(
        &mut self,
        (at, dir): (At, Direction),
        to: Rank,
        tag: u32,
        data: &[T],
    ) -> Result<(), Error> {
        let bytes = bytemuck::cast_slice(data).to_vec();
        let pending = self.comm.isend_raw_in(self.epoch, to, tag, bytes, T::DTYPE)?;
        self.sending.push(Sending { at, dir, peer: to, pending });
        Ok(())
    }

    /// Waits for every started send; the first failure, in the order they were started.
    pub(super) fn sent(&mut self) -> Result<(), RunError> {
        let mut first = Ok(());
        for s in self.sending.drain(..) {
            if let (Err(source), _) = s.pending.wait() {
                if first.is_ok() {
                    first = Err(send_error(s.at, s.dir, s.peer, source));
                }
            }
        }
        first
    }

    pub(super) fn recv<T: Element>(&mut self, from: Rank, tag: u32, buf: &mut [T]) -> Result<(), Error> {
        self.comm.recv_in(self.epoch, from, tag, buf)
    }

    /// Starts receiving `len` elements of type `T` with `tag` from `from`.
    pub(super) fn irecv<T: Element>(&mut self, from: Rank, tag: u32, len: usize) -> Result<PendingP2pRaw, Error> {
        let buf = vec![0u8; len * std::mem::size_of::<T>()];
        self.comm.irecv_raw_in(self.epoch, from, tag, buf, T::DTYPE)
    }
}

/// A failed send of pass `at` to `peer`.
pub(super) fn send_error(at: At, dir: Direction, peer: Rank, source: Error) -> RunError {
    RunError::Comm {
        at: Some(at),
        what: match dir {
            Direction::Activation => "sending the activation to",
            Direction::Gradient => "sending the gradient to",
        },
        peer,
        source: Box::new(source),
    }
}

/// A failed receive of pass `at` from `peer`.
pub(super) fn recv_error(at: At, dir: Direction, peer: Rank, source: Error) -> RunError {
    RunError::Comm {
        at: Some(at),
        what: match dir {
            Direction::Activation => "receiving the activation from",
            Direction::Gradient => "receiving the gradient from",
        },
        peer,
        source: Box::new(source),
    }
}
