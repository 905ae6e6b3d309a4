//! The in-process backend: ranks of one process over the in-memory transport.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{p2p, subgroup, Config};
use crate::collective::Collective;
use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, Result};
use crate::exec::{self, AbortSignal, Call};
use crate::op::CustomOp;
use crate::plan::Rank;
use crate::transport::demux::{Demux, OpLink};
use crate::transport::{mem, Link};

/// The completion agreements of a local group's sub-groups, by member set: each a
/// group signal of its own members (see [`AbortSignal::for_group`]), created when the
/// set first runs a collective.
type SubSignals = Arc<Mutex<HashMap<Vec<Rank>, AbortSignal>>>;

pub(crate) struct Local {
    pub(crate) rank: Rank,
    pub(crate) size: usize,
    links: Vec<Option<Arc<dyn Link>>>,
    abort: AbortSignal,
    seq: u64,
    config: Config,
    runtime: Arc<tokio::runtime::Runtime>,
    /// Sub-groups and point-to-point (boxed: most groups use neither).
    x: Box<Extra>,
}

struct Extra {
    subs: SubSignals,
    /// Collectives run so far by each member set this rank belongs to.
    sub_seq: HashMap<Vec<Rank>, u32>,
    /// Point-to-point links, apart from the collectives' so that messages and
    /// collective frames never meet; each shared through a demux, opened on first use.
    p2p_links: Vec<Option<Arc<dyn Link>>>,
    p2p_demux: Vec<Option<Arc<Demux>>>,
    /// The receive queue of each `(peer, tag)` used so far.
    p2p_rx: HashMap<(Rank, u32), OpLink>,
}

