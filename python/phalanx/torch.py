"""phalanx as a ``torch.distributed`` backend.

Importing this module registers the backend ``"phalanx"``; then::

    import torch.distributed as dist
    import phalanx.torch  # noqa: F401  (registers the backend)

    dist.init_process_group("phalanx")  # under torchrun: env:// by default
    dist.all_reduce(tensor)  # CPU tensors, in place, no copy when contiguous

Launch (``init_method="env://"``, as torchrun sets it up): rank 0 starts an embedded
phalanx master and publishes its address in torch's store, and every rank joins it with
its torch rank as peer id, so phalanx's ranks are torch's. With ``PHALANX_MASTER``
("HOST:PORT") set, the ranks join that running ``phalanx master`` instead (start it with
``--initial-peers WORLD_SIZE``). ``PHALANX_SECRET`` is the cluster secret (the embedded
master requires it too); ``PHALANX_BIND`` ("HOST:0") is where peers accept data links
(``127.0.0.1:0`` by default: set a routable address of the host across hosts).

Every op runs on one thread per process group, in the order it was called, so ranks
agree on the order; ``async_op=True`` returns at once with a ``Work`` whose ``wait()``
raises the phalanx error (``PeerLostError``, ``MismatchError``, ...) if the op failed.
A failed op leaves its tensors as they were. The world is fixed, as torch.distributed's
is: once a rank is lost (or leaves), every later op raises ``PeerLostError`` on the others
(nothing runs over fewer ranks than the caller sized it for). For a loop that goes on
through losses and joins, use ``communicator`` (a phalanx ``Communicator``) directly.

Ops: all_reduce, all_gather, all_gather_into_tensor, reduce_scatter,
reduce_scatter_tensor, broadcast, reduce, barrier, all_to_all_single, send/recv
(isend/irecv), new_group. Reduce ops: SUM, PRODUCT, MIN, MAX, AVG. Dtypes: float16,
bfloat16, float32, float64, int8..int64, uint8. CUDA tensors are refused with an error
naming the device (they go through the NCCL communicator, not built yet).
"""

from __future__ import annotations

import datetime
import os
import queue
import threading
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
from torch.futures import Future

from . import Communicator, Master
from .async_diloco import AsyncDiLoCo
from .diloco import DiLoCo, RoundReport
from .streaming import StreamingDiLoCo, SyncPointReport

__all__ = [
    "ProcessGroupPhalanx",
    "BACKEND",
    "AsyncDiLoCo",
    "DiLoCo",
    "RoundReport",
    "StreamingDiLoCo",
    "SyncPointReport",
]

#: The name to pass to ``torch.distributed.init_process_group``.
BACKEND = "phalanx"

_STORE_KEY = "phalanx/master"
_LEFT_KEY = "phalanx/left"

_OPS = [
    (dist.ReduceOp.SUM, "sum"),
    (dist.ReduceOp.PRODUCT, "prod"),
    (dist.ReduceOp.MIN, "min"),
    (dist.ReduceOp.MAX, "max"),
    (dist.ReduceOp.AVG, "avg"),
]

_DTYPES = {
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
}


def _op_name(op) -> str:
    for torch_op, name in _OPS:
        if op == torch_op:
            return name
    raise ValueError(f"phalanx backend: reduce op {op} is not supported (use SUM, PRODUCT, MIN, MAX or AVG)")


def _op_of(opts) -> str:
    """The phalanx op named by torch's options (SUM when torch passes none)."""
    return _op_name(opts.reduceOp if opts is not None else dist.ReduceOp.SUM)


def _check(t: torch.Tensor, what: str = "tensor") -> None:
    if t.device.type != "cpu":
        raise ValueError(
            f"phalanx backend: {what} is on {t.device}; this backend takes CPU tensors "
            "(GPU tensors need phalanx's NCCL communicator, not available in this build)"
        )
    if t.dtype not in _DTYPES:
        raise TypeError(f"phalanx backend: {what} has dtype {t.dtype}, which phalanx has no kernel for")


class _InPlace:
    """A contiguous tensor to hand to phalanx: the tensor itself when it is contiguous
    (no copy), else a contiguous copy written back by ``done()``."""

    def __init__(self, t: torch.Tensor, what: str = "tensor"):
        _check(t, what)
        self.t = t
        self.work = t if t.is_contiguous() else t.contiguous()

    def done(self) -> None:
        if self.work is not self.t:
            self.t.copy_(self.work)


