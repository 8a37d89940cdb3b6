"""``dp test`` for a property model: predictions of every frame, errors per system and averaged, detail
files, parity plots.

As DeePMD-kit 3.2's ``dp test`` (``deepmd/infer/model_test/property.py``): per system the MAE and RMSE
of the frame property over all frames and tasks (``PROPERTY MAE``, ``PROPERTY RMSE``, in the label's
units, not divided by the number of atoms) and, when the system has ``atom_<name>.npy``, of the atomic
values (``Atomic PROPERTY``); over systems each is averaged with its number of compared values as
weight (MAE linearly, RMSE in quadrature, :func:`dpfit.inference.evaluate.weighted_average`). With
``task_dim`` > 1 the errors of each task are added (``PROPERTY MAE [k]``). Detail files hold one row per
frame (``PREFIX.property.out``) or atom (``PREFIX.aproperty.out``): the labels, then the predictions.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from dpfit.data.batch import batch_to_device, collate, make_sample, model_inputs
from dpfit.data.system import DataError, FrameSource, Needs
from dpfit.inference.evaluate import check_model_inputs, inference_mode

#: metric key -> dp test's printed label (per-task keys ``<key>_<k>`` get `` [k]``)
METRIC_LABELS = {
    "mae_property": "PROPERTY MAE",
    "rmse_property": "PROPERTY RMSE",
    "mae_aproperty": "Atomic PROPERTY MAE",
    "rmse_aproperty": "Atomic PROPERTY RMSE",
}


def property_needs(model) -> Needs:
    """What a test reads from a system for ``model``: its label files, fparam/aparam."""
    name, width = model.property_name, model.task_dim
    fit = model.fitting
    return Needs(labels=frozenset(), reported=frozenset({name, f"atom_{name}"}),
                 numb_fparam=int(fit.numb_fparam), numb_aparam=int(fit.numb_aparam),
                 extra=((name, False, width), (f"atom_{name}", True, width)))


def evaluate_property_system(model: torch.nn.Module, system: FrameSource, batch_size: int = 1,
                             device: torch.device | str | None = None) -> dict:
    """Predict every frame of ``system`` (opened with :func:`property_needs`) next to its labels.

    Returns numpy float64 arrays ``pred_property`` (nf, task_dim), ``pred_atom_property`` (nf, natoms,
    task_dim) and the labels the system has, ``property`` / ``atom_property``; plus ``name``,
    ``natoms``, ``nframes``, ``task_dim``, ``property_name``. A system with neither label is a
    :class:`DataError` naming it."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    name, td = model.property_name, model.task_dim
    labels = {key: f for key, f in (("property", name), ("atom_property", f"atom_{name}")) if system.has(f)}
    if not labels:
        raise DataError(f"{system.name}: no {name}.npy or atom_{name}.npy to test the {name} model against")
    check_model_inputs(model, system)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    drop = {k for k, n in (("fparam", model.fitting.numb_fparam), ("aparam", model.fitting.numb_aparam)) if not n}
    preds: dict[str, list[np.ndarray]] = {"property": [], "atom_property": []}
    refs: dict[str, list[np.ndarray]] = {key: [] for key in labels}
    n_dropped = 0
    with inference_mode(model):
        for start in range(0, system.nframes, batch_size):
            stop = min(start + batch_size, system.nframes)
            batch = collate([make_sample(system, i, model.rcut, model.sel) for i in range(start, stop)])
            n_dropped += batch["n_dropped"]
            inputs = {k: v for k, v in model_inputs(batch_to_device(batch, device)).items() if k not in drop}
            out = model(**inputs)
            for key, chunks in preds.items():
                chunks.append(out[key].detach().to("cpu", torch.float64).numpy())
            for key, file in labels.items():
                refs[key].append(batch[file].to(torch.float64).numpy())
    if n_dropped:
        warnings.warn(f"{system.name}: {n_dropped} neighbors beyond sel={list(model.sel)} were dropped over "
                      f"{system.nframes} frames; the model sees truncated environments", stacklevel=2)
    nf, natoms = system.nframes, system.natoms
    shapes = {"property": (nf, td), "atom_property": (nf, natoms, td)}
    result = {"name": system.name, "natoms": natoms, "nframes": nf, "task_dim": td, "property_name": name,
              "pbc": bool(system.pbc), "n_dropped": n_dropped}
    for key, shape in shapes.items():
        result[f"pred_{key}"] = np.concatenate(preds[key]).reshape(shape)
    for key in labels:
        result[key] = np.concatenate(refs[key]).reshape(shapes[key])
    return result


def _mae(diff: np.ndarray) -> float:
    return float(np.mean(np.abs(diff)))


