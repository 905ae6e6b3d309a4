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

use crate::dtype::{Element, Order};

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

    /// A name that identifies the operator across processes; it enters the collective's
    /// fingerprint, so ranks that pass differently named operators get a mismatch.
    fn name(&self) -> &str {
        "custom"
    }

    /// [`CustomOp::combine`] for operators that can fail (a C callback returning an
    /// error): the executor calls this one and aborts the collective, on every rank,
    /// with the returned message. The default calls `combine` and succeeds.
    fn try_combine(&self, acc: &mut [u8], incoming: &[u8], order: Order) -> Result<(), String> {
        self.combine(acc, incoming, order);
        Ok(())
    }
}

impl fmt::Debug for dyn CustomOp + '_ {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CustomOp({} bytes per unit)", self.unit_bytes())
    }
}

/// The linear-attention state combine on pairs `(a, S)`, `a` of `d_k` gates and `S` a
/// `d_k × d_v` state, in f32: "x then y",
/// `(a1, S1) ⊕ (a2, S2) = (a1 ⊙ a2, diag(a2)·S1 + S2)`, identity `(1, 0)`. Associative,
/// not commutative.
///
/// One unit is one row `i` of the pair, `[a_i, S_{i,0}, …, S_{i,d_v-1}]` (`1 + d_v` f32
/// values), so the rows of a state combine independently and a scan can cut the state
/// into blocks of rows. [`LinearAttention::pack`] and [`LinearAttention::unpack`] convert
/// between `(a, S)` and that layout. Each element is one multiplication and one addition
/// (never fused), so results are exactly reproducible.
///
/// ```
/// use phalanx::op::{CustomOp, LinearAttention};
/// use phalanx::dtype::Order;
/// let op = LinearAttention::new(2);
/// let mut acc = LinearAttention::pack(&[0.5, 0.25], &[2.0, 0.0, 1.0, 1.0], 2).unwrap();
/// let earlier = LinearAttention::pack(&[0.5, 1.0], &[1.0, 2.0, 3.0, 4.0], 2).unwrap();
/// op.combine(&mut acc, &earlier, Order::IncomingLeft); // acc = earlier ⊕ acc
/// let (a, s) = LinearAttention::unpack(&acc, 2).unwrap();
/// assert_eq!(a, [0.25, 0.25]);
/// assert_eq!(s, [2.5, 1.0, 1.75, 2.0]);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearAttention {
    d_v: usize,
}

impl LinearAttention {
    /// The operator for states with `d_v` columns.
    pub fn new(d_v: usize) -> LinearAttention {
        LinearAttention { d_v }
    }

    /// Columns of the state.
    pub fn d_v(&self) -> usize {
        self.d_v
    }

    /// Packs `a` (`d_k` values) and `s` (`d_k × d_v`, row-major) into the unit layout;
    /// `None` when the lengths do not fit.
    pub fn pack(a: &[f32], s: &[f32], d_v: usize) -> Option<Vec<u8>> {
        if s.len() != a.len().checked_mul(d_v)? {
            return None;
        }
        let mut out = Vec::with_capacity(a.len() * (d_v + 1) * 4);
        for (i, &ai) in a.iter().enumerate() {
            out.extend_from_slice(&ai.to_ne_bytes());
            for &x in &s[i * d_v..(i + 1) * d_v] {
                out.extend_from_slice(&x.to_ne_bytes());
            }
        }
        Some(out)
    }

    /// Unpacks the unit layout into `(a, S)`; `None` when `bytes` is not a whole number
    /// of rows.
    pub fn unpack(bytes: &[u8], d_v: usize) -> Option<(Vec<f32>, Vec<f32>)> {
        let row = (d_v + 1) * 4;
        if bytes.len() % row != 0 {
            return None;
        }
        let values: Vec<f32> = bytemuck::pod_collect_to_vec(bytes);
        let (mut a, mut s) = (Vec::new(), Vec::new());
        for r in values.chunks_exact(d_v + 1) {
            a.push(r[0]);
            s.extend_from_slice(&r[1..]);
        }
        Some((a, s))
    }

