"""DiLoCo on a small transformer language model, through a kill and a join.

    python examples/torch_diloco.py            # master + 4 workers; one is SIGKILLed
                                               # mid-run, a joiner arrives later
    python examples/torch_diloco.py --streaming   # the same with streaming DiLoCo
    python examples/torch_diloco.py --async       # the same with async DiLoCo
    python examples/torch_diloco.py --worker MASTER_ADDR SEED   # one worker by hand

Every worker trains the same tiny transformer on its own synthetic token stream (a
noisy arithmetic sequence, so there is something to learn) with H local SGD steps per
round, then the DiLoCo outer step through phalanx (`phalanx.torch.DiLoCo`; with
--streaming, `phalanx.torch.StreamingDiLoCo`: two fragments, each synchronised every H/2
steps with its all-reduce overlapping the next inner step, so a "round" is a sync point).
With --async, `phalanx.torch.AsyncDiLoCo`: each round's all-reduce runs through the
next round's inner steps and its outer step lands one round late.
The driver prints each worker's loss per round, checks that all workers that report a
round hold bit-identical outer weights after it, and that the loss fell.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

import torch

VOCAB, DIM, SEQ, BATCH, INNER, ROUNDS = 32, 32, 16, 8, 10, 10


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.block = torch.nn.TransformerEncoderLayer(DIM, 2, 2 * DIM, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(DIM, VOCAB)

    def forward(self, x):
        return self.head(self.block(self.embed(x)))


def batch(gen):
    """Sequences x_{t+1} = x_t + step (mod VOCAB), one token in ten replaced by noise."""
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=gen)
    step = torch.randint(1, 4, (BATCH, 1), generator=gen)
    seq = (start + step * torch.arange(SEQ + 1)) % VOCAB
    noise = torch.rand(seq.shape, generator=gen) < 0.1
    return torch.where(noise, torch.randint(0, VOCAB, seq.shape, generator=gen), seq)


def worker(master_addr, seed, wait_go=False, variant=None):
    import phalanx
    import phalanx.torch

    if wait_go:  # started early (importing torch takes seconds); joins when told
        sys.stdin.readline()

    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial model everywhere (joiners fetch it anyway)
    model = TinyLM()
    comm = phalanx.Communicator.connect(master_addr, join_timeout_ms=60_000)
    if variant == "streaming":
        loop = phalanx.torch.StreamingDiLoCo(comm, model, inner_steps=INNER, fragments=2, overlap=1)
        run, end = loop.sync_point, 2 * ROUNDS
    elif variant == "async":
        loop = phalanx.torch.AsyncDiLoCo(comm, model, inner_steps=INNER)
        run, end = loop.round, ROUNDS
    else:
        loop = phalanx.torch.DiLoCo(comm, model, inner_steps=INNER)
        run, end = loop.round, ROUNDS
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(seed)

    def inner_step(_):
        tokens = batch(gen)
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        inner.zero_grad()
        loss.backward()
        inner.step()
        return loss.item()

    while True:
        r = run(inner_step).__dict__
        r["round"] = r.pop("syncs", r.get("round"))
        print(json.dumps({"seed": seed, **r}), flush=True)
        if r["round"] >= end:
            break
    if variant == "async":
        loop.finish()  # the last round's all-reduce, on every worker alike
    time.sleep(1.0)  # let the last round's outcome reach every worker before leaving
    comm.leave()


def drive(variant=None):
    import phalanx

    end = 2 * ROUNDS if variant == "streaming" else ROUNDS

    master = phalanx.Master("127.0.0.1:0", initial_peers=4)  # the first view: all four
    reports, procs, lock = [], {}, threading.Lock()

    def start(seed, wait_go=False):
        p = subprocess.Popen(
            [sys.executable, "-u", __file__, "--worker", master.addr, str(seed)]
            + (["--wait-go"] if wait_go else [])
            + ([f"--{variant}"] if variant else []),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs[seed] = p

        def read():
            for line in p.stdout:
                with lock:
                    reports.append(json.loads(line))
                    r = reports[-1]
                    print(f"worker {r['seed']} rank {r['rank']}/{r['size']} round {r['round']}: loss {r['loss']:.4f} "
                          f"retries {r['retries']} weights {r['digest'][:16]}", flush=True)

        threading.Thread(target=read, daemon=True).start()

    def rounds_seen():
        with lock:
            return max((r["round"] for r in reports), default=0)

    def wait_round(k, timeout=300):
        deadline = time.monotonic() + timeout
        while rounds_seen() < k:
            if time.monotonic() > deadline:
                raise SystemExit(f"no round {k} within {timeout} s")
            time.sleep(0.05)

    for seed in range(4):
        start(seed)
    start(4, wait_go=True)
    wait_round(3 * end // 10)
    print("driver: SIGKILL worker 3", flush=True)
    os.kill(procs[3].pid, signal.SIGKILL)
    wait_round(end // 2)
    print("driver: a joiner (worker 4) arrives", flush=True)
    procs[4].stdin.write("go\n")
    procs[4].stdin.flush()
    codes = {seed: p.wait(timeout=300) for seed, p in procs.items()}
    master.close()

    by_round = {}
    for r in reports:
        by_round.setdefault(r["round"], []).append(r)
    ok = True
    for k, rs in sorted(by_round.items()):
        digests = {r["digest"] for r in rs}
        if len(digests) != 1:
            print(f"driver: round {k}: workers disagree: {digests}")
            ok = False
    first = sum(r["loss"] for r in by_round[1]) / len(by_round[1])
    last = sum(r["loss"] for r in by_round[end]) / len(by_round[end])
    joined = any(r["seed"] == 4 for r in by_round[end])
    finishing = sorted(r["seed"] for r in by_round[end])
    print(f"driver: loss {first:.4f} -> {last:.4f}; workers at the last round: {finishing}; "
          f"exit codes {codes}", flush=True)
    ok = ok and last < first and joined and 3 not in finishing
    ok = ok and all(c == 0 for s, c in codes.items() if s != 3)
    print("driver: OK" if ok else "driver: FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=2, metavar=("MASTER_ADDR", "SEED"))
    ap.add_argument("--wait-go", action="store_true", help="join once a line arrives on stdin")
    ap.add_argument("--streaming", action="store_true", help="streaming DiLoCo (two fragments, overlapped)")
    ap.add_argument("--async", dest="async_", action="store_true", help="async DiLoCo (one round behind)")
    args = ap.parse_args()
    variant = "streaming" if args.streaming else "async" if args.async_ else None
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.wait_go, variant)
    else:
        sys.exit(drive(variant))
