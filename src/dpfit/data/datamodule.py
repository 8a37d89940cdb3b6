"""Lightning DataModule: deepmd/npy folders or ASE files -> neighbor-listed batches of one system each."""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset

from dpfit.data.batch import batch_to_device, collate, make_sample
from dpfit.data.sampler import (
    EvalBatchSampler,
    SystemView,
    TrainBatchSampler,
    resolve_batch_size,
    system_probabilities,
)
from dpfit.data.system import DataError, FrameSource, Needs, load_systems, set_max_open_files

log = logging.getLogger(__name__)


class FrameDataset(Dataset):
    """Map (system, frame) -> sample with its neighbor list; built lazily in DataLoader workers.

    ``cache_mb`` > 0 keeps the neighbor lists of the frames seen last (least recently used first out,
    at most that many MiB, compact: int32 indices, int8 image shifts), so later epochs skip the search;
    the frames' coordinates and labels are read from the (memory-mapped) data each time. Each
    DataLoader worker holds its own cache."""

    def __init__(self, views: Sequence[SystemView], rcut: float, sel: Sequence[int], backend: str = "vesin",
                 cache_mb: float = 0.0, min_distance: float = 0.0) -> None:
        self.views = list(views)
        self.min_distance = float(min_distance)
        self.rcut = float(rcut)
        self.sel = list(sel)
        self.backend = backend
        self.cache_bytes = int(max(float(cache_mb), 0.0) * 2**20)
        self._cache: OrderedDict[tuple[int, int], tuple] = OrderedDict()
        self._cached_bytes = 0

    def __len__(self) -> int:
        return sum(len(v.indices) for v in self.views)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        s, f = key
        cached = self._cache.get((s, f)) if self.cache_bytes else None
        if cached is None:
            sample = make_sample(self.views[s].system, f, self.rcut, self.sel, self.backend, self.min_distance)
            if self.cache_bytes:
                self._store((s, f), sample)
        else:
            self._cache.move_to_end((s, f))
            nlist, shift, n_dropped, max_neighbors = cached
            sample = self.views[s].system.frame(f)
            sample.update(nlist=nlist.astype(np.int64), shift=shift.astype(np.int64), n_dropped=n_dropped,
                          max_neighbors=max_neighbors.copy(), frame_index=f)
        sample["system"] = s
        sample["sel"] = self.sel  # (for the batch's index facts, in collate)
        return sample

    def _store(self, key: tuple[int, int], sample: dict) -> None:
        shift = sample["shift"]
        if shift.size and (shift.min() < -128 or shift.max() > 127):
            return  # image shifts beyond int8 (a tiny cell): not cached
        entry = (sample["nlist"].astype(np.int32), shift.astype(np.int8), sample["n_dropped"],
                 np.array(sample["max_neighbors"]))
        size = entry[0].nbytes + entry[1].nbytes
        if size > self.cache_bytes:
            return
        while self._cache and self._cached_bytes + size > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old[0].nbytes + old[1].nbytes
        self._cache[key] = entry
        self._cached_bytes += size


def _check_labels(systems: list[FrameSource], needs: Needs) -> None:
    """Refuse training data with none of the labels the loss fits, and a system without any of the
    ``needs.required`` labels (a property model's: DeePMD-kit requires its label in every system)."""
    if needs.required:
        for s in systems:
            if not s.available & set(needs.required):
                files = " or ".join(f"{k}.npy" for k in sorted(needs.required))
                raise DataError(f"{s.name}: no {files} in its set.* folders: the loss fits "
                                f"{sorted(needs.labels or needs.required)} and every training system needs one of them")
    if not needs.labels or any(s.available & set(needs.labels) for s in systems):
        return
    first = systems[0].name + (f" (and {len(systems) - 1} more systems)" if len(systems) > 1 else "")
    raise DataError(f"{first}: no labels found: the loss fits {sorted(needs.labels)} but no training system has "
                    "any (deepmd/npy: energy.npy, force.npy, ...; extxyz: energy and forces from a calculator)")


def _as_list(paths) -> list:
    if paths is None:
        return []
    if isinstance(paths, (str, Path)):
        return [paths]
    return list(paths)


def _named_sets(systems) -> dict[str, list]:
    """``{name: paths}`` of named validation sets ({} for a list); names must be plain words."""
    if not hasattr(systems, "items"):
        return {}
    sets = {}
    for name, paths in systems.items():
        name = str(name)
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ValueError(f"data.val_systems: set name {name!r} must be letters, digits, '-' or '_'")
        sets[name] = _as_list(paths)
        if not sets[name]:
            raise ValueError(f"data.val_systems.{name} is empty: give its systems")
    return sets


