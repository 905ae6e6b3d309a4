//! Sharding of expert parallelism from C: `tests/c/moe_shard.c` is compiled with the
//! system C compiler against the static library of this test build and run as one
//! process: the worked example's sharding (`phx_moe_plan_sharding`), backups
//! (`phx_moe_plan_backups`), the sharding after a loss (`phx_moe_after_loss`), and a
//! re-sharding's state move (`phx_moe_reshard_move`) on four peers on threads (a master
//! in the same process, QUIC on 127.0.0.1). The program is killed if it outlives the
//! limit. README's example of these compiles against the header.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

fn ffi_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn sharding_backups_and_resharding_from_c() {
    let exe = std::env::current_exe().expect("the test binary's path");
    let lib = exe.parent().expect("the test binary's directory").join("libphalanx_ffi.a");
    assert!(lib.exists(), "{} is missing: run the tests with `cargo test -p phalanx-ffi`", lib.display());
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("c-programs");
    std::fs::create_dir_all(&out_dir).expect("create the output directory");
    let program = out_dir.join("moe_shard");
    let out = Command::new("cc")
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O1", "-pthread", "-I"])
        .arg(ffi_dir().join("include"))
        .arg(ffi_dir().join("tests/c/moe_shard.c"))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&program)
        .output()
        .expect("run cc");
    assert!(out.status.success(), "cc failed:\n{}", String::from_utf8_lossy(&out.stderr));

    let out_path = out_dir.join("moe-shard-stdout.txt");
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
    assert!(stdout.starts_with("shard ok"), "{stdout}");
    let mut ranks: Vec<&str> = stdout.lines().filter_map(|l| l.strip_prefix("move ok rank=")).collect();
    ranks.sort_unstable();
    assert_eq!(ranks, ["0", "1", "2", "3"], "{stdout}");
    assert!(stdout.lines().any(|l| l == "all ok"), "{stdout}");
}

/// README's C example of sharding and re-sharding (the FSSDP section's block that calls
/// `phx_moe_reshard_move`) compiles as written against the header: its names, argument
/// counts and types stay true.
#[test]
fn readme_sharding_example_compiles() {
    let readme = std::fs::read_to_string(ffi_dir().join("../README.md")).expect("read README.md");
    let section = readme.split("\n## Expert parallelism (FSSDP)\n").nth(1).expect("an FSSDP section");
    let block = section
        .split("```c\n")
        .filter_map(|b| b.split("\n```").next())
        .find(|b| b.contains("phx_moe_reshard_move"))
        .expect("a ```c block with phx_moe_reshard_move");
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("c-programs");
    std::fs::create_dir_all(&out_dir).expect("create the output directory");
    let source = out_dir.join("readme_moe_shard.c");
    let program = format!(
        "#include \"peer_common.h\"\n\
         void readme(phx_comm *comm, float *params, float *momentum, const double *loads, size_t expert_len);\n\
         void readme(phx_comm *comm, float *params, float *momentum, const double *loads, size_t expert_len) {{\n\
         {block}\n}}\n"
    );
    std::fs::write(&source, program).expect("write the program");
    let out = Command::new("cc")
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-c", "-I"])
        .arg(ffi_dir().join("include"))
        .arg("-I")
        .arg(ffi_dir().join("tests/c"))
        .arg(&source)
        .arg("-o")
        .arg(out_dir.join("readme_moe_shard.o"))
        .output()
        .expect("run cc");
    assert!(out.status.success(), "cc failed on README's example:\n{}", String::from_utf8_lossy(&out.stderr));
}
