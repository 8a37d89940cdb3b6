"""``freeze.py``'s formats: one trained model (dpfit or DeePMD-kit checkpoint) -> one file.

- ``dpfit``: dpfit's own TorchScript (:mod:`dpfit.io.export`), only torch needed to run it.
- ``lammps``: a TorchScript ``.pth`` with DeePMD-kit's frozen-model interface (:mod:`dpfit.io.deepmd_pth`),
  for LAMMPS ``pair_style deepmd`` and DeePMD-kit's C++ API.
- ``deepmd``: a DeePMD-kit 3.x PyTorch checkpoint (:mod:`dpfit.io.deepmd_export`), for ``dp --pt freeze``,
  ``dp --pt test``, ``DeepPot``, ``deepmd.calculator.DP`` (and ``dp --pt compress`` after ``dp freeze``).

The TorchScript formats can hold a compressed model (``compress``: the embedding nets as tables,
:mod:`dpfit.model.tabulation`), checked against the exact model on random frames before it is written.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpfit.errors import ConfigError
from dpfit.io.checkpoint import MIN_NBOR_DIST_KEY, load_checkpoint, model_from_checkpoint
from dpfit.io.deepmd_checkpoint import is_deepmd_checkpoint
from dpfit.io.deepmd_export import deepmd_model_params, deepmd_passthrough, export_deepmd_checkpoint
from dpfit.io.deepmd_pth import freeze_for_deepmd
from dpfit.io.export import freeze, torch_neighbor_list
from dpfit.model import EnergyModel, PropertyModel, convert

FORMATS = ("dpfit", "lammps", "deepmd")


@dataclass
class CompressOptions:
    """``freeze.py compress=true``'s options (config ``compression``): the tables' ``step`` in the nets'
    input s and their reach ``extrapolate`` (:func:`dpfit.model.tabulation.compress`), the number of random
    ``frames`` the compressed model is compared with the exact one on, and their ``seed``."""

    step: float = 0.01
    extrapolate: float = 5.0
    frames: int = 3
    seed: int = 0


def random_frames(ntypes: int, sel: list[int], rcut: float, min_nbor_dist: float, nframes: int, seed: int = 0,
                  natoms: int = 96) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``nframes`` periodic frames (coord (natoms, 3) Å, atype, box (3, 3)) for checking a model: the types in
    the proportions of ``sel``, a cubic cell with about 0.6 sum(sel) neighbours per atom within ``rcut``, no
    two atoms closer than ``min_nbor_dist`` and half of them placed 1 to 1.5 min_nbor_dist from another (the
    short distances where the tables' inputs are largest)."""
    rng = np.random.default_rng(seed)
    total = max(sum(sel), 1)
    counts = [max(1, round(natoms * s / total)) for s in sel]
    atype = np.repeat(np.arange(ntypes), counts)
    n = len(atype)
    density = 0.6 * total / (4.0 / 3.0 * math.pi * rcut**3)
    side = max((n / density) ** (1.0 / 3.0), 2.0 * min_nbor_dist)
    frames = []
    for _ in range(nframes):
        coord = np.zeros((n, 3))
        for i in range(n):
            for _try in range(1000):
                if i > 0 and rng.random() < 0.5:
                    direction = rng.normal(size=3)
                    distance = min_nbor_dist * rng.uniform(1.0, 1.5)
                    x = coord[rng.integers(i)] + distance * direction / np.linalg.norm(direction)
                else:
                    x = rng.uniform(0.0, side, size=3)
                d = coord[:i] - x
                d -= side * np.round(d / side)
                if i == 0 or np.sqrt((d * d).sum(1)).min() >= min_nbor_dist:
                    break
            coord[i] = x
        frames.append((torch.from_numpy(coord), torch.from_numpy(atype), torch.eye(3, dtype=torch.float64) * side))
    return frames


def compression_check(exact: EnergyModel, compressed: EnergyModel, backend: str, options: CompressOptions,
                      min_nbor_dist: float) -> str:
    """The largest differences of energy per atom, force component and virial per atom between ``exact``
    and ``compressed`` (both on ``backend``) on :func:`random_frames`, as a line for the user."""
    if options.frames <= 0:
        return "not compared with the exact model (compression.frames=0)"
    exact.use_backend(backend)
    compressed.use_backend(backend)
    frames = random_frames(len(exact.type_map), exact.sel, exact.rcut, min_nbor_dist, options.frames, options.seed)
    worst = {"energy": 0.0, "force": 0.0, "virial": 0.0}
    for coord, atype, box in frames:
        wrapped, nlist, shift = torch_neighbor_list(coord.to(exact.dtype), atype, box.to(exact.dtype), exact.rcut,
                                                    exact.sel)
        args = (wrapped[None], atype[None], nlist[None], box[None].to(exact.dtype), shift[None])
        with torch.no_grad():
            a = exact(*args, do_force=True, do_virial=True)
            b = compressed(*args, do_force=True, do_virial=True)
        natoms = coord.shape[0]
        for key, scale in (("energy", natoms), ("force", 1), ("virial", natoms)):
            worst[key] = max(worst[key], float((a[key] - b[key]).abs().max()) / scale)
    return (f"against the exact model ({options.frames} random frames of {frames[0][0].shape[0]} atoms, {backend} "
            f"backend): max |dE|/atom {worst['energy']:.1e} eV, max |dF| {worst['force']:.1e} eV/Å, max "
            f"|d virial|/atom {worst['virial']:.1e} eV")


def checkpoint_min_nbor_dist(ckpt: Any) -> float | None:
    """The training data's smallest neighbour distance a checkpoint holds (dpfit run or DeePMD-kit), or None."""
    dist = _source_info(ckpt)[0].get("min_nbor_dist")
    if dist is None or not float(dist) > 0:
        return None
    return float(dist)


