"""Deep Potential models in plain PyTorch (no Hydra, no Lightning).

Two implementations of the same model, chosen by the config key ``impl``:

- ``reference`` (:mod:`dpfit.model.reference`): short and readable, forces and virials by autograd;
- ``fast`` (:class:`EnergyModel`, the default): the same numbers, faster, on a backend chosen once for
  the device (:mod:`dpfit.model.backends`): on CPU the compiled kernels of :mod:`dpfit.model.kernels`
  (config key ``kernels``: auto, on or off) or PyTorch's compact layout, elsewhere the static layout.

Both have the same parameters and buffers, so :func:`convert` moves a model from one to the other.
A ``fitting_net`` of ``type: property`` makes a :class:`PropertyModel` instead (one implementation).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dpfit.model.backends import BACKENDS
from dpfit.model.descriptor import SeE2A, environment_matrix, switching_function
from dpfit.model.energy_model import DTYPES, EnergyModel
from dpfit.model.fitting import EnergyFitting
from dpfit.model.geometry import forces_and_virials, pair_vectors
from dpfit.model.network import ResidualMLP
from dpfit.model.property_fitting import PropertyFitting
from dpfit.model.property_model import PropertyModel
from dpfit.model.reference import ReferenceEnergyModel

IMPLS = {"fast": EnergyModel, "reference": ReferenceEnergyModel}
#: ``fitting_net.type`` values: the energy models (IMPLS) and the property model
FITTING_TYPES = ("ener", "property")


def fitting_type(config: dict[str, Any]) -> str:
    """The ``fitting_net.type`` of a model config (``ener`` when absent)."""
    return str(dict(dict(config).get("fitting_net") or {}).get("type", "ener"))


def build_model(config: dict[str, Any], device: torch.device | str | None = "cpu") -> nn.Module:
    """The model of a ``model`` config: :class:`EnergyModel` or, with ``impl: reference``,
    :class:`ReferenceEnergyModel`; with ``fitting_net.type: property``, :class:`PropertyModel`. The fast
    models' backend is selected for ``device`` (see :meth:`EnergyModel.from_config`)."""
    kind = fitting_type(config)
    if kind not in FITTING_TYPES:
        raise ValueError(f"model.fitting_net.type={kind!r}: choose one of {', '.join(FITTING_TYPES)}")
    if kind == "property":
        return PropertyModel.from_config(config, device)
    impl = dict(config).get("impl", "fast")
    if impl not in IMPLS:
        raise ValueError(f"model.impl={impl!r}: choose one of {', '.join(IMPLS)}")
    if impl == "fast":
        return EnergyModel.from_config(config, device)
    return IMPLS[impl].from_config(config)


def convert(model: nn.Module, impl: str) -> nn.Module:
    """The same model (weights, statistics, train/eval mode) as implementation ``impl``."""
    if impl not in IMPLS:
        raise ValueError(f"model.impl={impl!r}: choose one of {', '.join(IMPLS)}")
    if isinstance(model, (IMPLS[impl], PropertyModel)):  # (the property model has one implementation)
        return model
    device = next(model.parameters()).device
    other = build_model({**model.config, "impl": impl}, device)
    other.load_state_dict(model.state_dict())
    return other.to(device).train(model.training)


__all__ = [
    "BACKENDS",
    "DTYPES",
    "IMPLS",
    "EnergyFitting",
    "EnergyModel",
    "FITTING_TYPES",
    "PropertyFitting",
    "PropertyModel",
    "ReferenceEnergyModel",
    "ResidualMLP",
    "SeE2A",
    "build_model",
    "convert",
    "environment_matrix",
    "fitting_type",
    "forces_and_virials",
    "pair_vectors",
    "switching_function",
]
