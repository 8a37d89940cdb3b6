"""Property models (DeePMD-kit's ``property`` fitting, plus atomic labels): parity with DeePMD-kit 3.2 on the
text fixture tests/fixtures/deepmd_property.json (scripts/make_property_fixture.py), the loss, the output
statistics, the data's reading rules, and train.py / test.py / freeze.py on a small data set."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_random_frame
from hydra_utils import compose_train
from omegaconf import OmegaConf

from dpfit.data.batch import collate, make_sample
from dpfit.data.datamodule import DeepmdDataModule
from dpfit.data.neighbor import build_neighbor_list
from dpfit.data.system import DataError, DeepmdSystem, Needs
from dpfit.errors import ConfigError
from dpfit.io.deepmd_checkpoint import model_from_deepmd_state
from dpfit.io.deepmd_export import NotRepresentableError, deepmd_passthrough, deepmd_state_dict
from dpfit.model import PropertyModel, build_model
from dpfit.training.property_loss import PropertyLoss
from dpfit.training.statistics import property_output_stats

pytestmark = pytest.mark.usefixtures("single_torch_thread")

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "deepmd_property.json"
RTOL, ATOL = 1e-10, 1e-12


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def fixture() -> dict:
    return json.loads(FIXTURE.read_text())


def _state(entry: dict) -> dict:
    state = {k: torch.tensor(v["data"], dtype=getattr(torch, v["dtype"])).reshape(v["shape"])
             for k, v in entry["state"].items()}
    state["_extra_state"] = {"model_params": entry["model_params"]}
    return state


def _run(model, coord, atype, fparam=None) -> dict[str, np.ndarray]:
    """The model on frames coord (nf, n, 3) of one non-periodic molecule."""
    coord = np.asarray(coord, dtype=np.float64)
    atype = np.asarray(atype)
    nlist = np.stack([build_neighbor_list(c, atype, None, model.rcut, model.sel).nlist for c in coord])
    fp = None if fparam is None else torch.tensor(fparam, dtype=torch.float64)
    with torch.no_grad():
        out = model(torch.from_numpy(coord), torch.from_numpy(atype).expand(len(coord), -1), torch.from_numpy(nlist),
                    fparam=fp)
    return {k: v.numpy() for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------------------
# parity with DeePMD-kit 3.2.0 (the text fixture)
# ----------------------------------------------------------------------------------------------------------------


def _on_backend(model, backend: str):
    from dpfit.model.kernels import load_library

    if backend == "kernels" and load_library(required=False) is None:
        pytest.skip("the op library is unavailable")
    return model.use_backend(backend)


@pytest.mark.parametrize("backend", ["compact", "kernels", "static"])
@pytest.mark.parametrize("kind", ["intensive", "extensive"])
def test_deepmd_property_predictions_reproduced(fixture, kind, backend):
    """On every descriptor backend (dpfit.model.backends)."""
    entry = fixture["models"][kind]
    model = _on_backend(model_from_deepmd_state(_state(entry)).eval(), backend)
    fit = entry["model_params"]["fitting_net"]
    assert isinstance(model, PropertyModel)
    assert (model.property_name, model.task_dim, model.intensive) == (fit["property_name"], fit["task_dim"],
                                                                      fit["intensive"])
    name = model.property_name
    for frames in entry["frames"]:  # unseen frames of the two training molecules and of an unseen molecule
        out = _run(model, frames["coord"], frames["atype"], frames["fparam"])
        np.testing.assert_allclose(out["property"], frames[name], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(out["atom_property"], frames[f"atom_{name}"], rtol=RTOL, atol=ATOL)
        reduced = out["atom_property"].mean(1) if model.intensive else out["atom_property"].sum(1)
        np.testing.assert_allclose(out["property"], reduced, rtol=1e-13)


@pytest.mark.parametrize("kind", ["intensive", "extensive"])
def test_deepmd_property_loss_reproduced(fixture, kind):
    """DeePMD-kit's PropertyLoss value on a batch (every loss_func, two smooth_mae betas), and its mae/rmse."""
    entry = fixture["models"][kind]
    model = model_from_deepmd_state(_state(entry)).eval()
    b = entry["loss_batch"]
    name = model.property_name
    atype = torch.tensor(b["atype"]).expand(len(b["coord"]), -1)
    pred = _run(model, b["coord"], b["atype"], b["fparam"])
    pred = {k: torch.from_numpy(v) for k, v in pred.items()}
    batch = {name: torch.tensor(b[name], dtype=torch.float64), f"find_{name}": 1.0, "natoms": len(b["atype"]),
             "atype": atype}
    assert len(entry["losses"]) == 6
    for key, ref in entry["losses"].items():
        func, beta = key.split(":")
        value, logs = PropertyLoss(func, float(beta)).bind(model.fitting)(pred, batch)
        assert float(value) == pytest.approx(ref["loss"], rel=RTOL, abs=ATOL), key
        assert float(logs["mae_p"]) == pytest.approx(ref["mae"], rel=RTOL)
        assert float(logs["rmse_p"]) == pytest.approx(ref["rmse"], rel=RTOL)


