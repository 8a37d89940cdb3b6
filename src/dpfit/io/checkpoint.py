"""Load a trained model from a dpfit (Lightning) checkpoint or a DeePMD-kit checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from dpfit.io.deepmd_checkpoint import is_deepmd_checkpoint, model_from_deepmd_state
from dpfit.model import EnergyModel, build_model, convert

#: key of the model config inside a dpfit checkpoint (Lightning's hyper_parameters)
MODEL_CONFIG_KEY = "model_config"


def model_from_dpfit_checkpoint(ckpt: dict, precision: str | None = None) -> EnergyModel:
    """Rebuild the model of a dpfit Lightning checkpoint (weights under ``model.``), on a PyTorch backend
    (the caller selects one for its device: :meth:`EnergyModel.select_backend`)."""
    config = dict(ckpt["hyper_parameters"][MODEL_CONFIG_KEY])
    if precision:
        config["precision"] = precision
    model = build_model(config, device=None)
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    return model


def load_model(path: str | Path, precision: str | None = None, impl: str | None = None) -> EnergyModel:
    """Any supported checkpoint -> its model in eval mode (float64 unless ``precision``), as the
    implementation ``impl`` (``fast`` or ``reference``; None: the checkpoint's ``model.impl``). The fast
    model computes with PyTorch until its backend is selected for a device
    (:meth:`~dpfit.model.EnergyModel.select_backend`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"{path}: cannot be read as a torch checkpoint ({exc})") from exc
    if is_deepmd_checkpoint(ckpt):
        model = model_from_deepmd_state(ckpt["model"], precision=precision, source=str(path))
    elif isinstance(ckpt, dict) and MODEL_CONFIG_KEY in ckpt.get("hyper_parameters", {}):
        model = model_from_dpfit_checkpoint(ckpt, precision=precision)
    else:
        raise ValueError(f"{path}: neither a dpfit nor a DeePMD-kit checkpoint")
    return (convert(model, impl) if impl else model).eval()
