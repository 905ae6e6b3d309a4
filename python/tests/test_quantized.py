"""Quantized all-reduce from Python: two peers in one process on two threads. Both end
with identical bytes; the error stays within n * (sum of the peers' ranges) / (2^bits - 1)
(see tests/quantized.rs for why that bounds the error); 16-bit codes are far more
accurate than 8-bit ones; bad arguments raise before anything is sent."""

import threading

import numpy as np
import pytest

import phalanx
from conftest import on_all


@pytest.fixture
def pair(master):
    """Two communicators of one group, ranks 0 and 1."""
    first = phalanx.Communicator.connect(master.addr, join_timeout_ms=30_000)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("c", phalanx.Communicator.connect(master.addr)), daemon=True)
    t.start()
    while first.size < 2:
        first.update_topology()
    t.join(timeout=60)
    second = box["c"]
    yield first, second
    second.leave()
    first.leave()


def both(pair, f, timeout=60):
    """Runs f(comm) on both communicators at once; returns their results, re-raises errors."""
    return on_all(pair, f, timeout)


def inputs(rank, n=50_000):
    rng = np.random.default_rng(rank)
    return (rng.standard_normal(n) * (rank + 1) + 3 * rank).astype(np.float32)


@pytest.mark.parametrize("bits", [8, 16])
def test_identical_bytes_within_the_bound(pair, bits):
    def run(c):
        x = inputs(c.rank)
        c.all_reduce_quantized(x, op="sum", bits=bits)
        return c.rank, x

    (r0, a), (r1, b) = both(pair, run)
    assert {r0, r1} == {0, 1}
    assert a.tobytes() == b.tobytes()
    ins = [inputs(0), inputs(1)]
    exact = ins[0].astype(np.float64) + ins[1].astype(np.float64)
    step = sum(float(x.max()) - float(x.min()) for x in ins) / (2**bits - 1)
    rounding = 8 * np.finfo(np.float32).eps * sum(float(np.abs(x).max()) for x in ins)
    err = np.abs(a.astype(np.float64) - exact).max()
    assert 0 < err <= 2 * step + rounding


def test_u16_is_much_more_accurate_and_avg_divides(pair):
    def run(c):
        out = {}
        for bits in (8, 16):
            x = inputs(c.rank)
            c.all_reduce_quantized(x, bits=bits)
            out[bits] = x
        y = inputs(c.rank)
        c.all_reduce_quantized(y, op="avg", bits=8)
        out["avg"] = y
        return out

    a, b = both(pair, run)
    exact = inputs(0).astype(np.float64) + inputs(1).astype(np.float64)
    e8 = np.abs(a[8] - exact).max()
    e16 = np.abs(a[16] - exact).max()
    assert e16 * 50 < e8
    assert a["avg"].tobytes() == b["avg"].tobytes()
    np.testing.assert_array_equal(a["avg"], a[8] / np.float32(2))


def test_bad_arguments_raise_before_sending(pair):
    c = pair[0]
    x = np.ones(10, dtype=np.float32)
    with pytest.raises(ValueError):
        c.all_reduce_quantized(x, op="max")
    with pytest.raises(ValueError):
        c.all_reduce_quantized(x, bits=4)
    with pytest.raises(TypeError):
        c.all_reduce_quantized(np.ones(10, dtype=np.float64))
    # Nothing was sent: the group still works.
    out = both(pair, lambda c: (c.all_reduce_quantized(y := np.full(10, 2.0, dtype=np.float32)), y)[1])
    assert all((o == 4.0).all() for o in out)


def test_non_finite_input_fails_on_both_with_arrays_restored(pair):
    def run(c):
        x = inputs(c.rank, 1000)
        if c.rank == 1:
            x[500] = np.nan
        before = x.copy()
        # The rank that meets the NaN raises ValueError; the other gets the group's abort.
        with pytest.raises((phalanx.PhalanxError, ValueError) if c.rank == 0 else ValueError):
            c.all_reduce_quantized(x, bits=16)
        return x.tobytes() == before.tobytes()

    assert all(both(pair, run))
