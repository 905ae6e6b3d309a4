//! [`Outbox`]: a peer's messages to the master, queued by the caller and the state
//! machine, taken in batches by the control connection's writer.
//!
//! The caller's thread queues a begin and a report per collective. Through a channel,
//! each would wake the writer task, and so a runtime worker thread (a futex wake-up and
//! a context switch on a 2-core machine) for a message that only waits in the
//! writer's [`Hold`] for the next. The outbox holds the messages itself and wakes the
//! writer only when it has something to do: a message that may not wait, a full
//! batch, or the first message of a batch that may wait (to set when it is due). In a
//! loop of small collectives that is two wake-ups per [`EAGER_HOLD`] instead of one
//! or two per call.
//!
//! [`EAGER_HOLD`]: super::hold::EAGER_HOLD

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

use super::hold::{Hold, HOLD_MAX};
use super::protocol::{OpResult, ToMaster};

/// The queue of a peer's messages to the master; see the module docs.
#[derive(Default)]
pub(super) struct Outbox {
    state: Mutex<State>,
    /// Wakes the writer (a permit is kept if it is not waiting yet).
    wake: Notify,
}

#[derive(Default)]
struct State {
    hold: Hold<ToMaster>,
    lazy: Lazy,
    /// The driver is gone: nothing will take the messages any more.
    closed: bool,
}

impl Outbox {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `msg` behind the others (never blocks); dropped once the driver is gone,
    /// whose reader then reports the removal.
    pub(super) fn push(&self, msg: ToMaster) {
        let wake = {
            let mut s = self.state();
            if s.closed {
                return;
            }
            let first = s.hold.is_empty();
            let wait = s.lazy.may_wait(&msg);
            s.hold.push(msg, wait) || first
        };
        if wake {
            self.wake.notify_one();
        }
    }

    /// The queued messages, in order, once they are due: at once if one of them may not
    /// wait or a batch is full, otherwise when the first of them has waited its
    /// [`EAGER_HOLD`](super::hold::EAGER_HOLD). Cancel-safe: nothing is taken until it
    /// returns.
    pub(super) async fn next(&self) -> Vec<ToMaster> {
        loop {
            let due = {
                let mut s = self.state();
                if s.hold.must_go() {
                    return s.hold.take();
                }
                s.hold.due()
            };
            tokio::select! {
                biased;
                _ = self.wake.notified() => {}
                _ = due => return self.state().hold.take(),
            }
        }
    }

    /// Drops what is queued (a master that took over learns it from the rejoin).
    pub(super) fn clear(&self) {
        self.state().hold.take();
    }

    /// Drops what is queued and every message queued from now on.
    pub(super) fn close(&self) {
        let mut s = self.state();
        s.closed = true;
        s.hold.take();
    }
}

/// Which queued messages may wait: an eager collective's begin, and its report of
/// success (the `OpEnd` with `Ok` of a key whose eager begin was queued). No caller
/// waits for the master on them while things go well: an eager collective returns
/// once every member's "done" came over the data links (see `comm::eager`), its
/// mismatches show in the data frames' call fingerprints, and the master's decision
/// follows off the critical path. In a loop of small collectives, a batch of begins and
/// reports leaves in one packet per [`EAGER_HOLD`](super::hold::EAGER_HOLD) instead of
/// one or two per call, and the master wakes as rarely.
///
/// Holding either only delays it, as a slow control network would, which the protocol
/// already takes: a begin that reaches the master after another member's vote is not
/// aborted when a voter ran that collective (`Tallies::begin`; a voter's held begin goes
/// out before its vote, every message in order), and one that reaches it after a loss
/// joins the carried collectives (`master::carried`). Everything else goes at once and
/// takes what is held with it: a failure's report (its member waits for the master), a
/// vote, a heartbeat, a non-eager begin. Held messages lost with a broken connection
/// are what [`PeerState::rejoin`](super::peer::PeerState::rejoin) tells the next master.
#[derive(Default)]
struct Lazy {
    /// Keys of eager collectives begun and not yet reported.
    eager: HashSet<(u64, u64)>,
}

