"""All-reduce of a float32 array from Python vs the same from Rust, side by side.

    python python/bench/bench_allreduce.py [--mib 64] [--iters 10] [--reps 3] [--cli PATH]

A master runs in this process and two peer processes (this script with --peer) join it
over QUIC on 127.0.0.1. In the same group, over the same links, each peer alternates
between two loops of `iters` timed all-reduces (sum) of `mib` MiB:

- python: `comm.all_reduce(x)` on a numpy array, timed with time.perf_counter;
- rust: the same loop in Rust (`phalanx._native._bench_all_reduce_rust`: a Vec<f32> and
  `Communicator::all_reduce`, no Python between the calls), in the same process.

The order alternates per repetition (python, rust, rust, python, ...) so drift on a busy
machine hits both alike. The ratio of the medians is the cost of the binding; a copy of
64 MiB in it would show (a memcpy of 64 MiB takes about 10 ms here). The peers also
report the Python-side memory allocated during one all_reduce (tracemalloc; numpy's
allocations are traced): 0 means no array was copied.

With --cli PATH (default: target/release/phalanx if present), a third figure comes from
two `phalanx bench-peer` processes (the CLI's pure-Rust peers: no Python in the process
at all) against the same master, after the Python group has left; skipped if it fails.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def emit(event, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)


def peer(args):
    """One peer process: joins, forms a group of two, runs the alternating loops."""
    import tracemalloc

    import numpy as np

    import phalanx
    from phalanx import _native

    comm = phalanx.Communicator.connect(args.master, join_timeout_ms=60_000)
    comm.update_topology()
    while comm.size < 2:
        time.sleep(0.02)
        comm.update_topology()
    nbytes = args.mib << 20
    x = np.ones(nbytes // 4, dtype=np.float32)
    comm.all_reduce(x)
    checked = bool(np.all(x == 2.0))
    x[:] = 0.0  # zeros stay zeros: no overflow, no denormals
    comm.all_reduce(x)  # warm-up
    _native._bench_all_reduce_rust(comm, nbytes, 1)  # warm-up
    times = {"python": [], "rust": []}
    for rep in range(args.reps):
        order = ["python", "rust"] if rep % 2 == 0 else ["rust", "python"]
        for kind in order:
            comm.barrier()
            if kind == "rust":
                times["rust"] += _native._bench_all_reduce_rust(comm, nbytes, args.iters)
            else:
                for _ in range(args.iters):
                    t = time.perf_counter()
                    comm.all_reduce(x)
                    times["python"].append(time.perf_counter() - t)
    comm.barrier()
    tracemalloc.start()
    comm.all_reduce(x)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    comm.barrier()
    emit("result", rank=comm.rank, checked=checked, times=times, traced_peak_bytes=peak)
    comm.barrier()
    comm.leave()


def read_events(proc, want, timeout):
    """Events named `want` from a peer's stdout, one per line, until it exits."""
    out = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") == want:
            out.append(ev)
        if time.monotonic() > deadline:
            break
    proc.wait(timeout=max(deadline - time.monotonic(), 1))
    return out


def cli_figure(cli, master_addr, mib, iters):
    """Median seconds of `phalanx bench-peer` (pure Rust processes), or an error string."""
    cmd = [cli, "bench-peer", "--master", master_addr, "--expect", "2", "--sizes", f"{mib}M",
           "--iters", str(iters), "--warmup", "1"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        results = [read_events(p, "result", 600) for p in procs]
        if any(p.returncode != 0 for p in procs) or not all(results):
            return "failed: " + " | ".join(p.stderr.read()[-300:] for p in procs)
        secs = [s for r in results for s in r[0]["secs"]]
        return statistics.median(secs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=64, help="array size in MiB (default 64)")
    ap.add_argument("--iters", type=int, default=10, help="timed all-reduces per loop (default 10)")
    ap.add_argument("--reps", type=int, default=4, help="python/rust alternations (default 4)")
    ap.add_argument("--cli", default=None, help="phalanx CLI for a pure-Rust-process figure ('' to skip)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--master", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:
        return peer(args)

    import phalanx

    master = phalanx.Master("127.0.0.1:0", peer_timeout_ms=5000)
    cmd = [sys.executable, __file__, "--peer", "--master", master.addr, "--mib", str(args.mib),
           "--iters", str(args.iters), "--reps", str(args.reps)]
    started = time.monotonic()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        results = [read_events(p, "result", 900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode != 0 for p in procs) or not all(results):
        sys.exit("a peer failed")
    results = [r[0] for r in results]
    wall = time.monotonic() - started

    py = [t for r in results for t in r["times"]["python"]]
    rs = [t for r in results for t in r["times"]["rust"]]
    nbytes = args.mib << 20
    busbw = lambda s: nbytes / s / 1e9  # noqa: E731 -- n = 2: busbw = algbw * 2(n-1)/n = algbw
    report = {
        "mib": args.mib,
        "iters_per_kind_per_peer": args.iters * args.reps,
        "checked": all(r["checked"] for r in results),
        "python_median_s": statistics.median(py),
        "rust_median_s": statistics.median(rs),
        "python_min_s": min(py),
        "rust_min_s": min(rs),
        "ratio_median": statistics.median(py) / statistics.median(rs),
        "traced_peak_bytes": [r["traced_peak_bytes"] for r in results],
        "wall_s": wall,
    }
    cli = args.cli
    if cli is None:
        default = ROOT / "target" / "release" / "phalanx"
        cli = str(default) if default.exists() else ""
    if cli:
        fig = cli_figure(cli, master.addr, args.mib, args.iters)
        report["cli_median_s"] = fig
    master.close()

    print(f"all-reduce, float32 sum, {args.mib} MiB, 2 peers over QUIC on 127.0.0.1, "
          f"{report['iters_per_kind_per_peer']} calls per kind per peer, results checked: {report['checked']}")
    print("| caller | median s | min s | busbw GB/s (median) |")
    print("|---|---|---|---|")
    print(f"| Python (numpy array, in place) | {report['python_median_s']:.4f} | {report['python_min_s']:.4f} "
          f"| {busbw(report['python_median_s']):.2f} |")
    print(f"| Rust, same process and group | {report['rust_median_s']:.4f} | {report['rust_min_s']:.4f} "
          f"| {busbw(report['rust_median_s']):.2f} |")
    if isinstance(report.get("cli_median_s"), float):
        print(f"| Rust CLI processes (phalanx bench-peer) | {report['cli_median_s']:.4f} | | "
              f"{busbw(report['cli_median_s']):.2f} |")
    elif "cli_median_s" in report:
        print(f"(phalanx bench-peer figure skipped: {report['cli_median_s']})")
    print(f"Python / Rust (medians): {report['ratio_median']:.3f}")
    print(f"Python-side bytes allocated during one all_reduce (tracemalloc peak, per peer): "
          f"{report['traced_peak_bytes']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