def test_deepmd_output_statistics_reproduced(fixture):
    """out_bias / out_std as DeePMD-kit's compute_output_stats: frame labels (intensive or extensive, types
    distinguished or not) and atomic labels."""
    stats = fixture["statistics"]
    systems = stats["systems"]
    for key, ref in stats["results"].items():
        if key == "atomic":
            atoms = [(np.tile(s["atype"], (len(s["atom_charge"]), 1)), np.array(s["atom_charge"])) for s in systems]
            bias, std = property_output_stats([], atoms, 3)
        else:
            _, intensive, distinguish = key.split(":")
            frames = [(np.array(s["natoms"])[:, 2:], np.array(s["bvdev"])) for s in systems]
            bias, std = property_output_stats(frames, [], 3, intensive == "True", distinguish == "True")
        np.testing.assert_allclose(bias, ref["bias"], rtol=1e-12, atol=1e-14, err_msg=key)
        np.testing.assert_allclose(std, ref["std"], rtol=1e-12, atol=1e-14, err_msg=key)


@pytest.mark.parametrize("kind", ["intensive", "extensive"])
def test_deepmd_property_checkpoint_exports_back(fixture, kind):
    """A DeePMD-kit property checkpoint imported and exported again holds the same tensors and options."""
    entry = fixture["models"][kind]
    source = _state(entry)
    model = model_from_deepmd_state(source)
    exported = deepmd_state_dict(model, deepmd_passthrough(source))  # (as freeze.py: min_nbor_dist carried)
    params = exported.pop("_extra_state")["model_params"]
    for key in ("property_name", "task_dim", "intensive", "neuron", "resnet_dt", "numb_fparam", "type"):
        assert params["fitting_net"][key] == entry["model_params"]["fitting_net"][key], key
    assert params["descriptor"]["type_one_side"] == entry["model_params"]["descriptor"]["type_one_side"]
    kept = {k: v for k, v in exported.items() if "compress_" not in k and "._networks." not in k}
    assert set(kept) == set(entry["state"])
    for k, v in kept.items():
        assert torch.equal(v, source[k]), k


# ----------------------------------------------------------------------------------------------------------------
# the model and the loss
# ----------------------------------------------------------------------------------------------------------------


def _config(**fitting) -> dict:
    fit = {"type": "property", "property_name": "q", "task_dim": 2, "neuron": [8, 8], "seed": 3, **fitting}
    return {"type_map": ["C", "H", "O"], "precision": "float64", "fitting_net": fit,
            "descriptor": {"sel": [4, 4, 4], "rcut": 4.0, "rcut_smth": 1.0, "neuron": [4, 8], "axis_neuron": 4,
                           "seed": 1}}


