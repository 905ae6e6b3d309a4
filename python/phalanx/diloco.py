"""DiLoCo on a torch model over a phalanx group that loses and gains peers.

Each round: admit joiners and settle losses (``update_topology``), make the outer model
and the outer optimizer's momentum bit-identical everywhere (``sync_shared_state``:
joiners fetch them here), run H inner steps locally, all-reduce the pseudo-gradient
(outer model minus local model, averaged), and apply the outer Nesterov step — the same
float operations on the same bits on every peer, so every peer ends the round with the
same weights, bit for bit.

A peer lost in the middle of a round makes the all-reduce fail on every survivor with its
buffer restored; nothing is applied, and the survivors run the round again from the
agreed state over the new view. A step is never half-applied.

    comm = phalanx.Communicator.connect(master_addr)
    loop = phalanx.torch.DiLoCo(comm, model, inner_steps=20)
    inner = torch.optim.SGD(model.parameters(), lr=0.05)

    def inner_step(i):
        loss = loss_fn(model(x), y)
        inner.zero_grad()
        loss.backward()
        inner.step()
        return loss.item()

    for _ in range(rounds):
        report = loop.round(inner_step)

The inner optimizer's state is each worker's own (DiLoCo's design: it follows the
worker's data); the outer model and the outer momentum are the replicated state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List

import torch
from torch.nn.utils import parameters_to_vector

from . import AbortedError, Communicator, PeerLostError, SharedState

__all__ = ["DiLoCo", "RoundReport"]


@dataclass
class RoundReport:
    """What one committed round did on this peer."""

    #: The outer step count after this round (the shared state's revision).
    round: int
    #: This peer's rank and the group's size in the round that committed.
    rank: int
    size: int
    #: Mean loss over this peer's inner steps in the committed attempt.
    loss: float
    #: Attempts that a lost peer ended before this one committed.
    retries: int
    #: BLAKE3 of the outer model and momentum: equal on every peer after the round.
    digest: str


def assign_params(params: List[torch.nn.Parameter], flat: torch.Tensor) -> None:
    """Copies ``flat`` into ``params`` in order, each into its own storage
    (``vector_to_parameters`` would make them views of ``flat``, and inner steps would
    then move the outer model too)."""
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def nesterov_step(state: SharedState, outer: torch.Tensor, averaged: torch.Tensor, lr: float, momentum: float, suffix: str = "") -> torch.Tensor:
    """The outer Nesterov step on ``state["params" + suffix]`` (given as ``outer``) and
    ``state["momentum" + suffix]`` with the averaged pseudo-gradient; stores both and
    returns the new outer parameters. Elementwise: the same bits in, the same bits out
    on every peer."""
    m = torch.from_numpy(state["momentum" + suffix])
    m.mul_(momentum).add_(averaged)
    new = outer - lr * (averaged + momentum * m)
    state["params" + suffix] = new.numpy()
    state["momentum" + suffix] = m.numpy()
    return new


class DiLoCo:
    """The DiLoCo outer loop (Douillard et al. 2023) on ``model`` over ``comm``.

    Args:
        comm: a dynamic phalanx ``Communicator`` (not a closed one: the loop settles
            losses and admits joiners every round).
        model: the torch module; its parameters are the replicated state (float32).
        inner_steps: H, the local steps between outer steps.
        outer_lr: the outer learning rate (0.7 in the paper).
        momentum: the outer Nesterov momentum (0.9 in the paper).
    """

    def __init__(self, comm: Communicator, model: torch.nn.Module, inner_steps: int, outer_lr: float = 0.7, momentum: float = 0.9):
        if inner_steps < 1:
            raise ValueError("inner_steps must be at least 1")
        self.comm = comm
        self.inner_steps = inner_steps
        self.outer_lr = outer_lr
        self.momentum = momentum
        self._params: List[torch.nn.Parameter] = list(model.parameters())
        if any(p.dtype != torch.float32 for p in self._params):
            raise TypeError("DiLoCo keeps the outer model in float32: convert the model's parameters")
        flat = parameters_to_vector(self._params).detach()
        self.state = SharedState()
        self.state["params"] = flat.numpy()
        self.state["momentum"] = torch.zeros_like(flat).numpy()

    def _load(self) -> torch.Tensor:
        """The agreed outer model, copied into the module's parameters; returns it."""
        outer = torch.from_numpy(self.state["params"])
        assign_params(self._params, outer)
        return outer

    def round(self, inner_step: Callable[[int], float]) -> RoundReport:
        """Runs one outer round; ``inner_step(i)`` runs inner step ``i`` on the module
        and returns its loss. Returns once the round committed on every member."""
        retries = 0
        while True:
            self.comm.update_topology()  # admit joiners, settle losses
            try:
                self.comm.sync_shared_state(self.state)  # joiners fetch the outer model
            except (PeerLostError, AbortedError):
                retries += 1
                continue
            outer = self._load()
            losses = [float(inner_step(i)) for i in range(self.inner_steps)]
            pseudo = outer - parameters_to_vector(self._params).detach()
            try:
                self.comm.all_reduce(pseudo, op="avg")  # in place, restored on failure
            except (PeerLostError, AbortedError):
                retries += 1  # nothing applied: the round again, over the new view
                continue
            rank, size = self.comm.rank, self.comm.size
            nesterov_step(self.state, outer, pseudo, self.outer_lr, self.momentum)
            self.state.revision += 1
            self._load()
            return RoundReport(
                round=self.state.revision,
                rank=rank,
                size=size,
                loss=sum(losses) / len(losses),
                retries=retries,
                digest=self.state.hexdigest(),
            )
