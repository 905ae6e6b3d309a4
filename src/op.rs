//! Operators that are not element-wise built-ins: user-defined associative operators
//! on fixed-size units of bytes (a scan's state row, a pair `(a, S)`).
//!
//! The executor combines with a [`CustomOp`] wherever a plan says
//! [`crate::plan::Action::Reduce`], and cuts transfers only at unit boundaries, so an
//! operator sees whole units. The operator must be associative; it need not commute:
//! plans say which operand is on the left.
//!
//! ```
//! use phalanx::op::CustomOp;
//! use phalanx::dtype::Order;
//!
//! /// Concatenation-like op on one byte: keeps the left operand.
//! struct First;
//! impl CustomOp for First {
//!     fn unit_bytes(&self) -> usize { 1 }
//!     fn combine(&self, acc: &mut [u8], incoming: &[u8], order: Order) {
//!         if order == Order::IncomingLeft { acc.copy_from_slice(incoming) }
//!     }
//!     fn identity(&self, _unit: &mut [u8]) -> bool { false }
//! }
//! let mut acc = [1u8, 2];
//! First.combine(&mut acc, &[7, 8], Order::IncomingLeft);
//! assert_eq!(acc, [7, 8]);
//! ```

use std::fmt;

use crate::dtype::Order;

/// A user-defined associative operator on units of [`CustomOp::unit_bytes`] bytes.
pub trait CustomOp: Send + Sync {
    /// Bytes of one operand. Buffers and transfers hold whole units.
    fn unit_bytes(&self) -> usize;

    /// Combines `incoming` into `acc`, unit by unit: `acc = incoming ⊕ acc` for
    /// [`Order::IncomingLeft`], `acc = acc ⊕ incoming` for [`Order::IncomingRight`].
    /// Both slices hold the same whole number of units.
    fn combine(&self, acc: &mut [u8], incoming: &[u8], order: Order);

    /// Writes the identity element into `unit` (one unit) and returns `true`, or
    /// returns `false` when the operator has none (exclusive scans then need one).
    fn identity(&self, unit: &mut [u8]) -> bool;
}

impl fmt::Debug for dyn CustomOp + '_ {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CustomOp({} bytes per unit)", self.unit_bytes())
    }
}