def test_property_model_options_and_torchscript():
    model = build_model(_config(atom_sum=0.5)).eval()
    with torch.no_grad():
        model.fitting.out_bias.uniform_(-1, 1)
        model.fitting.out_std.uniform_(0.5, 2)
    coord, atype, _ = make_random_frame(seed=3, natoms=7, periodic=False, ntypes=3, min_dist=0.9)
    out = _run(model, coord[None], atype)
    np.testing.assert_allclose(out["atom_property"].sum(1), 0.5, atol=1e-12)  # atom_sum: every task, every frame
    np.testing.assert_allclose(out["property"], out["atom_property"].sum(1), rtol=1e-14)
    scripted = torch.jit.script(model)
    nlist = torch.from_numpy(build_neighbor_list(coord, atype, None, model.rcut, model.sel).nlist[None])
    got = scripted(torch.from_numpy(coord[None]), torch.from_numpy(atype[None]), nlist)
    np.testing.assert_allclose(got["atom_property"].detach().numpy(), out["atom_property"], rtol=1e-13, atol=1e-15)
    with pytest.raises(ValueError, match="atom_sum .* extensive"):
        build_model(_config(atom_sum=0.0, intensive=True))
    with pytest.raises(ValueError, match="task_dim"):
        build_model(_config(task_dim=0))
    with pytest.raises(ValueError, match="fitting_net.type='dipole'"):
        build_model({**_config(), "fitting_net": {"type": "dipole"}})


