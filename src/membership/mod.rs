//! Membership: the master that holds the view, and the protocol peers speak to it.
//!
//! The [`master`] is a sans-IO state machine ([`master::MasterState`]) that the
//! [`server`] drives over QUIC; [`client`] is the peer's side. [`protocol`] is the
//! control protocol's messages and [`codec`] their binary form; [`view`] defines views.

pub mod client;
pub mod codec;
pub mod master;
pub mod protocol;
pub mod server;
pub mod view;

pub use view::{Member, PeerId, View};
