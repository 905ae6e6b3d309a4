"""One device of the MoE layer (tests/models.py) as its own process.

Usage: moe_device.py MASTER_ADDR DEVICE KS. Joins with peer id DEVICE (the master forms
its first view of 4 ranked by peer id, so the device is rank DEVICE), emits "ready",
then for each top-k routing of the comma-separated KS runs the layer's forward and
backward through `ExpertLayer` and emits a "moe" event: its forward outputs and input
gradients, and the gradient of every expert it owns after spRS, as hex of their float32
bytes, with the plan's routes and placement. Emits "done" at the end.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared models

import models  # noqa: E402
from _common import connect, emit, watchdog  # noqa: E402

watchdog(150)
device, ks = int(sys.argv[2]), [int(k) for k in sys.argv[3].split(",")]
comm = connect(peer_id=device)
emit("ready", rank=comm.rank, size=comm.size)

for k in ks:
    y, dx, grads, routes, compute = models.moe_device_step(comm, k)
    owned = [e for e in range(models.E) if models.OWNERS[e] == comm.rank]
    emit(
        "moe",
        k=k,
        y=y.tobytes().hex(),
        dx=dx.tobytes().hex(),
        grads={str(e): grads[e * models.W : (e + 1) * models.W].tobytes().hex() for e in owned},
        routes=[list(map(int, r)) for r in routes],
        holders=models.moe_holders(k),
        compute=list(compute),
    )

emit("done", rank=comm.rank)
comm.barrier()
comm.leave()
