"""Sparse collectives and all-to-all from Python: four peers of one group on threads of
this process (the GIL is released while a collective waits), checked against naive
references: the FSSDP example (spAG, spRS), all-to-all with equal and uneven counts, and
the sparse all-reduce on both sides of the dense crossover."""


import numpy as np
import pytest

import phalanx
from conftest import on_all

N = 4


@pytest.fixture
def group(make_group):
    """N communicators of one group, indexed by rank."""
    return make_group(N)


def test_fssdp_example(group):
    lens, owners = [2] * 8, [e // 2 for e in range(8)]
    holders = [[0, 1, 2, 3] if e in (0, 4) else [] for e in range(8)]

    def run(c):
        d = c.rank
        params = np.full(16, -1.0, dtype=np.float32)
        for e in range(8):
            if owners[e] == d:
                params[2 * e : 2 * e + 2] = [10 * e + 1, 10 * e + 2]
        phalanx.sparse_all_gather(c, params, lens, owners, holders)
        grads = np.full(16, 0.5, dtype=np.float32)
        grads[0:2] = [d + 1, d + 1]
        grads[8:10] = [5 * (d + 1), d + 1]
        phalanx.sparse_reduce_scatter(c, grads, lens, owners, holders, op="sum")
        return params, grads

    out = on_all(group, run)
    for d, (params, grads) in enumerate(out):
        assert params[0:2].tolist() == [1.0, 2.0] and params[8:10].tolist() == [41.0, 42.0]
        for e in range(8):
            if e not in (0, 4) and owners[e] != d:
                assert params[2 * e : 2 * e + 2].tolist() == [-1.0, -1.0], "a slot not held changed"
        assert grads[2] == 0.5
    assert out[0][1][0:2].tolist() == [10.0, 10.0]
    assert out[2][1][8:10].tolist() == [50.0, 10.0]


def test_all_to_all_equal_and_uneven(group):
    rng = np.random.default_rng(7)
    counts = rng.integers(0, 5, size=(N, N))  # zeros included
    sends = [rng.integers(-1000, 1000, size=int(counts[i].sum())).astype(np.int64) for i in range(N)]

    def run(c):
        r = c.rank
        eq_in = (np.arange(3 * N) + 100 * r).astype(np.float64)
        eq_out = np.zeros(3 * N)
        phalanx.all_to_all(c, eq_in, eq_out)
        got, recv = phalanx.all_to_all_v(c, sends[r], [int(x) for x in counts[r]])
        return eq_out, got, recv

    out = on_all(group, run)
    for r, (eq_out, got, recv) in enumerate(out):
        assert eq_out.tolist() == [float(100 * i + 3 * r + k) for i in range(N) for k in range(3)]
        want = np.concatenate(
            [sends[i][int(counts[i][:r].sum()) : int(counts[i][:r].sum()) + int(counts[i][r])] for i in range(N)]
        )
        assert got.dtype == np.int64 and got.tolist() == want.tolist()
        assert recv == [int(counts[i][r]) for i in range(N)]


def naive_sparse(pairs, dim):
    """Per index, a left fold over ranks ascending (float32 arithmetic)."""
    sums = {}
    for idx, vals in pairs:
        for i, v in zip(idx.tolist(), vals):
            sums[i] = np.float32(sums[i] + v) if i in sums else np.float32(v)
    keys = sorted(sums)
    return np.array(keys, dtype=np.uint32), np.array([sums[k] for k in keys], dtype=np.float32)


@pytest.mark.parametrize("per_rank, dense", [(10, False), (250, False), (251, True), (600, True)])
def test_sparse_all_reduce_both_sides_of_the_crossover(group, per_rank, dense):
    dim = 1000  # crossover for 4 ranks, u32 / f32: average density 1/4, i.e. 1000 pairs in all
    rng = np.random.default_rng(per_rank)
    pairs = [
        (rng.integers(0, dim, size=per_rank).astype(np.uint32), (rng.standard_normal(per_rank) * 1e3).astype(np.float32))
        for _ in range(N)
    ]
    out = on_all(group, lambda c: phalanx.sparse_all_reduce(c, dim, *pairs[c.rank]))
    want_idx, want_vals = naive_sparse(pairs, dim)
    first = out[0].to_dense()
    for o in out:
        assert o.is_dense == dense
        assert o.to_dense().tobytes() == first.tobytes(), "peers differ"
        if not dense:
            assert o.indices.tolist() == want_idx.tolist()
            assert o.values.tobytes() == want_vals.tobytes(), "not the ascending-rank sums"
    if dense:
        want = np.zeros(dim, dtype=np.float32)
        want[want_idx] = want_vals
        np.testing.assert_allclose(first, want, rtol=1e-5, atol=1e-2)


def test_bad_arguments(group):
    c = group[0]
    with pytest.raises(TypeError):
        phalanx.sparse_all_reduce(c, 10, np.array([1], dtype=np.int64), np.ones(1, dtype=np.float32))
    with pytest.raises(ValueError):
        phalanx.sparse_all_gather(c, np.zeros(2, dtype=np.float32), [2], [7], [[]])


def test_methods_are_the_module_functions(group):
    """`comm.f(...)` runs the same collective as `phalanx.f(comm, ...)`, for every sparse
    collective and all-to-all: same results on every rank, and the right ones."""
    lens, owners = [2] * 8, [e // 2 for e in range(8)]
    holders = [[0, 1, 2, 3] if e in (0, 4) else [] for e in range(8)]
    dim = 100
    rng = np.random.default_rng(11)
    pairs = [
        (rng.choice(dim, size=8, replace=False).astype(np.uint32), rng.standard_normal(8).astype(np.float32))
        for _ in range(N)
    ]

    def run(c, as_method):
        r = c.rank
        params = np.where(np.repeat(np.array(owners) == r, 2), np.arange(16), -1).astype(np.float32)
        grads = np.full(16, r + 1.0, dtype=np.float32)
        eq_in = (np.arange(2 * N) + 10 * r).astype(np.int32)
        eq_out = np.zeros(2 * N, dtype=np.int32)
        if as_method:
            c.sparse_all_gather(params, lens, owners, holders)
            c.sparse_reduce_scatter(grads, lens, owners, holders, op="max")
            c.all_to_all(eq_in, eq_out)
            got, recv = c.all_to_all_v(eq_in, [2] * N)
            reduced = c.sparse_all_reduce(dim, *pairs[r])
        else:
            phalanx.sparse_all_gather(c, params, lens, owners, holders)
            phalanx.sparse_reduce_scatter(c, grads, lens, owners, holders, op="max")
            phalanx.all_to_all(c, eq_in, eq_out)
            got, recv = phalanx.all_to_all_v(c, eq_in, [2] * N)
            reduced = phalanx.sparse_all_reduce(c, dim, *pairs[r])
        assert isinstance(reduced, phalanx.SparseReduced)
        return params, grads, eq_out, got, recv, reduced.to_dense()

    by_method = on_all(group, lambda c: run(c, True))
    by_function = on_all(group, lambda c: run(c, False))
    for r, (m, f) in enumerate(zip(by_method, by_function)):
        for a, b in zip(m, f):
            assert np.array_equal(a, b), f"rank {r}: {a} != {b}"
        params, grads, eq_out, got, recv, dense = m
        assert params[0:2].tolist() == [0.0, 1.0] and params[8:10].tolist() == [8.0, 9.0]  # chunks 0, 4
        if owners[0] == r:
            assert grads[0:2].tolist() == [float(N), float(N)]  # max over the holders 0..N-1
        assert eq_out.tolist() == [10 * i + 2 * r + k for i in range(N) for k in range(2)]
        assert got.tolist() == eq_out.tolist() and recv == [2] * N
        assert dense.tobytes() == by_method[0][5].tobytes(), "peers differ"


def test_methods_check_their_arguments(group):
    c = group[0]
    with pytest.raises(TypeError):
        c.sparse_all_reduce(10, np.array([1], dtype=np.int64), np.ones(1, dtype=np.float32))
    with pytest.raises(ValueError):
        c.sparse_all_gather(np.zeros(2, dtype=np.float32), [2], [7], [[]])
    with pytest.raises(ValueError):
        c.sparse_reduce_scatter(np.zeros(2, dtype=np.float32), [2], [7], [[]])
    with pytest.raises(ValueError, match="share memory"):
        x = np.zeros(N, dtype=np.float32)
        c.all_to_all(x, x)
