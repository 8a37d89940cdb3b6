"""``python train.py``: compose the Hydra config, instantiate data / model / loss / trainer, fit."""

from __future__ import annotations

import contextlib
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
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from dpfit.cli.config_dir import CONFIG_DIR
from dpfit.cli.deepmd import expand_deepmd_input, keep_input_copy, resolve_auto_sel
from dpfit.cli.errors import one_line_errors, run_cli
from dpfit.cli.run_folder import refuse_fresh_run, run_folder_lock
from dpfit.cli.validate import validate_train_config
from dpfit.errors import CheckpointError, ConfigError, Preempted
from dpfit.training.allocator import keep_freed_memory
from dpfit.training.callbacks import summary_rows
from dpfit.training.guards import Preemption, remove_marker, write_marker
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
        kernels=cfg.get("kernels"),
        nonfinite_loss=cfg.get("nonfinite_loss", "stop"),
    )
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if not any(isinstance(c, Preemption) for c in callbacks):
        callbacks.append(Preemption())  # SIGTERM / SIGUSR1: checkpoint at the current step, exit 128 + signal
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
        raise CheckpointError(f"ckpt_init={path}: type_map {source.type_map} differs from the config's "
                              f"{module.model.type_map}: set data.type_map={_list(source.type_map)}")
    try:
        module.model.load_state_dict(source.state_dict())
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln.strip() for ln in first if "size mismatch" in ln or "Missing key" in ln), first[0] if first else "")
        raise CheckpointError(f"ckpt_init={path}: its architecture differs from the config ({detail})") from exc
    module.stats_ready.fill_(True)
    log.info("initialised weights and statistics from %s", path)


def _list(values) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


def _resolve_ckpt(ckpt_path: str | None) -> str | None:
    if ckpt_path in (None, "last"):
        return ckpt_path
    path = Path(to_absolute_path(ckpt_path))
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={ckpt_path}: no such checkpoint")
    return str(path)


