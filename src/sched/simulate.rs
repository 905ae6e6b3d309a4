//! Replays a schedule under costs: when each pass starts and ends, each stage's span,
//! the bubble and the peak activation memory.

use std::collections::HashMap;

use super::{Action, Costs, Pass, Schedule, ScheduleError};

/// A simulated iteration.
#[derive(Clone, Debug, PartialEq)]
pub struct Timeline {
    /// Per stage, each pass with its start and end, in the stage's order.
    pub passes: Vec<Vec<(Action, f64, f64)>>,
    /// Per stage, the end of its last pass minus the start of its first (the
    /// zero-bubble papers' span: stages start staggered and step on their own).
    pub spans: Vec<f64>,
    /// Per stage, the most activation memory held at once, in units of one
    /// micro-batch's activations on one stage.
    pub peak_memory: Vec<f64>,
    /// The work of one stage: `m (T_F + T_B + T_W)`.
    pub work: f64,
}

impl Timeline {
    /// The longest span: the iteration time when stages step on their own.
    pub fn iteration(&self) -> f64 {
        self.spans.iter().copied().fold(0.0, f64::max)
    }

    /// The iteration time minus one stage's work.
    pub fn bubble(&self) -> f64 {
        self.iteration() - self.work
    }

    /// Stage `s` as text, one character per `unit` of time: the pass letter (`X` for a
    /// fused backward) while it runs, `.` while the stage waits.
    pub fn draw(&self, s: usize, unit: f64) -> String {
        let mut out = String::new();
        for &(a, start, end) in &self.passes[s] {
            let letter = match a.pass {
                Pass::F => 'F',
                Pass::B => 'B',
                Pass::W => 'W',
                Pass::BW => 'X',
            };
            while (out.len() as f64) * unit < start - 1e-9 {
                out.push('.');
            }
            while (out.len() as f64) * unit < end - 1e-9 {
                out.push(letter);
            }
        }
        out
    }
}

/// Runs every stage's passes in order, each as soon as the stage is free and its
/// dependencies are done; [`ScheduleError::Deadlock`] if the orders contradict them. A
/// pass of a schedule with `chunks` chunks per stage costs `1/chunks` of the stage's.
pub fn simulate(schedule: &Schedule, costs: &Costs) -> Result<Timeline, ScheduleError> {
    let p = schedule.stages();
    let share = 1.0 / schedule.chunks.max(1) as f64;
    // End of each (virtual stage, pass, micro-batch).
    let mut ends: HashMap<(usize, Pass, usize), f64> = HashMap::new();
    let mut next = vec![0usize; p];
    let mut free = vec![0f64; p];
    let mut passes: Vec<Vec<(Action, f64, f64)>> = vec![Vec::new(); p];
    let total: usize = schedule.stages.iter().map(Vec::len).sum();
    let mut done = 0;
    while done < total {
        let mut progressed = false;
        for s in 0..p {
            while let Some(&a) = schedule.stages[s].get(next[s]) {
                let Some(ready) = ready_at(schedule, &ends, s, a, costs) else { break };
                let start = ready.max(free[s]);
                let end = start + costs.of(a.pass) * share;
                let v = schedule.virtual_stage(s, a.chunk);
                ends.insert((v, a.pass, a.mb), end);
                if a.pass == Pass::BW {
                    // A fused backward is both the input gradient and the weight gradient.
                    ends.insert((v, Pass::B, a.mb), end);
                    ends.insert((v, Pass::W, a.mb), end);
                }
                passes[s].push((a, start, end));
                free[s] = end;
                next[s] += 1;
                done += 1;
                progressed = true;
            }
        }
        if !progressed {
            let stuck: Vec<String> =
                (0..p).filter_map(|s| schedule.stages[s].get(next[s]).map(|a| format!("stage {s} at {a}"))).collect();
            return Err(ScheduleError::Deadlock(format!("no stage can go on: {}", stuck.join(", "))));
        }
    }
    let spans = passes
        .iter()
        .map(|ps| match (ps.first(), ps.last()) {
            (Some(first), Some(last)) => last.2 - first.1,
            _ => 0.0,
        })
        .collect();
    let peak_memory = schedule.stages.iter().map(|order| peak(order, costs, share)).collect();
    let work = schedule.microbatches as f64 * (costs.f + costs.b + costs.w);
    Ok(Timeline { passes, spans, peak_memory, work })
}

/// When pass `a` of stage `s` may start, or `None` while a dependency has not run. The
/// dependencies follow the virtual stages; moving between stages costs `comm`.
fn ready_at(
    schedule: &Schedule,
    ends: &HashMap<(usize, Pass, usize), f64>,
    s: usize,
    a: Action,
    costs: &Costs,
) -> Option<f64> {
    let v = schedule.virtual_stage(s, a.chunk);
    let last = schedule.stages() * schedule.chunks.max(1) - 1;
    let end = |at: usize, pass: Pass| ends.get(&(at, pass, a.mb)).copied();
    let hop = |from: usize| if schedule.place(from).0 == s { 0.0 } else { costs.comm };
    match a.pass {
        Pass::F if v == 0 => Some(0.0),
        Pass::F => end(v - 1, Pass::F).map(|t| t + hop(v - 1)),
        Pass::B | Pass::BW => {
            let own = end(v, Pass::F)?;
            if v == last {
                Some(own)
            } else {
                end(v + 1, Pass::B).map(|t| (t + hop(v + 1)).max(own))
            }
        }
        Pass::W => end(v, Pass::B),
    }
}

