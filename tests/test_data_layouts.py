"""DeePMD-kit's reading rules (reshape by total size; only what the model and loss use is read), the checks of
every frame before training (one bad input -> one message naming file and frame), and deepmd/hdf5 systems."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_errors import BOX, valid_set, write_system

from dpfit.data.datamodule import DeepmdDataModule
from dpfit.data.system import OPEN_FILES, DataError, DeepmdSystem, H5System, Needs, load_systems

TYPE_MAP = ["O", "H"]
NATOMS = 3
FIT = Needs(labels=frozenset({"energy", "force"}), numb_fparam=0, numb_aparam=0,
            reported=frozenset({"energy", "force", "virial"}))


# ----------------------------------------------------------------------------------------------------------------
# DeePMD-kit's layouts
# ----------------------------------------------------------------------------------------------------------------


def test_aparam_stored_as_one_row_is_ignored_when_unused_and_read_by_size_when_used(tmp_path):
    """DeePMD-kit's Be example stores aparam.npy as (1, nframes * natoms)."""
    arrays = valid_set(4)
    aparam = np.arange(4 * NATOMS, dtype=np.float64) / 10
    arrays["aparam"] = aparam.reshape(1, -1)
    path = write_system(tmp_path / "sys", [arrays])
    unused = DeepmdSystem(path, TYPE_MAP, FIT)
    assert not unused.has("aparam") and unused.numb_aparam == 0
    used = DeepmdSystem(path, TYPE_MAP, Needs(numb_aparam=1))
    assert used.numb_aparam == 1
    for i in range(4):
        np.testing.assert_array_equal(used.frame(i)["aparam"], aparam.reshape(4, NATOMS, 1)[i])


def test_fparam_of_shape_nframes_and_float32_files(tmp_path):
    arrays = {k: v.astype(np.float32) for k, v in valid_set(3, labels=("energy", "force", "virial")).items()}
    arrays["fparam"] = np.array([0.5, 1.5, 2.5], dtype=np.float32)  # (nframes,)
    arrays["force"] = arrays["force"].reshape(3, NATOMS, 3)  # (nframes, natoms, 3)
    path = write_system(tmp_path / "sys", [arrays])
    system = DeepmdSystem(path, TYPE_MAP, Needs(numb_fparam=1))
    assert system.numb_fparam == 1
    frame = system.frame(2)
    assert frame["fparam"].dtype == np.float64 and frame["fparam"].tolist() == [2.5]
    np.testing.assert_array_equal(frame["force"], arrays["force"][2].astype(np.float64))
    np.testing.assert_array_equal(frame["coord"].reshape(-1), arrays["coord"][2].astype(np.float64))


def test_one_frame_set_with_1d_arrays(tmp_path):
    arrays = {k: v[0] for k, v in valid_set(1).items()}  # coord (9,), box (9,), energy (), force (9,)
    path = write_system(tmp_path / "sys", [arrays])
    system = DeepmdSystem(path, TYPE_MAP)
    assert system.nframes == 1
    np.testing.assert_array_equal(system.frame(0)["coord"].reshape(-1), arrays["coord"])


def test_unused_malformed_files_are_not_errors(tmp_path, caplog):
    arrays = valid_set(2)
    arrays["aparam"] = np.ones((2, 5))  # 5 values per frame: no whole number per atom
    arrays["atom_pref"] = np.ones((2, 2))  # wrong size, not used by this loss
    arrays["virial"] = np.ones((2, 6))  # wrong size, only reported
    path = write_system(tmp_path / "sys", [arrays])
    with caplog.at_level(logging.WARNING):
        system = DeepmdSystem(path, TYPE_MAP, FIT)
    assert system.has("energy") and system.has("force")
    assert not system.has("virial") and not system.has("aparam") and not system.has("atom_pref")
    assert "virial.npy" in caplog.text  # a reported label that is malformed is warned about
    # the model reading them: errors naming the file
    with pytest.raises(DataError, match="aparam.npy"):
        DeepmdSystem(path, TYPE_MAP, Needs(numb_aparam=1))
    with pytest.raises(DataError, match="virial.npy"):
        DeepmdSystem(path, TYPE_MAP, Needs(labels=frozenset({"energy", "virial"})))
    # without knowing the model: a malformed aparam is warned about and ignored
    with caplog.at_level(logging.WARNING):
        assert not DeepmdSystem(path, TYPE_MAP, Needs(labels=frozenset({"energy"}))).has("aparam")


# ----------------------------------------------------------------------------------------------------------------
# bad input -> one message naming file (and frame), found before the first step
# ----------------------------------------------------------------------------------------------------------------


def _transposed_force(root: Path) -> tuple[Path, str]:
    arrays = valid_set(2, natoms=4)
    arrays["force"] = np.ones((2, 3, 4))  # (nframes, 3, natoms)
    path = write_system(root / "sys", [arrays], atype=(0, 1, 1, 1))
    return path, str(path / "set.000" / "force.npy") + ": shape (2, 3, 4) looks transposed"


