"""ASE molecular dynamics speed: dpfit's DPCalculator or DeePMD-kit's deepmd.calculator.DP on water.

    python scripts/ase_speed.py --calc dpfit --model CKPT [--reps 1] [--steps 100] [--threads 1]
    sh ../shared/tools/peer_lammps.sh python scripts/ase_speed.py --calc deepmd --model MODEL.pth   # DeePMD-kit

Velocity Verlet at 0.5 fs from data_3 frame 0 of DeePMD's water example (192 atoms, or ``--reps`` copies per
cell vector), 330 K. Prints one JSON line: ms per step (after 5 untimed steps), the model evaluation alone
(the calculator's ``calculate`` on one frame, repeated), and the total-energy drift. Runs in either
Python: it imports dpfit only for ``--calc dpfit``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

WATER3 = Path(__file__).resolve().parents[2] / "shared" / "data" / "water" / "data_3"


def water(reps: int):
    from ase import Atoms

    set_dir = sorted(WATER3.glob("set.*"))[0]
    coord = np.load(set_dir / "coord.npy")[0].astype(np.float64).reshape(-1, 3)
    box = np.load(set_dir / "box.npy")[0].astype(np.float64).reshape(3, 3)
    atype = np.loadtxt(WATER3 / "type.raw", dtype=int)
    atoms = Atoms(symbols=["OH"[t] for t in atype], positions=coord, cell=box, pbc=True)
    return atoms.repeat(reps) if reps > 1 else atoms


def calculator(kind: str, model: str):
    if kind == "dpfit":
        from dpfit.calculators import DPCalculator

        return DPCalculator(model)
    from deepmd.calculator import DP

    return DP(model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calc", choices=["dpfit", "deepmd"], required=True)
    ap.add_argument("--model", required=True, help="dpfit: a checkpoint; deepmd: a file DeePMD-kit's DP loads")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    atoms = water(args.reps)
    atoms.calc = calculator(args.calc, args.model)
    MaxwellBoltzmannDistribution(atoms, temperature_K=330, rng=np.random.default_rng(4928459))
    md = VelocityVerlet(atoms, 0.5 * units.fs)
    md.run(5)  # untimed: the first calls (model load, warm-up, neighbour search)
    e0 = atoms.get_total_energy()
    start = time.perf_counter()
    md.run(args.steps)
    per_step = (time.perf_counter() - start) / args.steps
    drift = (atoms.get_total_energy() - e0) / len(atoms)
    calc = atoms.calc
    start = time.perf_counter()
    for _ in range(10):  # the evaluation alone, on the same frame
        calc.calculate(atoms, ["energy", "forces"], [])
    evaluate = (time.perf_counter() - start) / 10
    print(json.dumps({"calc": args.calc, "model": args.model, "natoms": len(atoms), "threads": args.threads,
                      "ms_per_step": 1e3 * per_step, "ms_per_evaluation": 1e3 * evaluate,
                      "drift_ev_per_atom": drift, "steps": args.steps}))


if __name__ == "__main__":
    main()
