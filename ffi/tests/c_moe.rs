//! Expert parallelism from C: `tests/c/moe.c` is compiled with the system C compiler
//! against the static library of this test build and run as one process: the worked
//! example's placement as the sparse collectives' `holds` matrix, the simulator's
//! figures against the targets, and the layer (`phx_moe_layer`) on four peers
//! on threads (a master in the same process, QUIC on 127.0.0.1) through materialize,
//! dispatch, combine and reduce_gradients, blocking and started (`phx_moe_step`, the
//! dispatch and combine requests), re-materialisation, the link counters
//! (`phx_comm_traffic`) and a device lost before a started step. The program is killed
//! if it outlives the limit.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(90);

fn ffi_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn placement_simulator_and_layer_from_c() {
    let exe = std::env::current_exe().expect("the test binary's path");
    let lib = exe.parent().expect("the test binary's directory").join("libphalanx_ffi.a");
    assert!(lib.exists(), "{} is missing: run the tests with `cargo test -p phalanx-ffi`", lib.display());
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("c-programs");
    std::fs::create_dir_all(&out_dir).expect("create the output directory");
    let program = out_dir.join("moe");
    let out = Command::new("cc")
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O1", "-pthread", "-I"])
        .arg(ffi_dir().join("include"))
        .arg(ffi_dir().join("tests/c/moe.c"))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&program)
        .output()
        .expect("run cc");
    assert!(out.status.success(), "cc failed:\n{}", String::from_utf8_lossy(&out.stderr));

    let out_path = out_dir.join("moe-stdout.txt");
    let mut child = Command::new(&program)
        .stdout(std::fs::File::create(&out_path).expect("create the output file"))
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("run the C program");
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
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("the program hung; killed after {LIMIT:?}:\n{stdout}"));
    assert!(status.success(), "the program failed ({status}):\n{stdout}");
    assert!(stdout.starts_with("moe ok"), "{stdout}");
    let mut ranks: Vec<&str> = stdout.lines().filter_map(|l| l.strip_prefix("layer ok rank=")).collect();
    ranks.sort_unstable();
    assert_eq!(ranks, ["0", "1", "2", "3"], "{stdout}");
    assert!(stdout.lines().any(|l| l == "all ok"), "{stdout}");
}