def _last_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint Lightning's ``ckpt_path=last`` picks: the newest ``last*.ckpt`` of the checkpoint folder."""
    folder = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath")
    if not folder or not Path(folder).is_dir():
        return None
    found = [p for p in Path(folder).glob("last*.ckpt") if p.is_file()]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def checkpoint_wandb_id(path: str | None) -> str | None:  # kept for scripts and tests
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
            raise ConfigError("ckpt_path=last resumes <run folder>/checkpoints/last.ckpt: name the run folder with "
                             "hydra.run.dir=<run folder> (e.g. hydra.run.dir=outputs/2026-01-31/12-00-00-000000)")
        if trainer.world_size > 1 and trainer.strategy.cluster_environment.creates_processes_externally:
            raise ConfigError(
                f"{trainer.world_size} processes started by torchrun/srun each composed their own run folder: give "
                "them one with hydra.run.dir=<run folder> (e.g. hydra.run.dir=outputs/run-$SLURM_JOB_ID)")
    launches = isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher) and trainer.world_size > 1
    if mode == RunMode.MULTIRUN and launches and not trainer.strategy.cluster_environment.creates_processes_externally:
        raise ConfigError("a local multirun (-m) cannot start DDP processes: each would re-run the whole sweep. "
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


def _rank_zero_process() -> bool:
    """False in the processes a launcher started for ranks other than 0 (their rank is in the environment)."""
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        value = os.environ.get(var)
        if value not in (None, "", "0") and not (var == "SLURM_PROCID" and os.environ.get("SLURM_NTASKS", "1") == "1"):
            return False
    return True


def _slurm_requeued(out: Path) -> str | None:
    """On SLURM, a requeued job (preempted or timed out) continues its run: the newest checkpoint to resume."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect() or not (out / "INCOMPLETE").is_file():
        return None
    from dpfit.training.resume import newest_readable

    found = [f for f in (newest_readable(out / "checkpoints"), newest_readable(out)) if f]
    return str(max(found, key=lambda f: f[1])[0]) if found else None


def train(cfg: DictConfig) -> float | None:
    """Fit and return ``cfg.optimized_metric`` (for sweeps)."""
    from dpfit.training.resume import check_resume, read_checkpoint

    validate_train_config(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_default_dtype(torch.float32)
    if cfg.get("keep_freed_memory", True):
        keep_freed_memory()
    out = Path(cfg.paths.output_dir)
    ckpt_path = _resolve_ckpt(cfg.get("ckpt_path"))
    if ckpt_path is None and not cfg.get("ckpt_init"):
        ckpt_path = _slurm_requeued(out)
        if ckpt_path:
            log.info("requeued SLURM job: resuming %s", ckpt_path)
    resume_from = _last_checkpoint(cfg) if ckpt_path == "last" else ckpt_path
    rank0 = _rank_zero_process()
    if rank0:
        refuse_fresh_run(out, resume_from)
    resolve_auto_sel(cfg, resume_from)  # data.sel=auto: counted (or the checkpoint's) before anything is built
    wandb_id = None
    if resume_from:  # read and compared before anything in the run folder changes
        ckpt = read_checkpoint(resume_from)
        check_resume(ckpt, resume_from, OmegaConf.to_container(cfg.model, resolve=True))
        wandb_id = ckpt.get(WANDB_RUN_ID_KEY)
        del ckpt
    with run_folder_lock(out) if rank0 else contextlib.nullcontext():
        return _fit(cfg, out, ckpt_path, resume_from, wandb_id)


def _fit(cfg: DictConfig, out: Path, ckpt_path: str | None, resume_from: str | None, wandb_id: str | None):
    datamodule, module, trainer = build(cfg, wandb_id=wandb_id)
    _check_launch(cfg, trainer)
    if cfg.get("ckpt_init"):
        _init_from(module, cfg.ckpt_init)
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, "training (or stopped without a trace: killed); continue with ckpt_path=last\n")
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        keep_input_copy(cfg, out)
        if resume_from:
            _keep_csv_history(trainer)
        log_config(trainer, cfg, module)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException as exc:  # SIGTERM during validation: the Preemption callback saved a checkpoint
        stop = next((c for c in trainer.callbacks if isinstance(c, Preemption) and getattr(c, "stopped", None)), None)
        if stop is not None:
            raise stop.stopped from None
        import signal

        raise Preempted(f"stopped by a signal at step {trainer.global_step}; continue with "
                        f"`python train.py hydra.run.dir={out} ckpt_path=last`", signal.SIGTERM) from exc
    except Preempted:
        raise  # the Preemption callback wrote the marker
    except Exception as exc:
        if trainer.is_global_zero:
            write_marker(out, f"stopped at step {trainer.global_step} by an error: {str(exc).strip()[:500]}\n")
        raise
    if cfg.get("summary", True) and module.validated_at != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the final numbers are the final weights
    metrics = dict(trainer.callback_metrics)
    if cfg.get("summary", True) and trainer.is_global_zero:
        _print_summary(metrics, module.validated_at, out, getattr(datamodule, "val_set_names", ()))
    if trainer.is_global_zero:
        remove_marker(out)
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


def refuse_fresh_run_early(argv: list[str]) -> None:
    """``hydra.run.dir=<folder holding a run>`` without ``ckpt_path``: refuse before Hydra writes its own files
    (.hydra/, train.log) into that folder. :func:`train` checks again with the composed config."""
    if any(a in ("-m", "--multirun") for a in argv):
        return
    given = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    if not given or any(a.lstrip("+").startswith("ckpt_path=") and a.split("=", 1)[1] not in ("", "null")
                        for a in argv):
        return
    try:
        refuse_fresh_run(Path(given[-1]), None)
    except Exception as exc:  # noqa: BLE001 - reported as one line
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(getattr(exc, "exit_code", 1)) from None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@one_line_errors
def _hydra_main(cfg: DictConfig) -> float | None:
    return train(cfg)


def main() -> None:
    """``python train.py`` / ``dpfit-train``."""
    sys.argv[1:] = expand_deepmd_input(sys.argv[1:])  # deepmd_input=input.json -> overrides
    refuse_split_run_folder(sys.argv[1:])
    refuse_fresh_run_early(sys.argv[1:])
    run_cli(_hydra_main)


if __name__ == "__main__":
    main()
