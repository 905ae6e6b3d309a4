"""A peer of the killed-peer test.

Usage: kill.py MASTER_ADDR N MODE. After the group of N forms, the last rank is the
victim: it emits "victim" and idles until the test kills it. The others emit "calling"
and all-reduce their arrays, which blocks until the victim is found dead. MODE "auto"
connects with retry_attempts=3 (the library reruns the collective over the survivors);
MODE "manual" gets PeerLostError, checks that the array was restored, calls
update_topology() and calls again. Either way the survivors emit "result".
"""

import sys
import time

import numpy as np
import phalanx
from _common import connect, emit, wait_for_size, watchdog

watchdog(150)
n, mode = int(sys.argv[2]), sys.argv[3]
comm = connect(retry_attempts=3 if mode == "auto" else 1)
wait_for_size(comm, n)
ident = comm.rank  # stable through view changes, unlike the rank
if ident == n - 1:
    emit("victim", ident=ident)
    time.sleep(600)
    sys.exit(0)

x = np.full(4099, ident + 1, dtype=np.float32)
y = np.arange(4099, dtype=np.int64) * (ident + 1)
lost = 0
emit("calling", ident=ident)
while True:
    try:
        comm.all_reduce(x)
        comm.all_reduce(y)
        break
    except phalanx.PeerLostError as e:
        lost += 1
        restored = bool(np.all(x == ident + 1)) and bool(np.array_equal(y, np.arange(4099, dtype=np.int64) * (ident + 1)))
        emit("peer_lost", ident=ident, rank=getattr(e, "rank", None), restored=restored, message=str(e))
        if mode == "auto" or lost > 3:
            raise
        comm.update_topology()
size = comm.size  # before the barrier: no survivor leaves before everyone has read it
comm.barrier()
y_ok = bool(np.array_equal(y, np.arange(4099) * sum(range(1, n))))
emit("result", ident=ident, x=sorted(set(x.tolist())), y_ok=y_ok, size=size, lost=lost)
comm.leave()
