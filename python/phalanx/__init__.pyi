"""Type stubs of phalanx: fault-tolerant collective communication, from Python.

Arrays ("ArrayLike" below) are C-contiguous numpy arrays, CPU tensors exported through
DLPack (torch, JAX, ...), or objects with the buffer protocol (bytearray, array.array,
memoryview). Supported element types: float16, bfloat16, float32, float64, int8, int16,
int32, int64, uint8, uint16, uint32, uint64. Collectives write their result into the
array in place, without copying it, with the GIL released.
"""

from types import TracebackType
from typing import Any, Callable, Dict, Iterator, List, Literal, Optional, Protocol, Sequence, Tuple, Type, Union

import numpy as np

__version__: str

ArrayLike = Any
"""A C-contiguous array of a supported element type (see the module docstring)."""

ReduceOpName = Literal["sum", "prod", "min", "max", "avg"]
StrategyName = Literal["popular", "receive", "send"]
ScanOpName = Literal["sum", "prod", "min", "max"]
ScanAlgorithmName = Literal["auto", "chain", "doubling"]
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

class DeviceError(PhalanxError):
    """The GPU path failed: no usable NCCL (the paths tried, the version found), or a
    device call failed. Not retryable."""

class PhalanxRuntimeError(PhalanxError):
    """The call cannot run where it was made, though its arguments are fine: phalanx
    could not start its threads, or a blocking call came from a thread running an async
    (tokio) runtime. Nothing was sent; retrying from the same place fails the same way."""

