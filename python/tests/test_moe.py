"""Expert parallelism (FSSDP) from Python: the reference's worked example placed by
`phalanx.moe_place` and run through the sparse collectives and through
`phalanx.ExpertLayer` on four peers of one group (threads of this process); an MoE layer
of MLP experts in numpy through the layer against a dense reference, bitwise; a device
that leaves mid-step; and the simulator's figures against the issue's targets."""

import gc
import threading

import numpy as np
import pytest

import phalanx
from conftest import TIMEOUT, on_all
from models import OWNERS, E, N, W, moe_dense_reference, moe_device_step, moe_holders, moe_loads

LOADS = [40, 5, 10, 5, 20, 5, 10, 5]


def test_the_worked_example_placement():
    holders = phalanx.moe_place(OWNERS, LOADS, overlap=2, slots=2)
    assert holders[0] == holders[4] == [0, 1, 2, 3]
    assert all(holders[e] == [OWNERS[e]] for e in (1, 2, 3, 5, 6, 7))
    assert sum(len(h) - 1 for h in holders) == 6  # expert transfers
    with pytest.raises(ValueError, match="device 4"):
        phalanx.moe_place([0, 0, 1, 1, 2, 2, 3, 4], LOADS, 2, 2, devices=4)
    # Knowing the hosts: with one slot for four equally loaded experts, each replica
    # goes to the other host.
    spread = phalanx.moe_place([0, 1, 2, 3], [10] * 4, 4, 1, hosts=[0, 0, 1, 1])
    assert spread[0] == [0, 2]
    with pytest.raises(ValueError, match="finite"):
        phalanx.moe_place(OWNERS, [-1.0] + LOADS[1:], 2, 2)


def test_the_simulator_meets_the_targets():
    r = phalanx.moe_simulate(devices=8, experts=32, zipf=1.2)
    assert r["straggler_ratio"] <= 0.6 and r["traffic_ratio"] <= 0.5
    assert r["fsdp"]["straggler"] == 4096
    assert r["fsdp"]["param_bytes"] == 2 * 32 * 7 * (16 << 20)
    assert r["straggler_ratio"] == pytest.approx(r["fssdp"]["straggler"] / r["ep"]["straggler"])
    assert sum(r["ep"]["compute"]) == pytest.approx(8 * 4096)
    with pytest.raises(ValueError, match="Zipf exponent"):
        phalanx.moe_simulate(zipf=-1.0)


@pytest.fixture
def group(make_group):
    """N communicators of one group, indexed by rank."""
    return make_group(N)


def test_the_worked_example_through_the_sparse_collectives(group):
    holders = phalanx.moe_place(OWNERS, LOADS, overlap=2, slots=2)
    lens = [2] * 8

    def run(c):
        d = c.rank
        params = np.full(16, np.nan, dtype=np.float32)
        for e in range(8):
            if OWNERS[e] == d:
                params[2 * e : 2 * e + 2] = [10 * e + 1, 10 * e + 2]
        c.sparse_all_gather(params, lens, OWNERS, holders)
        grads = np.full(16, 0.5, dtype=np.float32)
        grads[0:2] = [d + 1, d + 1]
        grads[8:10] = [5 * (d + 1), d + 1]
        c.sparse_reduce_scatter(grads, lens, OWNERS, holders)
        return params, grads

    out = on_all(group, run)
    for d, (params, grads) in enumerate(out):
        for e in range(8):
            if d in holders[e]:
                assert params[2 * e : 2 * e + 2].tolist() == [10 * e + 1, 10 * e + 2]
    assert out[0][1][0:2].tolist() == [10, 10]
    assert out[2][1][8:10].tolist() == [50, 10]


# The layer: phalanx.ExpertLayer over the group's communicators.

# Tokens of each expert on each device: a quarter of e0's 40 and e4's 20 on every
# device, the others on one device each, some away from their owner.
ROUTED = [
    [10, 0, 0, 5, 5, 0, 10, 0],
    [10, 5, 10, 0, 5, 0, 0, 0],
    [10, 0, 0, 0, 5, 5, 0, 5],
    [10, 0, 0, 0, 5, 0, 0, 0],
]


def interleaved(counts):
    """The experts of a device's tokens, one of each expert in turn, so that the layer
    must regroup them."""
    left, out = list(counts), []
    while any(left):
        for e, c in enumerate(left):
            if c:
                left[e] -= 1
                out.append(e)
    return out


