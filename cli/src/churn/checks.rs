//! The invariant checks: as the events arrive (`exact-sum`, `model-agreement`,
//! `wait-bound`, `unexpected-exit`) and over the whole run (`progress`, `joiner-sync`).

use std::collections::HashMap;
use std::sync::mpsc::{self, Sender};
use std::time::{Duration, Instant};

use phalanx::plan::allreduce;
use phalanx::quant::{Codec, Quantization};
use phalanx::sim::{Outcome, Simulation};
use phalanx::workload::{expected_sum, gradient, hash_f32};
use phalanx::{DType, ReduceOp};
use serde_json::{json, Value};

use super::{Fate, Harness, Msg, Role, StepRec, Violation};
use crate::mix::Extra;
use crate::now_ms;

/// The hash of the quantized ring all-reduce of `members`' gradients (in rank order) as
/// a fault-free group computes it, or why it is not acceptable: outside the error bound
/// `n·Δ̂` of the exact sum, `Δ̂ = 6n / (2^bits - 1)` (every gradient's range is at most 6,
/// so no partial sum's range exceeds `6n`; see the core's `tests/quantized.rs`).
fn quantized_expectation(members: &[u64], step: u64, len: usize, q: Quantization) -> String {
    let n = members.len();
    let bufs: Vec<Vec<u8>> =
        members.iter().map(|&id| bytemuck::cast_slice(&gradient(id, step, len)).to_vec()).collect();
    let plans: Vec<_> = (0..n).map(|r| allreduce::ring(r, n, len)).collect();
    let sim = Simulation {
        chunk_bytes: phalanx::collective::DEFAULT_CHUNK_BYTES,
        link_capacity: 16,
        codec: Some(Codec::new(q)),
        ..Simulation::new(DType::F32, ReduceOp::Sum)
    };
    let out = match sim.run(&plans, bufs).into_iter().next() {
        Some(Outcome::Done(b)) => bytemuck::allocation::pod_collect_to_vec::<u8, f32>(&b),
        other => return format!("the simulated quantized all-reduce ended {other:?}"),
    };
    let exact = expected_sum(members, step, len);
    let bound = n as f64 * 6.0 * n as f64 / q.levels() as f64 + 8.0 * (n * n) as f64 * f32::EPSILON as f64;
    let err = out.iter().zip(&exact).map(|(a, b)| (*a as f64 - *b as f64).abs()).fold(0.0, f64::max);
    if err > bound {
        return format!("an error of {err} beyond the bound {bound}");
    }
    hash_f32(&out)
}

/// Starts the verifier thread: it recomputes the sum of each `(w, step, members, got)` it
/// is sent and answers with a [`Msg::Sum`] on `results`.
pub(super) fn spawn_verifier(
    results: Sender<Msg>,
    len: usize,
    quantize: Option<Quantization>,
) -> Sender<(usize, u64, Vec<u64>, String)> {
    let (verifier, jobs) = mpsc::channel::<(usize, u64, Vec<u64>, String)>();
    std::thread::spawn(move || {
        let mut cache: HashMap<(Vec<u64>, u64), String> = HashMap::new();
        for (w, step, members, got) in jobs {
            let want = match quantize {
                None => {
                    let mut sorted = members.clone();
                    sorted.sort_unstable(); // the sum is exact: order does not matter
                    cache.entry((sorted, step)).or_insert_with_key(|(m, s)| hash_f32(&expected_sum(m, *s, len)))
                }
                // The quantized result depends on the ring order: the members' rank order.
                Some(q) => cache
                    .entry((members.clone(), step))
                    .or_insert_with_key(|(m, s)| quantized_expectation(m, *s, len, q)),
            }
            .clone();
            if results.send(Msg::Sum { w, step, members, got, want }).is_err() {
                return;
            }
        }
    });
    verifier
}

