"""Export a dpfit model as a DeePMD-kit 3.x PyTorch-backend checkpoint (``model.ckpt.pt``).

The inverse of :mod:`dpfit.io.deepmd_checkpoint`: the file holds ``{"model": state_dict}`` with DeePMD's
key names under ``model.Default.``, and ``_extra_state`` holding ``model_params`` (the ``model`` section
of an input.json: type_map, descriptor, fitting_net) and ``train_infos``. ``dp --pt freeze`` turns it
into a ``.pth``; ``dp --pt test``, ``dp --pt compress``, ``DeepPot`` and ``deepmd.calculator.DP`` read it.

A property model (:class:`~dpfit.model.PropertyModel`) exports as DeePMD-kit's ``property`` model: its
``out_bias`` / ``out_std`` go to ``atomic_model.out_bias`` / ``out_std`` (``distinguish_types`` true, the
statistics applied per type as dpfit does); ``atom_sum`` has no DeePMD-kit equivalent.

The per-type energy bias goes to ``atomic_model.out_bias`` (``fitting_net.bias_atom_e`` is zero), as in
DeePMD-kit's own checkpoints. Two values DeePMD keeps and dpfit does not model are carried over from a
DeePMD-kit source checkpoint when there is one (:func:`deepmd_passthrough`): ``min_nbor_dist`` (the
smallest neighbor distance of the training data, read by ``dp compress``) and ``out_std``; otherwise
``min_nbor_dist`` is ``-1`` (unknown: ``dp --pt compress`` then needs ``-t input.json``) and ``out_std``
is 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dpfit.errors import DpfitError
from dpfit.model import EnergyFitting, EnergyModel, PropertyFitting, PropertyModel, SeE2A

#: the model's key prefix in a DeePMD-kit checkpoint (ModelWrapper's single-task "Default" head)
MODEL_PREFIX = "model.Default."
ATOMIC_PREFIX = MODEL_PREFIX + "atomic_model."

#: dpfit model-config keys, each with its DeePMD-kit equivalent (same name)
DESCRIPTOR_KEYS = ("type", "sel", "rcut", "rcut_smth", "neuron", "axis_neuron", "resnet_dt", "type_one_side",
                   "exclude_types", "set_davg_zero", "seed", "precision", "_comment")
FITTING_KEYS = ("type", "neuron", "resnet_dt", "numb_fparam", "numb_aparam", "seed", "precision", "_comment")
#: a property fitting's keys besides FITTING_KEYS (``atom_sum`` only when null)
PROPERTY_KEYS = ("property_name", "task_dim", "intensive", "distinguish_types", "atom_sum")
#: (``impl``, ``kernels``: implementation choices, not part of the function the model computes)
TOP_KEYS = ("type_map", "descriptor", "fitting_net", "precision", "impl", "kernels", "_comment")


class NotRepresentableError(DpfitError, ValueError):
    """The model uses something DeePMD-kit's se_e2_a + ener model has no equivalent for."""


def _precision(model: EnergyModel) -> str:
    dtype = model.descriptor.davg.dtype
    names = {torch.float64: "float64", torch.float32: "float32"}
    if dtype not in names:
        raise NotRepresentableError(f"precision {dtype} has no DeePMD-kit equivalent (float64 or float32)")
    return names[dtype]


def check_representable(model: EnergyModel) -> None:
    """Raise :class:`NotRepresentableError` naming the first option DeePMD-kit cannot represent."""
    if not isinstance(model.descriptor, SeE2A):  # (any backend: the same parameters)
        raise NotRepresentableError(f"descriptor {type(model.descriptor).__name__}: only se_e2_a exports to DeePMD-kit")
    prop = isinstance(model.fitting, PropertyFitting)
    if not isinstance(model.fitting, EnergyFitting) and not prop:
        raise NotRepresentableError(f"fitting net {type(model.fitting).__name__}: only ener and property export "
                                    "to DeePMD-kit")
    if prop and model.fitting.has_atom_sum:
        raise NotRepresentableError("model.fitting_net.atom_sum (a fixed sum of the atomic values) has no DeePMD-kit "
                                    "equivalent: export with format=dpfit")
    config = dict(model.config or {})
    for key in config:
        if key not in TOP_KEYS:
            raise NotRepresentableError(f"model.{key} has no DeePMD-kit equivalent")
    fitting_keys = FITTING_KEYS + (PROPERTY_KEYS if prop else ())
    fitting_type = ("property",) if prop else ("ener",)
    for section, allowed in (("descriptor", DESCRIPTOR_KEYS), ("fitting_net", fitting_keys)):
        for key, value in dict(config.get(section) or {}).items():
            if key not in allowed:
                raise NotRepresentableError(f"model.{section}.{key} has no DeePMD-kit equivalent")
            if key == "type" and value not in (("se_e2_a", "se_a") if section == "descriptor" else fitting_type):
                raise NotRepresentableError(f"model.{section}.type={value!r} has no DeePMD-kit se_e2_a/"
                                            f"{fitting_type[0]} equivalent")
    _precision(model)
    desc, fit = model.descriptor, model.fitting
    names = list(model.type_map)
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise NotRepresentableError(f"type_map {names}: DeePMD-kit needs distinct element names")
    # DeePMD's layer rule: tanh hidden layers, residual when the width stays or doubles, idt only there;
    # the fitting nets end in one linear layer of width 1 (a property's: task_dim)
    width = fit.task_dim if prop else 1
    for kind, nets, last_linear in (("descriptor", desc.embeddings, False), ("fitting_net", fit.nets, True)):
        for k, net in enumerate(nets):
            layers = list(net.layers)
            for n, layer in enumerate(layers):
                is_last = last_linear and n == len(layers) - 1
                n_in, n_out = layer.matrix.shape
                rule = 1 if n_out == n_in else 2 if n_out == 2 * n_in else 0
                if layer.activate == is_last or (not is_last and layer.kind != rule) or (is_last and n_out != width):
                    raise NotRepresentableError(
                        f"{kind} net {k} layer {n} ({n_in}->{n_out}) does not follow DeePMD-kit's layer rule")
    if len(fit.nets) != len(names):
        raise NotRepresentableError(f"fitting_net has {len(fit.nets)} nets for {len(names)} types (DeePMD: one per type)")


