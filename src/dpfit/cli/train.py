"""``python train.py``: compose the Hydra config, instantiate data / model / loss / trainer, fit."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate, to_absolute_path
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from omegaconf import DictConfig, OmegaConf

from dpfit.cli.config_dir import CONFIG_DIR
from dpfit.cli.deepmd import expand_deepmd_input, keep_input_copy, resolve_auto_sel
from dpfit.training.allocator import keep_freed_memory
from dpfit.training.callbacks import summary_rows
from dpfit.training.module import WANDB_RUN_ID_KEY, DeepPotentialModule

log = logging.getLogger("dpfit.train")


def build(cfg: DictConfig, wandb_id: str | None = None):
    """Instantiate (datamodule, module, trainer) from a composed config; nothing is trained.

    ``wandb_id``: continue this W&B run (a resumed checkpoint's, see :func:`checkpoint_wandb_id`).
    """
    datamodule = instantiate(cfg.data, _convert_="all")
    module = DeepPotentialModule(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        loss=instantiate(cfg.loss),
        schedule=instantiate(cfg.schedule),
        scale_by_worker=cfg.get("scale_by_worker", "none"),
        kernels=cfg.get("kernels", "off"),
    )
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    loggers = []
    for c in (cfg.get("logger") or {}).values():
        if not c:
            continue
        if wandb_id and str(c.get("_target_", "")).endswith("WandbLogger") and not c.get("id"):
            loggers.append(instantiate(c, id=wandb_id, resume="allow"))
        else:
            loggers.append(instantiate(c))
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


def _last_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint Lightning's ``ckpt_path=last`` picks: the newest ``last*.ckpt`` of the checkpoint folder."""
    folder = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath")
    if not folder or not Path(folder).is_dir():
        return None
    found = [p for p in Path(folder).glob("last*.ckpt") if p.is_file()]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def checkpoint_wandb_id(path: str | None) -> str | None:
    """The W&B run id stored in a dpfit checkpoint (by the module's ``on_save_checkpoint``), if any."""
    if not path or not Path(path).is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 - not a zip checkpoint: no id
        return None
    return ckpt.get(WANDB_RUN_ID_KEY) if isinstance(ckpt, dict) else None


def _hydra_state() -> tuple[RunMode | None, list[str]]:
    """(run mode, hydra.* command-line overrides) of the Hydra app running this process."""
    if not HydraConfig.initialized():
        return None, []
    hc = HydraConfig.get()
    return hc.get("mode"), list(hc.overrides.hydra)


def _check_launch(cfg: DictConfig, trainer) -> None:
    """Stop launches that would make several run folders or resume the wrong run, with the fix."""
    mode, hydra_overrides = _hydra_state()
    run_dir_given = any(o.startswith("hydra.run.dir=") for o in hydra_overrides)
    if mode == RunMode.RUN and not run_dir_given:
        if cfg.get("ckpt_path") == "last" and _last_checkpoint(cfg) is None:
            raise ValueError("ckpt_path=last resumes <run folder>/checkpoints/last.ckpt: name the run folder with "
                             "hydra.run.dir=<run folder> (e.g. hydra.run.dir=outputs/2026-01-31/12-00-00-000000)")
        if trainer.world_size > 1 and trainer.strategy.cluster_environment.creates_processes_externally:
            raise ValueError(
                f"{trainer.world_size} processes started by torchrun/srun each composed their own run folder: give "
                "them one with hydra.run.dir=<run folder> (e.g. hydra.run.dir=outputs/run-$SLURM_JOB_ID)")
    launches = isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher) and trainer.world_size > 1
    if mode == RunMode.MULTIRUN and launches and not trainer.strategy.cluster_environment.creates_processes_externally:
        raise ValueError("a local multirun (-m) cannot start DDP processes: each would re-run the whole sweep. "
                         "Sweep with one process per run, or launch on SLURM: -m hydra/launcher=slurm")