impl Harness {
    pub(super) fn violate(&mut self, invariant: &'static str, message: String) {
        self.violation_count += 1;
        if !self.args.keep_going {
            self.stop_at.get_or_insert_with(|| Instant::now() + Duration::from_secs(1));
        }
        if self.violations.len() < 100 {
            eprintln!("churn: VIOLATION {invariant}: {message}");
            self.violations.push(Violation { invariant, message, t: now_ms() });
        }
    }

    /// A sum the verifier recomputed: `exact-sum`.
    pub(super) fn on_sum(&mut self, w: usize, step: u64, members: Vec<u64>, got: String, want: String) {
        self.sums_pending -= 1;
        self.sums_checked += 1;
        if got != want {
            let name = self.workers[w].name.clone();
            self.violate(
                "exact-sum",
                format!(
                    "{name}'s all-reduce of step {step} over {members:?} gave hash {got}, but the {} \
                     of those members' gradients hashes to {want}",
                    if self.args.quantize.is_some() { "quantized sum" } else { "exact sum" }
                ),
            );
        }
    }

    /// A collective of the workload mix (`--mix`): recomputed here from its members
    /// (small, exact), for `exact-sum`.
    fn on_extra(&mut self, w: usize, v: &Value) {
        let kind = v["kind"].as_str().unwrap_or_default();
        let members: Vec<u64> =
            v["members"].as_array().into_iter().flatten().filter_map(|m| m.as_str()?.parse().ok()).collect();
        let (Some(extra), Some(step), Some(rank)) = (Extra::from_name(kind), v["step"].as_u64(), v["rank"].as_u64())
        else {
            return self
                .violate("exact-sum", format!("{} reported an unreadable mix result: {v}", self.workers[w].name));
        };
        *self.extras_checked.entry(kind.to_string()).or_default() += 1;
        let want = extra.expected(step, &members, rank as usize).map(|r| crate::mix::hash(&r));
        if want.as_deref() != v["hash"].as_str() {
            let name = self.workers[w].name.clone();
            let got = v["hash"].clone();
            self.violate(
                "exact-sum",
                format!("{name}'s {kind} of step {step} as rank {rank} of {members:?} gave {got}, recomputed {want:?}"),
            );
        }
    }

    /// Notes the exit of worker `w` if it has exited; a closed stdout comes just before.
    pub(super) fn reap(&mut self, w: usize) {
        let wk = &mut self.workers[w];
        if wk.status.is_some() {
            return;
        }
        let status = match wk.child.try_wait() {
            Ok(Some(s)) => s,
            // It closed stdout but runs on: look again at the next tick.
            _ => return,
        };
        wk.status = Some(status);
        wk.exit_t = Some(now_ms());
        wk.stdin = None;
        let t = now_ms();
        let (name, fate) = (wk.name.clone(), wk.fate.clone());
        let kind = wk.error.as_ref().and_then(|e| e["kind"].as_str()).unwrap_or("").to_string();
        self.timeline.push(json!({
            "t": t, "source": name, "event": "exit", "status": status.to_string(), "fate": format!("{fate:?}"),
        }));
        if fate == Fate::Untouched && kind != "Removed" && self.t0.is_some() {
            let tail =
                self.workers[w].stderr.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect::<Vec<_>>();
            let err = self.workers[w].error.clone().unwrap_or(Value::Null);
            self.violate(
                "unexpected-exit",
                format!("{name}, which the churn left alone, exited ({status}); its error: {err}; stderr: {tail:?}"),
            );
        }
    }