impl Lazy {
    /// Whether `msg` may be held back for up to [`EAGER_HOLD`](super::hold::EAGER_HOLD).
    fn may_wait(&mut self, msg: &ToMaster) -> bool {
        match msg {
            ToMaster::EagerOpBegin { epoch, seq, .. } | ToMaster::EagerSubOpBegin { epoch, seq, .. } => {
                if self.eager.len() >= 4 * HOLD_MAX {
                    self.eager.clear(); // keys never reported (a stopped call): only timing is lost
                }
                self.eager.insert((*epoch, *seq));
                true
            }
            ToMaster::OpEnd { epoch, seq, result } => self.eager.remove(&(*epoch, *seq)) && *result == OpResult::Ok,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::membership::hold::EAGER_HOLD;

    /// An eager collective's begin and report of success may wait; its failure's
    /// report, a non-eager collective's messages, a vote and a heartbeat go at once.
    #[test]
    fn only_an_eager_collectives_begin_and_success_may_wait() {
        let mut lazy = Lazy::default();
        let begin = |seq| ToMaster::EagerOpBegin { epoch: 1, seq, call: 7 };
        let end = |seq, result| ToMaster::OpEnd { epoch: 1, seq, result };
        assert!(lazy.may_wait(&begin(1)));
        assert!(lazy.may_wait(&end(1, OpResult::Ok)));
        assert!(!lazy.may_wait(&end(1, OpResult::Ok)), "reported once already");
        assert!(lazy.may_wait(&ToMaster::EagerSubOpBegin { epoch: 1, seq: 2, call: 7, members: vec![1, 2] }));
        assert!(!lazy.may_wait(&end(2, OpResult::Failed("link broke".into()))), "a member waits for this one");
        assert!(!lazy.may_wait(&ToMaster::OpBegin { epoch: 1, seq: 3, call: 7 }));
        assert!(!lazy.may_wait(&end(3, OpResult::Ok)), "not an eager collective");
        assert!(!lazy.may_wait(&ToMaster::UpdateTopology { epoch: 1 }));
        assert!(!lazy.may_wait(&ToMaster::Heartbeat));
    }

    /// Messages that may wait come out together when the hold is up, in order, with no
    /// wake-up of the writer after the first; one that may not wait brings them at once.
    #[tokio::test(start_paused = true)]
    async fn the_writer_gets_a_batch_when_it_is_due_or_must_go() {
        let outbox = Outbox::default();
        let begin = |seq| ToMaster::EagerOpBegin { epoch: 1, seq, call: 7 };
        let ok = |seq| ToMaster::OpEnd { epoch: 1, seq, result: OpResult::Ok };
        outbox.push(begin(1));
        outbox.push(ok(1));
        outbox.push(begin(2));
        let start = tokio::time::Instant::now();
        assert_eq!(outbox.next().await, [begin(1), ok(1), begin(2)]);
        assert!(start.elapsed() >= EAGER_HOLD, "held for the hold's length");

        outbox.push(ok(2));
        // (tokio's timers tick in milliseconds, the hold's length: look without waiting.)
        let waiting = tokio::time::timeout(Duration::ZERO, outbox.next()).await;
        assert!(waiting.is_err(), "a report of success alone waits");
        outbox.push(ToMaster::UpdateTopology { epoch: 1 });
        let start = tokio::time::Instant::now();
        assert_eq!(outbox.next().await, [ok(2), ToMaster::UpdateTopology { epoch: 1 }]);
        assert_eq!(start.elapsed(), Duration::ZERO, "a vote goes at once, with what waited");

        // The first push left a permit; the later ones, while the batch waits, none.
        outbox.push(begin(3));
        outbox.push(begin(4));
        assert!(tokio::time::timeout(Duration::ZERO, outbox.wake.notified()).await.is_ok());
        assert!(tokio::time::timeout(Duration::ZERO, outbox.wake.notified()).await.is_err(), "woken once");

        outbox.close();
        outbox.push(ToMaster::Heartbeat);
        assert!(tokio::time::timeout(EAGER_HOLD * 4, outbox.next()).await.is_err(), "nothing after close");
    }
}
