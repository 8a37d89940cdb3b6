"""A rich progress bar counted in optimizer steps (DeePMD's numb_steps), not epochs."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """One bar from the current step to ``max_steps`` with loss, force RMSE and ETA; epochs are an
    implementation detail of the data loader, so the bar is never reset between them.

    ``refresh_rate``: redraws per second (Lightning's background thread; the bar's values are updated
    every step, drawn at most this often). Lightning's default, 100, redraws after nearly every step of
    a small system, and each redraw holds the Python interpreter for a few milliseconds: on the
    2-core development machine that cost ~5% of the water training loop.
    """

    def __init__(self, refresh_rate: int = 2, **kwargs) -> None:
        super().__init__(refresh_rate=refresh_rate, **kwargs)

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        return super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'Step':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.train_progress_bar_id is None or trainer.max_steps is None or trainer.max_steps <= 0:
            super().on_train_epoch_start(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.is_disabled:
            return
        if self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
