//! Error kinds as a caller meets them: a misuse that is not an argument's fault is
//! `ErrorKind::Runtime`, and it is not worth retrying.

use phalanx::{Communicator, ErrorKind, ReduceOp};

#[test]
fn a_blocking_collective_inside_an_async_runtime_is_a_runtime_error() {
    let mut comms = Communicator::local_group(1, Default::default()).expect("a group of one");
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
    let mut x = [1.0f32, 2.0];
    let err = rt.block_on(async { comms[0].all_reduce(&mut x, ReduceOp::Sum) }).expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::Runtime, "{err}");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("inside an async runtime"), "{err}");
    assert_eq!(x, [1.0, 2.0]);
    // From a plain thread the same call runs.
    comms[0].all_reduce(&mut x, ReduceOp::Sum).expect("outside a runtime");
}
