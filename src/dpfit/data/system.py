"""DeePMD ``deepmd/npy`` and ``deepmd/hdf5`` systems and ASE-readable files, read lazily frame by frame.

Opening a system reads only headers (``type.raw``, ``type_map.raw``, the ``.npy`` headers or HDF5
dataset shapes) and keeps no file open, so tens of thousands of systems cost no file descriptors.
Frames are read on demand through a small per-process LRU of open files (:data:`OPEN_FILES`; each
DataLoader worker has its own).

Arrays follow DeePMD-kit's reading rules (``deepmd/utils/data.py``): a set's frame count is the first
dimension of ``coord.npy`` (one frame for a 1-d array), and any other array is valid when its total
size is frames x values per frame, whatever its shape (e.g. ``aparam`` as ``(1, nframes * natoms)``,
``fparam`` as ``(nframes,)``). Only the arrays the model and loss need (:class:`Needs`) are read; an
unused file is not opened.
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

LABELS = ("energy", "force", "virial", "atom_ener", "atom_pref")
INPUTS = ("fparam", "aparam")
#: values per frame: (per atom?, values)
_WIDTH = {"coord": (True, 3), "box": (False, 9), "energy": (False, 1), "force": (True, 3), "virial": (False, 9),
          "atom_ener": (True, 1), "atom_pref": (True, 1)}
H5_SUFFIXES = (".h5", ".hdf5", ".hdf")
#: .npy files up to this size are read with one read call per access instead of a kept memory map
SMALL_FILE = 1 << 16


class DataError(ValueError):
    """Bad input data; the message names the file and the problem."""


@dataclass(frozen=True)
class Needs:
    """What the model and loss read from the data.

    ``labels``: label names the loss fits (None: every label present, each validated). ``reported``:
    labels read when present and well formed (e.g. for validation errors), a malformed one only warned
    about. ``numb_fparam`` / ``numb_aparam``: values per frame / per atom the model takes (None: read
    the file if present, width from its size; 0: not read). ``extra``: labels beyond the energy model's
    :data:`LABELS`, as (name, per atom?, values per frame or atom), e.g. a property model's
    ``("bvdev", False, 2)`` and ``("atom_bvdev", True, 2)``; read like the others. ``required``: labels
    of which every training system must have at least one (checked by the data module). Other files
    are not opened.
    """

    labels: frozenset | None = None
    numb_fparam: int | None = None
    numb_aparam: int | None = None
    reported: frozenset = frozenset()
    extra: tuple = ()
    required: frozenset = frozenset()

    def is_label(self, key: str) -> bool:
        return key in LABELS or any(key == name for name, _, _ in self.extra)

    def width(self, key: str) -> tuple[bool, int] | None:
        """(per atom?, values) of an array read by frames (coord, box, labels), None for fparam/aparam."""
        for name, atomic, width in self.extra:
            if key == name:
                return bool(atomic), int(width)
        return _WIDTH.get(key)

    def wants(self, key: str) -> bool:
        if self.is_label(key):
            return self.labels is None or key in self.labels or key in self.reported
        n = self.numb_fparam if key == "fparam" else self.numb_aparam
        return n is None or n > 0

    def strict(self, key: str) -> bool:
        """A malformed file of ``key`` is an error (else a warning, and the file is ignored)."""
        if self.is_label(key):
            return self.labels is None or key in self.labels
        return key in ("coord", "box") or (self.numb_fparam if key == "fparam" else self.numb_aparam) is not None


ALL = Needs()


# ----------------------------------------------------------------------------------------------------------------
# open files: a bounded LRU per process
# ----------------------------------------------------------------------------------------------------------------


class OpenFiles:
    """At most ``limit`` open memory maps / HDF5 files of this process, least recently used closed first.

    A forked process (DataLoader worker) starts with an empty cache: it never uses its parent's handles.
    """

    def __init__(self, limit: int = 64) -> None:
        self.limit = int(limit)
        self._items: OrderedDict[str, object] = OrderedDict()
        self._pid = os.getpid()

    def get(self, key: str, opener):
        if os.getpid() != self._pid:
            self._items = OrderedDict()
            self._pid = os.getpid()
        item = self._items.get(key)
        if item is None:
            item = opener()
            self._items[key] = item
            while len(self._items) > max(self.limit, 1):
                _, old = self._items.popitem(last=False)
                close = getattr(old, "close", None)
                if close is not None and not isinstance(old, np.ndarray):
                    close()  # h5py files; memory maps close when their last reference goes
        else:
            self._items.move_to_end(key)
        return item

    def clear(self) -> None:
        while self._items:
            _, old = self._items.popitem()
            if not isinstance(old, np.ndarray) and hasattr(old, "close"):
                old.close()

    def __len__(self) -> int:
        return len(self._items)


OPEN_FILES = OpenFiles(int(os.environ.get("DPFIT_MAX_OPEN_FILES", "64")))


def set_max_open_files(limit: int) -> None:
    """Bound the files this process keeps open for reading frames (``data.max_open_files``)."""
    if int(limit) < 1:
        raise ValueError(f"data.max_open_files must be >= 1, got {limit}")
    OPEN_FILES.limit = int(limit)


# ----------------------------------------------------------------------------------------------------------------
# arrays: a header now, rows on demand
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ArrayRef:
    """One array of a set, known by its header: ``rows(nframes, a, b)`` reads frames a..b-1 as float64
    (b - a, values per frame), reshaped by total size as DeePMD-kit does."""

    file: str  # the name shown in messages
    shape: tuple
    dtype: np.dtype
    offset: int = 0  # .npy: start of the data
    fortran: bool = False
    h5: tuple[str, str] | None = None  # (file, dataset) for HDF5

    def __post_init__(self) -> None:
        self.size = int(np.prod(self.shape, dtype=np.int64))

    def rows(self, nframes: int, start: int, stop: int) -> np.ndarray:
        ndof = self.size // nframes
        if self.h5 is not None:
            import h5py

            h5file, name = self.h5
            ds = OPEN_FILES.get(h5file, lambda: h5py.File(h5file, "r"))[name]
            if len(self.shape) >= 2 and self.shape[0] == nframes:
                data = ds[start:stop]
            else:
                data = np.asarray(ds[()]).reshape(-1)[start * ndof: stop * ndof]
            return np.array(data, dtype=np.float64).reshape(stop - start, ndof)
        if self.fortran:  # rare: read whole, in logical (C) order
            data = np.load(self.file).reshape(nframes, ndof)[start:stop]
            return np.array(data, dtype=np.float64)
        count = (stop - start) * ndof
        if self.size * self.dtype.itemsize <= SMALL_FILE:  # read and closed at once: no map, no open file
            data = np.fromfile(self.file, dtype=self.dtype, count=count, offset=self.offset + start * ndof * self.dtype.itemsize)
            return np.array(data, dtype=np.float64).reshape(stop - start, ndof)
        flat = OPEN_FILES.get(self.file, lambda: np.memmap(self.file, dtype=self.dtype, mode="r",
                                                           offset=self.offset, shape=(self.size,)))
        return np.array(flat[start * ndof: stop * ndof], dtype=np.float64).reshape(stop - start, ndof)


_HEADER = re.compile(rb"\x93NUMPY\x01\x00..\{'descr': '(?P<descr>[<>|=]?[a-z]\d+)', 'fortran_order': "
                     rb"(?P<fortran>True|False), 'shape': \((?P<shape>[\d, ]*)\), \}", re.DOTALL)


def _npy_header(file: Path) -> ArrayRef:
    """Shape and dtype of a ``.npy`` file from its header (the data is not read)."""
    try:
        with open(file, "rb") as f:
            head = f.read(128)
            end = os.fstat(f.fileno()).st_size
            fast = _HEADER.match(head)
            if fast is not None:  # the common header numpy writes, parsed without ast (~10x faster)
                dtype = np.dtype(fast["descr"].decode())
                fortran = fast["fortran"] == b"True"
                shape = tuple(int(n) for n in fast["shape"].split(b",") if n.strip())
                offset = 10 + int.from_bytes(head[8:10], "little")
            else:
                f.seek(0)
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                offset = f.tell()
    except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input
        raise DataError(f"{file}: cannot be read as .npy ({exc})") from exc
    if dtype.hasobject or dtype.kind not in "biuf":
        raise DataError(f"{file}: holds {dtype} values, not numbers")
    ref = ArrayRef(str(file), tuple(int(n) for n in shape), dtype, offset, bool(fortran))
    if end - offset < ref.size * dtype.itemsize:
        raise DataError(f"{file}: truncated ({end - offset} bytes of data for shape {ref.shape} {dtype})")
    return ref


# ----------------------------------------------------------------------------------------------------------------
# systems
# ----------------------------------------------------------------------------------------------------------------


class FrameSource:
    """Frames of one system (fixed atoms and types). ``frame(i)`` returns float64 numpy arrays:
    coord (natoms, 3), box (3, 3) or None, atype (natoms,), and the labels/inputs present."""

    name: str
    natoms: int
    nframes: int
    atype: np.ndarray
    pbc: bool
    available: set[str]
    numb_fparam: int = 0
    numb_aparam: int = 0
    #: labels beyond LABELS this system was asked for (Needs.extra): name -> (per atom?, values)
    extra_labels: dict = {}

    def has(self, key: str) -> bool:
        return key in self.available

    def frame(self, index: int) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def where(self, index: int, key: str = "coord") -> tuple[str, int]:
        """(file, frame in that file) of frame ``index``: for messages."""
        return self.name, index

    #: the smallest distance between two atoms (Å) over every frame, set by :meth:`check` (inf: none found)
    nearest_distance: float | None = None

    def check(self, min_distance: float = 0.0) -> None:
        """Read every frame once: NaN/inf, singular cells, atoms closer than ``min_distance`` Å (and the
        smallest distance between two atoms, :attr:`nearest_distance`)."""
        nearest = float("inf")
        for index in range(self.nframes):
            frame = self.frame(index)
            nearest = min(nearest, check_min_distance(self, index, frame["coord"], frame["box"], min_distance))
        self.nearest_distance = nearest

    @property
    def type_counts(self) -> np.ndarray:
        return np.bincount(self.atype, minlength=self.ntypes)

    def __len__(self) -> int:
        return self.nframes

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, natoms={self.natoms}, nframes={self.nframes})"


def _check_finite(arr: np.ndarray, file, index: int) -> np.ndarray:
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{file}: NaN or inf in frame {index}")
    return arr


def _check_cells(boxes: np.ndarray, file, first: int = 0) -> None:
    det = np.abs(np.linalg.det(boxes.reshape(-1, 3, 3)))
    bad = np.nonzero(~(det > 1e-8))[0]
    if bad.size:
        raise DataError(f"{file}: cell of frame {first + int(bad[0])} is not invertible (det {det[bad[0]]:.3g})")


def check_min_distance(system: FrameSource, index: int, coord: np.ndarray, box: np.ndarray | None,
                       min_distance: float) -> float:
    """:class:`DataError` naming file and frame when two atoms (or an atom and an image) are closer than
    ``min_distance`` Å (a cell-list search with a small cutoff: microseconds per frame). Returns the
    frame's smallest distance between two atoms found by that search (inf: none within it)."""
    if len(coord) < 2 and box is None:
        return float("inf")
    from dpfit.data.neighbor import nearest_pair

    pair = nearest_pair(coord, box, max(float(min_distance), 0.0))
    if pair is None:
        return float("inf")
    if min_distance > 0 and pair[2] < min_distance:
        i, j, d = pair
        file, local = system.where(index, "coord")
        raise DataError(f"{file}: atoms {i} and {j} of frame {local} are {d:.3g} Å apart, closer than "
                        f"data.min_distance={min_distance:g} Å (duplicated atoms or wrong units?)")
    return pair[2]


