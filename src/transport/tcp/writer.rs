//! The sending half of a TCP link: whoever sends writes to the socket itself.
//!
//! A send takes the [`Writer`] (a fair async mutex), seals the frame when the link is
//! encrypted, and writes it with non-blocking vectored writes from where it lies — the
//! caller's slice, the frame's payload — waiting for room in the socket between them.
//! No task sits between the executor and the socket, so a frame costs no thread
//! hand-off, and a plaintext slice is copied only by the kernel (a writer task would
//! need its own copy of a borrowed slice, and a wake-up per frame).
//!
//! # Cancellation
//!
//! A send cancelled before its frame was committed hands over nothing. A frame is
//! committed once a byte of it was written, or, on an encrypted link, once it was
//! sealed (its record numbers are spent: the peer cannot open what follows without it).
//! A send cancelled after that hands over the whole frame: the rest is copied and
//! written by a task that keeps the writer until it is out, so the stream never carries
//! part of a frame followed by another. Without a runtime to run that task (a send
//! dropped outside one), the rest waits in the writer and goes out before the next
//! frame.

use std::io::IoSlice;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{watch, Mutex, OwnedMutexGuard};

use super::frames::SMALL_PAYLOAD;
use super::sealed::{Sealer, TAG_LEN};
use crate::transport::buffers::BufferPool;
use crate::transport::{prefix_of, Header, PREFIX_LEN};

/// How many free bytes an encrypted link keeps for sealing borrowed payloads in: four
/// default chunks (one is out at a time per sender).
pub(super) const SEAL_POOL_BYTES: usize = 1 << 20;

/// What a frame's sender hands over: a borrowed slice, or a payload it owns.
pub(super) enum Payload<'a> {
    Slice(&'a [u8]),
    Owned(Bytes),
}

impl Payload<'_> {
    pub(super) fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Payload::Slice(s) => s,
            Payload::Owned(b) => b,
        }
    }
}

/// What the senders share: the socket, the sealer, and the rest of a cancelled frame.
struct State {
    /// `None` once the link is closed: the half is dropped, which ends the stream.
    socket: Option<OwnedWriteHalf>,
    /// Seals each frame on an encrypted link.
    sealer: Option<Sealer>,
    /// Wire bytes a cancelled send committed and did not write; they go out first.
    rest: Bytes,
    /// Whether the link is down: the task writing a cancelled frame's rest gives up.
    down: watch::Receiver<bool>,
}

/// The sending half of one connection; see the module docs.
pub(super) struct Writer {
    state: Arc<Mutex<State>>,
    /// The buffers an encrypted link seals borrowed payloads in.
    pub(super) pool: Arc<BufferPool>,
}

impl Writer {
    /// A writer on `socket`, sealing with `sealer` when the link is encrypted; `down`
    /// turns true when the link goes down.
    pub(super) fn new(socket: OwnedWriteHalf, sealer: Option<Sealer>, down: watch::Receiver<bool>) -> Writer {
        let state = State { socket: Some(socket), sealer, rest: Bytes::new(), down };
        Writer { state: Arc::new(Mutex::new(state)), pool: BufferPool::new(SEAL_POOL_BYTES) }
    }

    /// Drops the socket once no send holds it: the peer reads the end of the stream.
    /// A send waiting for room holds it until the caller gives up on that send (a link
    /// going down makes every send give up).
    pub(super) async fn shut(&self) {
        self.state.lock().await.socket = None;
    }

