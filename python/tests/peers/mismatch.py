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

# The group goes on. (The core sometimes fails the call after a mismatch with a lost
# peer on one side, AbortedError on the other, although no peer was lost: the data link
# between them is torn down and set up again. The retry covers that; it is reported.)
y = np.full(12, rank + 1, dtype=np.int64)
retries = 0
while True:
    try:
        comm.all_reduce(y)
        break
    except (phalanx.PeerLostError, phalanx.AbortedError):
        retries += 1
        if retries > 2:
            raise
        comm.update_topology()
emit("done", rank=rank, outcome=outcome, after=int(y[0]), retries=retries)
comm.barrier()
comm.leave()
