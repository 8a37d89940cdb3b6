"""deepmd/npy and ASE inputs: every bad input is a DataError naming the offending file; good inputs read right."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import dpfit.data.system as system_module
from dpfit.data.batch import collate, make_sample, model_inputs
from dpfit.data.system import DataError, DeepmdSystem, load_systems, read_ase_file

TYPE_MAP = ["O", "H"]
NATOMS = 3
BOX = np.array([[6.0, 0.0, 0.0], [0.5, 6.5, 0.0], [0.3, -0.4, 7.0]])
RCUT, SEL = 3.0, [4, 8]


def valid_set(nframes: int = 2, natoms: int = NATOMS, seed: int = 0, labels=("energy", "force")) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "coord": (rng.uniform(0, 1, size=(nframes, natoms, 3)) @ BOX).reshape(nframes, -1),
        "box": np.tile(BOX.reshape(1, 9), (nframes, 1)),
    }
    if "energy" in labels:
        arrays["energy"] = rng.normal(size=nframes) - 10.0
    if "force" in labels:
        arrays["force"] = rng.normal(size=(nframes, natoms * 3))
    if "virial" in labels:
        arrays["virial"] = rng.normal(size=(nframes, 9))
    return arrays


def write_system(
    path: Path,
    sets: list[dict] | None = None,
    atype=(0, 1, 1),
    type_map: list[str] | None = None,
    nopbc: bool = False,
    write_type_raw: bool = True,
) -> Path:
    """A deepmd/npy folder: type.raw (+ type_map.raw, nopbc) and set.000, set.001, ... from ``sets``."""
    path.mkdir(parents=True, exist_ok=True)
    if write_type_raw:
        (path / "type.raw").write_text("\n".join(str(t) for t in atype) + "\n")
    if type_map is not None:
        (path / "type_map.raw").write_text("\n".join(type_map) + "\n")
    if nopbc:
        (path / "nopbc").write_text("")
    for k, arrays in enumerate([valid_set()] if sets is None else sets):
        folder = path / f"set.{k:03d}"
        folder.mkdir()
        for key, arr in arrays.items():
            np.save(folder / f"{key}.npy", arr)
    return path


def assert_names(exc: pytest.ExceptionInfo, file: Path) -> None:
    message = str(exc.value)
    assert str(file) in message, message
    assert "\n" not in message.strip(), message


# ----------------------------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------------------------


def test_missing_type_raw(tmp_path):
    path = write_system(tmp_path / "sys", write_type_raw=False)
    with pytest.raises(DataError) as exc:
        DeepmdSystem(path, TYPE_MAP)
    assert_names(exc, path / "type.raw")
    # load_systems searches for type.raw: a folder without one is not a system
    with pytest.raises(DataError) as exc:
        load_systems([path], TYPE_MAP)
    assert_names(exc, path)


def test_missing_coord_and_box(tmp_path):
    arrays = valid_set()
    del arrays["coord"]
    path = write_system(tmp_path / "a", [arrays])
    with pytest.raises(DataError) as exc:
        DeepmdSystem(path, TYPE_MAP)
    assert_names(exc, path / "set.000" / "coord.npy")

    arrays = valid_set()
    del arrays["box"]
    path = write_system(tmp_path / "b", [arrays])
    with pytest.raises(DataError) as exc:
        DeepmdSystem(path, TYPE_MAP)
    assert_names(exc, path / "set.000" / "box.npy")
    # with a nopbc file the box is optional
    path = write_system(tmp_path / "c", [arrays], nopbc=True)
    system = DeepmdSystem(path, TYPE_MAP)
    assert not system.pbc and system.frame(1)["box"] is None


@pytest.mark.parametrize("key", ["box", "energy", "force", "virial"])
def test_frame_counts_disagree(tmp_path, key):
    arrays = valid_set(nframes=3, labels=("energy", "force", "virial"))
    arrays[key] = arrays[key][:2]
    path = write_system(tmp_path / "sys", [valid_set(2, seed=1, labels=("energy", "force", "virial")), arrays])
    with pytest.raises(DataError) as exc:
        DeepmdSystem(path, TYPE_MAP)
    assert_names(exc, path / "set.001" / f"{key}.npy")


def test_coord_has_fewer_frames_than_labels(tmp_path):
    arrays = valid_set(nframes=3)
    arrays["coord"] = arrays["coord"][:2]
    path = write_system(tmp_path / "sys", [arrays])
    with pytest.raises(DataError) as exc:
        DeepmdSystem(path, TYPE_MAP)
    assert str(path / "set.000") in str(exc.value)


@pytest.mark.parametrize(
    "key,width",
    [("force", NATOMS * 3 - 1), ("force", NATOMS * 3 + 3), ("coord", NATOMS * 3 + 3), ("box", 6), ("virial", 6)],
)
def test_wrong_shape(tmp_path, key, width):
    arrays = valid_set(labels=("energy", "force", "virial"))
    arrays[key] = np.ones((2, width))
    path = write_system(tmp_path / "sys", [arrays])
    with pytest.raises(DataError) as exc:
        DeepmdSystem(path, TYPE_MAP)
    assert_names(exc, path / "set.000" / f"{key}.npy")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", ["coord", "energy", "force", "virial"])
def test_non_finite_values_raise_when_the_frame_is_read(tmp_path, key, bad):
    first = valid_set(2, seed=1, labels=("energy", "force", "virial"))
    second = valid_set(3, seed=2, labels=("energy", "force", "virial"))
    second[key] = second[key].astype(np.float64)
    second[key].reshape(3, -1)[1, 0] = bad
    path = write_system(tmp_path / "sys", [first, second])
    system = DeepmdSystem(path, TYPE_MAP)  # opening does not read frames
    for index in (0, 1, 2, 4):
        system.frame(index)
    with pytest.raises(DataError) as exc:
        system.frame(3)  # frame 1 of set.001
    assert_names(exc, path / "set.001" / f"{key}.npy")
    with pytest.raises(DataError):
        make_sample(system, 3, RCUT, SEL)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_box(tmp_path, bad):
    arrays = valid_set(3)
    arrays["box"][2, 4] = bad
    path = write_system(tmp_path / "sys", [arrays])
    with pytest.raises(DataError) as exc:  # at open (cell check) or at the latest when the frame is read
        DeepmdSystem(path, TYPE_MAP).frame(2)
    assert_names(exc, path / "set.000" / "box.npy")


@pytest.mark.parametrize(
    "cell",
    [np.zeros((3, 3)), np.array([[4.0, 0, 0], [0, 5.0, 0], [2.0, 2.5, 0.0]]), np.array([[4.0, 0, 0], [8.0, 0, 0], [0, 0, 3.0]])],
    ids=["zero", "coplanar", "parallel"],
)
def test_non_invertible_cell(tmp_path, cell):
    arrays = valid_set(3)
    arrays["box"][1] = cell.reshape(9)
    path = write_system(tmp_path / "sys", [arrays])
    system = DeepmdSystem(path, TYPE_MAP)  # headers only
    with pytest.raises(DataError) as exc:  # the check of every frame before training
        system.check()
    assert_names(exc, path / "set.000" / "box.npy")
    assert "frame 1" in str(exc.value)
    with pytest.raises(DataError) as exc:  # and when the frame is read
        system.frame(1)
    assert_names(exc, path / "set.000" / "box.npy")


def test_element_not_in_model_type_map(tmp_path):
    path = write_system(tmp_path / "sys", atype=(0, 2, 1), type_map=["O", "H", "C"])
    with pytest.raises(DataError) as exc:
        DeepmdSystem(path, TYPE_MAP)
    assert_names(exc, path / "type_map.raw")
    assert "C" in str(exc.value)
    # an element listed but not used by any atom is fine
    path = write_system(tmp_path / "ok", atype=(0, 1, 1), type_map=["O", "H", "C"])
    np.testing.assert_array_equal(DeepmdSystem(path, TYPE_MAP).atype, [0, 1, 1])


def test_type_index_beyond_model_types_without_type_map_raw(tmp_path):
    path = write_system(tmp_path / "sys", atype=(0, 1, 2))
    with pytest.raises(DataError) as exc:
        DeepmdSystem(path, TYPE_MAP)
    assert_names(exc, path / "type.raw")


def test_bad_type_raw(tmp_path):
    path = write_system(tmp_path / "sys")
    (path / "type.raw").write_text("0 1 x\n")
    with pytest.raises(DataError) as exc:
        DeepmdSystem(path, TYPE_MAP)
    assert_names(exc, path / "type.raw")


def test_empty_system_folder(tmp_path):
    path = tmp_path / "sys"
    path.mkdir()
    (path / "type.raw").write_text("0 1 1\n")
    with pytest.raises(DataError) as exc:
        DeepmdSystem(path, TYPE_MAP)
    assert_names(exc, path)
    with pytest.raises(DataError) as exc:
        load_systems(tmp_path, TYPE_MAP)
    assert_names(exc, path)


def test_missing_path(tmp_path):
    with pytest.raises(DataError) as exc:
        load_systems([tmp_path / "nowhere"], TYPE_MAP)
    assert_names(exc, tmp_path / "nowhere")


def test_corrupt_npy(tmp_path):
    path = write_system(tmp_path / "sys")
    (path / "set.000" / "energy.npy").write_bytes(b"not a numpy file")
    with pytest.raises(DataError) as exc:
        DeepmdSystem(path, TYPE_MAP)
    assert_names(exc, path / "set.000" / "energy.npy")


# ----------------------------------------------------------------------------------------------------------------
# good inputs
# ----------------------------------------------------------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_open_reads_headers_only_and_holds_no_file(tmp_path, monkeypatch):
    path = write_system(tmp_path / "sys", [valid_set(4, labels=("energy", "force", "virial"))])
    loads = []
    real_load = np.load

    def spy(*args, **kwargs):
        loads.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(system_module.np, "load", spy)
    system_module.OPEN_FILES.clear()
    before = _open_fds()
    system = DeepmdSystem(path, TYPE_MAP)
    assert loads == [] and _open_fds() == before  # no array read, no file left open
    assert {k for k in system.sets[0].arrays} == {"coord", "box", "energy", "force", "virial"}
    # small files are read and closed at once
    for i in range(4):
        system.frame(i)
    assert len(system_module.OPEN_FILES) == 0 and _open_fds() == before
    # larger ones are memory-mapped through the bounded LRU of open maps
    monkeypatch.setattr(system_module, "SMALL_FILE", 0)
    limit = system_module.OPEN_FILES.limit
    try:
        system_module.set_max_open_files(2)
        for i in range(4):
            system.frame(i)
        assert len(system_module.OPEN_FILES) == 2
        assert _open_fds() <= before + 2
    finally:
        system_module.set_max_open_files(limit)
        system_module.OPEN_FILES.clear()
    assert _open_fds() == before


def test_frames_are_float64_from_float32_files(tmp_path):
    arrays = {k: v.astype(np.float32) for k, v in valid_set(2).items()}
    path = write_system(tmp_path / "sys", [arrays])
    frame = DeepmdSystem(path, TYPE_MAP).frame(1)
    assert frame["coord"].dtype == np.float64 and frame["coord"].shape == (NATOMS, 3)
    assert frame["box"].shape == (3, 3) and frame["force"].shape == (NATOMS, 3) and frame["energy"].shape == ()
    np.testing.assert_array_equal(frame["coord"], arrays["coord"][1].astype(np.float64).reshape(NATOMS, 3))


def test_type_map_raw_remaps_by_name(tmp_path):
    path = write_system(tmp_path / "sys", atype=(0, 1, 1), type_map=["O", "H"])
    system = DeepmdSystem(path, ["H", "O"])
    np.testing.assert_array_equal(system.atype, [1, 0, 0])
    np.testing.assert_array_equal(system.frame(0)["atype"], [1, 0, 0])
    np.testing.assert_array_equal(system.type_counts, [2, 1])
    # without type_map.raw the indices are taken as the model's
    plain = write_system(tmp_path / "plain", atype=(0, 1, 1))
    np.testing.assert_array_equal(DeepmdSystem(plain, ["H", "O"]).atype, [0, 1, 1])


def test_missing_labels_are_flagged(tmp_path):
    path = write_system(tmp_path / "sys", [valid_set(3, labels=("energy",))])
    system = DeepmdSystem(path, TYPE_MAP)
    assert system.has("energy") and not system.has("force") and not system.has("virial")
    batch = collate([make_sample(system, i, RCUT, SEL) for i in (0, 2)])
    assert batch["find_energy"] == 1.0
    assert batch["find_force"] == 0.0 and "force" not in batch
    assert batch["find_virial"] == 0.0 and "virial" not in batch
    assert batch["energy"].shape == (2,)
    assert batch["coord"].shape == (2, NATOMS, 3) and batch["nlist"].shape == (2, NATOMS, sum(SEL))
    assert batch["box"].shape == (2, 3, 3) and batch["shift"].shape == (2, NATOMS, sum(SEL), 3)
    assert set(model_inputs(batch)) == {"coord", "atype", "nlist", "box", "shift"}


def test_multiple_sets_concatenate(tmp_path):
    s0 = valid_set(2, seed=1, labels=("energy", "force", "virial"))
    s1 = valid_set(3, seed=2, labels=("energy", "force"))
    path = write_system(tmp_path / "sys", [s0, s1])
    system = DeepmdSystem(path, TYPE_MAP)
    assert system.nframes == len(system) == 5
    for index, (arrays, local) in enumerate([(s0, 0), (s0, 1), (s1, 0), (s1, 1), (s1, 2)]):
        frame = system.frame(index)
        np.testing.assert_array_equal(frame["coord"].reshape(-1), arrays["coord"][local])
        np.testing.assert_array_equal(frame["force"].reshape(-1), arrays["force"][local])
        assert frame["energy"] == arrays["energy"][local]
    # a label present in only some sets is not available for the system
    assert system.has("force") and not system.has("virial")
    with pytest.raises(IndexError):
        system.frame(5)


def test_nopbc_batches_have_no_box(tmp_path):
    arrays = valid_set(2)
    del arrays["box"]
    path = write_system(tmp_path / "sys", [arrays], nopbc=True)
    system = DeepmdSystem(path, TYPE_MAP)
    batch = collate([make_sample(system, i, RCUT, SEL) for i in (0, 1)])
    assert "box" not in batch and "shift" not in batch
    assert set(model_inputs(batch)) == {"coord", "atype", "nlist"}


def test_fparam_aparam_are_read(tmp_path):
    arrays = valid_set(2)
    arrays["fparam"] = np.array([[1.5, 2.0], [0.5, -1.0]])
    arrays["aparam"] = np.arange(2 * NATOMS, dtype=np.float64).reshape(2, NATOMS)
    path = write_system(tmp_path / "sys", [arrays])
    system = DeepmdSystem(path, TYPE_MAP)
    assert system.numb_fparam == 2 and system.numb_aparam == 1
    batch = collate([make_sample(system, i, RCUT, SEL) for i in (0, 1)])
    assert batch["fparam"].shape == (2, 2) and batch["aparam"].shape == (2, NATOMS, 1)
    np.testing.assert_array_equal(batch["aparam"].numpy()[1, :, 0], [3.0, 4.0, 5.0])


def _emt_frames(n: int = 3, stress: bool = True):
    """Rattled, strained Cu7Al cells labelled by ASE's EMT calculator; returns frames and their labels."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.stress import voigt_6_to_full_3x3_stress

    frames, expected = [], []
    for k, strain in enumerate((0.0, 0.01, -0.02)[:n]):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
        atoms.symbols[3] = "Al"
        shear = np.eye(3) + strain * np.array([[1, 0.2, 0], [0.2, 1, 0], [0, 0, 1]])
        atoms.set_cell(atoms.cell.array @ shear, scale_atoms=True)
        atoms.rattle(0.05, seed=k)
        atoms.calc = EMT()
        energy, forces, sigma = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        results = {"energy": energy, "forces": forces}
        if stress:
            results["stress"] = sigma
        atoms.calc = SinglePointCalculator(atoms, **results)
        virial = -voigt_6_to_full_3x3_stress(sigma) * atoms.get_volume()
        expected.append((energy, forces, virial, atoms.positions.copy(), atoms.cell.array.copy()))
        frames.append(atoms)
    return frames, expected