class Master:
    """A master: holds the view, admits joiners, removes lost peers, decides every
    collective's outcome. Runs on threads of its own until `close()`d or collected.

    Args:
        listen: "HOST:PORT" to listen on; port 0 picks a free one (see `addr`).
        secret: the cluster secret peers must prove; None accepts everyone.
        peer_timeout_ms: a peer silent this long is removed.
        max_pending: the most joiners that may wait for admission.
        standby: form no group of its own; take over the group of peers that lost
            their master (standbys, and a master restarted in place of a lost one).
        fence: step down when most of the group goes silent at once.
        initial_peers: the first view forms once this many peers joined, ranked by
            peer id.
    """

    def __init__(
        self,
        listen: str = "127.0.0.1:0",
        secret: Secret = None,
        peer_timeout_ms: int = 750,
        max_pending: int = 256,
        *,
        standby: bool = False,
        fence: bool = False,
        initial_peers: int = 1,
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

class P2pRequest:
    """A message started by `Communicator.isend` or `Communicator.irecv`. Dropping it
    does not cancel the message (a dropped receive still takes its message)."""

    def wait(self) -> None:
        """Waits (GIL released); for a receive writes the message into the array.
        Raises the message's error (PeerLostError, MismatchError, ...), leaving the
        array untouched. Repeated calls repeat the outcome."""
    def done(self) -> bool:
        """Whether the message has ended (`wait()` would not block)."""

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
        heartbeat_ms: int = 150,
        peer_id: Optional[int] = None,
        standby_masters: Sequence[str] = (),
        rejoin_ms: int = 10_000,
        closed: bool = False,
        data_transport: str = "auto",
        shared_memory: Literal["auto", "off"] = "auto",
    ) -> "Communicator":
        """Joins the group of the master at `master_addr` and waits until admitted.
        `data_transport`: "auto" or "tcp" (TCP+TLS), "quic", or "tcp-plain"
        (plaintext TCP, no encryption: trusted networks only).
        `retry_attempts > 1` reruns a collective over the survivors when a peer is
        lost. When the master is lost, the peer looks for one to rejoin (the same
        address restarted, then `standby_masters`) for `rejoin_ms`. `closed`: a fixed
        group (torch.distributed's contract): after the first loss every call raises
        PeerLostError. `shared_memory`: "auto" carries data links to peers on this host
        over shared memory, "off" keeps them on QUIC."""
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
    def all_scan(
        self,
        array: ArrayLike,
        op: ScanOpName = "sum",
        inclusive: bool = True,
        reverse: bool = False,
        *,
        algorithm: ScanAlgorithmName = "auto",
        blocks: int = 0,
    ) -> None:
        """Scans `array` over the peers, in place: rank r gets x_0 op ... op x_r
        (inclusive) or x_0 op ... op x_{r-1} (exclusive; rank 0 gets the identity), in
        rank order or, with `reverse`, rank n-1 first."""
    def all_scan_linear_attention(
        self,
        a: ArrayLike,
        s: ArrayLike,
        inclusive: bool = True,
        reverse: bool = False,
        *,
        algorithm: ScanAlgorithmName = "auto",
        blocks: int = 0,
    ) -> None:
        """Scans linear-attention states in place: float32 `a` of shape (d_k,) and `s` of
        shape (d_k, d_v), combined as (a1, S1), (a2, S2) -> (a1 * a2, diag(a2) S1 + S2)."""
    def all_to_all(self, input: ArrayLike, output: ArrayLike) -> None:
        """All-to-all with equal parts: part j of `input` goes to rank j; part i of
        `output` comes from rank i. Both hold `size * part` elements of one type."""
    def all_to_all_v(self, input: ArrayLike, send_counts: Sequence[int]) -> Tuple[np.ndarray, List[int]]:
        """All-to-all with uneven parts: `send_counts[j]` elements of `input` go to rank j.
        Returns what was received (a new array, parts in rank order) and the count from
        each rank."""
    def sparse_all_reduce(self, dim: int, indices: ArrayLike, values: ArrayLike) -> "SparseReduced":
        """Sums sparse vectors of dimension `dim` given as `(indices[k], values[k])` pairs
        (uint32 indices, values of any element type) over all peers, bit-identically
        (each index summed in ascending rank order); switches to a dense exchange past the
        density crossover 2·b_v / (n·(b_i + b_v))."""
    def sparse_all_gather(
        self,
        array: ArrayLike,
        lens: Sequence[int],
        owners: Sequence[int],
        holders: Sequence[Sequence[int]],
    ) -> None:
        """FSSDP spAG, in place: `array` holds all chunks in order (sum(lens) elements);
        chunk c has `lens[c]` elements, is owned by rank `owners[c]` and also held by the
        ranks in `holders[c]`, whose slots get the owner's bytes. Other slots are
        unchanged."""
    def sparse_reduce_scatter(
        self,
        array: ArrayLike,
        lens: Sequence[int],
        owners: Sequence[int],
        holders: Sequence[Sequence[int]],
        op: ReduceOpName = "sum",
    ) -> None:
        """FSSDP spRS, in place, with the placement as for `sparse_all_gather`: each
        owner's slot becomes the combination (`op`, not "avg") of all holders' slots of
        its chunk, in ascending rank order. Other slots are unchanged."""
    def barrier(self) -> None:
        """Returns once every peer has called it."""
    def traffic(self) -> Traffic:
        """A snapshot of the frames and payload bytes this peer has sent to and received
        from each other peer over its data links since it connected; cheap, no call to
        the group. `later.since(earlier)` is what moved in between."""
    def all_reduce_async(self, array: ArrayLike, op: ReduceOpName = "sum") -> AllReduceHandle:
        """Starts an all-reduce in the background; copies the array in now and the
        result back at `wait()`."""
    def sync_shared_state(self, state: SharedState, strategy: StrategyName = "popular") -> SyncReport:
        """Makes `state` bit-identical on every member."""
    def sub_all_reduce(self, array: ArrayLike, members: Sequence[int], op: ReduceOpName = "sum") -> None:
        """All-reduces `array` in place among the ranks `members` only (the caller among
        them); other ranks do not call it and are not delayed."""
    def send(self, to: int, tag: int, array: ArrayLike) -> None:
        """Sends `array` to rank `to` as one message with `tag`; does not wait for the
        matching `recv`."""
    def recv(self, from_: int, tag: int, array: ArrayLike) -> None:
        """Receives the next message with `tag` from rank `from_` into `array` (same size
        and element type as sent, else MismatchError)."""
    def isend(self, to: int, tag: int, array: ArrayLike) -> P2pRequest:
        """Starts sending a copy of `array` to rank `to` with `tag`; returns at once.
        Calls on one (peer, tag, direction) run in the order they were made."""
    def irecv(self, from_: int, tag: int, array: ArrayLike) -> P2pRequest:
        """Starts receiving the next message with `tag` from rank `from_`; `wait()`
        writes it into `array` (untouched on any error)."""
    @staticmethod
    def noloco_partner(seed: int, step: int, n: int, rank: int) -> Optional[int]:
        """`rank`'s NoLoCo partner among `n` ranks at `step`; None if left out (odd `n`)."""
    @staticmethod
    def noloco_pairs(seed: int, step: int, n: int) -> List[Tuple[int, int]]:
        """The NoLoCo pairing of ranks 0..n at `step`: pairs (a, b) with a < b."""
    def leave(self) -> None:
        """Leaves the group gracefully. Idempotent."""
    def __enter__(self) -> "Communicator": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...


