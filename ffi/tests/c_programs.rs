//! The C API used from C: `tests/c/harness.c` and the README's example are compiled with
//! the system C compiler (`cc`) against the static library this test build produced
//! (`libphalanx_ffi.a` next to the test binary), and run as separate processes on
//! 127.0.0.1: a master, peers doing every collective, a peer that dies mid-run while the
//! survivors retry, and a joiner that fetches the shared state.
//!
//! The tests run one at a time (they share the cores and heartbeat deadlines), every
//! wait is bounded, and the children are SIGKILLed and reaped when a test ends, passes
//! or panics.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Every wait of these tests ends within this.
const LIMIT: Duration = Duration::from_secs(90);
const SECRET: &str = "phalanx-ffi-test-secret-0123456789abcdef";

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Compiles one C program with warnings as errors and links it statically.
fn compile(source: &Path, name: &str) -> PathBuf {
    common::compile(source, &common::out_dir("c-programs"), name)
}

fn harness() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| compile(&common::ffi_dir().join("tests/c/harness.c"), "harness"))
}

/// The processes of one test, their output lines, and cleanup on drop.
struct Procs {
    children: Vec<(String, Child)>,
    lines: Arc<Mutex<Vec<Vec<String>>>>,
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Procs {
    fn new() -> Procs {
        Procs { children: Vec::new(), lines: Arc::default() }
    }

    /// Starts `exe args`; its stdout and stderr lines are collected under its index.
    fn spawn(&mut self, name: &str, exe: &Path, args: &[&str]) -> usize {
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let i = self.children.len();
        self.lines.lock().expect("lines").push(Vec::new());
        let pipes: [Box<dyn Read + Send>; 2] =
            [Box::new(child.stdout.take().expect("stdout")), Box::new(child.stderr.take().expect("stderr"))];
        for (pipe, prefix) in pipes.into_iter().zip(["", "stderr: "]) {
            let lines = self.lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    lines.lock().expect("lines")[i].push(format!("{prefix}{line}"));
                }
            });
        }
        self.children.push((name.to_string(), child));
        i
    }

    fn lines(&self, i: usize) -> Vec<String> {
        self.lines.lock().expect("lines")[i].clone()
    }

    fn dump(&self) -> String {
        let lines = self.lines.lock().expect("lines");
        let mut s = String::new();
        for ((name, _), lines) in self.children.iter().zip(lines.iter()) {
            s += &format!("--- {name}\n");
            for l in lines {
                s += &format!("{l}\n");
            }
        }
        s
    }

    /// Waits for a line of process `i` that starts with `prefix`.
    fn wait_line(&self, i: usize, prefix: &str) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self.lines(i).into_iter().find(|l| l.starts_with(prefix)) {
                return l;
            }
            assert!(
                start.elapsed() < LIMIT,
                "no '{prefix}' line from {} in time:\n{}",
                self.children[i].0,
                self.dump()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for process `i` to exit.
    fn wait_exit(&mut self, i: usize) -> ExitStatus {
        let status = common::wait_until(&mut self.children[i].1, Instant::now() + LIMIT);
        let status = status.unwrap_or_else(|| panic!("{} did not exit in time:\n{}", self.children[i].0, self.dump()));
        // Let the reader threads drain the pipes.
        std::thread::sleep(Duration::from_millis(50));
        status
    }

    /// Waits for processes `ws` to exit with status 0.
    fn expect_success(&mut self, ws: &[usize]) {
        for &w in ws {
            let status = self.wait_exit(w);
            assert!(status.success(), "{} exited with {status}:\n{}", self.children[w].0, self.dump());
        }
    }

    /// Starts the C master and returns its address.
    fn master(&mut self) -> String {
        let m = self.spawn("master", harness(), &["master", SECRET]);
        self.wait_line(m, "addr ").trim_start_matches("addr ").to_string()
    }
}

/// `key=value` from an event line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {key}= in '{line}'"))
}

/// Starts the C master and `n` peers of `exe` in `role` (`exe role ADDR SECRET n`): each
/// exits 0 having printed "`role` ok rank=R", and the ranks are 0..n.
fn peers_all_ok(exe: &Path, role: &str, n: usize) {
    let mut p = Procs::new();
    let addr = p.master();
    let count = n.to_string();
    let ws: Vec<usize> = (0..n).map(|i| p.spawn(&format!("peer{i}"), exe, &[role, &addr, SECRET, &count])).collect();
    p.expect_success(&ws);
    let ok = format!("{role} ok");
    let mut ranks: Vec<String> = ws.iter().map(|&w| field(&p.wait_line(w, &ok), "rank").to_string()).collect();
    ranks.sort();
    let want: Vec<String> = (0..n).map(|r| r.to_string()).collect();
    assert_eq!(ranks, want, "{}", p.dump());
}

#[test]
fn collectives_from_c_are_exact() {
    let _serial = serial();
    peers_all_ok(harness(), "collectives", 3);
}