def _source_info(ckpt: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(passthrough of a DeePMD-kit source, or a dpfit run's ``min_nbor_dist``; train_infos) of a loaded
    checkpoint."""
    if is_deepmd_checkpoint(ckpt):
        state = ckpt["model"]
        return deepmd_passthrough(state), dict(state["_extra_state"].get("train_infos") or {})
    lr = 0.0
    try:
        lr = float(ckpt["optimizer_states"][0]["param_groups"][0]["lr"])
    except (KeyError, IndexError, TypeError, ValueError):
        pass
    passthrough = {}
    dist = ckpt.get(MIN_NBOR_DIST_KEY) if isinstance(ckpt, dict) else None
    if dist is not None and float(dist) > 0:  # computed from the training data when the run started
        passthrough["min_nbor_dist"] = torch.tensor(float(dist), dtype=torch.float64)
    return passthrough, {"lr": lr, "step": int(ckpt.get("global_step", 0) or 0)}


def _check_output(ckpt_path: Path, output: Path, overwrite: bool) -> None:
    """The file written is never the checkpoint read, never a folder, and replaces nothing without overwrite."""
    if output.is_dir():
        raise FileExistsError(f"output={output}: is a folder; give a file name, e.g. output={output / 'model.pth'}")
    if output.exists() and output.resolve() == ckpt_path.resolve():
        raise FileExistsError(f"output={output}: is the checkpoint being read (ckpt_path); give another file name")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output}: exists; choose another output or pass overwrite=true")


def freeze_checkpoint(
    ckpt_path: str | Path, output: str | Path, fmt: str = "dpfit", precision: str | None = None,
    overwrite: bool = False, min_nbor_dist: float | None = None, kernels: bool = False,
    compress: CompressOptions | None = None,
) -> tuple[Path, EnergyModel]:
    """Write the model of ``ckpt_path`` to ``output`` in format ``fmt``; returns (output, model).

    ``min_nbor_dist`` (Å): the training data's smallest neighbor distance, which ``dp --pt compress`` needs
    (``deepmd`` format) and ``compress`` uses; default: the checkpoint's (a dpfit run computes it from its
    training data when it starts; a DeePMD-kit source carries its own). ``kernels`` (TorchScript formats):
    the file's CPU path calls dpfit's op library, which whoever loads the file loads first (LAMMPS:
    ``DP_PLUGIN_PATH``). ``compress`` (TorchScript formats, energy models): the embedding nets as tables
    (:meth:`~dpfit.model.EnergyModel.compress`); the model returned is then the compressed one, with the
    tables, their error bound and the comparison with the exact model in ``model.compression``
    (:class:`~dpfit.model.tabulation.Compression`, ``summary()``).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}: choose one of {', '.join(FORMATS)}")
    ckpt_path, output = Path(ckpt_path), Path(output)
    _check_output(ckpt_path, output, overwrite)
    ckpt = load_checkpoint(ckpt_path)  # safely: nothing in the file runs
    model = convert(model_from_checkpoint(ckpt, ckpt_path, precision=precision), "fast").eval()
    if fmt == "lammps" and isinstance(model, PropertyModel):
        raise ConfigError("format=lammps is LAMMPS pair_style deepmd, for energy models: freeze a property model "
                          "with format=dpfit (TorchScript) or format=deepmd (a DeePMD-kit checkpoint)")
    if compress is not None:
        if fmt == "deepmd":
            raise ConfigError("compress=true: format=deepmd writes a DeePMD-kit checkpoint, which DeePMD-kit "
                              "compresses itself (dp --pt freeze, then dp --pt compress); compress format=dpfit "
                              "or format=lammps")
        if isinstance(model, PropertyModel):
            raise ConfigError("compress=true: tabulates the embedding nets of energy models; freeze a property "
                              "model without it")
    # a clear error before anything is computed or written, if DeePMD cannot represent the model
    params = deepmd_model_params(model) if fmt != "dpfit" else None
    exact = model
    if compress is not None:
        dist = float(min_nbor_dist) if min_nbor_dist is not None else checkpoint_min_nbor_dist(ckpt)
        if dist is None:
            raise ConfigError(f"compress=true: {ckpt_path} holds no min_nbor_dist (the training data's smallest "
                              "neighbour distance, where the tables' accurate part ends); give it: min_nbor_dist=<Å>")
        if not 0 < dist < model.rcut:
            raise ConfigError(f"min_nbor_dist={dist}: must be between 0 and rcut ({model.rcut}) Å")
        model = copy.deepcopy(exact)
        compression = model.compress(dist, step=compress.step, extrapolate=compress.extrapolate)
        compression.checks.append(compression_check(exact, model, "kernels" if kernels else "compact", compress,
                                                    dist))
    if fmt == "dpfit":
        out = freeze(model, output, overwrite=overwrite, kernels=kernels)
    else:
        passthrough, train_infos = _source_info(ckpt)
        if fmt == "deepmd":
            if min_nbor_dist is not None:
                if not float(min_nbor_dist) > 0:
                    raise ConfigError(f"min_nbor_dist={min_nbor_dist}: must be a distance > 0 (Å)")
                passthrough["min_nbor_dist"] = torch.tensor(float(min_nbor_dist), dtype=torch.float64)
            return export_deepmd_checkpoint(model, output, overwrite=overwrite, passthrough=passthrough,
                                            train_infos=train_infos), model
        out = freeze_for_deepmd(model, output, overwrite=overwrite, source_params=passthrough.get("model_params"),
                                kernels=kernels, params=params)
    if compress is not None:
        model.compression = compression  # (set after scripting: not part of the file)
    return out, model
