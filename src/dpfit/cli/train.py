"""``python train.py``: compose the Hydra config, instantiate data / model / loss / trainer, fit."""

from __future__ import annotations

import contextlib
import errno
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
from dpfit.errors import CheckpointError, ConfigError, NonFiniteLossError, Preempted, RunFolderError
from dpfit.io.checkpoint import safe_globals
from dpfit.training.allocator import keep_freed_memory
from dpfit.training.callbacks import summary_rows
from dpfit.training.guards import Preemption, SigtermBeforeTraining, remove_marker, resume_command, write_marker
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
    if OmegaConf.select(cfg, "trainer.enable_progress_bar") is False:  # Lightning refuses a bar it cannot show
        from lightning.pytorch.callbacks import ProgressBar

        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
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
    from dpfit.training.checkpoint_io import SafeCheckpointIO

    trainer_cfg = cfg.trainer
    plugins = [SafeCheckpointIO()]  # checkpoints read safely and written atomically
    if trainer_cfg.get("plugins"):
        plugins = [*instantiate(trainer_cfg.plugins), *plugins]
        trainer_cfg = OmegaConf.masked_copy(trainer_cfg, [k for k in trainer_cfg if k != "plugins"])
    trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False, plugins=plugins)
    return datamodule, module, trainer


def _init_from(module: DeepPotentialModule, path: str) -> None:
    """Copy weights and statistics of a dpfit or DeePMD-kit checkpoint (architectures must match)."""
    from dpfit.io.checkpoint import load_model
    from dpfit.training.resume import USER_KEY, model_mismatches, show

    source = load_model(to_absolute_path(path), precision=module.model.config.get("precision"))
    if source.type_map != module.model.type_map:
        raise CheckpointError(f"ckpt_init={path}: type_map {source.type_map} differs from the config's "
                              f"{module.model.type_map}: set data.type_map={_list(source.type_map)}")
    diffs = [d for d in model_mismatches(dict(source.config), dict(module.model.config)) if d[0] != "precision"]
    if diffs:
        parts = [f"{USER_KEY.get(label, 'model.' + label)}={show(b)} (ckpt_init: {show(a)})" for label, a, b in diffs]
        raise CheckpointError(f"ckpt_init={path} has a different architecture: {'; '.join(parts)}. Set the "
                              "config to the checkpoint's values to start from its weights")
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


def _last_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint Lightning's ``ckpt_path=last`` picks: the newest ``last*.ckpt`` of the checkpoint folder."""
    folder = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath")
    if not folder or not Path(folder).is_dir():
        return None
    found = [p for p in Path(folder).glob("last*.ckpt") if p.is_file()]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def _checkpoint_of_run(folder: Path) -> str | None:
    """The checkpoint a resume of the run in ``folder`` continues from: ``checkpoints/last.ckpt`` (the newest
    ``last*.ckpt``; read later, a truncated one named with the newest readable one beside it), else the
    readable checkpoint of the highest step (``checkpoints/``, SLURM's ``hpc_ckpt_*.ckpt``); None when the
    run has none (it stopped before its first checkpoint)."""
    from dpfit.training.resume import newest_readable

    ckpts = folder / "checkpoints"
    last = [p for p in ckpts.glob("last*.ckpt") if p.is_file()] if ckpts.is_dir() else []
    if last:
        return str(max(last, key=lambda p: p.stat().st_mtime))
    found = [f for f in (newest_readable(ckpts) if ckpts.is_dir() else None, newest_readable(folder)) if f]
    if found:
        return str(max(found, key=lambda f: f[1])[0])
    unreadable = sorted([*ckpts.glob("*.ckpt"), *folder.glob("hpc_ckpt_*.ckpt")], key=lambda p: p.stat().st_mtime)
    return str(unreadable[-1]) if unreadable else None  # reported by read_checkpoint


def _resume_target(cfg: DictConfig, run: Path | None, out: Path) -> tuple[str | None, bool]:
    """(checkpoint file to resume, restart): ``restart`` when the run folder resumed has no checkpoint yet
    (stopped before the first one): it trains again from step 0 with its stored config."""
    arg = cfg.get("ckpt_path")
    if arg is None or str(arg) in ("", "null"):
        return None, False
    if str(arg) != "last":
        path = Path(to_absolute_path(str(arg)))
        if path.is_file():
            return str(path), False
        if not path.is_dir():
            raise CheckpointError(f"ckpt_path={arg}: no such checkpoint")
        if run is None or not (run / "checkpoints").is_dir() and not (run / "config.yaml").is_file():
            raise CheckpointError(f"ckpt_path={arg}: a folder without a dpfit run (no config.yaml or checkpoints/): "
                                  "give a run folder or a checkpoint file")
    folder = run if run is not None else out
    found = _checkpoint_of_run(folder) if run is not None else _last_checkpoint(cfg)
    if found is not None:
        return found, False
    if folder.resolve() != out.resolve() or not (folder / "config.yaml").is_file():
        if str(arg) == "last":
            return None, False  # nothing to resume in a folder that never trained: Lightning starts fresh
        raise CheckpointError(f"ckpt_path={arg}: {folder} holds no checkpoint to resume")
    log.warning("%s has no checkpoint yet (the run stopped before its first one): it trains again from step 0 "
                "with its stored config", folder)
    return None, True


