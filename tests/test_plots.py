"""Figures: parity plots, force-error histograms, lcurve.out plots (function and callback), test.py plots=true."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dpfit.inference.lcurve_callback import LCurvePlot
from dpfit.inference.plots import error_histograms, lcurve_plot, parity_plots, parity_summary, read_lcurve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    """A readable, non-empty PNG image."""
    import matplotlib.image

    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # not blank


def _result(name, nf, natoms, pbc, seed, labels=("energy", "force", "virial")):
    rng = np.random.default_rng(seed)
    r = {"name": name, "natoms": natoms, "nframes": nf, "pbc": pbc,
         "atype": np.arange(natoms) % 2,
         "pred_energy": rng.normal(size=nf) - 10 * natoms, "pred_force": rng.normal(size=(nf, natoms, 3)),
         "pred_virial": rng.normal(size=(nf, 9)), "pred_atom_energy": rng.normal(size=(nf, natoms))}
    for key in labels:
        r[key] = r[f"pred_{key}"] + 0.05 * rng.normal(size=r[f"pred_{key}"].shape)
    return r


def test_parity_plots_and_histograms(tmp_path):
    results = [_result("data/sys_a", 5, 6, True, 0), _result("data/sys_b", 4, 8, False, 1)]
    paths = parity_plots(results, tmp_path / "out" / "detail")
    assert [p.name for p in paths] == ["detail.parity_e_peratom.png", "detail.parity_f.png",
                                       "detail.parity_v_peratom.png"]
    for p in paths:
        assert_png(p)
    (hist,) = error_histograms(results, tmp_path / "out" / "detail", type_map=["Cu", "Ni"])
    assert hist.name == "detail.hist_f_error.png"
    assert_png(hist)
    (summary,) = parity_summary(results, tmp_path / "parity.png")
    assert_png(summary)
    # virial only from periodic systems; no label at all: no plot
    only_nopbc = parity_plots([results[1]], tmp_path / "nopbc")
    assert [p.name for p in only_nopbc] == ["nopbc.parity_e_peratom.png", "nopbc.parity_f.png"]
    unlabelled = _result("x", 2, 3, True, 2, labels=())
    assert parity_plots([unlabelled], tmp_path / "none") == [] and parity_summary([unlabelled], tmp_path / "n.png") == []
    assert error_histograms([unlabelled], tmp_path / "none") == []
    no_types = {k: v for k, v in results[0].items() if k != "atype"}
    with pytest.raises(ValueError, match="atype"):
        error_histograms([no_types], tmp_path / "x")


DPFIT_LCURVE = """#        step    rmse_val    rmse_trn  rmse_e_val  rmse_e_trn  rmse_f_val  rmse_f_trn          lr
      2     1.39e+01    1.50e+01    4.20e-02    4.81e-02    4.39e-01    4.74e-01    1.00e-03
      4     1.20e+01         nan    3.13e-02    3.05e-02    3.80e-01         nan    9.00e-04
      6     1.01e+01    1.12e+01    2.81e-02    2.66e-02    3.20e-01    3.51e-01    8.10e-04
"""

# DeePMD-kit 3.2 layout with a virial column pair and wide spacing
DEEPMD_LCURVE = """#  step      rmse_val    rmse_trn    rmse_e_val  rmse_e_trn    rmse_f_val  rmse_f_trn    rmse_v_val  rmse_v_trn         lr
# If there is no available reference data, rmse_*_{val,trn} will print nan
      0      2.72e+01    2.59e+01      1.17e+00    1.09e+00      8.60e-01    8.20e-01      1.1e-01     1.0e-01    1.0e-03
