"""Bad calls raise clear exceptions: TypeError for unsupported element types, ValueError
for non-contiguous, read-only or inconsistent arrays, MismatchError when peers disagree."""

import numpy as np
import pytest

import phalanx


@pytest.fixture
def solo(master):
    """A group of one peer, in this process: enough for checks made before any traffic."""
    comm = phalanx.Communicator.connect(master.addr, join_timeout_ms=30_000)
    yield comm
    comm.leave()


def test_exception_hierarchy():
    for cls in [
        phalanx.PeerLostError,
        phalanx.AbortedError,
        phalanx.MismatchError,
        phalanx.RemovedError,
        phalanx.JoinFailedError,
        phalanx.ProtocolError,
        phalanx.TransportError,
        phalanx.PhalanxRuntimeError,
        phalanx.DeviceError,
    ]:
        assert issubclass(cls, phalanx.PhalanxError)
        assert cls.__module__ == "phalanx"
    assert issubclass(phalanx.PhalanxError, Exception)


@pytest.mark.parametrize("dtype", [np.complex128, np.complex64, np.bool_, np.float128 if hasattr(np, "float128") else object])
def test_unsupported_dtype_is_type_error(solo, dtype):
    with pytest.raises(TypeError, match="element type"):
        solo.all_reduce(np.zeros(4, dtype=dtype))


def test_not_an_array_is_type_error(solo):
    with pytest.raises(TypeError, match="numpy array"):
        solo.all_reduce([1.0, 2.0])
    with pytest.raises(TypeError):
        solo.all_reduce(None)


def test_non_contiguous_is_value_error(solo):
    with pytest.raises(ValueError, match="C-contiguous"):
        solo.all_reduce(np.zeros(8, dtype=np.float32)[::2])
    with pytest.raises(ValueError, match="C-contiguous"):
        solo.all_reduce(np.zeros((3, 4), dtype=np.float32).T)
    with pytest.raises(ValueError, match="C-contiguous"):
        solo.all_reduce(np.zeros((3, 4), dtype=np.float32, order="F"))


def test_read_only_is_value_error(solo):
    x = np.zeros(4, dtype=np.float32)
    x.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        solo.all_reduce(x)
    with pytest.raises(ValueError, match="read-only"):
        solo.broadcast(bytes(4))
    # read-only is fine where phalanx only reads
    out = np.zeros(4, dtype=np.float32)
    solo.all_gather(x, out)


def test_bad_arguments_are_value_errors(solo):
    x = np.ones(6, dtype=np.float32)
    with pytest.raises(ValueError, match="op"):
        solo.all_reduce(x, op="xor")
    with pytest.raises(ValueError, match="root"):
        solo.broadcast(x, root=5)
    with pytest.raises(ValueError, match="share memory"):
        solo.all_gather(x, x)
    with pytest.raises(ValueError):
        solo.reduce_scatter(x, np.zeros(4, dtype=np.float32))  # 6 != 1 * 4
    with pytest.raises(TypeError, match="element type"):
        solo.reduce_scatter(x, np.zeros(6, dtype=np.float64))
    with pytest.raises(ValueError, match="strategy"):
        solo.sync_shared_state(phalanx.SharedState(), strategy="everyone")
    with pytest.raises(ValueError):
        phalanx.Communicator.connect("no port here")
    with pytest.raises(ValueError):
        phalanx.Communicator.connect("127.0.0.1:1", retry_attempts=0)
    assert np.all(x == 1)  # nothing touched the array


def test_after_leave_calls_raise(master):
    comm = phalanx.Communicator.connect(master.addr)
    comm.leave()
    comm.leave()  # idempotent
    with pytest.raises(phalanx.PhalanxError, match="left"):
        comm.all_reduce(np.ones(3))


def test_wrong_secret_cannot_join():
    with phalanx.Master(secret="right secret") as m:
        with pytest.raises(phalanx.JoinFailedError):
            phalanx.Communicator.connect(m.addr, secret="wrong secret", join_timeout_ms=20_000)


@pytest.mark.parametrize("case", ["size", "dtype", "op"])
def test_mismatched_calls_across_peers_raise_mismatch_error(master, spawn, case):
    peers = [spawn("mismatch.py", master.addr, case) for _ in range(2)]
    for p in peers:
        d = p.expect("done")
        assert d["outcome"] == "MismatchError", d  # on both peers, array unchanged
        assert d["after"] == 3, d  # the group goes on: a matching call works
    for p in peers:
        assert p.wait() == 0, p.diagnostics()
