//! [`Hold`]: the messages a control connection's writer holds back to send with the
//! next one — the peer's eager begins and reports of success to the master, the
//! master's commits to a peer — so that back-to-back small collectives share packets
//! and wake-ups.
//!
//! Messages always go out in the order they came; one that may wait waits at most
//! [`EAGER_HOLD`], and at most [`HOLD_MAX`] wait together. Which messages may wait is
//! each side's rule (the peer's `Lazy` in `driver`, the master's
//! `MasterState::may_wait`); holding one only delays it, as a slow network would.

use std::future::Future;

use tokio::time::{sleep_until, Duration, Instant};

/// How long a message that may wait is held for the message after it.
pub(super) const EAGER_HOLD: Duration = Duration::from_millis(1);

/// The most messages held before they are sent.
pub(super) const HOLD_MAX: usize = 64;

/// The held messages of one writer, and when they are due; see the module docs.
#[derive(Debug)]
pub(super) struct Hold<M> {
    held: Vec<M>,
    /// When the held messages must go, if any are held.
    due: Option<Instant>,
    /// A message that may not wait, or a full batch, came since the last `take`.
    go: bool,
}

impl<M> Default for Hold<M> {
    fn default() -> Self {
        Hold { held: Vec::new(), due: None, go: false }
    }
}

impl<M> Hold<M> {
    /// Adds `msg` behind the held ones; returns whether they must all go now: `msg` may
    /// not wait, or [`HOLD_MAX`] are held.
    pub(super) fn push(&mut self, msg: M, may_wait: bool) -> bool {
        self.held.push(msg);
        if may_wait && self.held.len() < HOLD_MAX {
            self.due.get_or_insert_with(|| Instant::now() + EAGER_HOLD);
            return false;
        }
        self.go = true;
        true
    }

    /// Whether the held messages must go now (what [`Hold::push`] last said, until the
    /// next [`Hold::take`]); messages that only wait go when [`Hold::due`] resolves.
    pub(super) fn must_go(&self) -> bool {
        self.go
    }

    /// Whether nothing is held.
    pub(super) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Resolves when the held messages are due; never while none are held. Owns what it
    /// needs, so the writer can push while it waits in a `select!`.
    pub(super) fn due(&self) -> impl Future<Output = ()> + 'static {
        let due = self.due;
        async move {
            match due {
                Some(due) => sleep_until(due).await,
                None => std::future::pending().await,
            }
        }
    }

    /// The messages to send, in order; nothing is held after.
    pub(super) fn take(&mut self) -> Vec<M> {
        self.due = None;
        self.go = false;
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waiting messages are held until one that may not wait, a full batch, or the hold's
    /// end; `take` hands them over in order and starts afresh.
    #[tokio::test(start_paused = true)]
    async fn messages_that_may_wait_are_held_until_the_next_or_the_hold_ends() {
        let mut hold = Hold::default();
        assert!(tokio::time::timeout(EAGER_HOLD * 10, hold.due()).await.is_err(), "nothing held, never due");
        assert!(hold.is_empty());
        assert!(!hold.push(1, true));
        assert!(!hold.push(2, true));
        assert!(!hold.must_go() && !hold.is_empty());
        assert!(hold.push(3, false), "one that may not wait sends what waits");
        assert!(hold.must_go());
        assert_eq!(hold.take(), [1, 2, 3]);
        assert!(!hold.must_go() && hold.is_empty());
        let start = Instant::now();
        assert!(!hold.push(4, true));
        hold.due().await;
        assert!(start.elapsed() >= EAGER_HOLD);
        assert_eq!(hold.take(), [4]);
        let sent_at = (0..HOLD_MAX).position(|i| hold.push(i, true));
        assert_eq!(sent_at, Some(HOLD_MAX - 1), "a full batch goes at once");
    }
}
