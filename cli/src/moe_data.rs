//! The data of `phalanx moe-worker`'s runs, as pure functions, so that the CLI tests
//! (which include this file) recompute what every process must end with.

/// The worked example's weights of expert `e`: `[10e + 1, 10e + 2]`.
pub fn weights(e: usize) -> [f32; 2] {
    [10.0 * e as f32 + 1.0, 10.0 * e as f32 + 2.0]
}

/// The worked example's routing of device `d`'s tokens (4 devices, 8 experts): a quarter
/// of e0's 40 and e4's 20 tokens on every device, the other experts' tokens on one device
/// each, interleaved so that the layer must regroup them.
pub fn routing(d: usize) -> Vec<usize> {
    let counts: [[usize; 8]; 4] =
        [[10, 0, 0, 5, 5, 0, 10, 0], [10, 5, 10, 0, 5, 0, 0, 0], [10, 0, 0, 0, 5, 5, 0, 5], [10, 0, 0, 0, 5, 0, 0, 0]];
    let mut left = counts.get(d).copied().unwrap_or_default();
    let mut out = Vec::new();
    while left.iter().any(|&c| c > 0) {
        for (e, c) in left.iter_mut().enumerate() {
            if *c > 0 {
                *c -= 1;
                out.push(e);
            }
        }
    }
    out
}

/// The worked example's token `i` of device `d`.
pub fn token(d: usize, i: usize) -> [f32; 2] {
    let x = (100 * d + i) as f32;
    [x, -0.5 * x]
}

/// The worked example's gradients of device `d` before spRS: `[k, k]` for e0,
/// `[5k, k]` for e4 (`k = d + 1`), `[e, e]` for the other experts.
pub fn example_grads(d: usize) -> Vec<f32> {
    let k = (d + 1) as f32;
    let mut grads: Vec<f32> = (0..8).flat_map(|e| [e as f32; 2]).collect();
    grads[0..2].copy_from_slice(&[k, k]);
    grads[8..10].copy_from_slice(&[5.0 * k, k]);
    grads
}

/// Experts of the training run.
pub const EXPERTS: usize = 8;
/// Elements of one expert in the training run.
pub const LEN: usize = 3;
/// Learning rate and momentum of the training run.
pub const LR: f32 = 0.125;
/// Momentum coefficient of the training run.
pub const BETA: f32 = 0.75;

/// A float with a full mantissa, so that sums depend on their order.
pub fn float(seed: u64) -> f32 {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5851_f42d_4c95_7f2d;
    x ^= x >> 29;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 32;
    ((x % 2_000_001) as f32 - 1_000_000.0) * 1.1e-6
}

/// Element `k` of expert `e`'s initial parameters.
pub fn initial(e: usize, k: usize) -> f32 {
    1.0 + float((e * LEN + k) as u64)
}

/// Device `device`'s data in iteration `it`: its gradient of element `k` of expert `e`
/// is this times the parameter (so the materialised parameters matter).
pub fn data(it: usize, device: usize, e: usize, k: usize) -> f32 {
    float(1 << 20 | (it * 10_000 + device * 1000 + e * LEN + k) as u64)
}
