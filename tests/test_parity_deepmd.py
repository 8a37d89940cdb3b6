"""Parity with DeePMD-kit 3.2.0: the shared fixtures reproduced to float64 round-off, plus checks on unseen inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dpfit.data.batch import collate, make_sample, model_inputs
from dpfit.data.neighbor import build_neighbor_list
from dpfit.data.system import DeepmdSystem
from dpfit.io.checkpoint import load_model
from dpfit.io.deepmd_checkpoint import load_deepmd_checkpoint
from dpfit.model import pair_vectors

pytestmark = pytest.mark.usefixtures("single_torch_thread")

KEYS = ("energy", "force", "virial", "atom_energy", "atom_virial")
RTOL, ATOL = 1e-10, 1e-12
CHO_SYSTEMS = ("C3H3O4", "C4H3O1")


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def water_model(water_fixture):
    return load_deepmd_checkpoint(water_fixture / "model.ckpt.pt")


@pytest.fixture(scope="session")
def water_ref(water_fixture):
    return _load_npz(water_fixture / "reference_data_3.npz")


@pytest.fixture(scope="session")
def water_out(water_model, water_ref, run_model):
    """Model outputs for the 10 reference frames (float32 inputs cast to float64 first)."""
    ref = water_ref
    return run_model(water_model, ref["coord"], ref["atype"], ref["box"].reshape(-1, 3, 3))


@pytest.fixture(scope="session")
def cho_model(cho_fixture):
    return load_deepmd_checkpoint(cho_fixture / "model.ckpt.pt")


@pytest.fixture(scope="session")
def cho_refs(cho_fixture):
    return {name: _load_npz(cho_fixture / f"reference_{name}.npz") for name in CHO_SYSTEMS}


def _descriptor(model, coord, atype, box):
    """Descriptor of one frame (nloc, dim) via pair_vectors + model.descriptor."""
    coord = np.asarray(coord, dtype=np.float64)
    nl = build_neighbor_list(coord, atype, box, model.rcut, model.sel)
    box_t = None if box is None else torch.from_numpy(np.asarray(box, dtype=np.float64).reshape(1, 3, 3))
    shift_t = None if box is None else torch.from_numpy(nl.shift[None])
    diff, mask = pair_vectors(
        torch.from_numpy(coord[None]), box_t, torch.from_numpy(nl.nlist[None]), shift_t, far=model.rcut + 1.0
    )
    with torch.no_grad():
        return model.descriptor(diff, mask, torch.from_numpy(np.asarray(atype)[None])).numpy()[0]


# ----------------------------------------------------------------------------------------------------------------
# the fixtures
# ----------------------------------------------------------------------------------------------------------------


def test_water_model_config(water_model):
    assert water_model.type_map == ["O", "H"]
    assert water_model.sel == [46, 92]
    assert water_model.rcut == 6.0
    assert water_model.dtype == torch.float64
    assert water_model.descriptor.dim_out == 1600


@pytest.mark.parametrize("key", KEYS)
def test_water_fixture_parity(water_out, water_ref, key):
    ref = water_ref[key]
    got = water_out[key].reshape(ref.shape)
    assert ref.shape[0] == 10
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


def test_water_descriptor_parity(water_model, water_ref):
    ref = water_ref
    desc = _descriptor(water_model, ref["coord"][0], ref["atype"], ref["box"][0].reshape(3, 3))
    assert desc.shape == ref["descriptor_frame0"].shape == (192, 1600)
    np.testing.assert_allclose(desc, ref["descriptor_frame0"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("system", CHO_SYSTEMS)
def test_cho_fixture_parity(cho_model, cho_refs, system, run_model):
    ref = cho_refs[system]
    assert "box" not in ref
    out = run_model(cho_model, ref["coord"], ref["atype"], None, fparam=ref["fparam"], aparam=ref["aparam"])
    assert len(out["energy"]) == 10
    for key in KEYS:
        np.testing.assert_allclose(out[key].reshape(ref[key].shape), ref[key], rtol=RTOL, atol=ATOL, err_msg=key)


@pytest.mark.parametrize("system", CHO_SYSTEMS)
def test_cho_descriptor_parity(cho_model, cho_refs, system):
    ref = cho_refs[system]
    desc = _descriptor(cho_model, ref["coord"][0], ref["atype"], None)
    assert desc.shape == ref["descriptor_frame0"].shape
    np.testing.assert_allclose(desc, ref["descriptor_frame0"], rtol=RTOL, atol=ATOL)


def test_load_model_reads_deepmd_checkpoints(cho_fixture, cho_model, cho_refs, run_model):
    """The generic loader recognises a DeePMD-kit checkpoint and returns the same model in eval mode."""
    model = load_model(cho_fixture / "model.ckpt.pt")
    assert not model.training
    assert model.type_map == ["C", "H", "O"]
    assert not model.descriptor.type_one_side and len(model.descriptor.embeddings) == 9
    assert model.fitting.numb_fparam == 1 and model.fitting.numb_aparam == 1
    ref = cho_refs["C4H3O1"]
    out = run_model(model, ref["coord"][:2], ref["atype"], None, fparam=ref["fparam"][:2], aparam=ref["aparam"][:2])
    np.testing.assert_allclose(out["energy"], ref["energy"][:2], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out["force"], ref["force"][:2], rtol=RTOL, atol=ATOL)


def test_data_pipeline_reproduces_water_fixture(shared_dir, water_model, water_ref):
    """deepmd/npy folder -> make_sample -> collate -> model_inputs -> model equals the fixture (frames 0..9 of
    data_3 are the reference frames)."""
    system = DeepmdSystem(shared_dir / "data" / "water" / "data_3", water_model.type_map)
    batch = collate([make_sample(system, i, water_model.rcut, water_model.sel) for i in (0, 3)])
    assert batch["n_dropped"] == 0
    out = water_model(**model_inputs(batch), do_virial=True)
    for key in ("energy", "force", "virial"):
        ref = water_ref[key][[0, 3]]
        got = out[key].detach().numpy().reshape(ref.shape)
        np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL, err_msg=key)


# ----------------------------------------------------------------------------------------------------------------
# unseen inputs
# ----------------------------------------------------------------------------------------------------------------


def test_water_model_on_training_frames_is_accurate(shared_dir, water_model):
    """Frames of data_0 (training data, not the fixture frames): the trained model is close to the labels
    (DeePMD-kit reports energy RMSE/atom 3.4e-3 eV and force RMSE 0.23 eV/Å on data_3)."""
    system = DeepmdSystem(shared_dir / "data" / "water" / "data_0", water_model.type_map)
    batch = collate([make_sample(system, i, water_model.rcut, water_model.sel) for i in (5, 41)])
    out = water_model(**model_inputs(batch))
    e_err = (out["energy"].detach() - batch["energy"]).abs().max().item() / batch["natoms"]
    f_rmse = (out["force"].detach() - batch["force"]).pow(2).mean().sqrt().item()
    assert e_err < 0.02, e_err
    assert f_rmse < 0.5, f_rmse


def _cho_frame(cho_refs):
    ref = cho_refs["C3H3O4"]
    return ref["coord"][0].astype(np.float64), ref["atype"], ref["fparam"][0], ref["aparam"][0]


def test_cho_model_depends_on_fparam_and_aparam(cho_model, cho_refs, run_model):
    coord, atype, fparam, aparam = _cho_frame(cho_refs)
    base = run_model(cho_model, coord, atype, fparam=fparam, aparam=aparam)
    new_f = run_model(cho_model, coord, atype, fparam=fparam + 0.7, aparam=aparam)
    new_a = run_model(cho_model, coord, atype, fparam=fparam, aparam=aparam[::-1] + 0.2)
    for other in (new_f, new_a):
        assert abs(other["energy"] - base["energy"]) > 1e-3
        assert np.abs(other["force"] - base["force"]).max() > 1e-4
    # fparam is broadcast to every atom: changing it changes every atomic energy
    assert np.all(np.abs(new_f["atom_energy"] - base["atom_energy"]) > 1e-8)
    # aparam is per atom: changing it for one atom changes that atom's energy only
    one = aparam.copy()
    one[4] += 0.5
    new_one = run_model(cho_model, coord, atype, fparam=fparam, aparam=one)
    changed = np.abs(new_one["atom_energy"] - base["atom_energy"]) > 1e-12
    np.testing.assert_array_equal(changed, np.arange(len(atype)) == 4)


def test_cho_model_forces_match_finite_differences_at_new_parameters(fd_forces, cho_model, cho_refs, run_model):
    coord, atype, fparam, aparam = _cho_frame(cho_refs)
    fparam = fparam * 0.0 + 2.6
    aparam = np.linspace(0.1, 0.9, len(atype)).reshape(-1, 1)
    ref = run_model(cho_model, coord, atype, fparam=fparam, aparam=aparam)
    h = 1e-5
    fd = fd_forces(lambda c: run_model(cho_model, c, atype, fparam=fparam, aparam=aparam, virial=False)["energy"],
                   coord, h)
    # energies are ~1e4 eV: round-off in E+ - E- is ~1e-12 * 1e4 / 1e-5 ~ 1e-6 eV/Å
    np.testing.assert_allclose(ref["force"], fd, rtol=0, atol=2e-5)


def test_water_model_is_extensive_on_a_supercell(shared_dir, water_model, run_model):
    """A 2x1x1 supercell of an unseen data_3 frame: twice the energy and virial, the same force and atomic
    energy on each periodic copy of an atom."""
    system = DeepmdSystem(shared_dir / "data" / "water" / "data_3", water_model.type_map)
    frame = system.frame(25)
    coord, atype, box = frame["coord"], frame["atype"], frame["box"]
    single = run_model(water_model, coord, atype, box)
    super_coord = np.concatenate([coord, coord + box[0]])
    super_box = box * np.array([[2.0], [1.0], [1.0]])
    double = run_model(water_model, super_coord, np.concatenate([atype, atype]), super_box)
    n = len(atype)
    np.testing.assert_allclose(double["energy"], 2 * single["energy"], rtol=1e-12)
    np.testing.assert_allclose(double["atom_energy"][:n], single["atom_energy"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(double["atom_energy"][n:], single["atom_energy"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(double["force"][:n], single["force"], rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(double["force"][n:], single["force"], rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(double["virial"], 2 * single["virial"], rtol=1e-10, atol=1e-10)


def test_float32_water_model_agrees_with_float64(water_fixture, water_ref, run_model):
    model = load_deepmd_checkpoint(water_fixture / "model.ckpt.pt", precision="float32")
    assert model.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ref = water_ref
    out = run_model(model, ref["coord"][:2], ref["atype"], ref["box"][:2].reshape(-1, 3, 3))
    np.testing.assert_allclose(out["energy"], ref["energy"][:2], rtol=1e-5)
    np.testing.assert_allclose(out["force"], ref["force"][:2], rtol=0, atol=1e-3)
    np.testing.assert_allclose(out["virial"], ref["virial"][:2], rtol=0, atol=1e-2)


def test_float32_cho_model_agrees_with_float64(cho_fixture, cho_refs, run_model):
    model = load_deepmd_checkpoint(cho_fixture / "model.ckpt.pt", precision="float32")
    ref = cho_refs["C4H3O1"]
    out = run_model(model, ref["coord"], ref["atype"], None, fparam=ref["fparam"], aparam=ref["aparam"])
    np.testing.assert_allclose(out["energy"], ref["energy"], rtol=1e-5)
    np.testing.assert_allclose(out["force"], ref["force"], rtol=0, atol=1e-3)
