//! The churn report: a table for the terminal, a JSON document with the event timeline,
//! and a hand-written SVG of membership size and step rate over time.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::{json, Value};

use super::checks::Summary;
use super::schedule::Planned;
use super::{Fate, Harness, Role};

/// Every invariant the harness checks, in report order, with what it means.
pub(crate) const INVARIANTS: [(&str, &str); 7] = [
    ("model-agreement", "every peer that completed a step holds a bitwise identical model"),
    ("exact-sum", "every all-reduce equals the exact sum of its members' gradients"),
    ("wait-bound", "no all-reduce waits longer than the peer timeout plus the slack"),
    ("joiner-sync", "every joiner reaches the group's model hash"),
    ("progress", "steps/s above the floor, no stall longer than the bound"),
    ("unexpected-exit", "neither the master nor an untouched worker exits (Removed excepted)"),
    ("master-recovery", "after a master kill, a step completes within the down time plus the wait bound"),
];

fn count(h: &Harness, action: &str) -> usize {
    h.done.iter().filter(|d| d.action == action).count()
}

fn fmt_ms(v: Option<u64>) -> String {
    v.map_or("-".into(), |ms| format!("{ms} ms"))
}

fn violations_of(h: &Harness, invariant: &str) -> usize {
    h.violations.iter().filter(|v| v.invariant == invariant).count()
}

/// The figures both the table and the JSON show.
fn figures(h: &Harness, s: &Summary) -> Value {
    let freezes = h.done.iter().filter(|d| d.action == "freeze");
    let frozen_then_killed = h.workers.iter().filter(|w| w.fate == Fate::FrozenKilled).count();
    json!({
        "peers": h.args.peers,
        "kills": count(h, "kill"),
        "freezes": freezes.count(),
        "freezes_then_killed": frozen_then_killed,
        "freezes_then_resumed": h.workers.iter().filter(|w| w.fate == Fate::Resumed).count(),
        "joins": count(h, "join"),
        "leaves": count(h, "leave"),
        "partitions": count(h, "partition"),
        "partitioned_then_removed": h
            .workers
            .iter()
            .filter(|w| w.fate == Fate::Partitioned && w.error.as_ref().is_some_and(|e| e["kind"] == "Removed"))
            .count(),
        "steps_completed": s.steps_completed,
        "peer_steps": s.peer_steps,
        "aborted_collectives": h.aborted,
        "master_recovery_ms": s.master_recovery_ms,
        "mix_checked": h.extras_checked,
        "recovery_ms": {
            "p50": percentile(&s.recovery_ms, 50.0),
            "p99": percentile(&s.recovery_ms, 99.0),
            "max": s.recovery_ms.iter().max(),
            "samples": s.recovery_ms,
            "unrecovered": s.unrecovered,
        },
        "join_to_agreed_model_ms": {
            "p50": percentile(&s.join_ms, 50.0),
            "max": s.join_ms.iter().max(),
            "samples": s.join_ms,
        },
        "throughput_steps_per_s": (s.throughput * 100.0).round() / 100.0,
        "duration_s": (s.elapsed_s * 10.0).round() / 10.0,
        "max_wait_ms": h.waits_ms.iter().max(),
        "p99_wait_ms": percentile(&h.waits_ms, 99.0),
        "max_stall_ms": s.max_stall_ms,
        "sums_checked": h.sums_checked,
        "spurious_removals": s.spurious_removals,
    })
}

