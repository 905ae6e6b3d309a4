//! Membership: the master that holds the view, and the protocol peers speak to it.
//!
//! The [`master`] is a sans-IO state machine ([`master::MasterState`]) driven by
//! over QUIC by the server; [`wire`] is the control protocol; [`view`] defines views.

pub mod client;
pub mod master;
pub mod server;
pub mod view;
pub mod wire;

pub use view::{Member, PeerId, View};