# The result of `Communicator.sparse_all_reduce`.

class SparseReduced:
    """The result of `sparse_all_reduce`: the sums, and which exchange ran."""

    @property
    def is_dense(self) -> bool:
        """Whether the density passed the crossover and the dense exchange ran."""
    @property
    def indices(self) -> Optional[np.ndarray]:
        """The union of the indices, ascending (uint32); None after the dense exchange."""
    @property
    def values(self) -> np.ndarray:
        """The sums at `indices`, or the whole dense vector after the dense exchange."""
    def to_dense(self) -> np.ndarray:
        """The sums as a dense vector of `dim` elements (zeros elsewhere)."""

# The module-level forms, kept for older code: the methods themselves, called with the
# communicator first (`phalanx.all_to_all(comm, ...)` is `comm.all_to_all(...)`).
all_to_all = Communicator.all_to_all
all_to_all_v = Communicator.all_to_all_v
sparse_all_reduce = Communicator.sparse_all_reduce
sparse_all_gather = Communicator.sparse_all_gather
sparse_reduce_scatter = Communicator.sparse_reduce_scatter

def moe_place(
    owners: Sequence[int],
    loads: Sequence[float],
    overlap: int,
    slots: int,
    *,
    devices: Optional[int] = None,
    hosts: Optional[Sequence[int]] = None,
) -> List[List[int]]:
    """Plans P' of one MoE layer for one iteration (FSSDP, the reference's Algorithm 1):
    per expert, the devices holding it, ascending, its owner included (the `holders` of
    `Communicator.sparse_all_gather`). ValueError for inputs no placement fits."""

class Dispatched:
    """What `ExpertLayer.dispatch` delivered to this device; pass it to
    `ExpertLayer.combine` with the experts' outputs. `len()` is the number of tokens."""

    @property
    def tokens(self) -> np.ndarray:
        """The tokens this device computes, shape (len(self), hidden), of the dispatched
        element type: grouped by the device they came from (ascending), then by expert
        (ascending), then in their order there."""
    @property
    def experts(self) -> np.ndarray:
        """The expert of each token (int64)."""
    @property
    def sources(self) -> np.ndarray:
        """The device each token came from (int64)."""
    @property
    def compute(self) -> List[int]:
        """Tokens each device computes under the group's plan (the same on every device;
        the largest is the straggler's)."""
    @property
    def routes(self) -> List[Tuple[int, int, int, int]]:
        """The group's plan as (from, expert, to, tokens): device `from`'s next `tokens`
        tokens of `expert`, in its order, go to device `to`."""
    def __len__(self) -> int: ...

class Traffic:
    """A snapshot of a communicator's data-link traffic (`Communicator.traffic()`), per
    peer id: frames and payload bytes (headers excluded) sent and received. Collectives,
    point-to-point messages and state synchronisation count; the master's control
    connection does not. Received counts are exact where the group is quiet (between two
    barriers). Each peer's counters are a dict with the keys frames_sent, bytes_sent,
    frames_received and bytes_received."""

    @property
    def peers(self) -> Dict[int, Dict[str, int]]:
        """The counters of every peer this one has exchanged frames with, by peer id."""
    @property
    def total(self) -> Dict[str, int]:
        """The counters summed over all peers."""
    def peer(self, peer_id: int) -> Dict[str, int]:
        """The counters of one peer (zeros if none)."""
    def since(self, earlier: Traffic) -> Traffic:
        """What moved after `earlier` (a snapshot of the same communicator)."""

class MoeStepHandle:
    """A layer step started by `ExpertLayer.materialize_start`, `reduce_gradients_start`
    or `rematerialize_start`."""

    def wait(self) -> None:
        """Waits (GIL released) and writes the step's result into its array; raises the
        step's error (PeerLostError, AbortedError), leaving the array as it was. Repeated
        calls repeat the outcome."""
    def done(self) -> bool:
        """Whether the step has finished (`wait()` would not block)."""

class DispatchHandle:
    """A dispatch started by `ExpertLayer.dispatch_start`."""

    def wait(self) -> Dispatched:
        """Waits (GIL released) and returns what arrived here; raises the dispatch's
        error. Repeated calls repeat the outcome."""
    def done(self) -> bool:
        """Whether the dispatch has finished (`wait()` would not block)."""