/// The JSON report.
pub(crate) fn build(h: &Harness, plan: &[Planned], s: &Summary) -> Value {
    let args = &h.args;
    let invariants: Vec<Value> = INVARIANTS
        .iter()
        .map(|(name, what)| {
            let n = violations_of(h, name);
            json!({ "name": name, "meaning": what, "held": n == 0, "violations": n })
        })
        .collect();
    let workers: Vec<Value> = h
        .workers
        .iter()
        .map(|w| {
            json!({
                "name": w.name,
                "role": match w.role { Role::Initial => "initial", Role::Joiner => "joiner", Role::Planted => "planted" },
                "pid": w.pid,
                "id": w.id.map(|i| i.to_string()),
                "spawned_t": w.spawned_t,
                "joined_t": w.joined_t,
                "first_step_t": w.first_step_t,
                "agreed_model_at": w.agreed.map(|(step, t)| json!({ "step": step, "t": t })),
                "fate": format!("{:?}", w.fate),
                "steps": w.steps,
                "attempts_failed": w.failures,
                "error": w.error,
                "exit": w.status.map(|st| st.to_string()),
                "exit_t": w.exit_t,
            })
        })
        .collect();
    // One record per committed step (the first report of it), not one per peer.
    let mut steps: BTreeMap<u64, Value> = BTreeMap::new();
    for r in &h.steps {
        let e = steps.entry(r.step).or_insert_with(|| {
            json!({
                "step": r.step, "epoch": r.epoch, "t": r.t, "members": r.members.len(),
                "model": h.models.get(&r.step).map(|m| m.0.clone()), "reporters": 0,
            })
        });
        e["reporters"] = json!(e["reporters"].as_u64().unwrap_or(0) + 1);
    }
    let mut timeline = h.timeline.clone();
    timeline.sort_by_key(|e| e["t"].as_u64().unwrap_or(0));
    json!({
        "ok": h.violation_count == 0 && !s.interrupted,
        "interrupted": s.interrupted,
        "config": {
            "peers": args.peers, "duration_s": args.duration(), "steps": args.steps, "seed": args.seed, "len": args.len,
            "kill_every_s": args.kill_every_s, "freeze_every_s": args.freeze_every_s, "freeze_max_s": args.freeze_max_s,
            "join_every_s": args.join_every_s, "leave_every_s": args.leave_every_s, "min_peers": args.min_peers,
            "max_peers": args.max_peers(), "peer_timeout_ms": args.peer_timeout_ms, "slack_ms": args.slack_ms,
            "wait_bound_ms": args.wait_bound_ms(), "heartbeat_ms": args.heartbeat_ms,
            "step_delay_ms": args.step_delay_ms, "min_steps_per_s": args.min_steps_per_s,
            "max_stall_s": args.max_stall_s, "join_bound_s": args.join_bound_s, "plant_fault": args.plant_fault,
        },
        "summary": figures(h, s),
        "invariants": invariants,
        "violations": h.violations.iter().map(|v| json!({ "invariant": v.invariant, "message": v.message, "t": v.t })).collect::<Vec<_>>(),
        "violation_count": h.violation_count,
        "churn_start_t": s.t0,
        "churn_end_t": s.t_end,
        "schedule": plan.iter().map(Planned::to_json).collect::<Vec<_>>(),
        "master_pids": h.masters.iter().map(|m| m.child.id()).collect::<Vec<_>>(),
        "master_kills": h.master_kills,
        "workers": workers,
        "series": series(h, s).iter().map(|b| json!({ "t_s": b.0, "members": b.1, "steps": b.2 })).collect::<Vec<_>>(),
        "steps": steps.into_values().collect::<Vec<_>>(),
        "timeline": timeline,
    })
}

