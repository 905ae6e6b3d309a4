//! `tests/c/pipeline.c` and README's example: the pipeline runner from C (`phx_pipeline_runner_*`,
//! `phx_pipeline_run`), compiled with the system C compiler against the static library
//! and run as one process (a master and four peers on threads, over QUIC on
//! 127.0.0.1): four schedules train an exact model bitwise equal to a serial run, the
//! argument errors, and a failing callback that every stage sees as an error. The
//! process is killed and reaped if it outlives the limit.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(90);

fn out_dir() -> PathBuf {
    common::out_dir("c-pipeline")
}

fn compile(source: &Path, name: &str) -> PathBuf {
    common::compile(source, &out_dir(), name)
}

/// Runs `exe` to its end (killed after [`LIMIT`]); its output.
fn run(exe: &Path) -> String {
    let out_path = out_dir().join(format!("{}.txt", exe.file_name().and_then(|n| n.to_str()).unwrap_or("out")));
    common::run_to_end(exe, &out_path, LIMIT)
}

#[test]
fn pipeline_runner_from_c() {
    let output = run(&compile(&common::ffi_dir().join("tests/c/pipeline.c"), "pipeline"));
    assert_eq!(common::sorted_after(&output, "pipeline ok rank="), ["0", "1", "2", "3"], "{output}");
    assert!(output.lines().any(|l| l == "all ok"), "{output}");
}

/// Around README's C example (`run_stage`): a master and two peers on threads; each
/// runs its stage and the forwards saw 0..3 plus one, then plus two.
/// A 2 × 2 grid from C: gradients all-reduced among the replicas, a committed step
/// and a NaN-skipped one on every rank (`tests/c/pipeline_grid.c`).
#[test]
fn pipeline_grid_from_c() {
    let output = run(&compile(&common::ffi_dir().join("tests/c/pipeline_grid.c"), "pipeline_grid"));
    assert_eq!(
        common::sorted_after(&output, "grid ok rank="),
        ["0 stage=0 replica=0", "1 stage=1 replica=0", "2 stage=0 replica=1", "3 stage=1 replica=1"],
        "{output}"
    );
    assert!(output.lines().any(|l| l == "all ok"), "{output}");
}

const README_MAIN: &str = r#"
static const char *SECRET = "phalanx-ffi-pipeline-readme-0123456789";
static char ADDR[PHX_ADDR_BUF_LEN];
static double SEEN[2][4];

static void *peer(void *arg) {
    phx_comm *comm = join_group(ADDR, SECRET, 2);
    size_t r = comm_rank(comm);
    (void)arg;
    EXPECT(run_stage(comm, r, SEEN[r]) == PHX_OK);
    CHECK(phx_comm_leave(comm));
    return 0;
}

int main(void) {
    int mb;
    run_peer_threads(SECRET, ADDR, 2, peer);
    for (mb = 0; mb < 4; mb++) EXPECT(SEEN[0][mb] == mb + 1 && SEEN[1][mb] == mb + 2);
    printf("readme ok\n");
    return 0;
}
"#;

/// The `nth` (from 1) ```c block of README's "Running a schedule" section, after
/// `peer_common.h` and before `main`, compiled as `name` and run; its output.
fn run_readme_block(nth: usize, main: &str, name: &str) -> String {
    let readme = std::fs::read_to_string(common::ffi_dir().join("../README.md")).expect("read README.md");
    let section = readme.split("\n### Running a schedule\n").nth(1).expect("a 'Running a schedule' section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let block = section.split("```c\n").nth(nth).and_then(|b| b.split("\n```").next());
    let block = block.unwrap_or_else(|| panic!("a ```c block number {nth}"));
    let source = out_dir().join(format!("{name}.c"));
    std::fs::write(&source, format!("#include \"peer_common.h\"\n{block}\n{main}")).expect("write the program");
    run(&compile(&source, name))
}

/// README's "Running a schedule" C example compiles as written and runs in a group of two.
#[test]
fn readme_c_example_runs() {
    let output = run_readme_block(1, README_MAIN, "readme");
    assert!(output.lines().any(|l| l == "readme ok"), "{output}");
}

const README_GRID_MAIN: &str = r#"
static const char *SECRET = "phalanx-ffi-pipeline-readme-grid-012345";
static char ADDR[PHX_ADDR_BUF_LEN];
static double W[4];

static void *peer(void *arg) {
    phx_comm *comm = join_group(ADDR, SECRET, 4);
    size_t r = comm_rank(comm);
    (void)arg;
    EXPECT(train_grid(comm, r, &W[r]) == PHX_OK);
    CHECK(phx_comm_leave(comm));
    return 0;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    run_peer_threads(SECRET, ADDR, 4, peer);
    /* The replicas agree, and every stage trained (its weight moved). */
    EXPECT(W[0] == W[2] && W[1] == W[3] && W[0] != 1.0 && W[1] != 1.0);
    printf("readme grid ok\n");
    return 0;
}
"#;

/// README's "Running a schedule" second C example (the grid) compiles as written and
/// runs on a 2 × 2 grid of four peers.
#[test]
fn readme_c_grid_example_runs() {
    let output = run_readme_block(2, README_GRID_MAIN, "readme_grid");
    assert!(output.lines().any(|l| l == "readme grid ok"), "{output}");
}
