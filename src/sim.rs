//! A deterministic simulator: all ranks' plans in one process, with faults injected.
//!
//! The ranks run as tasks of a single-threaded runtime over the in-memory transport, so
//! a run is a pure function of its inputs. A [`Fault`] makes one rank vanish after a
//! given step (its links close, as when a process dies).
//!
//! Completion is agreed by the production protocol: every rank's peer state machine
//! and the master's run as a [`Pair`] (no sockets, no clock), the ranks report their
//! local results to it, and a rank keeps its result only when the master commits.

use std::sync::Arc;
use std::time::Duration;

use crate::dtype::{DType, ReduceOp};
use crate::error::Error;
use crate::exec::{execute, AbortSignal, Call};
use crate::membership::pair::Pair;
use crate::membership::peer::{OpKind, PeerConfig};
use crate::op::CustomOp;
use crate::plan::{Plan, Rank};
use crate::quant::Codec;
use crate::transport::mem;

/// Rank `rank` completes steps `0..after_steps` of its plan, then disappears.
///
/// When `after_steps` covers the whole plan, the rank reports its plan finished before
/// it dies, so the survivors may complete the collective (if they all finish before the
/// loss is noticed) or all fail; otherwise every survivor fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The rank that dies.
    pub rank: Rank,
    /// How many of its steps it completes first.
    pub after_steps: usize,
}

/// How one rank's run ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The plan completed; the final buffer.
    Done(Vec<u8>),
    /// The plan failed with `error`; `buf` is the buffer after restoration.
    Failed {
        /// The error returned.
        error: Error,
        /// The buffer as the rank was left with it.
        buf: Vec<u8>,
    },
    /// This rank was the one killed by the fault.
    Killed,
    /// The rank had not finished when the simulation's time limit passed.
    Hung,
}

/// A simulated group.
#[derive(Clone, Debug)]
pub struct Simulation {
    /// Element type of the buffers.
    pub dtype: DType,
    /// Reduction operator.
    pub op: ReduceOp,
    /// Chunk size of every transfer.
    pub chunk_bytes: usize,
    /// Frames each link buffers.
    pub link_capacity: usize,
    /// The fault to inject, if any.
    pub fault: Option<Fault>,
    /// Wall-clock limit after which unfinished ranks count as hung.
    pub time_limit: Duration,
    /// A user-defined operator replacing `op` (plans then count in its units).
    pub custom: Option<Arc<dyn CustomOp>>,
    /// Quantize every transfer with this codec (see [`crate::exec`]); `None` by default.
    pub codec: Option<Codec>,
}

impl Simulation {
    /// A fault-free simulation with small chunks, so that every transfer spans several.
    pub fn new(dtype: DType, op: ReduceOp) -> Simulation {
        Simulation {
            dtype,
            op,
            chunk_bytes: 64,
            link_capacity: 4,
            fault: None,
            time_limit: Duration::from_secs(20),
            custom: None,
            codec: None,
        }
    }

    /// Runs `plans[r]` on `bufs[r]` for every rank `r`; returns each rank's outcome.
    pub fn run(&self, plans: &[Plan], bufs: Vec<Vec<u8>>) -> Vec<Outcome> {
        self.run_counted(plans, bufs).0
    }

    /// [`Simulation::run`], also returning the frames and bytes that crossed each link.
    pub fn run_counted(&self, plans: &[Plan], bufs: Vec<Vec<u8>>) -> (Vec<Outcome>, Arc<mem::Traffic>) {
        let (mesh, traffic) = mem::mesh_counted(plans.len(), self.link_capacity);
        let outcomes = match tokio::runtime::Builder::new_current_thread().enable_time().build() {
            Ok(rt) => rt.block_on(self.run_async(plans, bufs, mesh)),
            Err(e) => vec![Outcome::Failed { error: Error::InvalidArgument(e.to_string()), buf: vec![] }],
        };
        (outcomes, traffic)
    }

