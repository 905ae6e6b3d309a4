//! The churn schedule: a function of the seed and the options alone, targets included.

use serde_json::{json, Value};

use super::args::ChurnArgs;
use phalanx::rng::SplitMix64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Action {
    Kill,
    Freeze,
    Join,
    Leave,
    /// Cut a worker off from the master through the relay.
    Partition,
    /// SIGKILL the master the group follows (restarted after --master-down-ms).
    MasterKill,
}

impl Action {
    pub(super) fn name(self) -> &'static str {
        match self {
            Action::Kill => "kill",
            Action::Freeze => "freeze",
            Action::Join => "join",
            Action::Leave => "leave",
            Action::Partition => "partition",
            Action::MasterKill => "master_kill",
        }
    }
}

/// What ends a freeze or a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Thaw {
    Kill,
    Cont,
    /// The partition heals.
    Heal,
    /// The killed master starts again.
    Restart,
}

impl Thaw {
    pub(super) fn name(self) -> &'static str {
        match self {
            Thaw::Kill => "kill",
            Thaw::Cont => "cont",
            Thaw::Heal => "heal",
            Thaw::Restart => "restart",
        }
    }
}

#[derive(Clone, Debug)]
pub(super) struct Planned {
    /// Milliseconds after the churn phase began.
    pub(super) at_ms: u64,
    pub(super) action: Action,
    /// Index of the worker (`w<index>`): acted on, or started by a join.
    pub(super) target: usize,
    /// Freezes and partitions: how long, and what then.
    pub(super) freeze: Option<(u64, Thaw)>,
}

impl Planned {
    pub(super) fn to_json(&self) -> Value {
        let mut v = json!({ "at_ms": self.at_ms, "action": self.action.name(), "target": format!("w{}", self.target) });
        if let Some((ms, thaw)) = self.freeze {
            v["freeze_ms"] = json!(ms);
            v["then"] = json!(thaw.name());
        }
        v
    }

    pub(super) fn describe(&self) -> String {
        let target = match self.action {
            Action::MasterKill => "master".to_string(),
            _ => format!("w{}", self.target),
        };
        let mut s = format!("+{:>7.3}s {:<6} {target}", self.at_ms as f64 / 1e3, self.action.name());
        if let Some((ms, thaw)) = self.freeze {
            let then = match thaw {
                Thaw::Kill => "SIGKILL",
                Thaw::Cont => "SIGCONT",
                Thaw::Heal => "heal",
                Thaw::Restart => "restart",
            };
            s += &format!(" for {ms} ms, then {then}");
        }
        s
    }
}

/// The whole schedule up to `horizon_s`, targets included: the workers are `w0..` in the
/// order they start, and the plan tracks which ones the churn has not touched yet. Each
/// action kind has its own stream of times, so a longer horizon only appends.
pub(super) fn schedule(args: &ChurnArgs, horizon_s: f64) -> Vec<Planned> {
    let horizon_ms = (horizon_s * 1e3) as u64;
    let mut times: Vec<(u64, Action)> = Vec::new();
    for (k, (every, action)) in [
        (args.kill_every_s, Action::Kill),
        (args.freeze_every_s, Action::Freeze),
        (args.join_every_s, Action::Join),
        (args.leave_every_s, Action::Leave),
        (args.partition_every_s, Action::Partition),
        (args.master_kill_every_s, Action::MasterKill),
    ]
    .into_iter()
    .enumerate()
    {
        if every <= 0.0 {
            continue;
        }
        let mut rng = SplitMix64(args.seed ^ (0xA076_1D64_78BD_642F_u64.wrapping_mul(k as u64 + 1)));
        let mut t = 0.0;
        loop {
            t += every * (0.5 + rng.unit());
            let at = (t * 1e3) as u64;
            if at >= horizon_ms {
                break;
            }
            times.push((at, action));
        }
    }
    // Same time: a fixed order of kinds (stable sort keeps the push order).
    times.sort_by_key(|&(at, _)| at);

    let mut rng = SplitMix64(args.seed ^ 0xE703_7ED1_A0B4_28DB);
    // Workers the churn has not touched, in start order.
    let mut untouched: Vec<usize> = (0..args.peers).collect();
    let mut next = args.peers;
    let mut plan = Vec::new();
    for (at_ms, action) in times {
        if action == Action::MasterKill {
            plan.push(Planned { at_ms, action, target: 0, freeze: Some((args.master_down_ms, Thaw::Restart)) });
            continue;
        }
        if action == Action::Join {
            if untouched.len() < args.max_peers() {
                plan.push(Planned { at_ms, action, target: next, freeze: None });
                untouched.push(next);
                next += 1;
            }
            continue;
        }
        if untouched.len() <= args.min_peers {
            continue;
        }
        let target = untouched.remove(rng.below(untouched.len() as u64) as usize);
        let freeze = match action {
            Action::Freeze => {
                let ms = (500.0 + rng.unit() * (args.freeze_max_s * 1e3 - 500.0)) as u64;
                Some((ms, if rng.next_u64() & 1 == 0 { Thaw::Kill } else { Thaw::Cont }))
            }
            Action::Partition => Some(((500.0 + rng.unit() * (args.partition_max_s * 1e3 - 500.0)) as u64, Thaw::Heal)),
            _ => None,
        };
        plan.push(Planned { at_ms, action, target, freeze });
    }
    plan
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn args(extra: &[&str]) -> ChurnArgs {
        let mut v = vec!["churn"];
        v.extend(extra);
        ChurnArgs::try_parse_from(v).expect("args")
    }

    #[test]
    fn same_seed_same_schedule() {
        let a = args(&["--seed", "7"]);
        let p1: Vec<String> = schedule(&a, 60.0).iter().map(Planned::describe).collect();
        let p2: Vec<String> = schedule(&a, 60.0).iter().map(Planned::describe).collect();
        assert_eq!(p1, p2);
        let p3: Vec<String> = schedule(&args(&["--seed", "8"]), 60.0).iter().map(Planned::describe).collect();
        assert_ne!(p1, p3);
        // A longer horizon only appends.
        let long: Vec<String> = schedule(&a, 120.0).iter().map(Planned::describe).collect();
        assert_eq!(&long[..p1.len()], &p1[..]);
    }

    #[test]
    fn schedule_keeps_min_peers() {
        let a = args(&["--peers", "3", "--kill-every-s", "1", "--join-every-s", "0", "--min-peers", "2"]);
        let p = schedule(&a, 60.0);
        assert_eq!(p.len(), 1, "only one kill keeps 2 of 3: {:?}", p);
    }
}
