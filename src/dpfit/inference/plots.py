"""PNG figures of a model's errors (parity plots, force-error histograms) and of DeePMD's ``lcurve.out``.

``results`` are dicts as returned by :func:`dpfit.inference.evaluate_system`: ``name``, ``natoms``,
``pbc``, ``pred_energy`` / ``pred_force`` / ``pred_virial`` and the labels ``energy`` / ``force`` /
``virial`` a system has (plus ``atype`` (natoms,) for :func:`error_histograms`). Matplotlib's Agg
backend is used, so no display is needed.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

#: (result key, axis label, per atom, file tag)
PARITY_PANELS = (
    ("energy", "energy / atom (eV)", True, "e_peratom"),
    ("force", "force component (eV/Å)", False, "f"),
    ("virial", "virial / atom (eV)", True, "v_peratom"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _has(result: dict, key: str) -> bool:
    # as dp test: no virial errors for non-periodic systems
    return key in result and f"pred_{key}" in result and (key != "virial" or result.get("pbc", True))


def _pairs(result: dict, key: str, per_atom: bool) -> tuple[np.ndarray, np.ndarray]:
    scale = 1.0 / result["natoms"] if per_atom else 1.0
    return np.ravel(result[key]) * scale, np.ravel(result[f"pred_{key}"]) * scale


def _rmse(data: np.ndarray, pred: np.ndarray) -> float:
    return float(np.sqrt(np.mean((pred - data) ** 2))) if data.size else float("nan")


def _short(name) -> str:
    return Path(str(name)).name or str(name)


def _parity_axes(ax, results: list[dict], key: str, label: str, per_atom: bool) -> float:
    """Scatter one quantity of every system on ``ax`` with the y = x line; returns the pooled RMSE."""
    datas, preds = [], []
    for r in results:
        if not _has(r, key):
            continue
        data, pred = _pairs(r, key, per_atom)
        ax.scatter(data, pred, s=4, alpha=0.6, label=_short(r["name"]), rasterized=data.size > 5000)
        datas.append(data)
        preds.append(pred)
    data, pred = np.concatenate(datas), np.concatenate(preds)
    lo = float(min(data.min(), pred.min()))
    hi = float(max(data.max(), pred.max()))
    pad = 0.05 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.05
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.ticklabel_format(useOffset=False)
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_xlabel(f"reference {label}")
    ax.set_ylabel(f"predicted {label}")
    if sum(_has(r, key) for r in results) > 1:
        ax.legend(fontsize=7, markerscale=3)
    return _rmse(data, pred)


def parity_plots(results: list[dict], prefix: str | Path) -> list[Path]:
    """One parity plot per quantity present: ``PREFIX.parity_e_peratom.png`` (energy per atom),
    ``PREFIX.parity_f.png`` (force components), ``PREFIX.parity_v_peratom.png`` (virial per atom, periodic
    systems). Every system's points share the axes; the title gives the RMSE over all of them.
    Returns the paths written."""
    plt = _pyplot()
    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    units = {"energy": "eV/atom", "force": "eV/Å", "virial": "eV/atom"}
    paths = []
    for key, label, per_atom, tag in PARITY_PANELS:
        if not any(_has(r, key) for r in results):
            continue
        fig, ax = plt.subplots(figsize=(4.8, 4.6))
        rmse = _parity_axes(ax, results, key, label, per_atom)
        ax.set_title(f"{key} RMSE = {rmse:.3e} {units[key]}", fontsize=10)
        fig.tight_layout()
        path = Path(f"{prefix}.parity_{tag}.png")
        fig.savefig(path, dpi=150)
        plt.close(fig)
        paths.append(path)
    return paths


def parity_summary(results: list[dict], path: str | Path) -> list[Path]:
    """The panels of :func:`parity_plots` side by side in one PNG at ``path`` (nothing if no label)."""
    panels = [p for p in PARITY_PANELS if any(_has(r, p[0]) for r in results)]
    if not panels:
        return []
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.4), squeeze=False)
    for ax, (key, label, per_atom, _) in zip(axes[0], panels):
        rmse = _parity_axes(ax, results, key, label, per_atom)
        ax.set_title(f"RMSE {rmse:.3e}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return [path]


def error_histograms(results: list[dict], prefix: str | Path, type_map: list[str] | None = None,
                     bins: int = 60) -> list[Path]:
    """Histogram of the force-component errors (pred - reference, eV/Å) per element, one panel each, in
    ``PREFIX.hist_f_error.png``. Every result needs ``atype`` (natoms,) model type indices; ``type_map``
    names them. Returns the paths written (none when no system has forces)."""
    with_force = [r for r in results if _has(r, "force")]
    if not with_force:
        return []
    errors: dict[int, list[np.ndarray]] = {}
    for r in with_force:
        if "atype" not in r:
            raise ValueError(f"{r.get('name')}: result has no 'atype'; per-element histograms need the atom types")
        atype = np.asarray(r["atype"]).reshape(-1)
        err = (np.asarray(r["pred_force"]) - np.asarray(r["force"])).reshape(-1, len(atype), 3)
        for t in np.unique(atype):
            errors.setdefault(int(t), []).append(err[:, atype == t, :].ravel())
    plt = _pyplot()
    types = sorted(errors)
    fig, axes = plt.subplots(1, len(types), figsize=(4.2 * len(types), 3.6), squeeze=False)
    for ax, t in zip(axes[0], types):
        e = np.concatenate(errors[t])
        name = type_map[t] if type_map is not None and t < len(type_map) else f"type {t}"
        ax.hist(e, bins=bins, color=f"C{t % 10}", alpha=0.8)
        ax.axvline(0.0, color="k", lw=0.8)
        ax.set_title(f"{name}: RMSE {_rmse(np.zeros_like(e), e):.3e} eV/Å", fontsize=10)
        ax.set_xlabel("force error (eV/Å)")
        ax.set_ylabel("count")
    fig.tight_layout()
    path = Path(f"{prefix}.hist_f_error.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return [path]


def read_lcurve(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Column names (from the ``#`` header) and rows (nrows, ncols) of a DeePMD ``lcurve.out``."""
    path = Path(path)
    names: list[str] = []
    with open(path) as fh:
        for line in fh:
            if line.startswith("#"):
                tokens = line[1:].split()
                if tokens and tokens[0] == "step":
                    names = tokens
            elif line.strip():
                break
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "input contained no data": handled below
        rows = np.loadtxt(path, comments="#", ndmin=2)
    if rows.size == 0:
        rows = np.zeros((0, len(names) or 1))
    if len(names) != rows.shape[1]:
        names = ["step"] + [f"col{k}" for k in range(1, rows.shape[1])]
    return names, rows


