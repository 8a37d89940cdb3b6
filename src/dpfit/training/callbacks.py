"""Callbacks: DeePMD-compatible ``lcurve.out``, a final summary table of validation errors."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class LCurveWriter(L.Callback):
    """Writes ``lcurve.out`` as DeePMD-kit does: a row every ``disp_freq`` training steps (and at every
    validation) with step, rmse_val, rmse_trn, rmse_e_val, rmse_e_trn, rmse_f_val, rmse_f_trn,
    [rmse_v_val, rmse_v_trn], lr (a property model: rmse_p_val, rmse_p_trn and/or rmse_ap_val, rmse_ap_trn
    in place of the energy and force columns). Training columns are those of the step's batch; validation columns hold
    the validation of that step, ``nan`` where none ran. Named validation sets
    (``data.val_systems={name: [...]}``) add ``rmse_<q>_val_<name>`` columns after ``lr``.

    ``disp_freq``: null writes rows at validations only. As DeePMD-kit 3.2, a row is also written at step 1,
    with a validation run there (the first point of the learning curve). A resumed run (``ckpt_path``)
    appends; rows the killed run wrote after its checkpoint's step are moved to ``<filename>.superseded``,
    so every step appears once."""

    def __init__(self, filename: str = "lcurve.out", disp_freq: int | None = None) -> None:
        if disp_freq is not None and int(disp_freq) <= 0:
            raise ValueError(f"callbacks.lcurve.disp_freq must be a positive number of steps, got {disp_freq}")
        self.filename = filename
        self.disp_freq = None if disp_freq is None else int(disp_freq)
        self.path: Path | None = None
        self._pending: tuple[int, list[float]] | None = None  # (step, training values) awaiting validation
        self._last_written = -1

    def _columns(self, pl_module) -> list[str]:
        if getattr(pl_module, "is_property", False):  # a property model: frame (p) and atomic (ap) errors
            return [c for c in ("p", "ap") if c in pl_module.loss.active]
        cols = ["e", "f"]
        if pl_module.loss.needs_virial:
            cols.append("v")
        return cols

    @staticmethod
    def _sets(trainer) -> list[str]:
        return list(getattr(trainer.datamodule, "val_set_names", None) or []) if trainer.datamodule else []

    def header(self, trainer, pl_module) -> list[str]:
        header = ["step", "rmse_val", "rmse_trn"]
        for c in self._columns(pl_module):
            header += [f"rmse_{c}_val", f"rmse_{c}_trn"]
        header.append("lr")
        for name in self._sets(trainer):
            header += [f"rmse_{c}_val_{name}" for c in self._columns(pl_module)]
        return header

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Every rank: validate at step 1 too (DeePMD-kit's first lcurve.out row), by asking Lightning's
        training loop for a validation there; a Lightning without that hook writes the row without one."""
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        decide = getattr(loop, "_should_check_val_fx", None)
        if stage != "fit" or not self.disp_freq or decide is None or getattr(decide, "_dpfit_step_one", False):
            return
        done = {"step": False}

        def should_check_val(data_fetcher):
            if decide(data_fetcher):
                return True
            if trainer.global_step == 1 and not done["step"]:
                done["step"] = True
                return True
            return False

        should_check_val._dpfit_step_one = True
        loop._should_check_val_fx = should_check_val

    def teardown(self, trainer, pl_module, stage: str) -> None:
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        if loop is not None and getattr(loop.__dict__.get("_should_check_val_fx"), "_dpfit_step_one", False):
            del loop._should_check_val_fx  # the class's own again

    @rank_zero_only
    def on_train_start(self, trainer, pl_module) -> None:
        self.path = Path(trainer.default_root_dir) / self.filename
        self._pending = None
        self._last_written = trainer.global_step
        if self.path.exists() and trainer.ckpt_path:
            self._last_written = self._drop_rows_after(trainer.global_step)
            return  # resuming: append
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w") as fh:
            fh.write("# " + " ".join(f"{h:>11s}" for h in self.header(trainer, pl_module)) + "\n")

    def _drop_rows_after(self, step: int) -> int:
        """Resuming at ``step``: rows of later steps (written before the kill) leave lcurve.out; returns the
        last step left in it (-1: none)."""
        lines = self.path.read_text().splitlines(keepends=True)

        def later(line: str) -> bool:
            words = line.split()
            return bool(words) and not line.startswith("#") and words[0].isdigit() and int(words[0]) > step

        dropped = [line for line in lines if later(line)]
        if dropped:
            with open(self.path.with_name(self.path.name + ".superseded"), "a") as fh:
                fh.writelines(dropped)
            lines = [line for line in lines if not later(line)]
            self.path.write_text("".join(lines))
        steps = [int(line.split()[0]) for line in lines
                 if line.strip() and not line.startswith("#") and line.split()[0].isdigit()]
        return max(steps, default=-1)

    def _train_values(self, pl_module) -> list[float]:
        trn = pl_module.last_train
        values = [float(trn.get("rmse", float("nan")))]
        values += [float(trn.get(f"rmse_{c}", float("nan"))) for c in self._columns(pl_module)]
        return [*values, float(trn.get("lr", float("nan")))]

    def _write(self, trainer, pl_module, step: int, train: list[float], val: dict | None) -> None:
        nan = float("nan")
        m = val or {}
        loss = m.get("val/loss")
        row = [float(loss) ** 0.5 if loss is not None else nan, train[0]]
        for k, c in enumerate(self._columns(pl_module)):
            v = m.get(f"val/rmse_{c}")
            row += [float(v) if v is not None else nan, train[1 + k]]
        row.append(train[-1])
        for name in self._sets(trainer):
            for c in self._columns(pl_module):
                v = m.get(f"val/{name}/rmse_{c}")
                row.append(float(v) if v is not None else nan)
        with open(self.path, "a") as fh:
            fh.write(f"{step:7d}  " + " ".join(f"{x:11.2e}" for x in row) + "\n")
        self._last_written = step

    def _flush(self, trainer, pl_module) -> None:
        if self._pending is not None:
            step, train = self._pending
            self._pending = None
            self._write(trainer, pl_module, step, train, None)

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.path is None:
            return
        self._flush(trainer, pl_module)  # the previous row: no validation ran at its step
        step = trainer.global_step
        if self.disp_freq and (step % self.disp_freq == 0 or step == 1) and step > self._last_written:
            self._pending = (step, self._train_values(pl_module))  # validation may still run at this step

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        if self.path is None or trainer.sanity_checking or not pl_module.last_train:
            return
        step = trainer.global_step
        if self._pending is not None and self._pending[0] != step:
            self._flush(trainer, pl_module)
        train = self._pending[1] if self._pending is not None else self._train_values(pl_module)
        self._pending = None
        if step > self._last_written:
            self._write(trainer, pl_module, step, train, trainer.callback_metrics)

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        if self.path is not None:
            self._flush(trainer, pl_module)

    @rank_zero_only
    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.path is not None:
            self._flush(trainer, pl_module)


def summary_rows(metrics: dict, sets: list[str] | tuple = ()) -> list[tuple[str, ...]]:
    """(quantity, RMSE, MAE) rows of validation errors from ``trainer.callback_metrics``; with named
    validation ``sets``, (set, quantity, RMSE, MAE) rows: ``all`` (frame-weighted total) then each set."""
    rows = []
    for name in ("", *sets):
        prefix = f"val/{name}/" if name else "val/"
        for q, label, unit in (("e", "energy / atom", "eV"), ("f", "force", "eV/Å"), ("v", "virial / atom", "eV"),
                               ("p", "property (/ atom if extensive)", "units"), ("ap", "atomic property", "units")):
            r, a = metrics.get(f"{prefix}rmse_{q}"), metrics.get(f"{prefix}mae_{q}")
            if r is not None:
                row = (f"{label} [{unit}]", f"{float(r):.4e}", f"{float(a):.4e}" if a is not None else "-")
                rows.append((name or "all", *row) if sets else row)
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