def _map_types(path, atype: np.ndarray, sys_map: list[str] | None, type_map: list[str] | None):
    """Map a system's type indices onto the model's type map by element name."""
    if type_map is None:
        return atype, sys_map, (int(atype.max()) + 1 if atype.size else 0)
    if sys_map is None:
        if atype.size and atype.max() >= len(type_map):
            raise DataError(f"{path}/type.raw: type index {int(atype.max())} but the type map {type_map} "
                            f"has {len(type_map)} types (add type_map.raw)")
        return atype, type_map, len(type_map)
    lookup = np.asarray([type_map.index(n) if n in type_map else -1 for n in sys_map], dtype=np.int64)
    if atype.size and atype.max() >= len(sys_map):
        raise DataError(f"{path}/type.raw: type index {int(atype.max())} exceeds type_map.raw ({len(sys_map)} names)")
    if atype.size and atype.min() < 0:
        raise DataError(f"{path}/type.raw: negative type index {int(atype.min())}")
    mapped = lookup[atype]
    if (mapped < 0).any():
        missing = sorted({sys_map[t] for t in atype[mapped < 0]})
        raise DataError(f"{path}/type_map.raw: element(s) {missing} not in the model's type map {type_map}")
    return mapped, type_map, len(type_map)


@dataclass
class _Set:
    folder: str
    nframes: int
    arrays: dict[str, ArrayRef] = field(default_factory=dict)

    def file(self, key: str) -> str:
        return f"{self.folder}/{key}.npy"


