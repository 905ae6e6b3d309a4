//! Point-to-point transfers as plans: one range sent to, or received from, one peer.
//!
//! A tagged message (`comm::p2p`) and a shared-state tensor (`comm::sync`) move through
//! the executor like every collective: the sender runs a [`send`] plan over the bytes
//! it lends, the receiver a [`recv`] plan into its buffer. So chunking, frame checks,
//! the mapping of link failures to errors and (with `Delivery::OnSuccess`) "the buffer
//! is untouched on error" are the executor's, written once.
//!
//! ```
//! use phalanx::plan::{transfer, Action, Step};
//! // Rank 1 of 3 receives 8 elements from rank 2.
//! let plan = transfer::recv(1, 3, 8, 2);
//! assert_eq!(plan.steps, vec![Step::recv(2, 0..8, Action::Copy)]);
//! assert!(plan.validate().is_ok());
//! ```

use super::{Action, Plan, Rank, Step};

/// Rank `rank` of `size` sends its whole buffer of `len` elements to rank `to`.
pub fn send(rank: Rank, size: usize, len: usize, to: Rank) -> Plan {
    Plan { rank, size, len, steps: vec![Step::send(to, 0..len)] }
}

/// Rank `rank` of `size` receives a whole buffer of `len` elements from rank `from`.
pub fn recv(rank: Rank, size: usize, len: usize, from: Rank) -> Plan {
    Plan { rank, size, len, steps: vec![Step::recv(from, 0..len, Action::Copy)] }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transfer_is_one_valid_step_between_two_ranks() {
        let (s, r) = (send(0, 4, 5, 3), recv(3, 4, 5, 0));
        assert_eq!(s.steps, vec![Step::send(3, 0..5)]);
        assert_eq!(r.steps, vec![Step::recv(0, 0..5, Action::Copy)]);
        assert!(s.validate().is_ok() && r.validate().is_ok());
        // A transfer to itself is refused by validation, not run.
        assert!(send(2, 4, 5, 2).validate().is_err());
    }
}
