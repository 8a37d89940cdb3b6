"""Data statistics set once before training: descriptor davg/dstd, energy bias (or a property model's
output bias and spread), fparam/aparam normalisation."""

from __future__ import annotations

import logging

import numpy as np
import torch

from dpfit.data.batch import model_inputs
from dpfit.model import EnergyModel, PropertyModel, pair_vectors

log = logging.getLogger(__name__)


@torch.no_grad()
def descriptor_statistics(model: EnergyModel, batches: list[dict], protect: float = 1e-2) -> None:
    """Set ``davg``/``dstd`` (ntypes, nnei, 4) from the raw environment matrices of ``batches`` (SPEC 3)."""
    desc = model.descriptor
    nt = desc.ntypes
    count = np.zeros(nt)
    s0 = np.zeros(nt)
    s00 = np.zeros(nt)
    saa = np.zeros(nt)
    for b in batches:
        inp, env = _env_matrix(desc, b)
        for t in range(nt):
            rows = env[inp["atype"] == t]
            if rows.numel() == 0:
                continue
            count[t] += rows.shape[0] * rows.shape[1]
            s0[t] += rows[..., 0].sum().item()
            s00[t] += (rows[..., 0] ** 2).sum().item()
            saa[t] += (rows[..., 1:] ** 2).sum().item()
    davg = torch.zeros_like(desc.davg)
    dstd = torch.ones_like(desc.dstd)
    for t in range(nt):
        if count[t] == 0:
            continue
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite data: refused after the statistics
            avg_r = s0[t] / count[t]
            std_r = np.sqrt(max(s00[t] / count[t] - avg_r**2, 0.0))
            std_a = np.sqrt(saa[t] / (3 * count[t]))
        davg[t, :, 0] = 0.0 if desc.set_davg_zero else avg_r
        dstd[t, :, 0] = max(std_r, protect)
        dstd[t, :, 1:] = max(std_a, protect)
    desc.davg.copy_(davg)
    desc.dstd.copy_(dstd)


def _env_matrix(desc, batch: dict) -> tuple[dict, torch.Tensor]:
    """(model inputs, raw environment matrix (nf, nloc, nnei, 4)) of a batch."""
    inp = model_inputs(batch)
    box = inp.get("box")
    diff, mask = pair_vectors(inp["coord"].to(desc.davg.dtype), None if box is None else box.to(desc.davg.dtype),
                              inp["nlist"], inp.get("shift"), far=desc.rcut + 1.0)
    return inp, desc.env_matrix(diff, mask)


def energy_bias(type_counts: np.ndarray, energies: np.ndarray) -> np.ndarray:
    """Per-type energies b minimising ``sum_frames (E - sum_t n_t b_t)^2``, minimum-norm when rank-deficient."""
    bias, *_ = np.linalg.lstsq(np.asarray(type_counts, dtype=np.float64), np.asarray(energies, dtype=np.float64),
                               rcond=None)
    return bias


@torch.no_grad()
def fitting_statistics(model: EnergyModel, batches: list[dict], protect: float = 1e-2) -> None:
    """Energy bias by least squares on type counts; fparam/aparam mean and inverse std."""
    fit = model.fitting
    nt = fit.ntypes
    counts, energies = [], []
    for b in batches:
        if b.get("find_energy", 0.0) and "energy" in b:
            atype = b["atype"]
            counts.append(torch.stack([(atype == t).sum(-1) for t in range(nt)], -1).numpy())
            energies.append(b["energy"].numpy().reshape(-1))
    if counts:
        fit.bias_atom_e.copy_(torch.from_numpy(energy_bias(np.concatenate(counts), np.concatenate(energies))))
    input_statistics(fit, batches, protect)