class CombineHandle:
    """A combine started by `ExpertLayer.combine_start`."""

    def wait(self) -> np.ndarray:
        """Waits (GIL released) and returns this device's rows in the order of its
        tokens as given to the dispatch; raises the combine's error. Repeated calls
        repeat the outcome."""
    def done(self) -> bool:
        """Whether the combine has finished (`wait()` would not block)."""

class ReleasedReplicas:
    """A device's parameters with the replicas freed (`ExpertLayer.release_replicas`):
    only the experts it owns. Stays usable after `rematerialize_start`."""

    @property
    def owned(self) -> np.ndarray:
        """The owned experts' parameters, ascending by expert (a 1-D copy)."""
    @property
    def freed_elements(self) -> int:
        """Elements freed against the full array (replicas and experts not held)."""
    @property
    def freed_bytes(self) -> int:
        """Bytes freed."""

class DeviceCommunicator:
    """The device side of one member of `comm`'s group: collectives on device buffers
    that follow the communicator's views (each view's device communicator is made,
    shrunk or grown by every member together, from a unique id the master relays).
    After a `DeviceError` from a collective, retry: the next call makes a new device
    communicator (the same view's next generation when every peer lives; call
    `comm.update_topology()` first when a peer was lost).

    `backend`: "standin" (CPU, float32 arrays, ranks of this process: for tests) or
    "nccl" (CUDA tensors through DLPack; raises `DeviceError` when no usable NCCL is
    found, or when the package was built without its `nccl` feature).

    Arrays: on the stand-in, C-contiguous float32 arrays (numpy, CPU DLPack tensors,
    buffers), those written writable; CUDA tensors raise `TypeError`. On NCCL,
    C-contiguous CUDA tensors with `__dlpack__`/`__dlpack_device__` (torch, cupy) of one
    element type on the communicator's GPU; others raise `TypeError`. `stream`: the
    `cudaStream_t` to enqueue on, as an int (`torch.cuda.current_stream().cuda_stream`);
    None is the legacy default stream. It is passed to the producer's
    `__dlpack__(stream=...)`. Each tensor a call writes is first copied in device
    memory, and the call returns once the stream has run it: a failed call
    (`DeviceError`) leaves the tensors as they were. The stand-in ignores it. A root or peer outside the view, or mismatched lengths, raise
    `ValueError` before anything is sent (the device communicator is kept). Every method
    is a collective: every member calls it.
    """

    def __init__(self, comm: Communicator, backend: str = "standin") -> None: ...
    @property
    def backend(self) -> str: ...
    def all_reduce(self, array: Any, op: str = "sum", *, stream: Optional[int] = None) -> None:
        """Reduces `array` over every member in place (op: sum, prod, min, max, avg);
        unchanged on error on the stand-in."""
    def reduce_scatter(self, send: Any, recv: Any, op: str = "sum", *, stream: Optional[int] = None) -> None:
        """Reduces every member's `send` (size equal shards); shard `rank` lands in
        `recv` (len(send) / size elements)."""
    def all_gather(self, send: Any, recv: Any, *, stream: Optional[int] = None) -> None:
        """Concatenates every member's `send`, in rank order, into `recv`
        (size * len(send) elements)."""
    def broadcast(self, array: Any, root: int, *, stream: Optional[int] = None) -> None:
        """Copies rank `root`'s `array` into every member's `array`, in place."""
    def reduce(self, array: Any, root: int, op: str = "sum", *, stream: Optional[int] = None) -> None:
        """Reduces every member's `array` into rank `root`'s, in place; the others' are
        left as they were."""
    def send_recv(
        self,
        sends: Sequence[Tuple[int, Any]] = (),
        recvs: Sequence[Tuple[int, Any]] = (),
        *,
        stream: Optional[int] = None,
    ) -> None:
        """One group of sends and receives: each (peer, array) of `sends` goes to rank
        `peer`, each of `recvs` is filled from rank `peer` (same length and type as the
        send it meets). On the stand-in a receive that meets no send raises
        `DeviceError`, the receives unchanged."""
    def all_to_all(self, send: Any, recv: Any, *, stream: Optional[int] = None) -> None:
        """Chunk j of `send` goes to rank j, chunk j of `recv` comes from rank j; equal
        lengths, a multiple of the view's size."""