"""


@pytest.mark.parametrize("text, panels", [(DPFIT_LCURVE, 4), (DEEPMD_LCURVE, 5)])
def test_lcurve_plot(tmp_path, text, panels):
    path = tmp_path / "lcurve.out"
    path.write_text(text)
    names, rows = read_lcurve(path)
    assert names[0] == "step" and names[-1] == "lr" and rows.shape[1] == len(names)
    groups = {n.rsplit("_", 1)[0] for n in names[1:] if n != "lr"}
    assert len(groups) + 1 == panels
    out = lcurve_plot(path, tmp_path / "plots" / "lcurve.png")
    assert out == tmp_path / "plots" / "lcurve.png"
    assert_png(out)


def test_lcurve_plot_empty_and_callback(tmp_path):
    header_only = tmp_path / "empty" / "lcurve.out"
    header_only.parent.mkdir()
    header_only.write_text(DPFIT_LCURVE.splitlines()[0] + "\n")
    with pytest.raises(ValueError, match="no rows"):
        lcurve_plot(header_only, tmp_path / "x.png")
    callback = LCurvePlot()
    # no validation ran (header only) or no file at all: skipped without an error
    callback.on_fit_end(SimpleNamespace(default_root_dir=str(header_only.parent)), None)
    callback.on_fit_end(SimpleNamespace(default_root_dir=str(tmp_path / "missing")), None)
    assert callback.path is None and not (header_only.parent / "lcurve.png").exists()
    run = tmp_path / "run"
    run.mkdir()
    (run / "lcurve.out").write_text(DPFIT_LCURVE)
    callback.on_fit_end(SimpleNamespace(default_root_dir=str(run)), None)
    assert callback.path == run / "lcurve.png"
    assert_png(run / "lcurve.png")


# ---------------------------------------------------------------------------------------------- test.py plots=true
def _write_checkpoint(model, path: Path) -> None:
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": {"model_config": model.config}, "state_dict": state}, path)


def _write_system(folder: Path, model, run_model, random_frame, nframes=3, seed=0) -> None:
    coords, boxes, energies, forces, virials = [], [], [], [], []
    atype = random_frame(seed=seed, natoms=6)[1]  # one system: the same types in every frame
    for k in range(nframes):
        coord, _, box = random_frame(seed=seed + k, natoms=6)
        out = run_model(model, coord, atype, box)
        rng = np.random.default_rng(k)
        coords.append(coord.reshape(-1))
        boxes.append(box.reshape(-1))
        energies.append(out["energy"] + 0.01 * rng.normal())
        forces.append((out["force"] + 0.01 * rng.normal(size=out["force"].shape)).reshape(-1))
        virials.append(out["virial"].reshape(-1))
    folder.mkdir(parents=True)
    np.savetxt(folder / "type.raw", atype, fmt="%d")
    s = folder / "set.000"
    s.mkdir()
    for name, value in (("coord", coords), ("box", boxes), ("energy", energies), ("force", forces),
                        ("virial", virials)):
        np.save(s / f"{name}.npy", np.array(value))


@pytest.mark.usefixtures("single_torch_thread")
def test_test_py_writes_plots(tmp_path, tiny_model, run_model, random_frame):
    from dpfit.cli.test import run

    model = tiny_model()
    ckpt = tmp_path / "model.ckpt"
    _write_checkpoint(model, ckpt)
    system = tmp_path / "data" / "sys"
    _write_system(system, model, run_model, random_frame)

    def cfg(detail):
        return OmegaConf.create({"ckpt_path": str(ckpt), "systems": [str(system)], "batch_size": 2,
                                 "detail_file": detail, "precision": None, "device": "cpu", "plots": True})

    out_dir = tmp_path / "run"
    run(cfg(str(tmp_path / "results" / "water")), out_dir=out_dir)
    assert_png(out_dir / "parity.png")  # as before: all panels in the run folder
    for suffix in ("parity_e_peratom", "parity_f", "parity_v_peratom", "hist_f_error"):
        assert_png(tmp_path / "results" / f"water.{suffix}.png")  # next to the detail files
    assert (tmp_path / "results" / "water.e.out").is_file()

    out_dir2 = tmp_path / "run2"
    run(cfg(None), out_dir=out_dir2)
    for suffix in ("parity_e_peratom", "parity_f", "parity_v_peratom", "hist_f_error"):
        assert_png(out_dir2 / f"test.{suffix}.png")
