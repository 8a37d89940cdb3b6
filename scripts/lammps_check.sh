#!/bin/sh
# Check dpfit's exported models in the real LAMMPS (pair_style deepmd) and DeePMD-kit (dp freeze / test /
# model-devi / compress, DeepPot, deepmd.calculator.DP), against dpfit's own predictions (test.py).
#   sh ../shared/tools/peer_lammps.sh setup        # once per machine (~5 GB in $TMPDIR/peer-lammps)
#   scripts/lammps_check.sh [--trained CKPT] [--steps 1000] [--work DIR] [--only run0,nve,mpi,...]
# Runs with dpfit's Python for dpfit and the peer venv for LAMMPS/dp; exits 1 if a check fails.
# Not part of the test suite (it needs the 4 GB venv and ~20 min on 2 CPU cores).
set -eu
REPO=$(cd "$(dirname "$0")/.." && pwd)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
exec python "$REPO/scripts/lammps_check.py" "$@"
