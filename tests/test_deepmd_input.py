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
    assert preset["callbacks"] == {"model_checkpoint": {"every_n_train_steps": 1000}, "lcurve": {"filename": "lcurve.out"}}
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
    assert len(rows) == 1 and rows[0].split()[0] == "3"


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