/// The terminal table and the invariants' verdicts.
pub(crate) fn table(h: &Harness, s: &Summary) -> String {
    let f = figures(h, s);
    let n = |k: &str| f[k].to_string();
    let freezes = format!("{} ({}k/{}c)", f["freezes"], f["freezes_then_killed"], f["freezes_then_resumed"]);
    let cols = [
        ("peers", n("peers")),
        ("kills", n("kills")),
        ("freezes", freezes),
        ("joins", n("joins")),
        ("leaves", n("leaves")),
        ("steps completed", n("steps_completed")),
        ("aborted collectives", n("aborted_collectives")),
        ("recovery p50", fmt_ms(percentile(&s.recovery_ms, 50.0))),
        ("recovery p99", fmt_ms(percentile(&s.recovery_ms, 99.0))),
        ("throughput", format!("{:.2} steps/s", s.throughput)),
    ];
    let widths: Vec<usize> = cols.iter().map(|(k, v)| k.len().max(v.len())).collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nchurn report: seed {}, {:.1} s of churn, len {} f32, peer timeout {} ms, wait bound {} ms",
        h.args.seed,
        s.elapsed_s,
        h.args.len,
        h.args.peer_timeout_ms,
        h.args.wait_bound_ms()
    );
    let row = |cells: Vec<String>| {
        let cells: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!(" {c:>w$} ")).collect();
        format!("|{}|", cells.join("|"))
    };
    let _ = writeln!(out, "{}", row(cols.iter().map(|(k, _)| k.to_string()).collect()));
    let _ = writeln!(out, "|{}|", widths.iter().map(|w| "-".repeat(w + 2)).collect::<Vec<_>>().join("|"));
    let _ = writeln!(out, "{}", row(cols.iter().map(|(_, v)| v.clone()).collect()));
    let _ = writeln!(
        out,
        "freezes: (k) then SIGKILLed / (c) SIGCONTed. {} peer-steps, {} sums recomputed; longest all-reduce wait {} \
         (p99 {}); longest stall {} ms; {} unrecovered; joiner start to agreed model p50 {}; spurious removals {}",
        s.peer_steps,
        h.sums_checked,
        fmt_ms(h.waits_ms.iter().max().copied()),
        fmt_ms(percentile(&h.waits_ms, 99.0)),
        s.max_stall_ms,
        s.unrecovered,
        fmt_ms(percentile(&s.join_ms, 50.0)),
        s.spurious_removals,
    );
    if !h.extras_checked.is_empty() {
        let each: Vec<String> = h.extras_checked.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let _ = writeln!(out, "workload mix: results recomputed and compared: {}", each.join(", "));
    }
    if !h.master_kills.is_empty() {
        let _ = writeln!(
            out,
            "master kills: {} (restarted after {} ms{}); first step after a kill p50 {}, max {}",
            h.master_kills.len(),
            h.args.master_down_ms,
            if h.args.standby { ", a standby taking over meanwhile" } else { "" },
            fmt_ms(percentile(&s.master_recovery_ms, 50.0)),
            fmt_ms(s.master_recovery_ms.iter().max().copied()),
        );
    }
    let _ = writeln!(out, "invariants:");
    for (name, what) in INVARIANTS {
        let v = violations_of(h, name);
        let verdict = if v == 0 { "ok".to_string() } else { format!("VIOLATED ({v})") };
        let _ = writeln!(out, "  {name:<16} {verdict:<14} {what}");
    }
    out
}

/// Per-second bins of the churn phase: (seconds since start, membership size, steps
/// completed in the second). Membership is the largest view a step completed over in
/// the second, carried over seconds without a step.
fn series(h: &Harness, s: &Summary) -> Vec<(u64, usize, usize)> {
    let secs = (s.t_end.saturating_sub(s.t0)).div_ceil(1000).max(1) as usize;
    let mut members = vec![None; secs];
    let mut steps = vec![0usize; secs];
    for r in h.steps.iter().filter(|r| r.t >= s.t0 && r.t < s.t_end) {
        let b = ((r.t - s.t0) / 1000) as usize;
        members[b] = Some(members[b].unwrap_or(0).max(r.members.len()));
    }
    for (&step, &t) in &h.first_commit {
        let _ = step;
        if t >= s.t0 && t < s.t_end {
            steps[((t - s.t0) / 1000) as usize] += 1;
        }
    }
    let mut last = h.steps.iter().filter(|r| r.t < s.t0).map(|r| r.members.len()).next_back().unwrap_or(0);
    (0..secs)
        .map(|b| {
            last = members[b].unwrap_or(last);
            (b as u64, last, steps[b])
        })
        .collect()
}