/// The most activation memory `order` holds at once: `F` takes one unit (times `share`,
/// the chunk's part of the stage), `B` frees all but the `W` share, `W` frees that share,
/// a fused `BW` frees it all.
pub(super) fn peak(order: &[Action], costs: &Costs, share: f64) -> f64 {
    peak_after(order, costs, share).map_or(0.0, |(_, m)| m)
}

/// The pass after which `order` holds the most memory, and that memory.
pub(super) fn peak_after(order: &[Action], costs: &Costs, share: f64) -> Option<(Action, f64)> {
    let mut held = 0.0;
    let mut best: Option<(Action, f64)> = None;
    for &a in order {
        held += share
            * match a.pass {
                Pass::F => 1.0,
                Pass::B => -(1.0 - costs.w_memory),
                Pass::W => -costs.w_memory,
                Pass::BW => -1.0,
            };
        if best.is_none_or(|(_, m)| held > m) {
            best = Some((a, held));
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::super::{one_f_one_b, zb_h1, zb_v};
    use super::*;

    /// ZB-V in the worked example: zero bubble, p units of memory on every stage, and the
    /// reference's chunk-unit timeline of stage 0.
    #[test]
    fn zb_v_has_no_bubble_and_balanced_memory() {
        let t = simulate(&zb_v(4, 8).unwrap(), &Costs::unit()).unwrap();
        assert_eq!((t.iteration(), t.bubble()), (24.0, 0.0));
        assert_eq!(t.peak_memory, vec![4.0, 4.0, 4.0, 4.0]);
        assert_eq!(t.draw(0, 0.5).to_uppercase(), "FFFFFFFFBWFBWFBWFBWFBWFBWBWFBWBWFBWBWFBWBWBWBWBW");
        // Fewer micro-batches than the V's 2p - 1 slots leave bubbles (reference: 2 and 6
        // chunk-units for m = 6 and m = 4).
        for (m, bubble) in [(7, 0.0), (6, 1.0), (4, 3.0)] {
            assert_eq!(simulate(&zb_v(4, m).unwrap(), &Costs::unit()).unwrap().bubble(), bubble, "m = {m}");
        }
    }

    /// The reference's worked example: p = 4, m = 8, unit costs.
    #[test]
    fn the_worked_example_figures() {
        let t = simulate(&one_f_one_b(4, 8).unwrap(), &Costs::unit()).unwrap();
        assert_eq!((t.iteration(), t.work, t.bubble()), (33.0, 24.0, 9.0));
        assert_eq!(t.peak_memory, vec![4.0, 3.0, 2.0, 1.0]);
        assert_eq!(t.draw(0, 1.0), "FFFF......XXFXXFXXFXXFXX.XX.XX.XX");
        assert_eq!(t.draw(3, 1.0), "...FXXFXXFXXFXXFXXFXXFXXFXX");
        let z = simulate(&zb_h1(4, 8).unwrap(), &Costs::unit()).unwrap();
        assert_eq!((z.iteration(), z.bubble()), (27.0, 3.0));
        assert_eq!(z.peak_memory, vec![4.0, 3.0, 2.0, 1.0]);
        assert_eq!(z.draw(0, 1.0), "FFFF...BWFBWFBWFBWFBWBWBWBW");
        assert_eq!(z.draw(2, 1.0), "..FF.BFBFBWFBWFBWFBWFBWBWWW");
        let half = Costs { w_memory: 0.5, ..Costs::unit() };
        assert_eq!(simulate(&zb_h1(4, 8).unwrap(), &half).unwrap().peak_memory, vec![4.0, 3.5, 3.0, 2.5]);
    }

    #[test]
    fn a_contradictory_order_is_a_deadlock_naming_the_stuck_passes() {
        let mut s = one_f_one_b(2, 2).unwrap();
        // Stage 1 runs its backward of micro-batch 1 before that micro-batch's forward.
        s.stages[1] =
            vec![Action::new(Pass::F, 0), Action::new(Pass::BW, 1), Action::new(Pass::BW, 0), Action::new(Pass::F, 1)];
        let e = simulate(&s, &Costs::unit()).unwrap_err();
        assert!(matches!(&e, ScheduleError::Deadlock(why) if why.contains("stage 1 at BW1")), "{e}");
    }
}

#[cfg(test)]
mod properties {
    use super::super::{auto_schedule, interleaved_1f1b, one_f_one_b, v_half, v_min, validate, zb_2p, zb_h1, zb_v};
    use super::*;
    use proptest::prelude::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6 * (1.0 + b.abs())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Over random sizes and positive costs (integers, so that sums are exact), every
        /// generator validates (ZB-V within p units of memory); 1F1B's bubble is `(p-1)(F+B+W)` and ZB-H1's is
        /// `(p-1)(F+B-W)` once every stage reaches its steady state (`m >= p`) and a
        /// `W` is no longer than an `F` or a `B` (the delayed `W` then fits the slot it
        /// fills; the reference's `W <= F + B` is not enough: p = 2, m = 2, F = 3, B = 1,
        /// W = 4 leaves a bubble of 1, not 0); peaks stay within `min(p-s, m)`.
        #[test]
        fn bubbles_equal_their_closed_forms(p in 2usize..9, m in 1usize..33, f in 1u32..5, b in 1u32..5, w in 1u32..5) {
            let costs = Costs { f: f.into(), b: b.into(), w: w.into(), comm: 0.0, w_memory: 0.0 };
            let (f, b, w) = (costs.f, costs.b, costs.w);
            let one = one_f_one_b(p, m).unwrap();
            let zb = zb_h1(p, m).unwrap();
            validate(&one, &costs, Some(p as f64)).unwrap();
            validate(&zb, &costs, Some(p as f64)).unwrap();
            // ZB-V's two chunks hold at most p micro-batches of activations on any stage.
            validate(&zb_v(p, m).unwrap(), &costs, Some(p as f64)).unwrap();
            let t1 = simulate(&one, &costs).unwrap();
            let tz = simulate(&zb, &costs).unwrap();
            for (s, &peak) in t1.peak_memory.iter().enumerate() {
                prop_assert!(peak <= (p - s).min(m) as f64);
            }
            if m >= p {
                prop_assert!(close(t1.bubble(), (p - 1) as f64 * (f + b + w)), "1F1B {} vs {}", t1.bubble(), (p - 1) as f64 * (f + b + w));
                if w <= f.min(b) {
                    prop_assert!(close(tz.bubble(), (p - 1) as f64 * (f + b - w)), "ZB-H1 {} vs {}", tz.bubble(), (p - 1) as f64 * (f + b - w));
                }
            }
            prop_assert!(tz.iteration() <= t1.iteration() + 1e-9);
            // Interleaved 1F1B with v chunks over whole groups of p micro-batches: its
            // bubble is 1F1B's divided by v.
            let (v, mi) = (1 + m % 3, p * (1 + m % 4));
            let ti = simulate(&interleaved_1f1b(p, mi, v).unwrap(), &costs).unwrap();
            let want = (p - 1) as f64 * (f + b + w) / v as f64;
            prop_assert!(close(ti.bubble(), want), "interleaved p={p} m={mi} v={v}: {} vs {want}", ti.bubble());
        }

        /// The automatic scheduler over random sizes, costs (with communication and a `W`
        /// memory share) and limits: its order validates under its limit; ZB-2p's
        /// bubble is at most ZB-H1's, and within 2p micro-batches of memory.
        #[test]
        fn the_auto_scheduler_stays_under_its_limit(
            p in 2usize..9, m in 1usize..33, f in 1u32..5, b in 1u32..5, w in 1u32..5, comm in 0u32..3,
            share in 0u32..3, limit in 1u32..20,
        ) {
            let costs = Costs { f: f.into(), b: b.into(), w: w.into(), comm: comm.into(), w_memory: f64::from(share) / 2.0 };
            let zb = zb_2p(p, m, &costs).unwrap();
            validate(&zb, &costs, Some(2.0 * p as f64)).unwrap();
            let t2 = simulate(&zb, &costs).unwrap();
            let th = simulate(&zb_h1(p, m).unwrap(), &costs).unwrap();
            prop_assert!(t2.bubble() <= th.bubble() + 1e-9, "ZB-2p {} vs ZB-H1 {}", t2.bubble(), th.bubble());
            let limit = f64::from(limit).min(2.0 * p as f64);
            let auto = auto_schedule(p, m, &costs, limit).unwrap();
            validate(&auto, &costs, Some(limit)).unwrap();
        }

        /// V-Half and V-Min over random sizes and costs: they validate within the
        /// paper's memory, `(p+2)/2` and `(p+4)/3` micro-batches (rounded down) per stage.
        #[test]
        fn the_v_schedules_stay_within_their_memory(
            p in 2usize..9, m in 1usize..33, f in 1u32..5, b in 1u32..5, w in 1u32..5, comm in 0u32..3,
        ) {
            let costs = Costs { f: f.into(), b: b.into(), w: w.into(), comm: comm.into(), w_memory: 0.0 };
            validate(&v_half(p, m).unwrap(), &costs, Some(((p + 2) / 2) as f64)).unwrap();
            validate(&v_min(p, m).unwrap(), &costs, Some(((p + 4) / 3) as f64)).unwrap();
        }
    }
}