def checkpoint_wandb_id(path: str | None) -> str | None:  # kept for scripts and tests
    """The W&B run id stored in a dpfit checkpoint (by the module's ``on_save_checkpoint``), if any."""
    if not path or not Path(path).is_file():
        return None
    from dpfit.io.checkpoint import load_checkpoint

    try:
        ckpt = load_checkpoint(path, mmap=True)
    except CheckpointError:  # unreadable or refused: no id
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
    _refuse_last_without_run_folder(cfg)
    mode, hydra_overrides = _hydra_state()
    run_dir_given = any(o.startswith("hydra.run.dir=") for o in hydra_overrides)
    if mode == RunMode.RUN and not run_dir_given:
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


def _refuse_last_without_run_folder(cfg: DictConfig) -> None:
    mode, hydra_overrides = _hydra_state()
    run_dir_given = any(o.startswith("hydra.run.dir=") for o in hydra_overrides)
    if mode == RunMode.RUN and not run_dir_given and cfg.get("ckpt_path") == "last" and _last_checkpoint(cfg) is None:
        raise ConfigError("ckpt_path=last resumes <run folder>/checkpoints/last.ckpt: name the run folder with "
                          "hydra.run.dir=<run folder>, or give it as ckpt_path=<run folder>")


def train(cfg: DictConfig) -> float | None:
    """Fit and return ``cfg.optimized_metric`` (for sweeps)."""
    out = Path(cfg.paths.output_dir)
    try:
        with SigtermBeforeTraining():
            return _train(cfg, out)
    except Preempted as exc:
        if not str(exc).startswith(EARLY_STOP):
            raise
        if not (out / "config.yaml").is_file():
            raise Preempted(f"{EARLY_STOP}; nothing was written: run the same command again", exc.signum) from None
        message = f"{EARLY_STOP} (no new checkpoint); continue with {resume_command(out)}"
        if _rank_zero_process():
            write_marker(out, message + "\n")
        raise Preempted(message, exc.signum) from None


EARLY_STOP = "stopped by SIGTERM before training started"


