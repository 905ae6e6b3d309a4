"""Expert parallelism (FSSDP) from Python: the reference's worked example placed by
`phalanx.moe_place` and run through the sparse collectives on four peers of one group
(threads of this process), and the simulator's figures against the issue's targets."""

import threading
import time

import numpy as np
import pytest

import phalanx
from conftest import on_all

N = 4
LOADS = [40, 5, 10, 5, 20, 5, 10, 5]
OWNERS = [e // 2 for e in range(8)]


def test_the_worked_example_placement():
    holders = phalanx.moe_place(OWNERS, LOADS, overlap=2, slots=2)
    assert holders[0] == holders[4] == [0, 1, 2, 3]
    assert all(holders[e] == [OWNERS[e]] for e in (1, 2, 3, 5, 6, 7))
    assert sum(len(h) - 1 for h in holders) == 6  # expert transfers
    with pytest.raises(ValueError, match="device 4"):
        phalanx.moe_place([0, 0, 1, 1, 2, 2, 3, 4], LOADS, 2, 2, devices=4)
    # Knowing the hosts: with one slot for four equally loaded experts, each replica
    # goes to the other host.
    spread = phalanx.moe_place([0, 1, 2, 3], [10] * 4, 4, 1, hosts=[0, 0, 1, 1])
    assert spread[0] == [0, 2]
    with pytest.raises(ValueError, match="finite"):
        phalanx.moe_place(OWNERS, [-1.0] + LOADS[1:], 2, 2)


def test_the_simulator_meets_the_targets():
    r = phalanx.moe_simulate(devices=8, experts=32, zipf=1.2)
    assert r["straggler_ratio"] <= 0.6 and r["traffic_ratio"] <= 0.5
    assert r["fsdp"]["straggler"] == 4096
    assert r["fsdp"]["param_bytes"] == 2 * 32 * 7 * (16 << 20)
    assert r["straggler_ratio"] == pytest.approx(r["fssdp"]["straggler"] / r["ep"]["straggler"])
    assert sum(r["ep"]["compute"]) == pytest.approx(8 * 4096)
    with pytest.raises(ValueError, match="Zipf exponent"):
        phalanx.moe_simulate(zipf=-1.0)


@pytest.fixture
def group(master):
    """N communicators of one group, indexed by rank."""
    comms = [phalanx.Communicator.connect(master.addr, join_timeout_ms=30_000)]
    for _ in range(N - 1):
        box = {}
        t = threading.Thread(
            target=lambda: box.setdefault("c", phalanx.Communicator.connect(master.addr, join_timeout_ms=30_000)),
            daemon=True,
        )
        t.start()
        deadline = time.monotonic() + 30
        while comms[0].peers_pending == 0:
            assert time.monotonic() < deadline, "the joiner never showed up"
            time.sleep(0.01)
        on_all(comms, lambda c: c.update_topology())
        t.join(timeout=60)
        new = box["c"]
        new.update_topology()  # the members' round counts as its own: returns at once
        comms.append(new)
    comms.sort(key=lambda c: c.rank)
    assert [c.rank for c in comms] == list(range(N))
    yield comms
    for c in comms:
        c.leave()


def test_the_worked_example_through_the_sparse_collectives(group):
    holders = phalanx.moe_place(OWNERS, LOADS, overlap=2, slots=2)
    lens = [2] * 8

    def run(c):
        d = c.rank
        params = np.full(16, np.nan, dtype=np.float32)
        for e in range(8):
            if OWNERS[e] == d:
                params[2 * e : 2 * e + 2] = [10 * e + 1, 10 * e + 2]
        c.sparse_all_gather(params, lens, OWNERS, holders)
        grads = np.full(16, 0.5, dtype=np.float32)
        grads[0:2] = [d + 1, d + 1]
        grads[8:10] = [5 * (d + 1), d + 1]
        c.sparse_reduce_scatter(grads, lens, OWNERS, holders)
        return params, grads

    out = on_all(group, run)
    for d, (params, grads) in enumerate(out):
        for e in range(8):
            if d in holders[e]:
                assert params[2 * e : 2 * e + 2].tolist() == [10 * e + 1, 10 * e + 2]
    assert out[0][1][0:2].tolist() == [10, 10]
    assert out[2][1][8:10].tolist() == [50, 10]
