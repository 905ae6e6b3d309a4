"""A torch.distributed rank for the backend tests: `torch_pg.py BACKEND RANK SIZE PORT MODE`.

Joins `init_process_group(BACKEND)` through env:// on 127.0.0.1:PORT (torch's store), runs
MODE and prints its results as JSON events:

- ops: every collective on integer-valued inputs; one `result` event per op.
- ddp: 20 steps of a small transformer language model under DistributedDataParallel;
  a `weights` event with the final parameters.
- mismatch: all_reduce of a length that differs by rank; an `error` event.
- kill: rank SIZE-1 prints `ready` and waits to be killed; the others all_reduce and print
  `error` with the time it took.
"""

import datetime
import hashlib
import os
import sys
import time

from _common import emit, watchdog

watchdog(150)
backend, rank, size, port, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import phalanx  # noqa: E402
import phalanx.torch  # noqa: E402,F401  (registers the backend)

torch.set_num_threads(1)
dist.init_process_group(backend, rank=rank, world_size=size, timeout=datetime.timedelta(seconds=60))


def result(name, value):
    emit("result", name=name, value=value)


def ops():
    t = torch.arange(8, dtype=torch.float32) + rank * 10
    dist.all_reduce(t)
    result("all_reduce", t.tolist())
    for op in ("MAX", "MIN", "PRODUCT", "AVG"):
        if op == "AVG" and backend == "gloo":
            t = torch.arange(4, dtype=torch.float32) + rank
            dist.all_reduce(t)
            t /= size  # Gloo has no AVG: the same numbers by hand
        else:
            t = torch.arange(4, dtype=torch.float32) + rank
            dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        result(f"all_reduce_{op}", t.tolist())
    for dtype in (torch.float64, torch.int32, torch.int64, torch.bfloat16, torch.float16):
        t = (torch.arange(6) + rank).to(dtype)
        dist.all_reduce(t)
        result(f"all_reduce_{dtype}", t.double().tolist())
    lst = [torch.zeros(3) for _ in range(size)]
    dist.all_gather(lst, torch.full((3,), float(rank)))
    result("all_gather", [x.tolist() for x in lst])
    out = torch.zeros(size * 3)
    dist.all_gather_into_tensor(out, torch.full((3,), float(rank + 1)))
    result("all_gather_into_tensor", out.tolist())
    out = torch.zeros(2)
    dist.reduce_scatter_tensor(out, torch.arange(2 * size, dtype=torch.float32) * (rank + 1))
    result("reduce_scatter_tensor", out.tolist())
    out = torch.zeros(2)
    dist.reduce_scatter(out, [torch.full((2,), float(rank + j)) for j in range(size)])
    result("reduce_scatter", out.tolist())
    t = torch.full((5,), float(rank))
    dist.broadcast(t, src=size - 1)
    result("broadcast", t.tolist())
    t = torch.full((5,), float(rank + 1))
    dist.reduce(t, dst=0)
    result("reduce", t.tolist() if rank == 0 else None)
    dist.barrier()
    src = torch.arange(2 * size, dtype=torch.float32) + 100 * rank
    out = torch.zeros(2 * size)
    dist.all_to_all_single(out, src)
    result("all_to_all_single", out.tolist())
    # Uneven splits: rank r sends j+1 rows to rank j.
    src = torch.cat([torch.full((j + 1, 2), float(10 * rank + j)) for j in range(size)])
    out = torch.zeros(size * (rank + 1), 2)
    dist.all_to_all_single(out, src, [rank + 1] * size, [j + 1 for j in range(size)])
    result("all_to_all_single_v", out.tolist())
    # Non-contiguous tensors are written back.
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t() + rank
    dist.all_reduce(t)
    result("all_reduce_strided", t.tolist())
    # Async: the second op is issued before the first is waited on.
    a, b = torch.ones(4) * (rank + 1), torch.ones(4) * 2
    wa = dist.all_reduce(a, async_op=True)
    wb = dist.all_reduce(b, async_op=True)
    wb.wait()
    result("async_first_done_before_its_wait", wa.is_completed())
    wa.wait()
    result("async", [a.tolist(), b.tolist()])
    # Point to point: a ring.
    send = torch.full((3,), float(rank))
    recv = torch.zeros(3)
    if rank % 2 == 0:
        dist.send(send, dst=(rank + 1) % size)
        dist.recv(recv, src=(rank - 1) % size)
    else:
        dist.recv(recv, src=(rank - 1) % size)
        dist.send(send, dst=(rank + 1) % size)
    result("send_recv", recv.tolist())
    # A sub-group of the even ranks.
    evens = dist.new_group([r for r in range(size) if r % 2 == 0], backend=backend)
    if rank % 2 == 0:
        t = torch.full((2,), float(rank))
        dist.all_reduce(t, group=evens)
        result("new_group", t.tolist())
    dist.barrier()


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=64, dim=32):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.block = torch.nn.TransformerEncoderLayer(dim, 2, 64, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, x):
        return self.head(self.block(self.embed(x)))


def ddp():
    torch.manual_seed(1234)
    model = torch.nn.parallel.DistributedDataParallel(TinyLM())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(rank)
    for step in range(20):
        tokens = torch.randint(0, 64, (4, 17), generator=data)
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    emit("weights", sha256=hashlib.sha256(flat.numpy().tobytes()).hexdigest(), values=flat.tolist(), loss=loss.item())
    dist.barrier()


def mismatch():
    t = torch.ones(4 + rank)
    try:
        dist.all_reduce(t)
        emit("no_error")
    except phalanx.PhalanxError as e:
        emit("error", kind=type(e).__name__, restored=t.tolist() == [1.0] * (4 + rank))


def kill():
    dist.barrier()
    if rank == size - 1:
        emit("ready")
        time.sleep(120)
    time.sleep(0.5)  # the test kills the last rank meanwhile
    t = torch.ones(1 << 16)
    start = time.monotonic()
    try:
        dist.all_reduce(t)
        emit("no_error")
    except phalanx.PhalanxError as e:
        emit("error", kind=type(e).__name__, seconds=time.monotonic() - start, restored=bool((t == 1).all()))


{"ops": ops, "ddp": ddp, "mismatch": mismatch, "kill": kill}[mode]()
emit("done")
if mode != "kill":
    dist.destroy_process_group()
