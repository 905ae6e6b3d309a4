"""Pipeline schedules from Python: the reference's worked example, typed errors, and
the runner (`PipelineRunner`) training an MLP over four in-process stages on threads,
bitwise equal to a single-process numpy run."""

import threading

import numpy as np
import pytest

import phalanx
from conftest import on_all


def test_the_worked_example():
    one = phalanx.pipeline_schedule("1f1b", 4, 8)
    assert one["bubble"] == 9.0 and one["iteration"] == 33.0
    assert one["peak_memory"] == [4.0, 3.0, 2.0, 1.0]
    assert one["orders"][3][:4] == [("F", 0, 0), ("BW", 0, 0), ("F", 1, 0), ("BW", 1, 0)]
    zb = phalanx.pipeline_schedule("zbh1", 4, 8)
    assert zb["bubble"] == 3.0
    v = phalanx.pipeline_schedule("zbv", 4, 8)
    assert v["bubble"] == 0.0 and v["peak_memory"] == [4.0] * 4
    assert {chunk for _, _, chunk in v["orders"][0]} == {0, 1}
    inter = phalanx.pipeline_schedule("interleaved", 4, 8, chunks=2, costs=(1, 2, 1, 0))
    assert inter["bubble"] == 3 * 4 / 2
    assert len(inter["timeline"][0]) == len(inter["orders"][0])


def test_the_automatic_scheduler_and_the_v_schedules():
    zb = phalanx.pipeline_schedule("zb2p", 4, 8)
    assert zb["name"] == "ZB-2p" and zb["bubble"] == 0.0
    assert zb["peak_memory"] == [7.0, 5.0, 3.0, 1.0]
    auto = phalanx.pipeline_schedule("auto", 4, 8, memory_limit=4)
    assert max(auto["peak_memory"]) <= 4
    half = phalanx.pipeline_schedule("vhalf", 4, 8)
    assert half["bubble"] == 2.5 and half["peak_memory"] == [3.0] * 4
    low = phalanx.pipeline_schedule("vmin", 4, 8)
    assert low["bubble"] == 5.5 and low["peak_memory"] == [2.0] * 4
    with pytest.raises(ValueError, match="needs a memory limit"):
        phalanx.pipeline_schedule("auto", 4, 8)
    with pytest.raises(ValueError, match="memory limit 0.5 is below"):
        phalanx.pipeline_schedule("auto", 4, 8, memory_limit=0.5)


def test_errors_name_the_limit():
    with pytest.raises(ValueError, match="2 stages"):
        phalanx.pipeline_schedule("1f1b", 1, 8)
    with pytest.raises(ValueError, match="stage 0 holds 4"):
        phalanx.pipeline_schedule("1f1b", 4, 8, memory_limit=3)
    with pytest.raises(ValueError, match="unknown schedule"):
        phalanx.pipeline_schedule("gpipe", 4, 8)


# ---------------------------------------------------------------------------------------
# The runner: an MLP of 8 linear layers trained over four in-process stages.

LAYERS, D, ROWS, M, P, ITERS, LR = 8, 6, 3, 8, 4, 3, np.float32(0.05)
RNG = np.random.default_rng(12)
X = RNG.uniform(-1, 1, (M, ROWS, D)).astype(np.float32)
T = RNG.uniform(-1, 1, (M, ROWS, D)).astype(np.float32)
W0 = (RNG.uniform(-1, 1, (LAYERS, D, D)) * 0.5).astype(np.float32)


def act(layer, z):
    """Leaky ReLU on every layer but the last."""
    return z if layer + 1 == LAYERS else np.where(z > 0, z, np.float32(0.01) * z)


def act_grad(layer, z):
    return np.ones_like(z) if layer + 1 == LAYERS else np.where(z > 0, np.float32(1), np.float32(0.01))


def layer_forward(layer, w, x):
    z = x @ w
    return act(layer, z), z


def layer_backward_input(layer, w, z, dy):
    """B: dz = dy * act'(z), dL/dx = dz @ W^T."""
    dz = dy * act_grad(layer, z)
    return dz @ w.T, dz


def weight_grad(x, dz):
    """W: dL/dW = x^T @ dz."""
    return x.T @ dz


def step_weights(weights, grads):
    """SGD on the gradients summed over micro-batches in order 0..M-1; returns the sums."""
    sums = np.zeros((LAYERS, D, D), dtype=np.float32)
    for layer in range(LAYERS):
        for mb in range(M):
            sums[layer] += grads[layer, mb]
        weights[layer] -= LR * sums[layer]
    return sums


