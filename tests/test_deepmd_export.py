"""Export to DeePMD-kit: the checkpoint (format=deepmd) and the TorchScript .pth its C++ side loads (format=lammps).

What needs no DeePMD-kit: the checkpoint's keys, shapes and values (a DeePMD checkpoint imported and
exported again is bit-identical), and the .pth's interface called as DeePMD-kit's C++ does after
``torch.jit.load``. ``scripts/lammps_check.sh`` runs the files in the real LAMMPS and ``dp``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import vesin

from dpfit.io.deepmd_checkpoint import load_deepmd_checkpoint
from dpfit.io.deepmd_export import (
    NotRepresentableError,
    deepmd_model_params,
    deepmd_passthrough,
    deepmd_state_dict,
    export_deepmd_checkpoint,
)
from dpfit.io.deepmd_pth import freeze_for_deepmd
from dpfit.io.freeze_formats import freeze_checkpoint

REPO = Path(__file__).resolve().parents[1]

#: what DeePMD-kit's C++ DeepPotPT runs on a loaded .pth, with the type of each answer
CPP_METHODS = {"has_message_passing": bool, "get_rcut": float, "get_ntypes": int, "get_dim_fparam": int,
               "get_dim_aparam": int, "is_aparam_nall": bool, "get_type_map": list}

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_same_state(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        if key == "_extra_state":
            assert got[key] == value
            continue
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("name", ["water", "cho"])
def test_deepmd_checkpoint_round_trip_is_bit_identical(name, water_fixture, cho_fixture):
    """Import a DeePMD-kit checkpoint, export it again: every tensor bit-identical, same _extra_state."""
    folder = water_fixture if name == "water" else cho_fixture
    source = _load(folder / "model.ckpt.pt")["model"]
    model = load_deepmd_checkpoint(folder / "model.ckpt.pt")
    state = deepmd_state_dict(model, deepmd_passthrough(source), source["_extra_state"]["train_infos"])
    _assert_same_state(state, source)
    # without the source, the params dpfit models are still DeePMD's (precision spelled out)
    params = deepmd_model_params(model)
    want = source["_extra_state"]["model_params"]
    assert params["type_map"] == want["type_map"]
    for section in ("descriptor", "fitting_net"):
        for key, value in params[section].items():
            if key == "precision":
                assert want[section][key] in ("default", value)
            else:
                assert want[section][key] == value, (section, key)


def test_freeze_cli_writes_the_deepmd_checkpoint(tmp_path, cho_fixture):
    out = tmp_path / "model.ckpt.pt"
    proc = subprocess.run([sys.executable, str(REPO / "freeze.py"), f"ckpt_path={cho_fixture / 'model.ckpt.pt'}",
                           f"output={out}", "format=deepmd", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    saved = _load(out)
    assert list(saved) == ["model"]
    _assert_same_state(saved["model"], _load(cho_fixture / "model.ckpt.pt")["model"])
    # DeePMD stores its two names of each net as one tensor; so does the export
    key = "model.Default.atomic_model.fitting_net.filter_layers.{}.0.layers.0.matrix"
    assert saved["model"][key.format("networks")].data_ptr() == saved["model"][key.format("_networks")].data_ptr()


def test_dpfit_model_exports_and_reimports(tmp_path, tiny_model, random_frame, run_model):
    """A dpfit model (pair nets, exclusions, fparam/aparam, resnet_dt) -> DeePMD checkpoint -> same model."""
    model = tiny_model(type_one_side=False, exclude_types=[[0, 1]], resnet_dt=True, numb_fparam=2, numb_aparam=1)
    out = export_deepmd_checkpoint(model, tmp_path / "m.ckpt.pt", train_infos={"lr": 1e-3, "step": 7})
    state = _load(out)["model"]
    params = state["_extra_state"]["model_params"]
    assert params["descriptor"]["exclude_types"] == [[0, 1]] and params["descriptor"]["type_one_side"] is False
    assert params["fitting_net"]["numb_fparam"] == 2 and params["fitting_net"]["numb_aparam"] == 1
    assert state["_extra_state"]["train_infos"] == {"lr": 1e-3, "step": 7}
    p = "model.Default.atomic_model."
    assert state[p + "descriptor.sea.mean"].shape == (2, 26, 4)
    assert state[p + "descriptor.sea.filter_layers.networks.3.layers.1.idt"].shape == (8,)
    assert state[p + "fitting_net.filter_layers.networks.1.layers.0.matrix"].shape == (4 * 8 + 3, 8)
    assert state[p + "fitting_net.fparam_inv_std"].shape == (2,)
    assert torch.equal(state[p + "out_bias"].reshape(-1), model.fitting.bias_atom_e)
    assert not state[p + "fitting_net.bias_atom_e"].any()
    assert state["model.Default.min_nbor_dist"].item() == -1.0  # unknown: dp compress asks for -t
    assert len([k for k in state if ".compress_data." in k]) == 4
    back = load_deepmd_checkpoint(out)
    coord, atype, box = random_frame(seed=4, natoms=7)
    kw = {"fparam": np.array([0.3, -1.0]), "aparam": np.linspace(0, 1, 7)[:, None]}
    a, b = run_model(model, coord, atype, box, **kw), run_model(back, coord, atype, box, **kw)
    for key in ("energy", "force", "virial", "atom_virial"):
        assert np.array_equal(a[key], b[key]), key


def test_export_refuses_existing_output_and_unrepresentable_models(tmp_path, tiny_model):
    model = tiny_model()
    for fmt, write in (("deepmd", export_deepmd_checkpoint), ("lammps", freeze_for_deepmd)):
        out = tmp_path / f"{fmt}.out"
        out.write_text("user file")
        with pytest.raises(FileExistsError, match="exists.*overwrite=true"):
            write(model, out)
        assert out.read_text() == "user file"
    bad = tiny_model()
    bad.config["descriptor"]["activation_function"] = "gelu"
    with pytest.raises(NotRepresentableError, match=r"model\.descriptor\.activation_function has no DeePMD-kit"):
        export_deepmd_checkpoint(bad, tmp_path / "new.pt")
    bad = tiny_model()
    bad.fitting.nets[0].layers[1].kind = 0  # an 8 -> 8 layer without DeePMD's residual
    with pytest.raises(NotRepresentableError, match="fitting_net net 0 layer 1 .*layer rule"):
        freeze_for_deepmd(bad, tmp_path / "new.pth")
    assert not (tmp_path / "new.pt").exists() and not (tmp_path / "new.pth").exists()


def test_freeze_checkpoint_format_errors(tmp_path, cho_fixture):
    with pytest.raises(ValueError, match="format='onnx': choose one of dpfit, lammps, deepmd"):
        freeze_checkpoint(cho_fixture / "model.ckpt.pt", tmp_path / "x", fmt="onnx")
    existing = tmp_path / "model.pth"
    existing.write_text("keep")
    with pytest.raises(FileExistsError, match="model.pth: exists"):
        freeze_checkpoint(cho_fixture / "model.ckpt.pt", existing, fmt="lammps")
    assert existing.read_text() == "keep"


# ----------------------------------------------------------------------------------------------------------
# the .pth for DeePMD-kit's C++ side (LAMMPS)
# ----------------------------------------------------------------------------------------------------------

def lammps_inputs(coord, atype, box, cutoff, seed=0, pad=5):
    """What LAMMPS hands DeePMD-kit: local atoms then ghost images (shuffled), and per local atom its
    neighbours within ``cutoff`` (rcut + skin) in random order with -1 entries mixed in.
    Returns extended_coord (1, nall*3), extended_atype (1, nall), nlist (1, nloc, n), mapping (1, nall)."""
    rng = np.random.default_rng(seed)
    nloc = len(coord)
    calc = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    if box is None:
        i, j = calc.compute(points=coord, box=np.zeros((3, 3)), periodic=False, quantities="ij")
        shifts = np.zeros((len(i), 3), dtype=np.int64)
    else:
        i, j, shifts = calc.compute(points=coord, box=box, periodic=True, quantities="ijS")
    ghosts = sorted({(int(b), *map(int, s)) for b, s in zip(j, shifts) if np.any(s)})
    order = rng.permutation(len(ghosts))
    ghosts = [ghosts[k] for k in order]
    index = {g: nloc + k for k, g in enumerate(ghosts)}
    ext = [coord] + ([np.array([coord[g[0]] + np.array(g[1:]) @ box for g in ghosts])] if ghosts else [])
    ext_coord = np.concatenate(ext)
    mapping = np.concatenate([np.arange(nloc), np.array([g[0] for g in ghosts], dtype=np.int64)])
    rows = [[] for _ in range(nloc)]
    for a, b, s in zip(i, j, shifts):
        rows[a].append(int(b) if not np.any(s) else index[(int(b), *map(int, s))])
    width = max(len(r) for r in rows) + pad
    nlist = np.full((nloc, width), -1, dtype=np.int64)
    for a, r in enumerate(rows):
        slots = rng.choice(width, size=len(r), replace=False)
        nlist[a, slots] = rng.permutation(r)
    return (torch.tensor(ext_coord.reshape(1, -1)), torch.tensor(atype[mapping])[None], torch.tensor(nlist)[None],
            torch.tensor(mapping)[None])


def _fold(extended: np.ndarray, mapping: np.ndarray, nloc: int) -> np.ndarray:
    out = np.zeros((nloc, extended.shape[-1]))
    np.add.at(out, mapping, extended)
    return out


def _check_lower_equals_forward(pth, coord, atype, box, fparam=None, aparam=None, skin=1.5, seed=0, wide=False):
    nloc = len(coord)
    fp = torch.tensor(fparam)[None] if fparam is not None else None
    ap = torch.tensor(aparam)[None] if aparam is not None else None
    full = pth(torch.tensor(coord).reshape(1, -1), torch.tensor(atype)[None],
               torch.tensor(box).reshape(1, 9) if box is not None else None, fp, ap, True)
    ext_coord, ext_atype, nlist, mapping = lammps_inputs(coord, atype, box, pth.get_rcut() + skin, seed=seed)
    if wide:  # wider than sel: cut at rcut, sorted and truncated inside
        assert nlist.shape[-1] > sum(pth.get_sel())
    low = pth.forward_lower(ext_coord, ext_atype, nlist, None, fp, ap, True)
    m = mapping[0].numpy()
    assert low["energy"].dtype == torch.float64 and low["energy"].shape == (1, 1)
    assert low["extended_force"].shape == (1, len(m), 3) and low["extended_virial"].shape == (1, len(m), 9)
    assert low["atom_energy"].shape == (1, nloc, 1)
    tol = {"rtol": 1e-10, "atol": 1e-10}
    np.testing.assert_allclose(low["energy"].numpy(), full["energy"].numpy(), **tol)
    np.testing.assert_allclose(low["virial"].numpy(), full["virial"].numpy(), **tol)
    np.testing.assert_allclose(low["atom_energy"].numpy(), full["atom_energy"].numpy(), **tol)
    np.testing.assert_allclose(_fold(low["extended_force"][0].numpy(), m, nloc), full["force"][0].numpy(), **tol)
    np.testing.assert_allclose(_fold(low["extended_virial"][0].numpy(), m, nloc), full["atom_virial"][0].numpy(),
                               **tol)
    return full


def test_lammps_pth_interface_and_values(tmp_path, cho_fixture):
    """The C++ loader's methods; forward equals DeePMD-kit's reference; forward_lower (unsorted, skin,
    -1 padded list) equals forward. Non-periodic, fparam + aparam, one net per type pair."""
    out = freeze_checkpoint(cho_fixture / "model.ckpt.pt", tmp_path / "model.pth", fmt="lammps")[0]
    pth = torch.jit.load(str(out))
    got = {name: getattr(pth, name)() for name in CPP_METHODS}
    assert got == {"has_message_passing": False, "get_rcut": 5.0, "get_ntypes": 3, "get_dim_fparam": 1,
                   "get_dim_aparam": 1, "is_aparam_nall": False, "get_type_map": ["C", "H", "O"]}
    assert all(isinstance(got[k], t) for k, t in CPP_METHODS.items())
    params = json.loads(pth.get_model_def_script())
    assert params["descriptor"]["sel"] == [8, 8, 8] and params["fitting_net"]["numb_fparam"] == 1
    ref = np.load(cho_fixture / "reference_C3H3O4.npz")
    for f in (0, 3):
        full = _check_lower_equals_forward(pth, ref["coord"][f].astype(np.float64), ref["atype"], None,
                                           ref["fparam"][f], ref["aparam"][f], seed=f)
        for key in ("energy", "force", "virial", "atom_energy", "atom_virial"):
            np.testing.assert_allclose(full[key].numpy().reshape(ref[key][f].shape), ref[key][f], rtol=1e-10,
                                       atol=1e-10, err_msg=key)


def test_lammps_pth_periodic_ghosts_and_sel_truncation(tmp_path, tiny_model, random_frame, run_model):
    """Periodic triclinic cell (ghosts are images), sel smaller than the neighbours within rcut: forward
    equals dpfit's own evaluation, forward_lower equals forward; float32 inputs give float64 energy."""
    model = tiny_model(sel=[5, 4])
    pth = torch.jit.load(str(freeze_for_deepmd(model, tmp_path / "t.pth")))
    coord, atype, box = random_frame(seed=2, natoms=12)
    want = run_model(model, coord, atype, box, allow_dropped=True)
    full = _check_lower_equals_forward(pth, coord, atype, box, skin=2.0, seed=1, wide=True)
    for key in ("energy", "force", "virial", "atom_virial"):
        np.testing.assert_allclose(full[key].numpy().reshape(want[key].shape), want[key], rtol=1e-10, atol=1e-10)
    low = pth.forward_lower(*[t.to(torch.float32) if t.is_floating_point() else t
                              for t in lammps_inputs(coord, atype, box, 5.0)[:3]], None, None, None, False)
    assert low["energy"].dtype == torch.float64 and low["extended_force"].dtype == torch.float32
    assert "extended_virial" not in low
    np.testing.assert_allclose(low["energy"].item(), full["energy"].item(), rtol=1e-5)


@pytest.mark.slow
def test_lammps_pth_water_fixture(tmp_path, water_fixture):
    out = freeze_checkpoint(water_fixture / "model.ckpt.pt", tmp_path / "model.pth", fmt="lammps")[0]
    pth = torch.jit.load(str(out))
    ref = np.load(water_fixture / "reference_data_3.npz")
    full = _check_lower_equals_forward(pth, ref["coord"][0].astype(np.float64), ref["atype"],
                                       ref["box"][0].astype(np.float64).reshape(3, 3), skin=2.0, wide=True)
    for key in ("energy", "force", "virial", "atom_energy", "atom_virial"):
        np.testing.assert_allclose(full[key].numpy().reshape(ref[key][0].shape), ref[key][0], rtol=1e-10,
                                   atol=1e-10, err_msg=key)
