#!/usr/bin/env bash
# Runs `phalanx bench` with two binaries, alternating, in one sitting, so that a change
# is judged against its parent on the same machine and load. Usage:
#   scripts/bench-compare.sh BEFORE_BIN AFTER_BIN OUT_DIR [ROUNDS]
# Writes OUT_DIR/{before,after}-N.json and prints each run's table.
set -euo pipefail
before=$1 after=$2 out=$3 rounds=${4:-2}
mkdir -p "$out"
export PHALANX_SECRET=${PHALANX_SECRET:-bench-compare-secret-0123456789abcdef}
for r in $(seq 1 "$rounds"); do
  for which in before after; do
    bin=$before; [ "$which" = after ] && bin=$after
    echo "== $which, round $r"
    "$bin" bench --sizes 4K,1M,64M --peers 2,4 --no-raw --recovery-peers 0 --iters 5 \
      --json "$out/$which-$r.json"
  done
done
