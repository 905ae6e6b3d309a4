//! The MoE layer of `phalanx moe-worker --mode mlp`, as pure functions shared with the
//! CLI tests (which include this file): 8 experts, each a small MLP `y = W2 relu(W1 x)`,
//! a Zipf-skewed gate with top-1 or top-2 routing, 4 devices of 24 tokens.

use phalanx::moe::{place, plan_sharding, ExpertPlacement, MoeLayer, PlaceParams};

use crate::moe_data::float;

/// Elements of a token's hidden state.
pub const H: usize = 4;
/// The experts' inner width.
pub const F: usize = 8;
/// Elements of an expert: W1 (F×H) then W2 (H×F).
pub const W: usize = 2 * H * F;
/// Devices of the layer.
pub const DEVICES: usize = 4;
/// Experts of the layer.
pub const EXPERTS: usize = 8;
/// Tokens per device.
pub const TOKENS: usize = 24;

/// Expert `e`'s initial weights.
pub fn expert_weights(e: usize) -> Vec<f32> {
    (0..W).map(|i| float((e * 1000 + i) as u64)).collect()
}

/// Token `i` of device `d`.
pub fn x_of(d: usize, i: usize) -> Vec<f32> {
    (0..H).map(|j| float((1 << 20) + (d * 1000 + i * 10 + j) as u64)).collect()
}

/// The upstream gradient of token `i` of device `d` (the loss is `Σ <c, output>`).
pub fn c_of(d: usize, i: usize) -> Vec<f32> {
    (0..H).map(|j| float((1 << 30) + (d * 1000 + i * 10 + j) as u64)).collect()
}

/// `(y, z)` with `z = W1 x`, `y = W2 relu(z)`.
pub fn mlp(w: &[f32], x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (w1, w2) = w.split_at(F * H);
    let z: Vec<f32> = (0..F).map(|r| (0..H).fold(0.0, |a, j| a + w1[r * H + j] * x[j])).collect();
    let y = (0..H).map(|r| (0..F).fold(0.0, |a, j| a + w2[r * F + j] * z[j].max(0.0))).collect();
    (y, z)
}

/// `(dW, dx)` of one token given `dy`.
pub fn mlp_backward(w: &[f32], x: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (_, z) = mlp(w, x);
    let w2 = &w[F * H..];
    let mut dw = vec![0.0f32; W];
    for r in 0..H {
        for j in 0..F {
            dw[F * H + r * F + j] = dy[r] * z[j].max(0.0);
        }
    }
    let dz: Vec<f32> =
        (0..F).map(|j| if z[j] > 0.0 { (0..H).fold(0.0, |a, r| a + w2[r * F + j] * dy[r]) } else { 0.0 }).collect();
    for r in 0..F {
        for j in 0..H {
            dw[r * H + j] = dz[r] * x[j];
        }
    }
    let dx = (0..H).map(|j| (0..F).fold(0.0, |a, r| a + w[r * H + j] * dz[r])).collect();
    (dw, dx)
}

/// The gate: each of device `d`'s tokens' `k` experts (distinct, Zipf 1.2 over a
/// shuffled order) and their weights.
pub fn gate(d: usize, k: usize) -> Vec<Vec<(usize, f32)>> {
    let order = [5, 2, 7, 0, 3, 6, 1, 4]; // expert of popularity rank 1, 2, ...
    let cdf: Vec<f64> = (1..=EXPERTS)
        .scan(0.0, |acc, r| {
            *acc += (r as f64).powf(-1.2);
            Some(*acc)
        })
        .collect();
    let weights: &[f32] = if k == 1 { &[1.0] } else { &[0.625, 0.375] };
    (0..TOKENS)
        .map(|i| {
            let mut chosen: Vec<usize> = Vec::new();
            let mut n = 0u64;
            while chosen.len() < k.min(weights.len()) {
                let u = (float((3 << 30) + (d * 1000 + i * 10) as u64 + n) as f64 / 1.1 + 1.0) / 2.0;
                n += 1;
                let rank = cdf.partition_point(|&c| c < u * cdf[EXPERTS - 1]).min(EXPERTS - 1);
                if !chosen.contains(&order[rank]) {
                    chosen.push(order[rank]);
                }
            }
            chosen.into_iter().zip(weights.iter().copied()).collect()
        })
        .collect()
}

/// Device `d`'s rows (one per token and choice, token-major: the token and its gate
/// weight) and their experts.
pub fn rows(d: usize, k: usize) -> (Vec<(usize, f32)>, Vec<usize>) {
    let g = gate(d, k);
    let picks: Vec<(usize, f32)> =
        g.iter().enumerate().flat_map(|(i, c)| c.iter().map(move |&(_, w)| (i, w))).collect();
    let experts = g.iter().flatten().map(|&(e, _)| e).collect();
    (picks, experts)
}

/// Each token's output `Σ_k g_k · y_k`, summed in k order.
pub fn mix(picks: &[(usize, f32)], per_row: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; TOKENS * H];
    for (row, &(i, g)) in picks.iter().enumerate() {
        for j in 0..H {
            out[i * H + j] += g * per_row[row * H + j];
        }
    }
    out
}

/// What [`plan`] gives: the owners, every device's routed counts per expert, and P′.
pub type Plan = (Vec<usize>, Vec<Vec<u64>>, ExpertPlacement);

/// The owners, every device's routed counts per expert, and P′ (`t = m = 2`, placed
/// from this iteration's own counts) for top-`k` routing.
pub fn plan(k: usize) -> Result<Plan, String> {
    let sharding = plan_sharding(&[2; DEVICES], &[MoeLayer::new(EXPERTS, 1)]).map_err(|e| e.to_string())?;
    let owners = sharding.owners(0).to_vec();
    let routed: Vec<Vec<u64>> = (0..DEVICES)
        .map(|d| {
            let mut c = vec![0u64; EXPERTS];
            rows(d, k).1.iter().for_each(|&e| c[e] += 1);
            c
        })
        .collect();
    let loads: Vec<f64> = (0..EXPERTS).map(|e| routed.iter().map(|r| r[e]).sum::<u64>() as f64).collect();
    let p = place(&owners, DEVICES, &loads, PlaceParams { overlap: 2, slots: 2 }, None).map_err(|e| e.to_string())?;
    Ok((owners, routed, p))
}