@torch.no_grad()
def input_statistics(fit, batches: list[dict], protect: float = 1e-2) -> None:
    """fparam/aparam mean and inverse std of a fitting net (energy or property)."""
    for key, n in (("fparam", fit.numb_fparam), ("aparam", fit.numb_aparam)):
        if not n:
            continue
        values = [b[key].reshape(-1, n) for b in batches if key in b]
        if not values:
            raise ValueError(f"the model needs {key} ({n} per {'frame' if key == 'fparam' else 'atom'}) but the "
                             f"training systems have no {key}.npy")
        allv = torch.cat(values).to(torch.float64)
        getattr(fit, f"{key}_avg").copy_(allv.mean(0))
        getattr(fit, f"{key}_inv_std").copy_(1.0 / allv.std(0, unbiased=False).clamp(min=protect))


def property_output_stats(
    frames: list[tuple[np.ndarray, np.ndarray]], atoms: list[tuple[np.ndarray, np.ndarray]], ntypes: int,
    intensive: bool = False, distinguish_types: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """A property's output bias and spread (ntypes, task_dim) each, as DeePMD-kit's ``compute_output_stats``.

    ``frames``: (type counts (nf, ntypes), frame labels (nf, task_dim)) per sampled batch; ``atoms``:
    (atom types (nf, nloc), atomic labels (nf, nloc, task_dim)) per batch with atomic labels.

    From frame labels, with ``distinguish_types``: the per-type values b minimising ``sum_frames (y -
    sum_t c_t b_t)^2``, with ``c_t`` the type counts (extensive) or fractions (intensive), and the std of the
    residual frame values for every type; without: the mean (and std) of y, divided by the number of
    atoms when extensive, for every type. From atomic labels: each type's mean and std of its atoms'
    labels, which take precedence; types without atomic labels take the frame-label values. A type found
    in neither is NaN (the caller decides).
    """
    bias_g = std_g = None
    if frames:
        counts = np.concatenate([np.asarray(c, dtype=np.float64) for c, _ in frames])
        y = np.concatenate([np.asarray(v, dtype=np.float64).reshape(len(c), -1) for c, v in frames])
        natoms = counts.sum(axis=1, keepdims=True)
        if not distinguish_types:
            yy = y if intensive else y / natoms
            bias_g = np.repeat(yy.mean(axis=0)[None], ntypes, axis=0)
            std_g = np.repeat(yy.std(axis=0)[None], ntypes, axis=0)
        else:
            a = counts / natoms if intensive else counts
            bias_g, *_ = np.linalg.lstsq(a, y, rcond=None)
            std_g = np.repeat((y - a @ bias_g).std(axis=0)[None], ntypes, axis=0)
    bias = std = None
    if atoms:
        types = np.concatenate([np.asarray(t).reshape(-1) for t, _ in atoms])
        values = np.concatenate([np.asarray(v, dtype=np.float64).reshape(np.asarray(t).size, -1) for t, v in atoms])
        bias = np.full((ntypes, values.shape[1]), np.nan)
        std = np.full((ntypes, values.shape[1]), np.nan)
        for t in range(ntypes):
            rows = values[types == t]
            if len(rows):
                bias[t], std[t] = rows.mean(axis=0), rows.std(axis=0)
        if bias_g is not None:
            bias = np.where(np.isnan(bias), bias_g, bias)
            std = np.where(np.isnan(std), std_g, std)
    else:
        bias, std = bias_g, std_g
    if bias is None:
        raise ValueError("no property labels in the statistics frames")
    return bias, std


@torch.no_grad()
def property_statistics(model: PropertyModel, batches: list[dict], protect: float = 1e-2) -> None:
    """A property model's ``out_bias`` / ``out_std`` (:func:`property_output_stats`) from the frame labels
    ``<name>`` and atomic labels ``atom_<name>`` of the batches, and its fparam/aparam normalisation.
    A type without labels gets bias 0 and spread 1; a spread of 0 (a constant label) becomes 1."""
    fit = model.fitting
    name, nt = fit.property_name, fit.ntypes
    frames, atoms = [], []
    for b in batches:
        atype = b["atype"].cpu().numpy()
        if b.get(f"find_{name}", 0.0) and name in b:
            counts = np.stack([(atype == t).sum(-1) for t in range(nt)], -1)
            frames.append((counts, b[name].cpu().numpy().reshape(len(atype), -1)))
        if b.get(f"find_atom_{name}", 0.0) and f"atom_{name}" in b:
            atoms.append((atype, b[f"atom_{name}"].cpu().numpy().reshape(*atype.shape, -1)))
    if not frames and not atoms:
        raise ValueError(f"the statistics frames have no {name}.npy or atom_{name}.npy labels")
    bias, std = property_output_stats(frames, atoms, nt, fit.intensive, fit.distinguish_types)
    missing = [model.type_map[t] for t in range(nt) if np.isnan(bias[t]).any()]
    if missing:
        log.warning("no %s labels of %s in the statistics frames: their output bias is 0 and spread 1", name, missing)
    bias, std = np.nan_to_num(bias, nan=0.0), np.nan_to_num(std, nan=1.0)
    if (std == 0).any():
        log.warning("the %s labels do not vary in the statistics frames: a spread of 0 is taken as 1", name)
        std = np.where(std == 0, 1.0, std)
    fit.out_bias.copy_(torch.from_numpy(bias))
    fit.out_std.copy_(torch.from_numpy(std))
    input_statistics(fit, batches, protect)


#: the statistics buffers, as a user knows them
STAT_NAMES = {"descriptor.davg": "davg", "descriptor.dstd": "dstd", "fitting.bias_atom_e": "energy bias",
              "fitting.fparam_avg": "fparam mean", "fitting.fparam_inv_std": "fparam std",
              "fitting.aparam_avg": "aparam mean", "fitting.aparam_inv_std": "aparam std",
              "fitting.out_bias": "property bias", "fitting.out_std": "property spread"}


def nonfinite_statistics(model: EnergyModel) -> list[str]:
    """The statistics (davg, dstd, energy bias, ...) holding NaN or inf; empty when all are finite."""
    return [STAT_NAMES.get(n, n) for n, b in _stat_buffers(model).items() if not bool(torch.isfinite(b).all())]


@torch.no_grad()
def first_nonfinite_batch(model: EnergyModel, batches: list[dict]) -> int | None:
    """The index of the first batch whose own data gives non-finite statistics (environment matrix, energy,
    fparam, aparam), else None."""
    desc = model.descriptor
    for k, b in enumerate(batches):
        _, env = _env_matrix(desc, b)
        values = [env, *(b[key] for key in ("energy", "fparam", "aparam") if torch.is_tensor(b.get(key)))]
        if not all(bool(torch.isfinite(v.to(torch.float64)).all()) for v in values):
            return k
        if torch.is_tensor(b.get("energy")) and bool((b["energy"].abs() > 1e150).any()):
            return k  # its square overflows in the least-squares bias
    return None


def compute_statistics(model: EnergyModel | PropertyModel, batches: list[dict], protect: float = 1e-2) -> None:
    """All data-derived buffers of the model, from the sampled training batches."""
    descriptor_statistics(model, batches, protect)
    if isinstance(model, PropertyModel):
        property_statistics(model, batches, protect)
    else:
        fitting_statistics(model, batches, protect)


# ------------------------------------------------------------------ stat_file: a cache of the statistics
#: the model buffers the statistics set (those present in the model)
STAT_BUFFERS = ("descriptor.davg", "descriptor.dstd", "fitting.bias_atom_e", "fitting.out_bias", "fitting.out_std",
                "fitting.fparam_avg", "fitting.fparam_inv_std", "fitting.aparam_avg", "fitting.aparam_inv_std")


def statistics_key(model: EnergyModel, data_identity: dict, protect: float) -> str:
    """A hash of everything the statistics depend on: the sampled frames (``data_identity``), the
    descriptor's geometry (type_map, rcut, rcut_smth, sel, set_davg_zero), fparam/aparam widths, protect."""
    import hashlib
    import json

    desc, fit = model.descriptor, model.fitting
    parts = {
        "data": data_identity, "type_map": list(model.type_map), "rcut": float(desc.rcut),
        "rcut_smth": float(getattr(desc, "rcut_smth", 0.0)), "sel": [int(n) for n in model.sel],
        "set_davg_zero": bool(getattr(desc, "set_davg_zero", False)), "numb_fparam": int(fit.numb_fparam),
        "numb_aparam": int(fit.numb_aparam), "protect": float(protect),
    }
    if isinstance(model, PropertyModel):  # (an energy model's key is unchanged)
        parts["property"] = [fit.property_name, fit.task_dim, fit.intensive, fit.distinguish_types]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stat_buffers(model: EnergyModel) -> dict[str, torch.Tensor]:
    buffers = dict(model.named_buffers())
    return {n: buffers[n] for n in STAT_BUFFERS if n in buffers}


#: the entry marking a dpfit statistics file (an .npz of ``<key>/<buffer>`` entries)
STAT_FILE_MARK = "dpfit_statistics"


def _is_stat_file(entries) -> bool:
    import re

    names = list(entries)
    return STAT_FILE_MARK in names or (bool(names) and all(re.fullmatch(r"[0-9a-f]{16}/[\w.]+", n) for n in names))


def check_stat_file(path) -> None:
    """``data.stat_file`` must be absent or a dpfit statistics file: any other file is never replaced."""
    from pathlib import Path

    from dpfit.errors import ConfigError

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"data.stat_file={path}: is a folder; give a file name, e.g. {path / 'stats.npz'}")
    if not path.exists():
        return
    try:
        with np.load(path, allow_pickle=False) as data:
            ok = _is_stat_file(data.files)
    except Exception:  # noqa: BLE001 - not an .npz at all
        ok = False
    if not ok:
        raise ConfigError(f"data.stat_file={path}: exists and is not a dpfit statistics file; it is never replaced: "
                          "give a new file name (e.g. stats.npz in the run folder)")