def deepmd_model_params(model: EnergyModel) -> dict[str, Any]:
    """The model's DeePMD-kit ``model`` section (what DeePMD stores as ``_extra_state.model_params``)."""
    check_representable(model)
    desc, fit = model.descriptor, model.fitting
    precision = _precision(model)
    cfg_desc = dict((model.config or {}).get("descriptor") or {})
    cfg_fit = dict((model.config or {}).get("fitting_net") or {})
    descriptor = {
        "type": "se_e2_a",
        "sel": [int(s) for s in desc.sel],
        "rcut_smth": float(desc.rcut_smth),
        "rcut": float(desc.rcut),
        "neuron": [int(n) for n in desc.neuron],
        "resnet_dt": any(layer.idt is not None for net in desc.embeddings for layer in net.layers),
        "axis_neuron": int(desc.axis_neuron),
        "type_one_side": bool(desc.type_one_side),
        "seed": cfg_desc.get("seed"),
        "activation_function": "tanh",
        "precision": precision,
        "trainable": True,
        "exclude_types": [[int(a), int(b)] for a, b in desc.exclude_types],
        "env_protection": 0.0,
        "set_davg_zero": bool(desc.set_davg_zero),
    }
    if "resnet_dt" in cfg_desc:  # a net without residual layers cannot tell
        descriptor["resnet_dt"] = bool(cfg_desc["resnet_dt"])
    hidden = [layer for net in fit.nets for layer in list(net.layers)[:-1]]
    fitting_net = {
        "neuron": [int(layer.matrix.shape[1]) for layer in list(fit.nets[0].layers)[:-1]],
        "resnet_dt": bool(cfg_fit.get("resnet_dt", any(layer.idt is not None for layer in hidden))),
        "seed": cfg_fit.get("seed"),
        "type": "ener",
        "numb_fparam": int(fit.numb_fparam),
        "numb_aparam": int(fit.numb_aparam),
        "default_fparam": None,
        "dim_case_embd": 0,
        "activation_function": "tanh",
        "precision": precision,
        "trainable": True,
        "rcond": None,
        "atom_ener": [],
        "use_aparam_as_mask": False,
    }
    if isinstance(model, PropertyModel):
        for key in ("rcond", "atom_ener", "use_aparam_as_mask"):  # (energy fitting keys)
            fitting_net.pop(key)
        fitting_net.update(type="property", property_name=fit.property_name, task_dim=int(fit.task_dim),
                           intensive=bool(fit.intensive), distinguish_types=True)
    return {
        "type_map": list(model.type_map),
        "descriptor": descriptor,
        "fitting_net": fitting_net,
        "data_stat_nbatch": 10,
        "data_stat_protect": 0.01,
        "data_bias_nsample": 10,
        "pair_exclude_types": [],
        "atom_exclude_types": [],
        "preset_out_bias": None,
        "srtab_add_bias": True,
        "type": "standard",
    }


def _mlp_state(net, prefix: str, out: dict[str, torch.Tensor]) -> None:
    for k, layer in enumerate(net.layers):
        out[f"{prefix}{k}.matrix"] = layer.matrix.detach().cpu().clone()
        out[f"{prefix}{k}.bias"] = layer.bias.detach().cpu().clone()
        if layer.idt is not None:
            out[f"{prefix}{k}.idt"] = layer.idt.detach().cpu().clone()


def deepmd_passthrough(state: dict) -> dict[str, Any]:
    """What a DeePMD-kit checkpoint's state dict holds that dpfit does not model, to carry it over:
    ``min_nbor_dist``, ``out_std`` and the source's ``model_params`` (:func:`merge_source_params`)."""
    keys = {"min_nbor_dist": MODEL_PREFIX + "min_nbor_dist", "out_std": ATOMIC_PREFIX + "out_std"}
    out: dict[str, Any] = {name: state[key] for name, key in keys.items() if key in state}
    params = (state.get("_extra_state") or {}).get("model_params")
    if isinstance(params, dict):
        out["model_params"] = params
    return out


