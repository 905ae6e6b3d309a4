//! Sharding of expert parallelism from C: `tests/c/moe_shard.c` is compiled with the
//! system C compiler against the static library of this test build and run as one
//! process: the worked example's sharding (`phx_moe_plan_sharding`), backups
//! (`phx_moe_plan_backups`), the sharding after a loss (`phx_moe_after_loss`), and a
//! re-sharding's state move (`phx_moe_reshard_move`) on four peers on threads (a master
//! in the same process, QUIC on 127.0.0.1). The program is killed if it outlives the
//! limit. README's example of these compiles against the header.

mod common;

use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn sharding_backups_and_resharding_from_c() {
    let stdout = common::compile_and_run("moe_shard", LIMIT);
    assert!(stdout.starts_with("shard ok"), "{stdout}");
    assert_eq!(common::sorted_after(&stdout, "move ok rank="), ["0", "1", "2", "3"], "{stdout}");
    assert!(stdout.lines().any(|l| l == "all ok"), "{stdout}");
}

/// README's C example of sharding and re-sharding (the FSSDP section's block that calls
/// `phx_moe_reshard_move`) compiles as written against the header: its names, argument
/// counts and types stay true.
#[test]
fn readme_sharding_example_compiles() {
    let readme = std::fs::read_to_string(common::ffi_dir().join("../README.md")).expect("read README.md");
    let section = readme.split("\n## Expert parallelism (FSSDP)\n").nth(1).expect("an FSSDP section");
    let block = section
        .split("```c\n")
        .filter_map(|b| b.split("\n```").next())
        .find(|b| b.contains("phx_moe_reshard_move"))
        .expect("a ```c block with phx_moe_reshard_move");
    let out_dir = common::out_dir("c-programs");
    let source = out_dir.join("readme_moe_shard.c");
    let program = format!(
        "#include \"peer_common.h\"\n\
         void readme(phx_comm *comm, float *params, float *momentum, const double *loads, size_t expert_len);\n\
         void readme(phx_comm *comm, float *params, float *momentum, const double *loads, size_t expert_len) {{\n\
         {block}\n}}\n"
    );
    std::fs::write(&source, program).expect("write the program");
    common::compile_only(&source, &out_dir, "readme_moe_shard.o");
}