class DeepmdDataModule(L.LightningDataModule):
    """Training / validation / test systems with DeePMD's batching rules.

    ``batch_size``: int, ``auto`` or ``auto:N`` per system. Training batches are drawn system by
    system with ``auto_prob`` / ``sys_probs`` weights, seeded by ``seed`` and the global step (so a
    resumed run sees the same batches). Without ``val_systems``, ``val_fraction`` of each training
    system's frames (at least one, for systems of 2+ frames) is held out for validation, and
    ``val_fraction`` of the one-frame systems (at least one when nothing else validates) whole.
    ``val_systems`` as a mapping ``{name: [paths]}`` names validation sets, each logged on its own.

    Systems open from headers only; before training every frame the model and loss read is checked
    once (``check_data``: NaN/inf, singular cells, atoms closer than ``min_distance`` Å), naming file
    and frame. ``max_open_files``: files each process keeps open for reading frames (LRU).
    Statistics use ``data_stat_nbatch`` batches per system, at most ``data_stat_max_frames`` frames in
    all (systems drawn across compositions); ``stat_file`` caches them (see
    :mod:`dpfit.training.statistics`).
    """

    def __init__(
        self,
        train_systems=None,
        val_systems=None,
        test_systems=None,
        type_map: Sequence[str] | None = None,
        rcut: float = 6.0,
        sel: Sequence[int] = (46, 92),
        batch_size: int | str = "auto",
        val_batch_size: int | str = 1,
        numb_btch: int | None = None,
        auto_prob: str = "prob_sys_size",
        sys_probs: Sequence[float] | None = None,
        val_fraction: float = 0.1,
        data_stat_nbatch: int = 10,
        num_workers: int | str = "auto",
        pin_memory: bool | str = "auto",
        seed: int = 1,
        epoch_length: int | None = None,
        neighbor_backend: str = "vesin",
        neighbor_cache_mb: float = 256.0,
        min_distance: float = 0.1,
        check_data: bool = True,
        data_stat_max_frames: int = 200,
        stat_file: str | None = None,
        max_open_files: int = 64,
    ) -> None:
        super().__init__()
        self.train_paths = _as_list(train_systems)
        #: named validation sets, ``val_systems={name: [paths]}`` (their metrics are logged as val/<name>/...)
        self.val_sets = _named_sets(val_systems)
        self.val_paths = [p for paths in self.val_sets.values() for p in paths] if self.val_sets else _as_list(val_systems)
        self.val_set_names = list(self.val_sets)
        self._val_view_set: list[int] = []
        if isinstance(sel, str):
            raise ValueError(f"data.sel={sel!r} is counted from the data when train.py starts "
                             "(dpfit.cli.deepmd.resolve_auto_sel); here give a list of counts per type")
        self.test_paths = _as_list(test_systems)
        self.type_map = list(type_map) if type_map is not None else None
        self.rcut = float(rcut)
        self.sel = list(sel)
        resolve_batch_size(batch_size, 1, "data.batch_size")  # each named apart, before anything is read
        resolve_batch_size(val_batch_size, 1, "data.val_batch_size")
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction}: must be at least 0 and below 1 (the share of each "
                             "training system held out for validation; 1 would leave no training frames)")
        self.numb_btch = numb_btch
        self.auto_prob = auto_prob
        self.sys_probs = list(sys_probs) if sys_probs is not None else None
        self.val_fraction = float(val_fraction)
        self.data_stat_nbatch = int(data_stat_nbatch)
        if num_workers != "auto" and not (isinstance(num_workers, int) and num_workers >= 0):
            raise ValueError(f"data.num_workers must be a count >= 0 or 'auto', got {num_workers!r}")
        if pin_memory != "auto" and not isinstance(pin_memory, bool):
            raise ValueError(f"data.pin_memory must be true, false or 'auto', got {pin_memory!r}")
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = int(seed)
        self.epoch_length = epoch_length
        from dpfit.data.neighbor import BACKENDS

        if neighbor_backend not in BACKENDS:
            raise ValueError(f"data.neighbor_backend must be one of {BACKENDS}, got {neighbor_backend!r}")
        self.neighbor_backend = neighbor_backend
        if not float(neighbor_cache_mb) >= 0:
            raise ValueError(f"data.neighbor_cache_mb must be >= 0 (0: no cache), got {neighbor_cache_mb!r}")
        self.neighbor_cache_mb = float(neighbor_cache_mb)
        if not float(min_distance) >= 0:
            raise ValueError(f"data.min_distance must be >= 0 Å (0: no check), got {min_distance!r}")
        self.min_distance = float(min_distance)
        self.check_data = bool(check_data)
        if int(data_stat_max_frames) < 1:
            raise ValueError(f"data.data_stat_max_frames must be >= 1, got {data_stat_max_frames!r}")
        self.data_stat_max_frames = int(data_stat_max_frames)
        self.stat_file = str(stat_file) if stat_file else None
        if int(max_open_files) < 1:
            raise ValueError(f"data.max_open_files must be >= 1, got {max_open_files!r}")
        self.max_open_files = int(max_open_files)
        #: arrays the model and loss read (None: asked of the trainer's LightningModule at setup, else all)
        self.needs: Needs | None = None
        self.train_views: list[SystemView] | None = None
        self.val_views: list[SystemView] = []
        self.test_views: list[SystemView] = []

    # ----------------------------------------------------------------- systems
    def _views(self, systems: list[FrameSource], role: str, indices=None) -> list[SystemView]:
        """Views of ``systems`` batched for ``role``: ``train`` (data.batch_size) or ``val`` (data.val_batch_size)."""
        key = "data.batch_size" if role == "train" else "data.val_batch_size"
        batch_size = self.batch_size if role == "train" else self.val_batch_size
        views = []
        for k, s in enumerate(systems):
            idx = np.arange(s.nframes) if indices is None else indices[k]
            if len(idx):
                views.append(SystemView(s, np.asarray(idx, dtype=np.int64),
                                        resolve_batch_size(batch_size, s.natoms, key)))
        return views

    def _needs(self) -> Needs:
        """What the model and loss read: ``self.needs``, else the LightningModule's ``data_needs()``."""
        if self.needs is not None:
            return self.needs
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        ask = getattr(module, "data_needs", None)
        if callable(ask):
            got = ask()
            return Needs(frozenset(got["labels"]), got.get("numb_fparam"), got.get("numb_aparam"),
                         frozenset(got.get("reported", ())), tuple(got.get("extra", ())),
                         frozenset(got.get("required", ())))
        return Needs()

    def _load(self, paths, needs: Needs) -> list[FrameSource]:
        start = time.perf_counter()
        systems = load_systems(paths, self.type_map, needs)
        opened = time.perf_counter()
        if self.check_data:
            for s in systems:
                s.check(self.min_distance)
            log.info("%d systems opened in %.1f s; their %d frames checked in %.1f s (data.check_data=false skips "
                     "this; frames are then checked when drawn)", len(systems), opened - start,
                     sum(s.nframes for s in systems), time.perf_counter() - opened)
        return systems

    def setup(self, stage: str | None = None) -> None:
        if self.train_views is not None:
            return
        set_max_open_files(self.max_open_files)
        needs = self._needs()
        if stage in ("fit", None, "validate"):
            if not self.train_paths:
                raise ValueError("data.train_systems is empty: give deepmd/npy folders or ASE-readable files")
            train = self._load(self.train_paths, needs)
            _check_labels(train, needs)
            if self.val_paths:
                self.train_views = self._views(train, "train")
                if self.val_sets:
                    self.val_views, self._val_view_set = [], []
                    for k, paths in enumerate(self.val_sets.values()):
                        views = self._views(self._load_val(paths, needs), "val")
                        self.val_views += views
                        self._val_view_set += [k] * len(views)
                else:
                    self.val_views = self._views(self._load_val(self.val_paths, needs), "val")
            else:
                tr_idx, va_idx = self._split(train)
                self.train_views = self._views(train, "train", tr_idx)
                self.val_views = self._views(train, "val", va_idx)
                if not self.val_views:
                    log.warning("no validation frames: data.val_fraction=%g holds none out and data.val_systems is "
                                "not given (the end-of-run table is skipped)", self.val_fraction)
                if not self.train_views:
                    raise DataError(f"data.val_fraction={self.val_fraction:g} leaves no training frames (every "
                                    "training system is held out for validation): lower it or give data.val_systems")
            names = [f"{v.system.name} ({len(v.indices)})" for v in self.train_views]
            log.info("%d training systems: %s%s", len(names), ", ".join(names[:5]),
                     f", ... ({len(names) - 5} more)" if len(names) > 5 else "")
        if self.test_paths:
            self.test_views = self._views(self._load(self.test_paths, needs), "val")

    def _load_val(self, paths, needs: Needs) -> list[FrameSource]:
        """Validation systems: each must hold a label the errors are computed against."""
        systems = self._load(paths, needs)
        if needs.extra:  # a property model: the labels it is validated against
            wanted = {name for name, _, _ in needs.extra}
            what = " or ".join(f"{name}.npy" for name in sorted(wanted))
        else:
            wanted = {"energy", "force", "virial"}
            what = ("energy, forces or virial: an extxyz needs them from a calculator, deepmd/npy energy.npy / "
                    "force.npy")
        for s in systems:
            if not s.available & wanted:
                raise DataError(f"{s.name}: a validation system without labels (no {what}): nothing to validate "
                                "against")
        return systems

    def min_nbor_dist(self) -> float | None:
        """The smallest distance between two atoms of the training data (Å; DeePMD-kit's ``min_nbor_dist``,
        which ``dp --pt compress`` needs): from the check of every frame before training, or, with
        ``check_data=false``, from the statistics frames (logged as such)."""
        systems = self.train_systems
        found = [s.nearest_distance for s in systems]
        if systems and all(d is not None for d in found):
            value = min(found)
            return float(value) if np.isfinite(value) else None
        from dpfit.data.neighbor import nearest_pair

        value = float("inf")
        for s, frames in self.stat_plan():
            system = self.train_views[s].system
            for f in frames:
                frame = system.frame(int(f))
                pair = nearest_pair(frame["coord"], frame["box"])
                if pair is not None:
                    value = min(value, pair[2])
        if not np.isfinite(value):
            return None
        log.info("min_nbor_dist %.4g Å from the statistics frames only (data.check_data=false)", value)
        return float(value)

    def _split(self, train: list[FrameSource]) -> tuple[list, list]:
        """Validation frames held out of the training systems (seeded): ``val_fraction`` of each system of
        2+ frames (at least one), and ``val_fraction`` of the one-frame systems whole."""
        rng = np.random.default_rng(self.seed)
        tr_idx, va_idx = [], []
        for s in train:
            perm = rng.permutation(s.nframes)
            nval = 0 if s.nframes < 2 or self.val_fraction <= 0 else max(1, round(self.val_fraction * s.nframes))
            va_idx.append(np.sort(perm[:nval]))
            tr_idx.append(np.sort(perm[nval:]))
        single = [k for k, s in enumerate(train) if s.nframes == 1]
        nval = round(self.val_fraction * len(single))
        if nval == 0 and self.val_fraction > 0 and len(single) >= 2 and not any(len(v) for v in va_idx):
            nval = 1
        for k in rng.permutation(single)[:nval] if single else []:
            va_idx[k], tr_idx[k] = tr_idx[k], va_idx[k]
        return tr_idx, va_idx

    def val_set_of(self, view: int) -> str:
        """The name of the validation set of validation system ``view`` (a batch's ``system``)."""
        return self.val_set_names[self._val_view_set[int(view)]]

    @property
    def train_systems(self) -> list[FrameSource]:
        return [v.system for v in self.train_views or []]

    # ----------------------------------------------------------------- loaders
    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def loader_settings(self) -> tuple[int, bool]:
        """DataLoader workers and pinned memory, resolving ``auto``: a run on GPUs builds neighbor lists
        in up to 4 workers per GPU process (the CPU cores of this node shared among its processes, one
        left to each process) into pinned memory; a CPU run builds them in the training process, whose
        threads already use every core."""
        trainer = self.trainer
        device = getattr(getattr(trainer, "strategy", None), "root_device", None)
        on_gpu = device is not None and device.type == "cuda"
        workers = self.num_workers
        if workers == "auto":
            workers = 0
            if on_gpu:
                cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
                workers = max(0, min(4, cores // max(int(getattr(trainer, "num_devices", 1)), 1) - 1))
        pin = on_gpu if self.pin_memory == "auto" else bool(self.pin_memory)
        return int(workers), pin

    def _loader(self, views, batch_sampler) -> DataLoader:
        workers, pin = self.loader_settings()
        return DataLoader(
            FrameDataset(views, self.rcut, self.sel, self.neighbor_backend, self.neighbor_cache_mb,
                         0.0 if self.check_data else self.min_distance),
            batch_sampler=batch_sampler,
            collate_fn=collate,
            num_workers=workers,
            pin_memory=pin,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        probs = system_probabilities(self.train_views, self.auto_prob, self.sys_probs)
        length = self.epoch_length or sum(v.nbatches for v in self.train_views)
        length = max(length // world, 1)
        trainer = self.trainer
        # with gradient accumulation over A batches, optimizer step t uses this rank's batches t*A .. t*A+A-1:
        # an epoch holds whole steps, and a (re)started epoch begins at batch global_step * A
        accumulate = max(int(getattr(trainer, "accumulate_grad_batches", 1) or 1), 1)
        length = -(-length // accumulate) * accumulate
        sampler = TrainBatchSampler(
            self.train_views, probs, self.seed, length,
            start_fn=(lambda: trainer.global_step * accumulate) if trainer is not None else (lambda: 0),
            rank=rank, world_size=world,
        )
        return self._loader(self.train_views, sampler)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        return self._loader(self.val_views, EvalBatchSampler(self.val_views, self.numb_btch, rank, world))

    def test_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        return self._loader(self.test_views, EvalBatchSampler(self.test_views, None, rank, world))

    def stat_plan(self) -> list[tuple[int, np.ndarray]]:
        """(training view, frames) sampled for the statistics (seeded): ``data_stat_nbatch`` batches per
        system, at most ``data_stat_max_frames`` frames in all. When the cap binds, systems are taken in
        turn from each composition (type counts), so every element and stoichiometry stays represented."""
        rng = np.random.default_rng([self.seed, 7])
        views = self.train_views or []
        want = [min(len(v.indices), self.data_stat_nbatch * v.batch_size) for v in views]
        order = list(range(len(views)))
        if sum(want) > self.data_stat_max_frames:
            groups: dict[tuple, list[int]] = {}
            for k in rng.permutation(len(views)):
                groups.setdefault(tuple(views[k].system.type_counts.tolist()) + (views[k].system.natoms,), []).append(int(k))
            queues = list(groups.values())
            order = []
            while queues:
                order.extend(q.pop(0) for q in queues)
                queues = [q for q in queues if q]
        plan, total = [], 0
        for k in order:
            n = min(want[k], self.data_stat_max_frames - total)
            if n <= 0:
                break
            plan.append((k, np.sort(rng.choice(views[k].indices, size=n, replace=False))))
            total += n
        return sorted(plan, key=lambda p: p[0])

    def stat_batches(self) -> list[dict]:
        """The batches of :meth:`stat_plan` (neighbor-listed) for the data statistics."""
        dataset = FrameDataset(self.train_views, self.rcut, self.sel, self.neighbor_backend,
                               min_distance=self.min_distance)
        batches = []
        for s, frames in self.stat_plan():
            bs = self.train_views[s].batch_size
            for i in range(0, len(frames), bs):
                batches.append(collate([dataset[(s, int(f))] for f in frames[i: i + bs]]))
        return batches

    def stat_identity(self) -> dict:
        """What the sampled statistics depend on (for ``stat_file``): the sample's systems and frames, and the
        content of those frames (coordinates, cell, types, energy, fparam, aparam), so data changed in place
        gives another key and is recomputed."""
        import hashlib

        h = hashlib.sha256()
        for s, frames in self.stat_plan():
            sys_ = self.train_views[s].system
            h.update(f"{sys_.name}|{sys_.nframes}|{sys_.natoms}|".encode())
            h.update(np.asarray(frames, dtype=np.int64).tobytes())
            for f in frames:
                frame = sys_.frame(int(f))
                for key in ("coord", "box", "atype", "energy", "fparam", "aparam"):
                    value = frame.get(key)
                    if value is not None:
                        h.update(key.encode() + np.ascontiguousarray(value).tobytes())
        return {"frames": h.hexdigest(), "rcut": self.rcut, "sel": list(self.sel), "type_map": self.type_map}

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        return batch_to_device(batch, device)


class DemoDataModule(DeepmdDataModule):
    """The built-in Cu/Ni EMT demo data, generated on first use into ``cache_dir`` (rank 0 only)."""

    def __init__(self, cache_dir: str | None = None, nframes: int = 90, **kwargs) -> None:
        from dpfit.data.demo import default_cache_dir

        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.nframes = nframes
        if not kwargs.get("train_systems"):
            kwargs["train_systems"] = [str(self.cache_dir / "train")]
            if not kwargs.get("val_systems"):
                kwargs["val_systems"] = [str(self.cache_dir / "val")]
        super().__init__(**kwargs)

    def prepare_data(self) -> None:
        from dpfit.data.demo import make_demo_dataset

        make_demo_dataset(self.cache_dir, nframes=self.nframes)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # no-op once generated; covers use without a Trainer
        super().setup(stage)
