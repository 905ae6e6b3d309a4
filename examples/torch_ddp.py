"""DDP over the phalanx backend: a small transformer language model on synthetic tokens.

    torchrun --nproc-per-node 2 examples/torch_ddp.py [--steps 30]

The one change from a Gloo script is the backend string (and `import phalanx.torch`).
Rank 0 prints the loss every few steps; at the end every rank prints a digest of its
weights (DDP keeps replicas identical: the digests agree) and the run checks it.
"""

import argparse
import hashlib

import torch
import torch.distributed as dist

import phalanx.torch  # noqa: F401  (registers the backend "phalanx")

VOCAB, DIM, SEQ, BATCH = 64, 64, 32, 8


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.block = torch.nn.TransformerEncoderLayer(DIM, 4, 2 * DIM, dropout=0.0, batch_first=True)
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("phalanx")  # was "gloo"
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(TinyLM())
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    gen = torch.Generator().manual_seed(rank)  # each rank its own data
    first = last = None
    for step in range(args.steps):
        tokens = batch(gen)
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()  # gradient buckets all-reduced through phalanx, in place
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
        if rank == 0 and step % 10 == 0:
            print(f"step {step}: loss {last:.4f}", flush=True)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    digest = hashlib.sha256(flat.numpy().tobytes()).hexdigest()
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if rank == 0:
        same = len(set(digests)) == 1
        print(f"loss {first:.4f} -> {last:.4f}; replicas identical: {same}", flush=True)
        if not same or not last < first:
            raise SystemExit("FAILED")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