pub(crate) fn group(n: usize, config: Config) -> Result<Vec<Local>> {
    if n == 0 {
        return Err(Error::InvalidArgument("a group needs at least one rank".into()));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_time()
        .thread_name("phalanx-local")
        .build()
        .map_err(|e| Error::Runtime { reason: format!("cannot start the runtime: {e}") })?;
    let runtime = Arc::new(runtime);
    // Shared by the group: it aborts everyone's collective when one fails, and makes a
    // collective return `Ok` only once every rank finished it (all agree on completion).
    let abort = AbortSignal::for_group(n);
    let subs = SubSignals::default();
    let members = mem::mesh(n, config.link_capacity)
        .into_iter()
        .zip(mem::mesh(n, config.link_capacity))
        .enumerate()
        .map(|(rank, (links, p2p_links))| Local {
            rank,
            size: n,
            links,
            abort: abort.clone(),
            seq: 0,
            config,
            runtime: runtime.clone(),
            x: Box::new(Extra {
                subs: subs.clone(),
                sub_seq: HashMap::new(),
                p2p_links,
                p2p_demux: (0..n).map(|_| None).collect(),
                p2p_rx: HashMap::new(),
            }),
        })
        .collect();
    Ok(members)
}

impl Local {
    /// Plans and runs one collective on `buf`, restoring it on error and telling the
    /// rest of the group to stop. `custom`, if any, replaces `op` (see [`crate::op::CustomOp`]).
    pub(crate) fn run_with(
        &mut self,
        coll: &Collective,
        dtype: DType,
        op: ReduceOp,
        custom: Option<&dyn CustomOp>,
        buf: &mut [u8],
    ) -> Result<usize> {
        self.seq += 1;
        let plan = coll.plan(self.rank, self.size, dtype, &self.config.tuning);
        let call = Call {
            plan: &plan,
            dtype,
            op,
            epoch: 0,
            seq: self.seq,
            fingerprint: coll.fingerprint(dtype, op),
            chunk_bytes: self.config.tuning.chunk_bytes,
            custom,
            codec: coll.codec(),
        };
        let result = self.runtime.block_on(exec::execute_restoring(&call, buf, &self.links, &self.abort));
        if let Err(e) = &result {
            self.abort.fire(e.clone());
        }
        result.map(|()| self.size)
    }

    /// Runs one collective among `members` (view ranks, ascending, this rank among
    /// them). Completion is agreed among the members alone, through their own signal,
    /// which also fires when the group's does; a failure still ends the whole group.
    pub(crate) fn run_sub(
        &mut self,
        members: &[Rank],
        coll: &Collective,
        dtype: DType,
        op: ReduceOp,
        buf: &mut [u8],
    ) -> Result<usize> {
        let me = members
            .iter()
            .position(|&r| r == self.rank)
            .ok_or_else(|| Error::InvalidArgument(format!("rank {} is not a member of {members:?}", self.rank)))?;
        let counter = self.x.sub_seq.entry(members.to_vec()).or_insert(0);
        *counter += 1;
        let ids: Vec<u64> = members.iter().map(|&r| r as u64).collect();
        let seq = subgroup::sub_key(&ids, *counter);
        let signal = {
            let mut subs = self.x.subs.lock().unwrap_or_else(|p| p.into_inner());
            subs.entry(members.to_vec()).or_insert_with(|| AbortSignal::for_group(members.len())).clone()
        };
        let plan = subgroup::plan_in_view(coll.plan(me, members.len(), dtype, &self.config.tuning), members);
        let links = &self.links;
        let call = Call {
            plan: &plan,
            dtype,
            op,
            epoch: 0,
            seq,
            fingerprint: subgroup::sub_fingerprint(coll.fingerprint(dtype, op), &ids),
            chunk_bytes: self.config.tuning.chunk_bytes,
            custom: None,
            codec: coll.codec(),
        };
        let group = self.abort.clone();
        let result = self.runtime.block_on(async {
            // Relays the group's signal to the sub-group's; never finishes by itself.
            let relay = async {
                let reason = group.wait().await;
                signal.fire(reason);
                std::future::pending::<()>().await
            };
            tokio::select! {
                r = exec::execute_restoring(&call, buf, links, &signal) => r,
                () = relay => Err(Error::Aborted { reason: "the group stopped".into() }),
            }
        });
        if let Err(e) = &result {
            signal.fire(e.clone());
            self.abort.fire(e.clone());
        }
        result.map(|()| members.len())
    }

    /// The demux of the point-to-point link to `peer`, started on first use.
    fn p2p_demux(&mut self, peer: Rank) -> Result<Arc<Demux>> {
        let link = self.x.p2p_links.get(peer).cloned().flatten();
        let slot = self.x.p2p_demux.get_mut(peer);
        match (slot, link) {
            (Some(Some(d)), _) => Ok(d.clone()),
            (Some(slot), Some(link)) => {
                let _guard = self.runtime.enter();
                let d = Demux::new(link);
                *slot = Some(d.clone());
                Ok(d)
            }
            _ => Err(Error::InvalidArgument(format!("no link to rank {peer}"))),
        }
    }

    /// See [`crate::Communicator::send`].
    pub(crate) fn send_p2p(&mut self, to: Rank, tag: u32, dtype: DType, data: &[u8]) -> Result<()> {
        let demux = self.p2p_demux(to)?;
        let (abort, chunk) = (self.abort.clone(), self.config.tuning.chunk_bytes);
        self.runtime.block_on(async {
            tokio::select! {
                biased;
                e = abort.wait() => Err(e),
                r = p2p::send_message(&demux, p2p::p2p_key(0, tag), dtype, data, chunk, to) => r,
            }
        })
    }

    /// See [`crate::Communicator::recv`].
    pub(crate) fn recv_p2p(&mut self, from: Rank, tag: u32, dtype: DType, out: &mut [u8]) -> Result<()> {
        let demux = self.p2p_demux(from)?;
        let rx = self.x.p2p_rx.entry((from, tag)).or_insert_with(|| demux.op(p2p::p2p_key(0, tag)));
        let (abort, chunk) = (&self.abort, self.config.tuning.chunk_bytes);
        self.runtime.block_on(async {
            tokio::select! {
                biased;
                e = abort.wait() => Err(e),
                r = p2p::recv_message(rx, tag, dtype, out, chunk, from) => r,
            }
        })
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        // Closing our links is how the other ranks learn that this one is gone; the
        // shared signal tells those that would not touch a link to us again (they may
        // have finished their steps and be waiting for the group to complete).
        self.links.iter().chain(&self.x.p2p_links).flatten().for_each(|l| l.close());
        self.abort.fire(Error::PeerLost { rank: self.rank, reason: "communicator dropped".into() });
    }
}