def lcurve_plot(lcurve_path: str | Path, png_path: str | Path) -> Path:
    """Learning curves of a DeePMD ``lcurve.out`` in ``png_path``: one log-scale panel per quantity
    (total ``rmse``, ``rmse_e``, ``rmse_f``, ``rmse_v``, ...; validation and training lines) and one for
    the learning rate. ValueError when the file has no rows."""
    names, rows = read_lcurve(lcurve_path)
    if len(rows) == 0:
        raise ValueError(f"{lcurve_path}: no rows to plot")
    step = rows[:, 0]
    groups: dict[str, list[tuple[str, np.ndarray]]] = {}
    for k, name in enumerate(names[1:], start=1):
        if name == "lr":
            continue
        base, _, split = name.rpartition("_")
        if "_val_" in name:  # a named validation set's column: rmse_f_val_<set>
            base, _, set_name = name.partition("_val_")
            split = f"val {set_name}"
        elif split not in ("val", "trn"):
            base, split = name, ""
        groups.setdefault(base, []).append((split or name, rows[:, k]))
    panels = list(groups) + (["lr"] if "lr" in names else [])
    plt = _pyplot()
    ncols = min(len(panels), 3)
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    for ax, panel in zip(axes.ravel(), panels):
        lines = [("lr", rows[:, names.index("lr")])] if panel == "lr" else groups[panel]
        positive = False
        for label, y in lines:
            ok = np.isfinite(y)  # validation columns are nan on rows without a validation
            ax.plot(step[ok], y[ok], marker="." if ok.sum() < 50 else None, label=label)
            positive |= bool(np.any(np.isfinite(y) & (y > 0)))
        if positive:
            ax.set_yscale("log")
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step")
        if len(lines) > 1:
            ax.legend(fontsize=8)
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path
