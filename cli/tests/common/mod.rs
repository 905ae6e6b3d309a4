//! The harness of the process tests: a `phalanx master`, `phalanx worker`s and other
//! children over 127.0.0.1, their JSON event lines, and the exact recomputation of every
//! all-reduce they report. Children are SIGKILLed and reaped when a test ends.
#![allow(dead_code)] // each test file uses its own part of the harness

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use phalanx::workload::{expected_sum, hash_f32};
use serde_json::Value;

/// The master's default `--peer-timeout-ms`: a member silent this long is removed.
pub const PEER_TIMEOUT: Duration = Duration::from_millis(phalanx::membership::master::DEFAULT_PEER_TIMEOUT_MS);
/// Kill to the survivors' failed attempt: the peer timeout (the dead peer's last
/// heartbeat was at most one interval before the kill, so removal comes at most one
/// peer timeout after the kill) plus 1500 ms for the abort to reach the survivors on a loaded 2-core machine.
pub const DETECTION_BOUND: Duration = Duration::from_millis(PEER_TIMEOUT.as_millis() as u64 + 1500);
/// Freeze to the survivors' first step without the frozen peer: the peer timeout plus
/// 2000 ms for the abort, the next view and a small all-reduce.
pub const FROZEN_BOUND: Duration = Duration::from_millis(PEER_TIMEOUT.as_millis() as u64 + 2000);
/// SIGCONT to the resumed peer's `Removed` error: it only has to read what the master
/// already sent (or notice the closed connection).
pub const REMOVED_BOUND: Duration = Duration::from_secs(5);
/// A stranger's join attempt to its `JoinFailed` exit (the QUIC handshake limit is 10 s;
/// a wrong proof fails at once).
pub const REFUSED_BOUND: Duration = Duration::from_secs(10);
/// Mismatched all-reduces to the error on both peers: one round trip to the master.
pub const MISMATCH_BOUND: Duration = Duration::from_secs(5);

/// Every test ends within this, whatever it waits for (plus recomputing the sums).
pub const TEST_LIMIT: Duration = Duration::from_secs(60);

/// Serialises the tests: processes of parallel tests would compete for the two cores
/// and make heartbeat deadlines meaningless.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// One event line, with the time this process read it.
#[derive(Clone, Debug)]
pub struct Ev {
    pub v: Value,
    pub at: Instant,
}

impl Ev {
    pub fn is(&self, event: &str) -> bool {
        self.v["event"] == event
    }
    pub fn u64(&self, key: &str) -> u64 {
        self.v[key].as_u64().unwrap_or_else(|| panic!("event without a number '{key}': {}", self.v))
    }
    pub fn str(&self, key: &str) -> &str {
        self.v[key].as_str().unwrap_or_else(|| panic!("event without a string '{key}': {}", self.v))
    }
}

/// A completed step as a worker reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub step: u64,
    pub epoch: u64,
    pub members: Vec<u64>,
    pub sum: String,
    pub model: String,
}

impl Step {
    pub fn of(ev: &Ev) -> Step {
        let members = ev.v["members"]
            .as_array()
            .unwrap_or_else(|| panic!("step without members: {}", ev.v))
            .iter()
            .map(|m| m.as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad member id in {}", ev.v)))
            .collect();
        Step {
            step: ev.u64("step"),
            epoch: ev.u64("epoch"),
            members,
            sum: ev.str("sum").to_string(),
            model: ev.str("model").to_string(),
        }
    }

    pub fn member_set(&self) -> BTreeSet<u64> {
        self.members.iter().copied().collect()
    }
}

pub struct Proc {
    pub name: String,
    pub child: Child,
    /// Gradient length of a worker (`--len` plus `--len-offset`).
    pub len: usize,
    pub log: Vec<Ev>,
    pub stderr: Arc<Mutex<String>>,
    pub status: Option<ExitStatus>,
}

/// A master and its workers, as child processes. Dropping it SIGKILLs and reaps them.
pub struct Cluster {
    pub procs: Vec<Proc>,
    pub tx: Sender<(usize, Ev)>,
    pub rx: Receiver<(usize, Ev)>,
    pub master: SocketAddr,
    /// Sums already recomputed: (members, step, len) -> hash.
    pub sums: HashMap<(Vec<u64>, u64, usize), String>,
    /// No wait goes past this ([`TEST_LIMIT`] after the start).
    pub deadline: Instant,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Cluster {
    /// Starts a master on 127.0.0.1 (any port) and waits for its address.
    pub fn start(secret: Option<&str>) -> Cluster {
        Cluster::start_with(secret, &[])
    }

    /// [`Cluster::start`] with more arguments for `phalanx master`.
    pub fn start_with(secret: Option<&str>, master_args: &[&str]) -> Cluster {
        let (tx, rx) = mpsc::channel();
        let mut c = Cluster {
            procs: Vec::new(),
            tx,
            rx,
            master: SocketAddr::from(([127, 0, 0, 1], 0)),
            sums: HashMap::new(),
            deadline: Instant::now() + TEST_LIMIT,
        };
        let mut args = vec!["master".to_string(), "--listen".into(), "127.0.0.1:0".into()];
        if let Some(s) = secret {
            args.extend(["--secret".into(), s.into()]);
        }
        args.extend(master_args.iter().map(|a| a.to_string()));
        let m = c.spawn("master", &args, 0);
        let addr = c.wait(Duration::from_secs(20), "the master's address", |c| {
            c.procs[m].log.iter().find(|e| e.is("listening")).map(|e| e.str("addr").to_string())
        });
        c.master = addr.parse().expect("the master's address");
        assert!(c.master.ip().is_loopback(), "the master must listen on 127.0.0.1, not {}", c.master);
        c
    }

    pub fn spawn(&mut self, name: &str, args: &[String], len: usize) -> usize {
        let mut child = Command::new(env!("CARGO_BIN_EXE_phalanx"))
            .args(args)
            .env_remove("PHALANX_SECRET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let i = self.procs.len();
        let out = child.stdout.take().expect("piped stdout");
        let tx = self.tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let at = Instant::now();
                let v =
                    serde_json::from_str(&line).unwrap_or_else(|_| serde_json::json!({ "event": "?", "line": line }));
                if tx.send((i, Ev { v, at })).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let (err, sink) = (child.stderr.take().expect("piped stderr"), stderr.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
                s.push_str(&line);
                s.push('\n');
            }
        });
        self.procs.push(Proc { name: name.to_string(), child, len, log: Vec::new(), stderr, status: None });
        i
    }

