"""Property model: the se_e2_a descriptor with a property fitting net (DeePMD-kit's ``property`` model).

A scalar (or ``task_dim`` scalars) per frame, the sum or mean of atomic contributions, instead of an
energy: a band gap, a dipole-free polarisability, a total charge with its partial charges. No forces.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dpfit.model.backends import BackendChoice, check_kernels_option
from dpfit.model.descriptor import SeE2A
from dpfit.model.property_fitting import PropertyFitting
from dpfit.model.stages import IndexFacts

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class PropertyModel(BackendChoice, nn.Module):
    """Frame property (nf, task_dim) and atomic values (nf, nloc, task_dim) of frames of one system.

    ``forward`` takes the energy model's arguments (coordinates, types, DeePMD neighbor list, cell,
    image shifts, fparam, aparam, index facts) and ignores the force/virial flags, so the data pipeline,
    training loop and tools serve both models. The descriptor runs on the backend selected for the device
    (:mod:`dpfit.model.backends`, as the energy model's); the property fitting net on PyTorch.
    """

    __jit_unused_properties__ = ["dtype", "rcut", "sel", "kernels", "backend", "property_name", "task_dim",
                                 "intensive"]

    def __init__(self, type_map: list[str], descriptor: SeE2A, fitting: PropertyFitting,
                 config: dict | None = None) -> None:
        super().__init__()
        self.type_map = list(type_map)
        self.descriptor = descriptor
        self.fitting = fitting
        self.config = config or {}

    @classmethod
    @torch.jit.ignore
    def from_config(cls, config: dict[str, Any], device: torch.device | str | None = "cpu") -> PropertyModel:
        """From a plain dict: ``type_map``, ``descriptor`` (se_e2_a keys), ``fitting_net`` (``type:
        property``, ``property_name``, ``task_dim``, ``intensive``, ``neuron``, ``resnet_dt``,
        ``numb_fparam``, ``numb_aparam``, ``distinguish_types``, ``atom_sum``, ``seed``), ``precision``,
        ``kernels``; the backend selected for ``device`` as :meth:`EnergyModel.from_config` does."""
        cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in dict(config).items()}
        precision = cfg.get("precision", "float64")
        if precision not in _DTYPES:
            raise ValueError(f"model.precision={precision!r}: choose float64 or float32")
        dtype = _DTYPES[precision]
        type_map = list(cfg["type_map"])
        skip = ("type", "_comment", "precision")
        desc_cfg = {k: v for k, v in dict(cfg["descriptor"]).items() if k not in skip}
        if dict(cfg["descriptor"]).get("type", "se_e2_a") not in ("se_e2_a", "se_a"):
            raise ValueError(f"model.descriptor.type={cfg['descriptor'].get('type')!r}: the property model "
                             "takes se_e2_a")
        fit_cfg = {k: v for k, v in dict(cfg.get("fitting_net", {})).items() if k not in skip}
        descriptor = SeE2A(ntypes=len(type_map), dtype=dtype, **desc_cfg)
        fitting = PropertyFitting(len(type_map), descriptor.dim_out, dtype=dtype, **fit_cfg)
        check_kernels_option(cfg.get("kernels", "off"))
        model = cls(type_map, descriptor, fitting, config=cfg)
        if device is None:
            model.use_backend("compact")
        else:
            model.select_backend(device)
        return model

    @property
    def dtype(self) -> torch.dtype:
        return self.descriptor.davg.dtype

    @property
    def rcut(self) -> float:
        return self.descriptor.rcut

    @property
    def sel(self) -> list[int]:
        return self.descriptor.sel

    @property
    def property_name(self) -> str:
        return self.fitting.property_name

    @property
    def task_dim(self) -> int:
        return self.fitting.task_dim

    @property
    def intensive(self) -> bool:
        return self.fitting.intensive

    def forward(
        self,
        coord: torch.Tensor,
        atype: torch.Tensor,
        nlist: torch.Tensor,
        box: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
        fparam: torch.Tensor | None = None,
        aparam: torch.Tensor | None = None,
        do_force: bool = False,
        do_virial: bool = False,
        do_atomic_virial: bool = False,
        create_graph: bool = False,
        partner: torch.Tensor | None = None,
        kept: list[int] | None = None,
        type_counts: list[int] | None = None,
        type_order: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """coord (nf, nloc, 3) Å; atype (nf, nloc); nlist (nf, nloc, nnei); box (nf, 3, 3) rows a, b, c;
        shift (nf, nloc, nnei, 3) integer images; fparam (nf, nq); aparam (nf, nloc, np).

        Returns ``property`` (nf, task_dim) and ``atom_property`` (nf, nloc, task_dim). The force and
        virial flags are the energy model's, ignored here."""
        dtype = self.descriptor.davg.dtype
        coord = coord.to(dtype)
        box = box.to(dtype) if box is not None else None
        fparam = fparam.to(dtype) if fparam is not None else None
        aparam = aparam.to(dtype) if aparam is not None else None
        env = self.descriptor.environment(coord, box, nlist, shift, atype)
        emb = self.descriptor.embed(env, atype, False, IndexFacts(partner, kept, type_counts, type_order))
        atomic = self.fitting(emb.descriptor, atype, fparam, aparam)
        return {"property": self.fitting.reduce(atomic), "atom_property": atomic}
