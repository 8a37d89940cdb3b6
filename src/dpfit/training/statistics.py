"""Data statistics set once before training: descriptor davg/dstd, energy bias, fparam/aparam normalisation."""

from __future__ import annotations

import numpy as np
import torch

from dpfit.data.batch import model_inputs
from dpfit.model import EnergyModel, pair_vectors


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
        inp = model_inputs(b)
        box = inp.get("box")
        diff, mask = pair_vectors(inp["coord"].to(desc.davg.dtype), None if box is None else box.to(desc.davg.dtype),
                                  inp["nlist"], inp.get("shift"), far=desc.rcut + 1.0)
        env = desc.env_matrix(diff, mask)
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
        avg_r = s0[t] / count[t]
        std_r = np.sqrt(max(s00[t] / count[t] - avg_r**2, 0.0))
        std_a = np.sqrt(saa[t] / (3 * count[t]))
        davg[t, :, 0] = 0.0 if desc.set_davg_zero else avg_r
        dstd[t, :, 0] = max(std_r, protect)
        dstd[t, :, 1:] = max(std_a, protect)
    desc.davg.copy_(davg)
    desc.dstd.copy_(dstd)


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


def compute_statistics(model: EnergyModel, batches: list[dict], protect: float = 1e-2) -> None:
    """All data-derived buffers of the model, from the sampled training batches."""
    descriptor_statistics(model, batches, protect)
    fitting_statistics(model, batches, protect)
