//! Element types, reduction operators and the reduce kernels.
//!
//! Collectives move bytes; this module is where bytes become numbers again. A
//! [`DType`] names an element type at run time (it crosses the wire and the C ABI), an
//! [`Element`] is the matching Rust type, and [`reduce_bytes`] combines a received range
//! into a local one with one dispatch per call, never per element: the inner loops are
//! plain slice loops that the compiler vectorises.
//!
//! # Operand order
//!
//! Every combine has a left and a right operand. Plans always put the contribution of
//! the lower position in their fixed order on the left ([`Order`]), so that even
//! operations that are not bitwise commutative (float `Min` on `+0.0`/`-0.0`, NaN
//! payloads) give identical bytes on every rank.
//!
//! # Integer semantics
//!
//! Integer `Sum` and `Prod` wrap on overflow (two's complement), like the hardware and
//! like NCCL. `Avg` is the wrapped sum divided by the number of contributors, truncated
//! toward zero (`-7 / 2 == -3`). Float `Avg` is the fixed-order sum divided by the number
//! of contributors in the element type's arithmetic (f32 for f16 and bf16).
//!
//! ```
//! use phalanx::dtype::{reduce_slice, Order, ReduceOp};
//! let mut acc = [1.0f32, 2.0, 3.0];
//! reduce_slice(ReduceOp::Sum, &mut acc, &[10.0, 20.0, 30.0], Order::IncomingRight);
//! assert_eq!(acc, [11.0, 22.0, 33.0]);
//! ```

use std::fmt;

pub use half::{bf16, f16};

/// The element type of a buffer, as named on the wire and across the C ABI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    /// IEEE 754 binary32.
    F32 = 0,
    /// IEEE 754 binary64.
    F64 = 1,
    /// IEEE 754 binary16 (`half::f16`).
    F16 = 2,
    /// bfloat16 (`half::bf16`).
    BF16 = 3,
    /// Signed 8-bit integer.
    I8 = 4,
    /// Signed 16-bit integer.
    I16 = 5,
    /// Signed 32-bit integer.
    I32 = 6,
    /// Signed 64-bit integer.
    I64 = 7,
    /// Unsigned 8-bit integer.
    U8 = 8,
    /// Unsigned 16-bit integer.
    U16 = 9,
    /// Unsigned 32-bit integer.
    U32 = 10,
    /// Unsigned 64-bit integer.
    U64 = 11,
}

impl DType {
    /// Every element type, in code order.
    pub const ALL: [DType; 12] = [
        DType::F32,
        DType::F64,
        DType::F16,
        DType::BF16,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::U8,
        DType::U16,
        DType::U32,
        DType::U64,
    ];

    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DType::I8 | DType::U8 => 1,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F64 | DType::I64 | DType::U64 => 8,
        }
    }

    /// The type for a wire or C code, or `None` when the code names no type.
    pub fn from_code(code: u8) -> Option<DType> {
        DType::ALL.get(code as usize).copied()
    }

    /// The wire and C code of this type.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// Whether this is a floating-point type.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I8 => "i8",
            DType::I16 => "i16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
            DType::U16 => "u16",
            DType::U32 => "u32",
            DType::U64 => "u64",
        };
        f.write_str(name)
    }
}

/// A reduction operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReduceOp {
    /// Sum (wrapping for integers).
    Sum = 0,
    /// Product (wrapping for integers).
    Prod = 1,
    /// Minimum.
    Min = 2,
    /// Maximum.
    Max = 3,
    /// Sum, then division by the number of contributors (see the module docs).
    Avg = 4,
}

impl ReduceOp {
    /// Every operator, in code order.
    pub const ALL: [ReduceOp; 5] = [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max, ReduceOp::Avg];

    /// The operator for a wire or C code, or `None` when the code names none.
    pub fn from_code(code: u8) -> Option<ReduceOp> {
        ReduceOp::ALL.get(code as usize).copied()
    }

