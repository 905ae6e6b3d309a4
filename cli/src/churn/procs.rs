//! The harness's children: starting and signalling the master and the workers, carrying
//! out the planned actions, and the threads that read their pipes. (Reaping, with its
//! `unexpected-exit` check, is in `checks`.)

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use serde_json::json;

use super::schedule::{Action, Planned, Thaw};
use super::{Done, Fate, Harness, Msg, Role, Worker};
use crate::now_ms;
use phalanx::relay::{free_udp_addr, Relay};

/// Signals and process control: Linux/Unix system calls, declared here (no libc crate).
#[cfg(unix)]
pub(super) mod sys {
    use std::os::raw::c_int;
    use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

    pub const SIGKILL: c_int = 9;
    pub const SIGINT: c_int = 2;
    pub const SIGTERM: c_int = 15;
    pub const SIGCONT: c_int = 18;
    pub const SIGSTOP: c_int = 19;

    extern "C" {
        fn kill(pid: c_int, sig: c_int) -> c_int;
        fn signal(signum: c_int, handler: usize) -> usize;
        fn write(fd: c_int, buf: *const u8, count: usize) -> isize;
        fn _exit(status: c_int) -> !;
        #[cfg(target_os = "linux")]
        fn prctl(option: c_int, ...) -> c_int;
    }

    /// Sends `sig` to process `pid`.
    pub fn send(pid: u32, sig: c_int) -> bool {
        // SAFETY: kill(2) has no memory effects; pid is one of our children.
        unsafe { kill(pid as c_int, sig) == 0 }
    }

    /// Makes the calling (forked, not yet exec'd) child get SIGKILL when its parent dies.
    /// Only async-signal-safe calls: it runs between fork and exec.
    pub fn die_with_parent(parent: u32) -> std::io::Result<()> {
        #[cfg(target_os = "linux")]
        {
            const PR_SET_PDEATHSIG: c_int = 1;
            // SAFETY: prctl(PR_SET_PDEATHSIG, sig) only sets a flag of this process.
            if unsafe { prctl(PR_SET_PDEATHSIG, SIGKILL as std::os::raw::c_ulong) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl: then nobody would kill us. (No
            // allocation here: another thread may have held the allocator's lock at fork.)
            if std::os::unix::process::parent_id() != parent {
                const ESRCH: i32 = 3;
                return Err(std::io::Error::from_raw_os_error(ESRCH));
            }
        }
        let _ = parent;
        Ok(())
    }

    static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);
    static SIGNALS: AtomicU32 = AtomicU32::new(0);

    extern "C" fn on_signal(_sig: c_int) {
        // Async-signal-safe only: atomics, write(2), _exit(2).
        if SIGNALS.fetch_add(1, Ordering::SeqCst) >= 1 {
            // SAFETY: _exit ends the process at once; the kernel kills the children
            // (PR_SET_PDEATHSIG).
            unsafe { _exit(130) }
        }
        let fd = SIGNAL_FD.load(Ordering::SeqCst);
        if fd >= 0 {
            let byte = 1u8;
            // SAFETY: writes one byte from a live local to a socket this process owns.
            unsafe { write(fd, &byte, 1) };
        }
    }

    /// Routes SIGINT and SIGTERM to a byte on `fd` (the first) or an immediate exit (the second).
    pub fn catch_interrupts(fd: c_int) {
        SIGNAL_FD.store(fd, Ordering::SeqCst);
        let handler = on_signal as extern "C" fn(c_int) as usize;
        // SAFETY: the handler only makes async-signal-safe calls.
        unsafe {
            signal(SIGINT, handler);
            signal(SIGTERM, handler);
        }
    }
}

/// Elsewhere: no signals, and children do not die with the harness.
#[cfg(not(unix))]
pub(super) mod sys {
    pub const SIGKILL: i32 = 9;
    pub const SIGCONT: i32 = 18;
    pub const SIGSTOP: i32 = 19;
    pub fn send(_pid: u32, _sig: i32) -> bool {
        false
    }
    pub fn die_with_parent(_parent: u32) -> std::io::Result<()> {
        Ok(())
    }
}

/// Which process a line comes from.
#[derive(Clone, Copy, Debug)]
pub(super) enum Src {
    /// A master, by generation (every start is a new one).
    Master(usize),
    /// A worker, by index.
    Worker(usize),
}

/// A stdout reader that sends each JSON line (anything else as `{"event": "?"}`).
pub(super) fn read_lines(src: Src, out: impl std::io::Read + Send + 'static, tx: Sender<Msg>) {
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let v = serde_json::from_str(&line).unwrap_or_else(|_| json!({ "event": "?", "line": line }));
            if tx.send(Msg::Line(src, v)).is_err() {
                return;
            }
        }
        let _ = tx.send(Msg::Eof(src));
    });
}

