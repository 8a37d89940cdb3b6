"""DeePMD-kit's property loss, with an optional term on atomic labels (partial charges).

Frame term (DeePMD-kit's ``property`` loss): the error of the frame property, divided by the number of
atoms for an extensive property, in units of the model's label spread ``out_std`` (of type 0, as
DeePMD-kit), through ``loss_func``:

- ``smooth_mae``: sum over frames and tasks of Huber's ``0.5 e^2 / beta`` (|e| < beta) or ``|e| - beta / 2``;
- ``mae`` / ``mse``: sum of ``|e|`` / ``e^2``; ``rmse``: ``sqrt(mean e^2)``;
- ``mape``: ``mean |(label - pred) / (label + 1e-3)|`` (unscaled).

Atomic term (dpfit's): the same ``loss_func`` on the atomic values against ``atom_<property_name>.npy``,
each atom's error in units of its type's ``out_std``; the sums run over frames and tasks of the mean
over atoms. ``pref`` and ``pref_atomic`` weight the two; a term whose label a batch lacks
(``find_* == 0``) is dropped for that batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_FUNCS = ("smooth_mae", "mae", "mse", "rmse", "mape")
METRICS = ("smooth_mae", "mae", "mse", "rmse", "mape")


def elementwise(func: str, error: torch.Tensor, beta: float) -> torch.Tensor:
    """The per-element loss of scaled errors ``error`` for the sum-reduced loss functions."""
    if func == "smooth_mae":
        return F.smooth_l1_loss(error, torch.zeros_like(error), reduction="none", beta=beta)
    if func == "mae":
        return error.abs()
    return error * error


def frame_loss(func: str, pred: torch.Tensor, label: torch.Tensor, scale: torch.Tensor, beta: float) -> torch.Tensor:
    """DeePMD-kit's property loss of ``pred``/``label`` (nf, task_dim) with errors in units of ``scale`` (task_dim,)."""
    if func == "mape":
        return torch.mean(torch.abs((label - pred) / (label + 1e-3)))
    error = (label - pred) / scale
    if func == "rmse":
        return torch.sqrt(torch.mean(error * error))
    return elementwise(func, error, beta).sum()


def atomic_loss(func: str, pred: torch.Tensor, label: torch.Tensor, scale: torch.Tensor, beta: float) -> torch.Tensor:
    """The atomic term of ``pred``/``label`` (nf, nloc, task_dim), errors in units of ``scale`` (nf, nloc, task_dim)."""
    if func == "mape":
        return torch.mean(torch.abs((label - pred) / (label + 1e-3)))
    error = (label - pred) / scale
    if func == "rmse":
        return torch.sqrt(torch.mean(error * error))
    return elementwise(func, error, beta).mean(dim=1).sum()


class PropertyLoss(torch.nn.Module):
    """``pref * frame term + pref_atomic * atomic term`` (see the module docstring).

    DeePMD-kit's ``loss`` keys ``loss_func``, ``beta`` and ``metric`` (accepted; dpfit always logs RMSE
    and MAE). The property's name, width and intensiveness come from the model (:meth:`bind`).
    """

    needs_force = False
    needs_virial = False

    def __init__(self, loss_func: str = "smooth_mae", beta: float = 1.0, metric: list[str] | tuple = ("mae",),
                 pref: float = 1.0, pref_atomic: float = 0.0) -> None:
        super().__init__()
        if loss_func not in LOSS_FUNCS:
            raise ValueError(f"loss.loss_func={loss_func!r}: choose one of {', '.join(LOSS_FUNCS)}")
        unknown = [m for m in metric or () if m not in METRICS]
        if unknown:
            raise ValueError(f"loss.metric={list(metric)}: unknown {unknown}; choose from {', '.join(METRICS)}")
        if not float(beta) > 0:
            raise ValueError(f"loss.beta={beta}: must be positive")
        if float(pref) < 0 or float(pref_atomic) < 0:
            raise ValueError(f"loss.pref={pref}, loss.pref_atomic={pref_atomic}: prefactors must be 0 or more")
        self.loss_func = loss_func
        self.beta = float(beta)
        self.metric = list(metric or ())
        self.prefactors = {"p": float(pref), "ap": float(pref_atomic)}
        self.active = [k for k, v in self.prefactors.items() if v > 0]
        if not self.active:
            raise ValueError("loss.pref and loss.pref_atomic are both 0: set at least one")
        self.property_name: str | None = None
        self.intensive = False
        self._fitting: list = []  # the model's fitting net (a list: not registered as a submodule)

    def bind(self, fitting) -> PropertyLoss:
        """Take the property's name, intensiveness and ``out_std`` from the model's fitting net."""
        self.property_name = fitting.property_name
        self.intensive = bool(fitting.intensive)
        self._fitting = [fitting]
        return self

    def _name(self) -> str:
        if self.property_name is None:
            raise RuntimeError("PropertyLoss is not bound to a property model (PropertyLoss.bind)")
        return self.property_name

    @property
    def labels(self) -> set[str]:
        """The label files the active terms fit: ``<name>`` and/or ``atom_<name>``."""
        name = self._name()
        return {name if k == "p" else f"atom_{name}" for k in self.active}

    @property
    def label_keys(self) -> dict[str, str]:
        """term -> label key: ``p`` -> ``<name>``, ``ap`` -> ``atom_<name>``."""
        name = self._name()
        return {"p": name, "ap": f"atom_{name}"}

    def forward(self, pred: dict, batch: dict, lr_ratio: float = 1.0, strict: bool = True) -> tuple[torch.Tensor, dict]:
        """Total loss and a log dict (``l2_<term>`` the term's value, ``rmse_<term>``, ``mae_<term>``,
        ``pref_<term>``; term ``p`` frame, ``ap`` atomic). ``lr_ratio``/``strict``: the energy loss's
        arguments, unused (constant prefactors)."""
        keys = self.label_keys
        std = self._fitting[0].out_std
        total = pred["property"].new_zeros(())
        logs: dict[str, torch.Tensor | float] = {}
        for term in self.active:
            key = keys[term]
            if not batch.get(f"find_{key}", 0.0) or key not in batch:
                continue
            if term == "p":
                p = pred["property"]
                label = batch[key].to(p.dtype).reshape(p.shape)
                if not self.intensive:
                    n = p.new_tensor(float(batch["natoms"]))
                    p, label = p / n, label / n
                value = frame_loss(self.loss_func, p, label, std[0], self.beta)
            else:
                p = pred["atom_property"]
                label = batch[key].to(p.dtype).reshape(p.shape)
                value = atomic_loss(self.loss_func, p, label, std[batch["atype"]], self.beta)
            diff = (p - label).detach()
            total = total + self.prefactors[term] * value
            logs[f"l2_{term}"] = value.detach()
            logs[f"rmse_{term}"] = diff.pow(2).mean().sqrt()
            logs[f"mae_{term}"] = diff.abs().mean()
            logs[f"pref_{term}"] = self.prefactors[term]
        return total, logs
