//! The automatic zero-bubble scheduler (`../shared/reference/pipeline-schedules.md`,
//! 1.4 and 1.6): from the pass costs, the communication cost and a memory limit, a
//! greedy list scheduler that warms each stage up with as many forwards as fit before its
//! first backward arrives, then alternates forwards and input-gradient backwards, and
//! fills every gap it sees with the weight-gradient passes (`W`) it has pending, or
//! spends them when memory would pass the limit. It runs under the 8 combinations of
//! its three choices and keeps the order with the shortest longest stage span; that
//! order is then checked by [`validate`] against the limit before it is returned.
//!
//! With the limit at `2p` micro-batches this is ZB-2p: zero bubble at equal costs, at
//! about twice 1F1B's memory on the first stage.

use super::generate::check;
use super::{validate, Action, Costs, Pass, Placement, Schedule, ScheduleError};

/// The heuristic's three choices (the reference's flags).
#[derive(Clone, Copy, Debug)]
struct Choices {
    /// Let a stage run one more warm-up forward even if it leaves a gap, shorter than a
    /// forward, before its first backward.
    bubble_before_first_b: bool,
    /// Let a stage well ahead of the next one skip a forward so the backwards keep
    /// flowing.
    prioritize_b: bool,
    /// Fill a gap shorter than a `W` with one when that does not raise the largest
    /// bubble any stage has accumulated so far.
    fill_small_gaps: bool,
}

/// The state of one run of the greedy scheduler.
struct Greedy<'a> {
    p: usize,
    m: usize,
    costs: &'a Costs,
    limit: f64,
    choices: Choices,
    /// Per stage, how many F, B and W passes it has placed.
    f: Vec<usize>,
    b: Vec<usize>,
    w: Vec<usize>,
    /// Per stage, when its last placed pass ends.
    end: Vec<f64>,
    /// Per stage, the activation memory it holds after its last placed pass.
    mem: Vec<f64>,
    /// Per stage, the idle time since its first forward.
    bubble: Vec<f64>,
    /// When F(s, j) and B(s, j) end, once placed.
    f_end: Vec<Vec<Option<f64>>>,
    b_end: Vec<Vec<Option<f64>>>,
    orders: Vec<Vec<Action>>,
}

