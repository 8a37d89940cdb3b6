"""LightningModule: a Deep Potential energy model, its losses, the DeePMD learning-rate schedule."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric

from dpfit.data.batch import model_inputs
from dpfit.errors import ConfigError, NonFiniteLossError
from dpfit.io.checkpoint import MIN_NBOR_DIST_KEY, MODEL_CONFIG_KEY
from dpfit.model import PropertyModel, build_model
from dpfit.model.backends import KERNEL_MODES
from dpfit.training.guards import NONFINITE_MODES, nonfinite_message
from dpfit.training.loss import EnergyLoss
from dpfit.training.metrics import (
    error_metrics,
    property_error_metrics,
    update_error_metrics,
    update_property_metrics,
)
from dpfit.training.property_loss import PropertyLoss
from dpfit.training.schedule import ExponentialDecay, worker_scale
from dpfit.training.statistics import (
    check_stat_file,
    compute_statistics,
    first_nonfinite_batch,
    load_statistics,
    nonfinite_statistics,
    save_statistics,
    statistics_key,
)

log = logging.getLogger(__name__)


class DeepPotentialModule(L.LightningModule):
    """Trains an :class:`EnergyModel` (built from the plain ``model`` config) with an :class:`EnergyLoss`,
    or a :class:`PropertyModel` (``fitting_net.type: property``) with a :class:`PropertyLoss`.

    Forces (and the virial when a virial term is on) are written out in closed form by the model and
    differentiated with the loss in one backward pass. ``kernels`` (off / auto / on; None: the model
    config's ``kernels``) overrides the model's compiled CPU kernels option (:mod:`dpfit.model.backends`).
    Data statistics are computed once on the first fit and kept in the checkpoint
    (``stats_ready`` buffer), never recomputed on resume.
    """

    def __init__(
        self,
        model: dict,
        loss: EnergyLoss | PropertyLoss,
        schedule: ExponentialDecay,
        scale_by_worker: str = "none",
        data_stat_protect: float = 1e-2,
        weight_decay: float = 0.0,
        kernels: str | None = None,
        nonfinite_loss: str = "stop",
    ) -> None:
        super().__init__()
        if kernels is not None and kernels not in KERNEL_MODES:
            raise ConfigError(f"kernels={kernels!r}: choose one of {', '.join(KERNEL_MODES)}")
        if nonfinite_loss not in NONFINITE_MODES:
            raise ConfigError(f"nonfinite_loss={nonfinite_loss}: choose one of {', '.join(NONFINITE_MODES)}")
        model = _plain(model)
        if kernels is not None:
            model = {**model, "kernels": kernels}
        self.save_hyperparameters({MODEL_CONFIG_KEY: model, "scale_by_worker": scale_by_worker,
                                   "data_stat_protect": data_stat_protect})
        self.model = build_model(model, device=None)  # (the backend is selected in setup, for the device)
        self.is_property = isinstance(self.model, PropertyModel)
        if self.is_property != isinstance(loss, PropertyLoss):
            raise ConfigError("the property model (model.fitting_net.type=property) trains with loss=property, and "
                              "loss=property fits the property model: choose model=se_e2_a_property loss=property, "
                              "or an energy model and loss")
        if self.is_property:
            loss.bind(self.model.fitting)
        self.loss = loss
        self.schedule = schedule
        self.scale_by_worker = scale_by_worker
        self.data_stat_protect = data_stat_protect
        self.weight_decay = weight_decay
        self.nonfinite_loss = nonfinite_loss
        self.skipped_batches = 0
        self.register_buffer("stats_ready", torch.zeros((), dtype=torch.bool))
        self.metrics = torch.nn.ModuleDict({f"{s}_": self._error_metrics() for s in ("val", "test")})
        # frame-weighted mean of the loss over the evaluation set, summed over DDP ranks
        self.eval_loss = torch.nn.ModuleDict({f"{s}_": MeanMetric() for s in ("val", "test")})
        self.last_train: dict[str, float | torch.Tensor] = {}
        self.set_metrics = torch.nn.ModuleDict()  # named validation sets (data.val_systems={name: [...]})
        self.validated_at = -1  # global step of the latest validation
        self.validated_frames = 0  # frames of the latest validation (every rank)
        self._frames_seen = 0
        self.start_step = 0  # global step this fit started at (a resume's checkpoint step)
        #: smallest distance between two atoms of the training data (Å), for DeePMD-kit's compression
        self.min_nbor_dist: float | None = None

    def setup(self, stage: str) -> None:
        """The model's backend selected for the device it will run on (:meth:`EnergyModel.select_backend`):
        on a CPU the compiled kernels (``model.kernels``), built or loaded now, before the first step; GPU
        runs never build them."""
        strategy = getattr(self.trainer, "strategy", None) if self._trainer is not None else None
        device = getattr(strategy, "root_device", self.device)
        dm = self.trainer.datamodule if self._trainer is not None else None
        for name in getattr(dm, "val_set_names", None) or []:
            if name not in self.set_metrics:
                self.set_metrics[name] = self._error_metrics()
        log.info("model backend: %s (%s)", self.model.select_backend(device), device.type)

    def _error_metrics(self):
        return property_error_metrics() if self.is_property else error_metrics()

    def _update_metrics(self, metrics, pred: dict, batch: dict) -> None:
        if self.is_property:
            fit = self.model.fitting
            update_property_metrics(metrics, pred, batch, fit.property_name, fit.intensive)
        else:
            update_error_metrics(metrics, pred, batch)

    # ------------------------------------------------------------ statistics
    def data_needs(self) -> dict:
        """What the data module reads (:class:`dpfit.data.system.Needs`): the labels the loss fits (a
        malformed file of one is an error), the labels reported as validation errors (read when well
        formed), and the model's fparam/aparam widths (0: the files are not read). A property model adds
        its labels ``<name>`` / ``atom_<name>`` (``extra``), one of which every training system must have."""
        fit = self.model.fitting
        needs = {"labels": set(self.loss.labels), "reported": {"energy", "force", "virial"},
                 "numb_fparam": int(fit.numb_fparam), "numb_aparam": int(fit.numb_aparam)}
        if self.is_property:
            name, width = fit.property_name, fit.task_dim
            needs.update(reported={name, f"atom_{name}"}, extra=((name, False, width), (f"atom_{name}", True, width)),
                         required=set(self.loss.labels))
        return needs

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        if "de" in self.loss.active:
            small = [v.system.name for v in dm.train_views if v.batch_size < 2]
            if small:
                raise ValueError("the relative energy loss needs batches of 2+ frames, but data.batch_size gives 1 "
                                 f"frame for {small[:3]}: set data.batch_size to 2 or more (or auto:N)")
        missing = [lab for lab in self.loss.labels if not any(s.has(lab) for s in dm.train_systems)]
        if missing:
            log.warning("no training system has %s: the loss terms using it are dropped", missing)
        if self.min_nbor_dist is None and hasattr(dm, "min_nbor_dist"):
            self.min_nbor_dist = dm.min_nbor_dist()  # kept in the checkpoint (freeze.py format=deepmd)
        if bool(self.stats_ready):
            log.info("data statistics restored from the checkpoint")
            return
        if self.trainer.is_global_zero:
            stat_file = getattr(dm, "stat_file", None)
            if stat_file:
                check_stat_file(stat_file)  # never replace a file that is not a dpfit statistics file
            key = statistics_key(self.model, dm.stat_identity(), self.data_stat_protect) if stat_file else None
            if stat_file and load_statistics(self.model, stat_file, key):
                log.info("data statistics read from %s", stat_file)
                bad = nonfinite_statistics(self.model)
                if bad:
                    raise ConfigError(f"data.stat_file={stat_file}: holds non-finite statistics ({', '.join(bad)}): "
                                      "delete it (they are recomputed)")
            else:
                batches = dm.stat_batches()
                _warn_if_sel_too_small(batches, self.model.sel, self.model.type_map)
                compute_statistics(self.model, batches, self.data_stat_protect)
                _refuse_nonfinite_statistics(self.model, batches, dm)
                log.info("data statistics computed from %d batches (%d frames)%s", len(batches),
                         sum(int(b["coord"].shape[0]) for b in batches),
                         " and sent to every rank" if self.trainer.world_size > 1 else "")
                if stat_file:
                    save_statistics(self.model, stat_file, key)
                    log.info("data statistics saved to %s", stat_file)
        if self.trainer.world_size > 1:
            names = [n for n, _ in self.model.named_buffers()]
            state = {n: b.cpu() for n, b in self.model.named_buffers()} if self.trainer.is_global_zero else None
            state = self.trainer.strategy.broadcast(state, src=0)
            with torch.no_grad():
                for n, b in self.model.named_buffers():
                    if n in names:
                        b.copy_(state[n])
        self.stats_ready.fill_(True)

    # ------------------------------------------------------------ steps
    def forward(self, batch: dict, do_force: bool = True, do_virial: bool = False, create_graph: bool = False):
        return self.model(**model_inputs(batch), do_force=do_force, do_virial=do_virial, create_graph=create_graph)

    def _lr_ratio(self) -> float:
        return self.schedule(self.global_step)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        pred = self(batch, do_force=self.loss.needs_force, do_virial=self.loss.needs_virial, create_graph=True)
        loss, logs = self.loss(pred, batch, self._lr_ratio())
        nf = batch["coord"].shape[0]
        if self.nonfinite_loss != "off" and not bool(torch.isfinite(loss)):  # one device sync a step on GPUs
            message = nonfinite_message(self.global_step, batch, pred, logs, self._system_name(batch))
            if self.nonfinite_loss == "stop":
                raise NonFiniteLossError(f"{message}; the run stopped (nonfinite_loss=skip skips such batches)")
            self.skipped_batches += 1
            log.warning("%s: batch skipped (%d so far)", message, self.skipped_batches)
            self.log("train/skipped_batches", float(self.skipped_batches), batch_size=nf, reduce_fx="max")
            return None  # Lightning skips the backward pass: no weight changes (the step still counts)
        lr = self.optimizers().param_groups[0]["lr"]
        if self._loggers_write_this_step():
            self.log("train/loss", loss.detach(), batch_size=nf, prog_bar=True)
            self.log("lr", lr, batch_size=nf)
            for k, v in logs.items():
                self.log(f"train/{k}", v, batch_size=nf, prog_bar=k == "rmse_f")
        # tensors, read (float) only when a validation row is written: no device sync per step on GPUs
        self.last_train = {"rmse": loss.detach().sqrt(), "lr": lr,
                           **{k: v.detach() if torch.is_tensor(v) else v for k, v in logs.items() if k.startswith("rmse_")}}
        if batch.get("n_dropped"):
            self.log("train/neighbors_dropped", float(batch["n_dropped"]), batch_size=nf, reduce_fx="sum")
        return loss

    def _system_name(self, batch: dict) -> str | None:
        try:
            return str(self.trainer.datamodule.train_views[int(batch["system"])].system.name)
        except Exception:  # noqa: BLE001 - no datamodule (a bare loop): the index alone
            return None

    def _loggers_write_this_step(self) -> bool:
        """Whether Lightning's loggers write this step's values (every ``trainer.log_every_n_steps``
        steps, and when the run stops): the per-step values are logged only then, since each
        ``self.log`` costs ~0.2 ms of Lightning's bookkeeping (~2 ms a step of a small system)."""
        connector = getattr(self._trainer, "_logger_connector", None)
        return True if connector is None else bool(connector.should_update_logs)

    def _eval_step(self, batch: dict, stage: str) -> dict[str, torch.Tensor]:
        pred = self(batch, do_force=True, do_virial=bool(batch.get("find_virial")))  # closed-form forces: no grad needed
        pred = {k: v.detach() for k, v in pred.items()}
        loss, _ = self.loss(pred, batch, self._lr_ratio(), strict=False)
        nf = batch["coord"].shape[0]
        self.eval_loss[f"{stage}_"].update(loss.detach(), nf)
        if stage == "val":
            self._frames_seen += int(nf)
        self._update_metrics(self.metrics[f"{stage}_"], pred, batch)
        if stage == "val" and len(self.set_metrics):
            self._update_metrics(self.set_metrics[self.trainer.datamodule.val_set_of(batch["system"])], pred, batch)
        return pred  # predictions for callbacks (on_validation_batch_end), e.g. parity plots

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, "test")

    def _log_metrics(self, stage: str) -> None:
        """Log the stage's errors over every evaluated frame of every rank (torchmetrics sums across ranks).

        A metric is computed when any rank fed it: computing syncs the ranks, so all must agree on which.
        """
        metrics = {**self.metrics[f"{stage}_"], "loss": self.eval_loss[f"{stage}_"]}
        if stage == "val":
            metrics.update({f"{name}/{k}": m for name, group in self.set_metrics.items() for k, m in group.items()})
        counts = torch.tensor([float(m.update_count) for m in metrics.values()], dtype=torch.float64)
        if self._trainer is not None and self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts.to(self.device), reduce_op="sum").cpu()
        for (k, m), n in zip(metrics.items(), counts.tolist()):
            if n > 0:
                with warnings.catch_warnings():  # a rank that saw none of this quantity: its share is empty
                    warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
                    value = m.compute()
                # identical on every rank after the metric's own sync: a max over ranks returns it unchanged
                # (and keeps Lightning from asking for sync_dist)
                self.log(f"{stage}/{k}", value, sync_dist=True, reduce_fx="max")
            m.reset()
        # the loggers' step of this evaluation: the training steps done (Lightning's default is one less)
        self.log("step", float(self.global_step), sync_dist=True, reduce_fx="max")

    def on_validation_epoch_start(self) -> None:
        self._frames_seen = 0

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")
        if not self.trainer.sanity_checking:
            self.validated_at = self.global_step
            frames = torch.tensor(float(self._frames_seen), dtype=torch.float64)
            if self._trainer is not None and self.trainer.world_size > 1:
                frames = self.trainer.strategy.reduce(frames.to(self.device), reduce_op="sum").cpu()
            self.validated_frames = int(frames)

    def on_train_start(self) -> None:
        self.start_step = self.global_step

    def on_validation_end(self) -> None:
        # "step" only labels the loggers' row: ModelCheckpoint's file names would take a stale one later
        self.trainer.callback_metrics.pop("step", None)

    def on_test_end(self) -> None:
        self.trainer.callback_metrics.pop("step", None)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """Stop at ``max_steps`` through ``should_stop``: Lightning then validates at the last step whatever
        ``val_check_interval`` is, so the final numbers are those of the final weights."""
        if 0 < self.trainer.max_steps <= self.global_step:
            self.trainer.should_stop = True
            _validate_every_frame_next(self.trainer)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the W&B run id, so ``ckpt_path=...`` continues the same W&B run (see ``cli/train.py``)."""
        run_id = wandb_run_id(self._trainer)
        if run_id:
            checkpoint[WANDB_RUN_ID_KEY] = run_id
        if self.min_nbor_dist is not None:
            checkpoint[MIN_NBOR_DIST_KEY] = float(self.min_nbor_dist)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A resume keeps the training data's ``min_nbor_dist`` computed when the run started."""
        if checkpoint.get(MIN_NBOR_DIST_KEY) is not None:
            self.min_nbor_dist = float(checkpoint[MIN_NBOR_DIST_KEY])

    # ------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        world = self.trainer.world_size if self._trainer is not None else 1
        lr0 = self.schedule.start_lr * worker_scale(self.scale_by_worker, world)
        params = list(self.parameters())
        # the fused kernel updates all parameters in one pass (8 ms -> 1 ms per step on the water model, CPU)
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        opt = torch.optim.Adam(params, lr=lr0, weight_decay=self.weight_decay, fused=fused)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


