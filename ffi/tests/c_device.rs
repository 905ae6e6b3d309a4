//! Device communicators from C: `tests/c/device.c` is compiled with the system C
//! compiler against the static library of this test build and run as one process:
//! three peers on threads (a master in the same process, QUIC on 127.0.0.1) run every
//! device collective on the CPU stand-in (`phx_device_comm`: all-reduce, reduce-scatter,
//! all-gather, broadcast, reduce, grouped send/recv, all-to-all) with exact values, are
//! refused bad roots, peers, dtypes and NULLs with the communicator kept, and all-reduce
//! and all-to-all again after a peer leaves;
//! NCCL asked for with `PHALANX_NCCL_LIBRARY` at a missing file is `PHX_ERR_DEVICE`
//! naming the path (built with the `nccl` feature) or the feature (built without).
//! The program is killed if it outlives the limit.

mod common;

use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn stand_in_collectives_and_a_missing_nccl_from_c() {
    let stdout = common::compile_and_run("device", LIMIT);
    assert_eq!(common::sorted_after(&stdout, "device ok rank="), ["0", "1", "2"], "{stdout}");
    let nccl = stdout.lines().find_map(|l| l.strip_prefix("nccl error: ")).unwrap_or_else(|| panic!("{stdout}"));
    if cfg!(feature = "nccl") {
        assert!(nccl.contains("/nonexistent/phalanx-test/libnccl.so.2"), "{nccl}");
    } else {
        assert!(nccl.contains("`nccl` feature"), "{nccl}");
    }
    assert!(stdout.lines().any(|l| l == "all ok"), "{stdout}");
}
