"""Evaluate a model on every frame of a system, and the ``dp test`` error metrics and detail files.

The metrics and their averaging over systems follow DeePMD-kit's ``dp test`` (``deepmd/entrypoints/test.py``
and ``deepmd/utils/weight_avg.py``): per system, MAE and RMSE of the energy (also divided by the number
of atoms), of the force components and of the virial (also per atom, periodic systems only), each only
when the system has the label; over systems, each metric is averaged with the system's number of
compared values as weight (frames for energy, frames * natoms * 3 for force, frames * 9 for virial),
MAEs linearly and RMSEs in quadrature.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from dpfit.data.batch import batch_to_device, collate, make_sample, model_inputs
from dpfit.data.system import DataError, FrameSource

#: Labels compared by ``dp test`` for an energy model.
LABELS = ("energy", "force", "virial")

#: Detail file suffixes of ``dp test -d PREFIX``, in the order they are written.
DETAIL_SUFFIXES = (".e.out", ".e_peratom.out", ".f.out", ".v.out", ".v_peratom.out")

_VIRIAL_COLUMNS = " ".join(
    [f"data_v{a}{b}" for a in "xyz" for b in "xyz"] + [f"pred_v{a}{b}" for a in "xyz" for b in "xyz"]
)

#: metric key -> (DeePMD's printed label, unit), in DeePMD's printing order.
METRIC_LABELS = {
    "mae_e": ("Energy MAE", "eV"),
    "rmse_e": ("Energy RMSE", "eV"),
    "mae_ea": ("Energy MAE/Natoms", "eV"),
    "rmse_ea": ("Energy RMSE/Natoms", "eV"),
    "mae_f": ("Force  MAE", "eV/A"),
    "rmse_f": ("Force  RMSE", "eV/A"),
    "mae_v": ("Virial MAE", "eV"),
    "rmse_v": ("Virial RMSE", "eV"),
    "mae_va": ("Virial MAE/Natoms", "eV"),
    "rmse_va": ("Virial RMSE/Natoms", "eV"),
}


def check_model_inputs(model: torch.nn.Module, system: FrameSource) -> None:
    """Raise :class:`DataError` naming the system when it lacks the fparam/aparam the model needs."""
    for key, need, have in (
        ("fparam", int(model.fitting.numb_fparam), int(getattr(system, "numb_fparam", 0))),
        ("aparam", int(model.fitting.numb_aparam), int(getattr(system, "numb_aparam", 0))),
    ):
        unit = "per frame" if key == "fparam" else "per atom"
        if need and not system.has(key):
            raise DataError(
                f"{system.name}: the model needs {key} ({need} values {unit}) but this system has no {key}.npy"
            )
        if need and have != need:
            raise DataError(f"{system.name}: {key}.npy has {have} values {unit} but the model expects {need}")


@contextmanager
def inference_mode(model: torch.nn.Module):
    """Eval mode and no autograd at all (``torch.inference_mode``: forces are written out in closed form;
    the reference model leaves it for its autograd forces); restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _model_device(model: torch.nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def evaluate_system(
    model: torch.nn.Module,
    system: FrameSource,
    batch_size: int = 1,
    device: torch.device | str | None = None,
) -> dict:
    """Predict every frame of ``system`` in batches of ``batch_size`` frames, next to its labels.

    Returns numpy float64 arrays: ``pred_energy`` (nf,) eV, ``pred_force`` (nf, natoms, 3) eV/Å,
    ``pred_virial`` (nf, 9) eV, ``pred_atom_energy`` (nf, natoms) eV, and the labels the system has
    under ``energy``, ``force``, ``virial``; plus ``name``, ``natoms``, ``nframes``, ``pbc`` and
    ``n_dropped`` (neighbors beyond ``sel``, summed over frames). fparam/aparam are taken from the
    system (:class:`DataError` naming the system when the model needs them and it has none).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_model_inputs(model, system)
    device = torch.device(device) if device is not None else _model_device(model)
    drop = {k for k, n in (("fparam", model.fitting.numb_fparam), ("aparam", model.fitting.numb_aparam)) if not n}
    labels = [key for key in LABELS if system.has(key)]
    preds: dict[str, list[np.ndarray]] = {"energy": [], "force": [], "virial": [], "atom_energy": []}
    refs: dict[str, list[np.ndarray]] = {key: [] for key in labels}
    n_dropped = 0
    with inference_mode(model):
        for start in range(0, system.nframes, batch_size):
            stop = min(start + batch_size, system.nframes)
            # (with sel, collate adds the index facts)
            batch = collate([{**make_sample(system, i, model.rcut, model.sel), "sel": list(model.sel)}
                             for i in range(start, stop)])
            n_dropped += batch["n_dropped"]
            inputs = {k: v for k, v in model_inputs(batch_to_device(batch, device)).items() if k not in drop}
            out = model(**inputs, do_force=True, do_virial=True)
            for key, chunks in preds.items():
                chunks.append(out[key].detach().to("cpu", torch.float64).numpy())
            for key in labels:
                refs[key].append(batch[key].to(torch.float64).numpy())
    if n_dropped:
        warnings.warn(
            f"{system.name}: {n_dropped} neighbors beyond sel={list(model.sel)} were dropped over "
            f"{system.nframes} frames; the model sees truncated environments",
            stacklevel=2,
        )
    nf, natoms = system.nframes, system.natoms
    result: dict = {
        "name": system.name,
        "natoms": natoms,
        "nframes": nf,
        "pbc": bool(system.pbc),
        "n_dropped": n_dropped,
        "pred_energy": np.concatenate(preds["energy"]).reshape(nf),
        "pred_force": np.concatenate(preds["force"]).reshape(nf, natoms, 3),
        "pred_virial": np.concatenate(preds["virial"]).reshape(nf, 9),
        "pred_atom_energy": np.concatenate(preds["atom_energy"]).reshape(nf, natoms),
    }
    shapes = {"energy": (nf,), "force": (nf, natoms, 3), "virial": (nf, 9)}
    for key in labels:
        result[key] = np.concatenate(refs[key]).reshape(shapes[key])
    return result


def _mae(diff: np.ndarray) -> float:
    return float(np.mean(np.abs(diff)))


def _rmse(diff: np.ndarray) -> float:
    return float(np.sqrt(np.mean(diff * diff)))


def error_metrics(result: dict, natoms: int | None = None) -> dict[str, tuple[float, int]]:
    """``dp test`` errors of one system: key -> (value, weight), weight = number of compared values.

    Keys (present only for the labels the system has): ``mae_e``, ``rmse_e``, ``mae_ea``, ``rmse_ea``
    (eV, the ``a`` ones divided by ``natoms``), ``mae_f``, ``rmse_f`` (eV/Å, over all components),
    ``mae_v``, ``rmse_v``, ``mae_va``, ``rmse_va`` (eV; only for periodic systems, as DeePMD does).
    Weights: frames for energy, frames * natoms * 3 for force, frames * 9 for virial.
    """
    natoms = int(natoms if natoms is not None else result["natoms"])
    errors: dict[str, tuple[float, int]] = {}
    if "energy" in result:
        diff = np.asarray(result["pred_energy"]).reshape(-1) - np.asarray(result["energy"]).reshape(-1)
        mae, rmse = _mae(diff), _rmse(diff)
        errors.update(mae_e=(mae, diff.size), rmse_e=(rmse, diff.size),
                      mae_ea=(mae / natoms, diff.size), rmse_ea=(rmse / natoms, diff.size))
    if "force" in result:
        diff = np.asarray(result["pred_force"]).reshape(-1) - np.asarray(result["force"]).reshape(-1)
        errors.update(mae_f=(_mae(diff), diff.size), rmse_f=(_rmse(diff), diff.size))
    if "virial" in result and result.get("pbc", True):
        diff = np.asarray(result["pred_virial"]).reshape(-1) - np.asarray(result["virial"]).reshape(-1)
        mae, rmse = _mae(diff), _rmse(diff)
        errors.update(mae_v=(mae, diff.size), rmse_v=(rmse, diff.size),
                      mae_va=(mae / natoms, diff.size), rmse_va=(rmse / natoms, diff.size))
    return errors


def weighted_average(errors: list[dict[str, tuple[float, int]]]) -> dict[str, float]:
    """Average :func:`error_metrics` of several systems as ``dp test`` does.

    ``mae_*``: sum(w * mae) / sum(w); ``rmse_*``: sqrt(sum(w * rmse^2) / sum(w)), w the system's number
    of compared values; a metric is averaged over the systems that have it.
    """
    total: dict[str, float] = {}
    weight: dict[str, float] = {}
    for err in errors:
        for key, (value, w) in err.items():
            if key.startswith("mae"):
                total[key] = total.get(key, 0.0) + value * w
            elif key.startswith("rmse"):
                total[key] = total.get(key, 0.0) + value * value * w
            else:
                raise ValueError(f"unknown error type {key!r} (expected mae_* or rmse_*)")
            weight[key] = weight.get(key, 0.0) + w
    out = {}
    for key in [k for k in METRIC_LABELS if k in total] + [k for k in total if k not in METRIC_LABELS]:
        mean = total[key] / weight[key]
        out[key] = mean if key.startswith("mae") else float(np.sqrt(mean))
    return out


def format_metrics(metrics: dict, fmt: str = ".3e") -> list[str]:
    """Lines in ``dp test`` wording, e.g. ``Energy RMSE/Natoms : 3.354e-03 eV``.

    ``metrics``: key -> value or (value, weight), as from :func:`error_metrics` or :func:`weighted_average`.
    """
    lines = []
    for key, (label, unit) in METRIC_LABELS.items():
        if key in metrics:
            value = metrics[key][0] if isinstance(metrics[key], tuple) else metrics[key]
            lines.append(f"{label:<19}: {value:{fmt}} {unit}")
    return lines


def write_detail_files(prefix: str | Path, result: dict, append: bool = False) -> list[Path]:
    """Write ``PREFIX.e.out``, ``.e_peratom.out``, ``.f.out``, ``.v.out``, ``.v_peratom.out`` as ``dp test -d``.

    Reference columns first, then predictions; one ``# <system>: data_... pred_...`` header line per
    system block, blocks of several systems appended to the same files (``append``). As in DeePMD-kit,
    a label the system lacks is written as zeros in the data columns. Returns the paths written.
    """
    prefix = str(prefix)
    name, natoms, nf = result["name"], int(result["natoms"]), int(result["nframes"])

    def ref(key: str, shape: tuple) -> np.ndarray:
        return np.asarray(result[key]).reshape(shape) if key in result else np.zeros(shape)

    pe = np.concatenate([ref("energy", (nf, 1)), np.asarray(result["pred_energy"]).reshape(nf, 1)], axis=1)
    pf = np.concatenate(
        [ref("force", (nf * natoms, 3)), np.asarray(result["pred_force"]).reshape(nf * natoms, 3)], axis=1
    )
    pv = np.concatenate([ref("virial", (nf, 9)), np.asarray(result["pred_virial"]).reshape(nf, 9)], axis=1)
    blocks = (
        (pe, "data_e pred_e"),
        (pe / natoms, "data_e pred_e"),
        (pf, "data_fx data_fy data_fz pred_fx pred_fy pred_fz"),
        (pv, _VIRIAL_COLUMNS),
        (pv / natoms, _VIRIAL_COLUMNS),
    )
    paths = []
    for suffix, (data, columns) in zip(DETAIL_SUFFIXES, blocks):
        path = Path(prefix + suffix)
        with path.open("ab" if append else "wb") as fh:
            np.savetxt(fh, data, header=f"{name}: {columns}")
        paths.append(path)
    return paths
