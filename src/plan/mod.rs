//! Sans-IO collective algorithms.
//!
//! A collective for rank `r` of an `n`-rank group compiles to a [`Plan`]: the ordered
//! [`Step`]s that rank performs on one working buffer of `len` elements. A plan holds no
//! sockets, threads or element type; the executor ([`crate::exec`]) runs it over any
//! transport, and tests run all ranks' plans in one process with faults injected.
//!
//! Every builder fixes the order in which contributions are combined, independently of
//! timing, and tells the kernel which operand is on the left ([`Order`]), so all ranks
//! end with bitwise identical bytes. Each builder documents its order.
//!
//! ```
//! use phalanx::plan::{allreduce, Step};
//! // Rank 0 of 3, 6 elements: a ring of 2 reduce-scatter and 2 all-gather steps.
//! let plan = allreduce::ring(0, 3, 6);
//! assert_eq!(plan.steps.len(), 4);
//! assert!(matches!(plan.steps[0], Step::Exchange { .. }));
//! ```

pub mod allreduce;
pub mod alltoall;
pub mod broadcast;
pub mod gather;
pub mod reduce;
mod ring;
pub mod scan;
pub mod segments;
pub mod sparse;
pub mod transfer;

use std::ops::Range;

pub use crate::dtype::Order;

/// A rank: a peer's position in the group's ordered view, `0..n`.
pub type Rank = usize;

/// What a receiver does with a received range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Overwrite the local range with the received one.
    Copy,
    /// [`Action::Copy`], and the received range is sent on later unchanged: the next
    /// step that sends exactly this range (before anything writes to it) forwards the
    /// received frames verbatim, as a ring all-gather hop does. For raw frames this is
    /// `Copy`; for quantized ones it keeps every rank on the same codes, since decoded
    /// values are never re-encoded. Only an [`Step::Exchange`] receive may keep;
    /// [`Plan::validate`] checks the promise.
    CopyKeep,
    /// Combine the received range into the local one with the collective's operator.
    Reduce(Order),
}

/// Sending a range of the working buffer to a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendTo {
    /// The receiving rank.
    pub to: Rank,
    /// Element range of the working buffer.
    pub range: Range<usize>,
}

/// Receiving a range of the working buffer from a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecvFrom {
    /// The sending rank.
    pub from: Rank,
    /// Element range of the working buffer.
    pub range: Range<usize>,
    /// What to do with the received elements.
    pub action: Action,
}

/// One step of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send and receive at the same time (either may be absent). The send reads the
    /// buffer as it was when the step began, even where the ranges overlap.
    Exchange {
        /// The outgoing range, if any.
        send: Option<SendTo>,
        /// The incoming range, if any.
        recv: Option<RecvFrom>,
    },
    /// Receive `range` from `from` chunk by chunk, apply `action` to each chunk, and
    /// forward the resulting chunk to `to` at once: the stage of a pipelined chain.
    Forward {
        /// The upstream rank.
        from: Rank,
        /// The downstream rank.
        to: Rank,
        /// Element range of the working buffer.
        range: Range<usize>,
        /// What to do with each received chunk before forwarding it.
        action: Action,
    },
    /// Apply `action` with `src` as the incoming operand onto `dst`, locally (no
    /// transfer): `Copy` copies `src` into `dst`, `Reduce(order)` combines `src` into
    /// `dst` with `src` on the side `order` names. The ranges have equal lengths and do
    /// not overlap. Plans use it to keep partial results in scratch regions (scans,
    /// ordered sums of several senders).
    Local {
        /// The incoming range.
        src: Range<usize>,
        /// The range that is overwritten or combined into.
        dst: Range<usize>,
        /// What to do.
        action: Action,
    },
}

impl Step {
    /// A send-only step.
    pub fn send(to: Rank, range: Range<usize>) -> Step {
        Step::Exchange { send: Some(SendTo { to, range }), recv: None }
    }

    /// A receive-only step.
    pub fn recv(from: Rank, range: Range<usize>, action: Action) -> Step {
        Step::Exchange { send: None, recv: Some(RecvFrom { from, range, action }) }
    }

    /// A simultaneous send and receive.
    pub fn exchange(to: Rank, send: Range<usize>, from: Rank, recv: Range<usize>, action: Action) -> Step {
        Step::Exchange { send: Some(SendTo { to, range: send }), recv: Some(RecvFrom { from, range: recv, action }) }
    }

    /// The ranks this step talks to.
    pub fn peers(&self) -> impl Iterator<Item = Rank> + '_ {
        let (a, b) = match self {
            Step::Exchange { send, recv } => (send.as_ref().map(|s| s.to), recv.as_ref().map(|r| r.from)),
            Step::Forward { from, to, .. } => (Some(*from), Some(*to)),
            Step::Local { .. } => (None, None),
        };
        a.into_iter().chain(b)
    }
}