    pub(super) fn on_event(&mut self, w: usize, v: Value) {
        let t = v["t"].as_u64().unwrap_or_else(now_ms);
        let event = v["event"].as_str().unwrap_or("?").to_string();
        let name = self.workers[w].name.clone();
        let u = |k: &str| v[k].as_u64();
        match event.as_str() {
            "joined" => {
                let wk = &mut self.workers[w];
                wk.id = v["id"].as_str().and_then(|s| s.parse().ok());
                wk.joined_t = Some(t);
            }
            "allreduce_start" => {
                let wk = &mut self.workers[w];
                wk.open_waits.push((u("step").unwrap_or(0), t));
                wk.open_wait_reported = false;
            }
            "attempt_failed" => {
                self.aborted += 1;
                self.workers[w].failures += 1;
                self.close_wait(w, u("step"), t, "attempt_failed");
            }
            // With --async: committed after the step before it aborted, so not applied.
            "dropped_after_abort" => self.close_wait(w, u("step"), t, "dropped_after_abort"),
            "step" => {
                self.close_wait(w, u("step"), t, "step");
                self.on_step(w, &v, t);
            }
            "extra" => self.on_extra(w, &v),
            "error" => self.workers[w].error = Some(v.clone()),
            _ => {}
        }
        if event != "allreduce_start" && event != "step" {
            let mut e = v;
            e["source"] = json!(name);
            self.timeline.push(e);
        }
    }

    /// The end of worker `w`'s all-reduce of `step` (the oldest open one when the event
    /// names none) at `t`: checks its wait against the bound.
    pub(super) fn close_wait(&mut self, w: usize, step: Option<u64>, t: u64, how: &str) {
        let waits = &mut self.workers[w].open_waits;
        let Some(i) = waits.iter().position(|&(s, _)| step.is_none_or(|want| want == s)) else { return };
        let (step, start) = waits.remove(i);
        let waited = t.saturating_sub(start);
        if self.workers[w].frozen_during(start, t) {
            return; // its own freeze: not a wait
        }
        self.waits_ms.push(waited);
        let bound = self.bound_for(w, t);
        if waited > bound && !self.workers[w].open_wait_reported {
            let name = self.workers[w].name.clone();
            self.violate(
                "wait-bound",
                format!(
                    "{name} waited {waited} ms in its all-reduce of step {step} (from allreduce_start to {how}), \
                     more than the bound of {bound} ms (peer timeout {} ms + slack {} ms{})",
                    self.args.peer_timeout_ms,
                    self.args.slack_ms,
                    if self.workers[w].cut_before(t) { ", + its search for a master after a partition" } else { "" },
                ),
            );
        }
    }

    /// The wait bound of worker `w` for a wait that ended (or is checked) at `t`: the
    /// peer timeout plus the slack; for a worker a partition cut off from the masters,
    /// also its master timeout and the time it looks for a master to rejoin (its
    /// collective waits for a verdict meanwhile, and ends when it is told it was removed).
    fn bound_for(&self, w: usize, t: u64) -> u64 {
        let bound = self.args.wait_bound_ms();
        if !self.workers[w].cut_before(t) {
            return bound;
        }
        let control = phalanx::comm::ControlConfig::default();
        let rejoin = control.rejoin_within.unwrap_or_default();
        bound + (control.master_timeout + rejoin).as_millis() as u64
    }

    /// Reports any all-reduce still open longer than the bound (and a second to deliver its
    /// end) on a running, unfrozen worker: a hang.
    pub(super) fn check_open_waits(&mut self) {
        let now = now_ms();
        for w in 0..self.workers.len() {
            let bound = self.bound_for(w, now);
            let wk = &self.workers[w];
            let Some(&(step, start)) = wk.open_waits.first() else { continue };
            // A worker the harness has SIGKILLed is not hanging, even before its exit is
            // reaped (on a loaded machine that can take seconds): its wait ends with it.
            let killed = matches!(wk.fate, Fate::Killed | Fate::FrozenKilled | Fate::Ended);
            if !wk.running() || killed || wk.is_frozen() || wk.open_wait_reported || wk.frozen_during(start, now) {
                continue;
            }
            let waited = now.saturating_sub(start);
            if waited > bound + 1000 {
                self.workers[w].open_wait_reported = true;
                let name = self.workers[w].name.clone();
                self.violate(
                    "wait-bound",
                    format!(
                        "{name} has been in its all-reduce of step {step} for {waited} ms, more than the bound of \
                         {bound} ms (peer timeout {} ms + slack {} ms)",
                        self.args.peer_timeout_ms, self.args.slack_ms
                    ),
                );
            }
        }
    }

