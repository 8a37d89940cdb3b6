"""Shared fixtures: locations of ../shared (data, DeePMD-kit fixtures), a tiny random model, random frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dpfit.data.neighbor import build_neighbor_list
from dpfit.model import EnergyModel

#: ../shared relative to the repository root (tests/conftest.py -> repo root -> its parent)
SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"

#: a triclinic (skewed) cell, rows a, b, c in Å; its heights (~4.6-5.4 Å) are below 2 * rcut of the tiny model,
#: so atoms see their own periodic images
TRICLINIC_CELL = np.array([[5.6, 0.0, 0.0], [1.9, 5.2, 0.0], [-1.3, 1.6, 5.4]])


@pytest.fixture(scope="module")
def single_torch_thread():
    """Run a module's tests with one torch thread (restored afterwards).

    The models here are tiny: with 2 threads on 2 busy cores, OpenMP hand-offs make each small op ~100x
    slower, while one thread costs little even on the 192-atom water model.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.skip(f"shared data folder {SHARED_DIR} is absent")
    return SHARED_DIR


def _fixture_dir(shared: Path, name: str) -> Path:
    path = shared / "fixtures" / name
    if not path.is_dir():
        pytest.skip(f"fixture {path} is absent")
    return path


@pytest.fixture(scope="session")
def water_fixture(shared_dir: Path) -> Path:
    """Folder with the DeePMD-kit 3.2 water se_e2_a checkpoint and its reference on data_3."""
    return _fixture_dir(shared_dir, "deepmd_water_se_e2_a")


@pytest.fixture(scope="session")
def cho_fixture(shared_dir: Path) -> Path:
    """Folder with the non-periodic C/H/O model (type_one_side false, fparam + aparam) and references."""
    return _fixture_dir(shared_dir, "deepmd_cho_nopbc_fparam")


# --------------------------------------------------------------------------------------------------------------
# tiny random models and frames
# --------------------------------------------------------------------------------------------------------------

TINY_RCUT = 4.0
TINY_RCUT_SMTH = 1.0


def tiny_config(precision: str = "float64", **descriptor_overrides) -> dict:
    """A 2-type se_e2_a config small enough to evaluate in milliseconds."""
    fitting = {"neuron": [8, 8], "resnet_dt": True, "seed": 2}
    for key in ("numb_fparam", "numb_aparam"):
        if key in descriptor_overrides:
            fitting[key] = descriptor_overrides.pop(key)
    descriptor = {
        "sel": [12, 14],
        "rcut": TINY_RCUT,
        "rcut_smth": TINY_RCUT_SMTH,
        "neuron": [4, 8],
        "axis_neuron": 4,
        "resnet_dt": False,
        "type_one_side": True,
        "seed": 1,
    }
    descriptor.update(descriptor_overrides)
    return {"type_map": ["A", "B"], "descriptor": descriptor, "fitting_net": fitting, "precision": precision}


def make_tiny_model(precision: str = "float64", stats: bool = True, **overrides) -> EnergyModel:
    """Tiny random model; with ``stats`` the normalisation, energy bias and fparam/aparam statistics are
    nonzero (as after training), so padded slots contribute the constant -davg/dstd as in DeePMD."""
    model = EnergyModel.from_config(tiny_config(precision, **overrides))
    if stats:
        gen = torch.Generator().manual_seed(7)
        desc, fit = model.descriptor, model.fitting
        ntypes = desc.ntypes
        dt = model.dtype
        with torch.no_grad():
            avg_r = 0.05 + 0.2 * torch.rand(ntypes, dtype=dt, generator=gen)
            std_r = 0.2 + 0.3 * torch.rand(ntypes, dtype=dt, generator=gen)
            std_a = 0.1 + 0.2 * torch.rand(ntypes, dtype=dt, generator=gen)
            desc.davg.zero_()
            desc.davg[:, :, 0] = avg_r[:, None]
            desc.dstd[:, :, 0] = std_r[:, None]
            desc.dstd[:, :, 1:] = std_a[:, None, None]
            # the descriptor is divided by nnei, so random fitting weights give a nearly flat energy:
            # amplify the first fitting layer to get forces of order 0.1-1 eV/Å
            for net in fit.nets:
                net.layers[0].matrix.mul_(30.0)
            fit.bias_atom_e.copy_(torch.tensor([-3.1, -1.7], dtype=dt)[:ntypes])
            if fit.numb_fparam:
                fit.fparam_avg.fill_(0.8)
                fit.fparam_inv_std.fill_(2.5)
            if fit.numb_aparam:
                fit.aparam_avg.fill_(-0.3)
                fit.aparam_inv_std.fill_(1.7)
    return model.eval()


@pytest.fixture
def tiny_model():
    """Factory: ``tiny_model(precision="float64", stats=True, **descriptor/fitting overrides)``."""
    return make_tiny_model


