//! Tests of [`crate::dtype`]: every type and operator against its element-wise
//! definition, operand order, NaN and integer semantics, the codes, and the byte views.

use super::*;

#[test]
fn unaligned_bytes_go_through_a_copy_written_back_only_on_success() {
    let mut store = [0u32; 3];
    // One byte past a 4-aligned address: never aligned for f32.
    let odd = &mut bytemuck::cast_slice_mut::<u32, u8>(&mut store)[1..9];
    odd.copy_from_slice(bytemuck::cast_slice(&[1.5f32, -2.0]));
    assert!(matches!(typed::<f32>(odd), std::borrow::Cow::Owned(_)));
    let failed: Result<(), &str> = with_typed_mut::<f32, _>(odd, |v| {
        v[0] = 9.0;
        Err("refused")
    });
    assert_eq!((failed, typed::<f32>(odd).to_vec()), (Err("refused"), vec![1.5, -2.0]));
    with_typed_mut::<f32, ()>(odd, |v| {
        v[1] = 7.0;
        Ok(())
    })
    .unwrap();
    assert_eq!(typed::<f32>(odd).to_vec(), vec![1.5, 7.0]);
}

/// The per-element function of `op` (`Avg` combines as `Sum`).
fn op_fn<T: Element>(op: ReduceOp) -> fn(T, T) -> T {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => T::add,
        ReduceOp::Prod => T::mul,
        ReduceOp::Min => T::min,
        ReduceOp::Max => T::max,
    }
}

#[test]
fn codes_round_trip() {
    for d in DType::ALL {
        assert_eq!(DType::from_code(d.code()), Some(d));
    }
    for op in ReduceOp::ALL {
        assert_eq!(ReduceOp::from_code(op.code()), Some(op));
    }
    assert_eq!(DType::from_code(12), None);
    assert_eq!(ReduceOp::from_code(5), None);
}

#[test]
fn order_decides_signed_zero_min() {
    let mut acc = [0.0f32];
    reduce_slice(ReduceOp::Min, &mut acc, &[-0.0], Order::IncomingRight);
    assert!(acc[0].is_sign_negative(), "min(+0, -0) takes the right operand");
    let mut acc = [0.0f32];
    reduce_slice(ReduceOp::Min, &mut acc, &[-0.0], Order::IncomingLeft);
    assert!(acc[0].is_sign_positive(), "min(-0, +0) takes the right operand");
}

/// A NaN on either side, in either order, makes `Min` and `Max` NaN, for every float
/// type (numpy and torch do the same; 1.0 came out when the NaN was on the left).
#[test]
fn min_and_max_propagate_nan_from_either_side() {
    for op in [ReduceOp::Min, ReduceOp::Max] {
        for order in [Order::IncomingRight, Order::IncomingLeft] {
            for (mine, theirs) in [(f32::NAN, 1.0), (1.0, f32::NAN), (f32::NAN, f32::NAN)] {
                let mut acc = [mine, 2.0];
                reduce_slice(op, &mut acc, &[theirs, 3.0], order);
                assert!(acc[0].is_nan(), "{op:?} {order:?} of {mine} and {theirs}");
                assert!(!acc[1].is_nan());
                let mut acc = [mine as f64];
                reduce_slice(op, &mut acc, &[theirs as f64], order);
                assert!(acc[0].is_nan());
                let mut acc = [half::bf16::from_f32(mine)];
                reduce_slice(op, &mut acc, &[half::bf16::from_f32(theirs)], order);
                assert!(acc[0].is_nan());
                let mut acc = [half::f16::from_f32(mine)];
                reduce_slice(op, &mut acc, &[half::f16::from_f32(theirs)], order);
                assert!(acc[0].is_nan());
            }
        }
    }
}

#[test]
fn integer_sum_wraps_and_avg_truncates() {
    let mut acc = [i8::MAX, -7];
    reduce_slice(ReduceOp::Sum, &mut acc, &[1, 0], Order::IncomingRight);
    assert_eq!(acc, [i8::MIN, -7]);
    divide_slice(&mut acc, 2);
    assert_eq!(acc, [-64, -3]);
}

#[test]
fn half_types_round_once_per_combine() {
    let mut acc = [bf16::from_f32(1.0), bf16::from_f32(256.0)];
    reduce_slice(ReduceOp::Sum, &mut acc, &[bf16::from_f32(2.0), bf16::from_f32(1.0)], Order::IncomingLeft);
    assert_eq!(acc[0].to_f32(), 3.0);
    assert_eq!(acc[1].to_f32(), 256.0, "256 + 1 rounds to even in bf16");
    let mut h = [f16::from_f32(0.5)];
    reduce_slice(ReduceOp::Prod, &mut h, &[f16::from_f32(3.0)], Order::IncomingRight);
    assert_eq!(h[0].to_f32(), 1.5);
}

#[test]
fn bytes_kernel_handles_misaligned_input() {
    let acc_vals = [1.0f64, 2.0, 3.0];
    let mut acc: Vec<u8> = bytemuck::cast_slice(&acc_vals).to_vec();
    let inc_vals = [0.5f64, 0.25, 0.125];
    let mut backing = [0u8; 25];
    backing[1..].copy_from_slice(bytemuck::cast_slice(&inc_vals));
    reduce_bytes(DType::F64, ReduceOp::Sum, &mut acc, &backing[1..], Order::IncomingRight);
    let out: Vec<f64> = bytemuck::allocation::pod_collect_to_vec(&acc);
    assert_eq!(out, vec![1.5, 2.25, 3.125]);
}

#[test]
fn every_dtype_and_op_matches_elementwise_definition() {
    fn check<T: Element>(vals: &[T]) {
        for op in ReduceOp::ALL {
            for order in [Order::IncomingLeft, Order::IncomingRight] {
                let mut acc = vals.to_vec();
                let inc: Vec<T> = vals.iter().rev().copied().collect();
                let mut bytes: Vec<u8> = bytemuck::cast_slice(&acc).to_vec();
                reduce_bytes(T::DTYPE, op, &mut bytes, bytemuck::cast_slice(&inc), order);
                reduce_slice(op, &mut acc, &inc, order);
                let f = op_fn::<T>(op);
                let expect: Vec<T> = vals
                    .iter()
                    .zip(&inc)
                    .map(|(&a, &b)| if order == Order::IncomingRight { f(a, b) } else { f(b, a) })
                    .collect();
                assert_eq!(acc, expect, "{} {op:?}", T::DTYPE);
                assert_eq!(bytes, bytemuck::cast_slice::<T, u8>(&expect));
            }
        }
    }
    check::<f32>(&[1.5, -2.0, 3.25, 0.0]);
    check::<f64>(&[1.5, -2.0, 3.25, 0.0]);
    check(&[f16::from_f32(1.5), f16::from_f32(-2.0), f16::ONE]);
    check(&[bf16::from_f32(1.5), bf16::from_f32(-2.0), bf16::ONE]);
    check::<i8>(&[1, -2, 100, i8::MIN]);
    check::<i16>(&[1, -2, 300]);
    check::<i32>(&[1, -2, 70000]);
    check::<i64>(&[1, -2, 1 << 40]);
    check::<u8>(&[1, 2, 200]);
    check::<u16>(&[1, 2, 60000]);
    check::<u32>(&[1, 2, u32::MAX]);
    check::<u64>(&[1, 2, u64::MAX]);
}