class _Work(dist._Work):
    """The handle of one op: done once the op ran on this rank's thread."""

    def __init__(self, result: List[torch.Tensor]):
        super().__init__()
        self._result = result
        self._event = threading.Event()
        self._error: Optional[BaseException] = None
        self._future: Future = Future()

    def _finish(self, error: Optional[BaseException]) -> None:
        self._error = error
        self._event.set()
        if error is None:
            self._future.set_result(self._result)
        else:
            self._future.set_exception(error)

    def wait(self, timeout: Optional[datetime.timedelta] = None) -> bool:
        seconds = None if timeout is None or timeout == datetime.timedelta(0) else timeout.total_seconds()
        if not self._event.wait(seconds):
            raise TimeoutError(f"phalanx backend: op not done within {timeout}")
        if self._error is not None:
            raise self._error
        return True

    def is_completed(self) -> bool:
        return self._event.is_set()

    def is_success(self) -> bool:
        return self._event.is_set() and self._error is None

    def exception(self):
        return self._error

    def get_future(self) -> Future:
        return self._future

    def result(self) -> List[torch.Tensor]:
        return self._result


class _Runner:
    """One thread that runs a process group's ops in call order (blocking on its queue
    between ops, never spinning)."""

    def __init__(self, name: str):
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, run: Callable[[], None], result: List[torch.Tensor]) -> _Work:
        work = _Work(result)
        self._queue.put((run, work))
        return work

    def stop(self) -> None:
        self._queue.put(None)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            run, work = item
            try:
                run()
            except BaseException as e:  # noqa: BLE001 - handed to the waiter, not swallowed
                work._finish(e)
            else:
                work._finish(None)


def _host() -> str:
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    return "127.0.0.1" if host in ("localhost", "127.0.0.1", "::1", "") else host


