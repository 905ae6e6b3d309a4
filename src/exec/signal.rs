//! [`AbortSignal`]: the one-shot "stop now" signal an executor runs under.

use std::sync::Arc;

use tokio::sync::watch;

use crate::error::Error;

/// A one-shot, shareable "stop now, for this reason" signal.
///
/// The membership layer fires it when a peer is lost, the view changes or the master
/// aborts the collective; the executor running on it then returns the fired error.
/// Whether a collective *completed* is not the executor's business: the master decides
/// that for every member (see `membership::peer`).
#[derive(Clone, Debug)]
pub struct AbortSignal {
    tx: Arc<watch::Sender<Option<Error>>>,
}

impl Default for AbortSignal {
    fn default() -> Self {
        AbortSignal { tx: Arc::new(watch::channel(None).0) }
    }
}

impl AbortSignal {
    /// A signal that has not fired.
    pub fn new() -> AbortSignal {
        AbortSignal::default()
    }

    /// Fires with `reason`; later calls keep the first reason.
    pub fn fire(&self, reason: Error) {
        self.tx.send_if_modified(|v| {
            if v.is_none() {
                *v = Some(reason);
                true
            } else {
                false
            }
        });
    }

    /// The reason, if it has fired.
    pub fn fired(&self) -> Option<Error> {
        self.tx.borrow().clone()
    }

    /// Waits until it fires and returns the reason.
    pub async fn wait(&self) -> Error {
        let mut rx = self.tx.subscribe();
        loop {
            if let Some(reason) = rx.borrow_and_update().clone() {
                return reason;
            }
            // The sender lives in `self`, so `changed` cannot fail while we wait.
            if rx.changed().await.is_err() {
                return Error::Aborted { reason: "abort signal dropped".into() };
            }
        }
    }
}