/// The steps one rank performs for one collective.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// This rank.
    pub rank: Rank,
    /// The number of ranks in the group.
    pub size: usize,
    /// Length of the working buffer, in elements.
    pub len: usize,
    /// The steps, in order.
    pub steps: Vec<Step>,
}

impl Plan {
    /// An empty plan (nothing to do), e.g. for a group of one.
    pub fn empty(rank: Rank, size: usize, len: usize) -> Plan {
        Plan { rank, size, len, steps: Vec::new() }
    }

    /// Appends the steps of `other`, a plan for the same rank, group and buffer.
    pub fn then(mut self, other: Plan) -> Plan {
        debug_assert_eq!((self.rank, self.size, self.len), (other.rank, other.size, other.len));
        self.steps.extend(other.steps);
        self
    }

    /// Checks the plan's internal consistency: peers in range and not this rank, ranges
    /// inside the buffer. Builders' output always passes; this guards hand-made plans.
    pub fn validate(&self) -> Result<(), String> {
        for (i, step) in self.steps.iter().enumerate() {
            if let Some(p) = step.peers().find(|&p| p >= self.size || p == self.rank) {
                return Err(format!("step {i}: peer {p} invalid for rank {} of {}", self.rank, self.size));
            }
            let ranges: Vec<&Range<usize>> = match step {
                Step::Exchange { send, recv } => {
                    send.iter().map(|s| &s.range).chain(recv.iter().map(|r| &r.range)).collect()
                }
                Step::Forward { range, .. } => vec![range],
                Step::Local { src, dst, .. } => {
                    if src.len() != dst.len() || (src.start < dst.end && dst.start < src.end) {
                        return Err(format!("step {i}: local ranges {src:?} and {dst:?} differ in length or overlap"));
                    }
                    vec![src, dst]
                }
            };
            if let Some(r) = ranges.iter().find(|r| r.start > r.end || r.end > self.len) {
                return Err(format!("step {i}: range {r:?} outside buffer of {}", self.len));
            }
            self.validate_keep(i)?;
        }
        Ok(())
    }

    /// Checks step `i`'s use of [`Action::CopyKeep`]: only on an exchange's receive, and
    /// a later step sends exactly that range before any step writes to it.
    fn validate_keep(&self, i: usize) -> Result<(), String> {
        let kept = match &self.steps[i] {
            Step::Exchange { recv: Some(r), .. } if r.action == Action::CopyKeep => &r.range,
            Step::Forward { action: Action::CopyKeep, .. } | Step::Local { action: Action::CopyKeep, .. } => {
                return Err(format!("step {i}: only an exchange's receive may keep its frames"));
            }
            _ => return Ok(()),
        };
        let overlaps = |r: &Range<usize>| r.start < kept.end && kept.start < r.end;
        for step in &self.steps[i + 1..] {
            let (sent, written) = match step {
                Step::Exchange { send, recv } => (send.as_ref().map(|s| &s.range), recv.as_ref().map(|r| &r.range)),
                Step::Forward { range, .. } => (None, Some(range)),
                Step::Local { dst, .. } => (None, Some(dst)),
            };
            // A step's send reads the buffer as the step began, before its receive writes.
            if sent == Some(kept) {
                return Ok(());
            }
            if written.is_some_and(overlaps) {
                break;
            }
        }
        Err(format!("step {i}: kept range {kept:?} is not sent on unchanged"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_range_must_be_sent_on_before_it_is_written() {
        let keep = |steps: Vec<Step>| Plan { rank: 0, size: 3, len: 4, steps }.validate();
        let received = Step::recv(1, 0..2, Action::CopyKeep);
        assert!(keep(vec![received.clone(), Step::exchange(2, 0..2, 1, 0..2, Action::Copy)]).is_ok());
        assert!(keep(vec![received.clone()]).is_err(), "never sent on");
        assert!(keep(vec![received.clone(), Step::send(2, 0..1)]).is_err(), "sent only in part");
        let written = Step::recv(2, 1..3, Action::Copy);
        assert!(keep(vec![received.clone(), written, Step::send(2, 0..2)]).is_err(), "written first");
        let local = Step::Local { src: 2..3, dst: 3..4, action: Action::CopyKeep };
        assert!(keep(vec![local]).is_err(), "only exchanges keep");
        for n in 2..6 {
            for rank in 0..n {
                assert!(allreduce::ring(rank, n, 3 * n).validate().is_ok(), "ring {rank} of {n}");
            }
        }
    }
}
