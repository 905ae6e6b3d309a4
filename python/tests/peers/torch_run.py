"""A rank started by torchrun: init_process_group("phalanx") from the environment alone
(env://), one all-reduce, and what it saw as JSON in $TORCH_RUN_OUT/rank<N>.json (the
ranks share torchrun's stdout, where lines may interleave)."""

import json
import os

import torch
import torch.distributed as dist

import phalanx.torch  # noqa: F401  (registers the backend)
from _common import watchdog

watchdog(120)
dist.init_process_group("phalanx")
t = torch.ones(4) * (dist.get_rank() + 1)
dist.all_reduce(t)
seen = dict(rank=dist.get_rank(), size=dist.get_world_size(), backend=dist.get_backend(), value=t.tolist())
with open(os.path.join(os.environ["TORCH_RUN_OUT"], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(seen, f)
dist.barrier()
dist.destroy_process_group()
