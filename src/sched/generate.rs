//! Schedule generators, each following the reference's per-stage order exactly
//! (`../shared/reference/pipeline-schedules.md`, 1.2 and 1.3).

use super::{Action, Pass, Placement, Schedule, ScheduleError};

pub(super) fn check(p: usize, m: usize) -> Result<(), ScheduleError> {
    if p < 2 {
        return Err(ScheduleError::Invalid(format!("a pipeline needs at least 2 stages, got {p}")));
    }
    if m < 1 {
        return Err(ScheduleError::Invalid("a pipeline needs at least 1 micro-batch".into()));
    }
    Ok(())
}

/// 1F1B over `p` stages and `m` micro-batches: stage `s` warms up with
/// `w = min(p-1-s, m)` forwards, then alternates one forward and one fused backward,
/// then drains its backwards. Bubble `(p-1)(T_F+T_B+T_W)`; stage `s` holds up to
/// `min(p-s, m)` micro-batches of activations.
pub fn one_f_one_b(p: usize, m: usize) -> Result<Schedule, ScheduleError> {
    check(p, m)?;
    let stages = (0..p)
        .map(|s| {
            let w = (p - 1 - s).min(m);
            let mut order: Vec<Action> = (0..w).map(|j| Action::new(Pass::F, j)).collect();
            for k in 0..m - w {
                order.push(Action::new(Pass::F, w + k));
                order.push(Action::new(Pass::BW, k));
            }
            order.extend((m - w..m).map(|k| Action::new(Pass::BW, k)));
            order
        })
        .collect();
    Ok(Schedule { name: "1F1B", microbatches: m, chunks: 1, placement: Placement::Interleaved, stages })
}

/// Interleaved 1F1B (Megatron-LM's, PyTorch's `ScheduleInterleaved1F1B`): each stage
/// holds `v` chunks, virtual stages `s, s+p, …`, and runs micro-batches in groups of `p`
/// through one chunk after the other. Stage `s` warms up with `2(p-1-s) + (v-1)p`
/// forwards, then alternates one forward and one fused backward. `m` must be a multiple
/// of `p`; the bubble shrinks to `(p-1)(T_F+T_B+T_W)/v` for more activation memory.
pub fn interleaved_1f1b(p: usize, m: usize, v: usize) -> Result<Schedule, ScheduleError> {
    check(p, m)?;
    if v < 1 {
        return Err(ScheduleError::Invalid("interleaving needs at least 1 chunk per stage".into()));
    }
    if m % p != 0 {
        return Err(ScheduleError::Invalid(format!(
            "interleaved 1F1B runs micro-batches in groups of p = {p}: m = {m} is not a multiple"
        )));
    }
    let total = m * v;
    // The k-th forward (or backward) of a stage: its micro-batch and chunk.
    let forward = |k: usize| Action { pass: Pass::F, mb: (k / (p * v)) * p + k % p, chunk: (k / p) % v };
    let backward = |k: usize| Action { pass: Pass::BW, mb: (k / (p * v)) * p + k % p, chunk: v - 1 - (k / p) % v };
    let stages = (0..p)
        .map(|s| {
            let warmup = if v == 1 { p - 1 - s } else { 2 * (p - 1 - s) + (v - 1) * p }.min(total);
            let mut order: Vec<Action> = (0..warmup).map(forward).collect();
            for k in 0..total - warmup {
                order.push(forward(warmup + k));
                order.push(backward(k));
            }
            order.extend((total - warmup..total).map(backward));
            order
        })
        .collect();
    Ok(Schedule { name: "interleaved 1F1B", microbatches: m, chunks: v, placement: Placement::Interleaved, stages })
}