class ExpertLayer:
    """One MoE layer's communication for one iteration over `comm`'s group (FSSDP): every
    device makes one from the same placement P' and calls its steps in the same order.

    Expert `e` is owned by `owners[e]` and held by the devices in `holders[e]` (what
    `moe_place` returns; the owner always holds; None: every expert on its owner only).
    Parameters and gradients are arrays of `params_len` elements, expert `e` at
    `expert_slice(e)` (`expert_len` elements) on every device; tokens are rows of
    `hidden` elements. With `hosts`, dispatch prefers a replica on a token's host.

    An iteration: `materialize(params)` (spAG P -> P'), the attention forward,
    `dispatch(tokens, experts)`, the experts on what arrived, `combine(dispatched,
    outputs)`, and after the backward `reduce_gradients(grads)` (spRS P' -> P). Each
    step blocks with the GIL released; after an error the arrays hold what they held
    before (PeerLostError / AbortedError: plan again for the survivors). ValueError for
    an owner or holder outside the group. Each step also has a started form
    (`materialize_start`, `dispatch_start`, `combine_start`, `reduce_gradients_start`)
    returning a handle at once, so that it overlaps compute, and `release_replicas`
    with `rematerialize_start` free the replicas between the forward and the backward.

    Top-k routing: one row per token and choice; the backward's output gradients,
    dispatched with the same experts, arrive in the same order as the tokens did.
    """

    def __init__(
        self,
        comm: Communicator,
        owners: Sequence[int],
        holders: Optional[Sequence[Sequence[int]]],
        expert_len: int,
        hidden: int,
        *,
        hosts: Optional[Sequence[int]] = None,
    ) -> None: ...
    @property
    def params_len(self) -> int:
        """Elements of the parameter (and gradient) array: experts * expert_len."""
    @property
    def holders(self) -> List[List[int]]:
        """The devices holding each expert, ascending, the owner included."""
    def expert_slice(self, e: int) -> slice:
        """Expert `e`'s slot in the parameter array."""
    def materialize(self, params: ArrayLike) -> None:
        """spAG, in place: every slot this device holds receives its owner's bytes;
        other slots are unchanged."""
    def dispatch(self, tokens: ArrayLike, experts: Union[Sequence[int], np.ndarray]) -> Dispatched:
        """Sends this device's tokens (rows of `hidden`, one expert each) to devices
        holding their experts (a local replica first, an expert's tokens split evenly
        over its holders); returns what arrived here. ValueError for an expert outside
        the layer, before anything is sent."""
    def combine(self, dispatched: Dispatched, outputs: ArrayLike) -> np.ndarray:
        """Sends the outputs (one row per token of `dispatched`, in its order, of its
        element type) back; returns this device's rows in the order of its tokens as
        given to `dispatch`, shape (len(experts), hidden)."""
    def reduce_gradients(self, grads: ArrayLike) -> None:
        """spRS, in place: each owner's slot becomes the sum of its holders' slots, added
        in ascending device order (the same bits every run); other slots unchanged."""
    def materialize_start(self, params: ArrayLike) -> MoeStepHandle:
        """Starts `materialize` on a copy of `params` and returns at once (to overlap the
        attention forward); `wait()` writes the result into `params`, or raises and
        leaves it as it was."""
    def reduce_gradients_start(self, grads: ArrayLike) -> MoeStepHandle:
        """Starts `reduce_gradients` on a copy of `grads` and returns at once (to overlap
        the attention backward); `wait()` writes the result into `grads`."""
    def release_replicas(self, params: ArrayLike) -> ReleasedReplicas:
        """Re-materialisation, after the forward: keeps only the experts this device
        owns (a copy), so that `params` may be freed until the backward. Local."""
    def rematerialize_start(self, released: ReleasedReplicas, params: ArrayLike) -> MoeStepHandle:
        """Re-materialisation, before the backward: starts the spAG that makes the full
        parameters again from `released`; `wait()` writes them into `params`
        (`params_len` elements of the released type; zeros in slots not held)."""
    def dispatch_start(self, tokens: ArrayLike, experts: Union[Sequence[int], np.ndarray]) -> DispatchHandle:
        """Starts `dispatch` of a copy of `tokens` and returns at once: the count
        exchange and the tokens' all-to-all run in the background. ValueError for an
        expert outside the layer, before anything starts."""
    def combine_start(self, dispatched: Dispatched, outputs: ArrayLike) -> CombineHandle:
        """Starts `combine` of a copy of `outputs` and returns at once (no count exchange:
        the counts are the dispatch's)."""
    def replica_len(self, device: int) -> int:
        """Elements of the replicas `device` holds (held, not owned) this iteration."""

