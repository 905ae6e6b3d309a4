#!/usr/bin/env bash
# Runs every test of the project: Rust unit, integration (in-process, simulated and
# multi-process over QUIC on 127.0.0.1), the device path with feature `nccl` (no GPU),
# C programs, doc tests, a 45 s churn run, lints, and the Python package's pytest
# suite. Exits non-zero on any failure. Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# A fresh run builds everything once: incremental caches would only cost disk (they were
# half of target/ here), and pip's wheel cache would hold torch's wheels a second time.
# CI's disk is shared with other jobs; one run ran out of space at the pip step.
export CARGO_INCREMENTAL=0 PIP_NO_CACHE_DIR=1
free_disk() { echo "   (disk: $(df -h --output=avail . | tail -1 | tr -d ' ') free, target/ $(du -sh target 2>/dev/null | cut -f1))"; }
free_disk

# Open MPI (Debian's openmpi-bin, libopenmpi-dev): cli/tests/bench.rs runs `phalanx bench
# --compare mpi` against it (a few seconds). Installed here, not only in CI, so that this
# one command runs every test on a fresh machine (apt-get needs root or sudo). torch for
# the Gloo anchor is a manual benchmark (benches/install-anchors.sh gloo).
if ! command -v mpirun >/dev/null || ! command -v mpicc >/dev/null; then
  benches/install-anchors.sh mpi
fi

echo "== cargo build (all targets)"
cargo build --workspace --all-targets --locked

echo "== cargo test"
cargo test --workspace --locked -- --test-threads=2

echo "== feature nccl: the workspace builds with it; the device path's tests run with it"
# No GPU and no NCCL here: what runs is the loader's errors (PHALANX_NCCL_LIBRARY at
# nothing, at a library that is not NCCL), the symbol/version gating, the CPU stand-in,
# the membership decisions and the hierarchical plan. scripts/gpu-check.sh is the GPU run.
cargo build --workspace --locked --features phalanx/nccl,phalanx-cli/nccl,phalanx-ffi/nccl
cargo test -p phalanx --locked --features nccl --lib device -- --test-threads=2
# The device docs' examples (cudarc slices: compiled, not run).
cargo test -p phalanx --locked --features nccl --doc device::
# The C face with NCCL asked for: the typed device error naming the path, not a crash.
cargo test -p phalanx-ffi --locked --features nccl --test c_device
# The GPU check's protocol on the stand-in, and its NCCL backend failing typed here.
cargo test -p phalanx-cli --locked --features nccl --test device_check

echo "== churn: 6 peer processes for 45 s through kills, freezes, joins and leaves"
# Exits non-zero if any invariant breaks (bit-identical models, exact sums, bounded
# waits, joiners in sync, progress). The debug binary was built above.
target/debug/phalanx churn --peers 6 --duration-s 45 --kill-every-s 6 --join-every-s 8 --seed 45 \
  --report-json target/churn-ci.json --report-svg target/churn-ci.svg

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy -p phalanx -p phalanx-cli --all-targets --locked --features phalanx/nccl,phalanx-cli/nccl -- -D warnings

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== python: pip install ./python[torch], pytest python/tests"
# The Python package (crate phalanx-py, excluded from the workspace) built by maturin
# through pip, in a venv of its own; its cargo target directory is python/target. The
# torch extra (CPU use; about a minute to install) runs the torch.distributed backend's
# tests against Gloo.
free_disk
# torch with its CUDA wheels takes about 5 GB. Where the disk is short, the Rust steps'
# build (done and no longer needed: the Python package and its crate build elsewhere)
# makes room for it.
if [ "$(df -k --output=avail . | tail -1)" -lt $((15 << 20)) ]; then
  echo "   (less than 15 GiB free: removing target/debug before the Python steps)"
  rm -rf target/debug
  free_disk
fi
python3 -m venv target/py-test-venv
target/py-test-venv/bin/python -m pip install --quiet "./python[torch]" pytest numpy
target/py-test-venv/bin/python -m pytest python/tests -q
free_disk

echo "== python crate's Rust unit tests (DLPack capsules read by hand-built tensors)"
# They link libpython (pyo3 without the extension-module feature): the venv's interpreter
# names it, and its LIBDIR is where the shared library is.
libdir=$(target/py-test-venv/bin/python -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
(cd python && LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  PYO3_PYTHON="$PWD/../target/py-test-venv/bin/python" cargo test --locked --lib)