impl<'a> Greedy<'a> {
    fn new(p: usize, m: usize, costs: &'a Costs, limit: f64, choices: Choices) -> Greedy<'a> {
        Greedy {
            p,
            m,
            costs,
            limit,
            choices,
            f: vec![0; p],
            b: vec![0; p],
            w: vec![0; p],
            end: vec![0.0; p],
            mem: vec![0.0; p],
            bubble: vec![0.0; p],
            f_end: vec![vec![None; m]; p],
            b_end: vec![vec![None; m]; p],
            orders: vec![Vec::with_capacity(3 * m); p],
        }
    }

    fn cost(&self, pass: Pass) -> f64 {
        self.costs.of(pass)
    }

    /// The memory a pass adds: a forward holds one micro-batch's activations, its `B`
    /// frees all but the `W` share, its `W` frees that share.
    fn delta(&self, pass: Pass) -> f64 {
        match pass {
            Pass::F => 1.0,
            Pass::B => -(1.0 - self.costs.w_memory),
            Pass::W => -self.costs.w_memory,
            Pass::BW => -1.0,
        }
    }

    fn max_bubble(&self) -> f64 {
        self.bubble.iter().copied().fold(0.0, f64::max)
    }

    /// When `F(s-1, j)` ends, or an error if the greedy order would run `F(s, j)` first
    /// (it never should: a stage runs its forwards only after the stage before it).
    fn upstream_f(&self, s: usize, j: usize) -> Result<f64, ScheduleError> {
        self.f_end[s - 1].get(j).copied().flatten().ok_or_else(|| {
            ScheduleError::Deadlock(format!("auto scheduler: stage {s} reached F{j} before stage {} ran it", s - 1))
        })
    }

    fn downstream_b(&self, s: usize, j: usize) -> Result<f64, ScheduleError> {
        self.b_end[s + 1].get(j).copied().flatten().ok_or_else(|| {
            ScheduleError::Deadlock(format!("auto scheduler: stage {s} reached B{j} before stage {} ran it", s + 1))
        })
    }

    /// Appends stage `s`'s next pass of kind `pass`, as early as its stage and its
    /// dependency allow.
    fn put(&mut self, s: usize, pass: Pass) -> Result<(), ScheduleError> {
        let j = match pass {
            Pass::F => self.f[s],
            Pass::B => self.b[s],
            _ => self.w[s],
        };
        let cost = self.cost(pass);
        let free = self.end[s] + cost;
        let mut ends = free;
        if pass == Pass::F && s > 0 {
            ends = ends.max(self.upstream_f(s, j)? + self.costs.comm + cost);
        }
        if pass == Pass::B && s + 1 < self.p {
            ends = ends.max(self.downstream_b(s, j)? + self.costs.comm + cost);
        }
        if self.f[s] > 0 {
            self.bubble[s] += ends - free;
        }
        self.end[s] = ends;
        self.mem[s] += self.delta(pass);
        self.orders[s].push(Action::new(pass, j));
        match pass {
            Pass::F => {
                self.f_end[s][j] = Some(ends);
                self.f[s] += 1;
            }
            Pass::B => {
                self.b_end[s][j] = Some(ends);
                self.b[s] += 1;
            }
            _ => self.w[s] += 1,
        }
        Ok(())
    }

    /// Spends pending `W` passes until `pass` fits under the limit.
    fn make_room(&mut self, s: usize, pass: Pass) -> Result<(), ScheduleError> {
        while self.mem[s] + self.delta(pass) > self.limit + 1e-9 {
            if self.w[s] >= self.b[s] {
                return Err(ScheduleError::MemoryLimit {
                    limit: self.limit,
                    need: self.mem[s] + self.delta(pass),
                    detail: format!("stage {s} cannot run {pass:?} with no weight-gradient pass left to free memory"),
                });
            }
            self.put(s, Pass::W)?;
        }
        Ok(())
    }

    /// Fills the wait until `ready` (when the next pass's input arrives) with pending `W`
    /// passes: every `W` that ends by then, and one more that overruns it if the gap
    /// would otherwise add to the largest bubble (or, with `fill_small_gaps`, always).
    fn fill(&mut self, s: usize, ready: f64) -> Result<(), ScheduleError> {
        while self.w[s] < self.b[s] && self.end[s] + self.costs.w <= ready {
            self.put(s, Pass::W)?;
        }
        if self.w[s] < self.b[s] && self.end[s] < ready {
            let within = ready - self.end[s] <= self.max_bubble() - self.bubble[s];
            if !within || self.choices.fill_small_gaps {
                self.put(s, Pass::W)?;
            }
        }
        Ok(())
    }

    /// The warm-up: every stage's first forward, then as many more as fit under the
    /// limit before the first backward would reach it, then the first backwards.
    fn warm_up(&mut self) -> Result<(), ScheduleError> {
        let (p, m, comm) = (self.p, self.m, self.costs.comm);
        let (cf, cb) = (self.costs.f, self.costs.b);
        for s in 0..p {
            self.put(s, Pass::F)?;
        }
        let mut more = vec![0usize; p];
        // When B0 ends on the stage after the one being planned, going up the stages.
        let mut last = self.f_end[p - 1][0].unwrap_or(0.0) + cb;
        for s in (0..p - 1).rev() {
            let (mut mem, mut at) = (self.mem[s], self.end[s]);
            while self.f[s] + more[s] < m && mem + 1.0 <= self.limit + 1e-9 {
                let late = if self.choices.bubble_before_first_b { at + cf > last + comm } else { at >= last + comm };
                if late {
                    break;
                }
                mem += 1.0;
                at += cf;
                more[s] += 1;
            }
            last = at.max(last + comm) + cb;
        }
        // A stage runs fewer warm-up forwards than the one before it, so that each
        // forward's input exists when the stage reaches it.
        for s in 1..p {
            while more[s] > 0 && more[s] >= more[s - 1] && self.f[s] + more[s] < m {
                more[s] -= 1;
            }
        }
        for (s, &n) in more.iter().enumerate() {
            for _ in 0..n {
                self.put(s, Pass::F)?;
            }
        }
        for s in (0..p).rev() {
            self.put(s, Pass::B)?;
        }
        Ok(())
    }

    /// Whether stage `s` runs a forward in this round.
    fn wants_forward(&self, s: usize) -> bool {
        if self.f[s] >= self.m {
            return false;
        }
        if !(self.choices.prioritize_b && s + 1 < self.p && self.f[s] >= self.f[s + 1] + 2) {
            return true;
        }
        let (cf, cw) = (self.costs.f, self.costs.w);
        // When the next stage's next backward could reach this stage at the earliest.
        let next = self.end[s + 1] + cf + self.costs.b + self.costs.comm;
        if self.end[s] >= next {
            return false;
        }
        let (mut mem, mut w_cost, mut k) = (self.mem[s] + 1.0, 0.0, 0);
        while mem > self.limit + 1e-9 && self.w[s] + k < self.b[s] {
            w_cost += cw;
            mem -= self.costs.w_memory;
            k += 1;
        }
        if self.end[s] + cf + w_cost <= next {
            return true;
        }
        next - self.end[s] > self.max_bubble() - self.bubble[s]
    }

    /// Round `i` of the steady state: a forward on the stages that want one, then
    /// `B(i)` on every stage from the last to the first.
    fn round(&mut self, i: usize) -> Result<(), ScheduleError> {
        let p = self.p;
        let mut forward: Vec<bool> = (0..p).map(|s| self.wants_forward(s)).collect();
        // A stage runs a forward only if the stage after it does too.
        for s in (0..p - 1).rev() {
            forward[s] = forward[s] && forward[s + 1];
        }
        for (s, &go) in forward.iter().enumerate() {
            if !go {
                continue;
            }
            self.make_room(s, Pass::F)?;
            if s > 0 {
                let ready = self.upstream_f(s, self.f[s])? + self.costs.comm;
                self.fill(s, ready)?;
            }
            self.put(s, Pass::F)?;
        }
        for s in (0..p).rev() {
            self.make_room(s, Pass::B)?;
            if s + 1 < p {
                let ready = self.downstream_b(s, i)? + self.costs.comm;
                self.fill(s, ready)?;
            }
            // The first stage, done with its forwards, spends its `W` passes as it goes.
            if s == 0 && self.f[0] == self.m {
                while self.w[0] < self.b[0] {
                    self.put(0, Pass::W)?;
                }
            }
            self.put(s, Pass::B)?;
        }
        Ok(())
    }

    /// Runs the heuristic; the longest stage span of the result.
    fn run(&mut self) -> Result<f64, ScheduleError> {
        self.warm_up()?;
        for i in 1..self.m {
            self.round(i)?;
        }
        for s in 0..self.p {
            while self.w[s] < self.m {
                self.put(s, Pass::W)?;
            }
        }
        Ok((0..self.p).map(|s| self.end[s] - (self.f_end[s][0].unwrap_or(0.0) - self.costs.f)).fold(0.0, f64::max))
    }
}

/// The automatic zero-bubble scheduler over `p` stages and `m` micro-batches, for the
/// pass and communication costs of `costs` (its `w_memory` is the share of a
/// micro-batch's activations that `W` frees) and at most `memory_limit` micro-batches of
/// activations held on any stage. Returns the shortest of the heuristic's 8 variants,
/// checked by [`validate`]. A limit under one micro-batch is
/// [`ScheduleError::MemoryLimit`]: no schedule can run a forward and hold less.
pub fn auto_schedule(p: usize, m: usize, costs: &Costs, memory_limit: f64) -> Result<Schedule, ScheduleError> {
    check(p, m)?;
    let passes_ok = [costs.f, costs.b, costs.w].iter().all(|c| c.is_finite() && *c > 0.0);
    if !(passes_ok && costs.comm.is_finite() && costs.comm >= 0.0 && (0.0..=1.0).contains(&costs.w_memory)) {
        return Err(ScheduleError::Invalid(format!(
            "the automatic scheduler needs positive pass costs, a communication cost of at least 0 and a W memory share in [0, 1], got {costs:?}"
        )));
    }
    if memory_limit.is_nan() || memory_limit < 1.0 {
        return Err(ScheduleError::MemoryLimit {
            limit: memory_limit,
            need: 1.0,
            detail: "every schedule holds one micro-batch's activations from its forward to its backward".into(),
        });
    }
    let mut best: Option<(f64, Vec<Vec<Action>>)> = None;
    let mut failure = None;
    for bubble_before_first_b in [true, false] {
        for prioritize_b in [true, false] {
            for fill_small_gaps in [true, false] {
                let choices = Choices { bubble_before_first_b, prioritize_b, fill_small_gaps };
                let mut g = Greedy::new(p, m, costs, memory_limit, choices);
                match g.run() {
                    // Ties keep the first variant, as the reference does.
                    Ok(span) if best.as_ref().is_none_or(|(b, _)| span < *b) => best = Some((span, g.orders)),
                    Ok(_) => {}
                    Err(e) => failure = Some(e),
                }
            }
        }
    }
    let Some((_, stages)) = best else {
        return Err(failure.unwrap_or_else(|| ScheduleError::Invalid("the automatic scheduler found no order".into())));
    };
    let name = if memory_limit == 2.0 * p as f64 { "ZB-2p" } else { "auto" };
    let schedule = Schedule { name, microbatches: m, chunks: 1, placement: Placement::Interleaved, stages };
    // The post-check: whatever the heuristic did, the order must run and fit.
    validate(&schedule, costs, Some(memory_limit))?;
    Ok(schedule)
}

/// ZB-2p: the automatic scheduler with the limit at `2p` micro-batches of activations,
/// the zero-bubble paper's setting. Zero bubble at equal costs once `m` fills the
/// pipeline; stage `s` holds up to `2(p-s)-1` micro-batches (plus the `W` share).
pub fn zb_2p(p: usize, m: usize, costs: &Costs) -> Result<Schedule, ScheduleError> {
    auto_schedule(p, m, costs, 2.0 * p as f64)
}

#[cfg(test)]
mod tests {
    use super::super::{simulate, zb_h1};
    use super::*;

