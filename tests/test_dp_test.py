"""test.py (the ``dp test`` equivalent): printed errors, detail files, fparam/aparam systems, weighted averages."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from dpfit.data.system import DataError, load_systems
from dpfit.inference import (
    DETAIL_SUFFIXES,
    error_metrics,
    evaluate_system,
    format_metrics,
    weighted_average,
    write_detail_files,
)

REPO = Path(__file__).resolve().parents[1]

#: what DeePMD-kit 3.2.0 reports for the water fixture on data_3 (SPEC section 9)
WATER_RMSE_E_PER_ATOM = "3.354e-03"
WATER_RMSE_F = "2.320e-01"

VIRIAL_HEADER = (
    "data_vxx data_vxy data_vxz data_vyx data_vyy data_vyz data_vzx data_vzy data_vzz "
    "pred_vxx pred_vxy pred_vxz pred_vyx pred_vyy pred_vyz pred_vzx pred_vzy pred_vzz"
)


def run_test_py(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python test.py OVERRIDES`` run from ``cwd`` (relative paths in overrides are relative to it)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "test.py"), *overrides], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=600, check=False,
    )
    assert proc.returncode == 0, f"test.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def printed(stdout: str, label: str) -> list[str]:
    """Values printed on ``<label> : <value> <unit>`` lines, in order."""
    return re.findall(rf"^{re.escape(label)}\s*: (\S+) ", stdout, flags=re.MULTILINE)


def read_detail(path: Path) -> tuple[list[str], np.ndarray]:
    """Header lines (without '# ') and the numeric rows of a detail file."""
    lines = path.read_text().splitlines()
    headers = [line[2:] for line in lines if line.startswith("#")]
    return headers, np.loadtxt(path, ndmin=2)


# ----------------------------------------------------------------------------------------------------------------
# the water fixture: DeePMD-kit's own dp test numbers
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_water_matches_deepmd(water_fixture: Path, shared_dir: Path, tmp_path: Path):
    data_3 = shared_dir / "data" / "water" / "data_3"
    proc = run_test_py(
        tmp_path,
        f"ckpt_path={water_fixture / 'model.ckpt.pt'}",
        f"systems=[{data_3}]",
        "batch_size=4",
        "detail_file=details/water",  # relative: to the directory the command was run in
    )
    out = proc.stdout
    assert printed(out, "Energy RMSE/Natoms") == [WATER_RMSE_E_PER_ATOM]
    assert printed(out, "Force  RMSE") == [WATER_RMSE_F]
    assert "# number of test data : 80" in out
    assert "Virial" not in out  # data_3 has no virial labels
    assert "weighted average" not in out  # one system: no average table, as dp test

    natoms, nf = 192, 80
    prefix = tmp_path / "details" / "water"
    shapes = {".e.out": (nf, 2), ".e_peratom.out": (nf, 2), ".f.out": (nf * natoms, 6), ".v.out": (nf, 18),
              ".v_peratom.out": (nf, 18)}
    columns = {".e.out": "data_e pred_e", ".e_peratom.out": "data_e pred_e",
               ".f.out": "data_fx data_fy data_fz pred_fx pred_fy pred_fz", ".v.out": VIRIAL_HEADER,
               ".v_peratom.out": VIRIAL_HEADER}
    tables = {}
    for suffix in DETAIL_SUFFIXES:
        headers, table = read_detail(Path(f"{prefix}{suffix}"))
        assert headers == [f"{data_3}: {columns[suffix]}"], suffix
        assert table.shape == shapes[suffix], suffix
        tables[suffix] = table
    e, f = tables[".e.out"], tables[".f.out"]
    np.testing.assert_allclose(tables[".e_peratom.out"], e / natoms, rtol=1e-14)
    np.testing.assert_allclose(tables[".v_peratom.out"], tables[".v.out"] / natoms, rtol=1e-14)
    np.testing.assert_array_equal(tables[".v.out"][:, :9], 0.0)  # no virial labels: zeros, as DeePMD writes
    # the errors recomputed from the detail files are the printed ones
    rmse_ea = np.sqrt(np.mean((e[:, 1] - e[:, 0]) ** 2)) / natoms
    rmse_f = np.sqrt(np.mean((f[:, 3:] - f[:, :3]) ** 2))
    assert f"{rmse_ea:.3e}" == WATER_RMSE_E_PER_ATOM
    assert f"{rmse_f:.3e}" == WATER_RMSE_F
    assert printed(out, "Energy MAE") == [f"{np.mean(np.abs(e[:, 1] - e[:, 0])):.3e}"]
    assert printed(out, "Force  MAE") == [f"{np.mean(np.abs(f[:, 3:] - f[:, :3])):.3e}"]
    # the labels in the detail files are the data's
    np.testing.assert_array_equal(e[:, 0], np.load(data_3 / "set.000" / "energy.npy"))
    # the run directory (outputs/test/<date>/<time>) lives under the working directory, with the metrics
    (metrics_file,) = (tmp_path / "outputs" / "test").glob("*/*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["average"]["rmse_ea"] == pytest.approx(rmse_ea, rel=1e-12)
    assert metrics["average"]["rmse_f"] == pytest.approx(rmse_f, rel=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# the C/H/O fixture: fparam/aparam read from the systems, two systems, weighted average
# ----------------------------------------------------------------------------------------------------------------


def _copy_with_params(shared_dir: Path, cho_fixture: Path, name: str, dest: Path) -> np.lib.npyio.NpzFile:
    """Copy a C/H/O system to ``dest`` and add fparam.npy / aparam.npy (the fixture's for the first 10 frames)."""
    src = shared_dir / "data" / "nopbc" / name
    if not src.is_dir():
        pytest.skip(f"{src} is absent")
    ref = np.load(cho_fixture / f"reference_{name}.npz")
    shutil.copytree(src, dest)
    nf = len(np.load(dest / "set.000" / "coord.npy"))
    nref = len(ref["energy"])
    assert nf >= nref
    pick = np.arange(nf) % nref
    np.save(dest / "set.000" / "fparam.npy", ref["fparam"][pick])
    np.save(dest / "set.000" / "aparam.npy", ref["aparam"][pick].reshape(nf, -1))
    return ref


def test_cho_fparam_aparam_two_systems(cho_fixture: Path, shared_dir: Path, tmp_path: Path):
    names = ["C4H3O1", "C3H3O4"]
    refs = {n: _copy_with_params(shared_dir, cho_fixture, n, tmp_path / "data" / n) for n in names}
    proc = run_test_py(
        tmp_path,
        f"ckpt_path={cho_fixture / 'model.ckpt.pt'}",
        "systems=[data/C4H3O1,data/C3H3O4]",  # relative to the working directory
        "batch_size=3",
        "detail_file=cho",
        "plots=true",
    )
    out = proc.stdout
    assert "# number of systems : 2" in out
    assert "Virial" not in out  # non-periodic, no virial labels
    (run_dir,) = (tmp_path / "outputs" / "test").glob("*/*")
    assert (run_dir / "parity.png").stat().st_size > 0
    assert len(json.loads((run_dir / "metrics.json").read_text())["systems"]) == 2

    # detail files: one block per system, appended, each with its own header line
    headers, e = read_detail(tmp_path / "cho.e.out")
    assert headers == [f"{tmp_path / 'data' / n}: data_e pred_e" for n in names]
    _, f = read_detail(tmp_path / "cho.f.out")
    blocks_e, blocks_f, errors = [], [], []
    start_e = start_f = 0
    for n in names:
        nf = len(np.load(tmp_path / "data" / n / "set.000" / "coord.npy"))
        natoms = len(np.loadtxt(tmp_path / "data" / n / "type.raw"))
        be, bf = e[start_e:start_e + nf], f[start_f:start_f + nf * natoms]
        start_e, start_f = start_e + nf, start_f + nf * natoms
        # predictions with the fixture's fparam/aparam reproduce DeePMD-kit's (first 10 frames)
        ref = refs[n]
        nref = len(ref["energy"])
        np.testing.assert_allclose(be[:nref, 1], ref["energy"], rtol=0, atol=1e-9)
        np.testing.assert_allclose(bf[: nref * natoms, 3:], ref["force"].reshape(-1, 3), rtol=0, atol=1e-9)
        blocks_e.append(be)
        blocks_f.append(bf)
        errors.append({
            "rmse_ea": (np.sqrt(np.mean((be[:, 1] - be[:, 0]) ** 2)) / natoms, nf),
            "rmse_f": (np.sqrt(np.mean((bf[:, 3:] - bf[:, :3]) ** 2)), bf[:, 3:].size),
            "mae_e": (np.mean(np.abs(be[:, 1] - be[:, 0])), nf),
        })
    assert start_e == len(e) and start_f == len(f)
    # per system, then the weighted average (printed last)
    avg = weighted_average(errors)
    rmse_ea, rmse_f, mae_e = printed(out, "Energy RMSE/Natoms"), printed(out, "Force  RMSE"), printed(out, "Energy MAE")
    assert len(rmse_ea) == len(rmse_f) == len(mae_e) == 3
    for k in range(2):
        assert rmse_ea[k] == f"{errors[k]['rmse_ea'][0]:.3e}"
        assert rmse_f[k] == f"{errors[k]['rmse_f'][0]:.3e}"
    assert rmse_ea[2] == f"{avg['rmse_ea']:.3e}"
    assert mae_e[2] == f"{avg['mae_e']:.3e}"
    # the force RMSE weighted by components is the RMSE over all components of both systems
    all_f = np.concatenate(blocks_f)
    assert rmse_f[2] == f"{np.sqrt(np.mean((all_f[:, 3:] - all_f[:, :3]) ** 2)):.3e}"


def test_missing_fparam_names_the_system(cho_fixture: Path, shared_dir: Path, tmp_path: Path):
    from dpfit.cli.test import run
    from dpfit.io.checkpoint import load_model

    src = shared_dir / "data" / "nopbc" / "C4H3O1"
    if not src.is_dir():
        pytest.skip(f"{src} is absent")
    shutil.copytree(src, tmp_path / "C4H3O1")
    model = load_model(cho_fixture / "model.ckpt.pt")
    (system,) = load_systems([tmp_path / "C4H3O1"], type_map=model.type_map)
    with pytest.raises(DataError, match=r"C4H3O1.*needs fparam"):
        evaluate_system(model, system)
    cfg = OmegaConf.create({"ckpt_path": str(cho_fixture / "model.ckpt.pt"), "systems": [str(tmp_path / "C4H3O1")],
                            "batch_size": 1, "detail_file": None, "precision": None, "device": "cpu",
                            "plots": False})
    with pytest.raises(DataError, match=r"C4H3O1.*needs fparam"):
        run(cfg)
    # fparam present but aparam missing
    ref = np.load(cho_fixture / "reference_C4H3O1.npz")
    nf = len(np.load(tmp_path / "C4H3O1" / "set.000" / "coord.npy"))
    np.save(tmp_path / "C4H3O1" / "set.000" / "fparam.npy", np.full((nf, 1), float(ref["fparam"][0, 0])))
    (system,) = load_systems([tmp_path / "C4H3O1"], type_map=model.type_map)
    with pytest.raises(DataError, match=r"C4H3O1.*needs aparam"):
        evaluate_system(model, system)


# ----------------------------------------------------------------------------------------------------------------
# units: metrics, weighted average, formatting, detail files (no shared data needed)
# ----------------------------------------------------------------------------------------------------------------


def _fake_result(rng: np.random.Generator, nf: int, natoms: int, pbc: bool = True, labels=("energy", "force", "virial")):
    res = {"name": f"sys{nf}x{natoms}", "natoms": natoms, "nframes": nf, "pbc": pbc,
           "pred_energy": rng.normal(size=nf), "pred_force": rng.normal(size=(nf, natoms, 3)),
           "pred_virial": rng.normal(size=(nf, 9)), "pred_atom_energy": rng.normal(size=(nf, natoms))}
    shapes = {"energy": (nf,), "force": (nf, natoms, 3), "virial": (nf, 9)}
    for key in labels:
        res[key] = rng.normal(size=shapes[key])
    return res


def test_error_metrics_and_weighted_average_pool_like_dp_test():
    rng = np.random.default_rng(0)
    results = [_fake_result(rng, 7, 5), _fake_result(rng, 3, 11), _fake_result(rng, 12, 2)]
    errors = [error_metrics(r, r["natoms"]) for r in results]
    for r, err in zip(results, errors):
        de = r["pred_energy"] - r["energy"]
        assert err["rmse_e"] == (pytest.approx(np.sqrt(np.mean(de**2))), r["nframes"])
        assert err["mae_ea"] == (pytest.approx(np.mean(np.abs(de)) / r["natoms"]), r["nframes"])
        assert err["rmse_f"][1] == r["nframes"] * r["natoms"] * 3
        assert err["mae_va"][1] == r["nframes"] * 9
    avg = weighted_average(errors)

    def pooled(key):
        return np.concatenate([np.ravel(r[f"pred_{key}"] - r[key]) for r in results])

    # weights = number of compared values: the average is the error pooled over every value of every system
    for key, short in (("energy", "e"), ("force", "f"), ("virial", "v")):
        d = pooled(key)
        assert avg[f"mae_{short}"] == pytest.approx(np.mean(np.abs(d)), rel=1e-12)
        assert avg[f"rmse_{short}"] == pytest.approx(np.sqrt(np.mean(d**2)), rel=1e-12)
    # per-atom energy: each frame's error divided by its system's natoms, weighted by frames
    nfs = np.array([r["nframes"] for r in results])
    rmse_ea = np.array([e["rmse_ea"][0] for e in errors])
    mae_va = np.array([e["mae_va"][0] for e in errors])
    assert avg["rmse_ea"] == pytest.approx(np.sqrt(np.sum(nfs * rmse_ea**2) / nfs.sum()), rel=1e-12)
    assert avg["mae_va"] == pytest.approx(np.sum(9 * nfs * mae_va) / (9 * nfs.sum()), rel=1e-12)
    # hand-checked two-system case: rmse 1 over 1 value and 2 over 3 values -> sqrt((1 + 12) / 4)
    assert weighted_average([{"rmse_f": (1.0, 1)}, {"rmse_f": (2.0, 3)}])["rmse_f"] == pytest.approx(np.sqrt(13 / 4))
    assert weighted_average([{"mae_f": (1.0, 1)}, {"mae_f": (2.0, 3)}])["mae_f"] == pytest.approx(7 / 4)
    with pytest.raises(ValueError, match="unknown error type"):
        weighted_average([{"max_f": (1.0, 1)}])


def test_metrics_only_for_present_labels():
    rng = np.random.default_rng(1)
    no_virial = error_metrics(_fake_result(rng, 4, 3, labels=("energy", "force")))
    assert set(no_virial) == {"mae_e", "rmse_e", "mae_ea", "rmse_ea", "mae_f", "rmse_f"}
    # non-periodic: virial not reported even with labels (as dp test)
    assert "rmse_v" not in error_metrics(_fake_result(rng, 4, 3, pbc=False))
    assert set(error_metrics(_fake_result(rng, 4, 3, labels=("force",)))) == {"mae_f", "rmse_f"}
    # a metric is averaged over the systems that have it
    a, b = _fake_result(rng, 4, 3), _fake_result(rng, 6, 3, labels=("force",))
    avg = weighted_average([error_metrics(a), error_metrics(b)])
    assert avg["rmse_e"] == pytest.approx(error_metrics(a)["rmse_e"][0])
    lines = format_metrics(avg)
    assert lines[0].startswith("Energy MAE         : ")
    assert any(re.fullmatch(r"Force  RMSE        : \d\.\d{3}e[+-]\d\d eV/A", line) for line in lines)
    assert any(line.startswith("Virial RMSE/Natoms : ") and line.endswith(" eV") for line in lines)
    assert format_metrics({"rmse_ea": (0.0033536, 80)}) == ["Energy RMSE/Natoms : 3.354e-03 eV"]


def test_write_detail_files_appends_blocks(tmp_path: Path):
    rng = np.random.default_rng(2)
    a, b = _fake_result(rng, 2, 3), _fake_result(rng, 4, 5, labels=("energy", "force"))
    paths = write_detail_files(tmp_path / "d", a)
    write_detail_files(tmp_path / "d", b, append=True)
    assert [p.name for p in paths] == [f"d{s}" for s in DETAIL_SUFFIXES]
    headers, v = read_detail(tmp_path / "d.v.out")
    assert headers == [f"{a['name']}: {VIRIAL_HEADER}", f"{b['name']}: {VIRIAL_HEADER}"]
    assert v.shape == (6, 18)
    np.testing.assert_array_equal(v[:2, :9], a["virial"])
    np.testing.assert_array_equal(v[2:, :9], 0.0)
    _, f = read_detail(tmp_path / "d.f.out")
    assert f.shape == (2 * 3 + 4 * 5, 6)
    np.testing.assert_array_equal(f[6:, 3:], b["pred_force"].reshape(-1, 3))
    _, ea = read_detail(tmp_path / "d.e_peratom.out")
    np.testing.assert_allclose(ea[2:], np.stack([b["energy"], b["pred_energy"]], 1) / 5, rtol=1e-15)


def test_evaluate_system_batches_agree(tiny_model, random_frame, run_model, tmp_path: Path):
    """Batch size does not change predictions; the model's training flag and requires_grad are restored."""
    model = tiny_model()
    frames = [random_frame(seed=k, natoms=6) for k in range(5)]
    atype = frames[0][1]
    coords = np.stack([c for c, _, _ in frames])
    # same atoms in every frame: reuse frame 0's types and cell shapes of every frame
    folder = tmp_path / "sys"
    (folder / "set.000").mkdir(parents=True)
    np.savetxt(folder / "type.raw", atype, fmt="%d")
    np.save(folder / "set.000" / "coord.npy", coords.reshape(5, -1))
    np.save(folder / "set.000" / "box.npy", np.stack([b for _, _, b in frames]).reshape(5, 9))
    np.save(folder / "set.000" / "energy.npy", np.arange(5.0))
    (system,) = load_systems([folder], type_map=model.type_map)
    model.train()
    one = evaluate_system(model, system, batch_size=1)
    assert model.training and all(p.requires_grad for p in model.parameters())
    three = evaluate_system(model, system, batch_size=3)
    for key in ("pred_energy", "pred_force", "pred_virial", "pred_atom_energy"):
        np.testing.assert_allclose(one[key], three[key], rtol=0, atol=1e-12)
    assert one["pred_force"].shape == (5, 6, 3) and one["pred_virial"].shape == (5, 9)
    np.testing.assert_array_equal(one["energy"], np.arange(5.0))
    assert "force" not in one and set(error_metrics(one)) == {"mae_e", "rmse_e", "mae_ea", "rmse_ea"}
    # the same as a direct model call on all frames at once
    ref = run_model(model.eval(), coords, atype, box=np.stack([b for _, _, b in frames]))
    np.testing.assert_allclose(one["pred_energy"], ref["energy"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(one["pred_force"], ref["force"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(one["pred_virial"], ref["virial"], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_system(model, system, batch_size=0)
