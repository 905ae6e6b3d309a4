//! `tests/c/pipeline.c`: the pipeline runner from C (`phx_pipeline_runner_*`,
//! `phx_pipeline_run`), compiled with the system C compiler against the static library
//! and run as one process (a master and four peers on threads, over QUIC on
//! 127.0.0.1): four schedules train an exact model bitwise equal to a serial run, the
//! argument errors, and a failing callback that every stage sees as an error. The
//! process is killed and reaped if it outlives the limit.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(90);

fn ffi_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn static_lib() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let lib = exe.parent().expect("the test binary's directory").join("libphalanx_ffi.a");
    assert!(lib.exists(), "{} is missing: run the tests with `cargo test -p phalanx-ffi`", lib.display());
    lib
}

fn out_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("c-pipeline");
    std::fs::create_dir_all(&dir).expect("create the output directory");
    dir
}

fn compile() -> PathBuf {
    let source = ffi_dir().join("tests/c/pipeline.c");
    let exe = out_dir().join("pipeline");
    let cc = Command::new("cc")
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O1", "-pthread", "-I"])
        .arg(ffi_dir().join("include"))
        .arg(&source)
        .arg(static_lib())
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&exe)
        .output()
        .expect("run cc");
    assert!(
        cc.status.success(),
        "cc failed:\n{}{}",
        String::from_utf8_lossy(&cc.stdout),
        String::from_utf8_lossy(&cc.stderr)
    );
    exe
}

#[test]
fn pipeline_runner_from_c() {
    let out_path = out_dir().join("stdout.txt");
    let mut child = Command::new(compile())
        .stdout(std::fs::File::create(&out_path).expect("create the output file"))
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("run the program");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("the program hung; killed after {LIMIT:?}:\n{output}"));
    assert!(status.success(), "the program failed ({status}):\n{output}");
    let mut ranks: Vec<&str> = output.lines().filter_map(|l| l.strip_prefix("pipeline ok rank=")).collect();
    ranks.sort_unstable();
    assert_eq!(ranks, ["0", "1", "2", "3"], "{output}");
    assert!(output.lines().any(|l| l == "all ok"), "{output}");
}
