//! Eager collectives: no master round trip on the success path.
//!
//! A collective whose result every member holds once it completed locally (all-reduce,
//! quantized all-reduce, all-gather, broadcast; whole group or sub-group) ends like
//! this on a member whose plan completed:
//!
//! 1. it reports its success to the master (`OpEnd`), without waiting for an answer;
//! 2. it sends a one-byte "done" frame to every other member over the data links and
//!    receives theirs (a plan run by the executor, under the collective's key and call
//!    fingerprint, so a member that made another call is a `Mismatch` here too);
//! 3. once every member's "done" is in, it returns `Ok`: every member completed, so
//!    the master can only commit (see `membership::master::carried` for how a loss is
//!    settled without ever aborting such a collective). If the exchange fails (a link
//!    broke, a member failed and so never sent its "done"), it waits for the master's
//!    decision as every collective did before, and returns it.
//!
//! The exchange costs one latency between peers, not the master's: with the master
//! 50 ms away, a 4 KiB all-reduce no longer waits for it. A member that failed sends no
//! "done", so no member returns before the master has the failure and aborts for
//! everyone (buffers restored). A member that returned reports the collective as
//! committed to a master that takes over.

use std::sync::Arc;

use crate::collective::Collective;
use crate::dtype::{DType, ReduceOp};
use crate::error::Result;
use crate::exec::{execute, AbortSignal, Call};
use crate::membership::client::ControlClient;
use crate::membership::peer::{Begun, OpKey};
use crate::plan::{Action, Plan, Rank, Step};
use crate::transport::Link;

/// Whether `coll` runs eagerly: a collective whose result every member holds once its
/// plan completed on every member.
pub(crate) fn is_eager(coll: &Collective) -> bool {
    matches!(
        coll,
        Collective::AllReduce { .. }
            | Collective::QuantizedAllReduce { .. }
            | Collective::AllGather { .. }
            | Collective::Broadcast { .. }
    )
}

/// The "done" exchange of rank `rank` among `members` (view ranks, ascending) in a
/// view of `size`: a byte to each other member, then one from each; the buffer has a
/// byte per view rank.
pub(crate) fn done_plan(rank: Rank, size: usize, members: &[Rank]) -> Plan {
    let others = || members.iter().copied().filter(move |&r| r != rank);
    let sends = others().map(|r| Step::send(r, rank..rank + 1));
    let recvs = others().map(|r| Step::recv(r, r..r + 1, Action::Copy));
    Plan { rank, size, len: size, steps: sends.chain(recvs).collect() }
}

/// Ends the eager collective `begun`, whose plan completed here, over the links it ran
/// on: see the module docs.
pub(crate) async fn conclude(
    control: &ControlClient,
    begun: &Begun,
    links: &[Option<Arc<dyn Link>>],
    signal: &AbortSignal,
    chunk_bytes: usize,
) -> Result<()> {
    let key: OpKey = begun.key;
    if !control.report_success(key) {
        return control.decision(key).await;
    }
    let plan = done_plan(begun.rank, begun.view.size(), &begun.members);
    let call = Call {
        plan: &plan,
        dtype: DType::U8,
        op: ReduceOp::Sum, // nothing is reduced
        epoch: key.0,
        seq: key.1,
        fingerprint: begun.fingerprint,
        chunk_bytes,
        custom: None,
        codec: None,
        delivery: Default::default(),
    };
    let mut done = vec![1u8; plan.len];
    let exchange = execute(&call, &mut done, links, signal, 0..plan.steps.len());
    tokio::select! {
        biased;
        decided = control.decision(key) => decided,
        exchanged = exchange => match exchanged {
            Ok(()) if control.returned_eagerly(key) => Ok(()),
            Ok(()) => control.decision(key).await,
            Err(e) => {
                tracing::debug!(peer = control.id(), ?key, "done exchange failed ({e}): waiting for the master");
                control.decision(key).await
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_done_plan_sends_to_and_receives_from_every_other_member() {
        let p = done_plan(2, 4, &[0, 2, 3]);
        assert_eq!(
            p.steps,
            vec![
                Step::send(0, 2..3),
                Step::send(3, 2..3),
                Step::recv(0, 0..1, Action::Copy),
                Step::recv(3, 3..4, Action::Copy)
            ]
        );
        assert!(p.validate().is_ok());
        assert!(done_plan(0, 1, &[0]).steps.is_empty());
    }

    #[test]
    fn only_collectives_whose_result_every_member_holds_are_eager() {
        assert!(is_eager(&Collective::AllReduce { len: 4 }));
        assert!(is_eager(&Collective::Broadcast { root: 1, len: 4 }));
        assert!(!is_eager(&Collective::ReduceScatter { counts: vec![1, 1] }));
        assert!(!is_eager(&Collective::AllToAll { counts: vec![vec![1]] }));
        assert!(!is_eager(&Collective::Barrier));
    }
}
