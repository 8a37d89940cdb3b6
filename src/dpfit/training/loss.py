"""DeePMD energy losses: energy, force, virial, atomic energy, relative energy, atom-weighted and relative force.

Every term has a prefactor moving from ``start_pref`` to ``limit_pref`` with the learning rate:
``p(t) = limit + (start - limit) * lr(t) / lr(0)``. A term whose label is missing from a batch
(``find_<label> == 0``) is dropped for that batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Prefactor:
    start: float = 0.0
    limit: float = 0.0

    @property
    def on(self) -> bool:
        return self.start != 0.0 or self.limit != 0.0

    def __call__(self, lr_ratio: float) -> float:
        return self.limit + (self.start - self.limit) * lr_ratio


def _force_error(pred: torch.Tensor, label: torch.Tensor, nu: float | None) -> torch.Tensor:
    """(nf, nloc, 3) force error, divided per atom by |F*| + nu for the relative force loss."""
    diff = pred - label
    if nu is not None:
        diff = diff / (torch.linalg.vector_norm(label, dim=-1, keepdim=True) + nu)
    return diff


def energy_term(pred: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``L_E = mean_frames (E - E*)^2 / N``; rmse_e per atom."""
    n = batch["natoms"]
    l2 = torch.mean((pred["energy"] - batch["energy"].to(pred["energy"].dtype)) ** 2)
    return l2 / n, l2.detach().sqrt() / n


def force_term(pred: dict, batch: dict, nu: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``L_F = mean over atoms and components (F - F*)^2`` (each atom's error / (|F*|+nu) if relative)."""
    l2 = torch.mean(_force_error(pred["force"], batch["force"].to(pred["force"].dtype), nu) ** 2)
    return l2, l2.detach().sqrt()


def virial_term(pred: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``L_V = mean over frames and 9 components (Xi - Xi*)^2 / N``; rmse_v per atom."""
    n = batch["natoms"]
    l2 = torch.mean((pred["virial"] - batch["virial"].to(pred["virial"].dtype)) ** 2)
    return l2 / n, l2.detach().sqrt() / n


def atom_energy_term(pred: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``L_ae = mean over atoms (E_i - E_i*)^2``."""
    l2 = torch.mean((pred["atom_energy"] - batch["atom_ener"].to(pred["atom_energy"].dtype)) ** 2)
    return l2, l2.detach().sqrt()


def relative_energy_term(pred: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``L_dE = mean over frame pairs a < b of ((E_a - E_b) - (E*_a - E*_b))^2 / N`` (one system per batch)."""
    e = pred["energy"]
    nf = e.shape[0]
    if nf < 2:
        raise ValueError("the relative energy loss needs at least 2 frames per batch (set data.batch_size >= 2)")
    err = e - batch["energy"].to(e.dtype)
    a, b = torch.triu_indices(nf, nf, offset=1, device=e.device)
    l2 = torch.mean((err[a] - err[b]) ** 2)
    return l2 / batch["natoms"], l2.detach().sqrt() / batch["natoms"]


def atom_pref_force_term(pred: dict, batch: dict, nu: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``L_pf = mean over atoms and components q_k (F - F*)^2`` with q_k from atom_pref.npy."""
    diff = _force_error(pred["force"], batch["force"].to(pred["force"].dtype), nu)
    q = batch["atom_pref"].to(diff.dtype).unsqueeze(-1)
    l2 = torch.mean(q * diff**2)
    return l2, l2.detach().sqrt()


# name -> (function, labels needed, uses the relative-force nu)
TERMS = {
    "e": (energy_term, ("energy",), False),
    "f": (force_term, ("force",), True),
    "v": (virial_term, ("virial",), False),
    "ae": (atom_energy_term, ("atom_ener",), False),
    "de": (relative_energy_term, ("energy",), False),
    "pf": (atom_pref_force_term, ("force", "atom_pref"), True),
}


class EnergyLoss(torch.nn.Module):
    """Weighted sum of the terms whose prefactors are not both zero (DeePMD ``ener`` loss keys).

    ``relative_f`` (nu, eV/Å) switches the force and pf terms to the relative force error.
    """

    def __init__(
        self,
        start_pref_e: float = 0.02,
        limit_pref_e: float = 1.0,
        start_pref_f: float = 1000.0,
        limit_pref_f: float = 1.0,
        start_pref_v: float = 0.0,
        limit_pref_v: float = 0.0,
        start_pref_ae: float = 0.0,
        limit_pref_ae: float = 0.0,
        start_pref_de: float = 0.0,
        limit_pref_de: float = 0.0,
        start_pref_pf: float = 0.0,
        limit_pref_pf: float = 0.0,
        relative_f: float | None = None,
    ) -> None:
        super().__init__()
        args = locals()
        self.prefactors = {k: Prefactor(float(args[f"start_pref_{k}"]), float(args[f"limit_pref_{k}"])) for k in TERMS}
        self.active = [k for k, p in self.prefactors.items() if p.on]
        if not self.active:
            raise ValueError("every loss prefactor is zero: set at least one start_pref_* or limit_pref_*")
        if relative_f is not None and relative_f <= 0:
            raise ValueError(f"relative_f (nu) must be positive, got {relative_f}")
        self.relative_f = relative_f

    @property
    def needs_force(self) -> bool:
        return any(k in self.active for k in ("f", "pf"))

    @property
    def needs_virial(self) -> bool:
        return "v" in self.active

    @property
    def labels(self) -> set[str]:
        return {lab for k in self.active for lab in TERMS[k][1]}

    def forward(self, pred: dict, batch: dict, lr_ratio: float, strict: bool = True) -> tuple[torch.Tensor, dict]:
        """Total loss and a log dict: ``l2_<term>``, ``rmse_<term>``, ``pref_<term>`` for the active terms.

        With ``strict=False`` (evaluation) the relative-energy term is skipped on one-frame batches.
        """
        total = pred["energy"].new_zeros(())
        logs: dict[str, torch.Tensor | float] = {}
        for k in self.active:
            fn, labels, relative = TERMS[k]
            if any(batch.get(f"find_{lab}", 0.0) == 0.0 for lab in labels):
                continue
            if k == "de" and not strict and pred["energy"].shape[0] < 2:
                continue
            value, rmse = fn(pred, batch, self.relative_f) if relative else fn(pred, batch)
            pref = self.prefactors[k](lr_ratio)
            total = total + pref * value
            logs[f"l2_{k}"] = value.detach()
            logs[f"rmse_{k}"] = rmse
            logs[f"pref_{k}"] = pref
        return total, logs
