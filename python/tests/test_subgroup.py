"""Sub-group all-reduce, tagged point-to-point and the NoLoCo pairing from Python: four
communicators of one group in this process, on threads (the GIL is released while each
waits)."""

import threading

import numpy as np
import pytest

import phalanx
from conftest import on_all


def run_all(comms, f, timeout=60):
    """Runs f(rank, comm) on one thread per communicator; returns results by rank."""
    return on_all(list(enumerate(comms)), lambda rc: f(*rc), timeout)


def test_pairs_all_reduce_at_once_and_a_non_member_is_not_blocked(four):
    trio_done = threading.Event()

    def step(r, c):
        pair = [0, 1] if r < 2 else [2, 3]
        x = np.arange(1000, dtype=np.float64) + 1000 * (r + 1)
        c.sub_all_reduce(x, pair, op="sum")
        y = np.full(500, r + 1, dtype=np.int32)
        if r == 3:
            assert trio_done.wait(30), "(0, 1, 2) finished without rank 3"
        else:
            c.sub_all_reduce(y, [2, 1, 0])
            trio_done.set()
        z = np.full(10, 10**r, dtype=np.int64)
        c.all_reduce(z)
        return x, y, z

    out = run_all(four, step)
    for r, (x, y, z) in enumerate(out):
        a, b = (0, 1) if r < 2 else (2, 3)
        np.testing.assert_array_equal(x, 2 * np.arange(1000) + 1000 * (a + 1) + 1000 * (b + 1))
        assert (y == (4 if r == 3 else 6)).all()
        assert (z == 1111).all()


def test_noloco_averaging_step(four):
    pairs = phalanx.Communicator.noloco_pairs(5, 2, 4)
    assert sorted(a for p in pairs for a in p) == [0, 1, 2, 3]

    def step(r, c):
        p = phalanx.Communicator.noloco_partner(5, 2, 4, r)
        x = np.full(64, 4.0 * r, dtype=np.float32)
        c.sub_all_reduce(x, [r, p], op="avg")
        return p, x

    for r, (p, x) in enumerate(run_all(four, step)):
        assert (min(r, p), max(r, p)) in pairs
        assert (x == 2.0 * (r + p)).all()
    assert phalanx.Communicator.noloco_partner(5, 2, 3, 0) in (None, 1, 2)


def test_send_recv_tags_out_of_order_and_mismatch(four):
    big = np.arange(300_000, dtype=np.float32)

    def step(r, c):
        if r == 0:
            c.send(1, 1, np.array([1, 2, 3], dtype=np.int16))
            c.send(1, 2, big)
            c.send(1, 1, np.array([4, 5, 6], dtype=np.int16))
        elif r == 1:
            got = np.zeros_like(big)
            c.recv(0, 2, got)
            first = np.zeros(3, dtype=np.int16)
            c.recv(0, 1, first)
            wrong = np.full(2, 9, dtype=np.int16)
            with pytest.raises(phalanx.MismatchError):
                c.recv(0, 1, wrong)
            assert (wrong == 9).all()
            return got, first
        return None

    got, first = run_all(four, step)[1]
    np.testing.assert_array_equal(got, big)
    np.testing.assert_array_equal(first, [1, 2, 3])


def test_isend_irecv_both_ways_at_once_out_of_order_and_mismatch(four):
    n = 1 << 20  # 4 MiB each way: more than the transport buffers

    def step(r, c):
        if r > 1:
            return None
        peer = 1 - r
        mine = np.arange(n, dtype=np.float32) * (r + 1)
        send = c.isend(peer, 5, mine)
        got = np.zeros(n, dtype=np.float32)
        recv = c.irecv(peer, 5, got)
        # Many tags in flight; received in reverse order.
        if r == 0:
            sends = [c.isend(1, 100 + t, np.full(8, t, dtype=np.int64)) for t in range(16)]
            for s in sends:
                s.wait()
            c.isend(1, 7, np.arange(4, dtype=np.int16)).wait()
        else:
            small = [np.zeros(8, dtype=np.int64) for _ in range(16)]
            recvs = [c.irecv(0, 100 + t, small[t]) for t in reversed(range(16))]
            for q in reversed(recvs):
                q.wait()
                assert q.done()
            for t in range(16):
                assert (small[t] == t).all()
            wrong = np.full(3, 9, dtype=np.int16)
            q = c.irecv(0, 7, wrong)
            with pytest.raises(phalanx.MismatchError):
                q.wait()
            assert (wrong == 9).all()
        send.wait()
        recv.wait()
        return got

    out = run_all(four, step)
    np.testing.assert_array_equal(out[0], np.arange(n, dtype=np.float32) * 2)
    np.testing.assert_array_equal(out[1], np.arange(n, dtype=np.float32))


def test_bad_members_and_peers_are_value_errors(four):
    c = four[0]
    x = np.zeros(4, dtype=np.float32)
    with pytest.raises(ValueError):
        c.sub_all_reduce(x, [1, 2])
    with pytest.raises(ValueError):
        c.send(0, 1, x)