WANDB_RUN_ID_KEY = "wandb_run_id"


def wandb_run_id(trainer) -> str | None:
    """The id of the W&B run of the trainer's WandbLogger (global rank 0), else None."""
    if trainer is None or not trainer.is_global_zero:
        return None
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger.version
    return None


def _validate_every_frame_next(trainer) -> None:
    """The validation at the last step covers every validation frame, whatever ``trainer.limit_val_batches``
    and ``data.numb_btch`` limit the periodic ones to: the final numbers are the whole set's (the validation
    loop builds its batches again). Without Lightning's loop attribute, train.py validates once more."""
    loop = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "val_loop", None)
    if loop is None or not hasattr(loop, "_combined_loader"):
        return
    dm = trainer.datamodule
    if trainer.limit_val_batches == 1.0 and getattr(dm, "numb_btch", None) is None:
        return  # already the whole set
    trainer.limit_val_batches = 1.0
    if dm is not None and hasattr(dm, "numb_btch"):
        dm.numb_btch = None
    loop._combined_loader = None


def _refuse_nonfinite_statistics(model, batches: list[dict], dm) -> None:
    """Non-finite davg / dstd / energy bias would make every step NaN: stop before the first, naming the system."""
    bad = nonfinite_statistics(model)
    if not bad:
        return
    from dpfit.data.system import DataError

    k = first_nonfinite_batch(model, batches)
    where = "the sampled training frames"
    if k is not None:
        batch = batches[k]
        try:
            name = dm.train_views[int(batch["system"])].system.name
        except Exception:  # noqa: BLE001 - no views: the index alone
            name = f"training system {int(batch['system'])}"
        where = f"{name}, frames {batch['frame_index'].tolist()}"
    raise DataError(f"{where}: the data statistics {', '.join(bad)} are not finite (atoms on top of each other? "
                    "data.min_distance=0 turns that check off; energies beyond float range?): the run stopped "
                    "before its first step")


def _warn_if_sel_too_small(batches: list[dict], sel: list[int], type_map: list[str]) -> None:
    """Warn once, before training, when the sampled frames have more neighbors than ``sel`` slots."""
    dropped = sum(b.get("n_dropped", 0) for b in batches)
    if not dropped:
        return
    most = [max(b["max_neighbors"][t] for b in batches) for t in range(len(sel))]
    suggest = [int(-(-1.1 * m // 4) * 4) for m in most]  # 10% headroom, multiple of 4
    log.warning("%d neighbors beyond sel=%s were dropped in the statistics frames (most per atom: %s for %s): "
                "the model truncates them as DeePMD does; consider data.sel=%s", dropped, list(sel), most,
                type_map, suggest)


def _plain(cfg: Any) -> Any:
    """Convert an OmegaConf node (or anything mapping-like) to plain dicts/lists for the checkpoint."""
    if hasattr(cfg, "items") and not isinstance(cfg, dict):
        try:
            from omegaconf import OmegaConf

            return OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # noqa: BLE001
            return dict(cfg)
    return cfg