    /// Writes one frame whole; see the module docs for what a cancelled call hands over.
    pub(super) async fn write(&self, header: Header, payload: Payload<'_>) -> std::io::Result<()> {
        let mut state = self.state.clone().lock_owned().await;
        write_rest(&mut state).await?;
        let prefix = prefix_of(&header, payload.as_slice().len());
        let Some(sealer) = state.sealer.as_mut() else {
            let parts = [&prefix[..], payload.as_slice()];
            return Writing { state: Some(state), parts: &parts, done: 0, committed: false }.run().await;
        };
        // Small frames are one record (prefix and payload), larger ones two. A payload is
        // sealed where it lies when the frame holds it alone; a borrowed or shared one is
        // first copied into a buffer of the pool.
        let len = payload.as_slice().len();
        let small = len <= SMALL_PAYLOAD;
        let mut first = BytesMut::with_capacity(PREFIX_LEN + if small { len } else { 0 });
        first.extend_from_slice(&prefix);
        let mut second = None;
        if small {
            first.extend_from_slice(payload.as_slice());
        } else {
            second = Some(match payload {
                Payload::Owned(b) => b.try_into_mut().unwrap_or_else(|shared| BytesMut::from(&shared[..])),
                Payload::Slice(s) => {
                    let mut buf = self.pool.take(s.len());
                    buf.extend_from_slice(s);
                    BytesMut::from(Bytes::from(buf))
                }
            });
        }
        let (head1, tag1) = sealer.seal(&mut first)?;
        let (head2, tag2) = match second.as_mut() {
            Some(data) => sealer.seal(data)?,
            None => ([0; 4], [0; TAG_LEN]),
        };
        let parts = match second.as_deref() {
            Some(data) => [&head1[..], &first[..], &tag1[..], &head2[..], data, &tag2[..]],
            None => [&head1[..], &first[..], &tag1[..], &[], &[], &[]],
        };
        Writing { state: Some(state), parts: &parts, done: 0, committed: true }.run().await?;
        // The sealed payload's buffer goes back for the next borrowed one.
        if let Some(used) = second {
            let mut used = Vec::from(used);
            used.clear();
            self.pool.give(used);
        }
        Ok(())
    }
}

/// Writes what a cancelled send left, if anything.
async fn write_rest(state: &mut OwnedMutexGuard<State>) -> std::io::Result<()> {
    while !state.rest.is_empty() {
        let socket = state.socket.as_ref().ok_or_else(closed)?;
        match socket.try_write(&state.rest) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                bytes::Buf::advance(&mut state.rest, n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => socket.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn closed() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotConnected, "the link is closed")
}

/// One frame being written, as its wire bytes in pieces; a cancelled one leaves its
/// rest to a task (see the module docs).
struct Writing<'p> {
    /// Taken by `Drop` to hand the rest over.
    state: Option<OwnedMutexGuard<State>>,
    parts: &'p [&'p [u8]],
    /// Bytes of `parts` written.
    done: usize,
    /// Whether the frame must go out whole once begun (see the module docs).
    committed: bool,
}

impl Writing<'_> {
    /// Writes the frame; whether it went out or failed, nothing is left to hand over.
    async fn run(mut self) -> std::io::Result<()> {
        let result = self.write_all().await;
        self.committed = false;
        result
    }

    async fn write_all(&mut self) -> std::io::Result<()> {
        loop {
            let mut bufs = [IoSlice::new(&[]); 6];
            let mut count = 0;
            for (buf, rest) in bufs.iter_mut().zip(unwritten(self.parts, self.done)) {
                *buf = IoSlice::new(rest);
                count += 1;
            }
            if count == 0 {
                return Ok(());
            }
            let socket = self.state.as_ref().and_then(|s| s.socket.as_ref()).ok_or_else(closed)?;
            match socket.try_write_vectored(&bufs[..count]) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.done += n;
                    self.committed = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => socket.writable().await?,
                Err(e) => return Err(e),
            }
        }
    }
}

/// What is left of `parts` after its first `done` bytes: the non-empty tails, in order.
fn unwritten<'p>(parts: &'p [&'p [u8]], done: usize) -> impl Iterator<Item = &'p [u8]> {
    let mut skip = done;
    parts.iter().filter_map(move |part| {
        let from = skip.min(part.len());
        skip -= from;
        Some(&part[from..]).filter(|rest| !rest.is_empty())
    })
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        if !self.committed {
            return;
        }
        let Some(mut state) = self.state.take() else { return };
        if state.socket.is_none() {
            return; // closed: nothing more goes out
        }
        state.rest = Bytes::from(unwritten(self.parts, self.done).collect::<Vec<_>>().concat());
        // A failed write of the rest is the connection failing: the link's reader sees
        // it too, and takes the link down.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let mut down = state.down.clone();
            runtime.spawn(async move {
                tokio::select! {
                    _ = write_rest(&mut state) => {}
                    _ = down.wait_for(|d| *d) => {}
                }
            });
        }
    }
}
