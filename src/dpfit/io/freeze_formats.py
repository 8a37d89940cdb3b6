"""``freeze.py``'s formats: one trained model (dpfit or DeePMD-kit checkpoint) -> one file.

- ``dpfit``: dpfit's own TorchScript (:mod:`dpfit.io.export`), only torch needed to run it.
- ``lammps``: a TorchScript ``.pth`` with DeePMD-kit's frozen-model interface (:mod:`dpfit.io.deepmd_pth`),
  for LAMMPS ``pair_style deepmd`` and DeePMD-kit's C++ API.
- ``deepmd``: a DeePMD-kit 3.x PyTorch checkpoint (:mod:`dpfit.io.deepmd_export`), for ``dp --pt freeze``,
  ``dp --pt test``, ``DeepPot``, ``deepmd.calculator.DP`` (and ``dp --pt compress`` after ``dp freeze``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dpfit.errors import ConfigError
from dpfit.io.checkpoint import MIN_NBOR_DIST_KEY, load_checkpoint, model_from_checkpoint
from dpfit.io.deepmd_checkpoint import is_deepmd_checkpoint
from dpfit.io.deepmd_export import deepmd_model_params, deepmd_passthrough, export_deepmd_checkpoint
from dpfit.io.deepmd_pth import freeze_for_deepmd
from dpfit.io.export import freeze
from dpfit.model import EnergyModel, PropertyModel, convert

FORMATS = ("dpfit", "lammps", "deepmd")


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
) -> tuple[Path, EnergyModel]:
    """Write the model of ``ckpt_path`` to ``output`` in format ``fmt``; returns (output, model).

    ``min_nbor_dist`` (Å, ``deepmd`` format): the training data's smallest neighbor distance, which
    ``dp --pt compress`` needs; default: the checkpoint's (a dpfit run computes it from its training data
    when it starts; a DeePMD-kit source carries its own). ``kernels`` (TorchScript formats): the file's CPU
    path calls dpfit's op library, which whoever loads the file loads first (LAMMPS: ``DP_PLUGIN_PATH``).
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
    if fmt == "dpfit":
        return freeze(model, output, overwrite=overwrite, kernels=kernels), model
    deepmd_model_params(model)  # a clear error before anything is written, if DeePMD cannot represent it
    passthrough, train_infos = _source_info(ckpt)
    if fmt == "lammps":
        return freeze_for_deepmd(model, output, overwrite=overwrite, source_params=passthrough.get("model_params"),
                                 kernels=kernels), model
    if min_nbor_dist is not None:
        if not float(min_nbor_dist) > 0:
            raise ConfigError(f"min_nbor_dist={min_nbor_dist}: must be a distance > 0 (Å)")
        passthrough["min_nbor_dist"] = torch.tensor(float(min_nbor_dist), dtype=torch.float64)
    return export_deepmd_checkpoint(model, output, overwrite=overwrite, passthrough=passthrough,
                                    train_infos=train_infos), model
