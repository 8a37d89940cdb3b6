"""Molecular dynamics with a trained model through ASE: Langevin NVT, then an NVE segment for energy drift.

    python scripts/md_demo.py --ckpt outputs/<date>/<time>/checkpoints/last.ckpt
    python scripts/md_demo.py --ckpt last.ckpt --size 3 --temperature 600 --steps 500 --nve-steps 1000

Builds a Cu/Ni fcc cell (as the built-in demo data: a = 3.6 Å, 4 * size^3 atoms, a random ``--ni-fraction``
of Ni), equilibrates it with ``--steps`` of Langevin NVT at ``--temperature`` K, then runs ``--nve-steps``
of velocity Verlet and reports the drift of the total energy (slope of a linear fit, meV/atom/ps), its
largest excursion (meV/atom) and the speed in atom-steps per second. The model must know Cu and Ni
(a model trained on the demo data: ``python train.py``).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from ase import units
from ase.build import bulk
from ase.constraints import FixCom
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary
from ase.md.verlet import VelocityVerlet

from dpfit.calculators import DPCalculator


def cuni_cell(size: int = 2, ni_fraction: float = 0.5, a: float = 3.6, seed: int = 0):
    """Cubic fcc cell of 4 * size^3 atoms, a random ``ni_fraction`` of them Ni, the rest Cu."""
    atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat((size, size, size))
    rng = np.random.default_rng(seed)
    symbols = np.array(["Cu"] * len(atoms))
    symbols[rng.choice(len(atoms), round(ni_fraction * len(atoms)), replace=False)] = "Ni"
    atoms.set_chemical_symbols(symbols.tolist())
    return atoms


def thermalize(atoms, temperature_K: float, rng: np.random.Generator) -> None:
    """Maxwell-Boltzmann momenta at ``temperature_K`` with zero total momentum."""
    try:
        from ase.md.velocitydistribution import thermalize_momenta  # ASE >= 3.29
    except ImportError:  # pragma: no cover - older ASE
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta
    thermalize_momenta(atoms, temperature_K=temperature_K, rng=rng)
    Stationary(atoms)


def energy_drift(times_ps: np.ndarray, etot_per_atom: np.ndarray) -> tuple[float, float]:
    """(slope of a linear fit in meV/atom/ps, largest |E(t) - E(0)| in meV/atom)."""
    slope = np.polyfit(times_ps, etot_per_atom, 1)[0] if len(times_ps) > 1 else 0.0
    return 1000.0 * float(slope), 1000.0 * float(np.max(np.abs(etot_per_atom - etot_per_atom[0])))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="dpfit checkpoint (last.ckpt) or DeePMD-kit model.ckpt.pt")
    p.add_argument("--size", type=int, default=2, help="fcc cell repeats per direction (4 * size^3 atoms)")
    p.add_argument("--ni-fraction", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=300.0, help="K")
    p.add_argument("--timestep", type=float, default=1.0, help="fs")
    p.add_argument("--steps", type=int, default=200, help="Langevin NVT steps")
    p.add_argument("--nve-steps", type=int, default=200, help="velocity Verlet steps for the energy drift")
    p.add_argument("--friction", type=float, default=0.02, help="Langevin friction, 1/fs")
    p.add_argument("--skin", type=float, default=1.0, help="neighbor-list skin, Å")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default=None, choices=[None, "float64", "float32"])
    p.add_argument("--kernels", default="auto", choices=["off", "auto", "on"], help="compiled CPU kernels")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--traj", default=None, help="write the NVE trajectory to this ASE .traj file")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    calc = DPCalculator(args.ckpt, device=args.device, skin=args.skin, precision=args.precision,
                        kernels=args.kernels)
    needed = {"Cu", "Ni"} if args.ni_fraction > 0 else {"Cu"}
    missing = needed - set(calc.type_map)
    if missing:
        raise SystemExit(f"error: the model's type_map {calc.type_map} lacks {sorted(missing)}")
    atoms = cuni_cell(args.size, args.ni_fraction, seed=args.seed)
    atoms.calc = calc
    natoms = len(atoms)
    rng = np.random.default_rng(args.seed)
    thermalize(atoms, args.temperature, rng)
    dt = args.timestep * units.fs
    print(f"# {natoms} atoms ({atoms.get_chemical_formula()}), model {args.ckpt}")

    nvt_rate = float("nan")
    if args.steps > 0:
        atoms.set_constraint(FixCom())  # the thermostat's noise must not move the centre of mass
        nvt = Langevin(atoms, dt, temperature_K=args.temperature, friction=args.friction / units.fs, fixcm=False,
                       rng=rng)
        atoms.get_forces()  # first call (neighbor search, warm-up) outside the timing
        start = time.perf_counter()
        nvt.run(args.steps)
        nvt_rate = natoms * args.steps / (time.perf_counter() - start)
        print(f"NVT  {args.steps:6d} steps at {args.temperature:.0f} K: T = {atoms.get_temperature():7.1f} K, "
              f"{nvt_rate:10.0f} atom-steps/s")

    atoms.set_constraint()
    nve = VelocityVerlet(atoms, dt)
    if args.traj:
        from ase.io.trajectory import Trajectory

        nve.attach(Trajectory(args.traj, "w", atoms).write, interval=1)
    etot, temps = [], []

    def record() -> None:
        etot.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())
        temps.append(atoms.get_temperature())

    nve.attach(record, interval=1)
    builds0 = calc.neighbors.nbuild
    start = time.perf_counter()
    nve.run(args.nve_steps)
    nve_rate = natoms * args.nve_steps / (time.perf_counter() - start) if args.nve_steps else float("nan")
    times_ps = np.arange(len(etot)) * args.timestep / 1000.0
    e = np.asarray(etot) / natoms
    drift, excursion = energy_drift(times_ps, e)
    result = {
        "natoms": natoms,
        "nvt_atom_steps_per_s": nvt_rate,
        "nve_atom_steps_per_s": nve_rate,
        "drift_mev_per_atom_per_ps": drift,
        "max_excursion_mev_per_atom": excursion,
        "temperature_mean": float(np.mean(temps)) if temps else float("nan"),
        "neighbor_searches": calc.neighbors.nbuild - builds0,
    }
    print(f"NVE  {args.nve_steps:6d} steps, dt = {args.timestep} fs: <T> = {result['temperature_mean']:7.1f} K, "
          f"{nve_rate:10.0f} atom-steps/s, {result['neighbor_searches']} neighbor searches")
    print(f"energy drift {drift:+.4f} meV/atom/ps (largest excursion {excursion:.4f} meV/atom)")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
