"""Device communicators from Python: `phalanx.DeviceCommunicator` on the CPU stand-in
over three peers of one group (threads of this process), its unique id carried by the
master: exact sums, then a peer leaves and the survivors' next view has its own device
communicator; refused arrays leave the array unchanged; asking for NCCL where none can be
loaded raises DeviceError (the path tried, or the missing build feature), never a crash."""


import numpy as np
import pytest

import phalanx
from conftest import on_all

N = 3


@pytest.fixture
def group(make_group):
    """N communicators of one group, indexed by rank."""
    return make_group(N, left_ok=True)


def test_stand_in_sums_are_exact_before_and_after_a_leave(group):
    devs = [phalanx.DeviceCommunicator(c, backend="standin") for c in group]
    assert devs[0].backend == "standin"

    def reduce(pair):
        c, d = pair
        x = np.full(32, c.rank + 1, dtype=np.float32)
        d.all_reduce(x)
        y = np.full(5, c.rank + 1, dtype=np.float32)
        d.all_reduce(y, op="max")
        return x, y

    for x, y in on_all(list(zip(group, devs)), reduce):
        assert x.tolist() == [6.0] * 32
        assert y.tolist() == [3.0] * 5

    # Refused before anything is sent: the array is unchanged.
    wide = np.full(4, 1.5)
    with pytest.raises(TypeError, match="float32"):
        devs[0].all_reduce(wide)
    assert wide.tolist() == [1.5] * 4
    with pytest.raises(ValueError, match="read-only"):
        ro = np.ones(4, dtype=np.float32)
        ro.setflags(write=False)
        devs[0].all_reduce(ro)

    # Rank 2 leaves; the survivors' next view gets its own device communicator.
    group[2].leave()
    survivors = list(zip(group[:2], devs[:2]))

    def after(pair):
        c, d = pair
        c.update_topology()
        x = np.full(8, c.rank + 1, dtype=np.float32)
        d.all_reduce(x)
        return c.size, x

    for size, x in on_all(survivors, after):
        assert size == 2
        assert x.tolist() == [3.0] * 8


def test_a_missing_nccl_is_a_device_error(master, monkeypatch):
    comm = phalanx.Communicator.connect(master.addr, join_timeout_ms=30_000)
    try:
        monkeypatch.setenv("PHALANX_NCCL_LIBRARY", "/nonexistent/phalanx-test/libnccl.so.2")
        with pytest.raises(phalanx.DeviceError, match=r"/nonexistent/phalanx-test/libnccl\.so\.2|`nccl` feature"):
            phalanx.DeviceCommunicator(comm, backend="nccl")
        with pytest.raises(ValueError, match="unknown device backend"):
            phalanx.DeviceCommunicator(comm, backend="tpu")
    finally:
        comm.leave()
