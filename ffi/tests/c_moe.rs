//! Expert parallelism from C: `tests/c/moe.c` is compiled with the system C compiler
//! against the static library of this test build and run as one process: the worked
//! example's placement as the sparse collectives' `holds` matrix, the simulator's
//! figures against the targets, and the layer (`phx_moe_layer`) on four peers
//! on threads (a master in the same process, QUIC on 127.0.0.1) through materialize,
//! dispatch, combine and reduce_gradients, blocking and started (`phx_moe_step`, the
//! dispatch and combine requests), re-materialisation, the link counters
//! (`phx_comm_traffic`) and a device lost before a started step. The program is killed
//! if it outlives the limit.

mod common;

use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(90);

#[test]
fn placement_simulator_and_layer_from_c() {
    let stdout = common::compile_and_run("moe", LIMIT);
    assert!(stdout.starts_with("moe ok"), "{stdout}");
    assert_eq!(common::sorted_after(&stdout, "layer ok rank="), ["0", "1", "2", "3"], "{stdout}");
    assert!(stdout.lines().any(|l| l == "all ok"), "{stdout}");
}