def _min_image_distances(coord: np.ndarray, box: np.ndarray | None) -> np.ndarray:
    """Smallest distance between any two distinct atoms or an atom and its own image (brute force, 5^3 images)."""
    diff = coord[None, :, :] - coord[:, None, :]
    if box is None:
        d = np.linalg.norm(diff, axis=-1)
        return d + np.diag(np.full(len(coord), np.inf))
    rng = np.arange(-2, 3)
    images = np.stack(np.meshgrid(rng, rng, rng, indexing="ij"), -1).reshape(-1, 3) @ box
    d = np.linalg.norm(diff[:, :, None, :] + images[None, None], axis=-1)
    d[np.arange(len(coord)), np.arange(len(coord)), len(images) // 2] = np.inf
    return d.min(axis=-1)


def make_random_frame(
    seed: int = 0,
    natoms: int = 6,
    periodic: bool = True,
    ntypes: int = 2,
    min_dist: float = 1.2,
    box: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Random (coord (n, 3), atype (n,), box (3, 3) or None) with no pair closer than ``min_dist``.

    Periodic: a randomly perturbed triclinic cell. Non-periodic: a compact cluster (every atom has neighbors).
    Both types are always present.
    """
    rng = np.random.default_rng(seed)
    atype = np.arange(natoms) % ntypes
    rng.shuffle(atype)
    if periodic:
        cell = (TRICLINIC_CELL if box is None else np.asarray(box, dtype=np.float64)).copy()
        if box is None:
            cell = cell * (1.0 + 0.05 * rng.uniform(-1, 1, size=(3, 3)))
    else:
        cell = None
    for _ in range(1000):
        if cell is not None:
            coord = rng.uniform(0, 1, size=(natoms, 3)) @ cell
        else:
            coord = rng.uniform(-1.0, 1.0, size=(natoms, 3)) * (1.0 + 0.45 * natoms ** (1 / 3))
        if _min_image_distances(coord, cell).min() > min_dist:
            return coord, atype, cell
    raise RuntimeError("could not place the atoms")


@pytest.fixture
def random_frame():
    """Factory: ``random_frame(seed=0, natoms=6, periodic=True, ntypes=2, min_dist=1.2, box=None)``."""
    return make_random_frame


def evaluate(
    model: EnergyModel,
    coord,
    atype,
    box=None,
    fparam=None,
    aparam=None,
    virial: bool = True,
    allow_dropped: bool = False,
    device: torch.device | str = "cpu",
) -> dict[str, np.ndarray]:
    """Run ``model`` on one frame (coord (n, 3)) or a stack of frames (coord (nf, n, 3)) of the same atoms.

    Builds a fresh DeePMD neighbor list per frame (so finite differences see neighbors enter and leave)
    and returns float64 numpy arrays: energy (nf,), atom_energy, force, and virial / atom_virial.
    ``device``: where the model runs (the inputs are moved there; the lists are built on the CPU).
    """
    coord = np.asarray(coord, dtype=np.float64)
    single = coord.ndim == 2
    coords = coord[None] if single else coord
    nf = len(coords)
    atype = np.asarray(atype, dtype=np.int64)
    boxes = None
    if box is not None:
        box = np.asarray(box, dtype=np.float64)
        boxes = np.broadcast_to(box.reshape(-1, 3, 3), (nf, 3, 3)) if box.ndim == 2 or len(box) == 1 else box
    nls = [
        build_neighbor_list(c, atype, None if boxes is None else boxes[k], model.rcut, model.sel, warn=False)
        for k, c in enumerate(coords)
    ]
    if not allow_dropped:
        assert all(nl.n_dropped == 0 for nl in nls), "test frame overflows sel; enlarge sel"
    kwargs = {}
    if boxes is not None:
        kwargs["box"] = torch.from_numpy(boxes.copy())
        kwargs["shift"] = torch.from_numpy(np.stack([nl.shift for nl in nls]))
    if fparam is not None:
        fp = np.asarray(fparam, dtype=np.float64)
        kwargs["fparam"] = torch.from_numpy(np.broadcast_to(fp.reshape(-1, fp.shape[-1]), (nf, fp.shape[-1])).copy())
    if aparam is not None:
        ap = np.asarray(aparam, dtype=np.float64).reshape(-1, len(atype), np.shape(aparam)[-1])
        kwargs["aparam"] = torch.from_numpy(np.broadcast_to(ap, (nf, *ap.shape[1:])).copy())
    out = model(
        torch.from_numpy(coords.copy()).to(device),
        torch.from_numpy(np.broadcast_to(atype, (nf, len(atype))).copy()).to(device),
        torch.from_numpy(np.stack([nl.nlist for nl in nls])).to(device),
        do_force=True,
        do_virial=virial,
        do_atomic_virial=virial,
        **{k: v.to(device) for k, v in kwargs.items()},
    )
    res = {k: v.detach().cpu().to(torch.float64).numpy() for k, v in out.items()}
    if single:
        res = {k: v[0] for k, v in res.items()}
    return res


@pytest.fixture(scope="session")
def run_model():
    """``run_model(model, coord, atype, box=None, fparam=None, aparam=None, virial=True, device="cpu")``
    -> numpy outputs."""
    return evaluate


def finite_difference_forces(energy_of, coord: np.ndarray, h: float) -> np.ndarray:
    """-dE/dr by central differences: ``energy_of(stack of displaced coords)`` -> energies (2 per component)."""
    n = len(coord)
    displaced = []
    for i in range(n):
        for k in range(3):
            for sign in (1.0, -1.0):
                c = coord.copy()
                c[i, k] += sign * h
                displaced.append(c)
    e = np.asarray(energy_of(np.stack(displaced))).reshape(n, 3, 2)
    return -(e[..., 0] - e[..., 1]) / (2 * h)


@pytest.fixture(scope="session")
def fd_forces():
    """``fd_forces(energy_of, coord, h)``: central finite-difference forces (see finite_difference_forces)."""
    return finite_difference_forces
