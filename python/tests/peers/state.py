"""A peer of the shared-state test.

Usage: state.py MASTER_ADDR ROLE. ROLE "member": one of the two first peers, holding the
trained state (revision 7); it waits until a third peer has joined, then syncs. ROLE
"joiner": joins later with zeros and receives the state. Every peer emits "synced" with
its digest, then all three all-reduce once to show the joiner is a full member.
"""

import sys

import numpy as np
import phalanx
from _common import connect, emit, wait_for_size, watchdog

watchdog(150)
role = sys.argv[2]
trained = {
    "weights": (np.arange(1000, dtype=np.float32) * 1.5).reshape(4, 250),
    "step": np.array([42], dtype=np.int64),
    "mask": (np.arange(77) % 3).astype(np.uint8),
}
state = phalanx.SharedState()
comm = connect()
if role == "member":
    wait_for_size(comm, 2)
    for name, value in trained.items():
        state[name] = value
    state.revision = 7
    emit("ready", rank=comm.rank)
    wait_for_size(comm, 3)
    report = comm.sync_shared_state(state)
else:
    for name, value in trained.items():
        state[name] = np.zeros_like(value)
    comm.update_topology()  # admitted by the members' round: returns at once
    report = comm.sync_shared_state(state, strategy="receive")

equal = all(np.array_equal(state[k], v) and state[k].shape == v.shape and state[k].dtype == v.dtype for k, v in trained.items())
emit(
    "synced",
    role=role,
    digest=state.hexdigest(),
    revision=state.revision,
    equal=equal,
    received=report.tensors_received,
    bytes_received=report.bytes_received,
    size=comm.size,
)
ones = np.ones(10, dtype=np.int32)
comm.all_reduce(ones)
emit("summed", role=role, value=int(ones[0]))
comm.barrier()
comm.leave()