    async fn run_async(&self, plans: &[Plan], bufs: Vec<Vec<u8>>, mesh: mem::Mesh) -> Vec<Outcome> {
        let n = plans.len();
        let group = Arc::new(SimGroup::new(n));
        // Every rank calls the collective before any fault strikes.
        let begun: Vec<_> = (0..n).map(|rank| group.begin(rank)).collect();
        let mut tasks = Vec::new();
        let ranks = mesh.into_iter().zip(begun).enumerate().zip(plans.iter().cloned().zip(bufs));
        for ((rank, (links, begun)), (plan, mut buf)) in ranks {
            let (sim, group) = (self.clone(), group.clone());
            tasks.push(tokio::spawn(async move {
                let (key, abort) = match begun {
                    Ok(begun) => begun,
                    Err(error) => return Outcome::Failed { error, buf },
                };
                let call = Call {
                    plan: &plan,
                    dtype: sim.dtype,
                    op: sim.op,
                    epoch: key.0,
                    seq: key.1,
                    fingerprint: 0,
                    chunk_bytes: sim.chunk_bytes,
                    custom: sim.custom.as_deref(),
                    codec: sim.codec,
                    delivery: Default::default(),
                };
                let dies = sim.fault.filter(|f| f.rank == rank);
                if let Some(f) = dies {
                    let steps = 0..f.after_steps.min(plan.steps.len());
                    // What the doomed rank computes does not matter; its traffic does.
                    let result = execute(&call, &mut buf, &links, &abort, steps).await;
                    if result.is_ok() && f.after_steps >= plan.steps.len() {
                        group.end(rank, key, &Ok(()));
                    }
                    links.iter().flatten().for_each(|l| l.close());
                    // The master notices the loss (its control connection closes).
                    group.kill(rank);
                    return Outcome::Killed;
                }
                let backup = buf.clone();
                let local = execute(&call, &mut buf, &links, &abort, 0..plan.steps.len()).await;
                group.end(rank, key, &local);
                let result = match local {
                    Ok(()) => group.outcome(rank, key).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => Outcome::Done(buf),
                    Err(error) => Outcome::Failed { error, buf: backup },
                }
            }));
        }
        let deadline = tokio::time::Instant::now() + self.time_limit;
        let mut outcomes = Vec::with_capacity(n);
        for task in tasks {
            let abort_handle = task.abort_handle();
            outcomes.push(match tokio::time::timeout_at(deadline, task).await {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(join)) => {
                    Outcome::Failed { error: Error::InvalidArgument(format!("rank task failed: {join}")), buf: vec![] }
                }
                Err(_) => {
                    abort_handle.abort();
                    Outcome::Hung
                }
            });
        }
        outcomes
    }
}

/// The simulated group's master and peer state machines, shared by the rank tasks.
struct SimGroup {
    pair: std::sync::Mutex<Pair>,
    signals: Vec<AbortSignal>,
    changed: tokio::sync::watch::Sender<()>,
}

type Key = (u64, u64);

impl SimGroup {
    fn new(n: usize) -> SimGroup {
        SimGroup {
            pair: std::sync::Mutex::new(Pair::group(n, PeerConfig::default())),
            signals: (0..n).map(|_| AbortSignal::new()).collect(),
            changed: tokio::sync::watch::channel(()).0,
        }
    }

    /// Runs `f` on the pair, then fires the aborts it ordered and wakes waiters.
    fn with<T>(&self, f: impl FnOnce(&mut Pair) -> T) -> T {
        let value = {
            let mut pair = self.pair.lock().unwrap_or_else(|p| p.into_inner());
            let value = f(&mut pair);
            for (rank, aborts) in pair.aborts.iter_mut().enumerate() {
                for (_, e) in aborts.drain(..) {
                    self.signals[rank].fire(e);
                }
            }
            value
        };
        self.changed.send_replace(());
        value
    }

    fn begin(&self, rank: Rank) -> Result<(Key, AbortSignal), Error> {
        self.with(|pair| {
            let begun = pair.peers[rank].begin(OpKind::Whole { call: 0 })?;
            pair.send(rank, begun.msg);
            Ok(begun.key)
        })
        .map(|key| (key, self.signals[rank].clone()))
    }

    fn end(&self, rank: Rank, key: Key, local: &Result<(), Error>) {
        self.with(|pair| {
            let end = pair.peers[rank].end(key, local);
            pair.send(rank, end);
        });
    }

    fn kill(&self, rank: Rank) {
        self.with(|pair| pair.disconnect(rank));
    }

    async fn outcome(&self, rank: Rank, key: Key) -> Result<(), Error> {
        let mut rx = self.changed.subscribe();
        loop {
            let outcome = self.pair.lock().unwrap_or_else(|p| p.into_inner()).peers[rank].outcome(key);
            if let Some(outcome) = outcome {
                return outcome;
            }
            let _ = rx.changed().await;
        }
    }
}