def moe_simulate(
    *,
    devices: int = 8,
    experts: int = 32,
    zipf: float = 1.2,
    tokens: int = 4096,
    iterations: int = 20,
    overlap: int = 2,
    slots: int = 2,
    seed: int = 1,
    expert_bytes: int = 16 << 20,
    token_bytes: int = 2048,
) -> dict:
    """Simulates one MoE layer under EP, FSDP and FSSDP on a Zipf trace: a dict with
    `ep`, `fsdp`, `fssdp` (each `straggler`, `param_bytes`, `token_bytes`, and per device
    `compute`, `traffic`, `memory`), `straggler_ratio` and `traffic_ratio`."""

Move = Tuple[int, int, int, int]
"""One expert changing owner: (layer, expert, from, to)."""

class Sharding:
    """The sharded placement P of FSSDP: the owner of every expert of every MoE layer.
    `Sharding(devices, owners, expert_bytes)` gives one outright (`owners[l][e]` owns
    expert e of layer l, each `expert_bytes[l]` bytes); `plan_sharding` plans one."""
    def __init__(self, devices: int, owners: Sequence[Sequence[int]], expert_bytes: Sequence[int]) -> None: ...
    @property
    def devices(self) -> int:
        """The number of devices."""
    @property
    def layers(self) -> int:
        """The number of MoE layers."""
    def owners(self, layer: int) -> List[int]:
        """The owner of each expert of layer `layer`."""
    def expert_bytes(self, layer: int) -> int:
        """Bytes of one expert of layer `layer`."""
    def owned(self, device: int, layer: int) -> List[int]:
        """The experts of layer `layer` that `device` owns, ascending."""
    def memory(self, device: int) -> int:
        """Bytes `device` keeps at rest: its experts of every layer."""
    def moves_to(self, next: "Sharding") -> List[Move]:
        """The moves that turn this sharding into `next`, by layer then expert."""
    def transfer_holders(self, next: "Sharding", layer: int) -> List[List[int]]:
        """Per expert of `layer`, the holders of the spAG that re-sharding to `next`
        runs (current owner, and next owner where it moves)."""
    def after_loss(self, lost: int, backups: "Backups") -> "Sharding":
        """The sharding of the survivors when device `lost` is gone: its experts go to
        their backups, the devices after it move down by one."""

def plan_sharding(
    capacities: Sequence[int],
    layers: Sequence[Union[Tuple[int, int], Tuple[int, int, Optional[Sequence[float]]]]],
) -> Sharding:
    """Plans P: every expert one owner, each device's share of the experts' bytes in
    proportion to its capacity. `layers`: (experts, expert_bytes) or (experts,
    expert_bytes, loads) per layer. ValueError when the experts do not fit."""

class Backups:
    """A backup owner for every expert (see `plan_backups`)."""
    def of(self, layer: int, expert: int) -> int:
        """The backup of expert `expert` of layer `layer`."""
    def layer(self, layer: int) -> List[int]:
        """The backups of layer `layer`'s experts, in order."""
    def backed_up_by(self, device: int, layer: int) -> List[int]:
        """The experts of layer `layer` that `device` backs up."""
    def sync_bytes(self, sharding: Sharding) -> List[int]:
        """Bytes each device sends per iteration to keep its backups in step."""
    def holders(self, sharding: Sharding, layer: int) -> List[List[int]]:
        """Per expert of `layer`, the holders (owner and backup) of the spAG that copies
        each owner's slot to its backup."""

def plan_backups(sharding: Sharding, *, hosts: Optional[Sequence[int]] = None) -> Backups:
    """A backup for every expert: a device other than its owner (on another host when
    `hosts` are given and there is one), the backups' bytes spread evenly. ValueError
    with fewer than 2 devices."""

class LoadPredictor:
    """Each expert's predicted load: the mean of the gate's counts over the last
    `window` iterations (default 5)."""
    def __init__(self, experts: int, window: Optional[int] = None) -> None: ...
    def observe(self, counts: Sequence[float]) -> None:
        """Feeds one iteration's gate counts (tokens per expert, all devices summed)."""
    def predict(self) -> Optional[List[float]]:
        """The mean load per expert over the window; None before any observation."""