    /// The reference's worked example (1.7), order by order, under both memory models.
    #[test]
    fn the_worked_example_zb_2p() {
        let want = [
            "F0 F1 F2 F3 F4 F5 F6 B0 F7 W0 B1 W1 B2 W2 B3 W3 B4 W4 B5 W5 B6 W6 B7 W7",
            "F0 F1 F2 F3 F4 B0 F5 B1 F6 B2 F7 B3 W0 B4 W1 B5 W2 B6 W3 B7 W4 W5 W6 W7",
            "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 W0 B6 W1 B7 W2 W3 W4 W5 W6 W7",
            "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7 W0 W1 W2 W3 W4 W5 W6 W7",
        ];
        let half = Costs { w_memory: 0.5, ..Costs::unit() };
        for (costs, peaks) in [(Costs::unit(), [7.0, 5.0, 3.0, 1.0]), (half, [7.5, 6.5, 5.5, 4.5])] {
            let z = zb_2p(4, 8, &costs).unwrap();
            assert_eq!(z.name, "ZB-2p");
            for (s, order) in want.iter().enumerate() {
                assert_eq!(z.order(s), *order, "stage {s}, W share {}", costs.w_memory);
            }
            let t = simulate(&z, &costs).unwrap();
            assert_eq!((t.iteration(), t.work, t.bubble()), (24.0, 24.0, 0.0));
            assert_eq!(t.peak_memory, peaks.to_vec());
            assert_eq!(t.draw(0, 1.0), "FFFFFFFBFWBWBWBWBWBWBWBW");
            assert_eq!(t.draw(3, 1.0), "...FBFBFBFBFBFBFBFBWWWWWWWW");
        }
    }

