"""DeePMD-kit input.json import (scripts/import_deepmd_input.py) and fine-tuning from a DeePMD-kit checkpoint."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra_utils import REPO, compose_train

from dpfit.io.deepmd_input import convert_input, to_yaml

pytestmark = pytest.mark.usefixtures("single_torch_thread")

#: one statistics batch, one validation batch, no progress bar: a 3-step run in seconds
QUICK = ["data.data_stat_nbatch=1", "trainer.limit_val_batches=1", "trainer.enable_model_summary=false",
         "~callbacks.progress_bar"]


@pytest.fixture(scope="module")
def water_json(shared_dir) -> Path:
    path = shared_dir / "data" / "water" / "deepmd_input_se_e2_a.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


def _script():
    spec = importlib.util.spec_from_file_location("import_deepmd_input", REPO / "scripts" / "import_deepmd_input.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _deepmd_layout(tmp_path: Path, water_json: Path) -> Path:
    """DeePMD-kit's example layout: <root>/se_e2_a/input.json next to <root>/data/data_{0..3}."""
    (tmp_path / "se_e2_a").mkdir()
    (tmp_path / "data").symlink_to(water_json.parent, target_is_directory=True)
    dest = tmp_path / "se_e2_a" / "input.json"
    dest.write_text(water_json.read_text())
    return dest


def test_water_input_translates_completely(water_json):
    preset, unsupported = convert_input(json.loads(water_json.read_text()), base_dir="/x/water/se_e2_a")
    assert unsupported == []
    assert preset["defaults"] == [{"override /data": "deepmd"}]
    assert preset["seed"] == 10
    data, model = preset["data"], preset["model"]
    assert data["type_map"] == ["O", "H"] and data["sel"] == [46, 92]
    assert data["train_systems"] == [f"/x/water/data/data_{k}" for k in range(3)]  # "../data/data_0/" resolved
    assert data["val_systems"] == ["/x/water/data/data_3"]
    assert (data["batch_size"], data["val_batch_size"], data["numb_btch"]) == ("auto", 1, 3)
    assert model["descriptor"] == {"rcut": 6.0, "rcut_smth": 0.5, "neuron": [25, 50, 100], "axis_neuron": 16,
                                   "resnet_dt": False, "type_one_side": True, "exclude_types": [],
                                   "set_davg_zero": False, "seed": 1}
    assert model["precision"] == "float64"
    assert model["fitting_net"] == {"neuron": [240, 240, 240], "resnet_dt": True, "numb_fparam": 0,
                                    "numb_aparam": 0, "seed": 1}
    assert preset["schedule"] == {"start_lr": 1e-3, "stop_lr": 3.51e-8, "decay_steps": 5000}
    assert preset["loss"]["start_pref_e"] == 0.02 and preset["loss"]["limit_pref_f"] == 1.0
    assert preset["loss"]["start_pref_v"] == preset["loss"]["limit_pref_v"] == 0.0
    assert preset["trainer"] == {"val_check_interval": 100, "max_steps": 1000000}
    assert preset["callbacks"] == {"model_checkpoint": {"every_n_train_steps": 1000},
                                   "lcurve": {"disp_freq": 100, "filename": "lcurve.out"}}
    assert preset["scale_by_worker"] == "linear"  # DeePMD-kit's default


def test_deepmd_defaults_fill_missing_keys(tmp_path):
    minimal = {
        "model": {"type_map": ["A", "B"], "descriptor": {"type": "se_a", "sel": [4, 4]}, "fitting_net": {}},
        "training": {"training_data": {"systems": "sys"}, "validation_data": {"systems": ["v"]}, "numb_steps": 10},
    }
    preset, unsupported = convert_input(minimal, base_dir=tmp_path)
    assert unsupported == []
    d, f = preset["model"]["descriptor"], preset["model"]["fitting_net"]
    assert (d["neuron"], d["axis_neuron"], d["type_one_side"], d["rcut"]) == ([10, 20, 40], 4, False, 6.0)
    assert (f["neuron"], f["resnet_dt"]) == ([120, 120, 120], True)
    assert preset["schedule"] == {"start_lr": 1e-3, "stop_lr": 1e-8, "decay_steps": 5000}
    assert preset["data"]["train_systems"] == [str(tmp_path / "sys")]
    assert preset["data"]["numb_btch"] == 1 and preset["data"]["val_batch_size"] == "auto"
    assert preset["trainer"] == {"val_check_interval": 1000, "max_steps": 10}