def _nan_in_last_frame(root: Path) -> tuple[Path, str]:
    first, second = valid_set(2, seed=1), valid_set(3, seed=2)
    second["force"][2, 4] = np.nan
    path = write_system(root / "sys", [first, second])
    return path, str(path / "set.001" / "force.npy") + ": NaN or inf in frame 2"


def _inf_energy(root: Path) -> tuple[Path, str]:
    arrays = valid_set(3)
    arrays["energy"][1] = np.inf
    path = write_system(root / "sys", [arrays])
    return path, str(path / "set.000" / "energy.npy") + ": NaN or inf in frame 1"


def _atoms_on_top(root: Path) -> tuple[Path, str]:
    arrays = valid_set(3)
    coord = arrays["coord"].reshape(3, NATOMS, 3)
    coord[2, 2] = coord[2, 1] + [0.01, 0.0, 0.0]
    path = write_system(root / "sys", [arrays])
    return path, str(path / "set.000" / "coord.npy") + ": atoms 1 and 2 of frame 2 are 0.01 Å apart"


def _atom_on_its_image(root: Path) -> tuple[Path, str]:
    arrays = valid_set(2)
    coord = arrays["coord"].reshape(2, NATOMS, 3)
    coord[1, 2] = coord[1, 0] + BOX[0] + [0.0, 0.0, 0.02]  # atom 2 on atom 0's periodic image
    path = write_system(root / "sys", [arrays])
    return path, "coord.npy: atoms 0 and 2 of frame 1 are 0.02 Å apart"


def _singular_cell(root: Path) -> tuple[Path, str]:
    arrays = valid_set(2)
    arrays["box"][1] = 0.0
    path = write_system(root / "sys", [arrays])
    return path, str(path / "set.000" / "box.npy") + ": cell of frame 1 is not invertible"


def _truncated_npy(root: Path) -> tuple[Path, str]:
    path = write_system(root / "sys", [valid_set(3)])
    file = path / "set.000" / "force.npy"
    file.write_bytes(file.read_bytes()[:-20])
    return path, str(file) + ": truncated"


def _extxyz_without_labels(root: Path) -> tuple[Path, str]:
    ase_io = pytest.importorskip("ase.io")
    from ase import Atoms

    file = root / "nolabels.extxyz"
    atoms = [Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], cell=BOX, pbc=True)] * 2
    ase_io.write(file, atoms, format="extxyz")
    return file, str(file) + ": no labels found"


def _npy_without_labels(root: Path) -> tuple[Path, str]:
    path = write_system(root / "sys", [valid_set(2, labels=())])
    return path, str(path) + ": no labels found"