class ProcessGroupPhalanx(dist.ProcessGroup):
    """A torch process group whose ops run on a phalanx communicator.

    Made by ``init_process_group("phalanx")`` and ``new_group(..., backend="phalanx")``;
    ``communicator`` gives the phalanx communicator itself (for ``update_topology``,
    ``sync_shared_state`` and the collectives torch has no name for).
    """

    def __init__(self, store, rank: int, size: int, timeout: datetime.timedelta, master: Optional[str] = None):
        super().__init__(rank, size)
        self._store = store
        secret = os.environ.get("PHALANX_SECRET")
        self._master: Optional[Master] = None
        if master is None:
            if rank == 0:
                local = _host() == "127.0.0.1"
                listen = "127.0.0.1:0" if local else "0.0.0.0:0"
                self._master = Master(listen, secret=secret, initial_peers=size)
                port = self._master.addr.rsplit(":", 1)[1]
                store.set(_STORE_KEY, f"{_host()}:{port}")
            master = store.get(_STORE_KEY).decode()
        timeout_ms = max(1, int(timeout.total_seconds() * 1000))
        bind = os.environ.get("PHALANX_BIND", "127.0.0.1:0")
        self.communicator = Communicator.connect(
            master, secret=secret, peer_id=rank, bind=bind, join_timeout_ms=timeout_ms, closed=True
        )
        if (self.communicator.rank, self.communicator.size) != (rank, size):
            got = (self.communicator.rank, self.communicator.size)
            self.communicator.leave()
            raise RuntimeError(
                f"phalanx backend: joined {master} as rank {got[0]} of {got[1]}, but torch "
                f"expects rank {rank} of {size}; start the master with --initial-peers {size} "
                "and give it no other peers"
            )
        self._runner = _Runner(f"phalanx-pg-{rank}")

    # -- bookkeeping ---------------------------------------------------------------

    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return BACKEND

    def _get_backend_name(self) -> str:
        return BACKEND

    def name(self) -> str:
        return BACKEND

    def shutdown(self) -> None:
        """Leaves the group and stops the op thread (and the embedded master, on rank 0,
        once every rank has left or 10 s passed: closing it earlier could cut off a rank
        whose last op's outcome is still on its way)."""
        self._runner.stop()
        self.communicator.leave()
        self._store.set(f"{_LEFT_KEY}/{self.rank()}", "1")
        if self._master is not None:
            keys = [f"{_LEFT_KEY}/{r}" for r in range(self.size())]
            try:
                self._store.wait(keys, datetime.timedelta(seconds=10))
            except Exception:  # noqa: BLE001 - a rank that died never says it left
                pass
            self._master.close()
            self._master = None

    def _submit(self, run: Callable[[], None], result: List[torch.Tensor]) -> _Work:
        return self._runner.submit(run, result)

    # -- collectives ---------------------------------------------------------------

    def allreduce(self, tensors, opts=None):
        op = _op_of(opts)
        bufs = [_InPlace(t) for t in tensors]

        def run():
            for b in bufs:
                self.communicator.all_reduce(b.work, op=op)
                b.done()

        return self._submit(run, list(tensors))

    def allreduce_coalesced(self, tensors, opts=None):
        return self.allreduce(tensors, opts)

    def broadcast(self, tensors, opts=None):
        root = opts.rootRank if opts is not None else 0
        bufs = [_InPlace(t) for t in tensors]

        def run():
            for b in bufs:
                self.communicator.broadcast(b.work, root=root)
                b.done()

        return self._submit(run, list(tensors))

    def reduce(self, tensors, opts=None):
        root = opts.rootRank if opts is not None else 0
        op = _op_of(opts)
        bufs = [_InPlace(t) for t in tensors]

        def run():
            for b in bufs:
                self.communicator.reduce(b.work, root=root, op=op)
                b.done()

        return self._submit(run, list(tensors))

    def allgather(self, output_tensors, input_tensors, opts=None):
        """``output_tensors[i][j]`` gets rank ``j``'s ``input_tensors[i]``."""
        for outs, t in zip(output_tensors, input_tensors):
            _check(t, "input")
            if len(outs) != self.size() or any(o.shape != t.shape or o.dtype != t.dtype for o in outs):
                raise ValueError(f"phalanx backend: all_gather needs {self.size()} outputs shaped like the input")

        def run():
            for outs, t in zip(output_tensors, input_tensors):
                flat = torch.empty((self.size(),) + tuple(t.shape), dtype=t.dtype)
                self.communicator.all_gather(t.contiguous(), flat)
                for j, o in enumerate(outs):
                    o.copy_(flat[j])

        return self._submit(run, [o for outs in output_tensors for o in outs])

    def _allgather_base(self, output, input, opts=None):
        out = _InPlace(output, "output")
        _check(input, "input")

        def run():
            self.communicator.all_gather(input.contiguous(), out.work)
            out.done()

        return self._submit(run, [output])

    all_gather_single = _allgather_base

    def reduce_scatter(self, output_tensors, input_tensors, opts=None):
        """``output_tensors[i]`` gets the reduction over ranks of their ``input_tensors[i][rank]``."""
        op = _op_of(opts)
        outs = [_InPlace(o, "output") for o in output_tensors]
        for ins in input_tensors:
            if len(ins) != self.size():
                raise ValueError(f"phalanx backend: reduce_scatter needs {self.size()} inputs per output")

        def run():
            for out, ins in zip(outs, input_tensors):
                counts = [t.numel() for t in ins]
                flat = torch.cat([t.reshape(-1) for t in ins])
                self.communicator.reduce_scatter(flat, out.work.view(-1), op=op, counts=counts)
                out.done()

        return self._submit(run, list(output_tensors))

    def _reduce_scatter_base(self, output, input, opts=None):
        op = _op_of(opts)
        out = _InPlace(output, "output")
        _check(input, "input")

        def run():
            self.communicator.reduce_scatter(input.contiguous().view(-1), out.work.view(-1), op=op)
            out.done()

        return self._submit(run, [output])

    reduce_scatter_single = _reduce_scatter_base

    def alltoall_base(self, output, input, output_split_sizes, input_split_sizes, opts=None):
        out = _InPlace(output, "output")
        _check(input, "input")
        n = self.size()
        # Splits are along dim 0; phalanx counts elements.
        row_in = input[0].numel() if input.dim() > 0 and input.shape[0] > 0 else 1
        row_out = output[0].numel() if output.dim() > 0 and output.shape[0] > 0 else 1

        def run():
            flat_in = input.contiguous().view(-1)
            if not input_split_sizes and not output_split_sizes:
                self.communicator.all_to_all(flat_in, out.work.view(-1))
            else:
                send = input_split_sizes or [input.shape[0] // n] * n
                received, counts = self.communicator.all_to_all_v(flat_in, [s * row_in for s in send])
                want = [s * row_out for s in (output_split_sizes or [output.shape[0] // n] * n)]
                if list(counts) != want:
                    raise ValueError(f"phalanx backend: all_to_all_single received {counts} elements per rank, expected {want}")
                out.work.view(-1).copy_(torch.from_numpy(received) if not isinstance(received, torch.Tensor) else received)
            out.done()

        return self._submit(run, [output])

    all_to_all_single = alltoall_base

    def barrier(self, opts=None):
        return self._submit(self.communicator.barrier, [])

    # -- point to point ------------------------------------------------------------

    def send(self, tensors, dst: int, tag: int = 0):
        bufs = [_InPlace(t) for t in tensors]

        def run():
            for b in bufs:
                self.communicator.send(dst, tag, b.work)

        return self._submit(run, list(tensors))

    def recv(self, tensors, src: int, tag: int = 0):
        bufs = [_InPlace(t) for t in tensors]

        def run():
            for b in bufs:
                self.communicator.recv(src, tag, b.work)
                b.done()

        return self._submit(run, list(tensors))


_world_made = False


def _create(opts, _backend_options=None):
    """torch's creator: the first group of a process may join ``PHALANX_MASTER``; every
    other (``new_group``) gets an embedded master on its rank 0."""
    global _world_made
    master = None if _world_made else os.environ.get("PHALANX_MASTER")
    _world_made = True
    return ProcessGroupPhalanx(opts.store, opts.group_rank, opts.group_size, opts.timeout, master=master)


if BACKEND.upper() not in dist.Backend._plugins:
    dist.Backend.register_backend(BACKEND, _create, extended_api=True, devices=["cpu"])
