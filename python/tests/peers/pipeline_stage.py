"""One stage of the pipeline MLP (tests/models.py) as its own process.

Usage: pipeline_stage.py MASTER_ADDR STAGE SCHEDULES. Joins with peer id STAGE (the
master forms its first view of 4 ranked by peer id, so the stage runs on rank STAGE),
emits "ready", then for each schedule of the comma-separated SCHEDULES trains the MLP
for models.ITERS iterations with `PipelineRunner` and emits one "weights" event per
iteration: the layers this stage trained, each one's gradient sum and weights after the
SGD step as hex of their float32 bytes. Emits "done" at the end.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared models

import models  # noqa: E402
import phalanx  # noqa: E402
from _common import connect, emit, watchdog  # noqa: E402

watchdog(150)
stage_index, schedules = int(sys.argv[2]), sys.argv[3].split(",")
comm = connect(peer_id=stage_index)
emit("ready", rank=comm.rank, size=comm.size)

for name in schedules:
    runner = phalanx.PipelineRunner(name, models.P, models.M, stage_index, chunks=2)
    stage = models.FusedMlpStage() if name == "1f1b" else models.MlpStage()
    for it in range(models.ITERS):
        timeline = runner.run(comm, stage)
        order_ok = [t[:3] for t in timeline] == runner.order
        times_ok = all(b <= r <= c <= e for _, _, _, b, r, c, e in timeline)
        idle = stage.idle()
        sums = stage.step()
        layers = sorted(stage.seen)
        others = [i for i in range(models.LAYERS) if i not in stage.seen]
        emit(
            "weights",
            schedule=name,
            iteration=it,
            layers=layers,
            sums=[sums[layer].tobytes().hex() for layer in layers],
            weights=[stage.weights[layer].tobytes().hex() for layer in layers],
            untouched=all(stage.weights[i].tobytes() == models.W0[i].tobytes() for i in others),
            order_ok=order_ok,
            times_ok=times_ok,
            idle=idle,
            fused=getattr(stage, "fused", None),
        )
    runner.finish(comm)

emit("done", rank=comm.rank)
comm.barrier()
comm.leave()