/// The SVG picture: membership size (top) and step rate (bottom) over time, with the
/// churn's actions as vertical marks.
pub(crate) fn svg(h: &Harness, s: &Summary) -> String {
    let bins = series(h, s);
    let (w, left, right) = (960.0, 60.0, 20.0);
    let plot_w = w - left - right;
    let span = bins.len().max(1) as f64;
    let x = |sec: f64| left + plot_w * sec / span;
    // Axes from 0 to 4 whole ticks.
    let tick = |max: usize| max.div_ceil(4).max(1);
    let members_tick = tick(bins.iter().map(|b| b.1).max().unwrap_or(1));
    let rate_tick = tick(bins.iter().map(|b| b.2).max().unwrap_or(1));
    let (max_members, max_rate) = ((4 * members_tick) as f64, (4 * rate_tick) as f64);
    let (top0, top1, bot0, bot1) = (50.0, 210.0, 260.0, 420.0);
    let mut o = String::new();
    let _ = writeln!(
        o,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="470" viewBox="0 0 {w} 470" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(o, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = writeln!(
        o,
        r##"<text x="{left}" y="20" font-size="14">phalanx churn: seed {}, {} peers, len {}, {:.1} steps/s, {} violation(s)</text>"##,
        h.args.seed, h.args.peers, h.args.len, s.throughput, h.violation_count
    );
    // Legend.
    let legend = [("kill", "#d62728"), ("freeze", "#1f77b4"), ("join", "#2ca02c"), ("leave", "#ff7f0e")];
    for (i, (name, color)) in legend.iter().enumerate() {
        let lx = left + 430.0 + i as f64 * 90.0;
        let _ = writeln!(
            o,
            r##"<line x1="{lx}" y1="34" x2="{}" y2="34" stroke="{color}" stroke-width="2"/><text x="{}" y="38">{name}</text>"##,
            lx + 18.0,
            lx + 22.0
        );
    }
    for (y0, y1, label, step) in [(top0, top1, "members", members_tick), (bot0, bot1, "steps/s", rate_tick)] {
        let _ = writeln!(
            o,
            r##"<rect x="{left}" y="{y0}" width="{plot_w}" height="{}" fill="none" stroke="#999"/>"##,
            y1 - y0
        );
        let _ = writeln!(
            o,
            r##"<text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">{label}</text>"##,
            (y0 + y1) / 2.0,
            (y0 + y1) / 2.0
        );
        for k in 0..=4 {
            let y = y1 - (y1 - y0) * k as f64 / 4.0;
            let _ = writeln!(
                o,
                r##"<text x="{}" y="{}" text-anchor="end">{}</text><line x1="{left}" y1="{y}" x2="{}" y2="{y}" stroke="#eee"/>"##,
                left - 4.0,
                y + 4.0,
                k * step,
                left + plot_w
            );
        }
    }
    // Time axis.
    let tick_every = ((span / 12.0).ceil() as u64).max(1);
    for sec in (0..=bins.len() as u64).step_by(tick_every as usize) {
        let _ = writeln!(o, r##"<text x="{}" y="438" text-anchor="middle">{sec}</text>"##, x(sec as f64));
    }
    let _ = writeln!(o, r##"<text x="{}" y="458" text-anchor="middle">seconds of churn</text>"##, left + plot_w / 2.0);
    // Freeze spans, then action marks.
    for d in h.done.iter().filter(|d| d.action == "freeze") {
        let end = h.workers[d.w].frozen.iter().find(|f| f.0 == d.t).and_then(|f| f.1).unwrap_or(s.t_end);
        let (a, b) = (x(h.rel(d.t)), x(h.rel(end.min(s.t_end))));
        let _ = writeln!(
            o,
            r##"<rect x="{a:.1}" y="{top0}" width="{:.1}" height="{}" fill="#1f77b4" fill-opacity="0.12"/>"##,
            (b - a).max(1.0),
            bot1 - top0
        );
    }
    for d in &h.done {
        let color = legend.iter().find(|l| l.0 == d.action).map_or("#777", |l| l.1);
        let xx = x(h.rel(d.t));
        let _ = writeln!(
            o,
            r##"<line x1="{xx:.1}" y1="{top0}" x2="{xx:.1}" y2="{bot1}" stroke="{color}" stroke-width="1.2" stroke-dasharray="4 3"><title>{} {} at +{:.1} s</title></line>"##,
            d.action,
            h.workers[d.w].name,
            h.rel(d.t)
        );
    }
    // Membership: a step line.
    let mut pts = String::new();
    for (i, &(_, m, _)) in bins.iter().enumerate() {
        let y = top1 - (top1 - top0) * m as f64 / max_members;
        let _ = write!(pts, "{:.1},{y:.1} {:.1},{y:.1} ", x(i as f64), x(i as f64 + 1.0));
    }
    let _ = writeln!(o, r##"<polyline points="{pts}" fill="none" stroke="#333" stroke-width="2"/>"##);
    // Step rate: bars.
    for (i, &(_, _, n)) in bins.iter().enumerate() {
        let hgt = (bot1 - bot0) * n as f64 / max_rate;
        let _ = writeln!(
            o,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{hgt:.1}" fill="#555"><title>+{i} s: {n} steps</title></rect>"##,
            x(i as f64) + 0.5,
            bot1 - hgt,
            (plot_w / span - 1.0).max(0.5)
        );
    }
    let _ = writeln!(o, "</svg>");
    o
}

/// Nearest-rank percentile of `v` (sorted or not).
fn percentile(v: &[u64], p: f64) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    Some(s[rank.min(s.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[5, 1, 3], 50.0), Some(3));
        assert_eq!(percentile(&[5, 1, 3], 99.0), Some(5));
    }
}
