"""The Python part of the GPU check (issue 17), run by scripts/gpu-check.sh on a machine
with a GPU: `phalanx.DeviceCommunicator(comm, backend="nccl")` on CUDA tensors through
DLPack, from torch and (when installed) cupy, in one process: a master, one peer, a
1-rank NCCL communicator. Every collective on device memory, against what it must give
on one rank (its input); on torch's current stream and on a stream of its own. Prints
PASS/FAIL per check and exits with the number of failures.

Usage: python3 scripts/gpu_check_python.py   (with the phalanx wheel built with the
`nccl` feature installed, and torch with CUDA). `--standin` runs the same collectives on
the CPU stand-in with numpy arrays (no GPU, no torch): python/tests/test_device.py runs
it so, to keep this script working where no GPU is."""

import sys

import phalanx

fails = 0


def check(name, fn):
    global fails
    try:
        fn()
        print(f"PASS: python: {name}")
    except Exception as e:  # every failure is reported, none stops the others
        print(f"FAIL: python: {name}: {type(e).__name__}: {e}")
        fails += 1


def collectives(dev, make, equal, sync, stream=None):
    """Every collective on one rank: each gives back its input."""
    kw = {} if stream is None else {"stream": stream}

    def all_reduce():
        x = make(4096)
        dev.all_reduce(x, "sum", **kw)
        sync()
        equal(x, make(4096))

    def reduce_scatter():
        x, y = make(4096), make(4096) * 0
        dev.reduce_scatter(x, y, "sum", **kw)
        sync()
        equal(y, x)

    def all_gather():
        x, y = make(4096), make(4096) * 0
        dev.all_gather(x, y, **kw)
        sync()
        equal(y, x)

    def broadcast():
        x = make(4096)
        dev.broadcast(x, 0, **kw)
        sync()
        equal(x, make(4096))

    def reduce():
        x = make(4096)
        dev.reduce(x, 0, "max", **kw)
        sync()
        equal(x, make(4096))

    def send_recv():
        x, y = make(4096), make(4096) * 0
        dev.send_recv(sends=[(0, x)], recvs=[(0, y)], **kw)
        sync()
        equal(y, x)

    def all_to_all():
        x, y = make(4096), make(4096) * 0
        dev.all_to_all(x, y, **kw)
        sync()
        equal(y, x)

    return [all_reduce, reduce_scatter, all_gather, broadcast, reduce, send_recv, all_to_all]


def standin():
    """The same checks on the CPU stand-in, numpy arrays, no stream."""
    import numpy as np

    master = phalanx.Master("127.0.0.1:0")
    comm = phalanx.Communicator.connect(master.addr)
    dev = phalanx.DeviceCommunicator(comm, backend="standin")

    def make(n):
        return np.arange(n, dtype=np.float32) - 7.0

    def equal(a, b):
        if not np.array_equal(a, b):
            raise AssertionError(f"{a[:4].tolist()} != {b[:4].tolist()}")

    for f in collectives(dev, make, equal, lambda: None):
        check(f"stand-in {f.__name__}", f)
    comm.leave()
    master.close()
    return fails


def main():
    if "--standin" in sys.argv[1:]:
        return standin()
    import torch

    if not torch.cuda.is_available():
        print("FAIL: python: torch sees no GPU")
        return 1
    master = phalanx.Master("127.0.0.1:0")
    comm = phalanx.Communicator.connect(master.addr)
    dev = phalanx.DeviceCommunicator(comm, backend="nccl")
    print(f"python: {dev.backend} on {torch.cuda.get_device_name(0)}, torch {torch.__version__}")

    def t_make(n):
        return torch.arange(n, dtype=torch.float32, device="cuda") - 7.0

    def t_equal(a, b):
        if not torch.equal(a, b):
            raise AssertionError(f"{a[:4].tolist()} != {b[:4].tolist()}")

    for f in collectives(dev, t_make, t_equal, torch.cuda.synchronize):
        check(f"torch {f.__name__} (default stream)", f)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        for f in collectives(dev, t_make, t_equal, side.synchronize, stream=side.cuda_stream):
            check(f"torch {f.__name__} (a stream of its own)", f)

    def refused_cpu_tensor_on_nccl():
        try:
            dev.all_reduce(torch.ones(4))
        except (TypeError, phalanx.DeviceError):
            return
        raise AssertionError("a CPU tensor was accepted by the NCCL backend")

    check("a CPU tensor on the NCCL backend is refused", refused_cpu_tensor_on_nccl)

    try:
        import cupy
    except ImportError:
        print("python: no cupy, its checks skipped")
    else:

        def c_make(n):
            return cupy.arange(n, dtype=cupy.float32) - 7.0

        def c_equal(a, b):
            if not bool((a == b).all()):
                raise AssertionError(f"{a[:4].tolist()} != {b[:4].tolist()}")

        for f in collectives(dev, c_make, c_equal, cupy.cuda.Device().synchronize):
            check(f"cupy {f.__name__}", f)
    comm.leave()
    master.close()
    return fails


if __name__ == "__main__":
    sys.exit(min(main(), 100))