def unaligned(a):
    """A copy of `a` at an address not aligned for its element type (the layer then
    works on an aligned copy and writes it back)."""
    view = np.zeros(a.nbytes + 1, dtype=np.uint8)[1:].view(a.dtype)
    view[:] = a
    assert not view.flags.aligned
    return view


def test_the_worked_example_through_the_layer(group):
    holders = phalanx.moe_place(OWNERS, LOADS, overlap=2, slots=2)
    weights = np.array([[10 * e + 1, 10 * e + 2] for e in range(8)], dtype=np.float32)

    def run(c):
        d = c.rank
        layer = phalanx.ExpertLayer(c, OWNERS, holders, expert_len=2, hidden=2)
        assert layer.params_len == 16 and layer.holders == holders
        with pytest.raises(ValueError, match="device 4"):
            phalanx.ExpertLayer(c, OWNERS[:7] + [4], None, 2, 2)
        # Owned slots hold the weights, the others garbage.
        params = np.full(16, -1.0 - d, dtype=np.float32)
        for e in range(8):
            if OWNERS[e] == d:
                params[layer.expert_slice(e)] = weights[e]
        if d % 2:
            params = unaligned(params)
        layer.materialize(params)

        experts = interleaved(ROUTED[d])
        x = np.array([[100 * d + i, -0.5 * (100 * d + i)] for i in range(len(experts))], dtype=np.float32)
        with pytest.raises(ValueError, match="expert 8"):
            layer.dispatch(x, [8] + experts[1:])  # refused before anything is sent
        got = layer.dispatch(x, experts)
        # The expert: elementwise product with the materialised weights.
        outputs = got.tokens * params.reshape(8, 2)[got.experts]
        with pytest.raises(TypeError, match="element type"):
            layer.combine(got, outputs.astype(np.float64))
        combined = layer.combine(got, outputs)
        # 2-byte elements through identity experts: every token back in its place.
        ints = np.arange(2 * len(experts), dtype=np.int16).reshape(-1, 2) * (d + 1)
        narrow = layer.dispatch(ints, experts)
        assert narrow.tokens.dtype == np.int16 and narrow.experts.tolist() == got.experts.tolist()
        assert layer.combine(narrow, narrow.tokens).tolist() == ints.tolist()

        k = np.float32(d + 1)
        grads = np.repeat(np.arange(8, dtype=np.float32), 2)
        grads[0:2] = [k, k]
        grads[8:10] = [5 * k, k]
        if d % 2 == 0:
            grads = unaligned(grads)
        layer.reduce_gradients(grads)
        return params, got, x, experts, combined, grads

    out = on_all(group, run)
    for d, (params, got, x, experts, combined, grads) in enumerate(out):
        for e in range(8):
            if d in holders[e]:  # spAG: the owner's bytes
                assert params[2 * e : 2 * e + 2].tobytes() == weights[e].tobytes()
            else:
                assert params[2 * e] == -1.0 - d
        assert got.compute == [20, 30, 20, 30]  # EP: 45, 15, 25, 15
        assert len(got) == 20 + 10 * (d % 2) and got.tokens.shape == (len(got), 2)
        assert all(d in holders[e] for e in got.experts)
        assert list(got.sources) == sorted(got.sources)
        # Combine: each token's output is what one device computes alone, bitwise.
        assert combined.tobytes() == (x * weights[experts]).tobytes()
        k = d + 1
        want = np.repeat(np.arange(8, dtype=np.float32), 2)
        want[0:2] = [10, 10] if d == 0 else [k, k]
        want[8:10] = [50, 10] if d == 2 else [5 * k, k]
        assert grads.tolist() == want.tolist()


# An MoE layer in numpy: a gate and 8 experts, each a small MLP y = W2 relu(W1 x), top-1
# and top-2 routing with a Zipf-skewed gate, on four peers. Forward outputs, input
# gradients and, after reduce_gradients, every expert's gradient equal a single-process
# dense reference bitwise: every sum runs in one fixed order on both sides (each
# expert's per-token gradients added on each holder in arrival order, tokens by source
# device, then expert, then their order there; the holders' sums added in ascending
# device order by spRS), as tests/moe_layer.rs does. The model, the device's step and the
# reference are tests/models.py's, which the peer processes of test_processes_models.py
# run too.


