"""``python train.py``: compose the Hydra config, instantiate data / model / loss / trainer, fit."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from dpfit.cli.config_dir import CONFIG_DIR
from dpfit.training.callbacks import summary_rows
from dpfit.training.module import DeepPotentialModule

log = logging.getLogger("dpfit.train")


def build(cfg: DictConfig):
    """Instantiate (datamodule, module, trainer) from a composed config; nothing is trained."""
    datamodule = instantiate(cfg.data, _convert_="all")
    module = DeepPotentialModule(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        loss=instantiate(cfg.loss),
        schedule=instantiate(cfg.schedule),
        scale_by_worker=cfg.get("scale_by_worker", "none"),
    )
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return datamodule, module, trainer


def _init_from(module: DeepPotentialModule, path: str) -> None:
    """Copy weights and statistics of a dpfit or DeePMD-kit checkpoint (architectures must match)."""
    from dpfit.io.checkpoint import load_model

    source = load_model(to_absolute_path(path), precision=module.model.config.get("precision"))
    if source.type_map != module.model.type_map:
        raise ValueError(f"{path}: type_map {source.type_map} differs from the config's {module.model.type_map}")
    try:
        module.model.load_state_dict(source.state_dict())
    except RuntimeError as exc:
        raise ValueError(f"{path}: architecture differs from the config ({exc})") from exc
    module.stats_ready.fill_(True)
    log.info("initialised weights and statistics from %s", path)


def _resolve_ckpt(ckpt_path: str | None) -> str | None:
    if ckpt_path in (None, "last"):
        return ckpt_path
    path = Path(to_absolute_path(ckpt_path))
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint")
    return str(path)


def train(cfg: DictConfig) -> float | None:
    """Fit and return ``cfg.optimized_metric`` (for sweeps)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_default_dtype(torch.float32)
    datamodule, module, trainer = build(cfg)
    if cfg.get("ckpt_init"):
        _init_from(module, cfg.ckpt_init)
    out = Path(cfg.paths.output_dir)
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=_resolve_ckpt(cfg.get("ckpt_path")))
    if cfg.get("summary", True) and "val/rmse_f" not in trainer.callback_metrics and "val/rmse_e" not in trainer.callback_metrics:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = dict(trainer.callback_metrics)
    if cfg.get("summary", True) and trainer.is_global_zero:
        _print_summary(metrics, trainer, out)
    value = metrics.get(cfg.get("optimized_metric") or "")
    return float(value) if value is not None else None


def _print_summary(metrics: dict, trainer, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Validation errors after {trainer.global_step} steps")
    for col in ("quantity", "RMSE", "MAE"):
        table.add_column(col)
    for row in summary_rows(metrics):
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print(f"run folder: {out}")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
