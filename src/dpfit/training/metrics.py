"""torchmetrics RMSE/MAE of energy per atom, force components and virial per atom (or of a property model's
frame and atomic values), per stage."""

from __future__ import annotations

import torch
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection


def error_metrics() -> MetricCollection:
    names = {}
    for q in ("e", "f", "v"):
        names[f"rmse_{q}"] = MeanSquaredError(squared=False)
        names[f"mae_{q}"] = MeanAbsoluteError()
    return MetricCollection(names)


def update_error_metrics(metrics: MetricCollection, pred: dict, batch: dict) -> None:
    """Feed the labels present in the batch (energy and virial divided by the number of atoms)."""
    n = batch["natoms"]
    pairs = {}
    if batch.get("find_energy") and "energy" in batch:
        pairs["e"] = (pred["energy"].detach() / n, batch["energy"].to(pred["energy"].dtype) / n)
    if batch.get("find_force") and "force" in pred and "force" in batch:
        pairs["f"] = (pred["force"].detach(), batch["force"].to(pred["force"].dtype))
    if batch.get("find_virial") and "virial" in pred and "virial" in batch:
        pairs["v"] = (pred["virial"].detach() / n, batch["virial"].to(pred["virial"].dtype) / n)
    for q, (p, t) in pairs.items():
        metrics[f"rmse_{q}"].update(p.reshape(-1), t.reshape(-1))
        metrics[f"mae_{q}"].update(p.reshape(-1), t.reshape(-1))


def compute_updated(metrics: MetricCollection) -> dict[str, torch.Tensor]:
    """Values of the metrics that received data (others would warn and return 0)."""
    return {k: m.compute() for k, m in metrics.items() if m.update_count > 0}


def property_error_metrics() -> MetricCollection:
    """RMSE/MAE of a property model: ``p`` the frame property (per atom when extensive), ``ap`` the atomic values."""
    names = {}
    for q in ("p", "ap"):
        names[f"rmse_{q}"] = MeanSquaredError(squared=False)
        names[f"mae_{q}"] = MeanAbsoluteError()
    return MetricCollection(names)


def update_property_metrics(metrics: MetricCollection, pred: dict, batch: dict, name: str, intensive: bool) -> None:
    """Feed the property labels ``<name>`` / ``atom_<name>`` present in the batch (the frame values divided by
    the number of atoms for an extensive property, as the loss and DeePMD-kit's training log show them)."""
    pairs = {}
    if batch.get(f"find_{name}") and name in batch:
        p = pred["property"].detach()
        t = batch[name].to(p.dtype).reshape(p.shape)
        n = 1.0 if intensive else float(batch["natoms"])
        pairs["p"] = (p / n, t / n)
    atom = f"atom_{name}"
    if batch.get(f"find_{atom}") and atom in batch:
        p = pred["atom_property"].detach()
        pairs["ap"] = (p, batch[atom].to(p.dtype).reshape(p.shape))
    for q, (p, t) in pairs.items():
        metrics[f"rmse_{q}"].update(p.reshape(-1), t.reshape(-1))
        metrics[f"mae_{q}"].update(p.reshape(-1), t.reshape(-1))
