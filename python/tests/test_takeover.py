"""A lost master is not the end of the group: a master restarted on the same address
(as a standby) takes the group over from the peers' own state, and the peers go on."""

import time

import numpy as np
import pytest

import phalanx


def test_a_restarted_master_takes_the_group_over():
    first = phalanx.Master("127.0.0.1:0", peer_timeout_ms=750)
    addr = first.addr
    comm = phalanx.Communicator.connect(addr, rejoin_ms=20_000, join_timeout_ms=20_000)
    x = np.ones(16, dtype=np.float32)
    comm.all_reduce(x)
    epoch = comm.epoch
    first.close()
    # The peer hears at once (its liveness connection closes); give it a moment.
    time.sleep(1.0)
    # Calls made while no master is there fail retryably; none changes the array.
    with pytest.raises(phalanx.AbortedError):
        comm.all_reduce(x)
    assert np.all(x == 1)
    restarted = phalanx.Master(addr, peer_timeout_ms=750, standby=True)
    try:
        comm.update_topology()  # waits for the rejoin and the takeover
        assert comm.epoch > epoch
        comm.all_reduce(x)
        assert np.all(x == 1)
    finally:
        comm.leave()
        restarted.close()


def test_standby_masters_must_be_addresses():
    with pytest.raises(ValueError, match="standby_masters"):
        phalanx.Communicator.connect("127.0.0.1:1", standby_masters=["nowhere"])