/// ZB-H1: 1F1B's warm-up, with the backward split into `B` and `W` and stage `s`'s `W`
/// passes delayed by `s` slots to fill the bubbles. Bubble `(p-1)(T_F+T_B-T_W)` (a
/// third of 1F1B's at equal costs) at 1F1B's memory.
pub fn zb_h1(p: usize, m: usize) -> Result<Schedule, ScheduleError> {
    check(p, m)?;
    let stages = (0..p)
        .map(|s| {
            let w = (p - 1 - s).min(m);
            let mut order: Vec<Action> = (0..w).map(|j| Action::new(Pass::F, j)).collect();
            let mut next_w = 0;
            let mut backward = |order: &mut Vec<Action>, k: usize| {
                order.push(Action::new(Pass::B, k));
                if k >= s {
                    order.push(Action::new(Pass::W, k - s));
                    next_w = k - s + 1;
                }
            };
            for k in 0..m - w {
                order.push(Action::new(Pass::F, w + k));
                backward(&mut order, k);
            }
            for k in m - w..m {
                backward(&mut order, k);
            }
            order.extend((next_w..m).map(|k| Action::new(Pass::W, k)));
            order
        })
        .collect();
    Ok(Schedule { name: "ZB-H1", microbatches: m, chunks: 1, placement: Placement::Interleaved, stages })
}

