"""Callbacks: DeePMD-compatible ``lcurve.out``, a final summary table of validation errors."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class LCurveWriter(L.Callback):
    """Writes ``lcurve.out`` (DeePMD columns) at every validation: step, rmse_val, rmse_trn, rmse_e_*,
    rmse_f_*, [rmse_v_*], lr. Training columns are those of the latest training step."""

    def __init__(self, filename: str = "lcurve.out") -> None:
        self.filename = filename
        self.path: Path | None = None

    def _columns(self, pl_module) -> list[str]:
        cols = ["e", "f"]
        if pl_module.loss.needs_virial:
            cols.append("v")
        return cols

    @rank_zero_only
    def on_fit_start(self, trainer, pl_module) -> None:
        self.path = Path(trainer.default_root_dir) / self.filename
        if self.path.exists() and trainer.ckpt_path:
            return  # resuming: append
        header = ["step", "rmse_val", "rmse_trn"]
        for c in self._columns(pl_module):
            header += [f"rmse_{c}_val", f"rmse_{c}_trn"]
        header.append("lr")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w") as fh:
            fh.write("# " + " ".join(f"{h:>11s}" for h in header) + "\n")

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        if self.path is None or trainer.sanity_checking or not pl_module.last_train:
            return
        m = trainer.callback_metrics
        trn = pl_module.last_train
        val_loss = m.get("val/loss")
        row = [float(val_loss) ** 0.5 if val_loss is not None else float("nan"), float(trn.get("rmse", float("nan")))]
        for c in self._columns(pl_module):
            v = m.get(f"val/rmse_{c}")
            row += [float(v) if v is not None else float("nan"), float(trn.get(f"rmse_{c}", float("nan")))]
        row.append(float(trn.get("lr", float("nan"))))
        with open(self.path, "a") as fh:
            fh.write(f"{trainer.global_step:7d}  " + " ".join(f"{x:11.2e}" for x in row) + "\n")


def summary_rows(metrics: dict) -> list[tuple[str, str, str]]:
    """(quantity, RMSE, MAE) rows of validation errors from ``trainer.callback_metrics``."""
    rows = []
    for q, label, unit in (("e", "energy / atom", "eV"), ("f", "force", "eV/Å"), ("v", "virial / atom", "eV")):
        r, a = metrics.get(f"val/rmse_{q}"), metrics.get(f"val/mae_{q}")
        if r is not None:
            rows.append((f"{label} [{unit}]", f"{float(r):.4e}", f"{float(a):.4e}" if a is not None else "-"))
    return rows


class StepTimer(L.Callback):
    """Wall time per training step, batch fetch (neighbor lists) included and validation excluded: the
    time between consecutive ends of training batches, less any validation in between, after ``skip``
    warm-up steps; printed at the end and written to ``<run>/timing.json`` (the benchmark scripts read it)."""

    def __init__(self, skip: int = 10) -> None:
        self.skip = skip
        self.total = 0.0
        self.count = 0
        self._last_end: float | None = None
        self._val_start: float | None = None
        self._val_time = 0.0

    def on_validation_start(self, trainer, pl_module) -> None:
        import time

        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        import time

        if self._val_start is not None:
            self._val_time += time.perf_counter() - self._val_start
            self._val_start = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        now = time.perf_counter()
        if self._last_end is not None and trainer.global_step > self.skip:
            self.total += now - self._last_end - self._val_time
            self.count += 1
        self._last_end = now
        self._val_time = 0.0

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:
        import json

        if not self.count:
            return
        per_step = self.total / self.count
        print(f"average training time: {per_step:.4f} s/step over {self.count} steps")
        out = Path(trainer.default_root_dir) / "timing.json"
        out.write_text(json.dumps({"s_per_step": per_step, "steps": self.count}) + "\n")
