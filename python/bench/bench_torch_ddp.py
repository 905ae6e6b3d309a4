"""DDP step time of a small transformer language model on the phalanx backend against
the Gloo backend, side by side in one run.

    python python/bench/bench_torch_ddp.py [--ranks 2 4] [--steps 30] [--dim 256]

Each rank is a process on 127.0.0.1 (env://, as torchrun sets up) with one torch thread.
Prints, per world size, the median step time (forward, backward with DDP's bucketed
all-reduce, SGD step) of each backend and their ratio.
"""

import argparse
import datetime
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class LM(torch.nn.Module):
    def __init__(self, vocab, dim, layers):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        layer = torch.nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


def rank_main(rank, size, port, backend, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import phalanx.torch  # noqa: F401

    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=size, timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(LM(args.vocab, args.dim, args.layers))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(rank)
    times = []
    for step in range(args.steps + 3):
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
        dist.barrier()
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(
            model(tokens[:, :-1]).reshape(-1, args.vocab), tokens[:, 1:].reshape(-1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= 3:  # warm-up steps are not counted
            times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    out.put((rank, statistics.median(times), params))
    dist.barrier()
    dist.destroy_process_group()


def run(backend, size, args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, size, port, backend, args, out)) for r in range(size)]
    for p in procs:
        p.start()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    return max(t for _, t, _ in results), results[0][2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    print(f"{'ranks':>5} {'params':>9} {'gloo ms':>9} {'phalanx ms':>11} {'phalanx/gloo':>13}", flush=True)
    for size in args.ranks:
        gloo, params = run("gloo", size, args)
        ours, _ = run("phalanx", size, args)
        print(f"{size:>5} {params:>9} {gloo * 1e3:>9.1f} {ours * 1e3:>11.1f} {ours / gloo:>13.2f}", flush=True)


if __name__ == "__main__":
    main()
