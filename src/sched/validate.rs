//! Checks a schedule: every pass exactly once, every dependency satisfiable in the
//! stages' orders, and the activation memory under a limit.

use std::collections::HashMap;

use super::simulate::{peak_after, simulate};
use super::{Costs, Pass, Schedule, ScheduleError};

/// Checks `schedule`: on every stage each micro-batch's `F` runs exactly once and its
/// backward exactly once (a fused `BW`, or one `B` then one `W`); the orders can run
/// without deadlock; and, with `memory_limit`, no stage holds more activation memory
/// than that (in units of one micro-batch's activations, `W` freeing `costs.w_memory`).
/// The error names the stage and the pass.
pub fn validate(schedule: &Schedule, costs: &Costs, memory_limit: Option<f64>) -> Result<(), ScheduleError> {
    let m = schedule.microbatches;
    let share = 1.0 / schedule.chunks.max(1) as f64;
    for (s, order) in schedule.stages.iter().enumerate() {
        let mut seen: HashMap<(Pass, usize, usize), usize> = HashMap::new();
        for a in order {
            if a.mb >= m || a.chunk >= schedule.chunks.max(1) {
                let detail = format!("{a} names micro-batch {} of {m}, chunk {} of {}", a.mb, a.chunk, schedule.chunks);
                return Err(ScheduleError::Passes { stage: s, detail });
            }
            *seen.entry((a.pass, a.mb, a.chunk)).or_default() += 1;
        }
        for (j, c) in (0..m).flat_map(|j| (0..schedule.chunks.max(1)).map(move |c| (j, c))) {
            let n = |pass| seen.get(&(pass, j, c)).copied().unwrap_or(0);
            let complete = n(Pass::F) == 1
                && ((n(Pass::BW) == 1 && n(Pass::B) == 0 && n(Pass::W) == 0)
                    || (n(Pass::BW) == 0 && n(Pass::B) == 1 && n(Pass::W) == 1));
            if !complete {
                let detail = format!(
                    "micro-batch {j} (chunk {c}) runs F {} times, B {}, W {}, BW {} (want F once and BW once, or B and W once each)",
                    n(Pass::F),
                    n(Pass::B),
                    n(Pass::W),
                    n(Pass::BW)
                );
                return Err(ScheduleError::Passes { stage: s, detail });
            }
        }
        if let (Some(limit), Some((action, peak))) = (memory_limit, peak_after(order, costs, share)) {
            if peak > limit + 1e-9 {
                return Err(ScheduleError::Memory { stage: s, action: action.to_string(), peak, limit });
            }
        }
    }
    simulate(schedule, costs).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::super::{one_f_one_b, v_half, v_min, zb_2p, zb_h1, zb_v, Action};
    use super::*;

    #[test]
    fn generated_schedules_pass_and_broken_ones_name_the_pass() {
        for (p, m) in [(2, 1), (2, 5), (4, 8), (5, 3), (8, 32)] {
            for s in [one_f_one_b(p, m).unwrap(), zb_h1(p, m).unwrap(), zb_v(p, m).unwrap()] {
                validate(&s, &Costs::unit(), Some(p as f64)).unwrap_or_else(|e| panic!("{} p={p} m={m}: {e}", s.name));
            }
            let zb = zb_2p(p, m, &Costs::unit()).unwrap();
            validate(&zb, &Costs::unit(), Some(2.0 * p as f64)).unwrap_or_else(|e| panic!("ZB-2p p={p} m={m}: {e}"));
            for (s, limit) in [(v_half(p, m).unwrap(), (p + 2) / 2), (v_min(p, m).unwrap(), (p + 4) / 3)] {
                validate(&s, &Costs::unit(), Some(limit as f64))
                    .unwrap_or_else(|e| panic!("{} p={p} m={m}: {e}", s.name));
            }
        }
        let mut s = zb_h1(4, 8).unwrap();
        s.stages[2].retain(|a| *a != Action::new(Pass::W, 5));
        let e = validate(&s, &Costs::unit(), None).unwrap_err();
        assert!(matches!(&e, ScheduleError::Passes { stage: 2, detail } if detail.contains("micro-batch 5")), "{e}");
        let e = validate(&one_f_one_b(4, 8).unwrap(), &Costs::unit(), Some(3.0)).unwrap_err();
        assert!(matches!(&e, ScheduleError::Memory { stage: 0, .. }), "{e}");
        assert!(e.to_string().contains("F3"), "{e}");
    }

    /// The new generators broken by hand: a lost pass, a backward before its forward,
    /// and a memory limit below the schedule's, each named.
    #[test]
    fn broken_new_schedules_name_the_action() {
        let mut s = v_half(4, 8).unwrap();
        s.stages[1].retain(|a| *a != Action { pass: Pass::W, mb: 3, chunk: 1 });
        let e = validate(&s, &Costs::unit(), None).unwrap_err();
        assert!(
            matches!(&e, ScheduleError::Passes { stage: 1, detail } if detail.contains("micro-batch 3 (chunk 1)")),
            "{e}"
        );
        let mut s = zb_2p(4, 8, &Costs::unit()).unwrap();
        // Stage 2 runs B6 where it ran F6.
        let at = s.stages[2].iter().position(|a| *a == Action::new(Pass::F, 6)).unwrap();
        let b6 = s.stages[2].iter().position(|a| *a == Action::new(Pass::B, 6)).unwrap();
        s.stages[2].swap(at, b6);
        let e = validate(&s, &Costs::unit(), None).unwrap_err();
        assert!(matches!(&e, ScheduleError::Deadlock(why) if why.contains("stage 2 at B6")), "{e}");
        let e = validate(&v_min(4, 8).unwrap(), &Costs::unit(), Some(1.5)).unwrap_err();
        assert!(matches!(&e, ScheduleError::Memory { peak, .. } if *peak == 2.0), "{e}");
    }
}
