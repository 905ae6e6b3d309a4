//! The quantized all-reduce from C: `tests/c/quantized.c` is compiled with the system C
//! compiler against the static library of this test build and run as a master and three
//! peer processes on 127.0.0.1. Each peer checks its error bound itself; this test checks
//! that every peer ended with the same bytes (hash) per call, and that 16-bit codes are
//! far more accurate than 8-bit ones. Every wait is bounded; children are killed and
//! reaped when the test ends.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);
const SECRET: &str = "phalanx-ffi-quantized-secret-0123456789";

fn compile() -> PathBuf {
    common::compile(&common::ffi_dir().join("tests/c/quantized.c"), &common::out_dir("c-programs"), "quantized")
}

/// Children killed and reaped on drop, whatever happens.
struct Kids(Vec<Child>);

impl Drop for Kids {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Spawns `exe args` and forwards its stdout lines, tagged with `tag`, to `tx`.
fn spawn(kids: &mut Kids, exe: &Path, args: &[&str], tag: usize, tx: &mpsc::Sender<(usize, String)>) {
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let out = child.stdout.take().expect("stdout");
    let tx = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send((tag, line));
        }
    });
    kids.0.push(child);
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}=");
    line.split_whitespace().find_map(|w| w.strip_prefix(prefix.as_str())).unwrap_or_else(|| panic!("{key} in {line}"))
}

#[test]
fn quantized_all_reduce_from_c_is_identical_everywhere() {
    let exe = compile();
    let (tx, rx) = mpsc::channel();
    let mut kids = Kids(Vec::new());
    let deadline = Instant::now() + LIMIT;
    let next = |rx: &mpsc::Receiver<(usize, String)>| {
        let left = deadline.saturating_duration_since(Instant::now());
        rx.recv_timeout(left).unwrap_or_else(|e| panic!("no output in time: {e}"))
    };
    spawn(&mut kids, &exe, &["master", SECRET], 0, &tx);
    let addr = loop {
        let (_, line) = next(&rx);
        if let Some(a) = line.strip_prefix("addr ") {
            break a.to_string();
        }
    };
    let n = 3;
    for p in 1..=n {
        spawn(&mut kids, &exe, &["peer", &addr, SECRET, &n.to_string()], p, &tx);
    }
    let mut calls: Vec<(String, String, f64)> = Vec::new(); // (bits/op, hash, err)
    let mut done = 0;
    while done < n {
        let (tag, line) = next(&rx);
        assert!(!line.starts_with("FAIL"), "peer {tag}: {line}");
        if line.starts_with("quantized ") {
            let key = format!("{}/{}", field(&line, "bits"), field(&line, "op"));
            calls.push((key, field(&line, "hash").to_string(), field(&line, "err").parse().expect("err")));
        } else if line.starts_with("done ") {
            done += 1;
        }
    }
    for p in 1..=n {
        let status = common::wait_until(&mut kids.0[p], Instant::now() + Duration::from_secs(30));
        let status = status.unwrap_or_else(|| panic!("peer {p} did not exit"));
        assert!(status.success(), "peer {p} exited with {status}");
    }
    assert_eq!(calls.len(), 3 * n, "{calls:?}");
    for key in ["8/sum", "16/sum", "8/avg"] {
        let hashes: Vec<&str> = calls.iter().filter(|c| c.0 == key).map(|c| c.1.as_str()).collect();
        assert_eq!(hashes.len(), n, "{key}");
        assert!(hashes.iter().all(|h| *h == hashes[0]), "{key}: hashes differ {hashes:?}");
    }
    let err = |key: &str| calls.iter().find(|c| c.0 == key).map(|c| c.2).expect("a call");
    assert!(err("16/sum") * 50.0 < err("8/sum"), "u16 {} vs u8 {}", err("16/sum"), err("8/sum"));
}
