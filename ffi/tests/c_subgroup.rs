//! `tests/c/subgroup.c`: sub-group collectives, the NoLoCo pairing and tagged
//! point-to-point from C, compiled with the system C compiler against the static library
//! and run over QUIC on 127.0.0.1: once as one process (a master and four peers on
//! threads), once as five processes of which one dies during a sub-group all-reduce.
//! Every process is killed and reaped if it outlives the limit or the test fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(90);

fn out_dir() -> PathBuf {
    common::out_dir("c-subgroup")
}

/// Compiles `tests/c/subgroup.c` once per test binary run.
fn program() -> &'static Path {
    static EXE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    EXE.get_or_init(|| common::compile(&common::ffi_dir().join("tests/c/subgroup.c"), &out_dir(), "subgroup"))
}

#[test]
fn sub_groups_and_point_to_point_from_c() {
    let output = common::run_to_end(program(), &out_dir().join("stdout.txt"), LIMIT);
    assert_eq!(common::sorted_after(&output, "subgroup ok rank="), ["0", "1", "2", "3"], "{output}");
    assert!(output.lines().any(|l| l == "all ok"), "{output}");
}

/// Child processes, killed and reaped on drop; stdout goes to files.
struct Procs(Vec<(std::process::Child, PathBuf)>);

impl Drop for Procs {
    fn drop(&mut self) {
        for (child, _) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Procs {
    fn spawn(&mut self, name: &str, args: &[&str]) -> usize {
        let path = out_dir().join(format!("{name}.txt"));
        let child = Command::new(program())
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::fs::File::create(&path).expect("create the output file"))
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("run the program");
        self.0.push((child, path));
        self.0.len() - 1
    }

    fn output(&self, i: usize) -> String {
        std::fs::read_to_string(&self.0[i].1).unwrap_or_default()
    }

    fn dump(&self) -> String {
        (0..self.0.len()).map(|i| format!("--- process {i}\n{}", self.output(i))).collect()
    }

    fn wait_exit(&mut self, i: usize, start: Instant) -> std::process::ExitStatus {
        let status = common::wait_until(&mut self.0[i].0, start + LIMIT);
        status.unwrap_or_else(|| panic!("process {i} hung:\n{}", self.dump()))
    }
}

/// Four peer processes; the one that gets rank 3 dies while ranks 0 and 1 wait for it
/// in a sub-group all-reduce, and rank 2 (no member) calls update_topology meanwhile.
/// Ranks 0 and 1 get PEER_LOST or ABORTED with their buffers restored, then all three
/// survivors all-reduce exactly, in the sub-group (0, 1) and in the whole group.
#[test]
fn a_peer_process_dies_during_a_sub_group_all_reduce() {
    let start = Instant::now();
    let mut p = Procs(Vec::new());
    let master = p.spawn("master", &["master"]);
    let addr = loop {
        if let Some(a) = p.output(master).lines().find_map(|l| l.strip_prefix("addr ")) {
            break a.to_string();
        }
        assert!(start.elapsed() < LIMIT, "no master address:\n{}", p.dump());
        std::thread::sleep(Duration::from_millis(20));
    };
    let peers: Vec<usize> = (0..4).map(|i| p.spawn(&format!("peer{i}"), &["peer", &addr])).collect();
    let mut victims = 0;
    let mut survivors = Vec::new();
    for &i in &peers {
        let status = p.wait_exit(i, start);
        match status.code() {
            Some(42) => victims += 1,
            Some(0) => survivors.push(p.output(i)),
            _ => panic!("peer process {i} failed ({status}):\n{}", p.dump()),
        }
    }
    assert_eq!(victims, 1, "{}", p.dump());
    let mut ranks: Vec<String> = survivors
        .iter()
        .flat_map(|o| o.lines().filter_map(|l| l.strip_prefix("survivor ok rank=")).map(str::to_string))
        .collect();
    ranks.sort();
    assert_eq!(ranks, ["0 size=3", "1 size=3", "2 size=3"], "{}", p.dump());
    let lost = survivors.iter().filter(|o| o.lines().any(|l| l.starts_with("lost status="))).count();
    assert_eq!(lost, 2, "both waiting members saw the loss:\n{}", p.dump());
}
