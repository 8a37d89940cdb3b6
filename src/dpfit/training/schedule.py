"""DeePMD's exponential learning-rate decay (with optional warmup and worker scaling) as a LambdaLR factor."""

from __future__ import annotations

import math


def resolve_decay_steps(decay_steps: int, num_steps: int) -> int:
    """DeePMD's rule: a decay_steps >= num_steps is reset to 100 (long runs) or num_steps // 100 + 1."""
    if decay_steps >= num_steps:
        return 100 if num_steps // 10 > 100 else num_steps // 100 + 1
    return decay_steps


def worker_scale(scale_by_worker: str, world_size: int) -> float:
    """Learning-rate multiplier for W workers: ``none`` 1, ``linear`` W, ``sqrt`` sqrt(W)."""
    if scale_by_worker == "none":
        return 1.0
    if scale_by_worker == "linear":
        return float(world_size)
    if scale_by_worker == "sqrt":
        return math.sqrt(world_size)
    raise ValueError(f"scale_by_worker must be none, linear or sqrt, got {scale_by_worker!r}")


class ExponentialDecay:
    """``lr(t) = max(start_lr * r^floor(t / decay_steps), stop_lr)``, ``r = (stop/start)^(decay_steps/num_steps)``.

    With ``warmup_steps`` > 0 the rate rises linearly from ``warmup_start_factor * start_lr`` and the
    decay counts from the end of the warmup. ``__call__`` returns ``lr(t) / start_lr`` (LambdaLR factor).
    """

    def __init__(
        self,
        start_lr: float = 1e-3,
        stop_lr: float = 3.51e-8,
        decay_steps: int = 5000,
        num_steps: int = 1_000_000,
        warmup_steps: int = 0,
        warmup_start_factor: float = 0.0,
    ) -> None:
        if start_lr <= 0 or stop_lr <= 0:
            raise ValueError(f"start_lr and stop_lr must be positive, got {start_lr}, {stop_lr}")
        if num_steps <= 0:
            raise ValueError(f"num_steps must be positive, got {num_steps}")
        self.start_lr = float(start_lr)
        self.stop_lr = float(stop_lr)
        self.num_steps = int(num_steps)
        self.warmup_steps = int(warmup_steps)
        self.warmup_start_factor = float(warmup_start_factor)
        decay_total = max(self.num_steps - self.warmup_steps, 1)
        self.decay_steps = resolve_decay_steps(int(decay_steps), decay_total)
        self.decay_rate = (self.stop_lr / self.start_lr) ** (self.decay_steps / decay_total)

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            f = self.warmup_start_factor + (1.0 - self.warmup_start_factor) * step / self.warmup_steps
            return self.start_lr * f
        step -= self.warmup_steps
        return max(self.start_lr * self.decay_rate ** (step // self.decay_steps), self.stop_lr)

    def __call__(self, step: int) -> float:
        return self.lr(step) / self.start_lr
