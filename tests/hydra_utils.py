"""Compose the project's Hydra configs in-process for tests."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from dpfit.cli.config_dir import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def compose_train(overrides: list[str], out: Path, config_name: str = "train"):
    """The composed train config, with its run folder set to ``out`` (as Hydra would at run time)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.root_dir = str(REPO)
        del cfg["hydra"]
    return cfg


FAST = ["trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=2",
        "data.data_stat_nbatch=1", "~callbacks.progress_bar", "trainer.enable_model_summary=false",
        "model.descriptor.neuron=[4,8]", "model.descriptor.axis_neuron=4", "model.fitting_net.neuron=[16,16]"]
