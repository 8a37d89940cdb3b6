"""Guards of a training run: a non-finite loss stops it (or skips the batch), a signal stops it cleanly.

- :func:`nonfinite_message`: what went non-finite, at which step, in which system and frames.
- :class:`Preemption`: on SIGTERM (``scancel``, a time limit, a preempting scheduler) or SIGUSR1 (SLURM's
  ``--signal``), save ``checkpoints/last.ckpt`` at the current step, write the run folder's ``INCOMPLETE``
  marker and stop with :class:`dpfit.errors.Preempted` (exit 128 + signal: 143 for SIGTERM). On SLURM with
  Lightning's auto-requeue (``SLURMEnvironment(auto_requeue=True)``, Lightning's default there) its own
  SIGUSR1 handler still saves its ``hpc_ckpt_N.ckpt`` and requeues the job first.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import lightning as L
import torch

from dpfit.errors import Preempted

log = logging.getLogger(__name__)

#: the marker file of a run that has not finished (removed when it ends normally)
INCOMPLETE = "INCOMPLETE"
NONFINITE_MODES = ("stop", "skip", "off")


def nonfinite_message(step: int, batch: dict, pred: dict, logs: dict, system_name: str | None) -> str:
    """One line: the step, the batch's system and frames, and which loss terms / quantities are not finite."""
    terms = [k[3:] for k, v in logs.items() if k.startswith("l2_") and torch.is_tensor(v) and not bool(torch.isfinite(v))]
    causes = []
    for key in ("coord", "box", "energy", "force", "virial", "fparam", "aparam"):
        v = batch.get(key)
        if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            causes.append(f"{key} data")
    if not causes:
        for key in ("energy", "force", "virial"):
            v = pred.get(key)
            if torch.is_tensor(v) and not bool(torch.isfinite(v).all()):
                causes.append(f"predicted {key}")
    frames = batch.get("frame_index")
    frames = frames.tolist() if torch.is_tensor(frames) else frames
    system = batch.get("system", "?")
    where = f"system {system}" + (f" ({system_name})" if system_name else "") + f", frames {frames}"
    what = f"loss term(s) {', '.join(terms)}" if terms else "the loss"
    because = f" (non-finite {', '.join(causes)})" if causes else ""
    return f"non-finite {what} at step {step}, {where}{because}"


class Preemption(L.Callback):
    """Stop on SIGTERM / SIGUSR1 with a checkpoint at the current step (see the module docstring).

    The checkpoint is written at the end of the training batch during which the signal came, where
    ModelCheckpoint saves its own, so a resume continues exactly (to the bit on CPU).
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"), filename: str = "last.ckpt") -> None:
        self.signals = [getattr(signal, s) if isinstance(s, str) else signal.Signals(s) for s in signals]
        self.filename = filename
        self.signum: int | None = None
        self.saved: str | None = None
        self.stopped: Preempted | None = None  # set when Lightning stopped the run on SIGTERM (on_exception)
        self._previous: dict[int, object] = {}

    # ------------------------------------------------------------ signal handlers
    def on_train_start(self, trainer, pl_module) -> None:
        """Chain a handler in front of Lightning's (registered just before the training stage)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signals:
            previous = signal.getsignal(signum)
            self._previous[signum] = previous

            def handler(num, frame, previous=previous):
                if self.signum is None:
                    self.signum = num
                if callable(previous):
                    previous(num, frame)

            signal.signal(signum, handler)

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)
        self._previous = {}

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()

    # ------------------------------------------------------------ stopping
    def _checkpoint_path(self, trainer) -> Path:
        cb = trainer.checkpoint_callback
        folder = Path(cb.dirpath) if cb is not None and cb.dirpath else Path(trainer.default_root_dir) / "checkpoints"
        return folder / self.filename

    def _save(self, trainer) -> None:
        path = self._checkpoint_path(trainer)
        tmp = path.with_name(f".{path.name}.partial")
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
        cb = trainer.checkpoint_callback
        if cb is not None and hasattr(cb, "last_model_path"):
            cb.last_model_path = str(path)  # the resumed run keeps writing last.ckpt (not last-v1.ckpt)
        trainer.save_checkpoint(str(tmp))
        if trainer.is_global_zero:
            os.replace(tmp, path)  # a kill during the save leaves the previous last.ckpt intact
        self.saved = str(path)

    def _stop(self, trainer) -> Preempted:
        name = signal.Signals(self.signum).name if self.signum else "SIGTERM"
        out = Path(trainer.default_root_dir)
        message = (f"stopped by {name} at step {trainer.global_step}; checkpoint {self.saved}; continue with "
                   f"{resume_command(out)}")
        if trainer.is_global_zero:
            write_marker(out, f"{message}\n")
        log.warning(message)
        return Preempted(message, self.signum or signal.SIGTERM)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.signum is None and not trainer.received_sigterm:
            return
        if trainer.world_size > 1:
            return  # ranks agree on stopping through Lightning's broadcast: saved in on_exception
        self.signum = self.signum or signal.SIGTERM
        self._save(trainer)
        raise self._stop(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException) and self.saved is None:
            self.signum = self.signum or signal.SIGTERM
            self._save(trainer)
            self.stopped = self._stop(trainer)
        self._restore()


def resume_command(run: Path) -> str:
    """The command that continues the run in ``run`` (its stored config; no override to repeat)."""
    return f"`python train.py ckpt_path={run}`"


def write_marker(folder: Path, text: str) -> None:
    """Write ``<folder>/INCOMPLETE`` (through a temporary file: a full disk keeps the previous text)."""
    path = Path(folder) / INCOMPLETE
    tmp = path.with_name(f".{INCOMPLETE}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:  # reported by the run folder checks; never hide the real error
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        log.warning("cannot write %s: %s", path, exc)


def remove_marker(folder: Path) -> None:
    try:
        (Path(folder) / INCOMPLETE).unlink(missing_ok=True)
    except OSError:
        pass


class SigtermBeforeTraining:
    """SIGTERM from the start of ``train()`` until Lightning takes the signal over (when fitting starts):
    raises :class:`Preempted` where the process is (reading data, counting sel, computing statistics), so
    the run ends with one line, exit 143, its lock released and ``INCOMPLETE`` saying how to continue,
    instead of dying silently. Once Lightning has its own handler installed (which calls this one too),
    this one does nothing and :class:`Preemption` saves a checkpoint at the current step."""

    def __init__(self) -> None:
        self._previous = None
        self._installed = False

    def _handler(self, signum, frame) -> None:
        if signal.getsignal(signal.SIGTERM) != self._handler:
            return  # chained by Lightning's handler: the training loop stops with a checkpoint
        raise Preempted("stopped by SIGTERM before training started", signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed and signal.getsignal(signal.SIGTERM) == self._handler:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
        self._installed = False