    /// SIGKILLs and reaps every process (SIGKILL also ends a stopped one); their logs stay.
    pub fn stop(&mut self) {
        for p in &mut self.procs {
            let _ = p.child.kill();
            if let Ok(status) = p.child.wait() {
                p.status.get_or_insert(status);
            }
        }
    }

    /// Starts `phalanx worker --master <master> --len <len> <extra>` (run until killed).
    pub fn worker(&mut self, name: &str, len: usize, extra: &[&str]) -> usize {
        let mut args: Vec<String> = ["worker", "--master", &self.master.to_string(), "--len", &len.to_string()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let offset = extra.iter().position(|a| *a == "--len-offset").map_or(0, |i| extra[i + 1].parse().unwrap_or(0));
        self.spawn(name, &args, len + offset)
    }

    /// Processes event lines until `f` returns something, or panics after `timeout`
    /// with every process's recent events. `f` sees every event as soon as it is read.
    pub fn wait<T>(&mut self, timeout: Duration, what: &str, mut f: impl FnMut(&Cluster) -> Option<T>) -> T {
        let deadline = (Instant::now() + timeout).min(self.deadline);
        loop {
            for p in &mut self.procs {
                if p.status.is_none() {
                    p.status = p.child.try_wait().ok().flatten();
                }
            }
            if let Some(t) = f(self) {
                return t;
            }
            let now = Instant::now();
            if now >= deadline {
                let limit = if deadline == self.deadline { " (the test's time limit)" } else { "" };
                panic!("timed out{limit} after {timeout:?} waiting for {what}\n{}", self.dump());
            }
            match self.rx.recv_timeout((deadline - now).min(Duration::from_millis(20))) {
                Ok((i, ev)) => self.procs[i].log.push(ev),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => unreachable!("the cluster holds a sender"),
            }
        }
    }

    /// Every process's last events and stderr, for failure messages.
    pub fn dump(&self) -> String {
        let mut s = String::new();
        for p in &self.procs {
            s += &format!("--- {} (pid {}, status {:?})\n", p.name, p.child.id(), p.status);
            // Everything but routine progress, then the last few lines.
            let n = p.log.len();
            let notable = p.log[..n.saturating_sub(12)].iter().filter(|e| !e.is("allreduce_start"));
            for e in notable.take(20).chain(&p.log[n.saturating_sub(12)..]) {
                s += &format!("  {}\n", e.v);
            }
            let err = p.stderr.lock().unwrap_or_else(|p| p.into_inner());
            if !err.is_empty() {
                s += &format!("  stderr: {}\n", err.trim_end());
            }
        }
        s
    }

    pub fn log(&self, i: usize) -> &[Ev] {
        &self.procs[i].log
    }

    /// The worker's id, once it has joined.
    pub fn id(&self, i: usize) -> Option<u64> {
        self.log(i).iter().find(|e| e.is("joined")).map(|e| e.str("id").parse().expect("numeric id"))
    }

    pub fn ids(&self, ws: &[usize]) -> BTreeSet<u64> {
        ws.iter().map(|&w| self.id(w).expect("joined")).collect()
    }

    /// The steps worker `i` reported from log position `from` on.
    pub fn steps_from(&self, i: usize, from: usize) -> Vec<(usize, Step)> {
        self.log(i).iter().enumerate().skip(from).filter(|(_, e)| e.is("step")).map(|(k, e)| (k, Step::of(e))).collect()
    }

    pub fn steps(&self, i: usize) -> Vec<Step> {
        self.steps_from(i, 0).into_iter().map(|(_, s)| s).collect()
    }

    /// The first event of worker `i` from position `from` on that `f` accepts.
    pub fn find(&self, i: usize, from: usize, f: impl Fn(&Ev) -> bool) -> Option<(usize, &Ev)> {
        self.log(i).iter().enumerate().skip(from).find(|(_, e)| f(e))
    }

    pub fn pid(&self, i: usize) -> String {
        self.procs[i].child.id().to_string()
    }

    /// Sends SIGSTOP or SIGCONT to process `i` with the `kill` command.
    pub fn signal(&self, i: usize, sig: &str) {
        let status = Command::new("kill").args([&format!("-{sig}"), &self.pid(i)]).status().expect("run kill");
        assert!(status.success(), "kill -{sig} {} failed", self.pid(i));
    }

    /// The hash of the exact sum of `members`' gradients at `step`, as workers report it.
    pub fn expected(&mut self, members: &[u64], step: u64, len: usize) -> String {
        let mut members = members.to_vec();
        members.sort_unstable(); // the sum is exact, so the order does not matter
        let key = (members.clone(), step, len);
        let members = &members[..];
        self.sums.entry(key).or_insert_with(|| hash_f32(&expected_sum_parallel(members, step, len))).clone()
    }

    /// Checks every step any of `ws` reported: the reporter is a member; the sum is the
    /// exact sum of the members' gradients, bitwise; and all reporters of one (epoch,
    /// step) agree on members, sum and model, so no one kept a result another did not.
    pub fn check_steps(&mut self, ws: &[usize]) {
        let mut agreed: HashMap<(u64, u64), (Step, usize)> = HashMap::new();
        for &w in ws {
            let Some(id) = self.id(w) else { continue };
            let len = self.procs[w].len;
            for s in self.steps(w) {
                assert!(s.members.contains(&id), "{} reported a step it is not a member of: {s:?}", self.procs[w].name);
                let want = self.expected(&s.members, s.step, len);
                assert_eq!(s.sum, want, "{} step {} over {:?}: wrong sum", self.procs[w].name, s.step, s.members);
                let first = agreed.entry((s.epoch, s.step)).or_insert((s.clone(), w));
                assert_eq!(
                    first.0, s,
                    "{} and {} disagree on epoch {} step {}",
                    self.procs[first.1].name, self.procs[w].name, s.epoch, s.step
                );
            }
        }
    }

    /// The exit status of process `i`, once it has exited.
    pub fn exited(&self, i: usize) -> Option<ExitStatus> {
        self.procs[i].status
    }
}

/// [`expected_sum`] over two threads: a debug build takes about a second per 16 MiB
/// gradient.
pub fn expected_sum_parallel(members: &[u64], step: u64, len: usize) -> Vec<f32> {
    let (a, b) = members.split_at(members.len() / 2);
    let (mut sum, other) = std::thread::scope(|s| {
        let h = s.spawn(|| expected_sum(b, step, len));
        (expected_sum(a, step, len), h.join().expect("summing thread"))
    });
    sum.iter_mut().zip(other).for_each(|(s, o)| *s += o);
    sum
}

/// Starts a first worker and, once it is in, the others: they are admitted together.
pub fn workers(c: &mut Cluster, n: usize, len: usize, extra: &[&str]) -> Vec<usize> {
    let first = c.worker("w0", len, extra);
    c.wait(Duration::from_secs(20), "w0 to join", |c| c.id(first));
    let mut ws = vec![first];
    ws.extend((1..n).map(|k| c.worker(&format!("w{k}"), len, extra)));
    ws
}

/// Waits until each of `ws` has reported `count` steps over exactly `members` from its
/// log position in `from` on; returns the receive time of each one's first such step.
pub fn steps_over(
    c: &mut Cluster,
    timeout: Duration,
    ws: &[usize],
    from: &[usize],
    members: &BTreeSet<u64>,
    count: usize,
) -> Vec<Instant> {
    let what = format!("{count} steps over {} members on each of {} workers", members.len(), ws.len());
    c.wait(timeout, &what, |c| {
        ws.iter()
            .zip(from)
            .map(|(&w, &k)| {
                let ok: Vec<usize> = c
                    .steps_from(w, k)
                    .into_iter()
                    .filter(|(_, s)| s.member_set() == *members)
                    .map(|(i, _)| i)
                    .collect();
                (ok.len() >= count).then(|| c.log(w)[ok[0]].at)
            })
            .collect()
    })
}