def reference():
    """The single-process run: each iteration's gradient sums and the weights after it."""
    w = W0.copy()
    out = []
    for _ in range(ITERS):
        grads = {}
        for mb in range(M):
            x, cache = X[mb], []
            for layer in range(LAYERS):
                y, z = layer_forward(layer, w[layer], x)
                cache.append((x, z))
                x = y
            dy = x - T[mb]
            for layer in reversed(range(LAYERS)):
                xin, z = cache[layer]
                dy, dz = layer_backward_input(layer, w[layer], z, dy)
                grads[layer, mb] = weight_grad(xin, dz)
        sums = step_weights(w, grads)
        out.append((sums, w.copy()))
    return out


class MlpStage:
    """The layers of one stage's chunks (virtual stage v of V holds layers v*8/V ...)."""

    def __init__(self):
        self.weights = W0.copy()  # every layer; this stage touches only its own
        self.cache, self.dz, self.out, self.grads = {}, {}, {}, {}
        self.seen = set()

    def layers(self, step):
        per = LAYERS // step.virtual_stages
        return range(step.virtual_stage * per, (step.virtual_stage + 1) * per)

    def input_len(self, step):
        return ROWS * D

    def output_len(self, step):
        return ROWS * D

    def forward(self, step, x):
        assert x.dtype == np.float32 and x.shape == ((0,) if step.is_first else (ROWS * D,))
        self.seen.update(self.layers(step))
        x = X[step.mb] if step.is_first else x.reshape(ROWS, D)
        cache = []
        for layer in self.layers(step):
            y, z = layer_forward(layer, self.weights[layer], x)
            cache.append((layer, x, z))
            x = y
        self.cache[step.virtual_stage, step.mb] = cache
        if step.is_last:
            self.out[step.mb] = x
            return None
        return x.ravel()

    def backward_input(self, step, grad):
        dy = self.out.pop(step.mb) - T[step.mb] if step.is_last else grad.reshape(ROWS, D)
        for layer, x, z in reversed(self.cache.pop((step.virtual_stage, step.mb))):
            dy, dz = layer_backward_input(layer, self.weights[layer], z, dy)
            self.dz[layer, step.mb] = (x, dz)
        return None if step.is_first else dy.ravel()

    def backward_weight(self, step):
        for layer in self.layers(step):
            x, dz = self.dz.pop((layer, step.mb))
            self.grads[layer, step.mb] = weight_grad(x, dz)


class FusedMlpStage(MlpStage):
    """With a fused backward (what 1F1B's BW passes call when it exists)."""

    fused = 0

    def backward(self, step, grad):
        self.fused += 1
        g = self.backward_input(step, grad)
        self.backward_weight(step)
        return g


@pytest.fixture
def four(master):
    """Four communicators of one group on threads, ranks 0..3 in list order."""
    comms = [phalanx.Communicator.connect(master.addr, join_timeout_ms=30_000)]
    for _ in range(3):
        box = {}
        t = threading.Thread(
            target=lambda: box.setdefault("c", phalanx.Communicator.connect(master.addr, join_timeout_ms=30_000)),
            daemon=True,
        )
        t.start()
        while comms[0].peers_pending == 0:
            t.join(0.01)
        rounds = [threading.Thread(target=c.update_topology, daemon=True) for c in comms]
        for r in rounds:
            r.start()
        for r in rounds:
            r.join(60)
        t.join(60)
        comms.append(box["c"])
        comms[-1].update_topology()  # the admitting round counts as its own
    assert [c.rank for c in comms] == [0, 1, 2, 3]
    yield comms
    for c in comms:
        c.leave()


def test_runner_trains_an_mlp_bitwise_equal_to_one_process(four):
    want = reference()

    def train(rank, comm, name, cls):
        runner = phalanx.PipelineRunner(name, P, M, rank, chunks=2)
        stage = cls()
        for it in range(ITERS):
            timeline = runner.run(comm, stage)
            assert [t[:3] for t in timeline] == runner.order
            assert all(b <= r <= c <= e for _, _, _, b, r, c, e in timeline)
            assert not stage.cache and not stage.dz and not stage.out
            zero = np.zeros((D, D), np.float32)  # layers of other stages
            sums = step_weights(stage.weights, {k: stage.grads.get(k, zero) for k in np.ndindex(LAYERS, M)})
            stage.grads.clear()
            want_sums, want_weights = want[it]
            for layer in stage.seen:
                what = f"{name} iteration {it} layer {layer}"
                np.testing.assert_array_equal(sums[layer], want_sums[layer], what)
                np.testing.assert_array_equal(stage.weights[layer], want_weights[layer], what)
        runner.finish(comm)
        return sorted(stage.seen), getattr(stage, "fused", None)

    for name, cls in [("1f1b", FusedMlpStage), ("zbh1", MlpStage), ("zbv", MlpStage), ("interleaved", MlpStage)]:
        out = on_all(list(enumerate(four)), lambda rc: train(*rc, name, cls))
        layers = sorted(layer for seen, _ in out for layer in seen)
        assert layers == list(range(LAYERS)), name  # every layer trained by exactly one stage
        if name == "1f1b":
            assert [fused for _, fused in out] == [M * ITERS] * P  # the fused callback ran the BW passes