def merge_source_params(params: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """``params`` with the source's values for what dpfit does not model (all but type_map, descriptor
    and fitting_net: e.g. ``info``, ``data_stat_nbatch``) and its extra descriptor/fitting keys; a
    ``precision`` of ``"default"`` in the source stays so where the model is float64."""
    modelled = ("type_map", "descriptor", "fitting_net")
    merged = {**params, **{k: v for k, v in source.items() if k not in modelled}}
    for section in ("descriptor", "fitting_net"):
        src = dict(source.get(section) or {})
        sec = dict(params[section])
        sec.update({k: v for k, v in src.items() if k not in sec})
        if src.get("precision") == "default" and sec["precision"] == "float64":
            sec["precision"] = "default"
        merged[section] = sec
    return {k: merged[k] for k in [*source, *[k for k in merged if k not in source]]}


def deepmd_state_dict(
    model: EnergyModel, passthrough: dict[str, Any] | None = None, train_infos: dict | None = None
) -> dict[str, Any]:
    """DeePMD-kit ModelWrapper state dict of ``model`` (tensors on CPU), ``_extra_state`` included.

    ``networks`` and ``_networks`` (two names DeePMD registers for the same nets) share their tensors,
    as in DeePMD's files. ``passthrough``: :func:`deepmd_passthrough` of a DeePMD source checkpoint.
    """
    params = deepmd_model_params(model)
    passthrough = dict(passthrough or {})
    if "model_params" in passthrough:
        params = merge_source_params(params, passthrough["model_params"])
    desc, fit = model.descriptor, model.fitting
    ntypes = len(model.type_map)
    f64 = torch.float64
    state: dict[str, Any] = {"_extra_state": {"model_params": params,
                                              "train_infos": dict(train_infos or {"lr": 0.0, "step": 0})}}
    state[MODEL_PREFIX + "min_nbor_dist"] = passthrough.get("min_nbor_dist", torch.tensor(-1.0, dtype=f64)).clone()
    if isinstance(model, PropertyModel):  # the output statistics are the model's own
        dim = fit.task_dim
        state[ATOMIC_PREFIX + "out_bias"] = fit.out_bias.detach().cpu().to(f64).reshape(1, ntypes, dim).clone()
        state[ATOMIC_PREFIX + "out_std"] = fit.out_std.detach().cpu().to(f64).reshape(1, ntypes, dim).clone()
    else:
        bias = fit.bias_atom_e.detach().cpu().to(f64).reshape(1, ntypes, 1).clone()
        state[ATOMIC_PREFIX + "out_bias"] = bias
        state[ATOMIC_PREFIX + "out_std"] = passthrough.get("out_std", torch.ones(1, ntypes, 1, dtype=f64)).clone()
    sea = ATOMIC_PREFIX + "descriptor.sea."
    state[sea + "mean"] = desc.davg.detach().cpu().clone()
    state[sea + "stddev"] = desc.dstd.detach().cpu().clone()
    nets: dict[str, torch.Tensor] = {}
    for k, net in enumerate(desc.embeddings):
        _mlp_state(net, f"{k}.layers.", nets)
    state.update({sea + "filter_layers.networks." + k: v for k, v in nets.items()})
    state.update({sea + "filter_layers._networks." + k: v for k, v in nets.items()})
    for k in range(len(desc.embeddings)):
        state[sea + f"compress_info.{k}"] = torch.zeros(0, dtype=desc.davg.dtype)
    for k in range(len(desc.embeddings)):
        state[sea + f"compress_data.{k}"] = torch.zeros(0, dtype=desc.davg.dtype)
    fp = ATOMIC_PREFIX + "fitting_net."
    state[fp + "bias_atom_e"] = torch.zeros(ntypes, fit.task_dim if isinstance(model, PropertyModel) else 1,
                                            dtype=desc.davg.dtype)
    for name in ("fparam", "aparam"):
        if getattr(fit, f"numb_{name}"):
            state[fp + f"{name}_avg"] = getattr(fit, f"{name}_avg").detach().cpu().clone()
            state[fp + f"{name}_inv_std"] = getattr(fit, f"{name}_inv_std").detach().cpu().clone()
    nets = {}
    for t, net in enumerate(fit.nets):
        _mlp_state(net, f"{t}.layers.", nets)
    state.update({fp + "filter_layers.networks." + k: v for k, v in nets.items()})
    state.update({fp + "filter_layers._networks." + k: v for k, v in nets.items()})
    return state


def export_deepmd_checkpoint(
    model: EnergyModel, output: str | Path, overwrite: bool = False,
    passthrough: dict[str, Any] | None = None, train_infos: dict | None = None,
) -> Path:
    """Write ``model`` as a DeePMD-kit checkpoint; refuses to replace an existing file unless ``overwrite``."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output}: exists; choose another output or pass overwrite=true")
    state = deepmd_state_dict(model, passthrough, train_infos)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    torch.save({"model": state}, tmp)
    tmp.replace(output)
    return output
