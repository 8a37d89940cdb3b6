"""freeze.py: the TorchScript model equals the checkpoint, in a process where dpfit cannot be imported
(with ``kernels=on`` that process loads dpfit's op library with torch.ops.load_library, nothing else)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dpfit.data.neighbor import build_neighbor_list
from dpfit.io.export import freeze, torch_neighbor_list

REPO = Path(__file__).resolve().parents[1]

LOADER = r"""
import sys, json
sys.modules["dpfit"] = None  # any import of dpfit now fails
import numpy as np, torch
if len(sys.argv) > 3:  # a file whose CPU path calls dpfit's op library
    torch.ops.load_library(sys.argv[3])
m = torch.jit.load(sys.argv[1])
r = np.load(sys.argv[2])
out = {}
for f in range(len(r["coord"])):
    kw = {}
    if "box" in r.files:
        kw["box"] = torch.tensor(r["box"][f], dtype=torch.float64)
    if "fparam" in r.files:
        kw["fparam"] = torch.tensor(r["fparam"][f]); kw["aparam"] = torch.tensor(r["aparam"][f])
    res = m(torch.tensor(r["coord"][f], dtype=torch.float64), torch.tensor(r["atype"]), **kw)
    for k in ("energy", "force", "virial", "atom_energy"):
        out.setdefault(k, []).append(res[k].detach().numpy().tolist())
print(json.dumps({"type_map": m.get_type_map(), **out}))
"""


def _frozen_outputs(model_file: Path, reference: Path, library: str | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", LOADER, str(model_file), str(reference), *([library] if library else [])],
                          capture_output=True, text=True, cwd="/", timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("kernels", ["off", "on"])
@pytest.mark.parametrize("fixture", ["water", pytest.param("cho", marks=pytest.mark.slow)])
def test_frozen_model_equals_checkpoint_without_dpfit(tmp_path, water_fixture, cho_fixture, fixture, kernels):
    folder = water_fixture if fixture == "water" else cho_fixture
    refs = {"water": ["reference_data_3.npz"], "cho": ["reference_C3H3O4.npz", "reference_C4H3O1.npz"]}[fixture]
    library = None
    if kernels == "on":
        from dpfit.model.kernels import load_library

        library = load_library(required=False)
        if library is None:
            pytest.skip("the op library is unavailable")
    out = tmp_path / "model.pth"
    proc = subprocess.run([sys.executable, str(REPO / "freeze.py"), f"ckpt_path={folder / 'model.ckpt.pt'}",
                           f"output={out}", f"kernels={kernels}", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert ("op library" in proc.stdout) == (kernels == "on")
    if kernels == "on":  # without the library the file does not load
        bare = subprocess.run([sys.executable, "-c", LOADER, str(out), str(folder / refs[0])], capture_output=True,
                              text=True, cwd="/", timeout=300)
        assert bare.returncode != 0 and "dpfit::" in bare.stderr
        assert "load_libdpfit_ops_so_first_LAMMPS_DP_PLUGIN_PATH" in bare.stderr  # (the hint, docs/lammps.md)
    for ref_name in refs:
        ref = np.load(folder / ref_name)
        got = _frozen_outputs(out, folder / ref_name, library)
        for key in ("energy", "force", "virial", "atom_energy"):
            np.testing.assert_allclose(np.array(got[key]), ref[key], rtol=1e-10, atol=1e-10, err_msg=key)
    assert got["type_map"] in (["O", "H"], ["C", "H", "O"])


def _pairs(nlist, shift):
    return sorted((i, int(j), tuple(int(x) for x in s)) for i in range(len(nlist))
                  for j, s in zip(nlist[i], shift[i]) if j >= 0)


def test_torch_neighbor_list_matches_vesin():
    rng = np.random.default_rng(3)
    box = np.array([[5.0, 0.0, 0.0], [1.7, 4.5, 0.0], [-1.1, 0.8, 4.2]])
    coord = rng.uniform(-0.5, 1.5, size=(14, 3)) @ box  # atoms outside the cell too
    atype = rng.integers(0, 2, size=14)
    rcut, sel = 4.8, [60, 60]
    ref = build_neighbor_list(coord, atype, box, rcut, sel)
    wrapped, nl, sh = torch_neighbor_list(torch.tensor(coord), torch.tensor(atype), torch.tensor(box), rcut, sel)
    # same pair vectors (the torch list works on wrapped coordinates)
    d_ref = {(i, int(j)): [] for i in range(14) for j in ref.nlist[i] if j >= 0}
    for i in range(14):
        for j, s in zip(ref.nlist[i], ref.shift[i]):
            if j >= 0:
                d_ref[(i, int(j))].append(np.round(coord[j] + s @ box - coord[i], 8).tolist())
    d_t = {k: [] for k in d_ref}
    w = wrapped.numpy()
    for i in range(14):
        for j, s in zip(nl[i].numpy(), sh[i].numpy()):
            if j >= 0:
                d_t.setdefault((i, int(j)), []).append(np.round(w[j] + s @ box - w[i], 8).tolist())
    assert {k: sorted(v) for k, v in d_t.items()} == {k: sorted(v) for k, v in d_ref.items()}
    # nearest first within each type section, like the vesin-based list
    assert (nl.numpy() >= 0).sum() == (ref.nlist >= 0).sum()


def test_freeze_refuses_to_overwrite(tmp_path, tiny_model):

    model = tiny_model()
    out = tmp_path / "m.pth"
    out.write_text("user file")
    with pytest.raises(FileExistsError, match="exists"):
        freeze(model, out)
    assert out.read_text() == "user file"
    freeze(model, out, overwrite=True)
    assert torch.jit.load(str(out)).get_type_map() == model.type_map
