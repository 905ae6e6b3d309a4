//! Sub-group collectives, tagged point-to-point and the NoLoCo pairing for Python (the
//! `Communicator` methods in `communicator.rs` delegate here).

use pyo3::prelude::*;

use crate::args::parse_op;
use crate::array;
use crate::communicator::Communicator;

pub(crate) fn sub_all_reduce(
    comm: &Communicator,
    py: Python<'_>,
    array: &Bound<'_, PyAny>,
    members: Vec<usize>,
    op: &str,
) -> PyResult<()> {
    let op = parse_op(op)?;
    let a = array::array(array, "array", true)?;
    let (raw, dtype) = (a.raw(), a.dtype);
    // SAFETY: `a` keeps the memory alive until after the call; nothing else holds a
    // slice of it.
    comm.with(py, move |c| c.sub_all_reduce_raw(&members, unsafe { raw.as_mut_slice() }, dtype, op))?;
    drop(a);
    Ok(())
}

pub(crate) fn send(comm: &Communicator, py: Python<'_>, to: usize, tag: u32, array: &Bound<'_, PyAny>) -> PyResult<()> {
    let a = array::array(array, "array", false)?;
    let (raw, dtype) = (a.raw(), a.dtype);
    // SAFETY: `a` keeps the memory alive until after the call.
    comm.with(py, move |c| c.send_raw(to, tag, unsafe { raw.as_slice() }, dtype))?;
    drop(a);
    Ok(())
}

pub(crate) fn recv(
    comm: &Communicator,
    py: Python<'_>,
    from: usize,
    tag: u32,
    array: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let a = array::array(array, "array", true)?;
    let (raw, dtype) = (a.raw(), a.dtype);
    // SAFETY: as in `sub_all_reduce`.
    comm.with(py, move |c| c.recv_raw(from, tag, unsafe { raw.as_mut_slice() }, dtype))?;
    drop(a);
    Ok(())
}

pub(crate) fn noloco_partner(seed: u64, step: u64, n: usize, rank: usize) -> Option<usize> {
    phalanx::Communicator::noloco_partner(seed, step, n, rank)
}

pub(crate) fn noloco_pairs(seed: u64, step: u64, n: usize) -> Vec<(usize, usize)> {
    phalanx::Communicator::noloco_pairs(seed, step, n)
}