/// ZB-V: two chunks per stage in a V (stage `r` holds virtual stages `r` and `2p-1-r`),
/// the reference's handcrafted order (1.5): zero bubble at equal costs once `m >= 2p-1`,
/// and `p` micro-batches of activations on every stage, balanced.
pub fn zb_v(p: usize, m: usize) -> Result<Schedule, ScheduleError> {
    check(p, m)?;
    let slots = (2 * p - 1).max(m);
    let stages = (0..p)
        .map(|r| {
            let mut order = Vec::new();
            // Next micro-batch of each (pass, chunk).
            let mut next = [[0usize; 2]; 3];
            let mut put = |order: &mut Vec<Action>, pass: Pass, chunk: usize| {
                let i = match pass {
                    Pass::F => 0,
                    Pass::B => 1,
                    _ => 2,
                };
                order.push(Action { pass, mb: next[i][chunk], chunk });
                next[i][chunk] += 1;
            };
            for _ in 0..2 * (p - r) - 1 {
                put(&mut order, Pass::F, 0);
            }
            for _ in 0..r {
                put(&mut order, Pass::F, 1);
                put(&mut order, Pass::F, 0);
            }
            for _ in 0..p - r {
                put(&mut order, Pass::F, 1);
                put(&mut order, Pass::B, 1);
                put(&mut order, Pass::W, 1);
            }
            // Forwards of chunk 0 so far, and of chunk 1, as the loop goes.
            let count = |order: &Vec<Action>, chunk: usize| {
                order.iter().filter(|a| a.pass == Pass::F && a.chunk == chunk).count()
            };
            while count(&order, 1) < count(&order, 0) || count(&order, 0) < slots {
                if count(&order, 0) < slots {
                    put(&mut order, Pass::F, 0);
                }
                for (pass, chunk) in [(Pass::B, 0), (Pass::W, 0), (Pass::F, 1), (Pass::B, 1), (Pass::W, 1)] {
                    put(&mut order, pass, chunk);
                }
            }
            for _ in 0..r {
                put(&mut order, Pass::B, 0);
                put(&mut order, Pass::B, 1);
            }
            for _ in 0..p - r {
                put(&mut order, Pass::B, 0);
                put(&mut order, Pass::W, 0);
            }
            let (w1, w0) = (next[2][1], next[2][0]);
            order.extend((w1..slots).map(|mb| Action { pass: Pass::W, mb, chunk: 1 }));
            order.extend((w0..slots).map(|mb| Action { pass: Pass::W, mb, chunk: 0 }));
            // Slots past the micro-batches are idle.
            order.retain(|a| a.mb < m);
            order
        })
        .collect();
    Ok(Schedule { name: "ZB-V", microbatches: m, chunks: 2, placement: Placement::V, stages })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference's worked example (p = 4, m = 8), order by order.
    #[test]
    fn the_worked_example_orders() {
        let s = one_f_one_b(4, 8).unwrap();
        assert_eq!(s.order(0), "F0 F1 F2 F3 BW0 F4 BW1 F5 BW2 F6 BW3 F7 BW4 BW5 BW6 BW7");
        assert_eq!(s.order(3), "F0 BW0 F1 BW1 F2 BW2 F3 BW3 F4 BW4 F5 BW5 F6 BW6 F7 BW7");
        let z = zb_h1(4, 8).unwrap();
        assert_eq!(z.order(0), "F0 F1 F2 F3 B0 W0 F4 B1 W1 F5 B2 W2 F6 B3 W3 F7 B4 W4 B5 W5 B6 W6 B7 W7");
        assert_eq!(z.order(1), "F0 F1 F2 B0 F3 B1 W0 F4 B2 W1 F5 B3 W2 F6 B4 W3 F7 B5 W4 B6 W5 B7 W6 W7");
        assert_eq!(z.order(2), "F0 F1 B0 F2 B1 F3 B2 W0 F4 B3 W1 F5 B4 W2 F6 B5 W3 F7 B6 W4 B7 W5 W6 W7");
        assert_eq!(z.order(3), "F0 B0 F1 B1 F2 B2 F3 B3 W0 F4 B4 W1 F5 B5 W2 F6 B6 W3 F7 B7 W4 W5 W6 W7");
    }

    /// ZB-V's worked-example orders (upper case chunk 0, lower case chunk 1 there).
    #[test]
    fn the_worked_example_zb_v_orders() {
        let z = zb_v(4, 8).unwrap();
        let text = |s: usize| {
            z.stages[s]
                .iter()
                .map(|a| {
                    let letter = format!("{:?}", a.pass);
                    let letter = if a.chunk == 1 { letter.to_lowercase() } else { letter };
                    format!("{letter}{}", a.mb)
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(text(0), "F0 F1 F2 F3 F4 F5 F6 f0 b0 w0 f1 b1 w1 f2 b2 w2 f3 b3 w3 F7 B0 W0 f4 b4 w4 B1 W1 f5 b5 w5 B2 W2 f6 b6 w6 B3 W3 f7 b7 w7 B4 W4 B5 W5 B6 W6 B7 W7");
        assert_eq!(text(1), "F0 F1 F2 F3 F4 f0 F5 f1 b0 w0 f2 b1 w1 f3 b2 w2 F6 B0 W0 f4 b3 w3 F7 B1 W1 f5 b4 w4 B2 W2 f6 b5 w5 B3 W3 f7 b6 w6 B4 b7 B5 W4 B6 W5 B7 W6 w7 W7");
        assert_eq!(text(2), "F0 F1 F2 f0 F3 f1 F4 f2 b0 w0 f3 b1 w1 F5 B0 W0 f4 b2 w2 F6 B1 W1 f5 b3 w3 F7 B2 W2 f6 b4 w4 B3 W3 f7 b5 w5 B4 b6 B5 b7 B6 W4 B7 W5 w6 w7 W6 W7");
        assert_eq!(text(3), "F0 f0 F1 f1 F2 f2 F3 f3 b0 w0 F4 B0 W0 f4 b1 w1 F5 B1 W1 f5 b2 w2 F6 B2 W2 f6 b3 w3 F7 B3 W3 f7 b4 w4 B4 b5 B5 b6 B6 b7 B7 W4 w5 w6 w7 W5 W6 W7");
    }

    #[test]
    fn bad_parameters_name_the_limit() {
        assert!(matches!(one_f_one_b(1, 8), Err(ScheduleError::Invalid(why)) if why.contains("2 stages")));
        assert!(matches!(zb_h1(4, 0), Err(ScheduleError::Invalid(why)) if why.contains("micro-batch")));
    }
}

#[cfg(test)]
mod interleaved_tests {
    use super::super::{simulate, validate, Costs};
    use super::*;

    #[test]
    fn one_chunk_is_plain_1f1b_and_more_chunks_shrink_the_bubble() {
        assert_eq!(interleaved_1f1b(4, 8, 1).unwrap().stages, one_f_one_b(4, 8).unwrap().stages);
        for (p, m, v) in [(4, 8, 2), (4, 16, 2), (4, 8, 4), (2, 4, 3), (8, 16, 2)] {
            let s = interleaved_1f1b(p, m, v).unwrap();
            validate(&s, &Costs::unit(), None).unwrap_or_else(|e| panic!("p={p} m={m} v={v}: {e}"));
            let t = simulate(&s, &Costs::unit()).unwrap();
            let want = (p - 1) as f64 * 3.0 / v as f64;
            assert!((t.bubble() - want).abs() < 1e-9, "p={p} m={m} v={v}: bubble {} want {want}", t.bubble());
        }
        assert!(matches!(interleaved_1f1b(4, 6, 2), Err(ScheduleError::Invalid(why)) if why.contains("multiple")));
    }
}