def _rmse(diff: np.ndarray) -> float:
    return float(np.sqrt(np.mean(diff * diff)))


def property_error_metrics(result: dict) -> dict[str, tuple[float, int]]:
    """key -> (value, weight = compared values): ``mae_property``, ``rmse_property`` over frames and tasks,
    with ``task_dim`` > 1 also ``mae_property_<k>``, ``rmse_property_<k>`` per task; the same with
    ``aproperty`` for the atomic values when the system has atomic labels."""
    errors: dict[str, tuple[float, int]] = {}
    td = int(result["task_dim"])
    for key, tag in (("property", "property"), ("atom_property", "aproperty")):
        if key not in result:
            continue
        diff = (np.asarray(result[f"pred_{key}"]) - np.asarray(result[key])).reshape(-1, td)
        errors[f"mae_{tag}"] = (_mae(diff), diff.size)
        errors[f"rmse_{tag}"] = (_rmse(diff), diff.size)
        if td > 1:
            for k in range(td):
                errors[f"mae_{tag}_{k}"] = (_mae(diff[:, k]), diff.shape[0])
                errors[f"rmse_{tag}_{k}"] = (_rmse(diff[:, k]), diff.shape[0])
    return errors


def format_property_metrics(metrics: dict) -> list[str]:
    """Lines in ``dp test`` wording, e.g. ``PROPERTY MAE            : 1.234567e-02 units``, then the
    per-task lines ``PROPERTY MAE [0]        : ...``. ``metrics``: key -> value or (value, weight)."""
    lines = []
    for key, label in METRIC_LABELS.items():
        tasks = sorted((k for k in metrics if k.startswith(key + "_")), key=lambda k: int(k.rsplit("_", 1)[1]))
        for k, text in ((key, label), *((t, f"{label} [{t.rsplit('_', 1)[1]}]") for t in tasks)):
            if k in metrics:
                value = metrics[k][0] if isinstance(metrics[k], tuple) else metrics[k]
                lines.append(f"{text:<24}: {value:e} units")
    return lines


def write_property_detail_files(prefix: str | Path, result: dict, append: bool = False) -> list[Path]:
    """``PREFIX.property.out`` (a row per frame: ``data_<name>_<k>`` then ``pred_<name>_<k>``) and, for
    a system with atomic labels, ``PREFIX.aproperty.out`` (a row per atom); one ``# <system>: columns``
    header per system block, blocks of several systems appended (``append``)."""
    name, td = result["property_name"], int(result["task_dim"])
    paths = []
    for key, tag in (("property", "property"), ("atom_property", "aproperty")):
        if key not in result:
            continue
        data = np.asarray(result[key]).reshape(-1, td)
        pred = np.asarray(result[f"pred_{key}"]).reshape(-1, td)
        column = name if key == "property" else f"atom_{name}"
        columns = " ".join([f"data_{column}_{k}" for k in range(td)] + [f"pred_{column}_{k}" for k in range(td)])
        path = Path(f"{prefix}.{tag}.out")
        with path.open("ab" if append else "wb") as fh:
            np.savetxt(fh, np.concatenate([data, pred], axis=1), header=f"{result['name']}: {columns}")
        paths.append(path)
    return paths


def property_parity_plots(results: list[dict], prefix: str | Path) -> list[Path]:
    """``PREFIX.parity_property.png`` (one panel per task) and ``PREFIX.parity_aproperty.png`` (atomic
    values, one panel per task) with the y = x line and each panel's RMSE; returns the paths written."""
    from dpfit.inference.plots import _parity_axes, _pyplot

    plt = _pyplot()
    Path(str(prefix)).parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, tag in (("property", "property"), ("atom_property", "aproperty")):
        have = [r for r in results if key in r]
        if not have:
            continue
        td, name = int(have[0]["task_dim"]), have[0]["property_name"]
        fig, axes = plt.subplots(1, td, figsize=(4.6 * td, 4.5), squeeze=False)
        for k, ax in enumerate(axes[0]):
            task = [{"name": r["name"], "natoms": r["natoms"], "q": np.asarray(r[key])[..., k],
                     "pred_q": np.asarray(r[f"pred_{key}"])[..., k]} for r in have]
            label = f"{'atomic ' if tag == 'aproperty' else ''}{name}" + (f" [{k}]" if td > 1 else "")
            rmse = _parity_axes(ax, task, "q", label, False)
            ax.set_title(f"{label} RMSE = {rmse:.3e}", fontsize=10)
        fig.tight_layout()
        path = Path(f"{prefix}.parity_{tag}.png")
        fig.savefig(path, dpi=150)
        plt.close(fig)
        paths.append(path)
    return paths
