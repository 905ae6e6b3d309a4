"""A peer of the mismatch test: the two peers make one all-reduce that disagrees in
CASE ("size", "dtype" or "op"); both must raise MismatchError with the array unchanged.
A matching all-reduce afterwards must then work.

Usage: mismatch.py MASTER_ADDR CASE.
"""

import sys

import numpy as np
import phalanx
from _common import connect, emit, wait_for_size, watchdog

watchdog(150)
case = sys.argv[2]
comm = connect()
wait_for_size(comm, 2)
rank = comm.rank
emit("ready", rank=rank)

op = "sum"
if case == "size":
    x = np.ones(10 if rank == 0 else 20, dtype=np.float32)
elif case == "dtype":
    x = np.ones(16, dtype=np.float32 if rank == 0 else np.int32)
else:
    x, op = np.ones(8, dtype=np.float64), ("sum" if rank == 0 else "max")
before = x.copy()
try:
    comm.all_reduce(x, op=op)
    outcome = "no error"
except phalanx.MismatchError as e:
    outcome = "MismatchError" if np.array_equal(x, before) else "MismatchError, array changed"
    emit("mismatch", message=str(e))
except Exception as e:  # noqa: BLE001 - report any other class to the test
    outcome = f"{type(e).__name__}: {e}"

# The group goes on: a matching call works at once, with no retry (a mismatch used to
# tear down the data link it was opening; tests/mismatch_links.rs loops that case).
y = np.full(12, rank + 1, dtype=np.int64)
comm.all_reduce(y)
emit("done", rank=rank, outcome=outcome, after=int(y[0]))
comm.barrier()
comm.leave()
