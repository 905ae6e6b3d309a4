//! All-scan on a [`Communicator`]: built-in operators, user-defined ones, and the
//! linear-attention state combine. See [`crate::plan::scan`] for the algorithms and
//! the order of combination.

use half::{bf16, f16};

use super::{elements, Communicator};
use crate::collective::{fnv1a, Collective};
use crate::dtype::{DType, Element, ReduceOp};
use crate::error::{Error, Result};
use crate::op::{CustomOp, FnOp, LinearAttention};
use crate::plan::scan::{self, Algorithm};

/// How an all-scan runs. Every rank must pass the same options.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ScanOptions {
    /// `true` (the default): rank `r` gets `x_0 ⊕ … ⊕ x_r`; `false`: `x_0 ⊕ … ⊕ x_{r-1}`,
    /// and the first rank gets the operator's identity.
    pub inclusive: bool,
    /// Scan in the order `n-1, …, 0` (rank `n-1` first) instead of `0, …, n-1`.
    pub reverse: bool,
    /// The algorithm; [`Algorithm::Auto`] picks by state size.
    pub algorithm: Algorithm,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions { inclusive: true, reverse: false, algorithm: Algorithm::Auto }
    }
}

impl ScanOptions {
    /// An exclusive scan in rank order.
    pub fn exclusive() -> ScanOptions {
        ScanOptions { inclusive: false, ..ScanOptions::default() }
    }

    /// The same options with the scan order reversed.
    pub fn reversed(self) -> ScanOptions {
        ScanOptions { reverse: !self.reverse, ..self }
    }

    /// The same options with `algorithm`.
    pub fn with_algorithm(self, algorithm: Algorithm) -> ScanOptions {
        ScanOptions { algorithm, ..self }
    }
}

/// The identity of a built-in operator as one element of `dtype`: 0 for `Sum`, 1 for
/// `Prod`, the largest value (+∞ for floats) for `Min`, the smallest (−∞) for `Max`.
/// `None` for `Avg`, which has no scan.
pub fn builtin_identity(dtype: DType, op: ReduceOp) -> Option<Vec<u8>> {
    macro_rules! pick {
        ($zero:expr, $one:expr, $max:expr, $min:expr) => {
            match op {
                ReduceOp::Sum => Some($zero.to_ne_bytes().to_vec()),
                ReduceOp::Prod => Some($one.to_ne_bytes().to_vec()),
                ReduceOp::Min => Some($max.to_ne_bytes().to_vec()),
                ReduceOp::Max => Some($min.to_ne_bytes().to_vec()),
                ReduceOp::Avg => None,
            }
        };
    }
    macro_rules! int {
        ($t:ty) => {
            pick!(0 as $t, 1 as $t, <$t>::MAX, <$t>::MIN)
        };
    }
    match dtype {
        DType::F32 => pick!(0f32, 1f32, f32::INFINITY, f32::NEG_INFINITY),
        DType::F64 => pick!(0f64, 1f64, f64::INFINITY, f64::NEG_INFINITY),
        DType::F16 => pick!(f16::ZERO, f16::ONE, f16::INFINITY, f16::NEG_INFINITY),
        DType::BF16 => pick!(bf16::ZERO, bf16::ONE, bf16::INFINITY, bf16::NEG_INFINITY),
        DType::I8 => int!(i8),
        DType::I16 => int!(i16),
        DType::I32 => int!(i32),
        DType::I64 => int!(i64),
        DType::U8 => int!(u8),
        DType::U16 => int!(u16),
        DType::U32 => int!(u32),
        DType::U64 => int!(u64),
    }
}

impl Communicator {
    /// Replaces `buf` by the scan over ranks of every rank's `buf` with `op` (`Sum`,
    /// `Prod`, `Min` or `Max`), element-wise.
    ///
    /// All ranks must pass buffers of the same length and type, the same `op` and the
    /// same `options`. On error `buf` is unchanged.
    ///
    /// ```
    /// use phalanx::{Communicator, ReduceOp};
    /// use phalanx::comm::ScanOptions;
    /// let comms = Communicator::local_group(3, Default::default()).unwrap();
    /// let out: Vec<Vec<i32>> = std::thread::scope(|s| {
    ///     let hs: Vec<_> = comms.into_iter().map(|mut c| s.spawn(move || {
    ///         let mut x = vec![c.rank() as i32 + 1; 2];
    ///         c.all_scan(&mut x, ReduceOp::Sum, ScanOptions::default()).unwrap();
    ///         x
    ///     })).collect();
    ///     hs.into_iter().map(|h| h.join().unwrap()).collect()
    /// });
    /// assert_eq!(out, vec![vec![1, 1], vec![3, 3], vec![6, 6]]);
    /// ```
    pub fn all_scan<T: Element>(&mut self, buf: &mut [T], op: ReduceOp, options: ScanOptions) -> Result<()> {
        self.all_scan_raw(bytemuck::cast_slice_mut(buf), T::DTYPE, op, options)
    }

    /// [`Communicator::all_scan`] on the bytes of elements of type `dtype`.
    pub fn all_scan_raw(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp, options: ScanOptions) -> Result<()> {
        let identity = builtin_identity(dtype, op)
            .ok_or_else(|| Error::InvalidArgument(format!("{op:?} has no scan; use Sum, Prod, Min or Max")))?;
        let len = elements(buf.len(), dtype, "buffer")?;
        self.scan_run(buf, len, dtype.size(), dtype, op, None, Some(&identity), 0, options)
    }