def _train(cfg: DictConfig, out: Path) -> float | None:
    from dpfit.cli.resume import STORED_CONFIG, resume_config, run_folder_of
    from dpfit.training.resume import check_resume, read_checkpoint

    _refuse_last_without_run_folder(cfg)
    arg = cfg.get("ckpt_path")
    run = run_folder_of(arg, out if str(arg) == "last" else None) if arg else None
    if run is not None and (run / STORED_CONFIG).is_file():
        cfg = resume_config(cfg, run, str(arg))  # the run's config; overrides of model or data are refused
    validate_train_config(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_default_dtype(torch.float32)
    if cfg.get("keep_freed_memory", True):
        keep_freed_memory()
    resume_from, restart = _resume_target(cfg, run, out)
    if resume_from is None and not restart and not cfg.get("ckpt_init"):
        resume_from = _slurm_requeued(out)
        if resume_from:
            log.info("requeued SLURM job: resuming %s", resume_from)
    rank0 = _rank_zero_process()
    if rank0 and not restart:
        refuse_fresh_run(out, resume_from)
    resolve_auto_sel(cfg, resume_from)  # data.sel=auto: counted (or the checkpoint's) before anything is built
    wandb_id = None
    if resume_from:  # read and compared before anything in the run folder changes
        ckpt = read_checkpoint(resume_from)
        check_resume(ckpt, resume_from, OmegaConf.to_container(cfg.model, resolve=True))
        wandb_id = ckpt.get(WANDB_RUN_ID_KEY)
        _tell_schedule_extension(ckpt, cfg, resume_from)
        del ckpt
    with run_folder_lock(out) if rank0 else contextlib.nullcontext():
        return _fit(cfg, out, resume_from, restart, wandb_id)


def _tell_schedule_extension(ckpt: dict, cfg: DictConfig, path: str) -> None:
    """A resume to a ``trainer.max_steps`` beyond the checkpoint's learning-rate schedule: say which rate the
    added steps train at (the schedule's last; the schedule is the checkpoint's) and how to restart it."""
    try:
        sched = ckpt["lr_schedulers"][0]["lr_lambdas"][0]
        num_steps, step = int(sched["num_steps"]), int(ckpt.get("global_step", 0))
        start, stop = float(sched["start_lr"]), float(sched["stop_lr"])
        warmup, decay_steps, rate = int(sched.get("warmup_steps", 0)), int(sched["decay_steps"]), float(sched["decay_rate"])
    except (KeyError, IndexError, TypeError, ValueError):
        return
    max_steps = int(OmegaConf.select(cfg, "trainer.max_steps", default=0) or 0)
    if max_steps <= num_steps:
        return
    final = max(start * rate ** (max(num_steps - warmup, 0) // decay_steps), stop)
    log.warning(
        "trainer.max_steps=%d goes beyond this run's learning-rate schedule (schedule.num_steps=%d, decaying from "
        "start_lr=%.3g to stop_lr=%.3g): steps %d-%d train at lr=%.3g, the schedule's last rate (as DeePMD-kit's "
        "--restart). To decay again from a higher rate, start a new run from these weights: python train.py "
        "ckpt_init=%s trainer.max_steps=%d schedule.start_lr=<rate> ...", max_steps, num_steps, start, stop,
        max(step, num_steps) + 1, max_steps, final, path, max_steps - step)


#: errno of a write that failed for lack of room (disk full, file too large, quota) or a read-only disk
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO}


def _write_failure(exc: BaseException) -> tuple[str, str] | None:
    """(file, reason) of a failed write somewhere in ``exc``'s chain, if that is what stopped the run."""
    from dpfit.io.checkpoint import CheckpointWriteError

    link, seen = exc, set()
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, CheckpointWriteError):
            return str(link.path), link.reason
        if isinstance(link, OSError) and link.errno in _NO_ROOM:
            return str(link.filename or "a file of the run folder"), (link.strerror or str(link)).lower()
        link = link.__cause__ or link.__context__
    return None


def _newest_intact(out: Path) -> str:
    from dpfit.training.resume import newest_readable

    found = newest_readable(out / "checkpoints") if (out / "checkpoints").is_dir() else None
    if found:
        return f"the newest checkpoint {found[0]} (step {found[1]}) is intact"
    return "no checkpoint was written yet (the run will train again from step 0)"


def _fit(cfg: DictConfig, out: Path, resume_from: str | None, restart: bool, wandb_id: str | None):
    from dpfit.cli.resume import stored_config_text

    datamodule, module, trainer = build(cfg, wandb_id=wandb_id)
    _check_launch(cfg, trainer)
    if cfg.get("ckpt_init") and not resume_from:  # a resume restores its own weights
        _init_from(module, cfg.ckpt_init)
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, f"training (or stopped without a trace: killed); continue with {resume_command(out)}\n")
        (out / "config.yaml").write_text(stored_config_text(cfg, _cwd()))
        keep_input_copy(cfg, out)
        if resume_from or restart:
            _keep_csv_history(trainer)
        if restart:
            _supersede_lcurve(trainer)
        log_config(trainer, cfg, module)
    try:
        with safe_globals():
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    except SIGTERMException as exc:  # SIGTERM during validation: the Preemption callback saved a checkpoint
        stop = next((c for c in trainer.callbacks if isinstance(c, Preemption) and getattr(c, "stopped", None)), None)
        if stop is not None:
            raise stop.stopped from None
        import signal

        raise Preempted(f"stopped by a signal at step {trainer.global_step}; continue with {resume_command(out)}",
                        signal.SIGTERM) from exc
    except Preempted:
        raise  # the Preemption callback wrote the marker (or train() does, before training started)
    except SystemExit:  # Lightning ends a Ctrl-C (KeyboardInterrupt) with exit(1) after its teardown
        from lightning.pytorch.trainer.states import TrainerStatus

        if trainer.state.status != TrainerStatus.INTERRUPTED:
            raise
        import signal

        message = (f"interrupted (Ctrl-C) at step {trainer.global_step}; {_newest_intact(out)}: continue with "
                   f"{resume_command(out)}")
        if trainer.is_global_zero:
            write_marker(out, message + "\n")
        raise Preempted(message, signal.SIGINT) from None
    except Exception as exc:
        failed = _write_failure(exc)
        if failed is not None:  # disk full, file too large, quota: say what is safe and how to continue
            file, reason = failed
            message = (f"cannot write {file}: {reason} (at step {trainer.global_step}); {_newest_intact(out)}: make "
                       f"room, then continue with {resume_command(out)}")
            if trainer.is_global_zero:
                write_marker(out, message + "\n")
            raise RunFolderError(message) from exc
        if trainer.is_global_zero:
            write_marker(out, f"stopped at step {trainer.global_step} by an error: {str(exc).strip()[:500]}; after "
                              f"fixing it, continue with {resume_command(out)}\n")
        raise
    total = _val_frames(datamodule)
    if cfg.get("summary", True) and total and (module.validated_at != trainer.global_step
                                                or module.validated_frames < total):
        _validate_all(trainer, module, datamodule)  # the final numbers: the final weights, every validation frame
    metrics = dict(trainer.callback_metrics)
    if cfg.get("summary", True) and trainer.is_global_zero:
        _print_summary(metrics, module.validated_at, out, getattr(datamodule, "val_set_names", ()),
                       module.validated_frames, total)
    _refuse_mostly_skipped(module, trainer, out)
    if trainer.is_global_zero:
        remove_marker(out)
    value = metrics.get(cfg.get("optimized_metric") or "")
    _finish_wandb(trainer)
    return float(value) if value is not None else None


