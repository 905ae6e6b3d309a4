#!/usr/bin/env bash
# The measured timelines of README "Running a schedule": for each schedule, a master and
# 4 `phalanx pipeline-worker --mode timed` processes on 127.0.0.1 (the master restarted
# per schedule, so that ranks are stages); prints stage 0's line (measured against
# simulated iteration and makespan) and `uptime` before and after. Usage:
#   scripts/pipeline-timelines.sh [BIN] [UNIT_MS] [ITERATIONS] [SCHEDULE...]
# Measure with a release build (`cargo build --release -p phalanx-cli`).
set -euo pipefail
bin=${1:-target/release/phalanx} unit=${2:-20} iterations=${3:-5}
shift $(($# < 3 ? $# : 3))
schedules=${*:-1f1b interleaved zbh1 zb2p zbv vhalf vmin}
dir=$(mktemp -d "${TMPDIR:-/tmp}/pipeline-timelines.XXXXXX")
master=
cleanup() {
  [ -n "$master" ] && kill "$master" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
uptime
for s in $schedules; do
  "$bin" master --listen 127.0.0.1:0 --initial-peers 4 >"$dir/master" 2>&1 &
  master=$!
  addr=
  for _ in $(seq 100); do
    addr=$(sed -n 's/.*"addr":"\([^"]*\)".*/\1/p' "$dir/master")
    [ -n "$addr" ] && break
    sleep 0.1
  done
  [ -n "$addr" ] || { echo "the master did not start" >&2; exit 1; }
  workers=()
  for stage in 0 1 2 3; do
    timeout 300 "$bin" pipeline-worker --master "$addr" --stage "$stage" --schedule "$s" \
      --mode timed --unit-ms "$unit" --iterations "$iterations" >"$dir/s$stage" 2>&1 &
    workers+=($!)
  done
  failed=0
  for w in "${workers[@]}"; do wait "$w" || failed=1; done
  [ "$failed" = 0 ] || { echo "$s: a stage failed:" >&2; cat "$dir"/s* >&2; }
  grep -v '^{' "$dir/s0" || true
  kill "$master" 2>/dev/null || true
  wait "$master" 2>/dev/null || true
  master=
done
uptime
