#!/usr/bin/env bash
# The GPU check of issue #17, prepared on a machine with no GPU: run it on one with a
# GPU and an NCCL (it has not been run yet). It needs no Rust toolchain there: build the
# probe here and carry it along.
#
#   cargo build --release --example nccl_probe --features nccl
#   scripts/gpu-check.sh target/release/examples/nccl_probe
#
# What it checks, each step printing PASS or FAIL (exit status: the number of FAILs):
#   1. The NCCL found by phalanx's discovery (PHALANX_NCCL_LIBRARY unset: the active
#      python3's nvidia-nccl wheel, else libnccl.so.2) loads: path, version and
#      capabilities are printed; a version below 2.28.0 is refused.
#   2. The system libnccl.so.2 and the wheel's libnccl (when present), each named by
#      PHALANX_NCCL_LIBRARY: each loads, and with --init makes a unique id and a
#      non-blocking 1-rank communicator on GPU 0 that becomes ready (the wait sleeps),
#      reads its async state and aborts it.
#   3. The loader's errors on the real machine: PHALANX_NCCL_LIBRARY at a missing file
#      and at libm give exit status 2 and a message naming the path, never a panic.
#
# What it does not check yet (issue #17 asks for them; they need device allocation,
# i.e. cudarc's driver module, and a device runner of the hierarchical plan, which are
# not built yet): every collective on device buffers against a CPU reference; the busbw
# of a 256 MiB all-reduce; two processes, each a 1-rank communicator on the one GPU,
# joined by QUIC through the hierarchical path; a killed process and the survivor's
# typed error with its device buffer restored.
set -uo pipefail

probe=${1:-target/release/examples/nccl_probe}
if [[ ! -x $probe ]]; then
    echo "no probe at $probe: build it with" >&2
    echo "  cargo build --release --example nccl_probe --features nccl" >&2
    exit 64
fi
fails=0

# step NAME EXPECTED_STATUS COMMAND...: runs the command with a 60 s limit.
step() {
    local name=$1 want=$2
    shift 2
    echo "== $name"
    timeout 60 "$@"
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

echo "== $fails failed"
exit "$fails"