/// Three peers all-reduce every step; the one of weight 10 exits abruptly at the top of
/// step 3, when the others enter the all-reduce. The survivors retry (`retry` attempts
/// inside the call, or by hand) and get exactly 1 + 100 from then on.
fn dead_peer(retry: &str) {
    let _serial = serial();
    let mut p = Procs::new();
    let addr = p.master();
    // Weights 1, 10, 100: every sum names its contributors.
    let victim = p.spawn("victim", harness(), &["steps", &addr, SECRET, "3", "10", "3", retry]);
    let survivors: Vec<usize> = ["1", "100"]
        .iter()
        .map(|w| p.spawn(&format!("survivor{w}"), harness(), &["steps", &addr, SECRET, "3", w, "-1", retry]))
        .collect();
    let status = p.wait_exit(victim);
    assert_eq!(status.code(), Some(42), "the victim's exit:\n{}", p.dump());
    p.expect_success(&survivors);
    for &s in &survivors {
        let steps: Vec<(u32, i64, usize)> = p
            .lines(s)
            .iter()
            .filter(|l| l.starts_with("step "))
            .map(|l| {
                let step = l.split_whitespace().nth(1).expect("step number").parse().expect("step number");
                (step, field(l, "sum").parse().expect("sum"), field(l, "size").parse().expect("size"))
            })
            .collect();
        let before: Vec<_> = steps.iter().filter(|s| s.0 < 3).collect();
        let after: Vec<_> = steps.iter().filter(|s| s.0 >= 3).collect();
        assert_eq!(before.len(), 3, "{}", p.dump());
        assert!(before.iter().all(|s| s.1 == 111 && s.2 == 3), "before the exit: {before:?}\n{}", p.dump());
        assert!(after.len() >= 3, "{}", p.dump());
        assert!(after.iter().all(|s| s.1 == 101 && s.2 == 2), "after the exit: {after:?}\n{}", p.dump());
        if retry == "0" {
            // The failed attempt was reported, with the buffer restored (checked in C).
            assert!(p.lines(s).iter().any(|l| l.starts_with("attempt failed step=3")), "{}", p.dump());
        }
    }
}

#[test]
fn survivors_of_a_dead_peer_retry_inside_the_call() {
    dead_peer("3");
}

#[test]
fn survivors_of_a_dead_peer_retry_by_hand() {
    dead_peer("0");
}

#[test]
fn joiner_gets_the_shared_state() {
    let _serial = serial();
    let mut p = Procs::new();
    let addr = p.master();
    let members: Vec<usize> = ["1", "2"]
        .iter()
        .map(|w| p.spawn(&format!("member{w}"), harness(), &["state", &addr, SECRET, "2", w, "0"]))
        .collect();
    for &m in &members {
        p.wait_line(m, "sync ");
    }
    let joiner = p.spawn("joiner", harness(), &["state", &addr, SECRET, "2", "4", "1"]);
    let mut all = members.clone();
    all.push(joiner);
    p.expect_success(&all);

    let initial = p.wait_line(joiner, "initial ");
    let first = p.wait_line(joiner, "sync ");
    assert_eq!(field(&first, "size"), "3");
    assert_eq!(field(&first, "received"), "2", "the joiner fetched both tensors:\n{}", p.dump());
    assert_ne!(field(&first, "digest"), field(&initial, "digest"));
    let rev = field(&first, "rev");
    assert_ne!(rev, "0", "the joiner adopted the members' revision");
    for &m in &members {
        let same = p.lines(m).into_iter().find(|l| l.starts_with("sync ") && field(l, "rev") == rev);
        let same = same.unwrap_or_else(|| panic!("no member sync at rev {rev}:\n{}", p.dump()));
        assert_eq!(field(&same, "digest"), field(&first, "digest"), "{}", p.dump());
        assert_eq!(field(&same, "received"), "0");
    }
    let finals: Vec<String> = all.iter().map(|&w| p.wait_line(w, "final ")).collect();
    for f in &finals {
        assert_eq!(field(f, "digest"), field(&finals[0], "digest"), "{}", p.dump());
        assert_eq!(field(f, "rev"), field(&finals[0], "rev"));
    }
}

/// The README's "From C" example is `tests/c/readme_example.c`, compiles as written, and
/// runs alone (its own master, a group of one).
#[test]
fn readme_example_compiles_and_runs() {
    let _serial = serial();
    let source = common::ffi_dir().join("tests/c/readme_example.c");
    let example = std::fs::read_to_string(&source).expect("read readme_example.c");
    let readme = std::fs::read_to_string(common::ffi_dir().join("../README.md")).expect("read README.md");
    let section = readme.split("\n## From C\n").nth(1).expect("README has a '## From C' section");
    let block = section.split("```c\n").nth(1).and_then(|b| b.split("\n```").next()).expect("a ```c block");
    assert_eq!(format!("{block}\n"), example, "README's C example differs from {}", source.display());

    let exe = compile(&source, "readme_example");
    let mut p = Procs::new();
    let run = p.spawn("readme_example", &exe, &[]);
    let status = p.wait_exit(run);
    assert!(status.success(), "the example failed:\n{}", p.dump());
    assert!(p.lines(run).iter().any(|l| l.starts_with("step 2: 1 peer(s), mean grad[3] = 4")), "{}", p.dump());
}

/// The sparse collectives and all-to-all from C (`tests/c/sparse.c`): four peers check
/// the FSSDP example (spAG, spRS), all-to-all with equal and uneven counts (and a too
/// small output), and the sparse all-reduce below and above the dense crossover.
#[test]
fn sparse_collectives_from_c_are_exact() {
    let _serial = serial();
    peers_all_ok(&compile(&common::ffi_dir().join("tests/c/sparse.c"), "sparse"), "sparse", 4);
}

/// All-scan from C (`tests/c/scan.c`): four peers check built-in, linear-attention and
/// callback scans exactly, a failing callback, and the argument checks.
#[test]
fn scan_from_c_is_exact() {
    let _serial = serial();
    peers_all_ok(&compile(&common::ffi_dir().join("tests/c/scan.c"), "scan"), "scan", 4);
}
