"""Load a DeePMD-kit PyTorch-backend checkpoint (``model.ckpt.pt``) into an :class:`EnergyModel`, or a
:class:`PropertyModel` for a ``property`` fitting."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from dpfit.model import EnergyModel, PropertyModel

_PREFIX = "model.Default.atomic_model."
_DESC_KEYS = ("sel", "rcut", "rcut_smth", "neuron", "axis_neuron", "resnet_dt", "type_one_side", "exclude_types",
              "set_davg_zero", "seed")
_FIT_KEYS = ("neuron", "resnet_dt", "numb_fparam", "numb_aparam", "seed")
_PROPERTY_KEYS = ("property_name", "task_dim", "intensive", "distinguish_types")


def is_deepmd_checkpoint(obj: object) -> bool:
    """True for the dict DeePMD-kit's ``torch.save`` writes (``{"model": state_dict with _extra_state}``)."""
    return isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "_extra_state" in obj["model"]


def deepmd_model_config(model_params: dict) -> dict:
    """Translate DeePMD-kit ``model`` JSON (se_e2_a / se_a + ener or property fitting) into dpfit's model config."""
    desc = dict(model_params["descriptor"])
    if desc.get("type", "se_e2_a") not in ("se_e2_a", "se_a"):
        raise ValueError(f"descriptor type {desc.get('type')!r} is not supported (only se_e2_a / se_a)")
    fit = dict(model_params.get("fitting_net", {}))
    if fit.get("type", "ener") not in ("ener", "property"):
        raise ValueError(f"fitting type {fit.get('type')!r} is not supported (ener or property)")
    sel = desc["sel"]
    if isinstance(sel, int) or isinstance(sel, str):
        raise ValueError(f"sel must be a list per type to import, got {sel!r}")
    fitting = {k: fit[k] for k in _FIT_KEYS if k in fit}
    if fit.get("type") == "property":
        fitting = {"type": "property", **{k: fit[k] for k in _PROPERTY_KEYS if k in fit}, **fitting}
        fitting.setdefault("distinguish_types", True)  # (DeePMD-kit's default)
    return {
        "type_map": list(model_params["type_map"]),
        "descriptor": {k: desc[k] for k in _DESC_KEYS if k in desc},
        "fitting_net": fitting,
        "precision": "float64" if desc.get("precision", "float64") in ("float64", "default") else "float32",
    }


def _load_mlp(mlp, state: dict, prefix: str) -> None:
    """Copy DeePMD's ``<prefix>L.{matrix,bias,idt}`` into a :class:`ResidualMLP` (same layout)."""
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})
    if len(layers) != len(mlp.layers):
        raise ValueError(f"{prefix}: checkpoint has {len(layers)} layers, model expects {len(mlp.layers)}")
    with torch.no_grad():
        for k, layer in zip(layers, mlp.layers):
            layer.matrix.copy_(state[f"{prefix}{k}.matrix"])
            layer.bias.copy_(state[f"{prefix}{k}.bias"].reshape(-1))
            if layer.idt is not None:
                layer.idt.copy_(state[f"{prefix}{k}.idt"].reshape(-1))


def load_deepmd_checkpoint(path: str | Path, precision: str | None = None) -> EnergyModel | PropertyModel:
    """Build a dpfit model from a DeePMD-kit checkpoint file, weights and statistics included."""
    from dpfit.io.checkpoint import load_checkpoint

    path = Path(path)
    ckpt = load_checkpoint(path)  # safely: weights_only with dpfit's allowlist
    if not is_deepmd_checkpoint(ckpt):
        raise ValueError(f"{path}: not a DeePMD-kit checkpoint (no model._extra_state)")
    return model_from_deepmd_state(ckpt["model"], precision=precision, source=str(path))


def model_from_deepmd_state(state: dict, precision: str | None = None,
                            source: str = "checkpoint") -> EnergyModel | PropertyModel:
    params = state["_extra_state"]["model_params"]
    config = deepmd_model_config(params)
    if precision:
        config["precision"] = precision
    config.setdefault("kernels", "auto")  # (dpfit's default: the op library where the model is run on a CPU)
    # a PyTorch backend until the caller selects one for its device (EnergyModel.select_backend)
    if config["fitting_net"].get("type") == "property":
        model = PropertyModel.from_config(config, device=None)
    else:
        model = EnergyModel.from_config(config, device=None)
    st = {k[len(_PREFIX):]: v for k, v in state.items() if k.startswith(_PREFIX)}
    desc = model.descriptor
    with torch.no_grad():
        desc.davg.copy_(st["descriptor.sea.mean"])
        desc.dstd.copy_(st["descriptor.sea.stddev"])
    for k, mlp in enumerate(desc.embeddings):
        _load_mlp(mlp, st, f"descriptor.sea.filter_layers.networks.{k}.layers.")
    fit = model.fitting
    for t, mlp in enumerate(fit.nets):
        _load_mlp(mlp, st, f"fitting_net.filter_layers.networks.{t}.layers.")
    if isinstance(model, PropertyModel):
        _load_property_statistics(model, st)
        return model
    with torch.no_grad():
        bias = st["fitting_net.bias_atom_e"].reshape(-1).clone()
        if "out_bias" in st:
            bias = bias + st["out_bias"][0, :, 0]
        fit.bias_atom_e.copy_(bias)
        for name in ("fparam_avg", "fparam_inv_std", "aparam_avg", "aparam_inv_std"):
            key = f"fitting_net.{name}"
            if key in st and getattr(fit, name).numel():
                getattr(fit, name).copy_(st[key].reshape(-1))
    return model


def _load_property_statistics(model: PropertyModel, st: dict) -> None:
    """The output statistics of a DeePMD-kit property model: its atomic output is
    ``(F(x) + bias_atom_e[t]) * out_std[t] + out_bias[t]`` (row 0 for every type when the statistics
    do not distinguish types), dpfit's ``F(x) * out_std[t] + out_bias[t]``."""
    fit = model.fitting
    ntypes, dim = fit.out_bias.shape
    with torch.no_grad():
        out_bias = st["out_bias"].reshape(-1, ntypes, dim)[0]
        out_std = st["out_std"].reshape(-1, ntypes, dim)[0]
        if not fit.distinguish_types:
            out_bias, out_std = out_bias[:1].expand(ntypes, dim), out_std[:1].expand(ntypes, dim)
        inner = st["fitting_net.bias_atom_e"].reshape(ntypes, dim)
        fit.out_bias.copy_(out_bias + inner * out_std if bool(inner.any()) else out_bias)
        fit.out_std.copy_(out_std)
        for name in ("fparam_avg", "fparam_inv_std", "aparam_avg", "aparam_inv_std"):
            key = f"fitting_net.{name}"
            if key in st and getattr(fit, name).numel():
                getattr(fit, name).copy_(st[key].reshape(-1))
