"""Batch plans: which frames of which system form each batch (DeePMD batch-size and system-probability rules)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dpfit.data.system import FrameSource


@dataclass
class SystemView:
    """A system restricted to some of its frames (a train or validation split)."""

    system: FrameSource
    indices: np.ndarray
    batch_size: int

    @property
    def nbatches(self) -> int:
        return max(len(self.indices) // self.batch_size, 1)


def resolve_batch_size(batch_size: int | str, natoms: int, key: str = "batch_size") -> int:
    """An int, ``"auto"`` (= ``"auto:32"``) or ``"auto:N"``: the smallest b with b * natoms >= N. ``key``:
    the setting's name in messages (``data.batch_size`` or ``data.val_batch_size``)."""
    if isinstance(batch_size, int) and not isinstance(batch_size, bool):
        if batch_size < 1:
            raise ValueError(f"{key}={batch_size}: must be 1 or more frames per batch")
        return batch_size
    text = str(batch_size).strip()
    if text.isdigit():
        return resolve_batch_size(int(text), natoms, key)
    if text == "auto":
        text = "auto:32"
    if text.startswith("auto:") and text[5:].isdigit() and int(text[5:]) > 0:
        return max(math.ceil(int(text[5:]) / natoms), 1)
    raise ValueError(f"{key}={batch_size}: must be a whole number of frames, 'auto' or 'auto:N' (N atoms per batch)")


def system_probabilities(views: Sequence[SystemView], auto_prob: str = "prob_sys_size",
                         sys_probs: Sequence[float] | None = None) -> np.ndarray:
    """DeePMD's system weights: explicit ``sys_probs``, ``prob_uniform``, ``prob_sys_size`` (by number of
    batches) or the block form ``prob_sys_size;0:2:0.7;2:4:0.3``."""
    n = len(views)
    nb = np.array([v.nbatches for v in views], dtype=np.float64)
    if sys_probs is not None:
        p = np.asarray(sys_probs, dtype=np.float64)
        if p.shape != (n,) or (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"sys_probs needs {n} non-negative weights, got {list(sys_probs)}")
        return p / p.sum()
    if auto_prob == "prob_uniform":
        return np.full(n, 1.0 / n)
    if auto_prob == "prob_sys_size":
        return nb / nb.sum()
    if auto_prob.startswith("prob_sys_size;"):
        p = np.zeros(n)
        for block in auto_prob.split(";")[1:]:
            lo, hi, w = block.split(":")
            lo, hi, w = int(lo), int(hi), float(w)
            if not 0 <= lo < hi <= n:
                raise ValueError(f"auto_prob block {block!r} is outside the {n} systems")
            p[lo:hi] = w * nb[lo:hi] / nb[lo:hi].sum()
        return p / p.sum()
    raise ValueError(f"auto_prob must be prob_uniform, prob_sys_size or prob_sys_size;lo:hi:w;..., got {auto_prob!r}")


class TrainBatchSampler:
    """Batches as a pure function of (seed, global batch number): resumable and rank-aware.

    Batch k picks a system by probability, then ``batch_size`` distinct frames of it. Rank r of W
    draws batch numbers ``step * W + r``, so ranks see different frames. ``start_fn`` gives the
    global step at which iteration (re)starts (the trainer's step after a resume).
    """

    def __init__(self, views: Sequence[SystemView], probs: np.ndarray, seed: int, length: int,
                 start_fn: Callable[[], int] = lambda: 0, rank: int = 0, world_size: int = 1) -> None:
        self.views = list(views)
        self.probs = probs
        self.seed = seed
        self.length = length
        self.start_fn = start_fn
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return self.length

    def batch(self, number: int) -> list[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, number])
        s = int(rng.choice(len(self.views), p=self.probs))
        view = self.views[s]
        replace = len(view.indices) < view.batch_size
        frames = rng.choice(view.indices, size=view.batch_size, replace=replace)
        return [(s, int(f)) for f in frames]

    def __iter__(self):
        start = self.start_fn()
        for step in range(start, start + self.length):
            yield self.batch(step * self.world_size + self.rank)


class EvalBatchSampler:
    """Every frame once, in order, batches of one system; ``numb_btch`` caps the batches per system.

    With W ranks, rank r takes batches r, r + W, ... (no frame counted twice across ranks).
    """

    def __init__(self, views: Sequence[SystemView], numb_btch: int | None = None, rank: int = 0,
                 world_size: int = 1) -> None:
        plan = []
        for s, view in enumerate(views):
            chunks = [view.indices[i: i + view.batch_size] for i in range(0, len(view.indices), view.batch_size)]
            if numb_btch:
                chunks = chunks[:numb_btch]
            plan.extend([(s, int(f)) for f in c] for c in chunks)
        self.plan = plan[rank::world_size]

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self):
        return iter(self.plan)