/// Keeps the last lines of a stderr pipe, for failure messages.
pub(super) fn keep_tail(err: impl std::io::Read + Send + 'static) -> Arc<Mutex<VecDeque<String>>> {
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let sink = tail.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            let mut t = sink.lock().unwrap_or_else(|p| p.into_inner());
            if t.len() == 8 {
                t.pop_front();
            }
            t.push_back(line);
        }
    });
    tail
}

/// `phalanx <args>` as a child that dies with this process, stdio piped.
pub(super) fn spawn_child(args: &[String]) -> Result<Child, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the phalanx executable: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id();
        // Its own process group: a Ctrl-C in the terminal reaches the harness only, which
        // then stops the run and its children itself.
        cmd.process_group(0);
        // SAFETY: the closure only makes async-signal-safe system calls (prctl, getppid)
        // and does not allocate.
        unsafe {
            cmd.pre_exec(move || sys::die_with_parent(parent));
        }
    }
    cmd.spawn().map_err(|e| format!("cannot start `phalanx {}`: {e}", args.join(" ")))
}

impl Harness {
    /// Puts the relay between the master and every worker to come: they dial its front
    /// for the master, and each advertises a front of its own for its peers.
    pub(super) fn start_relay(&mut self) -> Result<(), String> {
        let relay = Relay::start(self.args.seed, self.args.shaping()).map_err(|e| format!("relay: {e}"))?;
        for slot in &mut self.slots {
            let real = slot.real.ok_or("no master address")?;
            let front = relay.front(real).map_err(|e| format!("relay front for a master: {e}"))?;
            slot.dial = Some(front.to_string());
        }
        self.timeline.push(json!({
            "t": now_ms(), "source": "harness", "event": "relay", "masters": self.master_reals().iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "delay_ms": self.args.delay_ms, "jitter_ms": self.args.jitter_ms, "reorder": self.args.reorder,
            "loss": self.args.loss,
        }));
        self.relay = Some(relay);
        Ok(())
    }

    pub(super) fn start_worker(&mut self, role: Role, perturb_at: Option<u64>) -> Result<usize, String> {
        let w = self.workers.len();
        let (master, standby) = self.master_dials()?;
        let mut args: Vec<String> = vec!["worker".into(), "--master".into(), master];
        if let Some(standby) = standby {
            args.extend(["--standby-master".into(), standby]);
        }
        let mut addr = None;
        if let Some(relay) = &self.relay {
            let bind = free_udp_addr().map_err(|e| format!("a port for a worker: {e}"))?;
            let front = relay.front(bind).map_err(|e| format!("relay front for a worker: {e}"))?;
            args.extend(["--bind".into(), bind.to_string(), "--advertise".into(), front.to_string()]);
            // The relay stands in for a network between hosts, whose faults it injects:
            // data links stay on it instead of moving to shared memory.
            args.extend(["--shm".into(), "off".into()]);
            addr = Some(bind);
        }
        for (k, v) in [
            ("--len", self.args.len as u64),
            ("--heartbeat-ms", self.args.heartbeat_ms),
            ("--step-delay-ms", self.args.step_delay_ms),
            ("--max-failures", 20),
        ] {
            args.extend([k.to_string(), v.to_string()]);
        }
        if self.args.async_mode {
            args.push("--overlap".into());
        }
        if self.args.mix {
            args.push("--mix".into());
        }
        if let Some(q) = self.args.quantize {
            args.extend(["--quantize".into(), q.to_string()]);
        }
        args.push("--leave-on-stdin".into());
        if let Some(s) = perturb_at {
            args.extend(["--perturb-at-step".into(), s.to_string()]);
        }
        let mut child = spawn_child(&args)?;
        read_lines(Src::Worker(w), child.stdout.take().expect("piped"), self.tx.clone()); // ok: spawned with Stdio::piped()
        let stderr = keep_tail(child.stderr.take().expect("piped")); // ok: spawned with Stdio::piped()
        let name = if role == Role::Planted { "fault".to_string() } else { format!("w{w}") };
        let pid = child.id();
        let t = now_ms();
        self.timeline.push(json!({ "t": t, "source": "harness", "event": "spawn", "worker": name, "pid": pid }));
        self.workers.push(Worker {
            name,
            addr,
            role,
            stdin: child.stdin.take(),
            child,
            pid,
            spawned_t: t,
            id: None,
            joined_t: None,
            fate: Fate::Untouched,
            frozen: Vec::new(),
            cut_at: None,
            open_waits: Vec::new(),
            open_wait_reported: false,
            steps: 0,
            failures: 0,
            first_step_t: None,
            agreed: None,
            error: None,
            eof: false,
            status: None,
            exit_t: None,
            stderr,
        });
        Ok(w)
    }

