//! What crossed a communicator's data links, from C: `phx_comm_traffic` fills
//! `phx_traffic` counters per peer id and in total (`phalanx::comm::Traffic`). The
//! difference of two snapshots is what moved in between: subtract them field by field.

use std::ffi::c_int;

use phalanx::comm::PeerTraffic;

use crate::args::handle;
use crate::comm::phx_comm;
use crate::status::guard;

/// Frames and payload bytes exchanged with one peer (or with all of them), since the
/// communicator connected. Payload bytes exclude the frame headers. Collectives,
/// point-to-point messages and state synchronisation all count; the control
/// connection to the master does not.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct phx_traffic {
    /// Frames sent to the peer.
    pub frames_sent: u64,
    /// Payload bytes sent to the peer.
    pub bytes_sent: u64,
    /// Frames received from the peer.
    pub frames_received: u64,
    /// Payload bytes received from the peer.
    pub bytes_received: u64,
}

impl From<PeerTraffic> for phx_traffic {
    fn from(t: PeerTraffic) -> phx_traffic {
        phx_traffic {
            frames_sent: t.frames_sent,
            bytes_sent: t.bytes_sent,
            frames_received: t.frames_received,
            bytes_received: t.bytes_received,
        }
    }
}

/// A snapshot of `comm`'s data-link traffic: the sum over all peers in `*total_or_null`
/// (when not NULL); the number of peers it has exchanged frames with in
/// `*n_peers_or_null` (when not NULL); and the first `capacity` of them, ascending by
/// peer id, in `peer_ids_or_null[i]` and `per_peer_or_null[i]` (either may be NULL;
/// with `capacity` 0 both are ignored). Cheap: a few atomic loads per peer, no call to
/// the group. Frames of other peers' later collectives may arrive at any time, so the
/// received counts are exact only where the group is quiet (between two barriers).
/// Must not run concurrently with other calls on `comm`.
///
/// # Safety
/// `comm` is NULL or a live communicator; `total_or_null` and `n_peers_or_null` NULL or
/// valid for one write; `peer_ids_or_null` and `per_peer_or_null` NULL or writable for
/// `capacity` entries.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_traffic(
    comm: *const phx_comm,
    total_or_null: *mut phx_traffic,
    n_peers_or_null: *mut usize,
    peer_ids_or_null: *mut u64,
    per_peer_or_null: *mut phx_traffic,
    capacity: usize,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle (the caller's contract).
        let comm = &unsafe { handle(comm, "comm") }?.inner;
        let snapshot = comm.traffic();
        if !total_or_null.is_null() {
            // SAFETY: non-NULL, valid for one write (the caller's contract).
            unsafe { total_or_null.write(snapshot.total().into()) };
        }
        let mut n = 0usize;
        for (i, (id, t)) in snapshot.peers().enumerate() {
            n += 1;
            if i < capacity {
                if !peer_ids_or_null.is_null() {
                    // SAFETY: non-NULL, writable for `capacity` entries, `i < capacity`.
                    unsafe { peer_ids_or_null.add(i).write(id) };
                }
                if !per_peer_or_null.is_null() {
                    // SAFETY: non-NULL, writable for `capacity` entries, `i < capacity`.
                    unsafe { per_peer_or_null.add(i).write(t.into()) };
                }
            }
        }
        if !n_peers_or_null.is_null() {
            // SAFETY: non-NULL, valid for one write (the caller's contract).
            unsafe { n_peers_or_null.write(n) };
        }
        Ok(())
    })
}