def _pred_batch(nf=3, n=5, td=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    pa, la = torch.randn(nf, n, td, generator=g, dtype=torch.float64), torch.randn(nf, n, td, generator=g,
                                                                                    dtype=torch.float64)
    atype = torch.tensor([0, 1, 2, 1, 0]).expand(nf, n)
    pred = {"property": pa.sum(1), "atom_property": pa}
    batch = {"q": la.sum(1) + 0.3, "atom_q": la.reshape(nf, n * td), "find_q": 1.0, "find_atom_q": 1.0, "natoms": n,
             "atype": atype}
    return pred, batch


def test_property_loss_terms_by_hand():
    model = build_model(_config())
    std = torch.tensor([[0.5, 2.0], [1.5, 1.0], [3.0, 0.25]], dtype=torch.float64)
    with torch.no_grad():
        model.fitting.out_std.copy_(std)
    pred, batch = _pred_batch()
    p, la, atype = pred["atom_property"].numpy(), batch["atom_q"].numpy().reshape(3, 5, 2), batch["atype"].numpy()
    e_atom = (la - p) / std.numpy()[atype]
    e_frame = (batch["q"].numpy() - pred["property"].numpy()) / 5 / std[0].numpy()
    loss = PropertyLoss("mse", pref=0.7, pref_atomic=2.0).bind(model.fitting)
    total, logs = loss(pred, batch)
    expected_atomic = np.sum(np.mean(e_atom**2, axis=1))  # sum over frames and tasks of the mean over atoms
    assert float(logs["l2_ap"]) == pytest.approx(expected_atomic, rel=1e-12)
    assert float(logs["l2_p"]) == pytest.approx(np.sum(e_frame**2), rel=1e-12)
    assert float(total) == pytest.approx(0.7 * np.sum(e_frame**2) + 2.0 * expected_atomic, rel=1e-12)
    assert float(logs["rmse_ap"]) == pytest.approx(np.sqrt(np.mean((la - p) ** 2)), rel=1e-12)
    smooth, _ = PropertyLoss("smooth_mae", beta=0.5, pref=0.0, pref_atomic=1.0).bind(model.fitting)(pred, batch)
    a = np.abs(e_atom)
    huber = np.where(a < 0.5, 0.5 * a**2 / 0.5, a - 0.25)
    assert float(smooth) == pytest.approx(np.sum(np.mean(huber, axis=1)), rel=1e-12)
    # a batch without the atomic label drops that term (find_atom_q = 0)
    total, logs = loss(pred, {**batch, "find_atom_q": 0.0})
    assert "l2_ap" not in logs and float(total) == pytest.approx(0.7 * np.sum(e_frame**2), rel=1e-12)
    assert loss.labels == {"q", "atom_q"}
    with pytest.raises(ValueError, match="loss_func"):
        PropertyLoss("huber")
    with pytest.raises(ValueError, match="both 0"):
        PropertyLoss(pref=0.0)


def test_model_and_loss_must_agree(tmp_path):
    from dpfit.cli.train import build

    with pytest.raises(ConfigError, match="loss=property"):
        build(compose_train(["model=se_e2_a_property"], tmp_path))
    with pytest.raises(ConfigError, match="loss=property"):
        build(compose_train(["loss=property"], tmp_path))


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------


def make_property_data(root: Path, nframes: int = 10, compositions=((5, 1), (7, 2))) -> Path:
    """Small random C/H/O molecules (natoms, seed) with the labels of scripts/make_property_data.py."""
    mpd = _script("make_property_data")
    for natoms, seed in compositions:
        frames = [make_random_frame(seed=100 * seed + k, natoms=natoms, periodic=False, ntypes=3, min_dist=0.9)
                  for k in range(nframes)]
        # the atoms' positions are drawn independently of their types: every frame takes the first's types
        mpd.write_system(root / f"mol{natoms}", frames[0][1], np.stack([f[0] for f in frames]))
    return root


def _needs(name="bvdev", td=2, labels=("bvdev",)) -> Needs:
    return Needs(labels=frozenset(labels), numb_fparam=0, numb_aparam=0,
                 extra=((name, False, td), (f"atom_{name}", True, td)), required=frozenset(labels))


def test_property_labels_read_by_deepmd_rules(tmp_path):
    root = make_property_data(tmp_path / "data", nframes=4, compositions=((5, 1),))
    sys_dir = root / "mol5"
    ref = np.load(sys_dir / "set.000" / "bvdev.npy")
    atom = np.load(sys_dir / "set.000" / "atom_charge.npy")
    system = DeepmdSystem(sys_dir, ["C", "H", "O"], _needs())
    frame = system.frame(2)
    np.testing.assert_array_equal(frame["bvdev"], ref[2])
    np.save(sys_dir / "set.000" / "bvdev.npy", ref.reshape(-1).astype(np.float32))  # flat, float32: by size
    np.testing.assert_allclose(DeepmdSystem(sys_dir, ["C", "H", "O"], _needs()).frame(2)["bvdev"], ref[2], rtol=1e-6)
    system = DeepmdSystem(sys_dir, ["C", "H", "O"], _needs("charge", 1, ("atom_charge",)))
    batch = collate([make_sample(system, i, 4.0, [4, 4, 4]) for i in (1, 3)])
    assert batch["atom_charge"].shape == (2, 5, 1) and batch["find_atom_charge"] == 1.0
    assert batch["find_charge"] == 0.0 and "charge" not in batch  # charge.npy is not fitted here: not opened
    np.testing.assert_array_equal(batch["atom_charge"][:, :, 0].numpy(), atom[[1, 3]])
    np.save(sys_dir / "set.000" / "bvdev.npy", ref[:, :1])
    with pytest.raises(DataError, match=r"set.000/bvdev.npy: expected 2 values per frame"):
        DeepmdSystem(sys_dir, ["C", "H", "O"], _needs())


def test_missing_property_label_is_one_error_or_masked(tmp_path):
    root = make_property_data(tmp_path / "data", nframes=4)
    (root / "mol7" / "set.000" / "bvdev.npy").unlink()
    dm = DeepmdDataModule(train_systems=[str(root)], type_map=["C", "H", "O"], rcut=4.0, sel=[4, 4, 4])
    dm.needs = _needs()
    with pytest.raises(DataError, match=r"mol7: no bvdev.npy in its set.\* folders"):
        dm.setup("fit")
    # fitting frame and atomic labels: a system with one of them trains, the other term masked
    mpd = _script("make_property_data")
    for mol in ("mol5", "mol7"):
        coord = np.load(root / mol / "set.000" / "coord.npy")
        atype = np.loadtxt(root / mol / "type.raw", dtype=int)
        np.save(root / mol / "set.000" / "atom_bvdev.npy",
                np.repeat(mpd.labels(coord.reshape(len(coord), -1, 3), atype)["bvdev"][:, None], len(atype), 1))
    (root / "mol5" / "set.000" / "atom_bvdev.npy").unlink()
    dm = DeepmdDataModule(train_systems=[str(root)], type_map=["C", "H", "O"], rcut=4.0, sel=[4, 4, 4], val_fraction=0)
    dm.needs = _needs(labels=("bvdev", "atom_bvdev"))
    dm.setup("fit")
    flags = {v.system.name.rsplit("/", 1)[1]: collate([make_sample(v.system, 0, 4.0, [4, 4, 4])]) for v in dm.train_views}
    assert (flags["mol5"]["find_bvdev"], flags["mol5"]["find_atom_bvdev"]) == (1.0, 0.0)
    assert (flags["mol7"]["find_bvdev"], flags["mol7"]["find_atom_bvdev"]) == (0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# train.py deepmd_input=, test.py, freeze.py
# ----------------------------------------------------------------------------------------------------------------

QUICK = ["trainer.max_steps=4", "trainer.val_check_interval=4", "callbacks.lcurve.disp_freq=2",
         "~callbacks.progress_bar", "trainer.enable_model_summary=false", "data.data_stat_nbatch=2"]


def _property_input(data: Path) -> dict:
    return {
        "model": {"type_map": ["C", "H", "O"],
                  "descriptor": {"type": "se_e2_a", "sel": [4, 4, 4], "rcut": 4.0, "rcut_smth": 1.0, "neuron": [4, 8],
                                 "axis_neuron": 4, "type_one_side": True, "seed": 1},
                  "fitting_net": {"type": "property", "property_name": "bvdev", "task_dim": 2, "intensive": True,
                                  "neuron": [8, 8], "resnet_dt": True, "seed": 2}},
        "learning_rate": {"type": "exp", "start_lr": 1e-3, "stop_lr": 1e-5, "decay_steps": 2},
        "loss": {"type": "property", "loss_func": "smooth_mae", "metric": ["mae"], "beta": 1.0},
        "training": {"training_data": {"systems": [str(data)], "batch_size": 2},
                     "validation_data": {"systems": [str(data)], "batch_size": 1, "numb_btch": 2},
                     "numb_steps": 100, "seed": 5, "disp_freq": 10, "save_freq": 10},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A property model trained by train.py deepmd_input=<a DeePMD-kit property input.json> (4 steps)."""
    from dpfit.cli.deepmd import expand_deepmd_input
    from dpfit.cli.train import train

    tmp = tmp_path_factory.mktemp("property")
    data = make_property_data(tmp / "data")
    src = tmp / "input.json"
    src.write_text(json.dumps(_property_input(data)))
    overrides = expand_deepmd_input([f"deepmd_input={src}", *QUICK])
    assert "model=se_e2_a_property" in overrides and "loss=property" in overrides
    cfg = compose_train(overrides, tmp / "run")
    assert cfg.model.fitting_net.property_name == "bvdev" and cfg.loss.loss_func == "smooth_mae"
    train(cfg)
    return tmp


def test_train_py_trains_from_a_deepmd_property_input(trained):
    run = trained / "run"
    lines = (run / "lcurve.out").read_text().splitlines()
    assert lines[0].split()[1:] == ["step", "rmse_val", "rmse_trn", "rmse_p_val", "rmse_p_trn", "lr"]
    rows = [[float(x) for x in r.split()] for r in lines[1:]]
    assert [r[0] for r in rows] == [1, 2, 4] and all(math.isfinite(x) for x in rows[-1])  # (a row at step 1, as DeePMD-kit 3.2)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = ckpt["state_dict"]
    assert float(state["stats_ready"]) == 1.0
    assert not torch.equal(state["model.fitting.out_std"], torch.ones_like(state["model.fitting.out_std"]))


def test_test_py_reports_property_errors(trained, tmp_path):
    from dpfit.cli.test import run

    cfg = OmegaConf.create({"ckpt_path": str(trained / "run" / "checkpoints" / "last.ckpt"),
                            "systems": [str(trained / "data")], "batch_size": 3, "detail_file": str(tmp_path / "d"),
                            "precision": None, "impl": None, "device": "cpu", "kernels": None, "plots": True})
    summary = run(cfg, out_dir=tmp_path / "out")
    average, systems = summary["average"], summary["systems"]
    assert {"mae_property", "rmse_property", "mae_property_0", "rmse_property_1"} <= set(average)
    rows = np.loadtxt(tmp_path / "d.property.out")
    assert rows.shape == (20, 4)
    diff = rows[:, 2:] - rows[:, :2]
    assert average["rmse_property"] == pytest.approx(np.sqrt(np.mean(diff**2)), rel=1e-12)
    assert systems[0]["mae_property_1"] == pytest.approx(np.mean(np.abs(diff[:10, 1])), rel=1e-12)
    assert (tmp_path / "d.parity_property.png").is_file() and (tmp_path / "out" / "metrics.json").is_file()


def test_freeze_py_exports_the_property(trained, tmp_path):
    from dpfit.io.checkpoint import load_model
    from dpfit.io.freeze_formats import freeze_checkpoint

    ckpt = trained / "run" / "checkpoints" / "last.ckpt"
    out, model = freeze_checkpoint(ckpt, tmp_path / "model.pth")
    frozen = torch.jit.load(str(out))
    assert frozen.get_property_name() == "bvdev" and frozen.get_task_dim() == 2 and frozen.get_intensive()
    coord = np.load(trained / "data" / "mol7" / "set.000" / "coord.npy")[:2].reshape(2, 7, 3)
    atype = np.loadtxt(trained / "data" / "mol7" / "type.raw", dtype=np.int64)
    ref = _run(load_model(ckpt), coord, atype)
    got = frozen(torch.from_numpy(coord[1]), torch.from_numpy(atype), None)
    np.testing.assert_allclose(got["bvdev"].numpy(), ref["property"][1], rtol=1e-12)
    np.testing.assert_allclose(got["atom_bvdev"].numpy(), ref["atom_property"][1], rtol=1e-12)
    with pytest.raises(ConfigError, match="format=lammps is LAMMPS pair_style deepmd"):
        freeze_checkpoint(ckpt, tmp_path / "lammps.pth", fmt="lammps")
    out, _ = freeze_checkpoint(ckpt, tmp_path / "model.ckpt.pt", fmt="deepmd")
    back = model_from_deepmd_state(torch.load(out, weights_only=False)["model"])
    np.testing.assert_allclose(_run(back, coord, atype)["atom_property"], ref["atom_property"], rtol=1e-13)
    model.fitting.has_atom_sum = True
    with pytest.raises(NotRepresentableError, match="atom_sum"):
        deepmd_state_dict(model)


def _peer_dp() -> Path | None:
    """DeePMD-kit 3.2's ``dp`` of ../shared/tools/peer_deepmd.sh setup (DPFIT_PEER_DEEPMD: its venv), if there."""
    venv = os.environ.get("DPFIT_PEER_DEEPMD") or os.path.join(os.environ.get("TMPDIR", "/tmp"), "peer-deepmd")
    dp = Path(venv) / "bin" / "dp"
    return dp if dp.is_file() else None


def test_dp_test_reproduces_test_py(trained, tmp_path):
    """The format=deepmd export read by DeePMD-kit's own ``dp --pt test``: the same numbers as test.py."""
    dp = _peer_dp()
    if dp is None:
        pytest.skip("DeePMD-kit peer venv absent (../shared/tools/peer_deepmd.sh setup; or set DPFIT_PEER_DEEPMD)")
    from dpfit.cli.test import run
    from dpfit.io.freeze_formats import freeze_checkpoint

    ckpt = trained / "run" / "checkpoints" / "last.ckpt"
    out, _ = freeze_checkpoint(ckpt, tmp_path / "model.ckpt.pt", fmt="deepmd")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DP_INTRA_OP_PARALLELISM_THREADS": "1",
           "DP_INTER_OP_PARALLELISM_THREADS": "1"}
    proc = subprocess.run([str(dp), "--pt", "test", "-m", str(out), "-s", str(trained / "data")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr + proc.stdout
    blocks = re.findall(r"# (?:testing system : (\S+)|number of systems : \d+).*?PROPERTY MAE\s*: (\S+) units.*?"
                        r"PROPERTY RMSE\s*: (\S+) units", log, flags=re.DOTALL)
    theirs = {Path(name).name if name else "average": (float(mae), float(rmse)) for name, mae, rmse in blocks}
    cfg = OmegaConf.create({"ckpt_path": str(ckpt), "systems": [str(trained / "data")], "batch_size": 1,
                            "detail_file": None, "precision": None, "impl": None, "device": "cpu", "kernels": None,
                            "plots": False})
    summary = run(cfg)
    ours = {Path(s["name"]).name: (s["mae_property"], s["rmse_property"]) for s in summary["systems"]}
    ours["average"] = (summary["average"]["mae_property"], summary["average"]["rmse_property"])
    assert set(theirs) == set(ours) == {"mol5", "mol7", "average"}
    for name, values in ours.items():
        np.testing.assert_allclose(theirs[name], values, rtol=1e-6, err_msg=name)  # (dp test prints 7 digits)


def test_partial_charges_train_on_atomic_labels(tmp_path):
    """Atomic labels only (loss.pref=0, pref_atomic=1), each frame's charges summed to 0 (atom_sum)."""
    from dpfit.cli.train import train
    from dpfit.io.checkpoint import load_model

    data = make_property_data(tmp_path / "data")
    cfg = compose_train(["model=se_e2_a_property", "loss=property", "data=deepmd", f"data.train_systems=[{data}]",
                         "data.type_map=[C,H,O]", "data.sel=[4,4,4]", "model.descriptor.rcut=4.0",
                         "model.descriptor.rcut_smth=1.0", "model.descriptor.neuron=[4,8]",
                         "model.descriptor.axis_neuron=4", "model.fitting_net.neuron=[8,8]",
                         "model.fitting_net.property_name=charge", "model.fitting_net.atom_sum=0", "loss.pref=0",
                         "loss.pref_atomic=1", "loss.loss_func=mse", *QUICK], tmp_path / "run")
    train(cfg)
    header = (tmp_path / "run" / "lcurve.out").read_text().splitlines()[0].split()[1:]
    assert header == ["step", "rmse_val", "rmse_trn", "rmse_ap_val", "rmse_ap_trn", "lr"]
    model = load_model(tmp_path / "run" / "checkpoints" / "last.ckpt")
    q = np.concatenate([np.load(p) for p in sorted(data.glob("*/set.000/atom_charge.npy"))], axis=1)
    assert model.fitting.out_bias[:, 0].tolist() != [0.0, 0.0, 0.0]  # from the atomic labels' per-type means
    coord = np.load(data / "mol7" / "set.000" / "coord.npy").reshape(-1, 7, 3)
    out = _run(model, coord, np.loadtxt(data / "mol7" / "type.raw", dtype=int))
    np.testing.assert_allclose(out["atom_property"].sum(axis=1), 0.0, atol=1e-12)
    assert np.isfinite(q).all()


def test_property_config_errors_name_the_key(tmp_path):
    from dpfit.calculators import DPCalculator
    from dpfit.cli.validate import validate_train_config

    base = ["model=se_e2_a_property", "loss=property"]
    for overrides, match in (
        (["model.fitting_net.task_dim=0"], r"model.fitting_net.task_dim=0: must be 1 or more"),
        (["model.fitting_net.property_name='a b'"], r"model.fitting_net.property_name=a b: must name the label file"),
        (["model.fitting_net.atom_sum=0", "model.fitting_net.intensive=true"],
         r"model.fitting_net.atom_sum=0: fixes a sum .* model.fitting_net.intensive=false"),
    ):
        with pytest.raises(ConfigError, match=match):
            validate_train_config(compose_train([*base, *overrides], tmp_path))
    validate_train_config(compose_train(base, tmp_path))
    with pytest.raises(ValueError, match="a property model has no energy or forces"):
        DPCalculator(build_model(_config()))


@pytest.mark.slow
def test_property_models_beat_the_per_type_baseline(shared_dir, tmp_path):
    """scripts/property_benchmark.py, shortened: on the molecules of the training compositions each model
    (intensive, extensive, partial charges) is at least twice as accurate as the per-type-mean baseline."""
    data = tmp_path / "data"
    _script("make_property_data").main(["--source", str(shared_dir / "data" / "nopbc"), "--out", str(data)])
    _script("property_benchmark").main(["--data", str(data), "--out", str(tmp_path / "runs"), "--steps", "1500"])
    table = json.loads((tmp_path / "runs" / "benchmark.json").read_text())
    assert set(table) == {"intensive", "extensive", "charge"}
    for case, rows in table.items():
        seen = {Path(name).name: row for name, row in rows.items() if Path(name).name in ("C1H4O2", "C3H3O4")}
        assert len(seen) == 2
        for name, row in seen.items():
            assert row["factor"] > 2.0, (case, name, row)


@pytest.mark.parametrize("backend", ["compact", "kernels", "static"])
def test_loss_gradient_matches_finite_differences(backend):
    """Training differentiates the property through the descriptor by autograd (on every backend: the
    kernels' ops carry their backward): the gradient of the loss with respect to every weight, along a
    random direction, equals a central finite difference."""
    model = _on_backend(build_model(_config()), backend)
    with torch.no_grad():
        model.fitting.out_bias.uniform_(-1, 1)
        model.fitting.out_std.uniform_(0.5, 2)
        model.descriptor.davg.uniform_(0.0, 0.2)
        model.descriptor.dstd.uniform_(0.5, 1.0)
    frames = [make_random_frame(seed=40 + k, natoms=7, periodic=False, ntypes=3, min_dist=0.9) for k in range(2)]
    atype = frames[0][1]
    coord = torch.tensor(np.stack([f[0] for f in frames]))
    nlist = torch.from_numpy(np.stack([build_neighbor_list(f[0], atype, None, 4.0, [4, 4, 4]).nlist for f in frames]))
    at = torch.from_numpy(atype).expand(2, -1)
    g = torch.Generator().manual_seed(5)
    batch = {"q": torch.randn(2, 2, generator=g, dtype=torch.float64), "find_q": 1.0, "natoms": 7, "atype": at,
             "atom_q": torch.randn(2, 14, generator=g, dtype=torch.float64), "find_atom_q": 1.0}
    loss = PropertyLoss("mse", pref=1.0, pref_atomic=0.5).bind(model.fitting)
    params = list(model.parameters())
    value, _ = loss(model(coord, at, nlist), batch)
    grads = torch.autograd.grad(value, params)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    eps = 1e-6

    def shifted(sign: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
            out = float(loss(model(coord, at, nlist), batch)[0])
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
        return out

    numeric = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
    analytic = sum(float((gr * d).sum()) for gr, d in zip(grads, direction))
    assert analytic == pytest.approx(numeric, rel=1e-6)