BAD = {
    "transposed_force": _transposed_force,
    "nan_last_frame": _nan_in_last_frame,
    "inf_energy": _inf_energy,
    "atoms_on_top": _atoms_on_top,
    "atom_on_own_image": _atom_on_its_image,
    "singular_cell": _singular_cell,
    "truncated_npy": _truncated_npy,
    "extxyz_no_labels": _extxyz_without_labels,
    "npy_no_labels": _npy_without_labels,
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_before_training(tmp_path, case):
    path, message = BAD[case](tmp_path)
    dm = DeepmdDataModule(train_systems=[str(path)], type_map=TYPE_MAP, rcut=3.0, sel=[4, 8])
    dm.needs = FIT
    with pytest.raises(DataError) as exc:
        dm.setup("fit")
    text = str(exc.value)
    assert message in text and "\n" not in text, text


def test_min_distance_is_configurable_and_checked_lazily_without_the_scan(tmp_path):
    path, _ = _atoms_on_top(tmp_path)
    dm = DeepmdDataModule(train_systems=[str(path)], type_map=TYPE_MAP, rcut=3.0, sel=[4, 8], min_distance=0.005)
    dm.setup("fit")  # 0.01 Å apart is allowed with min_distance=0.005
    lazy = DeepmdDataModule(train_systems=[str(path)], type_map=TYPE_MAP, rcut=3.0, sel=[4, 8], check_data=False,
                            batch_size=3, val_fraction=0.0)
    lazy.setup("fit")  # no scan: the frame is refused when it is drawn
    with pytest.raises(DataError, match="frame 2 are 0.01 Å apart"):
        next(iter(lazy.train_dataloader()))


# ----------------------------------------------------------------------------------------------------------------
# deepmd/hdf5
# ----------------------------------------------------------------------------------------------------------------


def npy_to_h5(systems: list[Path], file: Path, prefix: str = "") -> list[str]:
    """Write deepmd/npy folders into one HDF5 file as DeePMD-kit / dpdata lay it out; returns the groups."""
    h5py = pytest.importorskip("h5py")
    groups = []
    with h5py.File(file, "a") as h5:
        for path in systems:
            g = h5.create_group(f"{prefix}/{path.name}")
            g.create_dataset("type.raw", data=np.loadtxt(path / "type.raw", dtype=np.int64, ndmin=1))
            if (path / "type_map.raw").is_file():
                g.create_dataset("type_map.raw", data=np.array((path / "type_map.raw").read_text().split(), dtype="S"))
            if (path / "nopbc").exists():
                g.create_dataset("nopbc", data=True)
            for folder in sorted(path.glob("set.*")):
                sg = g.create_group(folder.name)
                for npy in sorted(folder.glob("*.npy")):
                    sg.create_dataset(npy.name, data=np.load(npy))
            groups.append(g.name)
    return groups


def _batches(dm: DeepmdDataModule, n: int) -> list[dict]:
    out = []
    for k, batch in enumerate(dm.train_dataloader()):
        if k == n:
            break
        out.append(batch)
    return out


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for key in x:
            if key == "system":
                continue
            if isinstance(x[key], torch.Tensor):
                assert torch.equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


def test_hdf5_batches_equal_npy_batches(shared_dir, tmp_path):
    water = sorted((shared_dir / "data" / "water").glob("data_*"))
    file = tmp_path / "water.h5"
    npy_to_h5(water, file, prefix="water")
    kwargs = dict(type_map=TYPE_MAP, rcut=6.0, sel=[46, 92], batch_size=1, seed=3, check_data=False,
                  data_stat_nbatch=1)
    from_npy = DeepmdDataModule(train_systems=[str(p) for p in water], **kwargs)
    from_h5 = DeepmdDataModule(train_systems=[str(file)], num_workers=1, **kwargs)  # read in a worker process
    from_npy.setup("fit")
    from_h5.setup("fit")
    assert [v.system.nframes for v in from_h5.train_views] == [v.system.nframes for v in from_npy.train_views]
    assert from_h5.train_views[0].system.name == f"{file}#/water/data_0"
    _assert_same_batches(_batches(from_npy, 3), _batches(from_h5, 3))
    _assert_same_batches(from_npy.stat_batches()[:2], from_h5.stat_batches()[:2])
    # one group by name, and the pickled system (as sent to DataLoader workers) reads its frames itself
    (one,) = load_systems([f"{file}#/water/data_2"], TYPE_MAP)
    import pickle

    clone = pickle.loads(pickle.dumps(one))
    np.testing.assert_array_equal(clone.frame(7)["force"], DeepmdSystem(water[2], TYPE_MAP).frame(7)["force"])


def test_hdf5_nopbc_types_and_errors(shared_dir, tmp_path):
    h5py = pytest.importorskip("h5py")
    mol = shared_dir / "data" / "nopbc" / "C4H3O1"
    file = tmp_path / "mol.hdf5"
    npy_to_h5([mol], file)
    (system,) = load_systems([file], ["H", "O", "C"])
    assert isinstance(system, H5System) and not system.pbc
    npy = DeepmdSystem(mol, ["H", "O", "C"])
    np.testing.assert_array_equal(system.atype, npy.atype)
    np.testing.assert_array_equal(system.frame(5)["coord"], npy.frame(5)["coord"])
    with pytest.raises(DataError, match="no such group"):
        load_systems([f"{file}#/nothere"], ["H", "O", "C"])
    OPEN_FILES.clear()  # dpfit keeps the file open for reading: close it before writing
    with h5py.File(file, "a") as h5:
        h5["C4H3O1/set.000/force.npy"][0, 0] = np.nan
    with pytest.raises(DataError, match=r"mol.hdf5#/C4H3O1/set.000/force.npy: NaN or inf in frame 0"):
        load_systems([file], ["H", "O", "C"])[0].check()


# ----------------------------------------------------------------------------------------------------------------
# through train.py's config: the model and loss tell the data module what to read
# ----------------------------------------------------------------------------------------------------------------

TINY = ["data=deepmd", "data.type_map=[O,H]", "data.sel=[4,8]", "model.descriptor.rcut=3.0",
        "model.descriptor.rcut_smth=0.5", "model.descriptor.neuron=[4,8]", "model.descriptor.axis_neuron=4",
        "model.fitting_net.neuron=[8,8]", "kernels=off", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1", "~callbacks.progress_bar", "~callbacks.lcurve_plot", "summary=false",
        "trainer.enable_model_summary=false", "data.data_stat_nbatch=1"]


def test_training_ignores_unused_aparam_and_refuses_data_without_labels(tmp_path):
    from hydra_utils import compose_train

    from dpfit.cli.train import train

    arrays = valid_set(6)
    arrays["aparam"] = np.ones((1, 6 * NATOMS + 1))  # malformed, and the model has numb_aparam 0
    path = write_system(tmp_path / "sys", [arrays])
    train(compose_train([*TINY, f"data.train_systems=[{path}]"], tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()

    file, message = _extxyz_without_labels(tmp_path)
    with pytest.raises(DataError, match="no labels found"):
        train(compose_train([*TINY, f"data.train_systems=[{file}]"], tmp_path / "run2"))
