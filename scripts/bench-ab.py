#!/usr/bin/env python3
"""A/B of `phalanx bench` binaries: alternates them round by round in one sitting and
prints, per (collective, n, data transport, size), each round's busbw, the medians, the
ratio of the last binary's median to the first's, and the median CPU seconds per GB sent.

Usage:
  scripts/bench-ab.py BIN_A,BIN_B[,...] ROUNDS [phalanx bench arguments...]
e.g.
  scripts/bench-ab.py /tmp/phalanx-before,target/release/phalanx 4 \\
      --collectives all-reduce --peers 2,4 --sizes 1M,16M,64M --data-transport tcp \\
      --shm auto --iters 5 --no-raw --recovery-peers 0

The machine's speed drifts between runs; a ratio means something only for binaries run
side by side like this, over several rounds (docs/PERF.md).
"""
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile


def rows(report):
    """Every measured row of a bench JSON report, with its collective named: the
    all-reduce rows from `allreduce` (they carry the CPU figures), the others from
    `collectives`."""
    allreduce = [dict(r, collective="all-reduce") for r in report.get("allreduce", [])]
    others = [r for r in report.get("collectives", []) if r["collective"] != "all-reduce"]
    return allreduce + others


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    bins, rounds, args = sys.argv[1].split(","), int(sys.argv[2]), sys.argv[3:]
    busbw = collections.defaultdict(lambda: collections.defaultdict(list))
    cpu = collections.defaultdict(lambda: collections.defaultdict(list))
    with tempfile.TemporaryDirectory() as out:
        for r in range(rounds):
            for i, b in enumerate(bins):
                path = os.path.join(out, f"{i}-{r}.json")
                print(f"round {r + 1}/{rounds}: {b}", file=sys.stderr)
                subprocess.run([b, "bench", *args, "--json", path], stdout=subprocess.DEVNULL, check=True)
                with open(path) as f:
                    for row in rows(json.load(f)):
                        key = (row["collective"], row["n"], row["data_transport"], row["bytes"])
                        busbw[key][i].append(row["busbw_gbps"])
                        if row.get("cpu_secs_per_gb_sent") is not None:
                            cpu[key][i].append(row["cpu_secs_per_gb_sent"])
    for key in sorted(busbw):
        coll, n, transport, size = key
        meds = [statistics.median(busbw[key][i]) for i in range(len(bins))]
        rounds_text = " | ".join(" / ".join(f"{v:.3f}" for v in busbw[key][i]) for i in range(len(bins)))
        cpu_text = ", ".join(f"{statistics.median(cpu[key][i]):.3f}" if cpu[key][i] else "-" for i in range(len(bins)))
        ratio = meds[-1] / meds[0] if meds[0] else float("nan")
        print(f"{coll} n={n} {transport} {size >> 10} KiB: {rounds_text}; medians "
              + " ".join(f"{m:.3f}" for m in meds) + f"; ratio {ratio:.2f}; CPU s/GB {cpu_text}")


if __name__ == "__main__":
    main()
