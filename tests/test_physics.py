"""Physics of the energy model on tiny random models: forces and virials as derivatives, invariances, smoothness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpfit.model import switching_function

pytestmark = pytest.mark.usefixtures("single_torch_thread")

#: cutoffs of the tiny model built by the ``tiny_model`` fixture (checked in test_tiny_model_cutoffs)
TINY_RCUT, TINY_RCUT_SMTH = 4.0, 1.0
#: (precision, type_one_side) combinations; float32 gets looser tolerances
MODELS = [("float64", True), ("float64", False), ("float32", True), ("float32", False)]
MODEL_IDS = [f"{p}-{'one_side' if t else 'pair_nets'}" for p, t in MODELS]
GEOMETRIES = [True, False]
GEOMETRY_IDS = ["pbc_triclinic", "nopbc"]

#: finite-difference step (Å or strain) and tolerance (eV/Å or eV) per precision
FD_STEP = {"float64": 1e-5, "float32": 1e-2}
FD_ATOL = {"float64": 1e-7, "float32": 3e-3}
#: tolerance for quantities that should be equal (invariances), per precision: (energy eV, force eV/Å)
EQ_TOL = {"float64": (1e-10, 1e-10), "float32": (2e-4, 2e-4)}


def random_rotation(seed: int, proper: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if (np.linalg.det(q) > 0) != proper:
        q[:, 0] = -q[:, 0]
    return q


@pytest.mark.parametrize("periodic", GEOMETRIES, ids=GEOMETRY_IDS)
@pytest.mark.parametrize("precision,type_one_side", MODELS, ids=MODEL_IDS)
def test_forces_are_minus_energy_gradient(fd_forces, tiny_model, random_frame, run_model, precision, type_one_side, periodic):
    model = tiny_model(precision, type_one_side=type_one_side)
    coord, atype, box = random_frame(seed=3, natoms=6, periodic=periodic)
    ref = run_model(model, coord, atype, box)
    h = FD_STEP[precision]
    fd_force = fd_forces(lambda c: run_model(model, c, atype, box, virial=False)["energy"], coord, h)
    assert np.abs(ref["force"]).max() > 0.05, "forces too small for a meaningful check"
    np.testing.assert_allclose(ref["force"], fd_force, rtol=0, atol=FD_ATOL[precision])
    # Newton's third law: no net force (translation invariance), also with periodic images
    np.testing.assert_allclose(ref["force"].sum(axis=0), 0.0, atol=FD_ATOL[precision] * 1e-2)


@pytest.mark.parametrize("periodic", GEOMETRIES, ids=GEOMETRY_IDS)
@pytest.mark.parametrize("precision,type_one_side", MODELS, ids=MODEL_IDS)
def test_virial_is_minus_strain_derivative(tiny_model, random_frame, run_model, precision, type_one_side, periodic):
    model = tiny_model(precision, type_one_side=type_one_side)
    coord, atype, box = random_frame(seed=4, natoms=6, periodic=periodic)
    ref = run_model(model, coord, atype, box)
    h = FD_STEP[precision]
    coords, boxes = [], []
    for a in range(3):
        for b in range(3):
            for sign in (1.0, -1.0):
                strain = np.eye(3)
                strain[a, b] += sign * h
                coords.append(coord @ strain)
                boxes.append(None if box is None else box @ strain)
    e = run_model(model, np.stack(coords), atype, None if box is None else np.stack(boxes), virial=False)
    e = e["energy"].reshape(3, 3, 2)
    fd_virial = -(e[..., 0] - e[..., 1]) / (2 * h)
    virial = ref["virial"].reshape(3, 3)
    assert np.abs(virial).max() > 0.05
    np.testing.assert_allclose(virial, fd_virial, rtol=0, atol=3 * FD_ATOL[precision])
    np.testing.assert_allclose(virial, virial.T, rtol=0, atol=FD_ATOL[precision] * 1e-2)


@pytest.mark.parametrize("periodic", GEOMETRIES, ids=GEOMETRY_IDS)
@pytest.mark.parametrize("precision,type_one_side", MODELS, ids=MODEL_IDS)
def test_atomic_quantities_sum_to_totals(tiny_model, random_frame, run_model, precision, type_one_side, periodic):
    model = tiny_model(precision, type_one_side=type_one_side)
    coord, atype, box = random_frame(seed=5, natoms=6, periodic=periodic)
    out = run_model(model, coord, atype, box)
    tol_e, _ = EQ_TOL[precision]
    assert out["atom_energy"].shape == (6,)
    assert out["atom_virial"].shape == (6, 9)
    np.testing.assert_allclose(out["atom_energy"].sum(), out["energy"], rtol=0, atol=tol_e)
    np.testing.assert_allclose(out["atom_virial"].sum(axis=0), out["virial"], rtol=0, atol=tol_e)


@pytest.mark.parametrize("proper", [True, False], ids=["rotation", "reflection"])
@pytest.mark.parametrize("periodic", GEOMETRIES, ids=GEOMETRY_IDS)
@pytest.mark.parametrize("precision,type_one_side", MODELS, ids=MODEL_IDS)
def test_rotation_invariance(tiny_model, random_frame, run_model, precision, type_one_side, periodic, proper):
    model = tiny_model(precision, type_one_side=type_one_side)
    coord, atype, box = random_frame(seed=6, natoms=6, periodic=periodic)
    q = random_rotation(11, proper)
    ref = run_model(model, coord, atype, box)
    rot = run_model(model, coord @ q.T, atype, None if box is None else box @ q.T)
    tol_e, tol_f = EQ_TOL[precision]
    np.testing.assert_allclose(rot["energy"], ref["energy"], rtol=0, atol=tol_e)
    np.testing.assert_allclose(rot["atom_energy"], ref["atom_energy"], rtol=0, atol=tol_e)
    np.testing.assert_allclose(rot["force"], ref["force"] @ q.T, rtol=0, atol=tol_f)
    np.testing.assert_allclose(rot["virial"].reshape(3, 3), q @ ref["virial"].reshape(3, 3) @ q.T, rtol=0, atol=tol_f)


@pytest.mark.parametrize("periodic", GEOMETRIES, ids=GEOMETRY_IDS)
@pytest.mark.parametrize("precision,type_one_side", MODELS, ids=MODEL_IDS)
def test_translation_invariance(tiny_model, random_frame, run_model, precision, type_one_side, periodic):
    model = tiny_model(precision, type_one_side=type_one_side)
    coord, atype, box = random_frame(seed=7, natoms=6, periodic=periodic)
    ref = run_model(model, coord, atype, box)
    # a large, non-lattice translation: periodic atoms end up far outside the cell
    moved = run_model(model, coord + np.array([13.7, -21.3, 8.9]), atype, box)
    tol_e, tol_f = EQ_TOL[precision]
    np.testing.assert_allclose(moved["energy"], ref["energy"], rtol=0, atol=tol_e * 10)
    np.testing.assert_allclose(moved["atom_energy"], ref["atom_energy"], rtol=0, atol=tol_e * 10)
    np.testing.assert_allclose(moved["force"], ref["force"], rtol=0, atol=tol_f * 10)
    np.testing.assert_allclose(moved["virial"], ref["virial"], rtol=0, atol=tol_f * 10)


@pytest.mark.parametrize("periodic", GEOMETRIES, ids=GEOMETRY_IDS)
@pytest.mark.parametrize("precision,type_one_side", MODELS, ids=MODEL_IDS)
def test_permutation_equivariance(tiny_model, random_frame, run_model, precision, type_one_side, periodic):
    model = tiny_model(precision, type_one_side=type_one_side)
    coord, atype, box = random_frame(seed=8, natoms=6, periodic=periodic)
    perm = np.random.default_rng(1).permutation(len(coord))
    ref = run_model(model, coord, atype, box)
    out = run_model(model, coord[perm], atype[perm], box)
    tol_e, tol_f = EQ_TOL[precision]
    np.testing.assert_allclose(out["energy"], ref["energy"], rtol=0, atol=tol_e)
    np.testing.assert_allclose(out["atom_energy"], ref["atom_energy"][perm], rtol=0, atol=tol_e)
    np.testing.assert_allclose(out["force"], ref["force"][perm], rtol=0, atol=tol_f)
    np.testing.assert_allclose(out["virial"], ref["virial"], rtol=0, atol=tol_f)


@pytest.mark.parametrize("precision,type_one_side", MODELS, ids=MODEL_IDS)
def test_periodic_rewrapping(tiny_model, random_frame, run_model, precision, type_one_side):
    model = tiny_model(precision, type_one_side=type_one_side)
    coord, atype, box = random_frame(seed=9, natoms=6, periodic=True)
    lattice_shifts = np.random.default_rng(2).integers(-3, 4, size=(len(coord), 3))
    lattice_shifts[0] = [1, 0, 0]
    ref = run_model(model, coord, atype, box)
    out = run_model(model, coord + lattice_shifts @ box, atype, box)
    tol_e, tol_f = EQ_TOL[precision]
    np.testing.assert_allclose(out["energy"], ref["energy"], rtol=0, atol=tol_e * 10)
    np.testing.assert_allclose(out["atom_energy"], ref["atom_energy"], rtol=0, atol=tol_e * 10)
    np.testing.assert_allclose(out["force"], ref["force"], rtol=0, atol=tol_f * 10)
    np.testing.assert_allclose(out["virial"], ref["virial"], rtol=0, atol=tol_f * 10)


def test_batched_frames_match_single_frames(tiny_model, random_frame, run_model):
    model = tiny_model("float64", numb_fparam=1, numb_aparam=2)
    frames = [random_frame(seed=s, natoms=6, periodic=True) for s in (20, 21, 22)]
    atype = frames[0][1]  # positions of the other frames are random too: any type labels will do
    rng = np.random.default_rng(0)
    fparam = rng.normal(size=(3, 1))
    aparam = rng.normal(size=(3, 6, 2))
    coords = np.stack([c for c, _, _ in frames])
    boxes = np.stack([b for _, _, b in frames])
    batched = run_model(model, coords, atype, boxes, fparam=fparam, aparam=aparam)
    for k in range(3):
        single = run_model(model, coords[k], atype, boxes[k], fparam=fparam[k], aparam=aparam[k])
        for key in ("energy", "atom_energy", "force", "virial", "atom_virial"):
            np.testing.assert_allclose(batched[key][k], single[key], rtol=1e-12, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_forces_with_fparam_aparam(fd_forces, tiny_model, random_frame, run_model, precision):
    """fparam/aparam enter the fitting net only: energies depend on them, forces stay -dE/dr."""
    model = tiny_model(precision, numb_fparam=1, numb_aparam=1)
    coord, atype, box = random_frame(seed=10, natoms=5, periodic=False)
    aparam = np.linspace(-1.0, 1.0, 5).reshape(5, 1)
    ref = run_model(model, coord, atype, box, fparam=[0.3], aparam=aparam)
    other_f = run_model(model, coord, atype, box, fparam=[1.3], aparam=aparam)
    other_a = run_model(model, coord, atype, box, fparam=[0.3], aparam=aparam[::-1].copy())
    assert abs(other_f["energy"] - ref["energy"]) > 1e-3
    assert abs(other_a["energy"] - ref["energy"]) > 1e-3
    h = FD_STEP[precision]
    fd = fd_forces(lambda c: run_model(model, c, atype, box, fparam=[0.3], aparam=aparam, virial=False)["energy"],
                   coord, h)
    np.testing.assert_allclose(ref["force"], fd, rtol=0, atol=FD_ATOL[precision])


# ----------------------------------------------------------------------------------------------------------------
# smoothness at the cutoff
# ----------------------------------------------------------------------------------------------------------------


def test_tiny_model_cutoffs(tiny_model):
    model = tiny_model()
    assert (model.rcut, model.descriptor.rcut_smth) == (TINY_RCUT, TINY_RCUT_SMTH)


def test_switching_function_is_c2():
    r = torch.tensor([0.2, TINY_RCUT_SMTH, 0.5 * (TINY_RCUT_SMTH + TINY_RCUT), TINY_RCUT, TINY_RCUT + 1.0],
                     dtype=torch.float64, requires_grad=True)
    w = switching_function(r, TINY_RCUT_SMTH, TINY_RCUT)
    np.testing.assert_allclose(w.detach().numpy(), [1.0, 1.0, 0.5, 0.0, 0.0], atol=1e-15)
    # derivatives from both sides of each knot, by finite differences of the closed form
    for knot in (TINY_RCUT_SMTH, TINY_RCUT):
        for eps in (1e-3, 1e-4):
            x = torch.tensor([knot - eps, knot, knot + eps], dtype=torch.float64)
            y = switching_function(x, TINY_RCUT_SMTH, TINY_RCUT).numpy()
            assert abs(y[2] - y[1]) < 20 * eps**3 and abs(y[1] - y[0]) < 20 * eps**3


def _line_frame(r: float) -> tuple[np.ndarray, np.ndarray]:
    """Atom 2 on the x axis at distance r from atom 0, ~r - 2.5 from atom 1 (always inside rcut)."""
    coord = np.array([[0.0, 0.0, 0.0], [2.5, 0.3, -0.2], [r, 0.0, 0.0]])
    return coord, np.array([0, 1, 1])


@pytest.mark.parametrize("type_one_side", [True, False])
def test_energy_exactly_constant_beyond_rcut(tiny_model, run_model, type_one_side):
    """An isolated dimer: once the pair is at or beyond rcut both atoms see only padding."""
    model = tiny_model("float64", type_one_side=type_one_side)
    atype = np.array([0, 1])
    far = run_model(model, np.array([[0.0, 0.0, 0.0], [TINY_RCUT + 5.0, 0.0, 0.0]]), atype)
    for r in (TINY_RCUT, TINY_RCUT + 1e-12, TINY_RCUT + 1e-6, TINY_RCUT + 0.3, TINY_RCUT + 2.0):
        out = run_model(model, np.array([[0.0, 0.0, 0.0], [r, 0.0, 0.0]]), atype)
        assert out["energy"] == far["energy"], r
        assert np.all(out["force"] == 0.0), r
    # the isolated energy is not just the bias: padding carries -davg/dstd through the nets
    assert abs(far["energy"] - model.fitting.bias_atom_e.sum().item()) > 1e-6
    # approaching rcut from inside: E and F go to the isolated values as delta^3 and delta^2 (C2 switch)
    def gap(delta):
        out = run_model(model, np.array([[0.0, 0.0, 0.0], [TINY_RCUT - delta, 0.0, 0.0]]), atype)
        return abs(out["energy"] - far["energy"]), np.abs(out["force"]).max()

    e0, f0 = gap(0.1)
    assert e0 > 1e-8 and f0 > 1e-7, "the pair must interact inside rcut"
    for delta in (1e-2, 1e-3, 1e-4):
        e, f = gap(delta)
        assert e <= 10 * e0 * (delta / 0.1) ** 3 + 1e-13, (delta, e)
        assert f <= 10 * f0 * (delta / 0.1) ** 2 + 1e-13, (delta, f)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_energy_and_force_continuous_across_rcut(tiny_model, run_model, precision):
    """One pair crosses rcut while the others stay inside: jumps across rcut vanish with the step."""
    model = tiny_model(precision)
    steps = (1e-2, 1e-4) if precision == "float64" else (1e-1, 1e-3)
    jumps = []
    for delta in steps:
        inside = run_model(model, *_line_frame(TINY_RCUT - delta))
        outside = run_model(model, *_line_frame(TINY_RCUT + delta))
        jumps.append((abs(inside["energy"] - outside["energy"]), np.abs(inside["force"] - outside["force"]).max()))
    (e_big, f_big), (e_small, f_small) = jumps
    assert e_big > 0 and f_big > 0
    # smooth: linear in delta (factor 100 smaller); a discontinuity would not shrink
    tol_e = 1e-12 if precision == "float64" else 2e-5
    assert e_small <= e_big / 30 + tol_e
    assert f_small <= f_big / 30 + tol_e


# ----------------------------------------------------------------------------------------------------------------
# type handling
# ----------------------------------------------------------------------------------------------------------------


def _two_pairs(offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two type-0 atoms and a rigid type-1 pair moved by ``offset``; all 6 distances well inside rcut."""
    coord = np.array([[0.0, 0.0, 0.0], [1.8, 0.0, 0.0], [0.5, 1.5, 0.0], [0.5, 1.5, 1.6]])
    coord[2:] += offset
    return coord, np.array([0, 0, 1, 1])


