"""Every option of every config group composes and instantiates; typos stop the run with the key's name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from hydra_utils import SHARED, compose_train
from omegaconf import OmegaConf

from dpfit.cli.config_dir import CONFIG_DIR
from dpfit.cli.train import build

GROUPS = ["data", "model", "loss", "schedule", "trainer", "logger", "callbacks", "paths", "experiment", "debug",
          "hparams_search"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


CASES = [(g, o) for g in GROUPS for o in _options(g)]


#: options that need a partner option of another group (the property model and its loss)
PARTNERS = {("model", "se_e2_a_property"): ["loss=property"], ("loss", "property"): ["model=se_e2_a_property"]}


def _extra(group: str, option: str) -> list[str]:
    if (group, option) in PARTNERS:
        return PARTNERS[group, option]
    if group == "experiment" or option == "deepmd":
        root = SHARED / "data" / "water"
        if not root.is_dir():
            pytest.skip("../shared/data/water not available")
        if option == "deepmd":
            return [f"data.train_systems=[{root / 'data_0'}]", "data.type_map=[O,H]", "data.sel=[46,92]"]
        return [f"paths.data_root={root}"]
    return []


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_group_option_composes_and_instantiates(tmp_path, group, option):
    if group == "logger" and option in ("wandb", "many", "tensorboard"):
        pytest.importorskip("wandb")
        pytest.importorskip("tensorboard")
    if group == "hparams_search":
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_train([f"{group}={option}", *_extra(group, option)], tmp_path)
    OmegaConf.resolve(cfg)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        cfg.trainer.accelerator = "cpu"  # composed as gpu; instantiated here on the CPU-only machine
    datamodule, module, trainer = build(cfg)
    assert module.model.type_map == list(cfg.model.type_map)
    assert trainer.max_steps == cfg.trainer.max_steps
    assert datamodule.rcut == cfg.model.descriptor.rcut
    instantiate(cfg.schedule)


def test_unknown_key_is_refused_with_its_name(tmp_path):
    with pytest.raises(ConfigCompositionException, match="start_pref_q"):
        compose_train(["loss.start_pref_q=1"], tmp_path)


def test_unknown_group_option_is_refused_with_its_name(tmp_path):
    with pytest.raises(MissingConfigException, match="relative_forse"):
        compose_train(["loss=relative_forse"], tmp_path)
