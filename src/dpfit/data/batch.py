"""Frames -> samples with neighbor lists -> batches of tensors (one system per batch)."""

from __future__ import annotations

import numpy as np
import torch

from dpfit.data.index_facts import index_facts
from dpfit.data.neighbor import build_neighbor_list
from dpfit.data.system import INPUTS, LABELS, FrameSource, check_min_distance

#: Keys of a batch given to the model (besides labels): coord, atype, box, nlist, shift, fparam, aparam,
#: and the index facts partner, kept, type_counts, type_order.
MODEL_KEYS = ("coord", "atype", "nlist", "box", "shift", "fparam", "aparam", "partner", "kept", "type_counts",
              "type_order")


def make_sample(system: FrameSource, index: int, rcut: float, sel: list[int], backend: str = "vesin",
                min_distance: float = 0.0) -> dict:
    """One frame with its DeePMD neighbor list (numpy); the unit of work of DataLoader workers.

    ``min_distance`` > 0: a :class:`~dpfit.data.system.DataError` naming file and frame when two atoms are
    closer (the check of frames not scanned before training)."""
    frame = system.frame(index)
    if min_distance > 0:
        check_min_distance(system, index, frame["coord"], frame["box"], min_distance)
    nl = build_neighbor_list(frame["coord"], frame["atype"], frame["box"], rcut, sel, warn=False, backend=backend)
    frame["nlist"] = nl.nlist
    frame["shift"] = nl.shift
    frame["n_dropped"] = nl.n_dropped
    frame["max_neighbors"] = nl.max_per_type
    frame["frame_index"] = index
    return frame


def collate(samples: list[dict]) -> dict:
    """Stack samples of one system into a batch of tensors.

    coord (nf, nloc, 3) float64, atype (nf, nloc) int64, box (nf, 3, 3) or absent (non-periodic),
    nlist (nf, nloc, nnei), shift (nf, nloc, nnei, 3), labels (energy (nf,), force (nf, nloc, 3),
    virial (nf, 9), atom_ener / atom_pref (nf, nloc); a property's ``<name>`` (nf, task_dim) and
    ``atom_<name>`` (nf, nloc, task_dim)), fparam (nf, nq), aparam (nf, nloc, np), and a ``find_<label>``
    float flag per label (1 when every frame has it, else 0: the loss term is dropped).
    With the samples' ``sel``, the batch's index facts (:func:`dpfit.data.index_facts.index_facts`:
    reverse-pair slots, occupied slots per type, atoms by type), computed here, in the DataLoader
    workers, so that the model's step does not derive them.
    """
    batch: dict = {
        "coord": torch.from_numpy(np.stack([s["coord"] for s in samples])),
        "atype": torch.from_numpy(np.stack([s["atype"] for s in samples])),
        "nlist": torch.from_numpy(np.stack([s["nlist"] for s in samples])),
        "natoms": len(samples[0]["atype"]),
        "system": samples[0].get("system", 0),
        "frame_index": torch.tensor([s["frame_index"] for s in samples]),
        "n_dropped": int(sum(s["n_dropped"] for s in samples)),
        "max_neighbors": np.max([s["max_neighbors"] for s in samples], axis=0).tolist(),
    }
    if samples[0]["box"] is not None:
        batch["box"] = torch.from_numpy(np.stack([s["box"] for s in samples]))
        batch["shift"] = torch.from_numpy(np.stack([s["shift"] for s in samples]))
    extra = samples[0].get("extra_labels", ())  # a property model's labels (Needs.extra)
    for key in LABELS + INPUTS + tuple(extra):
        present = all(key in s for s in samples)
        if key in LABELS or key in extra:
            batch[f"find_{key}"] = 1.0 if present else 0.0
        if present:
            batch[key] = torch.from_numpy(np.stack([s[key] for s in samples]))
    if "sel" in samples[0]:
        batch.update(index_facts(batch["nlist"], batch.get("shift"), batch["atype"], samples[0]["sel"]))
    return batch


def batch_to_device(batch: dict, device: torch.device | str) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def model_inputs(batch: dict) -> dict:
    """The keyword arguments of :meth:`dpfit.model.EnergyModel.forward` found in a batch."""
    return {k: batch[k] for k in MODEL_KEYS if k in batch}
