//! V-Half and V-Min: the V-shaped schedules with controllable memory
//! (`../shared/reference/pipeline-schedules.md`, 1.9; Qi et al., arXiv 2405.15362).
//!
//! Each stage holds chunks `s` and `2p-1-s`, as in ZB-V. Every micro-batch runs the same
//! *building block*: its four passes F (chunk 0), f (chunk 1), b (chunk 1's backward)
//! and B (chunk 0's backward) at fixed slot offsets per stage, repeated every 6 slots.
//! The offsets fix how long a micro-batch's activations live on a stage, hence the peak
//! memory: about half of ZB-V's for V-Half, a third for V-Min. Then, in slot units:
//!
//! 1. the `W` passes fill the idle slots greedily, each after its backward;
//! 2. *squeeze*: outside the steady middle, each pass moves to the earliest free slot
//!    its dependencies allow, if that does not raise the stage's peak memory, and the
//!    slots are compacted to as-soon-as-possible;
//! 3. the `W` passes are dropped, the squeeze runs again on the rest, and the `W`
//!    passes are put back into the free slots, split by chunk (chunk 1's first).
//!
//! The stage's order is its passes sorted by slot; costs only enter the simulation.

use super::generate::check;
use super::{Action, Pass, Placement, Schedule, ScheduleError};

/// Slot times of one stage: `lists[k][j]` is the slot of pass kind `k` of micro-batch
/// `j`, kinds 0 F, 1 f, 2 b, 3 B, then the `W` kinds (4 all, or 4 chunk 1 and 5 chunk 0).
type Slots = Vec<Vec<i64>>;

/// Which building block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Half,
    Min,
}

/// The block's offsets of F, f, b and B on each stage (the paper's patterns).
fn pattern(shape: Shape, p: usize) -> Vec<[i64; 4]> {
    let p = p as i64;
    (0..p)
        .map(|i| match shape {
            Shape::Min => {
                let d = if p % 3 == 0 { 2 } else { 0 };
                [i, 2 * p - i - 1, 2 * p + d + i, 4 * p + d - i - 1]
            }
            Shape::Half => {
                let d = if p % 2 == 0 { 3 } else { 0 };
                [2 * i, 3 * p - i - 2, 3 * p + d + 2 * i - 1, 6 * p + d - i - 2]
            }
        })
        .collect()
}

/// The next pass in slot order over the kinds `0..kinds` of `lists`, ties to the lower
/// kind: its slot and kind.
fn head(lists: &Slots, at: &[usize], kinds: usize) -> Option<(i64, usize)> {
    (0..kinds).filter_map(|k| lists[k].get(at[k]).map(|&t| (t, k))).min()
}

/// Adds the `W` kinds to a stage's four lists: each idle slot takes one pending `W` (a
/// backward already ran), chunk 1's first when `split`; the rest go after the end.
fn put_w(lists: &mut Slots, split: bool) {
    let bound = lists.iter().filter_map(|l| l.last()).copied().max().unwrap_or(0);
    lists.truncate(4);
    lists.push(Vec::new());
    if split {
        lists.push(Vec::new());
    }
    let mut pending = [0usize; 2];
    let mut at = [0usize; 4];
    for i in 0..=bound {
        match head(lists, &at, 4) {
            Some((t, k)) if t == i => {
                at[k] += 1;
                if k >= 2 {
                    pending[if split { k - 2 } else { 0 }] += 1;
                }
            }
            _ => {
                if let Some(w) = (0..2).find(|&w| pending[w] > 0) {
                    lists[4 + w].push(i);
                    pending[w] -= 1;
                }
            }
        }
    }
    let mut i = bound;
    for w in 0..2 {
        for _ in 0..pending[w] {
            i += 1;
            lists[4 + w].push(i);
        }
    }
}

/// A stage's peak memory in the block model: F and f hold one unit each until a `W`
/// frees it; without `W` lists, each idle slot after a backward frees one. Every pass
/// of a stage has a slot of its own, so a table of slots replays the stage in one sweep
/// (the squeeze calls this for every slot it tries).
fn memory(lists: &Slots) -> i64 {
    let has_w = lists.len() > 4;
    let bound = lists.iter().filter_map(|l| l.last()).copied().max().unwrap_or(0).max(0) as usize;
    let mut kind = vec![u8::MAX; bound + 1];
    for (k, list) in lists.iter().enumerate() {
        for &t in list {
            if let Some(slot) = usize::try_from(t).ok().and_then(|t| kind.get_mut(t)) {
                *slot = k as u8;
            }
        }
    }
    let (mut pending, mut held, mut peak) = (0, 0i64, 0i64);
    for k in kind {
        match k {
            0 | 1 => held += 1,
            2 | 3 => pending += 1,
            u8::MAX if !has_w && pending > 0 => {
                held -= 1;
                pending -= 1;
            }
            u8::MAX => {}
            _ => held -= 1,
        }
        peak = peak.max(held);
    }
    peak
}

