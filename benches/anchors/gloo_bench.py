"""The Gloo anchor of `phalanx bench --compare gloo`: torch.distributed with backend
"gloo" (TCP over 127.0.0.1), the same collectives, sizes, element type (f32, sum) and
iteration counts as phalanx's bench, timed the same way.

Usage: python gloo_bench.py --n 2 --sizes 4096,1048576 --iters 5 --warmup 1 \
           --collectives all-reduce,reduce-scatter,all-gather,broadcast,all-to-all,all-scan

Starts `n` rank processes itself (multiprocessing, spawn). Per collective and size: one
checked call (inputs whose expected result is known exactly), `warmup` untimed calls, a
barrier, then the timed calls; the slowest rank's time of each iteration is taken and
rank 0 prints the median as one JSON line, like benches/anchors/mpi_bench.c:
  {"collective":"all-reduce","n":2,"size":1048576,"bytes":1048576,"count":262144,
   "iters":80,"median_us":...,"mean_us":...,"checked":true}
A collective Gloo does not have (all-scan; reduce-scatter in torch versions whose Gloo
backend lacks it) prints {"collective":...,"n":..,"size":..,"unsupported":"why"}.
"""

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time

MIB = 1 << 20
SPLIT = ("reduce-scatter", "all-gather", "all-to-all")


def iters_for(iters, nbytes):
    """Timed iterations: `iters` from 64 MiB up, up to 16 times more below (phalanx's rule)."""
    return iters * max(1, min(16, (64 * MIB) // nbytes))


def setup(torch, c, rank, n, count, part):
    """Input and output tensors of the checked call, and a function that checks them."""
    i = torch.arange(count, dtype=torch.int64)
    base = (rank + 1 + (i % 13)).to(torch.float32)
    tri = n * (n + 1) // 2
    if c == "all-reduce":
        return base, None, lambda x, _: bool(torch.equal(x, (tri + n * (i % 13)).float()))
    if c == "reduce-scatter":
        k = torch.arange(part) + rank * part
        return base, torch.zeros(part), lambda _, y: bool(torch.equal(y, (tri + n * (k % 13)).float()))
    if c == "all-gather":
        k = torch.arange(part)
        inp = (rank * 1000 + k % 1000).float()
        want = torch.cat([(r * 1000 + k % 1000).float() for r in range(n)])
        return inp, torch.zeros(count), lambda _, y: bool(torch.equal(y, want))
    if c == "broadcast":
        inp = base if rank == 0 else torch.zeros(count)
        want = (1 + (i % 13)).float()
        return inp, None, lambda x, _: bool(torch.equal(x, want))
    if c == "all-to-all":
        k = torch.arange(part)
        inp = torch.cat([(rank * 64 + j + 4096 * (k % 7)).float() for j in range(n)])
        want = torch.cat([(r * 64 + rank + 4096 * (k % 7)).float() for r in range(n)])
        return inp, torch.zeros(count), lambda _, y: bool(torch.equal(y, want))
    raise ValueError(c)


def call(dist, c, x, y):
    if c == "all-reduce":
        dist.all_reduce(x)
    elif c == "reduce-scatter":
        dist.reduce_scatter_tensor(y, x)
    elif c == "all-gather":
        dist.all_gather_into_tensor(y, x)
    elif c == "broadcast":
        dist.broadcast(x, 0)
    elif c == "all-to-all":
        dist.all_to_all_single(y, x)


def bench(torch, dist, c, rank, n, size, iters, warmup):
    elems = size // 4
    part = elems // n
    count = part * n if c in SPLIT else elems
    head = {"collective": c, "n": n, "size": size}
    if c == "all-scan":
        return dict(head, unsupported="torch.distributed has no scan")
    if count == 0:
        return None
    x, y, check = setup(torch, c, rank, n, count, part)
    try:
        call(dist, c, x, y)
    except (RuntimeError, NotImplementedError) as e:  # a collective this Gloo lacks
        dist.barrier()
        return dict(head, unsupported=str(e).splitlines()[0][:200])
    ok = torch.tensor([1 if check(x, y) else 0], dtype=torch.int32)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    x.zero_()
    for _ in range(warmup):
        call(dist, c, x, y)
    n_iters = iters_for(iters, count * 4)
    times = torch.zeros(n_iters, dtype=torch.float64)
    dist.barrier()
    for k in range(n_iters):
        t0 = time.perf_counter()
        call(dist, c, x, y)
        times[k] = time.perf_counter() - t0
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    slowest = times.tolist()
    return dict(
        head,
        bytes=count * 4,
        count=count,
        iters=n_iters,
        median_us=statistics.median(slowest) * 1e6,
        mean_us=statistics.fmean(slowest) * 1e6,
        checked=bool(ok.item() == 1),
    )


def rank_main(rank, args, port, out):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.n)
    try:
        for c in args.collectives.split(","):
            for size in (int(s) for s in args.sizes.split(",")):
                line = bench(torch, dist, c, rank, args.n, size, args.iters, args.warmup)
                if rank == 0 and line is not None:
                    out.put(json.dumps(line))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--sizes", default="1048576")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--collectives", default="all-reduce")
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, args, port, out)) for r in range(args.n)]
    for proc in procs:
        proc.start()
    failed = False
    while True:
        try:
            print(out.get(timeout=1.0), flush=True)
            continue
        except Exception:  # queue.Empty: check whether the ranks are still running
            pass
        if all(not proc.is_alive() for proc in procs):
            break
        if any(proc.exitcode not in (None, 0) for proc in procs):
            failed = True
            break
    while not out.empty():
        print(out.get(), flush=True)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        proc.join()
        failed |= proc.exitcode != 0
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
