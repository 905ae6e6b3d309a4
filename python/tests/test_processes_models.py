"""The numpy models of issues 12 and 13 trained across 4 real processes on 127.0.0.1.

A master in this process forms its first view once 4 peers have joined, ranked by peer
id; each peer process (tests/peers/pipeline_stage.py, tests/peers/moe_device.py) joins
with its stage or device index as peer id, so stage/device i is rank i. The model code
is tests/models.py, shared by the peers and by the single-process references computed
here; every comparison is on the float32 bytes.

- Pipeline: the 8-layer MLP (B and W separate, a fused BW under 1F1B) under 1F1B, ZB-H1,
  ZB-V and interleaved 1F1B (2 chunks), models.ITERS iterations each; after every
  iteration each stage's gradient sums and weights of the layers it trains equal the
  single-process run with the same micro-batch accumulation order, and the stages
  together train every layer once.
- MoE: gate + 8 MLP experts, top-1 and top-2 Zipf-skewed routing, placement with
  replicas; each device's forward outputs and input gradients, and after spRS every
  expert's gradient on its owner, equal the dense single-process reference.
"""

import pytest

import models
import phalanx

SCHEDULES = ["1f1b", "zbh1", "zbv", "interleaved"]


@pytest.fixture
def master4():
    """A master whose first view forms once 4 peers have joined, ranked by peer id."""
    m = phalanx.Master("127.0.0.1:0", peer_timeout_ms=1000, initial_peers=models.P)
    yield m
    m.close()


def start(spawn, master, script, arg):
    """The 4 peers, checked to be ranks 0..3 of one group of 4."""
    peers = [spawn(script, master.addr, i, arg) for i in range(4)]
    for i, p in enumerate(peers):
        ready = p.expect("ready")
        assert (ready["rank"], ready["size"]) == (i, 4), ready
    return peers


def test_pipeline_mlp_across_four_processes_bitwise(master4, spawn):
    peers = start(spawn, master4, "pipeline_stage.py", ",".join(SCHEDULES))
    want = models.reference()
    assert all(w.tobytes() != models.W0.tobytes() for _, w in want), "training moves the weights"
    for name in SCHEDULES:
        trained = []
        for it in range(models.ITERS):
            want_sums, want_weights = want[it]
            layers_now = []
            for rank, p in enumerate(peers):
                ev = p.expect("weights")
                what = f"{name} iteration {it} stage {rank}"
                assert (ev["schedule"], ev["iteration"]) == (name, it), what
                assert ev["order_ok"] and ev["times_ok"] and ev["idle"], (what, ev)
                assert ev["untouched"], f"{what}: a layer of another stage moved"
                assert ev["layers"], f"{what}: trains no layer"
                for layer, sums, weights in zip(ev["layers"], ev["sums"], ev["weights"]):
                    assert bytes.fromhex(sums) == want_sums[layer].tobytes(), f"{what} layer {layer}: gradient sum"
                    assert bytes.fromhex(weights) == want_weights[layer].tobytes(), f"{what} layer {layer}: weights"
                if name == "1f1b":
                    assert ev["fused"] == models.M * (it + 1), what  # the fused callback ran the BW passes
                layers_now.append(ev["layers"])
            if it == 0:
                trained = layers_now
            assert layers_now == trained, f"{name}: a stage's layers changed"
        # Every layer trained by exactly one stage; ZB-V's V puts layers 0 and 7 on stage 0.
        assert sorted(layer for layers in trained for layer in layers) == list(range(models.LAYERS)), name
        if name == "zbv":
            assert trained[0] == [0, 7], trained
    for p in peers:
        p.expect("done")
    for p in peers:
        assert p.wait() == 0, p.diagnostics()


def test_moe_layer_across_four_processes_bitwise(master4, spawn):
    ks = [1, 2]
    peers = start(spawn, master4, "moe_device.py", ",".join(map(str, ks)))
    for k in ks:
        _, loads = models.moe_loads(k)
        assert loads.max() >= 3 * loads.mean() / 2, f"the gate is skewed: {loads}"
        holders = models.moe_holders(k)
        assert sum(len(h) - 1 for h in holders) > 0, "the skew replicates something"
        got = [p.expect("moe") for p in peers]
        assert all(g["k"] == k for g in got)
        routes = got[0]["routes"]
        assert all(g["routes"] == routes and g["holders"] == holders for g in got), "every device has the same plan"
        assert sum(got[0]["compute"]) == k * models.T * models.N
        outputs, grads = models.moe_dense_reference(k, holders, [tuple(r) for r in routes])
        owned = []
        for d, g in enumerate(got):
            y, dx = outputs[d]
            assert bytes.fromhex(g["y"]) == y.tobytes(), f"forward, device {d}, top-{k}"
            assert bytes.fromhex(g["dx"]) == dx.tobytes(), f"dx, device {d}, top-{k}"
            for e, hexed in g["grads"].items():
                assert bytes.fromhex(hexed) == grads[int(e)].tobytes(), f"gradient of expert {e}, top-{k}"
                owned.append(int(e))
        assert sorted(owned) == list(range(models.E)), "every expert's gradient checked on its owner"
    for p in peers:
        p.expect("done")
    for p in peers:
        assert p.wait() == 0, p.diagnostics()