    /// SIGKILLs and reaps every process still running (first noting those that exited
    /// on their own).
    pub(super) fn kill_all(&mut self, fate: Fate) {
        for w in 0..self.workers.len() {
            self.reap(w);
        }
        for w in &mut self.workers {
            if w.status.is_none() {
                let _ = w.child.kill();
                if let Ok(s) = w.child.wait() {
                    w.status = Some(s);
                    w.exit_t = Some(now_ms());
                    if w.fate == Fate::Untouched {
                        w.fate = fate.clone();
                    }
                }
            }
        }
        self.kill_masters();
    }

    /// Carries out one planned action.
    pub(super) fn act(&mut self, p: &Planned) -> Result<(), String> {
        let t = now_ms();
        if p.action == Action::MasterKill {
            self.kill_master();
            return Ok(());
        }
        if p.action == Action::Join {
            let w = self.start_worker(Role::Joiner, None)?;
            debug_assert_eq!(self.workers[w].name, format!("w{}", p.target));
            self.done.push(Done { t, action: "join", w, id: None, resumed: None });
            self.timeline.push(json!({ "t": t, "source": "harness", "event": "join", "target": self.workers[w].name }));
            return Ok(());
        }
        let w = p.target;
        let Some(wk) = self.workers.get_mut(w) else { return Ok(()) };
        if !wk.running() {
            let name = wk.name.clone();
            self.timeline.push(json!({
                "t": t, "source": "harness", "event": "skipped", "action": p.action.name(), "target": name,
                "reason": "already exited",
            }));
            return Ok(());
        }
        let id = wk.id;
        match p.action {
            Action::Kill => {
                let _ = wk.child.kill();
                wk.fate = Fate::Killed;
            }
            Action::Freeze => {
                sys::send(wk.pid, sys::SIGSTOP);
                wk.fate = Fate::Frozen;
                wk.frozen.push((t, None));
            }
            Action::Leave => {
                if let Some(stdin) = &mut wk.stdin {
                    let _ = stdin.write_all(b"leave\n").and_then(|_| stdin.flush());
                }
                wk.fate = Fate::Leaving;
            }
            Action::Partition => {
                if let (Some(relay), Some(addr)) = (&self.relay, wk.addr) {
                    for master in self.slots.iter().filter_map(|s| s.real) {
                        relay.cut_between(addr, master);
                    }
                }
                wk.fate = Fate::Partitioned;
                wk.cut_at = Some(t);
            }
            Action::Join | Action::MasterKill => unreachable!("handled above"),
        }
        let name = wk.name.clone();
        self.done.push(Done { t, action: p.action.name(), w, id, resumed: None });
        let mut e = json!({ "t": t, "source": "harness", "event": p.action.name(), "target": name, "pid": self.workers[w].pid });
        if let Some(id) = id {
            e["id"] = json!(id.to_string());
        }
        if let Some((ms, thaw)) = p.freeze {
            e["freeze_ms"] = json!(ms);
            e["then"] = json!(thaw.name());
        }
        self.timeline.push(e);
        Ok(())
    }

    /// Ends the freeze or partition of worker `w`.
    pub(super) fn thaw(&mut self, w: usize, thaw: Thaw) {
        let t = now_ms();
        if thaw == Thaw::Heal {
            // Healed whether or not the worker is still there: its address is free again.
            if let (Some(relay), Some(addr)) = (&self.relay, self.workers[w].addr) {
                for master in self.slots.iter().filter_map(|s| s.real) {
                    relay.heal_between(addr, master);
                }
            }
            let name = self.workers[w].name.clone();
            self.timeline.push(json!({ "t": t, "source": "harness", "event": "heal", "target": name }));
            return;
        }
        let wk = &mut self.workers[w];
        if !wk.running() {
            return;
        }
        if let Some(last) = wk.frozen.last_mut() {
            last.1.get_or_insert(t);
        }
        match thaw {
            Thaw::Kill => {
                let _ = wk.child.kill();
                wk.fate = Fate::FrozenKilled;
            }
            Thaw::Heal | Thaw::Restart => unreachable!("handled above and by the run loop"),
            Thaw::Cont => {
                sys::send(wk.pid, sys::SIGCONT);
                wk.fate = Fate::Resumed;
                if let Some(d) = self.done.iter_mut().rev().find(|d| d.w == w && d.action == "freeze") {
                    d.resumed = Some(t);
                }
            }
        }
        let name = self.workers[w].name.clone();
        let event = if thaw == Thaw::Kill { "freeze_kill" } else { "cont" };
        self.timeline.push(json!({ "t": t, "source": "harness", "event": event, "target": name }));
    }
}
