"""phalanx: fault-tolerant collective communication, from Python.

Peers that may join, leave or crash run all-reduce, reduce-scatter, all-gather,
broadcast, reduce and barrier over QUIC, held together by a master. Collectives work in
place on numpy arrays (and CPU tensors through DLPack, and buffer-protocol objects)
without copying them, with the GIL released while they run.

    import numpy as np, phalanx

    comm = phalanx.Communicator.connect("10.0.0.1:7000", secret="...")
    grad = np.ones(1 << 20, dtype=np.float32)
    comm.update_topology()              # admit joiners, settle losses
    comm.all_reduce(grad, op="avg")     # in place

See README.md ("From Python") for a DiLoCo-style training loop.
"""

from ._native import (
    AbortedError,
    AllReduceHandle,
    Communicator,
    JoinFailedError,
    Master,
    MismatchError,
    P2pRequest,
    PeerLostError,
    PipelineCommitter,
    PipelineGrid,
    PipelineRunner,
    PipelineStep,
    PhalanxError,
    PhalanxRuntimeError,
    ProtocolError,
    DeviceCommunicator,
    DeviceError,
    Dispatched,
    ExpertLayer,
    MoeStepHandle,
    DispatchHandle,
    CombineHandle,
    ReleasedReplicas,
    Traffic,
    RemovedError,
    SharedState,
    SyncReport,
    TransportError,
    __version__,
    moe_place,
    moe_simulate,
    pipeline_schedule,
)
from ._native import SparseReduced
from ._native import Backups, LoadPredictor, ReshardEvery, Sharding, plan_backups, plan_sharding

# The sparse collectives and all-to-all used to be module functions taking the
# communicator first. They are Communicator methods now; these names stay for older
# code, as the methods themselves: `phalanx.all_to_all(comm, ...)` is `comm.all_to_all(...)`.
all_to_all = Communicator.all_to_all
all_to_all_v = Communicator.all_to_all_v
sparse_all_reduce = Communicator.sparse_all_reduce
sparse_all_gather = Communicator.sparse_all_gather
sparse_reduce_scatter = Communicator.sparse_reduce_scatter

__all__ = [
    "moe_place",
    "moe_simulate",
    "pipeline_schedule",
    "PipelineCommitter",
    "PipelineGrid",
    "PipelineRunner",
    "PipelineStep",
    "AbortedError",
    "AllReduceHandle",
    "Communicator",
    "JoinFailedError",
    "Master",
    "MismatchError",
    "P2pRequest",
    "PeerLostError",
    "PhalanxError",
    "PhalanxRuntimeError",
    "ProtocolError",
    "DeviceCommunicator",
    "DeviceError",
    "Dispatched",
    "ExpertLayer",
    "MoeStepHandle",
    "DispatchHandle",
    "CombineHandle",
    "ReleasedReplicas",
    "Traffic",
    "RemovedError",
    "SharedState",
    "SyncReport",
    "TransportError",
    "__version__",
    "SparseReduced",
    "all_to_all",
    "all_to_all_v",
    "sparse_all_gather",
    "sparse_all_reduce",
    "sparse_reduce_scatter",
    "Backups",
    "LoadPredictor",
    "ReshardEvery",
    "Sharding",
    "plan_backups",
    "plan_sharding",
]
