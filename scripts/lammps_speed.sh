#!/bin/sh
# MD speed in the real LAMMPS (pair_style deepmd) and ASE: DeePMD-kit's frozen and compressed models against
# dpfit's exports (PyTorch only, and on the op library), on the same weights; see lammps_speed.py's header.
#   sh ../shared/tools/peer_lammps.sh setup       # once per machine
#   sh scripts/lammps_speed.sh [--sizes 1 2] [--threads 1 2] [--steps 100] [--preload no yes] ...
# Runs with dpfit's Python for dpfit and the peer venv for LAMMPS / DeePMD-kit. Nothing else should run
# meanwhile (the figures are times). About 1 hour with the defaults on 2 cores.
set -eu
REPO=$(cd "$(dirname "$0")/.." && pwd)
exec python "$REPO/scripts/lammps_speed.py" "$@"