    /// The wire and C code of this operator.
    pub const fn code(self) -> u8 {
        self as u8
    }
}

/// Which side of a combine the incoming (received) operand takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Order {
    /// `local = incoming ⊕ local`: the sender comes first in the plan's fixed order.
    IncomingLeft,
    /// `local = local ⊕ incoming`: the receiver comes first in the plan's fixed order.
    IncomingRight,
}

/// A type that collectives can carry and reduce.
///
/// Implemented for the twelve types of [`DType`]; the binary operations here are the
/// per-element definitions that the kernels apply in their loops.
pub trait Element: bytemuck::Pod + PartialEq + fmt::Debug + Send + Sync + 'static {
    /// The run-time name of this type.
    const DTYPE: DType;
    /// `a + b` (wrapping for integers).
    fn add(a: Self, b: Self) -> Self;
    /// `a * b` (wrapping for integers).
    fn mul(a: Self, b: Self) -> Self;
    /// The smaller of `a` and `b`; `b` when they are equal. For floats a NaN on either
    /// side wins (the left one when both are), as in numpy and torch: a NaN in any
    /// rank's input makes the result NaN, which inf/NaN checks rely on.
    fn min(a: Self, b: Self) -> Self;
    /// The larger of `a` and `b`; `b` when they are equal; NaN wins as for [`Element::min`].
    fn max(a: Self, b: Self) -> Self;
    /// `self / n`, truncated toward zero for integers.
    fn div_count(self, n: usize) -> Self;
}

macro_rules! int_element {
    ($t:ty, $d:ident) => {
        impl Element for $t {
            const DTYPE: DType = DType::$d;
            #[inline(always)]
            fn add(a: Self, b: Self) -> Self {
                a.wrapping_add(b)
            }
            #[inline(always)]
            fn mul(a: Self, b: Self) -> Self {
                a.wrapping_mul(b)
            }
            #[inline(always)]
            fn min(a: Self, b: Self) -> Self {
                if a < b {
                    a
                } else {
                    b
                }
            }
            #[inline(always)]
            fn max(a: Self, b: Self) -> Self {
                if a > b {
                    a
                } else {
                    b
                }
            }
            #[inline(always)]
            fn div_count(self, n: usize) -> Self {
                // A group has far fewer members than any integer type's range except i8/u8;
                // n is clamped there so that the division stays defined.
                let n = <$t>::try_from(n).unwrap_or(<$t>::MAX); // ok: clamped, never panics
                self.wrapping_div(n.max(1))
            }
        }
    };
}

int_element!(i8, I8);
int_element!(i16, I16);
int_element!(i32, I32);
int_element!(i64, I64);
int_element!(u8, U8);
int_element!(u16, U16);
int_element!(u32, U32);
int_element!(u64, U64);

macro_rules! float_element {
    ($t:ty, $d:ident) => {
        impl Element for $t {
            const DTYPE: DType = DType::$d;
            #[inline(always)]
            fn add(a: Self, b: Self) -> Self {
                a + b
            }
            #[inline(always)]
            fn mul(a: Self, b: Self) -> Self {
                a * b
            }
            #[inline(always)]
            fn min(a: Self, b: Self) -> Self {
                // A NaN on the left wins here; one on the right fails the comparison.
                if a < b || a.is_nan() {
                    a
                } else {
                    b
                }
            }
            #[inline(always)]
            fn max(a: Self, b: Self) -> Self {
                if a > b || a.is_nan() {
                    a
                } else {
                    b
                }
            }
            #[inline(always)]
            fn div_count(self, n: usize) -> Self {
                self / n as $t
            }
        }
    };
}

float_element!(f32, F32);
float_element!(f64, F64);

