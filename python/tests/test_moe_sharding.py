"""Sharding of expert parallelism (FSSDP) from Python: the worked example's owners from
`phalanx.plan_sharding`, the moves between two shardings, backups never on their owner,
the sharding after a loss, the load predictor, and `phalanx.ReshardEvery` moving
parameters and optimizer state across four peers of one group (threads of this
process), bitwise."""


import numpy as np
import pytest

import phalanx
from conftest import on_all

N = 4
EXPERTS = 8
LEN = 3  # elements per expert


def test_the_worked_example_sharding():
    s = phalanx.plan_sharding([64] * N, [(EXPERTS, 8)])
    assert s.owners(0) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert (s.devices, s.layers, s.expert_bytes(0)) == (N, 1, 8)
    assert s.owned(2, 0) == [4, 5] and s.memory(3) == 16
    # Twice the memory, twice the experts; hot experts spread when loads are known.
    s = phalanx.plan_sharding([100, 200, 100], [(EXPERTS, 10)])
    assert [len(s.owned(d, 0)) for d in range(3)] == [2, 4, 2]
    hot = phalanx.plan_sharding([64] * N, [(EXPERTS, 8, [40, 40, 5, 5, 5, 5, 5, 5])])
    assert hot.owners(0)[0] != hot.owners(0)[1]
    with pytest.raises(ValueError, match="need 64 bytes"):
        phalanx.plan_sharding([8] * N, [(EXPERTS, 8)])
    with pytest.raises(ValueError, match="experts, expert_bytes"):
        phalanx.plan_sharding([64] * N, ["eight"])


def test_moves_between_two_shardings():
    now = phalanx.Sharding(2, [[0, 0, 1]], [8])
    nxt = phalanx.Sharding(2, [[0, 1, 1]], [8])
    assert now.moves_to(nxt) == [(0, 1, 0, 1)]
    assert now.transfer_holders(nxt, 0) == [[0], [0, 1], [1]]
    assert now.moves_to(now) == [] and now == phalanx.Sharding(2, [[0, 0, 1]], [8])
    with pytest.raises(ValueError, match="re-sharding"):
        now.moves_to(phalanx.Sharding(3, [[0, 1, 2]], [8]))
    with pytest.raises(ValueError, match="device 2"):
        phalanx.Sharding(2, [[0, 2]], [8])


def test_backups_are_never_on_their_owner_and_a_loss_keeps_every_expert():
    s = phalanx.plan_sharding([64] * N, [(EXPERTS, 8), (4, 16)])
    b = phalanx.plan_backups(s)
    for layer in range(s.layers):
        owners = s.owners(layer)
        assert all(b.of(layer, e) != owners[e] for e in range(len(owners)))
        assert b.layer(layer) == [b.of(layer, e) for e in range(len(owners))]
        holders = b.holders(s, layer)
        assert all(holders[e] == sorted({owners[e], b.of(layer, e)}) for e in range(len(owners)))
    # Backups spread like the owners: every device backs up two experts of layer 0.
    assert [len(b.backed_up_by(d, 0)) for d in range(N)] == [2] * N
    assert b.sync_bytes(s) == [s.memory(d) for d in range(N)]
    # On other hosts when the hosts are known.
    hb = phalanx.plan_backups(s, hosts=[0, 0, 1, 1])
    assert all((hb.of(0, e) < 2) != (s.owners(0)[e] < 2) for e in range(EXPERTS))
    for lost in range(N):
        after = s.after_loss(lost, b)
        assert after.devices == N - 1
        for layer in range(s.layers):
            for e, o in enumerate(s.owners(layer)):
                keep = b.of(layer, e) if o == lost else o
                assert after.owners(layer)[e] == (keep - 1 if keep > lost else keep)
    with pytest.raises(ValueError, match="second device"):
        phalanx.plan_backups(phalanx.Sharding(1, [[0, 0]], [8]))
    with pytest.raises(IndexError):
        b.of(0, EXPERTS)