class SetSystem(FrameSource):
    """A DeePMD system of ``set.*`` groups of arrays (npy folder or HDF5 group), opened from headers."""

    def _init_types(self, raw: np.ndarray, sys_map: list[str] | None, type_map: list[str] | None) -> None:
        self.atype, self.type_map, self.ntypes = _map_types(self.name, raw, sys_map, type_map)
        self.natoms = int(self.atype.size)
        if self.natoms == 0:
            raise DataError(f"{self.name}/type.raw: no atoms")

    def _init_sets(self, headers: list[tuple[str, dict[str, ArrayRef]]], needs: Needs) -> None:
        self.extra_labels = {name: (bool(atomic), int(width)) for name, atomic, width in needs.extra}
        if not headers:
            raise DataError(f"{self.name}: empty system folder (no set.* directories)")
        self.sets = [self._make_set(folder, refs, needs) for folder, refs in headers]
        self._offsets = np.cumsum([0] + [s.nframes for s in self.sets])
        self.nframes = int(self._offsets[-1])
        self.available = set.intersection(*(set(s.arrays) for s in self.sets)) - {"coord", "box"}
        for key in INPUTS:
            widths = {s.arrays[key].size // s.nframes // (self.natoms if key == "aparam" else 1)
                      for s in self.sets if key in s.arrays}
            if len(widths) > 1:
                raise DataError(f"{self.name}: {key}.npy has different widths across sets: {sorted(widths)}")
        self.numb_fparam = self._width("fparam")
        self.numb_aparam = self._width("aparam")

    def _width(self, key: str) -> int:
        if key not in self.available:
            return 0
        s = self.sets[0]
        return s.arrays[key].size // s.nframes // (self.natoms if key == "aparam" else 1)

    def _make_set(self, folder: str, refs: dict[str, ArrayRef], needs: Needs) -> _Set:
        natoms = self.natoms
        if "coord" not in refs:
            raise DataError(f"{folder}/coord.npy: missing (coord.npy is required in every set)")
        coord = refs["coord"]
        nf = coord.shape[0] if len(coord.shape) > 1 else 1
        if coord.size == 0 or nf == 0:
            raise DataError(f"{folder}/coord.npy: no frames")
        if len(coord.shape) == 2 and coord.shape[0] == 3 * natoms and coord.shape[1] != 3 * natoms:
            raise DataError(f"{folder}/coord.npy: shape {coord.shape} looks transposed: expected (nframes, "
                            f"{3 * natoms}) for {natoms} atoms (one frame per row)")
        st = _Set(folder, nf)
        for key, ref in refs.items():
            file = st.file(key)
            if key == "box" and not self.pbc:
                continue
            if key not in ("coord", "box") and not needs.wants(key):
                continue  # not used by the model or loss: not validated
            shape = ref.shape
            transposed = (len(shape) == 3 and shape[1:] == (3, natoms) and natoms != 3) or (
                key == "force" and len(shape) == 2 and shape == (3 * natoms, nf) and nf != 3 * natoms)
            if key in ("coord", "force") and transposed:
                raise DataError(f"{file}: shape {shape} looks transposed: expected (nframes, {natoms}, 3) or "
                                f"(nframes, {3 * natoms}) for {natoms} atoms")
            shape_of = needs.width(key)
            if shape_of is not None:
                atomic, width = shape_of
                ndof = width * (natoms if atomic else 1)
                if ref.size != nf * ndof and not needs.strict(key):
                    log.warning("%s: shape %s is not %d frames x %d values; ignored (the loss does not fit %s)",
                                file, shape, nf, ndof, key)
                    continue
                if ref.size != nf * ndof:
                    raise DataError(f"{file}: expected {ndof} values per frame for {natoms} atoms and the "
                                    f"{nf} frames of coord.npy ({nf * ndof} values), got shape {shape}")
            else:  # fparam / aparam
                per = natoms if key == "aparam" else 1
                n = needs.numb_fparam if key == "fparam" else needs.numb_aparam
                unit = "per atom" if key == "aparam" else "per frame"
                if n is None:
                    if ref.size == 0 or ref.size % (nf * per):
                        log.warning("%s: shape %s is not %d frames x values %s; ignored", file, shape, nf, unit)
                        continue
                elif ref.size != nf * per * n:
                    raise DataError(f"{file}: expected {n} values {unit} (the model's numb_{key}) for the {nf} "
                                    f"frames of coord.npy ({nf * per * n} values), got shape {shape}")
            st.arrays[key] = ref
        if self.pbc and "box" not in st.arrays:
            raise DataError(f"{folder}/box.npy: missing (required unless the system has a nopbc file)")
        return st

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.nframes:
            raise IndexError(f"{self.name}: frame {index} out of range ({self.nframes} frames)")
        k = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return k, index - int(self._offsets[k])

    def where(self, index: int, key: str = "coord") -> tuple[str, int]:
        k, local = self._locate(index)
        return self.sets[k].file(key), local

    def frame(self, index: int) -> dict:
        k, local = self._locate(index)
        st = self.sets[k]
        out = {"atype": self.atype}

        def get(key):
            return _check_finite(st.arrays[key].rows(st.nframes, local, local + 1)[0], st.file(key), local)

        out["coord"] = get("coord").reshape(self.natoms, 3)
        if self.pbc:
            out["box"] = get("box").reshape(3, 3)
            _check_cells(out["box"], st.file("box"), local)
        else:
            out["box"] = None
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
        for key, (atomic, width) in self.extra_labels.items():
            if key in self.available:
                out[key] = get(key).reshape((self.natoms, width) if atomic else (width,))
        if self.extra_labels:
            out["extra_labels"] = tuple(self.extra_labels)  # (their find_* flags in collate)
        return out

    def check(self, min_distance: float = 0.0, chunk_bytes: int = 1 << 24) -> None:
        """Every frame of every array read (in chunks, vectorised): NaN/inf, singular cells, and atoms
        closer than ``min_distance``; the first problem is a :class:`DataError` naming file and frame."""
        nearest = float("inf")
        for k, st in enumerate(self.sets):
            rows_per_chunk = max(1, chunk_bytes // (8 * max(3 * self.natoms, 9)))
            for a in range(0, st.nframes, rows_per_chunk):
                b = min(a + rows_per_chunk, st.nframes)
                read = {}
                for key in st.arrays:
                    if key != "box" or self.pbc:
                        data = st.arrays[key].rows(st.nframes, a, b)
                        bad = ~np.isfinite(data).all(axis=1)
                        if bad.any():
                            raise DataError(f"{st.file(key)}: NaN or inf in frame {a + int(np.argmax(bad))}")
                        if key in ("coord", "box"):
                            read[key] = data
                if self.pbc:
                    _check_cells(read["box"], st.file("box"), a)
                for r in range(b - a):
                    box = read["box"][r].reshape(3, 3) if self.pbc else None
                    nearest = min(nearest, check_min_distance(self, int(self._offsets[k]) + a + r,
                                                              read["coord"][r].reshape(self.natoms, 3), box,
                                                              min_distance))
        self.nearest_distance = nearest


def _read_type_raw(file: Path) -> np.ndarray:
    try:
        text = file.read_text()
    except OSError as exc:
        raise DataError(f"{file}: cannot be read ({exc})") from exc
    try:
        return np.asarray([int(t) for t in text.split()], dtype=np.int64)
    except ValueError as exc:
        raise DataError(f"{file}: not a list of integer types ({exc})") from exc


class DeepmdSystem(SetSystem):
    """A ``deepmd/npy`` folder: ``type.raw`` (+ ``type_map.raw``, ``nopbc``) and ``set.*/*.npy``.

    Opening reads ``type.raw``, ``type_map.raw`` and the ``.npy`` headers only; no file stays open.
    """

    def __init__(self, path: str | Path, type_map: list[str] | None = None, needs: Needs = ALL) -> None:
        self.path = Path(path)
        self.name = str(path)
        if not self.path.is_dir():
            raise DataError(f"{self.path}: not a directory")
        type_file = self.path / "type.raw"
        if not type_file.is_file():
            raise DataError(f"{type_file}: missing (every deepmd/npy system needs type.raw)")
        map_file = self.path / "type_map.raw"
        sys_map = map_file.read_text().split() if map_file.is_file() else None
        self._init_types(_read_type_raw(type_file), sys_map, type_map)
        self.pbc = not (self.path / "nopbc").exists()
        with os.scandir(self.path) as it:
            set_dirs = sorted(e.name for e in it if e.name.startswith("set.") and e.is_dir())
        headers = []
        wanted = {"coord", "box", *LABELS, *INPUTS, *(name for name, _, _ in needs.extra)}
        for name in set_dirs:
            folder = self.path / name
            with os.scandir(folder) as it:
                files = sorted(e.name for e in it if e.name.endswith(".npy"))
            refs = {}
            for fname in files:
                key = fname[:-4]
                if key in wanted and (key in ("coord", "box") or needs.wants(key)) and (key != "box" or self.pbc):
                    refs[key] = _npy_header(folder / fname)
            headers.append((str(folder), refs))
        self._init_sets(headers, needs)


class H5System(SetSystem):
    """A ``deepmd/hdf5`` system: a group of an HDF5 file laid out like a deepmd/npy folder (datasets
    ``type.raw``, ``type_map.raw``, ``nopbc``, ``set.*/coord.npy``, ...), as DeePMD-kit and dpdata write.
    Opening reads dataset shapes only; frames are read when drawn, through :data:`OPEN_FILES`."""

    def __init__(self, file: str | Path, group: str = "/", type_map: list[str] | None = None,
                 needs: Needs = ALL) -> None:
        import h5py

        self.file = str(file)
        self.group = "/" + group.strip("/")
        self.name = f"{self.file}#{self.group}" if self.group != "/" else self.file
        h5 = OPEN_FILES.get(self.file, lambda: _open_h5(self.file))
        if self.group not in h5 or not isinstance(h5[self.group], h5py.Group):
            raise DataError(f"{self.name}: no such group in {self.file}")
        g = h5[self.group]
        if "type.raw" not in g:
            raise DataError(f"{self.name}/type.raw: missing (every deepmd/hdf5 system needs type.raw)")
        try:
            raw = _h5_ints(g["type.raw"][()])
        except ValueError as exc:
            raise DataError(f"{self.name}/type.raw: not a list of integer types ({exc})") from exc
        sys_map = _h5_strings(g["type_map.raw"][()]) if "type_map.raw" in g else None
        self._init_types(raw, sys_map, type_map)
        self.pbc = "nopbc" not in g
        headers = []
        wanted = {"coord", "box", *LABELS, *INPUTS, *(name for name, _, _ in needs.extra)}
        for name in sorted(k for k in g if k.startswith("set.") and isinstance(g[k], h5py.Group)):
            sg = g[name]
            folder = f"{self.name}/{name}"
            refs = {}
            for dname in sorted(sg):
                key = dname[:-4] if dname.endswith(".npy") else None
                if key in wanted and (key in ("coord", "box") or needs.wants(key)) and (key != "box" or self.pbc):
                    ds = sg[dname]
                    if ds.dtype.kind not in "biuf":
                        raise DataError(f"{folder}/{dname}: holds {ds.dtype} values, not numbers")
                    refs[key] = ArrayRef(f"{folder}/{dname}", tuple(int(n) for n in ds.shape), ds.dtype,
                                         h5=(self.file, f"{self.group.rstrip('/')}/{name}/{dname}"))
            headers.append((folder, refs))
        self._init_sets(headers, needs)


def _open_h5(file: str):
    import h5py

    try:
        return h5py.File(file, "r")
    except OSError as exc:
        raise DataError(f"{file}: cannot be read as HDF5 ({exc})") from exc


def _h5_ints(value) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind in "SUO":  # text, as in a type.raw file
        text = " ".join(v.decode() if isinstance(v, bytes) else str(v) for v in arr.reshape(-1))
        return np.asarray([int(t) for t in text.split()], dtype=np.int64)
    return arr.astype(np.int64).reshape(-1)


def _h5_strings(value) -> list[str]:
    arr = np.asarray(value).reshape(-1)
    names = []
    for v in arr:
        names.extend((v.decode() if isinstance(v, bytes) else str(v)).split())
    return names


def find_h5_systems(file: str | Path, group: str = "/") -> list[str]:
    """Groups (at or below ``group``) of an HDF5 file that hold a ``type.raw``: each a system."""
    import h5py

    h5 = OPEN_FILES.get(str(file), lambda: _open_h5(str(file)))
    root = "/" + group.strip("/")
    if root not in h5:
        raise DataError(f"{file}#{root}: no such group in {file}")
    if "type.raw" in h5[root]:
        return [root]
    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Group) and "type.raw" in obj:
            found.append(obj.name)

    h5[root].visititems(visit)
    return sorted(found)


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
        if out["box"] is not None:
            _check_finite(out["box"], Path(self.name), index)
            _check_cells(out["box"], Path(self.name), index)
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
    """Every deepmd/npy system folder (holding ``type.raw``) at or below ``root``, sorted; symbolic links
    to folders are followed (each real folder once), ``set.*`` folders are not searched."""
    root = Path(root)
    if (root / "type.raw").is_file():
        return [root]
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        if "type.raw" in filenames:
            found.append(Path(dirpath))
        dirnames[:] = [d for d in dirnames if not d.startswith("set.")]
    return sorted(found)