def test_extxyz_energy_and_forces(tmp_path):
    ase_io = pytest.importorskip("ase.io")
    frames, expected = _emt_frames(stress=False)
    file = tmp_path / "cu_al.extxyz"
    ase_io.write(file, frames, format="extxyz")
    (system,) = read_ase_file(file, type_map=["Al", "Cu"])
    assert system.nframes == 3 and system.natoms == 8 and system.pbc
    assert system.has("energy") and system.has("force") and not system.has("virial")
    np.testing.assert_array_equal(system.atype, [1, 1, 1, 0, 1, 1, 1, 1])
    for index, (energy, forces, _, positions, cell) in enumerate(expected):
        frame = system.frame(index)
        np.testing.assert_allclose(frame["energy"], energy, rtol=1e-9)
        np.testing.assert_allclose(frame["force"], forces, rtol=0, atol=1e-7)
        # extxyz stores positions and cells with 8 decimals
        np.testing.assert_allclose(frame["coord"], positions, rtol=0, atol=1e-7)
        np.testing.assert_allclose(frame["box"], cell, rtol=0, atol=1e-7)
    batch = collate([make_sample(system, i, 3.0, [12, 12]) for i in range(3)])
    assert batch["find_energy"] == 1.0 and batch["find_force"] == 1.0 and batch["find_virial"] == 0.0


