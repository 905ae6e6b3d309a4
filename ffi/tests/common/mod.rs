//! What the C harnesses (`tests/c_*.rs`) share: where the crate, its static library and
//! the output folders are; compiling a C program under `tests/c/` against the library;
//! running one to its end with a time limit, killed and reaped if it outlives it.
//!
//! Each test binary uses its own part of this module, hence `dead_code` allowed here.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The `ffi` crate's folder.
pub fn ffi_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The static library cargo built for this test run: integration tests live in
/// `target/<profile>/deps`, next to the library's artifacts.
pub fn static_lib() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let lib = exe.parent().expect("the test binary's directory").join("libphalanx_ffi.a");
    assert!(lib.exists(), "{} is missing: run the tests with `cargo test -p phalanx-ffi`", lib.display());
    lib
}

/// `name` under the tests' scratch folder, created.
pub fn out_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).expect("create the output directory");
    dir
}

/// The flags every C program is compiled with: C99, warnings as errors, and the C API's
/// header and `tests/c/peer_common.h` on the include path.
fn cc() -> Command {
    let mut cc = Command::new("cc");
    cc.args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-I"])
        .arg(ffi_dir().join("include"))
        .arg("-I")
        .arg(ffi_dir().join("tests/c"));
    cc
}

/// Runs `cc`; panics with its output if it fails on `source`.
#[track_caller]
fn expect_success(mut cc: Command, source: &Path) {
    let out = cc.output().expect("run cc");
    assert!(
        out.status.success(),
        "cc failed on {}:\n{}{}",
        source.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Compiles `source` and links it with the static library into `dir/name`; its path.
#[track_caller]
pub fn compile(source: &Path, dir: &Path, name: &str) -> PathBuf {
    let exe = dir.join(name);
    let mut cc = cc();
    cc.args(["-O1", "-pthread"]).arg(source).arg(static_lib()).args(["-lpthread", "-ldl", "-lm", "-o"]).arg(&exe);
    expect_success(cc, source);
    exe
}

/// Compiles `source` to an object file `dir/name` only (no link): it compiles as written
/// against the header.
#[track_caller]
pub fn compile_only(source: &Path, dir: &Path, name: &str) {
    let mut cc = cc();
    cc.arg("-c").arg(source).arg("-o").arg(dir.join(name));
    expect_success(cc, source);
}

/// Waits for `child` to exit until `deadline`; `None` if it is still running then.
pub fn wait_until(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `exe` to its end, its stdout into `out_path` (killed and reaped after `limit`);
/// panics unless it exits with status 0; its output.
#[track_caller]
pub fn run_to_end(exe: &Path, out_path: &Path, limit: Duration) -> String {
    let mut child = Command::new(exe)
        .stdout(std::fs::File::create(out_path).expect("create the output file"))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run the C program");
    let status = wait_until(&mut child, Instant::now() + limit);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let output = std::fs::read_to_string(out_path).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("the program hung; killed after {limit:?}:\n{output}"));
    assert!(status.success(), "the program failed ({status}):\n{output}");
    output
}

/// Compiles `tests/c/{name}.c` into the `c-programs` scratch folder and runs it to its
/// end, its stdout into `{name}-stdout.txt` there (see [`run_to_end`]); its output.
#[track_caller]
pub fn compile_and_run(name: &str, limit: Duration) -> String {
    let dir = out_dir("c-programs");
    let program = compile(&ffi_dir().join(format!("tests/c/{name}.c")), &dir, name);
    run_to_end(&program, &dir.join(format!("{name}-stdout.txt")), limit)
}

/// The sorted values of the lines of `output` that start with `prefix` (e.g. the ranks of
/// "... ok rank=R").
pub fn sorted_after<'a>(output: &'a str, prefix: &str) -> Vec<&'a str> {
    let mut values: Vec<&str> = output.lines().filter_map(|l| l.strip_prefix(prefix)).collect();
    values.sort_unstable();
    values
}
