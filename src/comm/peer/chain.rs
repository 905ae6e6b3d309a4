//! Two collectives started together where the second's shape comes from the first's
//! result (a count exchange, then the data it sized): both are numbered when started,
//! in the caller's order, so the caller may go on and start or call others at once.

use super::{coll_size, AsyncPeer, Ops};
use crate::collective::Collective;
use crate::comm::eager;
use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, Result};
use crate::membership::peer::OpKind;

/// What the second collective's `then` gives: the collective, its buffer, and a value
/// handed back with the result.
pub(crate) type Then<X> = (Collective, Vec<u8>, X);

impl AsyncPeer {
    /// Starts `first` (a collective of `dtype` on its buffer) and, numbered right after
    /// it, a second one of `second_dtype` begun under the fingerprint `second_call`
    /// (every rank passes the same: its counts are not known yet) and built by `then`
    /// from the first's
    /// result. The task gives the second's buffer and `then`'s value. Neither is
    /// retried; when the first fails, or `then` refuses (every rank sees the same
    /// result, so every rank refuses alike), the second is reported failed with the
    /// same error. Needs the runtime entered.
    pub(crate) fn start_then<X: Send + 'static>(
        &mut self,
        (coll, dtype, mut buf): (Collective, DType, Vec<u8>),
        second_call: u64,
        second_dtype: DType,
        then: impl FnOnce(Vec<u8>) -> Result<Then<X>> + Send + 'static,
    ) -> tokio::task::JoinHandle<Result<(Vec<u8>, X)>> {
        let ops = self.ops.clone();
        let call = coll.fingerprint(dtype, ReduceOp::Sum);
        let first = ops.control.begin_as(OpKind::Whole { call }, coll_size(&coll), eager::is_eager(&coll));
        // Begun only if the first was: a failed begin numbers nothing.
        let second =
            first.as_ref().ok().map(|_| ops.control.begin_as(OpKind::Whole { call: second_call }, None, false));
        tokio::spawn(async move {
            let first = first?;
            let spec = super::CallSpec::new(&coll, dtype, ReduceOp::Sum);
            let ran = ops.run_begun(spec, super::Scope::Whole, first, &mut buf, None).await;
            let second = match second {
                Some(Ok(second)) => second,
                Some(Err(e)) => return Err(e),
                None => return Err(Error::Aborted { reason: "the second collective was not begun".into() }),
            };
            let built = ran.and_then(|()| then(buf));
            let (coll2, mut buf2, value) = match built {
                Ok(b) => b,
                Err(e) => return Err(ops.abandon(second.0.key, e).await),
            };
            let spec = super::CallSpec::new(&coll2, second_dtype, ReduceOp::Sum);
            ops.run_begun(spec, super::Scope::Whole, second, &mut buf2, None).await?;
            Ok((buf2, value))
        })
    }
}

impl Ops {
    /// Reports begun collective `key` failed here with `e` without running it, and
    /// waits for the master's verdict (the others fail it too); returns the error.
    async fn abandon(&self, key: crate::transport::demux::OpKey, e: Error) -> Error {
        let verdict = self.control.conclude(key, Err(e)).await;
        self.links.finish(key);
        self.control.finish(key);
        verdict.err().unwrap_or_else(|| Error::Aborted { reason: "the collective was abandoned".into() })
    }
}
