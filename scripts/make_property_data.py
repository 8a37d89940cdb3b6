"""Build property data sets (deepmd/npy) from molecules: an extensive, an intensive and a per-atom label.

    python scripts/make_property_data.py --source ../shared/data/nopbc --out data/property

The structures are DeePMD's non-periodic C/H/O molecules (``../shared/data/nopbc``: C1H4O2, C3H3O4, C4H3O1
trajectories); the labels are synthetic but smooth functions of the geometry, built from Brown's bond
valences ``s_ij = exp((R0_ij - r_ij) / 0.37 Å) fc(r_ij)`` (``fc`` a cosine cutoff at 4 Å):

- ``valence.npy`` (nframes, 1), extensive: the total bond valence ``sum_i V_i``, ``V_i = sum_j s_ij``;
- ``bvdev.npy`` (nframes, 2), intensive: the mean squared and the mean deviation of ``V_i`` from the
  element's formal valence (C 4, H 1, O 2): the global instability index squared and its bias;
- ``atom_charge.npy`` (nframes, natoms), per atom: bond-charge-increment partial charges
  ``q_i = 0.5 sum_j (chi_j - chi_i) s_ij`` (Pauling electronegativities), neutral by construction, and
  ``charge.npy`` (nframes, 1): the frame's total charge (0).

Frames are split in time (no shuffling: neighbouring MD frames are correlated): the first 80% of each
trajectory train, the rest test; C4H3O1 (15 frames) is test only, a composition the model never saw.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

TYPE_MAP = ["C", "H", "O"]
#: bond-valence R0 (Å) per element pair (C, H, O), as in Brown's tables (rounded)
R0 = np.array([[1.54, 1.09, 1.39], [1.09, 0.74, 0.91], [1.39, 0.91, 1.48]])
B = 0.37  # Å, Brown's softness
RC = 4.0  # Å, cosine cutoff of the bond valences
FORMAL_VALENCE = np.array([4.0, 1.0, 2.0])
PAULING = np.array([2.55, 2.20, 3.44])
KAPPA = 0.5  # e per unit electronegativity difference and unit bond valence
TRAIN_FRACTION = 0.8
TEST_ONLY = ("C4H3O1",)


def bond_valences(coord: np.ndarray, atype: np.ndarray) -> np.ndarray:
    """s_ij (nframes, natoms, natoms), zero on the diagonal and beyond RC."""
    d = np.linalg.norm(coord[:, :, None, :] - coord[:, None, :, :], axis=-1)
    fc = np.where(d < RC, 0.5 * (1.0 + np.cos(np.pi * np.minimum(d, RC) / RC)), 0.0)
    s = np.exp((R0[atype[:, None], atype[None, :]] - d) / B) * fc
    idx = np.arange(len(atype))
    s[:, idx, idx] = 0.0
    return s


def labels(coord: np.ndarray, atype: np.ndarray) -> dict[str, np.ndarray]:
    """The labels of frames ``coord`` (nframes, natoms, 3) Å of one molecule."""
    s = bond_valences(coord, atype)
    v = s.sum(axis=2)  # V_i (nframes, natoms)
    dev = v - FORMAL_VALENCE[atype]
    chi = PAULING[atype]
    q = KAPPA * np.einsum("fij,ij->fi", s, chi[None, :] - chi[:, None])
    nf = len(coord)
    return {
        "valence": v.sum(axis=1, keepdims=True),
        "bvdev": np.stack([(dev**2).mean(axis=1), dev.mean(axis=1)], axis=1),
        "atom_charge": q,
        "charge": np.zeros((nf, 1)),
    }


def write_system(folder: Path, atype: np.ndarray, coord: np.ndarray) -> None:
    (folder / "set.000").mkdir(parents=True, exist_ok=True)
    (folder / "type.raw").write_text("\n".join(str(t) for t in atype) + "\n")
    (folder / "type_map.raw").write_text("\n".join(TYPE_MAP) + "\n")
    (folder / "nopbc").write_text("")
    np.save(folder / "set.000" / "coord.npy", coord.reshape(len(coord), -1))
    for key, value in labels(coord, atype).items():
        np.save(folder / "set.000" / f"{key}.npy", value)


def read_molecule(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(atype in TYPE_MAP order, coord (nframes, natoms, 3)) of a deepmd/npy system."""
    names = (folder / "type_map.raw").read_text().split()
    raw = np.loadtxt(folder / "type.raw", dtype=int).reshape(-1)
    atype = np.array([TYPE_MAP.index(names[t]) for t in raw])
    coord = np.concatenate([np.load(f) for f in sorted(folder.glob("set.*/coord.npy"))])
    return atype, coord.reshape(len(coord), len(atype), 3).astype(np.float64)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="../shared/data/nopbc", help="folder of deepmd/npy molecules")
    parser.add_argument("--out", required=True, help="output folder (train/ and test/ systems); must not exist")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"error: {out}: exists; choose a new output folder")
    source = Path(args.source)
    molecules = sorted(p for p in source.iterdir() if (p / "type.raw").is_file())
    if not molecules:
        raise SystemExit(f"error: {source}: no deepmd/npy system (type.raw) found")
    for mol in molecules:
        atype, coord = read_molecule(mol)
        ntrain = 0 if mol.name in TEST_ONLY else int(TRAIN_FRACTION * len(coord))
        if ntrain:
            write_system(out / "train" / mol.name, atype, coord[:ntrain])
        write_system(out / "test" / mol.name, atype, coord[ntrain:])
        print(f"{mol.name}: {ntrain} training, {len(coord) - ntrain} test frames")
    print(f"written: {out}/train, {out}/test (labels valence, bvdev, charge / atom_charge)")


if __name__ == "__main__":
    main()
