//! Expert parallelism from C: `tests/c/moe.c` is compiled with the system C compiler
//! against the static library of this test build and run (one process, no group): the
//! worked example's placement as the sparse collectives' `holds` matrix, and the
//! simulator's figures against the targets.

use std::path::Path;
use std::process::Command;

fn ffi_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn placement_and_simulator_from_c() {
    let exe = std::env::current_exe().expect("the test binary's path");
    let lib = exe.parent().expect("the test binary's directory").join("libphalanx_ffi.a");
    assert!(lib.exists(), "{} is missing: run the tests with `cargo test -p phalanx-ffi`", lib.display());
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("c-programs");
    std::fs::create_dir_all(&out_dir).expect("create the output directory");
    let program = out_dir.join("moe");
    let out = Command::new("cc")
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O1", "-I"])
        .arg(ffi_dir().join("include"))
        .arg(ffi_dir().join("tests/c/moe.c"))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&program)
        .output()
        .expect("run cc");
    assert!(out.status.success(), "cc failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let run = Command::new(&program).output().expect("run the C program");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success() && stdout.starts_with("moe ok"), "{stdout}{}", String::from_utf8_lossy(&run.stderr));
}
