"""Two peers in one process, on two threads: shows that the GIL is released while a
collective waits (otherwise the second thread could never join in and both would hang)
and that results land in the caller's own memory (no copy), whatever the array type."""

import array
import threading

import numpy as np
import pytest

import phalanx


class DLPackOnly:
    """A tensor-like that offers only DLPack, as a CPU torch tensor does."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self, **kwargs):
        return self.a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


@pytest.fixture
def pair(master):
    """Two communicators of one group, ranks 0 and 1."""
    first = phalanx.Communicator.connect(master.addr, join_timeout_ms=30_000)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("c", phalanx.Communicator.connect(master.addr)), daemon=True)
    t.start()
    while first.size < 2:  # admit the second one (its connect waits, GIL released)
        first.update_topology()
    t.join(timeout=60)
    second = box["c"]
    yield first, second
    second.leave()
    first.leave()


def both(pair, f0, f1, timeout=60):
    """Runs f0(comm0) and f1(comm1) on two threads at once; re-raises their errors."""
    errors = []

    def run(f, c):
        try:
            f(c)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(f, c), daemon=True) for f, c in zip((f0, f1), pair)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a collective hung: is the GIL released while it waits?"
    if errors:
        raise errors[0]


def test_in_place_on_the_callers_memory(pair):
    base = [np.arange(12, dtype=np.float32), np.arange(12, dtype=np.float32) * 10]
    views = [b.reshape(3, 4) for b in base]  # views share the base arrays' memory
    addrs = [b.ctypes.data for b in base]
    both(pair, lambda c: c.all_reduce(views[0]), lambda c: c.all_reduce(views[1]))
    for b, addr in zip(base, addrs):
        assert b.ctypes.data == addr
        assert np.array_equal(b, np.arange(12, dtype=np.float32) * 11)  # seen through the base


def test_buffer_protocol_and_dlpack_objects(pair):
    ba = [bytearray([1, 2, 250]), bytearray([3, 4, 10])]
    both(pair, lambda c: c.all_reduce(ba[0]), lambda c: c.all_reduce(ba[1]))
    assert ba[0] == ba[1] == bytearray([4, 6, 4])  # uint8 wraps: 250 + 10 = 4

    arr = [array.array("d", [1.5, -2.0]), array.array("d", [0.25, 8.0])]
    both(pair, lambda c: c.all_reduce(arr[0], op="max"), lambda c: c.all_reduce(arr[1], op="max"))
    assert list(arr[0]) == list(arr[1]) == [1.5, 8.0]

    t = [np.full((2, 3), 2, dtype=np.int16), np.full((2, 3), 5, dtype=np.int16)]
    both(pair, lambda c: c.all_reduce(DLPackOnly(t[0]), op="prod"), lambda c: c.all_reduce(DLPackOnly(t[1]), op="prod"))
    assert np.all(t[0] == 10) and np.all(t[1] == 10)


def test_async_all_reduce_overlaps_python_work(pair):
    x = [np.ones(1 << 16, dtype=np.float64), np.full(1 << 16, 2.0)]
    handles = [None, None]

    def start(i):
        return lambda c: handles.__setitem__(i, c.all_reduce_async(x[i]))

    both(pair, start(0), start(1))
    assert np.all(x[0] == 1.0)  # untouched until wait()
    both(pair, lambda c: handles[0].wait(), lambda c: handles[1].wait())
    assert handles[0].done() and np.all(x[0] == 3.0) and np.all(x[1] == 3.0)
    handles[0].wait()  # repeated wait: same outcome, no error


def test_shared_state_roundtrip():
    s = phalanx.SharedState()
    w = np.arange(12, dtype=np.float16).reshape(3, 4)
    s["w"] = w
    s["n"] = np.array([7], dtype=np.uint64)
    assert s.revision == 0
    s.revision = 4
    assert s.revision == 4
    assert list(s) == s.keys() == ["w", "n"] and len(s) == 2 and "w" in s and "x" not in s
    got = s["w"]
    assert got.dtype == np.float16 and got.shape == (3, 4) and np.array_equal(got, w)
    got[0, 0] = 99  # a copy: the state is unchanged
    assert s["w"][0, 0] == 0
    d = s.digest()
    assert isinstance(d, bytes) and len(d) == 32 and s.hexdigest() == d.hex()
    s["w"] = w + 1
    assert s.digest() != d
    with pytest.raises(KeyError):
        s["missing"]
    with pytest.raises(TypeError):
        s["c"] = np.zeros(2, dtype=np.complex64)


def test_max_and_min_propagate_nan(pair):
    # As numpy and torch do: a NaN on any rank makes Max and Min NaN.
    for op in ("max", "min"):
        x = [np.array([np.nan, 1.0], dtype=np.float32), np.array([1.0, 2.0], dtype=np.float32)]
        both(pair, lambda c: c.all_reduce(x[0], op=op), lambda c: c.all_reduce(x[1], op=op))
        assert np.isnan(x[0][0]) and np.isnan(x[1][0]), op
        assert x[0][1] == x[1][1] == (2.0 if op == "max" else 1.0)
