//! Step 3 of the bench, recovery: from the SIGKILL of one peer to each survivor's first
//! all-reduce in the view without it.

use std::time::Duration;

use super::pool::{heartbeat_for, peer_args, start_master, Peers};
use super::{load_average, now_us, BenchArgs};

#[derive(Clone, Debug)]
pub(super) struct Recovery {
    pub(super) peer_timeout_ms: u64,
    /// Whether the master listened for liveness connections (a dead process is seen
    /// when the kernel closes its TCP connection, not after the peer timeout).
    pub(super) liveness: bool,
    /// Per run: seconds from the kill to each survivor's first success without the victim.
    pub(super) runs: Vec<Vec<f64>>,
    /// All-reduces per second before the kill (slowest peer), per run.
    pub(super) rates: Vec<f64>,
}

pub(super) fn run_recovery(
    args: &BenchArgs,
    secret: &str,
    (peer_timeout_ms, liveness): (u64, bool),
) -> Result<Recovery, String> {
    let n = args.recovery_peers;
    let mut out = Recovery { peer_timeout_ms, liveness, runs: Vec::new(), rates: Vec::new() };
    for run in 0..args.recovery_runs {
        let master = start_master(secret, peer_timeout_ms, liveness)?;
        let mut pargs = peer_args(args, master.addr(), n, heartbeat_for(peer_timeout_ms));
        pargs.push(format!("--recovery-size={}", args.recovery_size));
        let mut peers = Peers::spawn(n, &pargs, secret)?;
        let mut ranks = vec![usize::MAX; n];
        let mut rate = f64::MAX;
        while ranks.contains(&usize::MAX) {
            let (i, v) = peers.next(Duration::from_secs(60))?;
            if v["event"] == "running" {
                ranks[i] = v["rank"].as_u64().unwrap_or(0) as usize;
                rate = rate.min(v["per_sec"].as_f64().unwrap_or(0.0));
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        let victim = ranks.iter().position(|&r| r == 1 % n).unwrap_or(0);
        let killed_at = now_us();
        peers.kill(victim);
        let mut recovered: Vec<Option<f64>> = vec![None; n];
        recovered[victim] = Some(f64::NAN);
        while recovered.contains(&None) {
            let (i, v) = peers.next(Duration::from_secs(30)).map_err(|e| format!("after the kill: {e}"))?;
            match v["event"].as_str() {
                Some("view_ok") if v["size"].as_u64() == Some(n as u64 - 1) => {
                    let t = v["t_us"].as_u64().unwrap_or(0);
                    recovered[i] = Some(t.saturating_sub(killed_at) as f64 / 1e6);
                }
                Some("failed") => eprintln!("  survivor {i}: all_reduce returned {}", v["message"]),
                _ => {}
            }
        }
        drop(peers);
        drop(master);
        let times: Vec<f64> = recovered.into_iter().flatten().filter(|t| !t.is_nan()).collect();
        let max = times.iter().cloned().fold(0.0, f64::max);
        println!(
            "  recovery, peer timeout {peer_timeout_ms} ms, liveness {}, run {}: {:.0} ms (survivors: {})  ({:.0} all-reduces/s before; load {})",
            if liveness { "on" } else { "off" },
            run + 1,
            max * 1e3,
            times.iter().map(|t| format!("{:.0}", t * 1e3)).collect::<Vec<_>>().join(", "),
            rate,
            load_average()
        );
        out.runs.push(times);
        out.rates.push(rate);
    }
    Ok(out)
}
