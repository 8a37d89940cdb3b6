"""DeePMD ``deepmd/npy`` system folders and ASE-readable files, read lazily into frames of one system."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# label -> values per frame, as a function of natoms (None: any width, checked across sets)
_PER_ATOM3 = ("force",)
_PER_ATOM1 = ("atom_ener", "atom_pref")
LABELS = ("energy", "force", "virial", "atom_ener", "atom_pref")
INPUTS = ("fparam", "aparam")


class DataError(ValueError):
    """Bad input data; the message names the file and the problem."""


class FrameSource:
    """Frames of one system (fixed atoms and types). ``frame(i)`` returns float64 numpy arrays:
    coord (natoms, 3), box (3, 3) or None, atype (natoms,), and the labels/inputs present."""

    name: str
    natoms: int
    nframes: int
    atype: np.ndarray
    pbc: bool
    available: set[str]

    def has(self, key: str) -> bool:
        return key in self.available

    def frame(self, index: int) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def type_counts(self) -> np.ndarray:
        return np.bincount(self.atype, minlength=self.ntypes)

    def __len__(self) -> int:
        return self.nframes

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, natoms={self.natoms}, nframes={self.nframes})"


def _check_finite(arr: np.ndarray, file: Path, index: int) -> np.ndarray:
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{file}: NaN or inf in frame {index}")
    return arr


def _map_types(path: Path, atype: np.ndarray, sys_map: list[str] | None, type_map: list[str] | None):
    """Map a system's type indices onto the model's type map by element name."""
    if type_map is None:
        return atype, sys_map, (int(atype.max()) + 1 if atype.size else 0)
    if sys_map is None:
        if atype.size and atype.max() >= len(type_map):
            raise DataError(f"{path / 'type.raw'}: type index {int(atype.max())} but the type map {type_map} "
                            f"has {len(type_map)} types (add type_map.raw)")
        return atype, type_map, len(type_map)
    lookup = []
    for name in sys_map:
        if name not in type_map:
            # only an error if the system uses it
            lookup.append(-1)
        else:
            lookup.append(type_map.index(name))
    lookup = np.asarray(lookup, dtype=np.int64)
    if atype.size and atype.max() >= len(sys_map):
        raise DataError(f"{path / 'type.raw'}: type index {int(atype.max())} exceeds type_map.raw ({len(sys_map)} names)")
    mapped = lookup[atype]
    if (mapped < 0).any():
        missing = sorted({sys_map[t] for t in atype[mapped < 0]})
        raise DataError(f"{path / 'type_map.raw'}: element(s) {missing} not in the model's type map {type_map}")
    return mapped, type_map, len(type_map)


class DeepmdSystem(FrameSource):
    """A ``deepmd/npy`` folder: ``type.raw`` (+ ``type_map.raw``, ``nopbc``) and ``set.*/*.npy``.

    Arrays are memory-mapped; opening a folder reads only headers, frames are read on demand.
    """

    def __init__(self, path: str | Path, type_map: list[str] | None = None) -> None:
        self._init_args = (str(path), type_map)
        self.path = Path(path)
        self.name = str(path)
        if not self.path.is_dir():
            raise DataError(f"{self.path}: not a directory")
        type_file = self.path / "type.raw"
        if not type_file.is_file():
            raise DataError(f"{type_file}: missing (every deepmd/npy system needs type.raw)")
        try:
            raw = np.atleast_1d(np.loadtxt(type_file, dtype=np.int64, ndmin=1))
        except ValueError as exc:
            raise DataError(f"{type_file}: not a list of integer types ({exc})") from exc
        map_file = self.path / "type_map.raw"
        sys_map = map_file.read_text().split() if map_file.is_file() else None
        self.atype, self.type_map, self.ntypes = _map_types(self.path, raw, sys_map, type_map)
        self.natoms = int(self.atype.size)
        if self.natoms == 0:
            raise DataError(f"{type_file}: no atoms")
        self.pbc = not (self.path / "nopbc").exists()
        self.sets = sorted(p for p in self.path.glob("set.*") if p.is_dir())
        if not self.sets:
            raise DataError(f"{self.path}: empty system folder (no set.* directories)")
        self._arrays: list[dict[str, np.ndarray]] = []
        self._offsets = [0]
        keys_per_set = []
        for s in self.sets:
            arrays = self._open_set(s)
            self._arrays.append(arrays)
            self._offsets.append(self._offsets[-1] + len(arrays["coord"]))
            keys_per_set.append(set(arrays))
        self.nframes = self._offsets[-1]
        self.available = set.intersection(*keys_per_set) - {"coord", "box"}
        for key in ("fparam", "aparam"):
            widths = {a[key].shape[1] for a in self._arrays if key in a}
            if len(widths) > 1:
                raise DataError(f"{self.path}: {key}.npy has different widths across sets: {sorted(widths)}")
        self.numb_fparam = self._arrays[0]["fparam"].shape[1] if "fparam" in self.available else 0
        self.numb_aparam = self._arrays[0]["aparam"].shape[1] // self.natoms if "aparam" in self.available else 0

    def __getstate__(self) -> dict:
        # reopen instead of pickling memory maps (DataLoader workers started with spawn)
        return {"init_args": self._init_args}

    def __setstate__(self, state: dict) -> None:
        self.__init__(*state["init_args"])

    def _open_set(self, folder: Path) -> dict[str, np.ndarray]:
        coord_file = folder / "coord.npy"
        if not coord_file.is_file():
            raise DataError(f"{coord_file}: missing (coord.npy is required in every set)")
        arrays = {}
        for file in sorted(folder.glob("*.npy")):
            key = file.stem
            if key not in ("coord", "box", *LABELS, *INPUTS):
                continue
            try:
                arr = np.load(file, mmap_mode="r")
            except Exception as exc:
                raise DataError(f"{file}: cannot be read as .npy ({exc})") from exc
            if arr.ndim == 1:
                arr = arr.reshape(-1, 1)
            elif arr.ndim > 2:  # e.g. force saved as (nframes, natoms, 3), as DeePMD accepts
                arr = arr.reshape(len(arr), -1)
            arrays[key] = arr
        nf = len(arrays["coord"])
        if nf == 0:
            raise DataError(f"{coord_file}: no frames")
        expect = {"coord": 3 * self.natoms, "box": 9, "energy": 1, "force": 3 * self.natoms, "virial": 9,
                  "atom_ener": self.natoms, "atom_pref": self.natoms}
        for key, arr in arrays.items():
            file = folder / f"{key}.npy"
            if arr.ndim != 2:
                raise DataError(f"{file}: expected a 2-d array (frames, values), got shape {arr.shape}")
            if len(arr) != nf:
                raise DataError(f"{file}: {len(arr)} frames but coord.npy has {nf}")
            if key in expect and arr.shape[1] != expect[key]:
                raise DataError(f"{file}: expected {expect[key]} values per frame for {self.natoms} atoms, "
                                f"got {arr.shape[1]}")
            if key == "aparam" and arr.shape[1] % self.natoms:
                raise DataError(f"{file}: {arr.shape[1]} values per frame is not a multiple of {self.natoms} atoms")
        if self.pbc:
            if "box" not in arrays:
                raise DataError(f"{folder / 'box.npy'}: missing (required unless the system has a nopbc file)")
            boxes = np.asarray(arrays["box"], dtype=np.float64).reshape(-1, 3, 3)
            det = np.abs(np.linalg.det(boxes))
            bad = np.nonzero(~(det > 1e-8))[0]
            if bad.size:
                raise DataError(f"{folder / 'box.npy'}: cell of frame {int(bad[0])} is not invertible (det {det[bad[0]]:.3g})")
        return arrays

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.nframes:
            raise IndexError(f"{self.path}: frame {index} out of range ({self.nframes} frames)")
        k = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return k, index - self._offsets[k]

    def frame(self, index: int) -> dict:
        k, local = self._locate(index)
        arrays, folder = self._arrays[k], self.sets[k]
        out = {"atype": self.atype}
        def get(key):
            return _check_finite(np.asarray(arrays[key][local], dtype=np.float64), folder / f"{key}.npy", local)
        out["coord"] = get("coord").reshape(self.natoms, 3)
        out["box"] = get("box").reshape(3, 3) if self.pbc else None
        for key in LABELS + INPUTS:
            if key in self.available:
                val = get(key)
                if key == "energy":
                    val = val.reshape(())
                elif key == "force":
                    val = val.reshape(self.natoms, 3)
                elif key == "aparam":
                    val = val.reshape(self.natoms, -1)
                out[key] = val
        return out


class AseSystem(FrameSource):
    """Frames of one composition from an ASE-readable file (extxyz, ...), held in memory."""

    def __init__(self, name: str, frames: list, type_map: list[str] | None) -> None:
        self.name = name
        self.frames = frames
        symbols = frames[0].get_chemical_symbols()
        names = sorted(set(symbols)) if type_map is None else list(type_map)
        missing = sorted(set(symbols) - set(names))
        if missing:
            raise DataError(f"{name}: element(s) {missing} not in the model's type map {names}")
        self.type_map = names
        self.ntypes = len(names)
        self.atype = np.asarray([names.index(s) for s in symbols], dtype=np.int64)
        self.natoms = len(symbols)
        self.nframes = len(frames)
        self.pbc = bool(np.all(frames[0].pbc))
        self.available = set()
        calcs = [a.calc for a in frames]
        if all(c is not None and "energy" in c.results for c in calcs):
            self.available.add("energy")
        if all(c is not None and "forces" in c.results for c in calcs):
            self.available.add("force")
        if self.pbc and all(c is not None and "stress" in c.results for c in calcs):
            self.available.add("virial")
        self.numb_fparam = self.numb_aparam = 0

    def frame(self, index: int) -> dict:
        atoms = self.frames[index]
        out = {"atype": self.atype}
        out["coord"] = _check_finite(np.asarray(atoms.positions, dtype=np.float64), Path(self.name), index)
        out["box"] = np.asarray(atoms.cell.array, dtype=np.float64) if self.pbc else None
        res = atoms.calc.results if atoms.calc is not None else {}
        if "energy" in self.available:
            out["energy"] = np.asarray(res["energy"], dtype=np.float64).reshape(())
        if "force" in self.available:
            out["force"] = np.asarray(res["forces"], dtype=np.float64)
        if "virial" in self.available:
            from ase.stress import voigt_6_to_full_3x3_stress

            stress = np.asarray(res["stress"], dtype=np.float64)
            stress = voigt_6_to_full_3x3_stress(stress) if stress.shape == (6,) else stress.reshape(3, 3)
            out["virial"] = (-stress * atoms.get_volume()).reshape(9)
        for key in ("energy", "force", "virial"):
            if key in out:
                _check_finite(out[key], Path(self.name), index)
        return out


def read_ase_file(path: str | Path, type_map: list[str] | None = None) -> list[AseSystem]:
    """Read every frame of an ASE-readable file, one :class:`AseSystem` per distinct atom sequence."""
    import ase.io

    path = Path(path)
    try:
        frames = ase.io.read(path, index=":")
    except Exception as exc:
        raise DataError(f"{path}: cannot be read by ASE ({exc})") from exc
    if not frames:
        raise DataError(f"{path}: no frames")
    groups: dict[tuple, list] = {}
    for atoms in frames:
        groups.setdefault(tuple(atoms.get_chemical_symbols()), []).append(atoms)
    names = type_map or sorted({s for key in groups for s in key})
    return [AseSystem(f"{path}[{k}]" if len(groups) > 1 else str(path), fr, names) for k, fr in enumerate(groups.values())]


def find_systems(root: str | Path) -> list[Path]:
    """Every deepmd/npy system folder (holding ``type.raw``) at or below ``root``, sorted."""
    root = Path(root)
    if (root / "type.raw").is_file():
        return [root]
    return sorted(p.parent for p in root.rglob("type.raw"))


def load_systems(paths, type_map: list[str] | None = None) -> list[FrameSource]:
    """Open systems from folders (searched recursively for ``type.raw``) and ASE-readable files."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    systems: list[FrameSource] = []
    for p in paths:
        p = Path(p)
        if p.is_file():
            systems.extend(read_ase_file(p, type_map))
        elif p.is_dir():
            found = find_systems(p)
            if not found:
                raise DataError(f"{p}: no deepmd/npy system found (no type.raw at or below it)")
            systems.extend(DeepmdSystem(f, type_map) for f in found)
        else:
            raise DataError(f"{p}: no such file or directory")
    return systems
