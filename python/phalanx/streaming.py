"""Streaming DiLoCo on a torch model over a phalanx group that loses and gains peers.

The model is cut into P fragments. Instead of one model-size all-reduce every H inner
steps, one fragment is synchronised every H/P steps (fragment k mod P at sync point k),
so the peak bandwidth falls P-fold; and each fragment's all-reduce runs in the background
while the next ``overlap`` inner steps compute (Douillard et al., "Streaming DiLoCo",
2025). The averaged pseudo-gradient then takes the outer Nesterov step on that fragment,
and the worker's fragment is mixed with the new outer one (``mix``: the share of the local
fragment kept, 0 replaces it).

Faults as in :class:`phalanx.torch.DiLoCo`: a peer lost while a fragment's all-reduce is
in flight makes it fail on every survivor; nothing is applied, and the survivors settle
the loss and run that sync point again. Joiners fetch every fragment's outer state (and
the sync count) at their first sync point and start from the outer model. After every
sync point all peers hold the same outer fragments and momentum, bit for bit.

    loop = phalanx.torch.StreamingDiLoCo(comm, model, inner_steps=20, fragments=4, overlap=2)
    while loop.syncs < 40:
        report = loop.sync_point(inner_step)   # H/P inner steps and one fragment's sync
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List

import torch

from . import AbortedError, Communicator, PeerLostError, SharedState
from .diloco import assign_params, nesterov_step

__all__ = ["StreamingDiLoCo", "SyncPointReport"]


@dataclass
class SyncPointReport:
    """What one committed sync point did on this peer."""

    #: Sync points committed so far (the shared state's revision).
    syncs: int
    #: The fragment this sync point synchronised.
    fragment: int
    rank: int
    size: int
    #: Mean loss over this peer's inner steps in the committed attempt.
    loss: float
    #: Attempts that a lost peer ended before this one committed.
    retries: int
    #: BLAKE3 of every outer fragment and momentum: equal on every peer.
    digest: str


def _split(params: List[torch.nn.Parameter], fragments: int) -> List[List[torch.nn.Parameter]]:
    """Contiguous groups of parameters with about equal element counts (the same on every
    peer: it depends on the model's shapes only)."""
    total = sum(p.numel() for p in params)
    groups: List[List[torch.nn.Parameter]] = [[] for _ in range(fragments)]
    seen = 0
    for p in params:
        groups[min(fragments - 1, seen * fragments // total)].append(p)
        seen += p.numel()
    if any(not g for g in groups):
        raise ValueError(f"the model has too few parameter tensors for {fragments} fragments")
    return groups


def _flat(group: List[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in group])


class StreamingDiLoCo:
    """Streaming DiLoCo's outer loop on ``model`` over ``comm`` (a dynamic communicator).

    Args:
        inner_steps: H; a fragment is synchronised every H / fragments inner steps.
        fragments: P, at least 1 and at most H.
        overlap: inner steps that run while a fragment's all-reduce is in flight, less
            than H / fragments.
        outer_lr, momentum: the outer Nesterov step (0.7 and 0.9 by default).
        mix: the share of the worker's own fragment kept when the new outer fragment
            arrives (0.5 by default).
    """

    def __init__(
        self,
        comm: Communicator,
        model: torch.nn.Module,
        inner_steps: int,
        fragments: int = 2,
        overlap: int = 1,
        outer_lr: float = 0.7,
        momentum: float = 0.9,
        mix: float = 0.5,
    ):
        if not 1 <= fragments <= inner_steps:
            raise ValueError(f"fragments must be in 1..inner_steps ({inner_steps}), got {fragments}")
        self.every = inner_steps // fragments
        if not 0 <= overlap < self.every:
            raise ValueError(f"overlap must be in 0..{self.every - 1} (inner_steps / fragments - 1), got {overlap}")
        params = list(model.parameters())
        if any(p.dtype != torch.float32 for p in params):
            raise TypeError("StreamingDiLoCo keeps the outer model in float32: convert the model's parameters")
        self.comm, self.overlap = comm, overlap
        self.outer_lr, self.momentum, self.mix = outer_lr, momentum, mix
        self.groups = _split(params, fragments)
        self.state = SharedState()
        for f, group in enumerate(self.groups):
            flat = _flat(group)
            self.state[f"params/{f}"] = flat.numpy()
            self.state[f"momentum/{f}"] = torch.zeros_like(flat).numpy()
        self._synced = False  # a joiner loads the whole outer model at its first sync

    @property
    def syncs(self) -> int:
        """Sync points committed so far, agreed by every peer."""
        return self.state.revision

    def sync_point(self, inner_step: Callable[[int], float]) -> SyncPointReport:
        """Runs H / P inner steps (``inner_step(i)`` runs one and returns its loss) and
        synchronises the next fragment, its all-reduce overlapping the last ``overlap``
        of them. Returns once the sync point committed on every member."""
        retries = 0
        while True:
            self.comm.update_topology()  # nothing is in flight here: admit, settle
            try:
                self.comm.sync_shared_state(self.state)
            except (PeerLostError, AbortedError):
                retries += 1
                continue
            if not self._synced:
                for f, group in enumerate(self.groups):
                    assign_params(group, torch.from_numpy(self.state[f"params/{f}"]))
                self._synced = True
            f = self.state.revision % len(self.groups)
            group = self.groups[f]
            losses = [float(inner_step(i)) for i in range(self.every - self.overlap)]
            outer = torch.from_numpy(self.state[f"params/{f}"])
            pseudo = outer - _flat(group)
            handle = self.comm.all_reduce_async(pseudo, op="avg")  # copied in now
            losses += [float(inner_step(i)) for i in range(self.every - self.overlap, self.every)]
            try:
                handle.wait()  # the average, written back into pseudo
            except (PeerLostError, AbortedError):
                retries += 1  # nothing applied: this sync point again, over the new view
                continue
            rank, size = self.comm.rank, self.comm.size
            outer = nesterov_step(self.state, outer, pseudo, self.outer_lr, self.momentum, suffix=f"/{f}")
            self.state.revision += 1
            assign_params(group, self.mix * _flat(group) + (1.0 - self.mix) * outer)
            return SyncPointReport(
                syncs=self.state.revision,
                fragment=f,
                rank=rank,
                size=size,
                loss=sum(losses) / len(losses),
                retries=retries,
                digest=self.state.hexdigest(),
            )
