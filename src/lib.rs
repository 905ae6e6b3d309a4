//! # phalanx
//!
//! Fault-tolerant collective communication: all-reduce, reduce-scatter, all-gather,
//! broadcast, reduce and barrier among peers that may join, leave or crash, with
//! bitwise identical results on every peer.
//!
//! The algorithms are sans-IO [`plan`]s; the [`exec`]utor runs a plan over any
//! [`transport`]; a [`Communicator`] is what users hold.
//!
//! ```
//! use phalanx::{Communicator, ReduceOp};
//!
//! let comms = Communicator::local_group(2, Default::default())?;
//! let results: Vec<Vec<i32>> = std::thread::scope(|s| {
//!     let handles: Vec<_> = comms
//!         .into_iter()
//!         .map(|mut comm| {
//!             s.spawn(move || -> phalanx::Result<Vec<i32>> {
//!                 let mut grad = vec![comm.rank() as i32 * 10 + 1; 3];
//!                 comm.all_reduce(&mut grad, ReduceOp::Sum)?;
//!                 Ok(grad)
//!             })
//!         })
//!         .collect();
//!     handles.into_iter().map(|h| h.join().expect("rank thread").expect("all-reduce")).collect()
//! });
//! assert_eq!(results, vec![vec![12, 12, 12], vec![12, 12, 12]]);
//! # Ok::<(), phalanx::Error>(())
//! ```
#![warn(missing_docs)]

pub mod collective;
pub mod comm;
pub mod device;
pub mod dtype;
pub mod error;
pub(crate) mod exec;
pub mod membership;
pub mod moe;
pub mod op;
/// Test support behind the `testing` feature: the small MLP the pipeline tests train
/// across stages, with its single-process reference. Not part of the stable API.
#[cfg(any(test, feature = "testing"))]
pub mod pipeline_mlp;
pub mod plan;
pub mod quant;
/// Test support behind the `testing` feature: a UDP relay that adds delay, jitter,
/// loss, a rate limit and partitions between processes on 127.0.0.1.
#[cfg(any(test, feature = "testing"))]
pub mod relay;
/// Test support behind the `testing` feature: the seeded generator of schedules (the
/// churn harness draws its fault schedule from it). Inside the crate it always exists.
#[cfg(any(test, feature = "testing"))]
pub mod rng;
#[cfg(not(any(test, feature = "testing")))]
pub(crate) mod rng;
pub mod sched;
/// Test support behind the `testing` feature: the deterministic plan simulator, for the
/// churn harness and the tests. Not part of the stable API.
#[cfg(any(test, feature = "testing"))]
pub mod sim;
pub mod state;
pub mod transport;
/// Test support behind the `testing` feature: the workload of the worker and the tests.
/// Not part of the stable API.
#[cfg(any(test, feature = "testing"))]
pub mod workload;

// The user's whole face: everything a program holds is here, one `use` line away.
pub use collective::Tuning;
pub use comm::{
    AsyncPeer, Communicator, Config, ConnectOptions, PeerTraffic, PendingAllReduce, PendingP2p, PendingP2pRaw,
    PendingRaw, RetryPolicy, ScanOptions, SparseReduced, SyncReport, Traffic,
};
pub use membership::master::MasterConfig;
pub use membership::server::{Master, MasterServer};
pub use membership::PeerId;
pub use plan::sparse::Placement;
pub use plan::Rank;
pub use quant::Quantization;
pub use state::{SharedState, SyncStrategy};
pub use transport::quic::QuicConfig;

/// The README's examples, compiled as doc tests so that they stay true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
pub use dtype::{DType, Element, ReduceOp};
pub use error::{Error, ErrorKind, Result};
