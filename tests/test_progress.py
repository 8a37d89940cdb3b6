"""The step progress bar: drawn at most ``refresh_rate`` times a second, whatever the step rate."""

from __future__ import annotations

import time

from hydra_utils import FAST, compose_train

from dpfit.cli.train import train
from dpfit.training.progress import StepProgressBar


def test_progress_bar_redraws_are_rate_limited(tmp_path, monkeypatch):
    """A 40-step run of a tiny model takes well under a second per step; the bar's values follow every
    step, but the console is redrawn at most ~refresh_rate times a second (each redraw holds the
    interpreter for milliseconds, which the training loop would wait for)."""
    from rich.live import Live

    redraws = []
    original = Live.refresh

    def counting(self, *args, **kwargs):
        redraws.append(time.perf_counter())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Live, "refresh", counting)
    overrides = [o for o in FAST if o != "~callbacks.progress_bar"]
    cfg = compose_train([*overrides, "trainer.max_steps=40", "trainer.val_check_interval=40"], tmp_path)
    assert cfg.callbacks.progress_bar.refresh_rate == 2
    start = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - start
    # the thread's redraws plus a few forced ones (start, validation, the end)
    assert len(redraws) <= 2 * seconds + 8, (len(redraws), seconds)


def test_step_progress_bar_default_rate():
    assert StepProgressBar().refresh_rate == 2
