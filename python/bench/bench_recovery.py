"""How long a SIGKILL of one replica stalls the survivors: phalanx against torchft, side
by side in one run on this machine.

    pip install torchft==0.2.0   # from the package registry; CPU, Gloo
    python python/bench/bench_recovery.py [--replicas 3] [--kills 3] [--tuned]

Each replica is a process training the same small model: every step computes gradients
(a fixed 20 ms of "compute" plus a tiny MLP), all-reduces them and commits the step.
- phalanx: `update_topology()` (settle losses), `all_reduce(grad, op="avg")`, apply.
- torchft: Manager (lighthouse, one replica group per process) with its DDP wrapper and
  OptimizerWrapper over ProcessGroupGloo, as torchft's own tests set it up.
Each replica prints a timestamp per committed step. After a warm-up the driver SIGKILLs one
replica, waits until the survivors committed several more steps, and starts a fresh
replica in its place (so the next kill finds the same world size). The stall of a kill is
the longest gap between two commits of a survivor around it, less the median step
interval. Defaults: phalanx's master peer timeout 750 ms (but a dead process is seen at
once through its liveness connection); torchft's defaults (heartbeat 100 ms, lighthouse
heartbeat timeout 5 s, quorum tick 100 ms). --tuned: torchft's lighthouse heartbeat
timeout 1 s, phalanx's peer timeout 300 ms. (torchft with a 500 ms lighthouse heartbeat
timeout and a 100 ms join timeout, or with 5 s collective and quorum timeouts, stopped
making progress after a kill on this 2-core machine.)
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

STEP_COMPUTE_S = 0.02


def model_and_data(seed):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))
    gen = torch.Generator().manual_seed(seed)
    return model, gen


def run_phalanx(master_addr, seed):
    import torch
    from torch.nn.utils import parameters_to_vector

    import phalanx

    torch.set_num_threads(1)
    model, gen = model_and_data(seed)
    comm = phalanx.Communicator.connect(master_addr, join_timeout_ms=60_000)
    params = list(model.parameters())
    state = phalanx.SharedState()
    state["params"] = parameters_to_vector(params).detach().numpy()
    while True:
        comm.update_topology()
        try:
            comm.sync_shared_state(state)  # joiners fetch the model
        except (phalanx.PeerLostError, phalanx.AbortedError):
            continue
        flat = torch.from_numpy(state["params"])
        x = torch.randn(16, 64, generator=gen)
        offset = 0
        with torch.no_grad():
            for p in params:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        model.zero_grad()
        model(x).pow(2).mean().backward()
        time.sleep(STEP_COMPUTE_S)
        grad = parameters_to_vector([p.grad for p in params])
        try:
            comm.all_reduce(grad, op="avg")
        except (phalanx.PeerLostError, phalanx.AbortedError):
            continue  # nothing applied: the step again over the survivors
        state["params"] = (flat - 0.01 * grad).numpy()
        state.revision += 1
        print(json.dumps({"t": time.time(), "step": state.revision}), flush=True)


def run_torchft(lighthouse, seed, tuned):
    import torch
    import torch.distributed as dist
    from torchft import DistributedDataParallel, Manager, Optimizer, ProcessGroupGloo

    torch.set_num_threads(1)
    model, gen = model_and_data(seed)
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    opt = None

    def load_state_dict(sd):
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])

    def state_dict():
        return {"model": model.state_dict(), "optim": opt.state_dict()}

    manager = Manager(
        pg=ProcessGroupGloo(),
        min_replica_size=2,
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        replica_id=f"replica_{seed}",
        store_addr="127.0.0.1",
        store_port=store.port,
        rank=0,
        world_size=1,
        lighthouse_addr=lighthouse,
    )
    ddp = DistributedDataParallel(manager, model)
    opt = Optimizer(manager, torch.optim.SGD(model.parameters(), lr=0.01))
    last = manager.current_step()
    while True:
        x = torch.randn(16, 64, generator=gen)
        opt.zero_grad()
        ddp(x).pow(2).mean().backward()
        time.sleep(STEP_COMPUTE_S)
        opt.step()
        step = manager.current_step()
        if step != last:
            last = step
            print(json.dumps({"t": time.time(), "step": step}), flush=True)


class Replica:
    def __init__(self, args):
        self.proc = subprocess.Popen(
            [sys.executable, "-u", __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self.commits = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.commits.append(json.loads(line)["t"])
            except (ValueError, KeyError):
                pass

    def kill(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def wait_commits(replicas, n, timeout=120):
    deadline = time.monotonic() + timeout
    target = [len(r.commits) + n for r in replicas]
    while any(len(r.commits) < t for r, t in zip(replicas, target)):
        if time.monotonic() > deadline:
            raise SystemExit("survivors made no progress within the timeout")
        time.sleep(0.05)


def measure(system, args):
    if system == "phalanx":
        import phalanx

        master = phalanx.Master("127.0.0.1:0", peer_timeout_ms=300 if args.tuned else 750)
        start = lambda seed: Replica(["--phalanx", master.addr, str(seed)])  # noqa: E731
        close = master.close
    else:
        from torchft._torchft import LighthouseServer

        opts = dict(heartbeat_timeout_ms=1000) if args.tuned else {}
        lighthouse = LighthouseServer(bind="127.0.0.1:0", min_replicas=2, **opts)
        start = lambda seed: Replica(["--torchft", lighthouse.address(), str(seed)] + (["--tuned"] if args.tuned else []))  # noqa: E731
        close = lighthouse.shutdown
    seed = 0
    replicas = []
    for _ in range(args.replicas):
        replicas.append(start(seed))
        seed += 1
    try:
        wait_commits(replicas, 40, timeout=180)
        stalls, intervals = [], []
        for _ in range(args.kills):
            victim = replicas.pop()
            t_kill = time.time()
            victim.kill()
            wait_commits(replicas, 15)
            for r in replicas:
                around = [t for t in r.commits if t > t_kill - 2.0]
                gaps = [b - a for a, b in zip(around, around[1:])]
                steady = [b - a for a, b in zip(r.commits[:-1], r.commits[1:]) if b < t_kill]
                intervals.append(statistics.median(steady[-20:]))
                stalls.append(max(gaps) - intervals[-1])
            replicas.append(start(seed))
            seed += 1
            time.sleep(3.0)  # let the new replica join before the next kill
            wait_commits(replicas, 20)
        return statistics.median(stalls), max(stalls), statistics.median(intervals)
    finally:
        for r in replicas:
            r.kill()
        close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--tuned", action="store_true")
    ap.add_argument("--phalanx", nargs=2)
    ap.add_argument("--torchft", nargs=2)
    args = ap.parse_args()
    if args.phalanx:
        return run_phalanx(args.phalanx[0], int(args.phalanx[1]))
    if args.torchft:
        return run_torchft(args.torchft[0], int(args.torchft[1]), args.tuned)
    print(f"{'system':>8} {'settings':>9} {'step ms':>8} {'stall median ms':>16} {'stall max ms':>13}", flush=True)
    for system in ("phalanx", "torchft"):
        median, worst, step = measure(system, args)
        print(f"{system:>8} {'tuned' if args.tuned else 'default':>9} {step * 1e3:>8.1f} {median * 1e3:>16.0f} {worst * 1e3:>13.0f}", flush=True)


if __name__ == "__main__":
    main()
