//! The CPU stand-in for NCCL: ranks are threads of one process, buffers are host
//! `Vec<f32>`, a shared fabric (a mutex and a condition variable) meets their calls.
//! It implements [`DeviceBackend`] and [`DeviceComm`] with the same contract as the NCCL
//! backend, so the membership protocol and the hierarchical plan run with no GPU.
//!
//! Faults are injected through [`StandIn::fail`] (what NCCL reports as a remote error
//! once a peer is lost); a rank that waits longer than the hang timeout gets an error
//! too, as a watchdog would give it. The [`Capabilities`] are chosen at construction,
//! so both sides of every capability branch are tested.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{AsyncState, Capabilities, DeviceBackend, DeviceComm, DeviceError, UniqueId};
use crate::dtype::ReduceOp;

/// NCCL's `ncclRemoteError`: what a peer's loss looks like.
pub const REMOTE_ERROR: i32 = 6;

/// What one rank brings to a round.
#[derive(Debug, Clone)]
enum Contribution {
    Data(Vec<f32>),
    Sends(Vec<(usize, Vec<f32>)>),
}

#[derive(Default)]
struct Round {
    parts: Vec<Option<Contribution>>,
    taken: usize,
}

struct Group {
    size: usize,
    rounds: HashMap<u64, Round>,
    failed: Option<String>,
    /// The ranks made so far (see [`StandIn::with_collective_creation`]).
    created: Vec<bool>,
}

#[derive(Default)]
struct Fabric {
    groups: Mutex<HashMap<UniqueId, Group>>,
    changed: Condvar,
    next_id: AtomicU64,
}

impl Fabric {
    fn lock(&self) -> MutexGuard<'_, HashMap<UniqueId, Group>> {
        // A rank thread that panicked mid-round leaves consistent maps (every update is
        // one insert or remove): go on with them.
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The stand-in backend: every communicator made from one `StandIn` (or its clones)
/// meets the others on the same fabric.
#[derive(Clone)]
pub struct StandIn {
    fabric: Arc<Fabric>,
    caps: Capabilities,
    hang_timeout: Duration,
    /// Creation completes once every rank of the group was made.
    collective_creation: bool,
}

impl StandIn {
    /// A fabric with these capabilities; a rank waiting longer than `hang_timeout` for
    /// the others fails with a remote error.
    pub fn new(caps: Capabilities, hang_timeout: Duration) -> StandIn {
        StandIn { fabric: Arc::default(), caps, hang_timeout, collective_creation: false }
    }

    /// This stand-in, with a communicator's creation in progress (its async state) until
    /// every rank of its group was made, as NCCL's non-blocking init: a rank that never
    /// comes keeps the others' creation waiting. (By default creation completes at once.)
    pub fn with_collective_creation(mut self) -> StandIn {
        self.collective_creation = true;
        self
    }

    /// Marks the communicator of `id` failed (a lost peer, as NCCL reports it): every
    /// pending and later call on it fails, and its async state is `Failed`.
    pub fn fail(&self, id: &UniqueId, reason: &str) {
        if let Some(g) = self.fabric.lock().get_mut(id) {
            g.failed.get_or_insert_with(|| reason.to_string());
        }
        self.fabric.changed.notify_all();
    }

    fn comm(&self, id: UniqueId, rank: usize, size: usize) -> Result<StandInComm, DeviceError> {
        if size == 0 || rank >= size {
            return Err(DeviceError::InvalidArgument(format!("rank {rank} of {size}")));
        }
        let mut groups = self.fabric.lock();
        let g = groups.entry(id).or_insert_with(|| Group {
            size,
            rounds: HashMap::new(),
            failed: None,
            created: vec![false; size],
        });
        if g.size != size {
            return Err(DeviceError::InvalidArgument(format!("size {size}, but the group of this id has {}", g.size)));
        }
        g.created[rank] = true;
        Ok(StandInComm { backend: self.clone(), id, rank, size, seq: 0, aborted: false })
    }
}

impl DeviceBackend for StandIn {
    type Comm = StandInComm;

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn unique_id(&self) -> Result<UniqueId, DeviceError> {
        let n = self.fabric.next_id.fetch_add(1, Ordering::Relaxed);
        let mut id = [0u8; 128];
        id[..8].copy_from_slice(b"standin:");
        id[8..16].copy_from_slice(&n.to_le_bytes());
        Ok(UniqueId(id))
    }

    fn init(&self, id: &UniqueId, rank: usize, size: usize) -> Result<StandInComm, DeviceError> {
        self.comm(*id, rank, size)
    }

    fn join_grown(&self, id: &UniqueId, rank: usize, size: usize) -> Result<StandInComm, DeviceError> {
        if !self.caps.grow {
            return Err(unsupported("ncclCommGrow"));
        }
        self.comm(*id, rank, size)
    }
}

fn unsupported(operation: &'static str) -> DeviceError {
    DeviceError::Unsupported { operation, hint: "re-create the communicator with a fresh unique id".into() }
}

/// A communicator of the stand-in: one rank's handle on its group.
pub struct StandInComm {
    backend: StandIn,
    id: UniqueId,
    rank: usize,
    size: usize,
    seq: u64,
    aborted: bool,
}

impl StandInComm {
    /// The unique id this communicator was created from (or derived by a shrink).
    pub fn id(&self) -> UniqueId {
        self.id
    }

