//! The churn's masters: the primary, an optional standby, and their kills and restarts.
//!
//! A master is killed with SIGKILL (`--master-kill-every-s`) and started again on the
//! same address after `--master-down-ms`: the workers rejoin it, or, with `--standby`,
//! the standby takes the group over at once and the restarted one becomes the spare.
//! Each start is a new process (a generation); the lines and the exit of a killed one
//! are expected, any other master's exit is a violation.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::procs::{keep_tail, read_lines, spawn_child, Src};
use super::Harness;
use crate::now_ms;

/// One master process.
pub(super) struct MasterProc {
    /// 0: the primary, 1: the standby.
    pub(super) slot: usize,
    pub(super) child: Child,
    pub(super) stderr: Arc<Mutex<VecDeque<String>>>,
    pub(super) eof: bool,
    /// Killed by the churn: its exit is expected.
    pub(super) killed: bool,
}

/// Where a master lives, whatever its process.
#[derive(Default)]
pub(super) struct Slot {
    /// The address it listens on.
    pub(super) real: Option<SocketAddr>,
    /// The address workers dial (the relay's front for it, with a relay).
    pub(super) dial: Option<String>,
    /// The process running there now (an index into `Harness::masters`).
    pub(super) current: Option<usize>,
}

impl Harness {
    /// Starts the primary (and the standby) and waits for their addresses.
    pub(super) fn start_masters(&mut self) -> Result<(), String> {
        let slots = if self.args.standby { 2 } else { 1 };
        for slot in 0..slots {
            self.slots.push(Slot::default());
            let g = self.start_master(slot, "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?, slot > 0)?;
            self.pump(Instant::now() + Duration::from_secs(30), &|h| h.slots[slot].real.is_some() || h.masters[g].eof);
            if self.slots[slot].real.is_none() {
                return Err(format!("master {slot} did not report its address within 30 s"));
            }
            self.slots[slot].dial = self.slots[slot].real.map(|a| a.to_string());
        }
        Ok(())
    }

    /// Spawns `phalanx master` for `slot` on `listen` (a `--standby` for the standby and
    /// for every restart, so that no newcomer starts a group of its own there); returns
    /// its generation.
    fn start_master(&mut self, slot: usize, listen: SocketAddr, standby: bool) -> Result<usize, String> {
        let timeout = self.args.peer_timeout_ms.to_string();
        let mut args =
            vec!["master".to_string(), "--listen".into(), listen.to_string(), "--peer-timeout-ms".into(), timeout];
        if standby {
            args.push("--standby".into());
        }
        let mut child = spawn_child(&args)?;
        let g = self.masters.len();
        read_lines(Src::Master(g), child.stdout.take().expect("piped"), self.tx.clone()); // ok: spawned with Stdio::piped()
        let stderr = keep_tail(child.stderr.take().expect("piped")); // ok: spawned with Stdio::piped()
        self.masters.push(MasterProc { slot, child, stderr, eof: false, killed: false });
        self.slots[slot].current = Some(g);
        Ok(g)
    }

    /// A line of master generation `g`.
    pub(super) fn on_master_line(&mut self, g: usize, v: Value) {
        if v["event"] == "listening" {
            let slot = self.masters[g].slot;
            self.slots[slot].real = v["addr"].as_str().and_then(|a| a.parse().ok());
        }
    }

    /// Master generation `g` closed its output: it exited.
    pub(super) fn on_master_eof(&mut self, g: usize) {
        self.masters[g].eof = true;
        if !self.masters[g].killed && self.t0.is_some() && !self.draining {
            let tail = self.masters[g].stderr.lock().unwrap_or_else(|p| p.into_inner()).clone();
            self.violate("unexpected-exit", format!("a master exited on its own; its stderr: {tail:?}"));
        }
    }

    /// SIGKILLs the master the group follows; with a standby, the other one is followed
    /// from now on.
    pub(super) fn kill_master(&mut self) {
        let t = now_ms();
        let slot = self.active;
        if let Some(g) = self.slots[slot].current.take() {
            let m = &mut self.masters[g];
            m.killed = true;
            let _ = m.child.kill();
            let _ = m.child.wait();
            self.timeline.push(
                json!({ "t": t, "source": "harness", "event": "master_kill", "slot": slot, "pid": m.child.id() }),
            );
            self.master_kills.push(t);
        }
        if self.slots.len() > 1 {
            self.active = 1 - slot;
        }
    }

    /// Starts again every master slot that has no process.
    pub(super) fn restart_masters(&mut self) -> Result<(), String> {
        for slot in 0..self.slots.len() {
            if self.slots[slot].current.is_some() {
                continue;
            }
            let Some(addr) = self.slots[slot].real else { continue };
            let g = self.start_master(slot, addr, true)?;
            let pid = self.masters[g].child.id();
            self.timeline.push(
                json!({ "t": now_ms(), "source": "harness", "event": "master_restart", "slot": slot, "pid": pid }),
            );
        }
        Ok(())
    }

    /// The master addresses a worker is given: the one the group follows first, then
    /// the other.
    pub(super) fn master_dials(&self) -> Result<(String, Option<String>), String> {
        let dial = |slot: usize| self.slots.get(slot).and_then(|s| s.dial.clone());
        let first = dial(self.active).ok_or("no master address")?;
        Ok((first, dial(1 - self.active.min(1)).filter(|_| self.slots.len() > 1)))
    }

    /// The real addresses of the masters (a partition cuts a worker from all of them).
    pub(super) fn master_reals(&self) -> Vec<SocketAddr> {
        self.slots.iter().filter_map(|s| s.real).collect()
    }

    /// Kills every master process still running.
    pub(super) fn kill_masters(&mut self) {
        for m in &mut self.masters {
            if !m.eof || m.child.try_wait().ok().flatten().is_none() {
                let _ = m.child.kill();
                let _ = m.child.wait();
            }
        }
    }

    /// The masters' stderr tails, for a failure dump.
    pub(super) fn master_tails(&self) -> String {
        let tails: Vec<_> =
            self.masters.iter().map(|m| m.stderr.lock().unwrap_or_else(|p| p.into_inner()).clone()).collect();
        format!("  master stderr {tails:?}\n")
    }
}
