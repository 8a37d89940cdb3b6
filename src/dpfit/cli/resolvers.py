"""OmegaConf resolvers used by the configs (registered when ``dpfit.cli.config_dir`` is imported).

``${sweep_group:}``: the W&B group of a run: in a Hydra multirun (a grid or an Optuna sweep, local or
SLURM) the last two parts of ``hydra.sweep.dir`` (``<date>/<time>`` by default), the same for every job
of the sweep; ``null`` in a single run.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def sweep_group() -> str | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.get("mode") != RunMode.MULTIRUN:
        return None
    parts = Path(str(hydra_cfg.sweep.dir)).parts
    return "/".join(parts[-2:])[-128:]  # W&B groups are at most 128 characters


def register() -> None:
    if not OmegaConf.has_resolver("sweep_group"):
        OmegaConf.register_new_resolver("sweep_group", sweep_group)