def _keep_csv_history(trainer) -> None:
    """Resuming into a run folder: keep the CSV rows written so far (CSVLogger would delete metrics.csv)."""
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            old = Path(logger.log_dir) / "metrics.csv"
            if old.is_file():
                n = 1
                while (old.parent / f"metrics.{n}.csv").exists():
                    n += 1
                old.rename(old.parent / f"metrics.{n}.csv")
                log.info("resuming: earlier CSV metrics kept in %s", old.parent / f"metrics.{n}.csv")


def log_config(trainer, cfg: DictConfig, module: DeepPotentialModule) -> None:
    """Send the resolved config and the number of trainable parameters to every logger (W&B config, hparams)."""
    params = OmegaConf.to_container(cfg, resolve=True)
    params["n_params"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    for logger in trainer.loggers:
        logger.log_hyperparams(params)


def train(cfg: DictConfig) -> float | None:
    """Fit and return ``cfg.optimized_metric`` (for sweeps)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_default_dtype(torch.float32)
    if cfg.get("keep_freed_memory", True):
        keep_freed_memory()
    ckpt_path = _resolve_ckpt(cfg.get("ckpt_path"))
    resume_from = _last_checkpoint(cfg) if ckpt_path == "last" else ckpt_path
    resolve_auto_sel(cfg, resume_from)  # data.sel=auto: counted (or the checkpoint's) before anything is built
    datamodule, module, trainer = build(cfg, wandb_id=checkpoint_wandb_id(resume_from))
    _check_launch(cfg, trainer)
    if cfg.get("ckpt_init"):
        _init_from(module, cfg.ckpt_init)
    out = Path(cfg.paths.output_dir)
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        keep_input_copy(cfg, out)
        if resume_from:
            _keep_csv_history(trainer)
        log_config(trainer, cfg, module)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if cfg.get("summary", True) and module.validated_at != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the final numbers are the final weights
    metrics = dict(trainer.callback_metrics)
    if cfg.get("summary", True) and trainer.is_global_zero:
        _print_summary(metrics, module.validated_at, out, getattr(datamodule, "val_set_names", ()))
    value = metrics.get(cfg.get("optimized_metric") or "")
    _finish_wandb(trainer)
    return float(value) if value is not None else None


def _finish_wandb(trainer) -> None:
    """Close the W&B run, so the next run of a sweep in this process starts its own."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero and logger._experiment is not None:
            logger.experiment.finish()


def _print_summary(metrics: dict, step: int, out: Path, sets: list[str] | tuple = ()) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"Validation errors at step {step} (the last step)")
    for col in (("set",) if sets else ()) + ("quantity", "RMSE", "MAE"):
        table.add_column(col)
    for row in summary_rows(metrics, sets):
        table.add_row(*(escape(c) for c in row))  # "[eV]" would be read as rich markup
    console = Console()
    console.print(table)
    console.print(f"run folder: {out}")


def external_world_size() -> int:
    """Processes started by torchrun or srun for this run (1 when this process starts its own ranks)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return int(os.environ.get("WORLD_SIZE", "1"))
    if SLURMEnvironment.detect():
        return int(os.environ.get("SLURM_NTASKS", "1"))
    return 1


def refuse_split_run_folder(argv: list[str]) -> None:
    """torchrun / srun start every rank as its own ``python train.py``: without ``hydra.run.dir`` each would
    make its own timestamped run folder. Stop before Hydra makes any (multiruns use the shared sweep folder)."""
    if any(a in ("-m", "--multirun") for a in argv) or any(a.startswith("hydra.run.dir=") for a in argv):
        return
    world = external_world_size()
    if world > 1:
        sys.exit(f"dpfit: {world} processes started by torchrun/srun need one run folder: add "
                 "hydra.run.dir=<run folder>, e.g. hydra.run.dir=outputs/run-$SLURM_JOB_ID")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    return train(cfg)


def main() -> None:
    """``python train.py`` / ``dpfit-train``."""
    sys.argv[1:] = expand_deepmd_input(sys.argv[1:])  # deepmd_input=input.json -> overrides
    refuse_split_run_folder(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