    fn combine_f32(&self, acc: &mut [f32], inc: &[f32], order: Order) {
        let w = self.d_v + 1;
        for (x, y) in acc.chunks_exact_mut(w).zip(inc.chunks_exact(w)) {
            match order {
                // acc = incoming ⊕ acc: (a1, S1) = incoming, (a2, S2) = acc.
                Order::IncomingLeft => {
                    let a2 = x[0];
                    x[0] = y[0] * a2;
                    for (s2, &s1) in x[1..].iter_mut().zip(&y[1..]) {
                        *s2 += a2 * s1;
                    }
                }
                // acc = acc ⊕ incoming: (a1, S1) = acc, (a2, S2) = incoming.
                Order::IncomingRight => {
                    let a2 = y[0];
                    x[0] *= a2;
                    for (s1, &s2) in x[1..].iter_mut().zip(&y[1..]) {
                        *s1 = a2 * *s1 + s2;
                    }
                }
            }
        }
    }
}

impl CustomOp for LinearAttention {
    fn unit_bytes(&self) -> usize {
        (self.d_v + 1) * 4
    }

    fn combine(&self, acc: &mut [u8], incoming: &[u8], order: Order) {
        let len = acc.len().min(incoming.len()) / self.unit_bytes() * self.unit_bytes();
        let (acc, incoming) = (&mut acc[..len], &incoming[..len]);
        match (bytemuck::try_cast_slice_mut::<u8, f32>(acc), bytemuck::try_cast_slice::<u8, f32>(incoming)) {
            (Ok(a), Ok(i)) => self.combine_f32(a, i, order),
            (Ok(a), Err(_)) => self.combine_f32(a, &bytemuck::pod_collect_to_vec::<u8, f32>(incoming), order),
            (Err(_), _) => {
                let mut a: Vec<f32> = bytemuck::pod_collect_to_vec(acc);
                self.combine_f32(&mut a, &bytemuck::pod_collect_to_vec::<u8, f32>(incoming), order);
                acc.copy_from_slice(bytemuck::cast_slice(&a));
            }
        }
    }

    fn identity(&self, unit: &mut [u8]) -> bool {
        unit.fill(0);
        if let Some(a) = unit.get_mut(..4) {
            a.copy_from_slice(&1f32.to_ne_bytes());
        }
        true
    }

    fn name(&self) -> &str {
        "linear-attention/f32"
    }
}

/// A user-defined associative operator from a Rust closure on units of `unit_len`
/// elements of `T`: `f(left, right, out)` writes `left ⊕ right` into `out`.
///
/// ```
/// use phalanx::op::{CustomOp, FnOp};
/// use phalanx::dtype::Order;
/// // Affine maps x -> m*x + c as (m, c); "first f, then g" = (g.m*f.m, g.m*f.c + g.c).
/// let op = FnOp::new("affine", 2, Some(vec![1i64, 0]), |f: &[i64], g: &[i64], out: &mut [i64]| {
///     out[0] = g[0] * f[0];
///     out[1] = g[0] * f[1] + g[1];
/// });
/// let mut acc: Vec<u8> = bytemuck::cast_slice(&[3i64, 1]).to_vec();
/// op.combine(&mut acc, bytemuck::cast_slice(&[2i64, 5]), Order::IncomingLeft);
/// assert_eq!(bytemuck::cast_slice::<u8, i64>(&acc), &[6, 16]);
/// ```
pub struct FnOp<T, F> {
    name: String,
    unit_len: usize,
    identity: Option<Vec<T>>,
    f: F,
}

impl<T: Element, F: Fn(&[T], &[T], &mut [T]) + Send + Sync> FnOp<T, F> {
    /// An operator named `name` (part of the fingerprint) on units of `unit_len`
    /// elements, with an optional identity unit (needed for exclusive scans).
    pub fn new(name: impl Into<String>, unit_len: usize, identity: Option<Vec<T>>, f: F) -> FnOp<T, F> {
        FnOp { name: name.into(), unit_len: unit_len.max(1), identity, f }
    }
}

impl<T: Element, F: Fn(&[T], &[T], &mut [T]) + Send + Sync> CustomOp for FnOp<T, F> {
    fn unit_bytes(&self) -> usize {
        self.unit_len * std::mem::size_of::<T>()
    }

