"""Dashboard callback: parity plots and per-element force errors of every validation.

``ValidationPlots`` collects the model's predictions and the labels of the validation batches (of every
DDP rank), logs the force RMSE of each element as ``val/rmse_f_<element>``, draws parity plots (energy
per atom, force components coloured by element) into ``<run>/plots/parity_<step>.png`` and sends them
to the W&B (``wandb.Image``) and TensorBoard loggers present.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

log = logging.getLogger(__name__)


class ValidationPlots(L.Callback):
    """Parity plots and per-element force RMSE at each validation.

    Args:
        dirname: folder of the PNGs, relative to the run folder (``trainer.default_root_dir``).
        every_n_validations: draw (and upload) the plots at every n-th validation; the per-element
            scalars are logged at every validation.
        max_points: force components drawn per plot at most (a fixed random subset beyond that).
    """

    def __init__(self, dirname: str = "plots", every_n_validations: int = 1, max_points: int = 20000) -> None:
        self.dirname = dirname
        self.every_n_validations = max(int(every_n_validations), 1)
        self.max_points = int(max_points)
        self._n_validations = 0
        self._reset()

    def _reset(self) -> None:
        self._e: list[np.ndarray] = []  # (2, nf): predicted, label energy per atom
        self._f: list[np.ndarray] = []  # (2, n): predicted, label force components
        self._f_type: list[np.ndarray] = []  # (n,): element index of each component

    # ------------------------------------------------------------------ collection
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or not isinstance(outputs, dict):
            return
        n = batch["natoms"]
        if batch.get("find_energy") and "energy" in outputs:
            pe = outputs["energy"].detach().double().cpu().reshape(-1) / n
            le = batch["energy"].detach().double().cpu().reshape(-1) / n
            self._e.append(np.stack([pe.numpy(), le.numpy()]))
        if batch.get("find_force") and "force" in outputs:
            pf = outputs["force"].detach().double().cpu().reshape(-1)
            lf = batch["force"].detach().double().cpu().reshape(-1)
            atype = batch["atype"].detach().cpu().unsqueeze(-1).expand(*batch["force"].shape[:2], 3).reshape(-1)
            self._f.append(np.stack([pf.numpy(), lf.numpy()]))
            self._f_type.append(atype.numpy().astype(np.int64))

    def _gathered(self, trainer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(energies (2, nf), forces (2, n), force element indices (n,)) of all ranks."""
        local = (
            np.concatenate(self._e, axis=1) if self._e else np.zeros((2, 0)),
            np.concatenate(self._f, axis=1) if self._f else np.zeros((2, 0)),
            np.concatenate(self._f_type) if self._f_type else np.zeros(0, dtype=np.int64),
        )
        if trainer.world_size == 1 or not torch.distributed.is_initialized():
            return local
        parts: list = [None] * trainer.world_size
        torch.distributed.all_gather_object(parts, local)
        return tuple(np.concatenate([p[k] for p in parts], axis=-1) for k in range(3))

    # ------------------------------------------------------------------ results
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        energy, force, ftype = self._gathered(trainer)
        self._reset()
        type_map = list(pl_module.model.type_map)
        for t, element in enumerate(type_map):
            sel = ftype == t
            if sel.any():
                rmse = float(np.sqrt(np.mean((force[0, sel] - force[1, sel]) ** 2)))
                # the same value on every rank (gathered data): max leaves it unchanged
                pl_module.log(f"val/rmse_f_{element}", rmse, sync_dist=True, reduce_fx="max")
        self._n_validations += 1
        if (self._n_validations - 1) % self.every_n_validations or not trainer.is_global_zero:
            return
        if energy.shape[1] == 0 and force.shape[1] == 0:
            return
        path = Path(trainer.default_root_dir) / self.dirname / f"parity_{trainer.global_step:07d}.png"
        figure = self._figure(energy, force, ftype, type_map, trainer.global_step)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val/parity", images=[str(path)], step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("val/parity", figure, global_step=trainer.global_step, close=False)

    def _figure(self, energy, force, ftype, type_map, step):
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

        fig = Figure(figsize=(9, 4.2), layout="constrained")
        axes = fig.subplots(1, 2)
        _parity(axes[0], energy[1], energy[0], "energy / atom [eV]", None, None)
        if force.shape[1] > self.max_points:
            keep = np.sort(np.random.default_rng(0).choice(force.shape[1], self.max_points, replace=False))
            force, ftype = force[:, keep], ftype[keep]
        _parity(axes[1], force[1], force[0], "force component [eV/Å]", ftype, type_map)
        fig.suptitle(f"validation, step {step}")
        return fig


def _parity(ax, label, pred, title, kinds, names) -> None:
    if label.size == 0:
        ax.set_axis_off()
        return
    lo, hi = float(min(label.min(), pred.min())), float(max(label.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], color="0.6", lw=1)
    if kinds is None:
        ax.scatter(label, pred, s=6, alpha=0.7)
    else:
        for t, name in enumerate(names):
            sel = kinds == t
            if sel.any():
                ax.scatter(label[sel], pred[sel], s=3, alpha=0.5, label=name)
        ax.legend(markerscale=3, fontsize=8)
    rmse = float(np.sqrt(np.mean((pred - label) ** 2)))
    ax.set_title(f"{title}  RMSE {rmse:.3g}")
    ax.set_xlabel("label")
    ax.set_ylabel("prediction")
    ax.set_aspect("equal", adjustable="datalim")
