//! The in-process backend: ranks of one process over the in-memory transport.

use std::sync::Arc;

use super::Config;
use crate::collective::Collective;
use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, Result};
use crate::exec::{self, AbortSignal, Call};
use crate::plan::Rank;
use crate::transport::{mem, Link};

pub(crate) struct Local {
    pub(crate) rank: Rank,
    pub(crate) size: usize,
    links: Vec<Option<Arc<dyn Link>>>,
    abort: AbortSignal,
    seq: u64,
    config: Config,
    runtime: Arc<tokio::runtime::Runtime>,
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
        .map_err(|e| Error::InvalidArgument(format!("cannot start the runtime: {e}")))?;
    let runtime = Arc::new(runtime);
    // Shared by the group: it aborts everyone's collective when one fails, and makes a
    // collective return `Ok` only once every rank finished it (all agree on completion).
    let abort = AbortSignal::for_group(n);
    let members = mem::mesh(n, config.link_capacity)
        .into_iter()
        .enumerate()
        .map(|(rank, links)| Local {
            rank,
            size: n,
            links,
            abort: abort.clone(),
            seq: 0,
            config,
            runtime: runtime.clone(),
        })
        .collect();
    Ok(members)
}

impl Local {
    /// Plans and runs one collective on `buf`, restoring it on error and telling the
    /// rest of the group to stop.
    pub(crate) fn run(&mut self, coll: &Collective, dtype: DType, op: ReduceOp, buf: &mut [u8]) -> Result<usize> {
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
            custom: None,
            codec: coll.codec(),
        };
        let result = self.runtime.block_on(exec::execute_restoring(&call, buf, &self.links, &self.abort));
        if let Err(e) = &result {
            self.abort.fire(e.clone());
        }
        result.map(|()| self.size)
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        // Closing our links is how the other ranks learn that this one is gone; the
        // shared signal tells those that would not touch a link to us again (they may
        // have finished their steps and be waiting for the group to complete).
        self.links.iter().flatten().for_each(|l| l.close());
        self.abort.fire(Error::PeerLost { rank: self.rank, reason: "communicator dropped".into() });
    }
}