    pub(super) fn on_step(&mut self, w: usize, v: &Value, t: u64) {
        let name = self.workers[w].name.clone();
        let (Some(step), Some(epoch), Some(sum), Some(model), Some(members)) = (
            v["step"].as_u64(),
            v["epoch"].as_u64(),
            v["sum"].as_str(),
            v["model"].as_str(),
            v["members"]
                .as_array()
                .map(|m| m.iter().filter_map(|x| x.as_str()?.parse::<u64>().ok()).collect::<Vec<_>>()),
        ) else {
            self.violate("exact-sum", format!("{name} reported a malformed step: {v}"));
            return;
        };
        let wk = &mut self.workers[w];
        wk.steps += 1;
        wk.first_step_t.get_or_insert(t);
        if let Some(id) = wk.id {
            if !members.contains(&id) {
                self.violate("exact-sum", format!("{name} (id {id}) reported step {step} of members {members:?}"));
            }
        }
        match self.models.get(&step) {
            None => {
                self.models.insert(step, (model.to_string(), w));
            }
            Some((m, first)) if m != model => {
                let (m, first) = (m.clone(), self.workers[*first].name.clone());
                self.violate(
                    "model-agreement",
                    format!("after step {step}, {name} holds model {model} but {first} holds {m}"),
                );
            }
            Some((_, first)) => {
                let first = *first;
                if first != w {
                    for k in [w, first] {
                        self.workers[k].agreed.get_or_insert((step, t));
                    }
                }
            }
        }
        let first = self.first_commit.entry(step).or_insert(t);
        *first = (*first).min(t);
        self.max_members = self.max_members.max(members.len());
        self.steps.push(StepRec { w, step, epoch, members: members.clone(), t });
        self.sums_pending += 1;
        let _ = self.verifier.send((w, step, members, sum.to_string()));
    }
}

/// Figures of the run, for the table, the JSON report and the picture.
pub(crate) struct Summary {
    pub t0: u64,
    pub t_end: u64,
    pub elapsed_s: f64,
    pub steps_completed: usize,
    pub peer_steps: usize,
    pub throughput: f64,
    pub max_stall_ms: u64,
    pub recovery_ms: Vec<u64>,
    pub unrecovered: usize,
    /// From each master kill to the next step any peer completed.
    pub master_recovery_ms: Vec<u64>,
    pub join_ms: Vec<u64>,
    pub spurious_removals: usize,
    pub interrupted: bool,
}