@pytest.mark.parametrize(
    "kind, error, message",
    [
        ("raise", ValueError, "bad micro-batch 2"),
        ("dtype", TypeError, "forward returned f64 elements; this runner's dtype is f32"),
    ],
)
def test_runner_raises_a_callback_exception_with_the_pass_named(four, kind, error, message):
    # Stage 1 fails only once every stage is inside its run: a stage that began after
    # stage 1 left would find another view and refuse to start (ValueError).
    started = [threading.Event() for _ in range(P)]

    class Probe(MlpStage):
        def __init__(self, rank):
            super().__init__()
            self.rank = rank

        def input_len(self, step):
            started[self.rank].set()
            return super().input_len(step)

        def forward(self, step, x):
            started[self.rank].set()
            y = super().forward(step, x)
            if self.rank == 1 and step.mb == 2:
                assert all(e.wait(30) for e in started)
                if kind == "raise":
                    raise ValueError(f"bad micro-batch {step.mb}")
                return y.astype(np.float64)
            return y

    def run(rank, comm):
        runner = phalanx.PipelineRunner("zbh1", P, M, rank, dtype=np.float32)
        stage = Probe(rank)
        if rank == 1:
            with pytest.raises(error, match=message) as e:
                runner.run(comm, stage)
            assert any("stage 1, pass 2 (F2)" in n for n in getattr(e.value, "__notes__", ["stage 1, pass 2 (F2)"]))
            comm.leave()  # the others wait for this stage: it leaves, they fail
            return "raised"
        with pytest.raises((phalanx.PeerLostError, phalanx.AbortedError), match=r"stage \d, pass \d+ \("):
            runner.run(comm, stage)
        return "failed"

    out = on_all(list(enumerate(four)), lambda rc: run(*rc))
    assert out[1] == "raised"


def test_two_pipelines_share_a_group(four):
    """Two 2-stage pipelines at once, stages on ranks (3, 1) and (0, 2), in float64."""
    pipes = [[3, 1], [0, 2]]

    class Affine:
        """y = (stage + 2) x; the last stage keeps its output."""

        def __init__(self, me):
            self.me, self.last = me, {}

        def input_len(self, step):
            return 2

        def output_len(self, step):
            return 2

        def forward(self, step, x):
            assert x.dtype == np.float64
            x = np.array([step.mb, 1.0]) if step.is_first else x
            y = (self.me + 2) * x
            if step.is_last:
                self.last[step.mb] = y
            return y

        def backward_input(self, step, grad):
            return np.ones(2) if step.is_last else grad

        def backward_weight(self, step):
            pass

    def run(rank, comm):
        ranks = next(p for p in pipes if rank in p)
        me = ranks.index(rank)
        runner = phalanx.PipelineRunner("zbh1", 2, 4, me, dtype=np.float64, ranks=ranks)
        stage = Affine(me)
        runner.run(comm, stage)
        runner.finish(comm)
        return stage.last

    out = on_all(list(enumerate(four)), lambda rc: run(*rc))
    for rank in (1, 2):  # the last stage of each pipeline
        assert sorted(out[rank]) == [0, 1, 2, 3]
        for mb, y in out[rank].items():
            np.testing.assert_array_equal(y, [6.0 * mb, 6.0])


def test_runner_argument_errors():
    with pytest.raises(ValueError, match="unknown schedule"):
        phalanx.PipelineRunner("gpipe", 4, 8, 0)
    with pytest.raises(ValueError, match="stage 4 of a schedule of 4"):
        phalanx.PipelineRunner("1f1b", 4, 8, 4)
    with pytest.raises(ValueError, match="float32 or float64"):
        phalanx.PipelineRunner("1f1b", 4, 8, 0, dtype=np.int32)
    r = phalanx.PipelineRunner("zbv", 4, 8, 3, dtype="float64")
    assert r.stage == 3 and len(r.order) == 3 * 8 * 2 and r.order[0] == ("F", 0, 0)
    assert "ZB-V" in repr(r) and "f64" in repr(r)
    with pytest.raises(ValueError, match="distinct ranks"):
        phalanx.PipelineRunner("1f1b", 4, 8, 0, ranks=[0, 1, 1, 2])


def test_readme_runner_example_runs(tmp_path):
    """README's "Running a schedule" Python example, as written."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from conftest import TIMEOUT

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("\n### Running a schedule\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "one python block in README's 'Running a schedule'"
    script = tmp_path / "pipeline_example.py"
    script.write_text(blocks[0])
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "pipeline ok [[1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 5.0]]" in out.stdout, out.stdout
