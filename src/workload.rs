//! The deterministic training-like workload of the worker, the churn harness and the
//! multi-process tests: gradients that anyone can recompute.

/// The gradient peer `id` contributes at `step`: small integers in `-3..=3`, so that
/// sums over up to a million peers are exact in f32 and any reordering gives the same
/// bits. A harness recomputes the expected all-reduce from the member list alone.
///
/// ```
/// let g = phalanx::workload::gradient(7, 3, 4);
/// assert_eq!(g, phalanx::workload::gradient(7, 3, 4));
/// assert!(g.iter().all(|v| v.abs() <= 3.0 && v.fract() == 0.0));
/// ```
pub fn gradient(id: u64, step: u64, len: usize) -> Vec<f32> {
    let seed = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step.wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..len as u64)
        .map(|i| {
            let x = (seed ^ i.wrapping_mul(0x94D0_49BB_1331_11EB)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            ((x >> 32) % 7) as f32 - 3.0
        })
        .collect()
}

/// The exact sum of the members' gradients at `step`.
pub fn expected_sum(members: &[u64], step: u64, len: usize) -> Vec<f32> {
    let mut sum = vec![0f32; len];
    for &id in members {
        for (s, g) in sum.iter_mut().zip(gradient(id, step, len)) {
            *s += g;
        }
    }
    sum
}

/// A short hex form of the BLAKE3 hash of `values`' bytes, for reports.
pub fn hash_f32(values: &[f32]) -> String {
    let h = blake3::hash(bytemuck::cast_slice(values));
    h.to_hex()[..16].to_string()
}
