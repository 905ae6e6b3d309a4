"""Async DiLoCo ("one step behind") on a torch model over a phalanx group.

The pseudo-gradient all-reduce of round t runs in the background through the whole
inner phase of round t+1, and its outer step is applied one round late (as PCCL's
``async_diloco.py`` does): the network is never on the critical path once H inner steps
take longer than one all-reduce.

Each round: run H inner steps; wait for the all-reduce launched at the end of the last
round; compute this round's pseudo-gradient Δ^t = outer − local; apply the outer Nesterov
step with the averaged Δ^{t−1}; admit joiners and settle losses (``update_topology``,
with nothing in flight) and make the outer state identical everywhere
(``sync_shared_state``: a joiner fetches the post-update outer model here, since it
cannot join an all-reduce already in flight); copy the outer model into the local one;
launch the all-reduce of Δ^t. Every peer starts (``round``'s first call) by syncing the
outer state and launching a zero contribution, which meets the all-reduce the members
launch at that point: so a joiner's first contribution is a zero pseudo-gradient (it has
run no inner steps from this outer model yet), and the founders' first outer step is a
zero one.

Faults: a peer lost while an all-reduce is in flight makes it fail on every survivor;
that round's averaged pseudo-gradient is dropped everywhere alike (nothing applied from
it), and the next round goes on over the new view. So a loss costs one round's update,
never a divergence: after every round all peers hold the same outer model and momentum,
bit for bit.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.nn.utils import parameters_to_vector

from . import AbortedError, Communicator, PeerLostError, SharedState
from .diloco import RoundReport, assign_params, nesterov_step

__all__ = ["AsyncDiLoCo"]


class AsyncDiLoCo:
    """Async DiLoCo's outer loop on ``model`` over ``comm`` (a dynamic communicator);
    arguments as :class:`phalanx.torch.DiLoCo`. ``RoundReport.retries`` counts the
    all-reduces a lost peer dropped so far."""

    def __init__(self, comm: Communicator, model: torch.nn.Module, inner_steps: int, outer_lr: float = 0.7, momentum: float = 0.9):
        if inner_steps < 1:
            raise ValueError("inner_steps must be at least 1")
        self._params = list(model.parameters())
        if any(p.dtype != torch.float32 for p in self._params):
            raise TypeError("AsyncDiLoCo keeps the outer model in float32: convert the model's parameters")
        self.comm, self.inner_steps = comm, inner_steps
        self.outer_lr, self.momentum = outer_lr, momentum
        flat = parameters_to_vector(self._params).detach()
        self.state = SharedState()
        self.state["params"] = flat.numpy()
        self.state["momentum"] = torch.zeros_like(flat).numpy()
        self._pending = None  # (handle, buffer) of the all-reduce in flight
        self._dropped = 0
        self._started = False

    def _load(self) -> None:
        assign_params(self._params, torch.from_numpy(self.state["params"]))

    def _settle(self) -> None:
        """Admits joiners, settles losses and syncs the outer state (nothing in flight)."""
        while True:
            self.comm.update_topology()
            try:
                self.comm.sync_shared_state(self.state)
                return
            except (PeerLostError, AbortedError):
                continue

    def round(self, inner_step: Callable[[int], float]) -> RoundReport:
        """Runs one round; ``inner_step(i)`` runs inner step ``i`` on the module and
        returns its loss."""
        if not self._started:
            # Bootstrap, the same on founders and joiners: the agreed outer model, and
            # a zero contribution to the all-reduce the members launch at this point.
            self._settle()
            self._load()
            zero = torch.zeros_like(torch.from_numpy(self.state["params"]))
            self._pending = (self.comm.all_reduce_async(zero, op="avg"), zero)
            self._started = True
        losses = [float(inner_step(i)) for i in range(self.inner_steps)]
        averaged: Optional[torch.Tensor] = None
        if self._pending is not None:
            handle, buf = self._pending
            self._pending = None
            try:
                handle.wait()
                averaged = buf
            except (PeerLostError, AbortedError):
                self._dropped += 1  # every survivor drops it alike
        outer = torch.from_numpy(self.state["params"])
        pseudo = outer - parameters_to_vector(self._params).detach()
        if averaged is not None:
            nesterov_step(self.state, outer, averaged, self.outer_lr, self.momentum)
            self.state.revision += 1
        self._settle()
        rank, size = self.comm.rank, self.comm.size
        self._load()
        self._pending = (self.comm.all_reduce_async(pseudo, op="avg"), pseudo)
        return RoundReport(
            round=self.state.revision,
            rank=rank,
            size=size,
            loss=sum(losses) / len(losses),
            retries=self._dropped,
            digest=self.state.hexdigest(),
        )

    def finish(self) -> None:
        """Waits for the all-reduce in flight and applies its outer step (call once after
        the last round, on every peer, so the last round's work is not lost)."""
        if self._pending is None:
            return
        handle, buf = self._pending
        self._pending = None
        handle.wait()
        nesterov_step(self.state, torch.from_numpy(self.state["params"]), buf, self.outer_lr, self.momentum)
        self.state.revision += 1
        self._load()
