"""Lightning callback: draw ``lcurve.png`` from ``lcurve.out`` when training ends."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


class LCurvePlot(L.Callback):
    """On fit end (rank zero), plot ``<trainer.default_root_dir>/<filename>`` into ``png`` next to it.

    A missing or empty ``lcurve.out`` (no validation ran) is logged and skipped, never an error.
    """

    def __init__(self, filename: str = "lcurve.out", png: str = "lcurve.png") -> None:
        self.filename = filename
        self.png = png
        self.path: Path | None = None

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:
        from dpfit.inference.plots import lcurve_plot

        source = Path(trainer.default_root_dir) / self.filename
        if not source.is_file():
            log.info("no %s: learning-curve plot skipped", source)
            return
        try:
            self.path = lcurve_plot(source, source.with_name(self.png))
        except ValueError as exc:
            log.info("learning-curve plot skipped: %s", exc)
            return
        log.info("learning curves: %s", self.path)