/// The checks that need the whole run: progress, joiners; and the figures.
pub(super) fn final_checks(h: &mut Harness, t0: u64, t_end: u64, elapsed_s: f64, cut_short: bool) -> Summary {
    let args = h.args.clone();
    let mut commits: Vec<u64> = h.first_commit.values().copied().filter(|&t| t >= t0 && t <= t_end).collect();
    commits.sort_unstable();
    let steps_completed = commits.len();
    let span_s = ((t_end - t0) as f64 / 1e3).max(1e-3);
    let throughput = steps_completed as f64 / span_s;
    let mut max_stall_ms = 0;
    let mut last = t0;
    for &t in commits.iter().chain(std::iter::once(&t_end)) {
        max_stall_ms = max_stall_ms.max(t.saturating_sub(last));
        last = t;
    }
    let interrupted = h.interrupted;
    if !cut_short {
        if throughput < args.min_steps_per_s {
            h.violate(
                "progress",
                format!(
                    "{steps_completed} steps in {span_s:.1} s: {throughput:.2} steps/s, below the floor of {} steps/s",
                    args.min_steps_per_s
                ),
            );
        }
        if let Some(want) = args.steps {
            if (steps_completed as u64) < want {
                h.violate(
                    "progress",
                    format!("{steps_completed} of {want} steps completed within --timeout-s {} s", args.timeout_s),
                );
            }
        }
        if max_stall_ms as f64 > args.max_stall_s * 1e3 {
            h.violate(
                "progress",
                format!("no step completed for {max_stall_ms} ms, more than the bound of {} s", args.max_stall_s),
            );
        }
    }

    // Recovery: from a kill or freeze of a member to the first step another peer completes
    // without it (or, after a SIGCONT before its removal, after the SIGCONT).
    let mut recovery_ms = Vec::new();
    let mut unrecovered = 0;
    for d in h.done.iter().filter(|d| d.action == "kill" || d.action == "freeze") {
        let Some(id) = d.id else { continue };
        let found = h
            .steps
            .iter()
            .filter(|s| s.w != d.w && s.t >= d.t)
            .find(|s| !s.members.contains(&id) || d.resumed.is_some_and(|r| s.t >= r));
        match found {
            Some(s) => recovery_ms.push(s.t - d.t),
            None if t_end.saturating_sub(d.t) > args.wait_bound_ms() + 1000 => unrecovered += 1,
            None => {}
        }
    }

    // Master kills: some peer must complete a step within the bound after each, through
    // a restarted master or the standby.
    let mut master_recovery_ms = Vec::new();
    let bound = args.master_down_ms + args.wait_bound_ms();
    for &k in &h.master_kills.clone() {
        match h.steps.iter().filter(|s| s.t >= k).map(|s| s.t).min() {
            Some(t) => {
                master_recovery_ms.push(t - k);
                if t - k > bound && !cut_short {
                    h.violate(
                        "master-recovery",
                        format!("no step for {} ms after a master kill (bound {bound} ms)", t - k),
                    );
                }
            }
            None if t_end.saturating_sub(k) > bound && !cut_short => {
                h.violate("master-recovery", format!("no step in the {} ms after a master kill", t_end - k));
            }
            None => {}
        }
    }

    // Joiners: each one the churn left alone for --join-bound-s must have reached a model
    // some other peer also reported for the same step.
    let bound_ms = (args.join_bound_s * 1e3) as u64;
    let mut join_ms = Vec::new();
    let mut late = Vec::new();
    for (i, w) in h.workers.iter().enumerate().filter(|(_, w)| w.role == Role::Joiner) {
        match w.agreed {
            Some((_, t)) => join_ms.push(t.saturating_sub(w.spawned_t)),
            None => {
                // Touched by the churn before the bound: no verdict.
                let touched_at = h.done.iter().find(|d| d.w == i && d.action != "join").map(|d| d.t);
                let until = touched_at.unwrap_or(t_end).min(w.exit_t.unwrap_or(u64::MAX));
                if until.saturating_sub(w.spawned_t) > bound_ms {
                    late.push(format!("{} (started at +{:.1} s, {} steps)", w.name, h.rel(w.spawned_t), w.steps));
                }
            }
        }
    }
    if !late.is_empty() && !cut_short {
        h.violate(
            "joiner-sync",
            format!(
                "joiner(s) {} did not reach a model hash another peer reported for the same step within {} s",
                late.join(", "),
                args.join_bound_s
            ),
        );
    }
    let spurious_removals = h
        .workers
        .iter()
        .filter(|w| w.fate == Fate::Untouched && w.error.as_ref().is_some_and(|e| e["kind"] == "Removed"))
        .count();
    Summary {
        t0,
        t_end,
        elapsed_s,
        steps_completed,
        peer_steps: h.steps.iter().filter(|s| s.t >= t0).count(),
        throughput,
        max_stall_ms,
        recovery_ms,
        unrecovered,
        master_recovery_ms,
        join_ms,
        spurious_removals,
        interrupted,
    }
}