@pytest.mark.parametrize("k", [1, 2])
def test_an_moe_layer_matches_a_dense_reference_bitwise(group, k):
    loads = moe_loads(k)[1]
    assert loads.max() >= 3 * loads.mean() / 2, f"the gate is skewed: {loads}"
    holders = moe_holders(k)
    assert sum(len(h) - 1 for h in holders) > 0, "the skew replicates something"

    out = on_all(group, lambda c: moe_device_step(c, k))

    # The dense reference, one process, from the plan's routes: which rows each holder
    # computes, then each expert's gradient per holder in arrival order, holders ascending.
    routes = out[0][3]
    assert all(o[3] == routes for o in out), "every device has the same plan"
    outputs, want = moe_dense_reference(k, holders, routes)
    for d, (y, dx, grads, _, _) in enumerate(out):
        assert y.tobytes() == outputs[d][0].tobytes(), f"forward, device {d}, top-{k}"
        assert dx.tobytes() == outputs[d][1].tobytes(), f"dx, device {d}, top-{k}"
        for e in range(E):
            if OWNERS[e] == d:
                assert grads[e * W : (e + 1) * W].tobytes() == want[e].tobytes(), f"gradient of expert {e}, top-{k}"


def device_2_leaves(group, fail):
    """Device 2 (the owner of e4, which every device holds) leaves instead of calling;
    `fail(d, layer, params)` makes each survivor d's step fail on its array (`np.arange(16)
    + 0.25 d`) and returns the array it passed, which must be as it was."""
    holders = phalanx.moe_place(OWNERS, LOADS, overlap=2, slots=2)
    # Every layer is built for the group of 4 before device 2 leaves: a layer built
    # after that sees a group of 3, which its placement does not fit (a ValueError).
    built = threading.Barrier(len(group))

    def run(c):
        d = c.rank
        layer = phalanx.ExpertLayer(c, OWNERS, holders, expert_len=2, hidden=2)
        built.wait(TIMEOUT)
        if d == 2:
            c.leave()  # gone instead of calling
            return None
        params = np.arange(16, dtype=np.float32) + 0.25 * d
        before = params.copy()
        return fail(d, layer, params).tobytes() == before.tobytes()

    assert on_all(group, run) == [True, True, None, True]


def test_a_device_that_leaves_fails_the_step_with_arrays_restored(group):
    """Every survivor of device 2 gets a typed error from materialize, its array as it
    was."""

    def fail(d, layer, params):
        if d == 1:
            params = unaligned(params)  # the copy is not written back on error either
        with pytest.raises((phalanx.PeerLostError, phalanx.AbortedError)):
            layer.materialize(params)
        return params

    device_2_leaves(group, fail)


# The started steps, the link counters and re-materialisation.


def quiet_traffic(c):
    """A snapshot of c's traffic between two barriers (which carry no payload): every
    frame sent before the first has arrived, and none sent after the second has."""
    c.barrier()
    t = c.traffic()
    c.barrier()
    return t