macro_rules! half_element {
    ($t:ty, $d:ident) => {
        impl Element for $t {
            const DTYPE: DType = DType::$d;
            #[inline(always)]
            fn add(a: Self, b: Self) -> Self {
                <$t>::from_f32(a.to_f32() + b.to_f32())
            }
            #[inline(always)]
            fn mul(a: Self, b: Self) -> Self {
                <$t>::from_f32(a.to_f32() * b.to_f32())
            }
            #[inline(always)]
            fn min(a: Self, b: Self) -> Self {
                // A NaN on the left wins here; one on the right fails the comparison.
                if a.to_f32() < b.to_f32() || a.is_nan() {
                    a
                } else {
                    b
                }
            }
            #[inline(always)]
            fn max(a: Self, b: Self) -> Self {
                if a.to_f32() > b.to_f32() || a.is_nan() {
                    a
                } else {
                    b
                }
            }
            #[inline(always)]
            fn div_count(self, n: usize) -> Self {
                <$t>::from_f32(self.to_f32() / n as f32)
            }
        }
    };
}

half_element!(f16, F16);
half_element!(bf16, BF16);

#[inline(always)]
fn zip_apply<T: Element>(acc: &mut [T], inc: &[T], order: Order, f: impl Fn(T, T) -> T) {
    match order {
        Order::IncomingRight => acc.iter_mut().zip(inc).for_each(|(a, &b)| *a = f(*a, b)),
        Order::IncomingLeft => acc.iter_mut().zip(inc).for_each(|(a, &b)| *a = f(b, *a)),
    }
}

/// Combines `incoming` into `acc` element by element: the typed kernel.
///
/// One `match` per call selects a monomorphic loop; the loop body is the operator
/// alone, so it vectorises. Only the common prefix is combined if lengths differ.
pub fn reduce_slice<T: Element>(op: ReduceOp, acc: &mut [T], incoming: &[T], order: Order) {
    // Each arm passes a concrete function item, so every loop is specialised.
    match op {
        ReduceOp::Sum | ReduceOp::Avg => zip_apply(acc, incoming, order, T::add),
        ReduceOp::Prod => zip_apply(acc, incoming, order, T::mul),
        ReduceOp::Min => zip_apply(acc, incoming, order, T::min),
        ReduceOp::Max => zip_apply(acc, incoming, order, T::max),
    }
}

/// Divides every element by `count`: the second half of `Avg`.
pub fn divide_slice<T: Element>(buf: &mut [T], count: usize) {
    buf.iter_mut().for_each(|x| *x = x.div_count(count));
}

/// Runs `f` on `bytes` viewed as a `&mut [T]`. Bytes not aligned for `T` (a received
/// frame, a C or numpy buffer) go through an aligned copy, written back only if `f`
/// succeeds, so that an error leaves `bytes` as they were.
pub fn with_typed_mut<T: bytemuck::Pod, E>(
    bytes: &mut [u8],
    f: impl FnOnce(&mut [T]) -> Result<(), E>,
) -> Result<(), E> {
    match bytemuck::try_cast_slice_mut::<u8, T>(bytes) {
        Ok(typed) => f(typed),
        Err(_) => {
            let mut tmp: Vec<T> = bytemuck::allocation::pod_collect_to_vec(bytes);
            f(&mut tmp)?;
            bytes.copy_from_slice(bytemuck::cast_slice(&tmp));
            Ok(())
        }
    }
}

/// Views `bytes` as `&[T]`, copying when they are not aligned for `T`.
pub fn typed<T: bytemuck::Pod>(bytes: &[u8]) -> std::borrow::Cow<'_, [T]> {
    match bytemuck::try_cast_slice::<u8, T>(bytes) {
        Ok(typed) => std::borrow::Cow::Borrowed(typed),
        Err(_) => std::borrow::Cow::Owned(bytemuck::allocation::pod_collect_to_vec(bytes)),
    }
}

/// [`with_typed_mut`] for the kernels, which cannot fail.
fn apply_typed<T: Element>(bytes: &mut [u8], f: impl FnOnce(&mut [T])) {
    let done: Result<(), std::convert::Infallible> = with_typed_mut(bytes, |t| {
        f(t);
        Ok(())
    });
    let Ok(()) = done;
}

