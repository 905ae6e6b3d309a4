"""Every collective on numpy arrays of several dtypes; checks exact results.

Usage: collectives.py MASTER_ADDR N. Emits "ready", then "done" with a list of failed
checks (empty when all passed) and a hash of every result, which must be equal on all
peers (bit parity).
"""

import hashlib
import sys

import numpy as np
from _common import connect, emit, wait_for_size, watchdog

watchdog(150)
n = int(sys.argv[2])
comm = connect()
wait_for_size(comm, n)
rank = comm.rank
emit("ready", rank=rank, size=comm.size)

failures = []
digest = hashlib.sha256()
LEN = 1000 + 3  # not a multiple of the group size: uneven segments inside the plans


def values(dtype, k, length=LEN):
    """Rank k's contribution: small integers (and halves for floats) so that every sum
    is exact in every dtype; uint8 sums wrap around, as numpy's do."""
    i = np.arange(length)
    if np.dtype(dtype).kind == "f":
        return ((i % 61) + 0.5 * k - 7).astype(dtype)
    if np.dtype(dtype).kind == "u":
        return ((i * 37 + k * 101) % 256).astype(dtype)
    return ((i % 113) * (k + 1) - 50 * k).astype(dtype)


def check(name, got, want, same_everywhere=True):
    if same_everywhere:
        digest.update(np.ascontiguousarray(got).tobytes())
    if got.dtype != want.dtype or got.shape != want.shape or not np.array_equal(got, want):
        failures.append(f"{name}: got {got[:8]} want {want[:8]}")


contributions = {dt: [values(dt, k) for k in range(n)] for dt in ["float32", "float64", "int32", "int64", "uint8", "float16"]}

for dt, cs in contributions.items():
    x = cs[rank].copy()
    comm.all_reduce(x)
    check(f"all_reduce sum {dt}", x, np.sum(np.stack(cs), axis=0, dtype=dt))

for dt in ["float64", "int32"]:
    cs = contributions[dt]
    for op, ref in [("min", np.min), ("max", np.max)]:
        x = cs[rank].copy()
        comm.all_reduce(x, op=op)
        check(f"all_reduce {op} {dt}", x, ref(np.stack(cs), axis=0))

x = contributions["float64"][rank].copy()
comm.all_reduce(x, op="avg")
check("all_reduce avg float64", x, np.sum(np.stack(contributions["float64"]), axis=0) / n)

# Multi-dimensional arrays are reduced as their flat C-order bytes.
x = contributions["float32"][rank][:1000].reshape(10, 100).copy()
comm.all_reduce(x)
check("all_reduce 2-D", x, np.sum(np.stack(contributions["float32"]), axis=0, dtype="float32")[:1000].reshape(10, 100))

# reduce-scatter: rank r gets segment r of the sum.
seg = 37
full = [values("int64", k, n * seg) for k in range(n)]
out = np.zeros(seg, dtype="int64")
comm.reduce_scatter(full[rank], out)
check("reduce_scatter", out, np.sum(np.stack(full), axis=0)[rank * seg : (rank + 1) * seg], False)

# all-gather: every rank's input, in rank order.
mine = np.full(5, rank * 10 + 1, dtype="float32")
out = np.zeros(5 * n, dtype="float32")
comm.all_gather(mine, out)
check("all_gather", out, np.repeat(np.arange(n, dtype="float32") * 10 + 1, 5))

# broadcast from the last rank.
root = n - 1
x = values("float32", rank)
comm.broadcast(x, root=root)
check("broadcast", x, values("float32", root))

# reduce to rank 0: others keep their input.
x = values("int32", rank)
comm.reduce(x, root=0, op="sum")
want = np.sum(np.stack(contributions["int32"]), axis=0, dtype="int32") if rank == 0 else values("int32", rank)
check("reduce", x, want, False)

comm.barrier()

# Two non-blocking all-reduces in flight at once.
a, b = values("float32", rank), values("int64", rank)
ha, hb = comm.all_reduce_async(a), comm.all_reduce_async(b, op="max")
hb.wait()
ha.wait()
assert ha.done() and hb.done()
check("all_reduce_async sum", a, np.sum(np.stack(contributions["float32"]), axis=0, dtype="float32"))
check("all_reduce_async max", b, np.max(np.stack(contributions["int64"]), axis=0))

emit("done", rank=rank, failures=failures, digest=digest.hexdigest())
comm.barrier()
comm.leave()