    /// A tighter limit costs bubble, never memory: at p (1F1B's memory) the scheduler
    /// does at least as well as ZB-H1, and every order stays under its limit.
    #[test]
    fn the_limit_trades_memory_for_bubble() {
        let costs = Costs::unit();
        let h1 = simulate(&zb_h1(4, 8).unwrap(), &costs).unwrap().bubble();
        let mut last = f64::INFINITY;
        for limit in [1.0, 2.0, 3.0, 4.0, 6.0, 8.0] {
            let s = auto_schedule(4, 8, &costs, limit).unwrap();
            let t = simulate(&s, &costs).unwrap();
            assert!(t.peak_memory.iter().all(|&m| m <= limit), "limit {limit}: {:?}", t.peak_memory);
            assert!(t.bubble() <= last, "limit {limit}: bubble {} after {last}", t.bubble());
            last = t.bubble();
            if limit >= 4.0 {
                assert!(t.bubble() <= h1, "limit {limit}: bubble {} above ZB-H1's {h1}", t.bubble());
            }
        }
        assert_eq!(last, 0.0);
    }

    #[test]
    fn impossible_parameters_name_the_limit() {
        let e = auto_schedule(4, 8, &Costs::unit(), 0.5).unwrap_err();
        assert!(matches!(e, ScheduleError::MemoryLimit { need, .. } if need == 1.0), "{e}");
        assert!(e.to_string().contains("memory limit 0.5"), "{e}");
        assert!(matches!(zb_2p(1, 8, &Costs::unit()), Err(ScheduleError::Invalid(why)) if why.contains("2 stages")));
        assert!(matches!(zb_2p(4, 0, &Costs::unit()), Err(ScheduleError::Invalid(why)) if why.contains("micro-batch")));
        let bad = Costs { w: 0.0, ..Costs::unit() };
        assert!(matches!(zb_2p(4, 8, &bad), Err(ScheduleError::Invalid(why)) if why.contains("positive")));
    }
}