def _cwd() -> str:
    """The directory train.py ran in (relative paths of the config are taken from it)."""
    return HydraConfig.get().runtime.cwd if HydraConfig.initialized() else os.getcwd()


def _supersede_lcurve(trainer) -> None:
    """Training again from step 0 in a run folder: the earlier rows of lcurve.out move to lcurve.out.superseded."""
    from dpfit.training.callbacks import LCurveWriter

    for cb in trainer.callbacks:
        if isinstance(cb, LCurveWriter):
            path = Path(trainer.default_root_dir) / cb.filename
            if path.is_file():
                with open(path.with_name(path.name + ".superseded"), "a") as fh:
                    fh.write(path.read_text())
                path.unlink()


def _val_frames(datamodule) -> int:
    return int(sum(len(v.indices) for v in getattr(datamodule, "val_views", None) or []))


def _validate_all(trainer, module, datamodule) -> None:
    """Validate on every frame of the validation set (whatever ``trainer.limit_val_batches`` and
    ``data.numb_btch`` limit the periodic validations to)."""
    limit, numb = trainer.limit_val_batches, getattr(datamodule, "numb_btch", None)
    trainer.limit_val_batches = 1.0
    datamodule.numb_btch = None
    try:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    finally:
        trainer.limit_val_batches = limit
        datamodule.numb_btch = numb


def _refuse_mostly_skipped(module, trainer, out: Path) -> None:
    """``nonfinite_loss=skip`` that skipped most of the run's steps: the run did not train; exit 1, not 0."""
    steps = trainer.global_step - module.start_step
    if module.skipped_batches and 2 * module.skipped_batches > steps:
        message = (f"{module.skipped_batches} of the {steps} training steps of this run were skipped for a non-finite "
                   "loss (nonfinite_loss=skip): the model did not train; the warnings above name the systems and "
                   "frames: fix or remove them (nonfinite_loss=stop stops at the first)")
        if trainer.is_global_zero:
            write_marker(out, message + "\n")
        raise NonFiniteLossError(message)


def _finish_wandb(trainer) -> None:
    """Close the W&B run, so the next run of a sweep in this process starts its own."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero and logger._experiment is not None:
            logger.experiment.finish()


def _print_summary(metrics: dict, step: int, out: Path, sets: list[str] | tuple = (), frames: int = 0,
                   total: int = 0) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    if not total:
        console.print("no validation frames (data.val_systems not given and data.val_fraction held none out): "
                      "no final validation errors")
        console.print(f"run folder: {out}")
        return
    on = f"all {frames} validation frames" if frames >= total else f"{frames} of the {total} validation frames"
    table = Table(title=f"Validation errors at step {step} (the last step)")
    for col in (("set",) if sets else ()) + ("quantity", "RMSE", "MAE"):
        table.add_column(col)
    for row in summary_rows(metrics, sets):
        table.add_row(*(escape(c) for c in row))  # "[eV]" would be read as rich markup
    console.print(table)
    print(f"computed on {on}")
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
    from dpfit.cli.resume import prepare_argv

    sys.argv[1:] = expand_deepmd_input(sys.argv[1:])  # deepmd_input=input.json -> overrides
    refuse_split_run_folder(sys.argv[1:])
    refuse_fresh_run_early(sys.argv[1:])
    sys.argv[1:] = prepare_argv(sys.argv[1:])  # ckpt_path=<run folder>: its stored config, overrides checked
    run_cli(_hydra_main)


if __name__ == "__main__":
    main()
