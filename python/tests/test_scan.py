"""All-scan from Python: four peers in this process (threads), the issue's
linear-attention example, built-in operators against numpy references, argument checks."""

import threading
import time

import numpy as np
import pytest

import phalanx

N = 4
A = np.array([[0.5, 1.0], [0.5, 0.25], [0.25, 0.5], [1.0, 0.5]], dtype=np.float32)
S = np.array(
    [[[1, 2], [3, 4]], [[2, 0], [1, 1]], [[4, 4], [0, 2]], [[3, 1], [1, 0]]],
    dtype=np.float32,
)
# The issue's stated inclusive results for S.
WANT_S = np.array(
    [[[1, 2], [3, 4]], [[2.5, 1], [1.75, 2]], [[4.625, 4.25], [0.875, 3]], [[7.625, 5.25], [1.4375, 1.5]]],
    dtype=np.float32,
)


def run_group(master, body, n=N, timeout=120):
    """Connects `n` communicators on threads, forms the group, runs `body(comm)` on each;
    returns their results by rank, re-raising the first error."""
    results, errors = {}, []

    def peer():
        try:
            comm = phalanx.Communicator.connect(master.addr, join_timeout_ms=60_000)
            deadline = time.monotonic() + 60
            comm.update_topology()
            while comm.size < n:
                assert time.monotonic() < deadline, "group did not form"
                time.sleep(0.02)
                comm.update_topology()
            comm.barrier()
            results[comm.rank] = body(comm)
            comm.barrier()
            comm.leave()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=peer, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a peer hung"
    if errors:
        raise errors[0]
    return [results[r] for r in range(n)]


def test_linear_attention_issue_example(master):
    want_a = np.cumprod(A, axis=0)

    def body(comm):
        r = comm.rank
        out = []
        for algorithm, blocks in [("auto", 0), ("chain", 2), ("chain", 5), ("doubling", 0)]:
            for inclusive in (True, False):
                a, s = A[r].copy(), S[r].copy()
                comm.all_scan_linear_attention(a, s, inclusive, algorithm=algorithm, blocks=blocks)
                out.append((algorithm, blocks, inclusive, a, s))
        return out

    for r, runs in enumerate(run_group(master, body)):
        for algorithm, blocks, inclusive, a, s in runs:
            case = f"rank {r} {algorithm} {blocks} inclusive={inclusive}"
            if inclusive:
                assert np.array_equal(s, WANT_S[r]), case
                assert np.array_equal(a, want_a[r]), case
            elif r == 0:
                assert np.array_equal(s, np.zeros((2, 2), np.float32)), case
                assert np.array_equal(a, np.ones(2, np.float32)), case
            else:
                assert np.array_equal(s, WANT_S[r - 1]), case
                assert np.array_equal(a, want_a[r - 1]), case


def test_builtin_ops_match_numpy(master):
    cases = [
        ("sum", np.int32, np.cumsum),
        ("prod", np.int64, np.cumprod),
        ("max", np.float64, np.maximum.accumulate),
        ("min", np.uint16, np.minimum.accumulate),
    ]

    def value(rank, dtype):
        return ((np.arange(7) * 3 + rank * 5) % 4 + 1).astype(dtype)

    def body(comm):
        out = []
        for op, dtype, _ in cases:
            for inclusive in (True, False):
                for reverse in (False, True):
                    x = value(comm.rank, dtype)
                    comm.all_scan(x, op, inclusive, reverse)
                    out.append(x)
        return out

    results = run_group(master, body)
    identity = {"sum": 0, "prod": 1}
    for r in range(N):
        k = 0
        for op, dtype, acc in cases:
            for inclusive in (True, False):
                for reverse in (False, True):
                    order = list(range(N))[::-1] if reverse else list(range(N))
                    pos = order.index(r) + (1 if inclusive else 0)
                    ranks = order[:pos]
                    if ranks:
                        want = acc(np.stack([value(q, dtype) for q in ranks]), axis=0)[-1]
                    elif op in identity:
                        want = np.full(7, identity[op], dtype)
                    else:
                        big = np.inf if np.dtype(dtype).kind == "f" else np.iinfo(dtype).max
                        small = -np.inf if np.dtype(dtype).kind == "f" else np.iinfo(dtype).min
                        want = np.full(7, big if op == "min" else small, dtype)
                    got = results[r][k]
                    assert got.dtype == dtype and np.array_equal(got, want), (r, op, inclusive, reverse, got, want)
                    k += 1


def test_argument_errors(master):
    def body(comm):
        x = np.ones(4, np.float32)
        with pytest.raises(ValueError):
            comm.all_scan(x, "avg")
        with pytest.raises(ValueError):
            comm.all_scan(x, "sum", algorithm="sideways")
        with pytest.raises(ValueError):
            comm.all_scan(x, "sum", algorithm="doubling", blocks=3)
        with pytest.raises(TypeError):
            comm.all_scan_linear_attention(np.ones(2, np.float64), np.zeros((2, 2), np.float32))
        with pytest.raises(ValueError):
            comm.all_scan_linear_attention(np.ones(3, np.float32), np.zeros((2, 2), np.float32))
        assert np.array_equal(x, np.ones(4, np.float32))
        return True

    assert all(run_group(master, body, n=1))
