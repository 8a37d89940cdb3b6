"""Built-in demo data: rattled, strained Cu/Ni fcc alloys labelled with ASE's EMT calculator."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

DEMO_VERSION = 3
TYPE_MAP = ["Cu", "Ni"]


def default_cache_dir() -> Path:
    root = os.environ.get("DPFIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dpfit")
    return Path(root) / f"demo_cuni_v{DEMO_VERSION}"


def _write_system(folder: Path, frames: list, type_map: list[str]) -> None:
    folder.mkdir(parents=True)
    symbols = frames[0].get_chemical_symbols()
    np.savetxt(folder / "type.raw", [type_map.index(s) for s in symbols], fmt="%d")
    (folder / "type_map.raw").write_text("\n".join(type_map) + "\n")
    s = folder / "set.000"
    s.mkdir()
    np.save(s / "coord.npy", np.array([a.positions.reshape(-1) for a in frames]))
    np.save(s / "box.npy", np.array([a.cell.array.reshape(-1) for a in frames]))
    np.save(s / "energy.npy", np.array([a.get_potential_energy() for a in frames]))
    np.save(s / "force.npy", np.array([a.get_forces().reshape(-1) for a in frames]))
    np.save(s / "virial.npy", np.array([(-a.get_stress(voigt=False) * a.get_volume()).reshape(-1) for a in frames]))
    # per-atom force weights for the atom_pref loss: Ni atoms count double
    np.save(s / "atom_pref.npy", np.array([[2.0 if x == "Ni" else 1.0 for x in symbols] for _ in frames]))


def make_demo_frames(ni_fraction: float, nframes: int, seed: int) -> list:
    from ase.build import bulk
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    base = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))  # 32 atoms
    n_ni = int(round(ni_fraction * len(base)))
    symbols = np.array(["Cu"] * len(base))
    symbols[rng.choice(len(base), n_ni, replace=False)] = "Ni"
    frames = []
    for k in range(nframes):
        atoms = base.copy()
        atoms.set_chemical_symbols(symbols.tolist())
        eps = rng.normal(scale=0.01, size=(3, 3))
        strain = np.eye(3) + 0.5 * (eps + eps.T)  # symmetric: no rotation
        atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
        amplitude = 0.05 + 0.15 * k / max(nframes - 1, 1)  # a range of "temperatures"
        atoms.positions += rng.normal(scale=amplitude, size=atoms.positions.shape)
        atoms.calc = EMT()
        atoms.get_potential_energy()
        frames.append(atoms)
    return frames


def make_demo_dataset(root: str | Path | None = None, nframes: int = 90, seed: int = 0) -> Path:
    """Create (once) ``root/{train,val}/<composition>`` deepmd/npy systems; returns ``root``.

    Written to a temporary folder and renamed, so an interrupted run never leaves a half-written set.
    """
    root = Path(root) if root is not None else default_cache_dir()
    if (root / "COMPLETE").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=root.parent))
    try:
        for k, frac in enumerate((0.25, 0.5, 0.75)):
            frames = make_demo_frames(frac, nframes, seed + k)
            name = f"Cu{32 - round(frac * 32)}Ni{round(frac * 32)}"
            # every 6th frame validates: the same spread of strains and temperatures as training
            _write_system(tmp / "train" / name, [f for i, f in enumerate(frames) if i % 6], TYPE_MAP)
            _write_system(tmp / "val" / name, frames[::6], TYPE_MAP)
        (tmp / "COMPLETE").write_text(f"dpfit demo data v{DEMO_VERSION}\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