class ReshardEvery:
    """Re-shard every `k` iterations over devices of `capacities` bytes each."""
    def __init__(self, k: int, capacities: Sequence[int]) -> None: ...
    @property
    def k(self) -> int: ...
    @property
    def capacities(self) -> List[int]: ...
    def due(self, iteration: int) -> bool:
        """Whether iteration `iteration` (from 0) starts with a re-sharding: every k-th,
        never the first."""
    def plan(self, now: Sharding, loads: Sequence[Optional[Sequence[float]]]) -> Sharding:
        """The next sharding from each layer's predicted loads (None where unknown)."""
    def move_state(
        self, comm: Communicator, now: Sharding, next: Sharding, layer: int, buffers: Sequence[ArrayLike]
    ) -> List[Move]:
        """Moves layer `layer`'s state (parameters, then each optimizer-state buffer: a
        slot per expert, all of one length) from `now`'s owners to `next`'s with one spAG
        per buffer; every device calls it alike. Returns the layer's moves. On error the
        slots this device owns under `now` are unchanged."""

def pipeline_schedule(
    schedule: Literal["1f1b", "interleaved", "zbh1", "zb2p", "auto", "zbv", "vhalf", "vmin"],
    stages: int,
    microbatches: int,
    *,
    chunks: int = 2,
    costs: Tuple[float, float, float, float] = (1.0, 1.0, 1.0, 0.0),
    memory_limit: Optional[float] = None,
) -> dict:
    """Generates a pipeline schedule, checks it and simulates one iteration: a dict with
    `name`, `orders` (per stage, (pass, micro-batch, chunk)), `timeline` (per stage,
    (start, end)), `spans`, `iteration`, `bubble` and `peak_memory`. "zb2p" is the
    automatic zero-bubble scheduler at 2 * stages micro-batches of memory, "auto" the same
    scheduler under `memory_limit` (which it needs). ValueError for unsupported
    parameters or an exceeded memory limit."""

ScheduleName = Literal["1f1b", "interleaved", "zbh1", "zb2p", "auto", "zbv", "vhalf", "vmin"]

ExecutedPass = Tuple[str, int, int, float, float, float, float]
"""(pass, micro-batch, chunk, begin, ready, computed, end): a pass as it ran, times in
seconds since the run began (ready: its input was in; computed: its callback returned)."""

class PipelineStep:
    """Where a pass sits in the model, as `PipelineRunner.run` passes it to each callback."""

    mb: int
    """The micro-batch, from 0."""
    chunk: int
    """The chunk of this stage, from 0."""
    virtual_stage: int
    """The virtual stage (part of the model) this chunk holds, from 0."""
    virtual_stages: int
    """How many virtual stages the model has (stages * chunks)."""
    is_first: bool
    """The model's first part: its forward gets an empty input (read the micro-batch)."""
    is_last: bool
    """The model's last part: its forward keeps the loss (return None), its backward
    gets an empty gradient (start from the loss)."""

class PipelineStage(Protocol):
    """What `PipelineRunner.run` calls, one method per pass, in the schedule's order.
    Arrays are 1-D numpy copies of the runner's dtype; results must have that dtype and
    the lengths `input_len` / `output_len` give. The object may also define `backward(step,
    grad)` (fused input and weight gradient, for the BW passes of 1F1B and interleaved
    1F1B); without it those passes call `backward_input` then `backward_weight`. For
    type checkers only (not importable)."""

    def input_len(self, step: PipelineStep) -> int:
        """Elements of the activation `step`'s forward receives (equal to the previous
        virtual stage's `output_len`)."""
    def output_len(self, step: PipelineStep) -> int:
        """Elements of `step`'s forward output."""
    def forward(self, step: PipelineStep, x: np.ndarray) -> Optional[np.ndarray]:
        """The output activation (None on the last virtual stage)."""
    def backward_input(self, step: PipelineStep, grad: np.ndarray) -> Optional[np.ndarray]:
        """B: the gradient of the input from that of the output (None on the first
        virtual stage)."""
    def backward_weight(self, step: PipelineStep) -> None:
        """W: the weight gradient, after this micro-batch's `backward_input`."""