@pytest.mark.parametrize("type_one_side", [True, False])
def test_exclude_types_removes_pair_dependence(tiny_model, run_model, type_one_side):
    excl = tiny_model("float64", type_one_side=type_one_side, exclude_types=[[0, 1]])
    full = tiny_model("float64", type_one_side=type_one_side)
    offset = np.array([0.3, -0.2, 0.4])
    a0, a1 = run_model(excl, *_two_pairs(np.zeros(3))), run_model(excl, *_two_pairs(offset))
    # neither the type-0 atoms nor the type-1 atoms feel the rigid move of the type-1 pair
    np.testing.assert_allclose(a1["atom_energy"], a0["atom_energy"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(a1["force"], a0["force"], rtol=0, atol=1e-12)
    # the excluded model has no 0-1 forces: forces act along the same-type bonds only
    coord, _ = _two_pairs(np.zeros(3))
    for i, j in ((0, 1), (2, 3)):
        bond = coord[j] - coord[i]
        np.testing.assert_allclose(np.cross(a0["force"][i], bond), 0.0, atol=1e-12)
        np.testing.assert_allclose(a0["force"][i], -a0["force"][j], atol=1e-12)
    # the same weights without exclusion do depend on the 0-1 distances
    b0, b1 = run_model(full, *_two_pairs(np.zeros(3))), run_model(full, *_two_pairs(offset))
    assert abs(b1["energy"] - b0["energy"]) > 1e-4
    assert abs(b0["energy"] - a0["energy"]) > 1e-4


def test_exclude_types_forces_match_finite_differences(fd_forces, tiny_model, random_frame, run_model):
    model = tiny_model("float64", exclude_types=[[1, 1]])
    coord, atype, box = random_frame(seed=12, natoms=6, periodic=True)
    ref = run_model(model, coord, atype, box)
    h = 1e-5
    fd = fd_forces(lambda c: run_model(model, c, atype, box, virial=False)["energy"], coord, h)
    np.testing.assert_allclose(ref["force"], fd, rtol=0, atol=1e-7)


def test_type_one_side_false_uses_center_neighbor_pair_nets(tiny_model, random_frame, run_model):
    """Net K = t_i + ntypes * t_j (DeePMD layout): perturbing the (center 0, neighbor 1) net changes only
    type-0 atomic energies; with type_one_side the neighbor-type-1 net changes every atom."""
    coord, atype, box = random_frame(seed=13, natoms=6, periodic=True)
    model = tiny_model("float64", type_one_side=False)
    assert len(model.descriptor.embeddings) == 4
    ref = run_model(model, coord, atype, box)
    with torch.no_grad():
        model.descriptor.embeddings[0 + 2 * 1].layers[0].bias.add_(0.5)
    out = run_model(model, coord, atype, box)
    changed = np.abs(out["atom_energy"] - ref["atom_energy"]) > 1e-8
    np.testing.assert_array_equal(changed, atype == 0)

    model = tiny_model("float64", type_one_side=True)
    assert len(model.descriptor.embeddings) == 2
    ref = run_model(model, coord, atype, box)
    with torch.no_grad():
        model.descriptor.embeddings[1].layers[0].bias.add_(0.5)
    out = run_model(model, coord, atype, box)
    assert np.all(np.abs(out["atom_energy"] - ref["atom_energy"]) > 1e-8)


@pytest.mark.parametrize("type_one_side", [True, False], ids=["one_side", "pair_nets"])
def test_force_constants_are_symmetric_and_match_finite_differences(tiny_model, random_frame, type_one_side):
    """Differentiating the closed-form forces with respect to the coordinates (force constants, as for
    phonons) gives the symmetric Hessian -d2E/dr2, equal to finite differences of the forces."""
    from dpfit.data.neighbor import build_neighbor_list

    model = tiny_model("float64", type_one_side=type_one_side)
    coord, atype, box = random_frame(seed=12, natoms=5, periodic=True)
    nl = build_neighbor_list(coord, atype, box, model.rcut, model.sel, warn=False)
    inputs = dict(atype=torch.from_numpy(atype)[None], nlist=torch.from_numpy(nl.nlist)[None],
                  box=torch.from_numpy(box)[None], shift=torch.from_numpy(nl.shift)[None])

    def forces(c: torch.Tensor) -> torch.Tensor:
        return model(c[None], **inputs, do_force=True, create_graph=True)["force"][0].reshape(-1)

    x = torch.from_numpy(coord).requires_grad_(True)
    jac = torch.stack([torch.autograd.grad(f, x, retain_graph=True)[0].reshape(-1) for f in forces(x)])
    assert jac.abs().max() > 0.05, "force constants too small for a meaningful check"
    torch.testing.assert_close(jac, jac.T, rtol=0, atol=1e-10)
    h = 1e-5
    fd = torch.empty_like(jac)
    with torch.no_grad():
        for k in range(x.numel()):
            step = torch.zeros(x.numel(), dtype=torch.float64)
            step[k] = h
            fd[:, k] = (forces(x.detach() + step.reshape(x.shape)) - forces(x.detach() - step.reshape(x.shape))) / (2 * h)
    torch.testing.assert_close(jac, fd, rtol=0, atol=1e-6)