/// The `j`-th smallest slot of two sorted lists together (-1 past their end).
fn nth_merged(a: &[i64], b: &[i64], j: usize) -> i64 {
    let (mut x, mut y) = (0, 0);
    let mut last = -1;
    for _ in 0..=j {
        last = match (a.get(x), b.get(y)) {
            (Some(&u), Some(&v)) if u <= v => {
                x += 1;
                u
            }
            (_, Some(&v)) => {
                y += 1;
                v
            }
            (Some(&u), None) => {
                x += 1;
                u
            }
            (None, None) => return -1,
        };
    }
    last
}

/// The next pass in slot order over all stages, ties to the lower stage, kind, and
/// micro-batch: (slot, stage, kind, micro-batch).
fn next_pass(stages: &[Slots], at: &[Vec<usize>]) -> Option<(i64, usize, usize, usize)> {
    let mut best: Option<(i64, usize, usize, usize)> = None;
    for (s, lists) in stages.iter().enumerate() {
        for (k, list) in lists.iter().enumerate() {
            if let Some(&t) = list.get(at[s][k]) {
                let c = (t, s, k, at[s][k]);
                if best.is_none_or(|b| c < b) {
                    best = Some(c);
                }
            }
        }
    }
    best
}

/// Compacts the slots to as soon as possible, keeping each stage's order and the
/// dependencies, one slot per pass.
fn eager(stages: &[Slots]) -> Result<Vec<Slots>, ScheduleError> {
    let p = stages.len();
    let mut out: Vec<Slots> = stages.iter().map(|l| l.iter().map(|x| vec![0; x.len()]).collect()).collect();
    let mut done: Vec<Slots> = out.clone();
    let mut at: Vec<Vec<usize>> = stages.iter().map(|l| vec![0; l.len()]).collect();
    let mut free = vec![0i64; p];
    let mut seen: Vec<Vec<Vec<bool>>> =
        stages.iter().map(|l| l.iter().map(|x| vec![false; x.len()]).collect()).collect();
    while let Some((_, s, k, j)) = next_pass(stages, &at) {
        at[s][k] += 1;
        let mut ready = free[s];
        let mut need = |ds: usize, dk: usize, dj: usize| -> Result<(), ScheduleError> {
            if !seen[ds][dk][dj] {
                return Err(ScheduleError::Deadlock(format!(
                    "V block: stage {s} kind {k} micro-batch {j} is slotted before its dependency"
                )));
            }
            ready = ready.max(done[ds][dk][dj]);
            Ok(())
        };
        match k {
            0 | 2 if s > 0 => need(s - 1, k, j)?,
            1 | 3 if s + 1 < p => need(s + 1, k, j)?,
            _ => {}
        }
        if (1..4).contains(&k) {
            need(s, k - 1, j)?;
        }
        if j > 0 {
            need(s, k, j - 1)?;
        }
        out[s][k][j] = ready;
        done[s][k][j] = ready + 1;
        seen[s][k][j] = true;
        free[s] = ready + 1;
    }
    Ok(out)
}