    /// Scans `buf`, a whole number of `op`'s units, with the user-defined associative
    /// operator `op` (see [`CustomOp`]). An exclusive scan needs `op` to have an
    /// identity. All ranks must pass operators of the same name and unit size.
    pub fn all_scan_with(&mut self, buf: &mut [u8], op: &dyn CustomOp, options: ScanOptions) -> Result<()> {
        let unit = op.unit_bytes();
        if unit == 0 || buf.len() % unit != 0 {
            return Err(Error::InvalidArgument(format!(
                "buffer of {} bytes is not a whole number of {unit}-byte units",
                buf.len()
            )));
        }
        let mut identity = vec![0u8; unit];
        let identity = op.identity(&mut identity).then_some(identity);
        if identity.is_none() && !options.inclusive {
            return Err(Error::InvalidArgument(format!(
                "an exclusive scan needs an identity; operator {:?} has none",
                op.name()
            )));
        }
        let op_id = fnv1a(op.name().bytes()).max(1);
        let len = buf.len() / unit;
        self.scan_run(buf, len, unit, DType::U8, ReduceOp::Sum, Some(op), identity.as_deref(), op_id, options)
    }

    /// Scans `buf` with a closure: `f(left, right, out)` writes `left ⊕ right` for units
    /// of `unit_len` elements; `name` identifies the operator across ranks, `identity`
    /// (one unit) is needed for exclusive scans. The closure must be associative; it
    /// need not commute (the earlier operand in scan order is always `left`).
    ///
    /// ```
    /// use phalanx::Communicator;
    /// use phalanx::comm::ScanOptions;
    /// // 2x2 integer matrix products, row-major: order matters.
    /// let mul = |l: &[i64], r: &[i64], o: &mut [i64]| {
    ///     o[0] = l[0] * r[0] + l[1] * r[2];
    ///     o[1] = l[0] * r[1] + l[1] * r[3];
    ///     o[2] = l[2] * r[0] + l[3] * r[2];
    ///     o[3] = l[2] * r[1] + l[3] * r[3];
    /// };
    /// let comms = Communicator::local_group(2, Default::default()).unwrap();
    /// let out: Vec<Vec<i64>> = std::thread::scope(|s| {
    ///     let hs: Vec<_> = comms.into_iter().map(|mut c| s.spawn(move || {
    ///         let mut m = if c.rank() == 0 { vec![1, 1, 0, 1] } else { vec![1, 0, 1, 1] };
    ///         c.all_scan_fn(&mut m, "mat2", 4, None, mul, ScanOptions::default()).unwrap();
    ///         m
    ///     })).collect();
    ///     hs.into_iter().map(|h| h.join().unwrap()).collect()
    /// });
    /// assert_eq!(out[1], vec![2, 1, 1, 1]); // [[1,1],[0,1]] · [[1,0],[1,1]]
    /// ```
    pub fn all_scan_fn<T: Element>(
        &mut self,
        buf: &mut [T],
        name: &str,
        unit_len: usize,
        identity: Option<Vec<T>>,
        f: impl Fn(&[T], &[T], &mut [T]) + Send + Sync,
        options: ScanOptions,
    ) -> Result<()> {
        let op = FnOp::new(name, unit_len, identity, f);
        self.all_scan_with(bytemuck::cast_slice_mut(buf), &op, options)
    }

    /// Scans linear-attention states `(a, S)` with [`LinearAttention`]'s combine: `a`
    /// holds `d_k` gates and `s` the `d_k × d_v` state (row-major), replaced by the
    /// (inclusive or exclusive) prefix `(∏ a, Σ diag(later a)·S)` over ranks. The
    /// exclusive scan gives the first rank `(1, 0)`.
    pub fn all_scan_linear_attention(
        &mut self,
        a: &mut [f32],
        s: &mut [f32],
        d_v: usize,
        options: ScanOptions,
    ) -> Result<()> {
        let mut packed = LinearAttention::pack(a, s, d_v).ok_or_else(|| {
            Error::InvalidArgument(format!("state of {} values is not {} rows of {d_v}", s.len(), a.len()))
        })?;
        self.all_scan_with(&mut packed, &LinearAttention::new(d_v), options)?;
        let (na, ns) = LinearAttention::unpack(&packed, d_v)
            .ok_or_else(|| Error::InvalidArgument("state of the wrong size".into()))?;
        a.copy_from_slice(&na);
        s.copy_from_slice(&ns);
        Ok(())
    }

    /// Runs the scan on a working buffer laid out as [`crate::plan::scan`] says and
    /// copies the result into `buf` on success only.
    #[allow(clippy::too_many_arguments)]
    fn scan_run(
        &mut self,
        buf: &mut [u8],
        len: usize,
        unit_bytes: usize,
        dtype: DType,
        op: ReduceOp,
        custom: Option<&dyn CustomOp>,
        identity: Option<&[u8]>,
        op_id: u64,
        options: ScanOptions,
    ) -> Result<()> {
        let coll = Collective::AllScan {
            len,
            unit_bytes,
            inclusive: options.inclusive,
            reverse: options.reverse,
            algorithm: options.algorithm,
            op_id,
        };
        let algorithm = options.algorithm.resolve(len, unit_bytes);
        let mut work = vec![0u8; scan::working_len(len, algorithm) * unit_bytes];
        let bytes = len * unit_bytes;
        work[..bytes].copy_from_slice(buf);
        if let Some(id) = identity.filter(|_| !options.inclusive) {
            work[bytes..2 * bytes].chunks_exact_mut(unit_bytes).for_each(|u| u.copy_from_slice(id));
        }
        self.run_spec(super::peer::CallSpec { coll: &coll, dtype, op, custom }, &mut work)?;
        let r = scan::result_range(len, options.inclusive, algorithm);
        buf.copy_from_slice(&work[r.start * unit_bytes..r.end * unit_bytes]);
        Ok(())
    }
}
