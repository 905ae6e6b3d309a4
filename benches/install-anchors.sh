#!/usr/bin/env bash
# Installs what `phalanx bench --compare mpi,gloo` runs against (the bench itself
# installs nothing): Open MPI from Debian's packages (mpicc, mpirun) and CPU use of
# torch from PyPI into a venv, target/anchors-venv, which the bench finds by itself.
# Usage: benches/install-anchors.sh [mpi] [gloo]   (both when none is named)
# Needs root (or sudo) for apt-get. Afterwards:
#   target/release/phalanx bench --collectives all-reduce,all-gather --compare mpi,gloo
set -euo pipefail
cd "$(dirname "$0")/.."
want=("$@")
[ ${#want[@]} -eq 0 ] && want=(mpi gloo)
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
for w in "${want[@]}"; do
  case "$w" in
    mpi)
      echo "== Open MPI: apt-get install openmpi-bin libopenmpi-dev"
      $sudo apt-get update -q
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q openmpi-bin libopenmpi-dev
      mpirun --version | head -1
      ;;
    gloo)
      echo "== torch (Gloo backend): pip install torch into target/anchors-venv"
      python3 -m venv target/anchors-venv
      target/anchors-venv/bin/python -m pip install --quiet torch numpy
      target/anchors-venv/bin/python -c 'import torch; print("torch", torch.__version__)'
      ;;
    *)
      echo "unknown anchor '$w' (mpi or gloo)" >&2
      exit 2
      ;;
  esac
done