    /// Brings `mine` to the current round and returns every rank's contribution, in rank
    /// order, once all are there.
    fn exchange(&mut self, mine: Contribution) -> Result<Vec<Contribution>, DeviceError> {
        if self.aborted {
            return Err(DeviceError::Aborted { reason: "this communicator was aborted".into() });
        }
        let fabric = &self.backend.fabric;
        let deadline = Instant::now() + self.backend.hang_timeout;
        let (seq, rank, size) = (self.seq, self.rank, self.size);
        let mut groups = fabric.lock();
        let round = groups
            .get_mut(&self.id)
            .map(|g| g.rounds.entry(seq).or_insert_with(|| Round { parts: vec![None; size], taken: 0 }))
            .ok_or_else(|| DeviceError::Aborted { reason: "the group is gone".into() })?;
        round.parts[rank] = Some(mine);
        fabric.changed.notify_all();
        loop {
            let g =
                groups.get_mut(&self.id).ok_or_else(|| DeviceError::Aborted { reason: "the group is gone".into() })?;
            if let Some(reason) = &g.failed {
                return Err(DeviceError::Call {
                    call: "stand-in collective",
                    code: REMOTE_ERROR,
                    message: reason.clone(),
                });
            }
            let round = g.rounds.entry(seq).or_default();
            if round.parts.iter().all(Option::is_some) {
                let parts: Vec<Contribution> = round.parts.iter().flatten().cloned().collect();
                round.taken += 1;
                if round.taken == size {
                    g.rounds.remove(&seq);
                }
                self.seq += 1;
                return Ok(parts);
            }
            let now = Instant::now();
            if now >= deadline {
                let reason = format!("no progress for {:?}: a peer is lost or hung", self.backend.hang_timeout);
                return Err(DeviceError::Call { call: "stand-in collective", code: REMOTE_ERROR, message: reason });
            }
            groups = fabric.changed.wait_timeout(groups, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn data(parts: &[Contribution]) -> Result<Vec<&[f32]>, DeviceError> {
        parts
            .iter()
            .map(|p| match p {
                Contribution::Data(d) => Ok(d.as_slice()),
                Contribution::Sends(_) => Err(mismatch("a collective met a send/recv group")),
            })
            .collect()
    }

    /// Every rank's buffer reduced in rank order (deterministic).
    fn reduced(parts: &[Contribution], op: ReduceOp) -> Result<Vec<f32>, DeviceError> {
        let bufs = Self::data(parts)?;
        let first = bufs.first().ok_or_else(|| mismatch("no contribution"))?;
        if bufs.iter().any(|b| b.len() != first.len()) {
            return Err(mismatch("ranks passed buffers of different lengths"));
        }
        let mut out = first.to_vec();
        for b in &bufs[1..] {
            for (o, x) in out.iter_mut().zip(b.iter()) {
                *o = match op {
                    ReduceOp::Sum | ReduceOp::Avg => *o + x,
                    ReduceOp::Prod => *o * x,
                    ReduceOp::Min => o.min(*x),
                    ReduceOp::Max => o.max(*x),
                };
            }
        }
        if op == ReduceOp::Avg {
            let n = bufs.len() as f32;
            out.iter_mut().for_each(|o| *o /= n);
        }
        Ok(out)
    }
}

fn mismatch(what: &str) -> DeviceError {
    DeviceError::InvalidArgument(format!("mismatched calls: {what}"))
}

impl DeviceComm for StandInComm {
    type Buffer = Vec<f32>;

    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce(&mut self, buf: &mut Vec<f32>, op: ReduceOp) -> Result<(), DeviceError> {
        let parts = self.exchange(Contribution::Data(buf.clone()))?;
        *buf = Self::reduced(&parts, op)?;
        Ok(())
    }

    fn reduce_scatter(&mut self, send: &Vec<f32>, recv: &mut Vec<f32>, op: ReduceOp) -> Result<(), DeviceError> {
        if send.len() != recv.len() * self.size {
            return Err(DeviceError::InvalidArgument(format!(
                "reduce-scatter of {} elements into {} on {} ranks",
                send.len(),
                recv.len(),
                self.size
            )));
        }
        let parts = self.exchange(Contribution::Data(send.clone()))?;
        let all = Self::reduced(&parts, op)?;
        let n = recv.len();
        recv.copy_from_slice(&all[self.rank * n..(self.rank + 1) * n]);
        Ok(())
    }

    fn all_gather(&mut self, send: &Vec<f32>, recv: &mut Vec<f32>) -> Result<(), DeviceError> {
        if recv.len() != send.len() * self.size {
            return Err(DeviceError::InvalidArgument(format!(
                "all-gather of {} elements into {} on {} ranks",
                send.len(),
                recv.len(),
                self.size
            )));
        }
        let parts = self.exchange(Contribution::Data(send.clone()))?;
        let bufs = Self::data(&parts)?;
        if bufs.iter().any(|b| b.len() != send.len()) {
            return Err(mismatch("ranks passed buffers of different lengths"));
        }
        *recv = bufs.concat();
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut Vec<f32>, root: usize) -> Result<(), DeviceError> {
        if root >= self.size {
            return Err(DeviceError::InvalidArgument(format!("root {root} of {}", self.size)));
        }
        let mine = if self.rank == root { buf.clone() } else { Vec::new() };
        let parts = self.exchange(Contribution::Data(mine))?;
        let from_root = Self::data(&parts)?[root];
        if from_root.len() != buf.len() {
            return Err(mismatch("the root's buffer has another length"));
        }
        buf.copy_from_slice(from_root);
        Ok(())
    }

    fn reduce(&mut self, buf: &mut Vec<f32>, root: usize, op: ReduceOp) -> Result<(), DeviceError> {
        if root >= self.size {
            return Err(DeviceError::InvalidArgument(format!("root {root} of {}", self.size)));
        }
        let parts = self.exchange(Contribution::Data(buf.clone()))?;
        let out = Self::reduced(&parts, op)?;
        if self.rank == root {
            *buf = out;
        }
        Ok(())
    }

    fn send_recv(
        &mut self,
        sends: &[(usize, &Vec<f32>)],
        recvs: &mut [(usize, &mut Vec<f32>)],
    ) -> Result<(), DeviceError> {
        let mut peers = sends.iter().map(|(p, _)| *p).chain(recvs.iter().map(|(p, _)| *p));
        if let Some(peer) = peers.find(|&p| p >= self.size) {
            return Err(DeviceError::InvalidArgument(format!("peer {peer} of {}", self.size)));
        }
        let mine = Contribution::Sends(sends.iter().map(|(p, b)| (*p, (*b).clone())).collect());
        let parts = self.exchange(mine)?;
        for (peer, buf) in recvs.iter_mut() {
            let Contribution::Sends(from_peer) = &parts[*peer] else {
                return Err(mismatch("a send/recv group met a collective"));
            };
            let data = from_peer
                .iter()
                .find(|(to, _)| *to == self.rank)
                .ok_or_else(|| mismatch(&format!("rank {peer} sent nothing to rank {}", self.rank)))?;
            if data.1.len() != buf.len() {
                return Err(mismatch("a send and its receive differ in length"));
            }
            buf.copy_from_slice(&data.1);
        }
        Ok(())
    }

    fn abort(&mut self) -> Result<(), DeviceError> {
        self.aborted = true;
        self.backend.fail(&self.id, &format!("rank {} aborted the communicator", self.rank));
        Ok(())
    }

    fn revoke(&mut self) -> Result<(), DeviceError> {
        if !self.backend.caps.revoke {
            return Err(unsupported("ncclCommRevoke"));
        }
        self.backend.fail(&self.id, &format!("rank {} revoked the communicator", self.rank));
        Ok(())
    }

    fn shrink(&mut self, exclude: &[usize]) -> Result<StandInComm, DeviceError> {
        if !self.backend.caps.shrink {
            return Err(unsupported("ncclCommShrink"));
        }
        let mut excluded: Vec<usize> = exclude.to_vec();
        excluded.sort_unstable();
        excluded.dedup();
        if excluded.contains(&self.rank) || excluded.iter().any(|&r| r >= self.size) || excluded.len() >= self.size {
            return Err(DeviceError::InvalidArgument(format!(
                "rank {} of {} cannot shrink without {excluded:?}",
                self.rank, self.size
            )));
        }
        // Every survivor derives the same id from the parent's and the excluded ranks.
        let mut h = blake3::Hasher::new();
        h.update(&self.id.0);
        for r in &excluded {
            h.update(&(*r as u64).to_le_bytes());
        }
        let mut id = [0u8; 128];
        id[..32].copy_from_slice(h.finalize().as_bytes());
        let rank = self.rank - excluded.iter().filter(|&&r| r < self.rank).count();
        self.backend.comm(UniqueId(id), rank, self.size - excluded.len())
    }

    fn grow(&mut self, id: &UniqueId, size: usize) -> Result<StandInComm, DeviceError> {
        if !self.backend.caps.grow {
            return Err(unsupported("ncclCommGrow"));
        }
        if size <= self.size {
            return Err(DeviceError::InvalidArgument(format!("grow from {} to {size}", self.size)));
        }
        self.backend.comm(*id, self.rank, size)
    }

    fn async_state(&self) -> Result<AsyncState, DeviceError> {
        let groups = self.backend.fabric.lock();
        let group = groups.get(&self.id);
        Ok(match group.and_then(|g| g.failed.clone()) {
            Some(reason) => AsyncState::Failed(DeviceError::Call {
                call: "ncclCommGetAsyncError",
                code: REMOTE_ERROR,
                message: reason,
            }),
            None if self.backend.collective_creation && group.is_some_and(|g| g.created.contains(&false)) => {
                AsyncState::InProgress
            }
            None => AsyncState::Ready,
        })
    }
}