    fn combine(&self, acc: &mut [u8], incoming: &[u8], order: Order) {
        let units = acc.len().min(incoming.len()) / self.unit_bytes().max(1);
        let len = units * self.unit_bytes();
        let mut a: Vec<T> = bytemuck::pod_collect_to_vec(&acc[..len]);
        let i: Vec<T> = bytemuck::pod_collect_to_vec(&incoming[..len]);
        let mut out = vec![T::zeroed(); self.unit_len];
        for (x, y) in a.chunks_exact_mut(self.unit_len).zip(i.chunks_exact(self.unit_len)) {
            match order {
                Order::IncomingLeft => (self.f)(y, x, &mut out),
                Order::IncomingRight => (self.f)(x, y, &mut out),
            }
            x.copy_from_slice(&out);
        }
        acc[..len].copy_from_slice(bytemuck::cast_slice(&a));
    }

    fn identity(&self, unit: &mut [u8]) -> bool {
        match &self.identity {
            Some(id) if id.len() == self.unit_len => {
                unit.copy_from_slice(bytemuck::cast_slice(id));
                true
            }
            _ => false,
        }
    }

    fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn la(a: &[f32], s: &[f32]) -> Vec<u8> {
        LinearAttention::pack(a, s, 2).expect("shapes fit")
    }

    #[test]
    fn linear_attention_identity_is_neutral_on_both_sides() {
        let op = LinearAttention::new(2);
        let x = la(&[0.3, -1.5], &[1.25, 2.0, -3.0, 0.1]);
        let mut id = vec![0u8; 2 * op.unit_bytes()];
        for unit in id.chunks_exact_mut(op.unit_bytes()) {
            assert!(op.identity(unit));
        }
        for order in [Order::IncomingLeft, Order::IncomingRight] {
            let mut acc = x.clone();
            op.combine(&mut acc, &id, order);
            assert_eq!(acc, x, "{order:?}");
            let mut acc = id.clone();
            op.combine(&mut acc, &x, order);
            assert_eq!(acc, x, "{order:?}");
        }
    }

    #[test]
    fn linear_attention_orders_are_mirror_images_and_not_commutative() {
        let op = LinearAttention::new(2);
        let (x, y) = (la(&[0.5, 2.0], &[1.0, 2.0, 3.0, 4.0]), la(&[4.0, 0.25], &[-1.0, 0.5, 8.0, 2.0]));
        // x ⊕ y two ways: acc = x with y on the right, acc = y with x on the left.
        let mut right = x.clone();
        op.combine(&mut right, &y, Order::IncomingRight);
        let mut left = y.clone();
        op.combine(&mut left, &x, Order::IncomingLeft);
        assert_eq!(right, left);
        let mut swapped = y.clone();
        op.combine(&mut swapped, &x, Order::IncomingRight);
        assert_ne!(swapped, right, "y ⊕ x differs from x ⊕ y");
    }

    #[test]
    fn linear_attention_combines_unaligned_bytes() {
        let op = LinearAttention::new(2);
        let (x, y) = (la(&[0.5, 2.0], &[1.0, 2.0, 3.0, 4.0]), la(&[4.0, 0.25], &[-1.0, 0.5, 8.0, 2.0]));
        let mut want = x.clone();
        op.combine(&mut want, &y, Order::IncomingRight);
        let mut shifted = vec![0u8; x.len() + 1];
        shifted[1..].copy_from_slice(&x);
        let mut inc = vec![0u8; y.len() + 1];
        inc[1..].copy_from_slice(&y);
        op.combine(&mut shifted[1..], &inc[1..], Order::IncomingRight);
        assert_eq!(&shifted[1..], &want[..]);
    }

    #[test]
    fn pack_unpack_round_trip_and_shape_checks() {
        let (a, s) = (vec![1.0f32, 2.0, 3.0], vec![0.5f32; 6]);
        let packed = LinearAttention::pack(&a, &s, 2).expect("shapes fit");
        assert_eq!(packed.len(), 3 * LinearAttention::new(2).unit_bytes());
        assert_eq!(LinearAttention::unpack(&packed, 2), Some((a.clone(), s)));
        assert!(LinearAttention::pack(&a, &[0.0; 5], 2).is_none());
        assert!(LinearAttention::unpack(&packed[1..], 2).is_none());
    }

    #[test]
    fn fn_op_identity_needs_a_whole_unit() {
        let op = FnOp::new("pairs", 2, Some(vec![0i32]), |l: &[i32], r: &[i32], o: &mut [i32]| {
            o[0] = l[0] + r[0];
            o[1] = l[1] + r[1];
        });
        assert!(!op.identity(&mut [0u8; 8]), "an identity of the wrong length is none");
        assert_eq!(op.name(), "pairs");
    }
}