def test_extxyz_with_ase_stress_gives_virial(tmp_path):
    ase_io = pytest.importorskip("ase.io")
    frames, expected = _emt_frames(stress=True)
    file = tmp_path / "cu_al.extxyz"
    ase_io.write(file, frames, format="extxyz")
    (system,) = read_ase_file(file, type_map=["Al", "Cu"])
    assert system.has("energy") and system.has("force") and system.has("virial")
    assert np.abs(expected[2][2]).max() > 1e-3  # a nonzero virial is checked
    for index, (energy, forces, virial, _, _) in enumerate(expected):
        frame = system.frame(index)
        np.testing.assert_allclose(frame["energy"], energy, rtol=1e-9)
        np.testing.assert_allclose(frame["force"], forces, rtol=0, atol=1e-7)
        # virial = -stress * volume (eV), full 3x3
        np.testing.assert_allclose(frame["virial"].reshape(3, 3), virial, rtol=1e-6, atol=1e-7)
    # load_systems accepts the file too, and batches carry the virial
    (same,) = load_systems([file], ["Al", "Cu"])
    batch = collate([make_sample(same, i, 3.0, [12, 12]) for i in range(3)])
    assert batch["find_virial"] == 1.0 and batch["virial"].shape == (3, 9)


def test_extxyz_element_not_in_type_map(tmp_path):
    ase_io = pytest.importorskip("ase.io")
    from ase.build import bulk

    file = tmp_path / "cu.extxyz"
    ase_io.write(file, [bulk("Cu", "fcc", a=3.6, cubic=True)], format="extxyz")
    with pytest.raises(DataError) as exc:
        read_ase_file(file, type_map=["O", "H"])
    assert_names(exc, file)


def test_real_water_system_opens(shared_dir):
    system = DeepmdSystem(shared_dir / "data" / "water" / "data_1", ["O", "H"])
    assert system.nframes == 160 and system.natoms == 192 and system.pbc
    assert system.has("energy") and system.has("force") and not system.has("virial")
    np.testing.assert_array_equal(system.type_counts, [64, 128])


def test_real_nopbc_system_remaps_types(shared_dir):
    (system,) = load_systems([shared_dir / "data" / "nopbc" / "C4H3O1"], ["H", "O", "C"])
    assert not system.pbc and system.natoms == 8
    raw = np.loadtxt(shared_dir / "data" / "nopbc" / "C4H3O1" / "type.raw", dtype=int)
    names = (shared_dir / "data" / "nopbc" / "C4H3O1" / "type_map.raw").read_text().split()
    np.testing.assert_array_equal(system.atype, [["H", "O", "C"].index(names[t]) for t in raw])
    frame = system.frame(14)
    assert frame["box"] is None and frame["coord"].dtype == np.float64
