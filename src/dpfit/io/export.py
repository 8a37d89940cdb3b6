"""TorchScript export: a self-contained model (neighbor list included) loadable without dpfit."""

import copy
from pathlib import Path

import torch
from torch import nn

from dpfit.data.index_facts import reverse_slots
from dpfit.data.neighbor import deepmd_slots, image_reach
from dpfit.model import EnergyModel, PropertyModel


def torch_neighbor_list(
    coord: torch.Tensor, atype: torch.Tensor, box: torch.Tensor | None, rcut: float, sel: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Brute-force DeePMD neighbor list of one frame in torch (all pairs over the needed images).

    coord (nloc, 3) Å, atype (nloc,), box (3, 3) rows or None. Returns the coordinates used (wrapped
    into the cell when periodic), nlist (nloc, nnei) -1 padded, per-type sections nearest first, and
    shift (nloc, nnei, 3) integer image vectors. Memory grows as nloc^2 x images: for large systems
    build the list outside (vesin) and call ``forward_lower``.
    """
    nloc = coord.shape[0]
    if box is not None:
        inv = torch.linalg.inv(box)
        frac = coord @ inv
        coord = coord - torch.floor(frac) @ box
        counts = image_reach(box, rcut)
        rng = [torch.arange(-n, n + 1, device=coord.device, dtype=coord.dtype) for n in counts]
        images = torch.stack(torch.meshgrid(rng[0], rng[1], rng[2], indexing="ij"), -1).reshape(-1, 3)
    else:
        images = torch.zeros(1, 3, dtype=coord.dtype, device=coord.device)
    nimg = images.shape[0]
    offsets = images @ box if box is not None else images
    ext = (coord.unsqueeze(0) + offsets.unsqueeze(1)).reshape(-1, 3)  # (nimg * nloc, 3)
    dist = torch.cdist(coord, ext)
    cand_j = torch.arange(nimg * nloc, device=coord.device) % nloc
    cand_img = torch.arange(nimg * nloc, device=coord.device) // nloc
    zero_img = torch.nonzero((images == 0).all(-1)).reshape(-1)[0]
    self_pair = (cand_j.unsqueeze(0) == torch.arange(nloc, device=coord.device).unsqueeze(1)) & (
        cand_img.unsqueeze(0) == zero_img
    )
    pairs = torch.nonzero(~self_pair & (dist < rcut))
    center, cand = pairs[:, 0], pairs[:, 1]
    j = cand_j.index_select(0, cand)
    distance = torch.round(dist[center, cand] * 1e10).long()  # (as data.neighbor.distance_key: ties at 1e-10 Å)
    kept, slot, _ = deepmd_slots(center, atype.index_select(0, j), distance, cand, nloc, sel)
    nnei = int(sum(sel))
    nlist = torch.full((nloc * nnei,), -1, dtype=torch.long, device=coord.device)
    shift = torch.zeros(nloc * nnei, 3, dtype=coord.dtype, device=coord.device)
    nlist[slot] = j.index_select(0, kept)
    shift[slot] = images.index_select(0, cand_img.index_select(0, cand.index_select(0, kept)))
    return coord, nlist.reshape(nloc, nnei), shift.reshape(nloc, nnei, 3)


def frozen_copy(model: EnergyModel | PropertyModel, backend: str = "compact") -> EnergyModel | PropertyModel:
    """A CPU copy of ``model`` in eval mode, without parameter gradients, on ``backend``."""
    model = copy.deepcopy(model).cpu().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.use_backend(backend, "cpu")


class DevicePaths(nn.Module):
    """The energy model of a frozen file, twice over the same tensors: ``cpu_model`` computes on CPUs (the op
    library's kernels, or PyTorch's compact layout: :mod:`dpfit.model.backends`), ``gpu_model`` on other devices
    (the static layout). Each call takes the path of its coordinates' device. ``forward``: the energy
    model's, with forces, virial and (``do_atomic_virial``) atomic virials."""

    def __init__(self, model: EnergyModel, kernels: bool) -> None:
        super().__init__()
        self.cpu_model = frozen_copy(model, "kernels" if kernels else "compact")
        self.gpu_model = frozen_copy(model, "static")
        self.gpu_model.load_state_dict(self.cpu_model.state_dict(keep_vars=True), assign=True)  # (the same tensors)
        self.kernels = kernels

    def forward(self, coord: torch.Tensor, atype: torch.Tensor, nlist: torch.Tensor, box: torch.Tensor | None,
                shift: torch.Tensor | None, fparam: torch.Tensor | None, aparam: torch.Tensor | None,
                do_atomic_virial: bool) -> dict[str, torch.Tensor]:
        if coord.device.type == "cpu":
            partner = self.cpu_model.descriptor.reverse_pairs(nlist, shift, atype)  # (the op library's search)
            if partner is None:
                partner = reverse_slots(nlist, shift, atype, self.cpu_model.descriptor.slot_type)
            return self.cpu_model(coord, atype, nlist, box, shift, fparam, aparam, True, True, do_atomic_virial, False,
                            partner)
        return self.gpu_model(coord, atype, nlist, box, shift, fparam, aparam, True, True, do_atomic_virial, False)


class FrozenFile(nn.Module):
    """What every ``freeze.py`` TorchScript file has: the type map, rcut and sel, and one frame's inputs with
    its neighbour list built in torch (:func:`torch_neighbor_list`) as the model's batch of one."""

    type_map: list[str]
    sel: list[int]

    def __init__(self, model: EnergyModel | PropertyModel) -> None:
        super().__init__()
        self.type_map = list(model.type_map)
        self.rcut = float(model.descriptor.rcut)
        self.sel = list(model.descriptor.sel)

    @torch.jit.export
    def get_type_map(self) -> list[str]:
        return self.type_map

    @torch.jit.export
    def get_rcut(self) -> float:
        return self.rcut

    def frame_batch(
        self, coord: torch.Tensor, atype: torch.Tensor, box: torch.Tensor | None, fparam: torch.Tensor | None,
        aparam: torch.Tensor | None, dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None,
               torch.Tensor | None, torch.Tensor | None]:
        """coord (nloc, 3), atype (nloc,), box (3, 3) or None, fparam (nq,), aparam (nloc, np) -> the model's
        (coord, atype, nlist, box, shift, fparam, aparam) of a batch of one frame."""
        coord = coord.to(dtype)
        if box is not None:
            box = box.to(dtype).reshape(3, 3)
        wrapped, nlist, shift = torch_neighbor_list(coord, atype, box, self.rcut, self.sel)
        return (wrapped.unsqueeze(0), atype.unsqueeze(0), nlist.unsqueeze(0),
                box.unsqueeze(0) if box is not None else None, shift.unsqueeze(0) if box is not None else None,
                fparam.reshape(1, -1) if fparam is not None else None,
                aparam.reshape(1, coord.shape[0], -1) if aparam is not None else None)


class FrozenModel(FrozenFile):
    """What ``freeze.py`` saves: energy, forces, virial, atomic energies from coordinates, types, cell.

    ``forward(coord (nloc, 3), atype (nloc,), box (3, 3) or None, fparam (nq,), aparam (nloc, np))``
    returns energy (), force (nloc, 3), virial (9,), atom_energy (nloc,), atom_virial (nloc, 9). With
    ``kernels`` the CPU path calls the op library (``torch.ops.dpfit.*``): load it first
    (``torch.ops.load_library("libdpfit_ops.so")``).
    """

    def __init__(self, model: EnergyModel, kernels: bool = False) -> None:
        super().__init__(model)
        self.model = DevicePaths(model, kernels)

    @torch.jit.export
    def forward_lower(
        self,
        coord: torch.Tensor,
        atype: torch.Tensor,
        nlist: torch.Tensor,
        box: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
        fparam: torch.Tensor | None = None,
        aparam: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Batched evaluation with an external DeePMD neighbor list (see EnergyModel.forward)."""
        return self.model(coord, atype, nlist, box, shift, fparam, aparam, True)

    def forward(
        self,
        coord: torch.Tensor,
        atype: torch.Tensor,
        box: torch.Tensor | None = None,
        fparam: torch.Tensor | None = None,
        aparam: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        c, t, nl, b, sh, fp, ap = self.frame_batch(coord, atype, box, fparam, aparam,
                                                   self.model.cpu_model.descriptor.davg.dtype)
        out = self.model(c, t, nl, b, sh, fp, ap, True)
        return {k: v[0] for k, v in out.items()}


class FrozenPropertyModel(FrozenFile):
    """What ``freeze.py`` saves for a property model: the property from coordinates, types, cell.

    ``forward(coord (nloc, 3), atype (nloc,), box (3, 3) or None, fparam (nq,), aparam (nloc, np))``
    returns ``<property_name>`` (task_dim,) and ``atom_<property_name>`` (nloc, task_dim), DeePMD-kit's
    output names; ``forward_lower`` takes batches and a neighbor list (see PropertyModel.forward).
    """

    property_name: str

    def __init__(self, model: PropertyModel) -> None:
        super().__init__(model)
        self.model = model.eval()
        self.property_name = str(model.property_name)
        self.task_dim = int(model.task_dim)
        self.intensive = bool(model.intensive)

    @torch.jit.export
    def get_property_name(self) -> str:
        return self.property_name

    @torch.jit.export
    def get_task_dim(self) -> int:
        return self.task_dim

    @torch.jit.export
    def get_intensive(self) -> bool:
        return self.intensive

    @torch.jit.export
    def forward_lower(
        self,
        coord: torch.Tensor,
        atype: torch.Tensor,
        nlist: torch.Tensor,
        box: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
        fparam: torch.Tensor | None = None,
        aparam: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Batched evaluation with an external DeePMD neighbor list: ``property`` (nf, task_dim) and
        ``atom_property`` (nf, nloc, task_dim)."""
        return self.model(coord, atype, nlist, box, shift, fparam, aparam)

    def forward(
        self,
        coord: torch.Tensor,
        atype: torch.Tensor,
        box: torch.Tensor | None = None,
        fparam: torch.Tensor | None = None,
        aparam: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        c, t, nl, b, sh, fp, ap = self.frame_batch(coord, atype, box, fparam, aparam,
                                                   self.model.descriptor.davg.dtype)
        out = self.model(c, t, nl, b, sh, fp, ap)
        return {self.property_name: out["property"][0], "atom_" + self.property_name: out["atom_property"][0]}


def freeze(model: EnergyModel | PropertyModel, output: str | Path, overwrite: bool = False,
           kernels: bool = False) -> Path:
    """Script and save ``model`` (``kernels``: its CPU path on the op library, see :class:`DevicePaths`);
    refuses to replace an existing file unless ``overwrite``."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output}: exists; choose another output or pass overwrite=true")
    if isinstance(model, PropertyModel):
        frozen = FrozenPropertyModel(frozen_copy(model, "kernels" if kernels else "compact"))
    else:
        frozen = FrozenModel(model, kernels)
    scripted = torch.jit.script(frozen)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(scripted, str(output))
    return output
