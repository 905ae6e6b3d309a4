"""Pipeline schedules from Python: the reference's worked example, typed errors, and
the runner (`PipelineRunner`) training an MLP over four in-process stages on threads,
bitwise equal to a single-process numpy run."""

import threading

import numpy as np
import pytest

import phalanx
from conftest import on_all
from models import (
    D,
    ITERS,
    LAYERS,
    LR,
    M,
    P,
    TARGET,
    W0,
    X,
    FusedMlpStage,
    MlpStage,
    backprop,
    reference,
)


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
# The runner: an MLP of 8 linear layers trained over four in-process stages (the model
# of tests/models.py, which the peer processes of test_processes_models.py train too).


def test_runner_trains_an_mlp_bitwise_equal_to_one_process(four):
    want = reference()

    def train(rank, comm, name, cls):
        runner = phalanx.PipelineRunner(name, P, M, rank, chunks=2)
        stage = cls()
        for it in range(ITERS):
            timeline = runner.run(comm, stage)
            assert [t[:3] for t in timeline] == runner.order
            assert all(b <= r <= c <= e for _, _, _, b, r, c, e in timeline)
            assert stage.idle()
            sums = stage.step()  # zeros for the layers of other stages
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


# ---------------------------------------------------------------------------------------
# A 2 × 2 grid (2 stages × 2 replicas) with the MLP: replica r trains micro-batches
# r·MR .. r·MR + MR - 1 of X, the stages' gradients are summed over the replicas
# (PipelineGrid.all_reduce_gradients) and the step commits on every rank or none
# (PipelineCommitter). In iteration NAN_IT one micro-batch of replica 1 holds a NaN.

PP, DP, MR, NAN_IT = 2, 2, M // 2, 1


def grid_data(it):
    """Each replica's inputs in iteration `it` (a NaN in replica 1's micro-batch 2 in NAN_IT)."""
    xs = [X[r * MR : (r + 1) * MR].copy() for r in range(DP)]
    if it == NAN_IT:
        xs[1][2, 0, 0] = np.nan
    return xs, [TARGET[r * MR : (r + 1) * MR] for r in range(DP)]


def grid_reference():
    """One process: each replica's gradients summed over its micro-batches in order, the
    two replicas' sums added, SGD; the NaN iteration's step skipped. The weights after
    every iteration."""
    w, out = W0.copy(), []
    for it in range(ITERS):
        xs, ts = grid_data(it)
        total = np.zeros((LAYERS, D, D), np.float32)
        sums = []
        for r in range(DP):
            s = np.zeros((LAYERS, D, D), np.float32)
            for mb in range(MR):
                for layer, g in enumerate(backprop(w, xs[r][mb], ts[r][mb])):
                    s[layer] += g
            sums.append(s)
        total = sums[0] + sums[1]
        if np.isfinite(total).all():
            w -= LR * total
        out.append(w.copy())
    return out


def test_a_grid_trains_bitwise_like_one_process_and_skips_a_nan_step_everywhere(four):
    want = grid_reference()

    def train(rank, comm):
        grid = phalanx.PipelineGrid.in_order(PP, DP, rank)
        stage_index, replica = grid.me
        assert (stage_index, replica) == (rank % PP, rank // PP)
        assert grid.pipeline(replica) == [replica * PP, replica * PP + 1] and grid.dp_group(stage_index) == [
            stage_index,
            stage_index + PP,
        ]
        runner = grid.runner("1f1b", MR)
        committer = phalanx.PipelineCommitter(grid, runner)
        stage = FusedMlpStage()
        mine = range(stage_index * LAYERS // PP, (stage_index + 1) * LAYERS // PP)
        saved = {}

        def step(scale):
            saved["w"] = stage.weights[mine.start : mine.stop].copy()
            stage.weights[mine.start : mine.stop] -= LR * np.float32(scale) * grads.reshape(-1, D, D)

        def undo():
            stage.weights[mine.start : mine.stop] = saved["w"]

        verdicts = []
        for it in range(ITERS):
            xs, ts = grid_data(it)
            stage.x, stage.t = xs[replica], ts[replica]
            runner.run(comm, stage)
            sums = np.zeros((len(mine), D, D), np.float32)
            for i, layer in enumerate(mine):
                for mb in range(MR):
                    sums[i] += stage.grads.pop((layer, mb))
            grads = sums.ravel()
            grid.all_reduce_gradients(comm, grads)  # in place, summed over the replicas
            verdict, scale, norm = committer.step(comm, grads, step, undo)
            verdicts.append(verdict)
            for layer in mine:
                np.testing.assert_array_equal(stage.weights[layer], want[it][layer], f"iteration {it} layer {layer}")
        grid.finish(comm)
        return verdicts

    out = on_all(list(enumerate(four)), lambda rc: train(*rc))
    assert out == [["keep", "skip", "keep"]] * (PP * DP), out


def test_grid_argument_errors():
    with pytest.raises(ValueError, match="rank 4"):
        phalanx.PipelineGrid.in_order(2, 2, 4)
    grid = phalanx.PipelineGrid.in_order(2, 2, 3)
    assert grid.me == (1, 1) and grid.shape == (2, 2) and "2 × 2" in repr(grid)
    assert grid.runner("zbh1", 4).stage == 1  # the runner of the rank's stage
    with pytest.raises(ValueError, match="unknown schedule"):
        grid.runner("gpipe", 4)
    with pytest.raises(ValueError):
        grid.pipeline(2)


def readme_python_blocks():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("\n### Running a schedule\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def run_script(tmp_path, code):
    import subprocess
    import sys

    from conftest import TIMEOUT

    script = tmp_path / "pipeline_example.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_readme_grid_example_runs(tmp_path):
    """README's "Running a schedule" second Python example (the grid), as written."""
    blocks = readme_python_blocks()
    assert len(blocks) == 2, "two python blocks in README's 'Running a schedule'"
    out = run_script(tmp_path, blocks[1])
    assert "grid ok" in out, out


def test_readme_runner_example_runs(tmp_path):
    """README's "Running a schedule" first Python example (the runner), as written."""
    out = run_script(tmp_path, readme_python_blocks()[0])
    assert "pipeline ok [[1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 5.0]]" in out, out
