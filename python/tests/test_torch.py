"""phalanx as a torch.distributed backend: every op against Gloo's results on the same
inputs (integers in floats, so exact), DDP on a small transformer, and the errors a
mismatched call and a killed rank raise. Each rank is a process of its own, joined
through env:// on 127.0.0.1 as torchrun would."""

import socket

import pytest

torch = pytest.importorskip("torch")  # CI installs it: scripts/test.sh


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(spawn, backend, size, mode, event):
    port = free_port()
    ranks = [spawn("torch_pg.py", backend, r, size, port, mode) for r in range(size)]
    return ranks, [r.expect(event) for r in ranks] if event else None


def results(rank):
    out = {}
    while True:
        e = rank.expect(("result", "done"))
        if e["event"] == "done":
            return out
        out[e["name"]] = e["value"]


@pytest.mark.parametrize("size", [2, 4])
def test_every_op_equals_gloo(spawn, size):
    got = {}
    for backend in ("gloo", "phalanx"):
        ranks, _ = run_ranks(spawn, backend, size, "ops", None)
        got[backend] = [results(r) for r in ranks]
        for r in ranks:
            assert r.wait() == 0, r.diagnostics()
    for rank in range(size):
        ours, theirs = got["phalanx"][rank], got["gloo"][rank]
        assert ours.keys() == theirs.keys()
        for name in theirs:
            if name == "async_first_done_before_its_wait":
                continue  # Gloo may finish either way; checked for phalanx below
            assert ours[name] == theirs[name], f"rank {rank}, {name}"
        # Ops run in call order: the second async op done means the first is too.
        assert ours["async_first_done_before_its_wait"] is True


@pytest.mark.parametrize("size", [2, 4])
def test_ddp_transformer_matches_gloo(spawn, size):
    weights = {}
    for backend in ("gloo", "phalanx"):
        ranks, events = run_ranks(spawn, backend, size, "ddp", "weights")
        for r in ranks:
            assert r.wait() == 0, r.diagnostics()
        # Replicas are bitwise identical on both backends.
        assert len({e["sha256"] for e in events}) == 1, backend
        weights[backend] = events[0]
    ours, theirs = weights["phalanx"], weights["gloo"]
    if size == 2:
        # a + b is the same float whichever rank's term comes first: bitwise equal.
        assert ours["sha256"] == theirs["sha256"]
    else:
        # Four terms summed in another order differ in the last bits; 20 steps of SGD
        # keep that within float tolerance.
        a, b = torch.tensor(ours["values"]), torch.tensor(theirs["values"])
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()


def test_mismatched_call_raises_on_every_rank(spawn):
    ranks, events = run_ranks(spawn, "phalanx", 2, "mismatch", "error")
    for e in events:
        assert e["kind"] == "MismatchError" and e["restored"], e
    for r in ranks:
        assert r.wait() == 0, r.diagnostics()


def test_killed_rank_raises_in_the_survivors(spawn):
    ranks, _ = run_ranks(spawn, "phalanx", 3, "kill", None)
    ranks[2].expect("ready")
    ranks[2].kill()
    for r in ranks[:2]:
        e = r.expect("error")
        assert e["kind"] == "PeerLostError" and e["restored"], e
        # The master's peer timeout (750 ms by default) plus the wait before the call.
        assert e["seconds"] < 10, e


@pytest.mark.parametrize("external_master", [False, True])
def test_torchrun_launch(external_master, tmp_path):
    """torchrun sets MASTER_ADDR/PORT, RANK, WORLD_SIZE; rank 0 embeds a master, or
    every rank joins the one PHALANX_MASTER names (started for WORLD_SIZE peers)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import phalanx

    env = {k: v for k, v in os.environ.items() if k != "PHALANX_MASTER"}
    env["TORCH_RUN_OUT"] = str(tmp_path)
    master = phalanx.Master("127.0.0.1:0", initial_peers=2) if external_master else None
    if master is not None:
        env["PHALANX_MASTER"] = master.addr
    script = Path(__file__).parent / "peers" / "torch_run.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script)]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    finally:
        if master is not None:
            master.close()
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(e["rank"], e["size"], e["backend"], e["value"]) for e in seen] == [
        (r, 2, "phalanx", [3.0] * 4) for r in range(2)
    ]


def test_readme_torch_example_runs_under_torchrun(tmp_path):
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("\n## From PyTorch\n", 1)[1].split("\n## ", 1)[0]
    script = tmp_path / "train.py"
    script.write_text(re.findall(r"```python\n(.*?)```", section, flags=re.S)[0])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("variant", [[], ["--streaming"], ["--async"]])
def test_diloco_example_survives_a_kill_and_a_join(variant):
    """examples/torch_diloco.py: 4 workers, one SIGKILLed 30% into the run, a joiner at
    half; the driver checks that every worker reporting a round (a sync point, streaming)
    holds the same outer weights and momentum (one digest per round), that the loss fell,
    and that the joiner finished."""
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "torch_diloco.py"
    done = subprocess.run([sys.executable, str(example), *variant], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "driver: OK" in done.stdout, done.stdout[-4000:] + done.stderr[-3000:]
    assert "rank 3/4" in done.stdout, "the joiner took part"


def test_ddp_example_runs_under_torchrun():
    """examples/torch_ddp.py: DDP on a small transformer under torchrun, 2 ranks; it fails
    unless the loss fell and the replicas' weights are bitwise identical."""
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "torch_ddp.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(example), "--steps", "20"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "replicas identical: True" in done.stdout, done.stdout