class PipelineRunner:
    """One stage of a pipeline schedule, run iteration after iteration on a
    `Communicator` (stage s on rank s): activations and gradients move between the
    stages' ranks with tagged point-to-point messages while the stage object computes."""

    def __init__(
        self,
        schedule: ScheduleName,
        stages: int,
        microbatches: int,
        stage: int,
        *,
        chunks: int = 2,
        costs: Tuple[float, float, float, float] = (1.0, 1.0, 1.0, 0.0),
        memory_limit: Optional[float] = None,
        dtype: Any = None,
        ranks: Optional[Sequence[int]] = None,
    ) -> None:
        """`chunks` is for "interleaved"; `costs` (F, B, W, COMM) and `memory_limit` guide
        the automatic schedulers (and refuse a schedule over the limit); `dtype` is
        float32 (default) or float64; stage s runs on rank `ranks[s]` (default s; one
        distinct rank per stage, so that several pipelines share a group). ValueError
        for parameters no schedule supports."""
    @property
    def order(self) -> List[Tuple[str, int, int]]:
        """This stage's passes in order: (pass, micro-batch, chunk), pass "F", "B", "W" or "BW"."""
    @property
    def stage(self) -> int:
        """The stage this runner runs."""
    def run(self, comm: Communicator, stage: PipelineStage) -> List[ExecutedPass]:
        """Runs this stage's passes of one iteration: the GIL is released while the runner
        waits on the network and held in each callback (which must not use `comm`).
        Returns the executed timeline. A callback's exception is raised again, with a
        note naming the stage and the pass (then leave the group: the other stages wait
        for this one); a lost neighbour raises PeerLostError or AbortedError naming the
        pass. Returns when this stage's list is done; the others may still run theirs."""
    def finish(self, comm: Communicator) -> None:
        """Waits until every stage has run its list; call it after the last iteration,
        before leaving the group."""

class PipelineGrid:
    """Where the pp stages × dp replicas of a grid of pipelines run on a group: position
    (stage, replica) on rank replica·pp + stage for a fresh group (`in_order`), or
    placed by held positions after a view change (`place`)."""

    @staticmethod
    def in_order(pp: int, dp: int, rank: int) -> "PipelineGrid":
        """The grid on a fresh group of pp·dp ranks, as seen by `rank`."""
    @staticmethod
    def place(comm: Communicator, pp: int, dp: int, held: Optional[Tuple[int, int]] = None) -> "PipelineGrid":
        """Every rank says which (stage, replica) it held (None: a newcomer, which takes
        a free position in rank order). A collective of the whole group."""
    @property
    def me(self) -> Tuple[int, int]:
        """This rank's (stage, replica)."""
    @property
    def shape(self) -> Tuple[int, int]:
        """(pp, dp)."""
    def pipeline(self, replica: int) -> List[int]:
        """The ranks of `replica`'s pipeline, by stage."""
    def dp_group(self, stage: int) -> List[int]:
        """The ranks holding `stage`, in rank order."""
    def runner(
        self,
        schedule: ScheduleName,
        microbatches: int,
        *,
        chunks: int = 2,
        costs: Tuple[float, float, float, float] = (1.0, 1.0, 1.0, 0.0),
        memory_limit: Optional[float] = None,
        dtype: Any = None,
    ) -> PipelineRunner:
        """The runner of this rank's stage on its replica's pipeline (pp stages)."""
    def all_reduce_gradients(self, comm: Communicator, grads: np.ndarray, op: str = "sum") -> None:
        """All-reduces this stage's gradients in place among its replicas (every rank of
        the grid calls it after its run)."""
    def finish(self, comm: Communicator) -> None:
        """Waits until every rank of the grid is done; call it before leaving."""

class PipelineCommitter:
    """The end of an iteration on one rank of a grid: the optimizer post-validation
    (global gradient norm and inf/NaN flags along the pipeline) and a vote of every rank,
    so that the step is kept on every rank or on none."""

    def __init__(self, grid: PipelineGrid, runner: PipelineRunner, max_norm: Optional[float] = None) -> None:
        """Clips the global gradient norm at `max_norm` (None: no clipping)."""
    def step(
        self,
        comm: Communicator,
        grads: Union[np.ndarray, Sequence[np.ndarray]],
        step: Callable[[float], Any],
        undo: Callable[[], Any],
    ) -> Tuple[str, float, float]:
        """Steps the optimizer (`step(scale)`, then `undo()` if the step must not stand)
        on every rank or none; `grads` are the stage's gradients after
        `all_reduce_gradients`. Returns (verdict, scale, norm): "keep", "skip" (inf/NaN:
        undone) or "clip" (redone with `scale`). On an exception the step was undone."""