/// The squeeze (step 2): moves passes to earlier free slots where the dependencies
/// allow and the stage's peak memory does not grow. With `with_w`, the `W` passes are
/// put in first and move too; without, only passes after the steady middle move.
fn squeeze(mut stages: Vec<Slots>, with_w: bool) -> Result<Vec<Slots>, ScheduleError> {
    if with_w {
        stages.iter_mut().for_each(|l| put_w(l, false));
    }
    let m = stages.first().map_or(0, |l| l[0].len());
    let limit = stages.iter().map(memory).max().unwrap_or(0);
    let p = stages.len();
    let mut taken: Vec<Vec<bool>> = stages
        .iter()
        .map(|l| vec![false; l.iter().filter_map(|x| x.last()).copied().max().unwrap_or(0) as usize + 1])
        .collect();
    let mut at: Vec<Vec<usize>> = stages.iter().map(|l| vec![0; l.len()]).collect();
    // 0: before the first stage's first B; 1: until the last F of chunk 0 has run
    // (the steady middle, left alone); 2: after.
    let mut phase = 0;
    while let Some((now, s, k, j)) = next_pass(&stages, &at) {
        at[s][k] += 1;
        if k == 3 && s == 0 && phase == 0 {
            phase = 1;
        }
        if phase == 1 || (phase == 0 && !with_w) {
            if phase == 1 && k == 0 && j + 1 == m {
                phase = 2;
            }
            taken[s][now as usize] = true;
            continue;
        }
        let mut deps = -1;
        match k {
            0 | 2 if s > 0 => deps = deps.max(stages[s - 1][k][j]),
            1 | 3 if s + 1 < p => deps = deps.max(stages[s + 1][k][j]),
            _ => {}
        }
        if (1..4).contains(&k) {
            deps = deps.max(stages[s][k - 1][j]);
        }
        if k == 4 {
            // The j-th `W` follows the j-th backward of either chunk.
            deps = deps.max(nth_merged(&stages[s][2], &stages[s][3], j));
        }
        if j > 0 {
            deps = deps.max(stages[s][k][j - 1]);
        }
        let mut placed = now;
        for t in deps + 1..now {
            if !taken[s][t as usize] {
                stages[s][k][j] = t;
                if memory(&stages[s]) <= limit {
                    placed = t;
                    break;
                }
            }
        }
        stages[s][k][j] = placed;
        taken[s][placed as usize] = true;
    }
    if !with_w {
        stages.iter_mut().for_each(|l| put_w(l, false));
    }
    eager(&stages)
}

fn v_shape(shape: Shape, p: usize, m: usize) -> Result<Schedule, ScheduleError> {
    check(p, m)?;
    let blocks: Vec<Slots> = pattern(shape, p)
        .into_iter()
        .map(|offsets| offsets.iter().map(|&x| (0..m as i64).map(|j| x + 6 * j).collect()).collect())
        .collect();
    let mut squeezed = squeeze(blocks, true)?;
    squeezed.iter_mut().for_each(|l| l.truncate(4));
    let mut slots = squeeze(squeezed, false)?;
    let kinds = [(Pass::F, 0), (Pass::F, 1), (Pass::B, 1), (Pass::B, 0), (Pass::W, 1), (Pass::W, 0)];
    let stages = slots
        .iter_mut()
        .map(|lists| {
            put_w(lists, true);
            let mut all: Vec<(i64, usize, usize)> = lists
                .iter()
                .enumerate()
                .flat_map(|(k, list)| list.iter().enumerate().map(move |(j, &t)| (t, k, j)))
                .collect();
            all.sort_unstable();
            all.into_iter().map(|(_, k, mb)| Action { pass: kinds[k].0, mb, chunk: kinds[k].1 }).collect()
        })
        .collect();
    let name = match shape {
        Shape::Half => "V-Half",
        Shape::Min => "V-Min",
    };
    Ok(Schedule { name, microbatches: m, chunks: 2, placement: Placement::V, stages })
}

/// V-Half: two chunks per stage in a V, with about half of ZB-V's activation memory,
/// `(p+2)/2` micro-batches' worth (rounded down) on every stage, for a bubble of about
/// half of 1F1B's.
pub fn v_half(p: usize, m: usize) -> Result<Schedule, ScheduleError> {
    v_shape(Shape::Half, p, m)
}

/// V-Min: two chunks per stage in a V, with about a third of ZB-V's activation memory,
/// `(p+4)/3` micro-batches' worth (rounded down) on every stage, for a bubble of about
/// two thirds of 1F1B's.
pub fn v_min(p: usize, m: usize) -> Result<Schedule, ScheduleError> {
    v_shape(Shape::Min, p, m)
}

#[cfg(test)]
mod tests {
    use super::super::{simulate, validate, Costs};
    use super::*;