def test_the_load_predictor():
    p = phalanx.LoadPredictor(2, window=2)
    assert p.predict() is None
    for counts in ([10, 0], [20, 2], [30, 4]):
        p.observe(counts)
    assert p.predict() == [25.0, 3.0]
    with pytest.raises(ValueError, match="one per expert"):
        p.observe([1.0])
    with pytest.raises(ValueError, match="window"):
        phalanx.LoadPredictor(2, window=0)


@pytest.fixture
def group(make_group):
    """N communicators of one group, indexed by rank."""
    return make_group(N)


def state(seed):
    """A full-mantissa float32 state of every expert, per seed."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(EXPERTS * LEN).astype(np.float32)


def test_reshard_every_moves_params_and_optimizer_state(group):
    policy = phalanx.ReshardEvery(2, [1000] * N)
    assert (policy.k, policy.capacities) == (2, [1000] * N)
    assert [policy.due(it) for it in range(5)] == [False, False, True, False, True]
    now = phalanx.plan_sharding(policy.capacities, [(EXPERTS, 4 * LEN)])
    predictor = phalanx.LoadPredictor(EXPERTS)
    predictor.observe([60, 4, 4, 30, 4, 4, 4, 4])  # experts 0 and 3 hot
    nxt = policy.plan(now, [predictor.predict()])
    moves = now.moves_to(nxt)
    assert moves, "the hot experts did not move"
    params, momentum = state(1), state(2)

    def run(c):
        d = c.rank
        mine = np.repeat(np.array(now.owners(0)) == d, LEN)
        w = np.where(mine, params, np.nan).astype(np.float32)
        v = np.where(mine, momentum, np.nan).astype(np.float32)
        got = policy.move_state(c, now, nxt, 0, [w, v])
        return got, w, v

    out = on_all(group, run)
    for d, (got, w, v) in enumerate(out):
        assert got == moves
        for e in range(EXPERTS):
            if nxt.owners(0)[e] == d or now.owners(0)[e] == d:
                r = slice(e * LEN, (e + 1) * LEN)
                assert w[r].view(np.uint32).tolist() == params[r].view(np.uint32).tolist(), (d, e)
                assert v[r].view(np.uint32).tolist() == momentum[r].view(np.uint32).tolist(), (d, e)

    def bad(c):
        with pytest.raises(ValueError, match="a slot per expert"):
            policy.move_state(c, now, nxt, 0, [np.zeros(EXPERTS * LEN, np.float32), np.zeros(5, np.float32)])

    on_all(group, bad)


def test_backups_kept_in_step_take_over_after_a_loss(group):
    """The backups' spAG (`Backups.holders`) gives each backup its owner's bytes; after
    losing device 2, every expert's new owner (`after_loss`, renumbered) holds them."""
    now = phalanx.plan_sharding([64] * N, [(EXPERTS, 4 * LEN)])
    b = phalanx.plan_backups(now)
    holders = b.holders(now, 0)
    params = state(3)

    def run(c):
        mine = np.repeat(np.array(now.owners(0)) == c.rank, LEN)
        w = np.where(mine, params, np.nan).astype(np.float32)
        c.sparse_all_gather(w, [LEN] * EXPERTS, now.owners(0), holders)
        return w

    out = on_all(group, run)
    lost = 2
    after = now.after_loss(lost, b)
    for e in range(EXPERTS):
        r = slice(e * LEN, (e + 1) * LEN)
        assert out[b.of(0, e)][r].view(np.uint32).tolist() == params[r].view(np.uint32).tolist()
        old = [d for d in range(N) if d != lost][after.owners(0)[e]]  # the survivor's old rank
        assert old in (now.owners(0)[e], b.of(0, e))
        assert out[old][r].view(np.uint32).tolist() == params[r].view(np.uint32).tolist()
