//! Membership: the master that holds the view, the peer that follows it, and the
//! protocol between them.
//!
//! Both roles are sans-IO state machines — [`master::MasterState`] and
//! [`peer::PeerState`] — each driven by a small async driver ([`server`] for the
//! master, [`client`] for a peer); [`pair`] runs them together with no runtime.
//! [`protocol`] is the control protocol's messages and [`codec`] their binary form;
//! [`view`] defines views.

pub(crate) mod client;
pub mod codec;
#[cfg(test)]
mod device_id_tests;
mod driver;
#[cfg(test)]
mod eager_tests;
mod hold;
pub(crate) mod liveness;
pub mod master;
mod outbox;
#[cfg(any(test, feature = "testing"))]
pub(crate) mod pair;
#[cfg(test)]
mod pair_tests;
pub mod peer;
pub mod protocol;
pub(crate) mod server;
pub mod view;

pub use view::{Member, PeerId, View};