def _read_stat_file(path) -> dict[str, np.ndarray]:
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            if not _is_stat_file(data.files):
                return {}
            return {k: data[k] for k in data.files if k != STAT_FILE_MARK}
    except Exception as exc:  # noqa: BLE001 - an unreadable cache is recomputed, never trusted
        import logging

        logging.getLogger(__name__).warning("stat_file %s cannot be read (%s): statistics are recomputed", path, exc)
        return {}


def load_statistics(model: EnergyModel, path, key: str) -> bool:
    """Set the model's statistics from ``path`` (an ``.npz`` of entries ``<key>/<buffer>``) when it holds
    an entry for ``key``; False when it does not (nothing changed)."""
    stored = _read_stat_file(path)
    buffers = _stat_buffers(model)
    if not buffers or any(f"{key}/{n}" not in stored for n in buffers):
        return False
    if any(tuple(stored[f"{key}/{n}"].shape) != tuple(b.shape) for n, b in buffers.items()):
        return False
    with torch.no_grad():
        for n, b in buffers.items():
            b.copy_(torch.from_numpy(stored[f"{key}/{n}"]).to(b.dtype))
    return True


def save_statistics(model: EnergyModel, path, key: str) -> None:
    """Add the model's statistics to ``path`` under ``key`` (other entries kept; written atomically)."""
    import os
    from pathlib import Path

    path = Path(path)
    check_stat_file(path)
    stored = _read_stat_file(path)
    stored.update({f"{key}/{n}": b.detach().cpu().numpy() for n, b in _stat_buffers(model).items()})
    stored[STAT_FILE_MARK] = np.array(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **stored)
    os.replace(tmp, path)
