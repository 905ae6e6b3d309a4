"""Type stubs of phalanx: fault-tolerant collective communication, from Python.

Arrays ("ArrayLike" below) are C-contiguous numpy arrays, CPU tensors exported through
DLPack (torch, JAX, ...), or objects with the buffer protocol (bytearray, array.array,
memoryview). Supported element types: float16, bfloat16, float32, float64, int8, int16,
int32, int64, uint8, uint16, uint32, uint64. Collectives write their result into the
array in place, without copying it, with the GIL released.
"""

from types import TracebackType
from typing import Any, Iterator, List, Literal, Optional, Sequence, Type, Union

import numpy as np

__version__: str

ArrayLike = Any
"""A C-contiguous array of a supported element type (see the module docstring)."""

ReduceOpName = Literal["sum", "prod", "min", "max", "avg"]
StrategyName = Literal["popular", "receive", "send"]
Secret = Union[str, bytes, None]

class PhalanxError(Exception):
    """Base class of the errors of a failed collective or membership call. After any
    error from a collective, its arrays hold exactly what they held before the call."""

class PeerLostError(PhalanxError):
    """A peer crashed, hung or left while the collective ran. The array was restored:
    call `update_topology()` and retry, or connect with `retry_attempts > 1`."""

    rank: int
    """The lost peer's rank in the view the collective ran in."""

class AbortedError(PhalanxError):
    """The collective was aborted (another rank failed); the array was restored."""

class MismatchError(PhalanxError):
    """Peers called different collectives, sizes, element types or operators."""

class RemovedError(PhalanxError):
    """This peer is no longer a member (timed out, or the master is unreachable)."""

class JoinFailedError(PhalanxError):
    """Joining failed: refused, unreachable master, wrong secret or join timeout."""

class ProtocolError(PhalanxError):
    """A peer broke the protocol."""

class TransportError(PhalanxError):
    """A transport failed in a way not attributable to one peer."""

class Master:
    """A master: holds the view, admits joiners, removes lost peers, decides every
    collective's outcome. Runs on threads of its own until `close()`d or collected.

    Args:
        listen: "HOST:PORT" to listen on; port 0 picks a free one (see `addr`).
        secret: the cluster secret peers must prove; None accepts everyone.
        peer_timeout_ms: a peer silent this long is removed.
        max_pending: the most joiners that may wait for admission.
    """

    def __init__(
        self,
        listen: str = "127.0.0.1:0",
        secret: Secret = None,
        peer_timeout_ms: int = 1000,
        max_pending: int = 256,
    ) -> None: ...
    @property
    def addr(self) -> str:
        """The address peers connect to ("HOST:PORT")."""
    @property
    def running(self) -> bool:
        """Whether the master runs (not closed)."""
    def close(self) -> None:
        """Stops the master. Idempotent."""
    def __enter__(self) -> "Master": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...

class SyncReport:
    """What a shared-state sync did on this peer."""

    tensors_received: int
    bytes_received: int
    tensors_sent: int

class AllReduceHandle:
    """An all-reduce started by `Communicator.all_reduce_async`."""

    def wait(self) -> None:
        """Waits (GIL released) and writes the result into the array; raises the
        collective's error, leaving the array untouched. Repeated calls repeat the
        outcome."""
    def done(self) -> bool:
        """Whether the collective has finished (`wait()` would not block)."""

class SharedState:
    """Named arrays plus a revision, kept bit-identical across peers by
    `Communicator.sync_shared_state`. `state[name] = array` copies in; `state[name]`
    returns a numpy copy with the inserted shape."""

    revision: int
    """Bump it whenever the content changes; a sync adopts the agreed revision."""

    def __init__(self) -> None: ...
    def __setitem__(self, name: str, value: ArrayLike) -> None: ...
    def __getitem__(self, name: str) -> np.ndarray: ...
    def __contains__(self, name: object) -> bool: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[str]: ...
    def keys(self) -> List[str]:
        """Tensor names in insertion order."""
    def digest(self) -> bytes:
        """32-byte BLAKE3 hash of names, element types and bytes (not the revision)."""
    def hexdigest(self) -> str:
        """`digest()` as hex."""

class Communicator:
    """One peer's handle on a group. Make one with `Communicator.connect`.

    Collectives block until done on this peer, work in place on the array without
    copying it, and release the GIL meanwhile. After an error the array is restored.
    Calls from several threads take turns.
    """

    @staticmethod
    def connect(
        master_addr: str,
        secret: Secret = None,
        retry_attempts: int = 1,
        *,
        bind: str = "127.0.0.1:0",
        join_timeout_ms: Optional[int] = None,
        heartbeat_ms: int = 200,
        peer_id: Optional[int] = None,
    ) -> "Communicator":
        """Joins the group of the master at `master_addr` and waits until admitted.
        `retry_attempts > 1` reruns a collective over the survivors when a peer is
        lost."""
    @property
    def rank(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    @property
    def peer_id(self) -> int: ...
    @property
    def members(self) -> List[int]: ...
    @property
    def peers_pending(self) -> int: ...
    def update_topology(self) -> None:
        """A round among all members: admits joiners, settles losses."""
    def all_reduce(self, array: ArrayLike, op: ReduceOpName = "sum") -> None:
        """Reduces `array` over all peers, in place."""
    def all_reduce_quantized(self, array: ArrayLike, op: Literal["sum", "avg"] = "sum", bits: Literal[8, 16] = 8) -> None:
        """Sums or averages a float32 `array` over all peers, in place, sending 8- or
        16-bit min-max codes; approximate but bitwise identical on every peer."""
    def reduce_scatter(
        self,
        input: ArrayLike,
        output: ArrayLike,
        op: ReduceOpName = "sum",
        counts: Optional[Sequence[int]] = None,
    ) -> None:
        """Reduces `input` (size * len(output) elements) and writes this rank's
        segment into `output`."""
    def all_gather(self, input: ArrayLike, output: ArrayLike, counts: Optional[Sequence[int]] = None) -> None:
        """Concatenates every peer's `input`, in rank order, into `output`."""
    def broadcast(self, array: ArrayLike, root: int = 0) -> None:
        """Copies rank `root`'s array into every peer's array."""
    def reduce(self, array: ArrayLike, root: int = 0, op: ReduceOpName = "sum") -> None:
        """Reduces every peer's array into rank `root`'s array."""
    def barrier(self) -> None:
        """Returns once every peer has called it."""
    def all_reduce_async(self, array: ArrayLike, op: ReduceOpName = "sum") -> AllReduceHandle:
        """Starts an all-reduce in the background; copies the array in now and the
        result back at `wait()`."""
    def sync_shared_state(self, state: SharedState, strategy: StrategyName = "popular") -> SyncReport:
        """Makes `state` bit-identical on every member."""
    def leave(self) -> None:
        """Leaves the group gracefully. Idempotent."""
    def __enter__(self) -> "Communicator": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...