def _split_h5(p: str) -> tuple[str, str] | None:
    """``data.h5`` or ``data.h5#/group``: (file, group), else None."""
    file, _, group = p.partition("#")
    if Path(file).suffix.lower() in H5_SUFFIXES or group:
        return file, group or "/"
    return None


def load_systems(paths, type_map: list[str] | None = None, needs: Needs = ALL) -> list[FrameSource]:
    """Open systems from deepmd/npy folders (searched recursively for ``type.raw``), deepmd/hdf5 files
    (``data.h5``: every system inside; ``data.h5#/group``: the systems at or below that group) and
    ASE-readable files. Only headers are read; ``needs`` says which arrays the model and loss use."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    systems: list[FrameSource] = []
    for p in paths:
        h5 = _split_h5(str(p))
        if h5 is not None:
            file, group = h5
            if not Path(file).is_file():
                raise DataError(f"{file}: no such file")
            groups = find_h5_systems(file, group)
            if not groups:
                raise DataError(f"{p}: no deepmd/hdf5 system found (no type.raw in any group)")
            systems.extend(H5System(file, g, type_map, needs) for g in groups)
            continue
        p = Path(p)
        if p.is_file():
            systems.extend(read_ase_file(p, type_map))
        elif p.is_dir():
            found = find_systems(p)
            if not found:
                raise DataError(f"{p}: no deepmd/npy system found (no type.raw at or below it)")
            systems.extend(DeepmdSystem(f, type_map, needs) for f in found)
        else:
            raise DataError(f"{p}: no such file or directory")
    return systems