fn reduce_bytes_typed<T: Element>(op: ReduceOp, acc: &mut [u8], incoming: &[u8], order: Order) {
    let inc = typed::<T>(incoming);
    apply_typed::<T>(acc, |acc| reduce_slice(op, acc, &inc, order));
}

/// Runs `$body` with `$t` bound to the unsigned integer of `$size` bytes (1, 2, 4 or
/// 8), for steps that only move elements' bits (dispatch, combine, materialize); any
/// other width is an [`Error::InvalidArgument`](crate::Error::InvalidArgument),
/// converted into the caller's error type.
///
/// ```
/// let bits = |w: usize| -> phalanx::Result<u32> { phalanx::by_width!(w, T => Ok(T::BITS)) };
/// assert_eq!(bits(2)?, 16);
/// assert!(bits(3).is_err());
/// # Ok::<(), phalanx::Error>(())
/// ```
#[macro_export]
macro_rules! by_width {
    ($size:expr, $t:ident => $body:expr) => {
        match $size {
            1 => {
                type $t = u8;
                $body
            }
            2 => {
                type $t = u16;
                $body
            }
            4 => {
                type $t = u32;
                $body
            }
            8 => {
                type $t = u64;
                $body
            }
            other => Err($crate::Error::InvalidArgument(format!("no element type is {other} bytes wide")).into()),
        }
    };
}

/// Runs `$body` with `$t` bound to the Rust type of a [`DType`](crate::DType) value:
/// one body for every element type, as the C and Python faces need for typed calls.
///
/// ```
/// use phalanx::DType;
/// let size = |d: DType| phalanx::with_dtype!(d, T => std::mem::size_of::<T>());
/// assert_eq!((size(DType::BF16), size(DType::U64)), (2, 8));
/// ```
#[macro_export]
macro_rules! with_dtype {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $t = f32;
                $body
            }
            $crate::DType::F64 => {
                type $t = f64;
                $body
            }
            $crate::DType::F16 => {
                type $t = $crate::dtype::f16;
                $body
            }
            $crate::DType::BF16 => {
                type $t = $crate::dtype::bf16;
                $body
            }
            $crate::DType::I8 => {
                type $t = i8;
                $body
            }
            $crate::DType::I16 => {
                type $t = i16;
                $body
            }
            $crate::DType::I32 => {
                type $t = i32;
                $body
            }
            $crate::DType::I64 => {
                type $t = i64;
                $body
            }
            $crate::DType::U8 => {
                type $t = u8;
                $body
            }
            $crate::DType::U16 => {
                type $t = u16;
                $body
            }
            $crate::DType::U32 => {
                type $t = u32;
                $body
            }
            $crate::DType::U64 => {
                type $t = u64;
                $body
            }
        }
    };
}

/// Combines the bytes of `incoming` into `acc`, both holding elements of `dtype`.
///
/// Both slices must have the same length, a multiple of `dtype.size()`; the executor
/// checks frame lengths before calling this, so a violation is a bug, and only the
/// common whole-element prefix is combined.
pub fn reduce_bytes(dtype: DType, op: ReduceOp, acc: &mut [u8], incoming: &[u8], order: Order) {
    let len = acc.len().min(incoming.len()) / dtype.size() * dtype.size();
    let (acc, incoming) = (&mut acc[..len], &incoming[..len]);
    with_dtype!(dtype, T => reduce_bytes_typed::<T>(op, acc, incoming, order))
}

/// Divides every element of `buf` (elements of `dtype`) by `count`.
pub fn divide_bytes(dtype: DType, buf: &mut [u8], count: usize) {
    let len = buf.len() / dtype.size() * dtype.size();
    with_dtype!(dtype, T => apply_typed::<T>(&mut buf[..len], |b| divide_slice(b, count)))
}

#[cfg(test)]
#[path = "dtype_tests.rs"]
mod tests;