    /// A stage's order in the reference's notation: upper case chunk 0, lower case chunk 1.
    fn text(s: &Schedule, stage: usize) -> String {
        s.stages[stage]
            .iter()
            .map(|a| {
                let letter = format!("{:?}", a.pass);
                let letter = if a.chunk == 1 { letter.to_lowercase() } else { letter };
                format!("{letter}{}", a.mb)
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The reference's worked example (1.7, p = 4, m = 8), order by order: V-Half's
    /// bubble 2.5 at 3 micro-batches of memory per stage, V-Min's 5.5 at 2.
    #[test]
    fn the_worked_example_v_half_and_v_min() {
        let half = [
            "F0 F1 F2 F3 F4 f0 b0 w0 f1 b1 w1 f2 B0 b2 w2 f3 W0 F5 B1 b3 w3 f4 W1 F6 B2 b4 w4 f5 W2 F7 B3 b5 w5 f6 b6 w6 B4 W3 W4 f7 b7 B5 w7 B6 W5 W6 B7 W7",
            "F0 F1 F2 F3 f0 f1 b0 w0 f2 b1 w1 B0 W0 F4 f3 b2 w2 B1 W1 F5 f4 b3 w3 B2 W2 F6 f5 b4 w4 B3 F7 W3 f6 b5 w5 B4 b6 w6 f7 W4 B5 b7 B6 w7 W5 W6 B7 W7",
            "F0 F1 F2 f0 f1 f2 b0 w0 F3 b1 B0 w1 W0 f3 F4 B1 b2 w2 f4 W1 F5 B2 b3 w3 f5 W2 F6 B3 b4 w4 f6 W3 F7 B4 b5 w5 f7 b6 B5 w6 B6 b7 w7 W4 B7 W5 W6 W7",
            "F0 f0 F1 f1 F2 f2 b0 w0 B0 W0 F3 f3 b1 w1 B1 W1 F4 f4 b2 w2 B2 W2 F5 f5 b3 w3 B3 F6 W3 f6 b4 B4 w4 F7 W4 f7 b5 B5 b6 B6 w5 w6 b7 B7 w7 W5 W6 W7",
        ];
        let min = [
            "F0 F1 F2 f0 b0 w0 f1 b1 w1 B0 W0 F3 f2 b2 B1 w2 W1 F4 f3 b3 B2 w3 W2 F5 f4 b4 B3 w4 W3 F6 f5 b5 B4 w5 W4 F7 f6 b6 B5 w6 W5 f7 b7 B6 w7 W6 B7 W7",
            "F0 F1 f0 f1 b0 w0 F2 B0 b1 w1 W0 f2 F3 B1 b2 w2 W1 f3 F4 B2 b3 w3 W2 f4 F5 B3 b4 w4 W3 f5 F6 B4 b5 w5 W4 f6 F7 B5 b6 w6 W5 f7 B6 b7 w7 W6 B7 W7",
            "F0 F1 f0 f1 b0 w0 F2 B0 W0 b1 f2 w1 B1 F3 W1 b2 f3 w2 B2 F4 W2 b3 f4 w3 B3 F5 W3 b4 f5 w4 B4 F6 W4 b5 f6 w5 B5 F7 W5 b6 f7 w6 B6 W6 b7 w7 B7 W7",
            "F0 f0 F1 f1 b0 B0 w0 W0 F2 f2 b1 B1 w1 W1 F3 f3 b2 B2 w2 W2 F4 f4 b3 B3 w3 W3 F5 f5 b4 B4 w4 W4 F6 f6 b5 B5 w5 W5 F7 f7 b6 B6 w6 W6 b7 B7 w7 W7",
        ];
        for (schedule, want, bubble, peak) in
            [(v_half(4, 8).unwrap(), half, 2.5, 3.0), (v_min(4, 8).unwrap(), min, 5.5, 2.0)]
        {
            for (s, order) in want.iter().enumerate() {
                assert_eq!(text(&schedule, s), *order, "{} stage {s}", schedule.name);
            }
            validate(&schedule, &Costs::unit(), Some(peak)).unwrap();
            let t = simulate(&schedule, &Costs::unit()).unwrap();
            assert_eq!((t.work, t.bubble()), (24.0, bubble), "{}", schedule.name);
            assert_eq!(t.peak_memory, vec![peak; 4], "{}", schedule.name);
        }
    }

    #[test]
    fn bad_parameters_name_the_limit() {
        assert!(matches!(v_half(1, 8), Err(ScheduleError::Invalid(why)) if why.contains("2 stages")));
        assert!(matches!(v_min(4, 0), Err(ScheduleError::Invalid(why)) if why.contains("micro-batch")));
    }
}