def test_started_steps_equal_the_blocking_ones_and_the_counters_see_the_spag(group):
    """Every started step (materialize, reduce_gradients, rematerialize, dispatch,
    combine), with compute before its wait, gives bitwise what the blocking step gives;
    the links' counters see the spAG's 6 expert transfers exactly."""
    holders = phalanx.moe_place(OWNERS, LOADS, overlap=2, slots=2)
    weights = np.array([[10 * e + 1, 10 * e + 2] for e in range(8)], dtype=np.float32)

    def run(c):
        d = c.rank
        layer = phalanx.ExpertLayer(c, OWNERS, holders, expert_len=2, hidden=2)
        params = np.full(16, -1.0 - d, dtype=np.float32)
        for e in range(8):
            if OWNERS[e] == d:
                params[layer.expert_slice(e)] = weights[e]
        blocking = params.copy()
        layer.materialize(blocking)
        with pytest.raises(ValueError, match="15 elements"):
            layer.materialize_start(params[:15])  # refused before anything is sent

        before = quiet_traffic(c)
        handle = layer.materialize_start(params)
        acc = sum(i * 0.5 for i in range(20_000))  # the attention forward, meanwhile
        assert handle.done() in (True, False)
        handle.wait()
        handle.wait()  # a second wait repeats the outcome
        assert handle.done()
        moved = quiet_traffic(c).since(before)
        assert params.tobytes() == blocking.tobytes()

        grads = (np.arange(16, dtype=np.float32) + 1) / np.float32(d + 3)
        if d % 2:
            grads = unaligned(grads)
        reduced = grads.copy()
        layer.reduce_gradients(reduced)
        h = layer.reduce_gradients_start(grads)
        acc += sum(i * 0.25 for i in range(20_000))  # the attention backward
        h.wait()
        assert grads.tobytes() == reduced.tobytes()

        # Re-materialisation: release after the forward, spAG again before the backward.
        released = layer.release_replicas(params)
        assert released.owned.tobytes() == params[4 * d : 4 * d + 4].tobytes()  # e2d, e2d+1
        assert released.freed_elements == 12 and released.freed_bytes == 48
        assert layer.replica_len(d) == (4 if d % 2 else 2)
        with pytest.raises(TypeError, match="element type"):
            layer.rematerialize_start(released, np.zeros(16, dtype=np.int32))
        again = np.full(16, np.nan, dtype=np.float32)
        layer.rematerialize_start(released, again).wait()

        # A started dispatch and combine against the blocking ones: the same rows.
        experts = interleaved(ROUTED[d])
        x = np.array([[100 * d + i, -0.5 * (100 * d + i)] for i in range(len(experts))], dtype=np.float32)
        blocking_got = layer.dispatch(x, experts)
        with pytest.raises(ValueError, match="expert 8"):
            layer.dispatch_start(x, [8] + experts[1:])  # refused before anything starts
        h = layer.dispatch_start(x, experts)
        x_sent = x.copy()
        x[:] = 0  # the handle owns a copy
        acc += sum(i * 0.125 for i in range(20_000))
        got = h.wait()
        assert h.wait() is got and h.done()
        assert got.tokens.tobytes() == blocking_got.tokens.tobytes()
        assert got.experts.tolist() == blocking_got.experts.tolist() and got.compute == [20, 30, 20, 30]
        outputs = got.tokens * params.reshape(8, 2)[got.experts]
        with pytest.raises(TypeError, match="element type"):
            layer.combine_start(got, outputs.astype(np.float64))
        c_handle = layer.combine_start(got, outputs)
        del got  # the handle needs neither the Dispatched nor the outputs any more
        combined = c_handle.wait()
        assert combined.tobytes() == layer.combine(blocking_got, outputs).tobytes()
        assert combined.tobytes() == (x_sent * weights[experts]).tobytes()

        # A started dispatch keeps the layer it borrows alive: dropped by the caller
        # before the wait, it still delivers.
        other = phalanx.ExpertLayer(c, OWNERS, holders, expert_len=2, hidden=2)
        h = other.dispatch_start(x_sent, experts)
        del other
        gc.collect()
        assert h.wait().tokens.tobytes() == blocking_got.tokens.tobytes()
        return moved, params, again, acc > 0

    out = on_all(group, run)
    for d, (moved, params, again, _) in enumerate(out):
        # spAG moved exactly 6 experts of 8 bytes, each received once, by the devices
        # that hold a replica (d0 e4; d1 e0 and e4; d2 e0; d3 e0 and e4).
        assert moved.total["bytes_received"] == (2 if d % 2 else 1) * 8
        assert sum(p["bytes_received"] for p in moved.peers.values()) == moved.total["bytes_received"]
        assert len(moved.peers) == N - 1 and moved.peer(2**63)["frames_sent"] == 0
        for e in range(8):
            if d in holders[e]:
                assert again[2 * e : 2 * e + 2].tobytes() == weights[e].tobytes()
                assert params[2 * e : 2 * e + 2].tobytes() == weights[e].tobytes()
            else:
                assert again[2 * e : 2 * e + 2].tolist() == [0.0, 0.0]
    assert sum(o[0].total["bytes_sent"] for o in out) == 6 * 8


def test_a_device_that_leaves_fails_a_started_step_with_the_array_as_it_was(group):
    """Device 2 leaves instead of starting the spAG: every survivor's handle raises a
    typed error (or the start does, if the view has already moved), the array as it
    was."""

    def fail(d, layer, params):
        with pytest.raises((phalanx.PeerLostError, phalanx.AbortedError)):
            layer.materialize_start(params).wait()
        with pytest.raises((phalanx.PeerLostError, phalanx.AbortedError)):
            layer.dispatch_start(np.ones((2, 2), np.float32), [0, 4]).wait()
        return params

    device_2_leaves(group, fail)
