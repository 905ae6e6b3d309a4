#!/usr/bin/env bash
# The GPU check of issue #17, prepared on a machine with no GPU (it has not run on one
# yet): run it on a machine with a GPU, its driver and an NCCL. It needs no Rust
# toolchain there: build the two binaries here and carry them along.
#
#   cargo build --release --example nccl_probe --features nccl
#   cargo build --release -p phalanx-cli --features nccl
#   pip wheel ./python --no-deps -w target/wheels --config-settings=build-args="--features nccl"
#   scripts/gpu-check.sh target/release/examples/nccl_probe target/release/phalanx target/wheels/phalanx-*.whl
#
# What it checks, each step printing PASS or FAIL (exit status: the number of FAILs),
# in about a minute on an H100/H200 (each step is limited to 60 s, the device check to
# 240 s):
#   1. The NCCL found by phalanx's discovery (PHALANX_NCCL_LIBRARY unset: the active
#      python3's nvidia-nccl wheel, else libnccl.so.2) loads: path, version and
#      capabilities are printed; a version below 2.28.0 is refused.
#   2. The system libnccl.so.2 and the wheel's libnccl (when present), each named by
#      PHALANX_NCCL_LIBRARY: each loads, and with --init makes a unique id and a
#      non-blocking 1-rank communicator on GPU 0 that becomes ready (the wait sleeps),
#      reads its async state and aborts it.
#   3. The loader's errors on the real machine: PHALANX_NCCL_LIBRARY at a missing file
#      and at libm give exit status 2 and a message naming the path, never a panic.
#   4. `phalanx device-check --backend nccl` with each NCCL: two processes, each a 1-rank
#      NCCL communicator on the one GPU (NCCL refuses two ranks of one communicator on
#      one GPU), joined by QUIC through the hierarchical all-reduce: every collective on
#      device buffers (all-reduce, reduce-scatter, all-gather, broadcast, reduce,
#      grouped send/recv, and the device-side backup and restore) against a CPU
#      reference; the hierarchical all-reduce's exact sums across the processes; the
#      busbw of a 256 MiB all-reduce (16 MiB with the second NCCL); the second process
#      SIGKILLed while the first is in an all-reduce: a retryable error, and its device
#      buffer as it was. The same command runs in CI on the CPU stand-in.
#   5. With the wheel (the third argument; installed with --no-deps into a directory of
#      its own, nothing else touched), scripts/gpu_check_python.py: DeviceCommunicator
#      on the NCCL backend, every collective on CUDA tensors through DLPack, from torch
#      (its current stream and a stream of its own) and cupy when installed.
set -uo pipefail

probe=${1:-target/release/examples/nccl_probe}
phalanx=${2:-target/release/phalanx}
wheel=${3:-}
for bin in "$probe" "$phalanx"; do
    if [[ ! -x $bin ]]; then
        echo "no binary at $bin: build both with" >&2
        echo "  cargo build --release --example nccl_probe --features nccl" >&2
        echo "  cargo build --release -p phalanx-cli --features nccl" >&2
        exit 64
    fi
done
fails=0

# step NAME EXPECTED_STATUS COMMAND...: runs the command with a limit of $limit s.
limit=60
step() {
    local name=$1 want=$2
    shift 2
    echo "== $name"
    timeout "$limit" "$@"
    local got=$?
    if [[ $got -eq $want ]]; then
        echo "PASS: $name"
    else
        echo "FAIL: $name (exit status $got, wanted $want)"
        fails=$((fails + 1))
    fi
}

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || echo "(no nvidia-smi)"

step "discovery loads an NCCL" 0 env -u PHALANX_NCCL_LIBRARY "$probe"

system_nccl=$(ldconfig -p 2>/dev/null | awk '/libnccl\.so\.2 /{print $NF; exit}')
wheel_nccl=$(timeout 10 python3 -c "
import os, sys
for d in sys.path:
    p = os.path.join(d or '.', 'nvidia', 'nccl', 'lib', 'libnccl.so.2')
    if os.path.isfile(p):
        print(os.path.abspath(p)); break
" 2>/dev/null)
for lib in "$system_nccl" "$wheel_nccl"; do
    [[ -n $lib ]] || continue
    step "load $lib" 0 env PHALANX_NCCL_LIBRARY="$lib" "$probe"
    step "1-rank communicator on $lib: id, non-blocking init, async state, abort" 0 \
        env PHALANX_NCCL_LIBRARY="$lib" "$probe" --init
done
[[ -n $system_nccl || -n $wheel_nccl ]] || { echo "FAIL: neither a system nor a wheel NCCL"; fails=$((fails + 1)); }

step "PHALANX_NCCL_LIBRARY at a missing file: typed error" 2 \
    env PHALANX_NCCL_LIBRARY=/nonexistent/libnccl.so.2 "$probe"
libm=$(ldconfig -p 2>/dev/null | awk '/libm\.so\.6 /{print $NF; exit}')
step "PHALANX_NCCL_LIBRARY at libm: not NCCL" 2 env PHALANX_NCCL_LIBRARY="${libm:-/lib/x86_64-linux-gnu/libm.so.6}" "$probe"

limit=300
mib=256
for lib in "$system_nccl" "$wheel_nccl"; do
    [[ -n $lib ]] || continue
    step "device-check on $lib: 2 processes, every collective, hierarchical, $mib MiB busbw, a kill" 0 \
        env PHALANX_NCCL_LIBRARY="$lib" "$phalanx" device-check --backend nccl --peers 2 --mib "$mib" --iters 3 \
        --timeout-s 240
    mib=16
done

if [[ -n $wheel ]]; then
    site=$(mktemp -d)
    if python3 -m pip install --quiet --no-deps --no-index --target "$site" "$wheel"; then
        step "python: DeviceCommunicator on CUDA tensors (torch, cupy)" 0 \
            env PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" python3 "$(dirname "$0")/gpu_check_python.py"
    else
        echo "FAIL: installing $wheel"
        fails=$((fails + 1))
    fi
    rm -rf "$site"
fi

echo "== $fails failed"
exit "$fails"