def test_unknown_and_untranslatable_keys_are_reported(water_json, tmp_path, capsys):
    data = json.loads(water_json.read_text())
    data["model"]["descriptor"]["xyz"] = 1
    data["model"]["descriptor"]["activation_function"] = "gelu"
    data["model"]["descriptor"]["trainable"] = True  # the behaviour dpfit has: accepted
    data["model"]["descriptor"]["_comment_more"] = "ignored"
    data["model"]["fitting_net"]["atom_ener"] = [1.0, None]
    data["loss"]["use_huber"] = True
    data["training"]["training_data"]["batch_size"] = [1, 2, 3]
    data["training"]["mixed_precision"] = {"compute_prec": "float16"}
    data["training"]["warmup_steps"] = 50
    data["learning_rate"]["scale_by_worker"] = "sqrt"
    data["whatever"] = {}
    preset, unsupported = convert_input(copy.deepcopy(data), base_dir=tmp_path)
    assert unsupported == [
        "model.descriptor.xyz",
        "model.descriptor.activation_function='gelu'",
        "model.fitting_net.atom_ener=[1.0, None]",
        "loss.use_huber=True",
        "training.training_data.batch_size=[1, 2, 3]",
        "training.mixed_precision={'compute_prec': 'float16'}",
        "whatever",
    ]
    assert not any("_comment" in k for k in unsupported)
    assert preset["schedule"]["warmup_steps"] == 50 and preset["scale_by_worker"] == "sqrt"
    # the script prints the preset on stdout and each unsupported key on stderr
    src = tmp_path / "input.json"
    src.write_text(json.dumps(data))
    assert _script().main([str(src)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("# @package _global_\n")
    assert yaml.safe_load(out)["defaults"] == [{"override /data": "deepmd"}]
    assert "unsupported: model.descriptor.xyz\n" in err and "unsupported: whatever\n" in err
    assert "warning: system" in err  # ../data/data_0 does not exist next to tmp_path
    assert _script().main([str(src), "--strict"]) == 1
    capsys.readouterr()


def _compose_preset(tmp_path: Path, text: str, overrides: list[str], name: str = "imported"):
    """Compose train.yaml with the preset as experiment=<name>, found through an extra config search path."""
    group = tmp_path / "configs" / "experiment"
    group.mkdir(parents=True, exist_ok=True)
    (group / f"{name}.yaml").write_text(text)
    return compose_train([f"experiment={name}", f"hydra.searchpath=[file://{tmp_path / 'configs'}]", *overrides],
                         tmp_path / "run")


def test_imported_water_preset_composes_and_trains(water_json, tmp_path, capsys):
    from dpfit.cli.train import train

    src = _deepmd_layout(tmp_path, water_json)
    assert _script().main([str(src)]) == 0
    text, err = capsys.readouterr()
    assert err == ""  # everything translated, every system found
    cfg = _compose_preset(tmp_path, text, ["trainer.max_steps=3", "trainer.val_check_interval=3", *QUICK])
    assert cfg.data._target_ == "dpfit.data.datamodule.DeepmdDataModule"
    assert [Path(p).name for p in cfg.data.train_systems] == ["data_0", "data_1", "data_2"]
    assert all(Path(p).is_dir() for p in cfg.data.train_systems + cfg.data.val_systems)
    assert cfg.model.descriptor.sel == [46, 92] and cfg.model.descriptor.rcut == 6.0
    assert cfg.schedule.decay_steps == 5000 and cfg.loss.start_pref_f == 1000.0 and cfg.seed == 10
    value = train(cfg)
    assert value is not None and math.isfinite(value)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    rows = [r for r in (tmp_path / "run" / "lcurve.out").read_text().splitlines() if not r.startswith("#")]
    assert [r.split()[0] for r in rows] == ["1", "3"]  # a row at step 1, as DeePMD-kit 3.2 writes


def test_data_root_makes_portable_presets(water_json, tmp_path):
    preset, unsupported = convert_input(json.loads(water_json.read_text()), base_dir=water_json.parent,
                                        data_root="../data")
    assert unsupported == []
    assert preset["data"]["train_systems"] == [f"${{paths.data_root}}/data_{k}" for k in range(3)]
    cfg = _compose_preset(tmp_path, to_yaml(preset), [f"paths.data_root={water_json.parent}", *QUICK])
    assert list(cfg.data.val_systems) == [str(water_json.parent / "data_3")]


def test_finetune_from_deepmd_checkpoint_starts_from_its_predictions(water_fixture, shared_dir, tmp_path, run_model):
    """ckpt_init=<DeePMD-kit model.ckpt.pt> with experiment=water_se_e2_a: before any step the model gives
    DeePMD-kit's energies and forces (reference_data_3.npz) to 1e-10; then two training steps run."""
    from dpfit.cli.train import _init_from, build, train

    ckpt = water_fixture / "model.ckpt.pt"
    cfg = compose_train(["experiment=water_se_e2_a", f"paths.data_root={shared_dir / 'data' / 'water'}",
                         f"ckpt_init={ckpt}", "trainer.max_steps=2", "trainer.val_check_interval=2",
                         "trainer.limit_val_batches=1", "data.data_stat_nbatch=1", "~callbacks.progress_bar",
                         "trainer.enable_model_summary=false"], tmp_path)
    _, module, _ = build(cfg)
    _init_from(module, cfg.ckpt_init)
    assert bool(module.stats_ready)
    ref = np.load(water_fixture / "reference_data_3.npz")
    nf = 3
    out = run_model(module.model.eval(), ref["coord"][:nf], ref["atype"], ref["box"][:nf].reshape(-1, 3, 3),
                    virial=False)
    np.testing.assert_allclose(out["energy"], ref["energy"][:nf], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(out["force"], ref["force"][:nf], rtol=1e-10, atol=1e-10)
    davg = module.model.descriptor.davg.clone()

    value = train(cfg)  # builds again and initialises from ckpt_init itself
    assert math.isfinite(value)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert state["stats_ready"]
    torch.testing.assert_close(state["model.descriptor.davg"], davg, rtol=0, atol=0)  # statistics kept
    start = module.model.state_dict()
    moved = [k for k, v in start.items() if v.is_floating_point() and not torch.equal(state[f"model.{k}"], v)]
    assert moved, "two Adam steps should move the weights"


# ------------------------------------------------------------------------------------------------------------
# python train.py deepmd_input=input.json [overrides]: DeePMD-kit's dialects
# ------------------------------------------------------------------------------------------------------------

def _compose_json(tmp_path: Path, data: dict, overrides: list[str], capsys=None):
    """What ``train.py deepmd_input=<json> overrides`` composes (the json written under tmp_path/inputs)."""
    from dpfit.cli.deepmd import expand_deepmd_input

    folder = tmp_path / "inputs"
    folder.mkdir(exist_ok=True)
    src = folder / "input.json"
    src.write_text(json.dumps(data))
    before = src.read_bytes()
    argv = expand_deepmd_input([f"deepmd_input={src}", *overrides])
    assert src.read_bytes() == before  # the user's json is only read
    return compose_train(argv, tmp_path / "run")


def _water_systems(water_json: Path) -> list[str]:
    return [str(water_json.parent / f"data_{k}") for k in range(4)]


def test_todays_keys_with_validation_data_and_overrides_on_top(water_json, tmp_path, capsys):
    data = json.loads(water_json.read_text())
    systems = _water_systems(water_json)
    data["training"]["training_data"]["systems"] = systems[:3]
    data["training"]["validation_data"]["systems"] = systems[3:]
    data["model"]["descriptor"]["sel"] = "auto:1.2"
    data["model"]["descriptor"]["xyz"] = 1
    cfg = _compose_json(tmp_path, data, ["trainer.max_steps=7", "model.fitting_net.neuron=[16,16]"])
    assert "unsupported: model.descriptor.xyz" in capsys.readouterr().err
    assert cfg.data._target_ == "dpfit.data.datamodule.DeepmdDataModule"
    assert list(cfg.data.train_systems) == systems[:3] and list(cfg.data.val_systems) == systems[3:]
    assert cfg.data.numb_btch == 3 and cfg.data.val_batch_size == 1 and cfg.data.sel == "auto:1.2"
    assert list(cfg.model.descriptor.neuron) == [25, 50, 100] and cfg.model.descriptor.axis_neuron == 16
    assert list(cfg.model.fitting_net.neuron) == [16, 16]  # the override wins over the json's [240,240,240]
    assert cfg.trainer.max_steps == 7 and cfg.trainer.val_check_interval == 100
    assert cfg.callbacks.lcurve.disp_freq == 100 and cfg.seed == 10 and cfg.scale_by_worker == "linear"
    assert cfg.deepmd_input == str(tmp_path / "inputs" / "input.json")


def test_old_keys(tmp_path, capsys, water_json):
    """A DeePMD-kit 1.x input: se_a, n_neuron / n_axis_neuron, training.systems, stop_batch, numb_test,
    disp_training, time_training, decay_rate."""
    systems = _water_systems(water_json)
    old = {
        "model": {
            "type_map": ["O", "H"],
            "descriptor": {"type": "se_a", "sel": [46, 92], "rcut_smth": 5.8, "rcut": 6.0, "neuron": [8, 16],
                           "n_axis_neuron": 4, "resnet_dt": False, "seed": 3},
            "fitting_net": {"n_neuron": [32, 32], "resnet_dt": True, "seed": 4},
        },
        "learning_rate": {"type": "exp", "start_lr": 0.005, "decay_steps": 100, "decay_rate": 0.95},
        "loss": {"start_pref_e": 0.02, "limit_pref_e": 8, "start_pref_f": 1000, "limit_pref_f": 1,
                 "start_pref_v": 0, "limit_pref_v": 0},
        "training": {"systems": systems[:2], "set_prefix": "set", "stop_batch": 400, "batch_size": 2,
                     "seed": 1, "disp_file": "lcurve.out", "disp_freq": 10, "numb_test": 10, "save_freq": 100,
                     "save_ckpt": "model.ckpt", "disp_training": True, "time_training": True,
                     "profiling": False},
    }
    cfg = _compose_json(tmp_path, old, [])
    assert capsys.readouterr().err == ""  # every key understood
    assert list(cfg.data.train_systems) == systems[:2] and cfg.data.val_systems is None
    assert cfg.data.batch_size == 2 and list(cfg.data.sel) == [46, 92]
    assert cfg.model.descriptor.axis_neuron == 4 and list(cfg.model.fitting_net.neuron) == [32, 32]
    assert cfg.model.descriptor.rcut_smth == 5.8 and cfg.model.descriptor.seed == 3
    assert cfg.trainer.max_steps == 400 and cfg.trainer.val_check_interval == 10 and cfg.callbacks.lcurve.disp_freq == 10
    assert cfg.callbacks.model_checkpoint.every_n_train_steps == 100
    assert cfg.schedule.stop_lr == pytest.approx(0.005 * 0.95 ** (400 / 100), rel=1e-12)
    assert cfg.loss.limit_pref_e == 8.0


def test_missing_sel_is_auto_and_old_v2_aliases(tmp_path, capsys):
    data = {
        "model": {"type_map": ["A", "B"], "descriptor": {"type": "se_e2_a", "rcut": 5.0},
                  "fitting_net": {"neuron": [8]}},
        "training": {"training_data": {"systems": ["a", "b"], "auto_prob_style": "prob_uniform",
                                       "sys_weights": None},
                     "validation_data": {"systems": "c", "numb_batch": 2, "batch_size": "auto:8"},
                     "numb_steps": 5},
    }
    cfg = _compose_json(tmp_path, data, [])
    assert capsys.readouterr().err == ""
    assert cfg.data.sel == "auto"  # DeePMD-kit's default when sel is left out
    assert list(cfg.data.train_systems) == [str(tmp_path / "inputs" / s) for s in "ab"]  # next to the json
    assert list(cfg.data.val_systems) == [str(tmp_path / "inputs" / "c")]
    assert cfg.data.auto_prob == "prob_uniform" and cfg.data.numb_btch == 2 and cfg.data.val_batch_size == "auto:8"


def test_unreadable_input_is_one_line_error(tmp_path):
    from dpfit.cli.deepmd import expand_deepmd_input

    bad = tmp_path / "input.json"
    bad.write_text("{ not json")
    with pytest.raises(SystemExit, match=r"^error: deepmd_input=.*input.json: cannot be read"):
        expand_deepmd_input([f"deepmd_input={bad}"])
    with pytest.raises(SystemExit, match="error: deepmd_input=.*missing.json"):
        expand_deepmd_input([str(tmp_path / "missing.json")])  # dpfit-train input.json


def test_train_py_deepmd_input_on_the_shared_water_json(water_fixture, tmp_path):
    """python train.py deepmd_input=<fixtures/deepmd_water_se_e2_a/input.json> for a few steps."""
    import subprocess
    import sys

    src = water_fixture / "input.json"
    before = src.read_bytes()
    run = tmp_path / "run"
    args = [sys.executable, str(REPO / "train.py"), f"deepmd_input={src}", "trainer.max_steps=3", "kernels=off",
            "model.descriptor.neuron=[4,8]", "model.descriptor.axis_neuron=4", "model.fitting_net.neuron=[16,16]",
            "data.numb_btch=1", "data.data_stat_nbatch=1", "~callbacks.progress_bar", f"hydra.run.dir={run}"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "unsupported" not in proc.stderr
    assert src.read_bytes() == before
    assert (run / "deepmd_input.json").read_bytes() == before  # a copy is kept with the run
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["seed"] == 10 and saved["data"]["sel"] == [46, 92] and saved["schedule"]["decay_steps"] == 100
    assert [Path(p).name for p in saved["data"]["val_systems"]] == ["data_3"]
    rows = [r.split() for r in (run / "lcurve.out").read_text().splitlines() if not r.startswith("#")]
    assert [r[0] for r in rows] == ["1", "3"] and all(math.isfinite(float(x)) for r in rows for x in r)
    assert "Validation errors at step 3" in proc.stdout
