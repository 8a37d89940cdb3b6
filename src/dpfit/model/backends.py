"""The fast model's compute backends, chosen once per model and device, never per call.

A backend is a pair of classes for the model's descriptor and fitting net, each a subclass of
:class:`~dpfit.model.descriptor.SeE2A` / :class:`~dpfit.model.fitting.EnergyFitting` with the same
parameters and buffers and the same stage signatures (:mod:`dpfit.model.stages`). Swapping one in changes
the classes of the model's modules, not their tensors (an optimizer, a DDP wrapper or a state_dict is
unaffected), the way NequIP's model modifiers and MACE's ``wrapper_ops`` swap accelerated modules in.

========  ==========================================  =====================  ============================
backend   what computes                               devices                chosen by ``select_backend``
========  ==========================================  =====================  ============================
kernels   the C++ op library, ``torch.ops.dpfit``      CPU                    CPU, ``kernels`` on / auto
compact   PyTorch, occupied slots only                 CPU                    CPU, ``kernels`` off (or no
                                                                              compiler)
static    PyTorch, every slot (static shapes)          any                    any other device; by hand for
                                                                              ``torch.compile``
========  ==========================================  =====================  ============================
"""

from __future__ import annotations

import torch

from dpfit.model.compact_layout import CompactSeE2A
from dpfit.model.descriptor import SeE2A
from dpfit.model.fitting import EnergyFitting

BACKENDS = ("kernels", "compact", "static")
#: the model option ``kernels`` (config ``model.kernels``)
KERNEL_MODES = ("off", "auto", "on")
#: device types each backend runs on (None: any)
DEVICES: dict[str, tuple[str, ...] | None] = {"kernels": ("cpu",), "compact": ("cpu",), "static": None}


def check_kernels_option(mode: str, what: str = "model.kernels") -> str:
    if mode not in KERNEL_MODES:
        raise ValueError(f"{what}={mode!r}: choose one of {', '.join(KERNEL_MODES)}")
    return mode


def backend_classes(name: str) -> tuple[type[SeE2A], type[EnergyFitting]]:
    """The (descriptor, fitting) classes of backend ``name``."""
    if name == "static":
        return SeE2A, EnergyFitting
    if name == "compact":
        return CompactSeE2A, EnergyFitting
    if name == "kernels":
        from dpfit.model.kernels.backend import KernelFitting, KernelSeE2A

        return KernelSeE2A, KernelFitting
    raise ValueError(f"backend {name!r}: choose one of {', '.join(BACKENDS)}")


def backend_of(descriptor: SeE2A) -> str:
    """The name of the backend a descriptor computes with."""
    for name in BACKENDS:
        if type(descriptor) is backend_classes(name)[0]:
            return name
    raise TypeError(f"{type(descriptor).__name__} is not a backend's descriptor")


def library_path() -> str | None:
    """The op library this process loaded (its path), or None (never builds it)."""
    from dpfit.model.kernels import library_path as loaded

    return loaded()


def choose_backend(kernels: str, device: torch.device | str | None = None) -> str:
    """The backend for a model whose option is ``kernels`` (off / auto / on), running on ``device``
    (default CPU): on a CPU the compiled kernels where allowed and available (``on``: an error if
    unavailable; ``auto``: one warning, then ``compact``), else ``compact``; ``static`` elsewhere."""
    check_kernels_option(kernels)
    if torch.device(device or "cpu").type != "cpu":
        return "static"
    if kernels == "off":
        return "compact"
    from dpfit.model.kernels import load_library

    return "kernels" if load_library(required=kernels == "on") else "compact"


def check_device(name: str, device: torch.device | str) -> None:
    """A ValueError when backend ``name`` does not run on ``device``."""
    allowed = DEVICES[name]
    kind = torch.device(device).type
    if allowed is not None and kind not in allowed:
        raise ValueError(f"the {name!r} backend runs on {'/'.join(allowed)}, not on {kind}: select the backend for "
                         f"the device (model.select_backend(device))")


class BackendChoice:
    """The backend choice of a model whose ``descriptor`` is an :class:`SeE2A` (and whose ``fitting``, when
    an :class:`EnergyFitting`, follows it): mixed into :class:`~dpfit.model.EnergyModel` and
    :class:`~dpfit.model.PropertyModel`. ``config["kernels"]`` holds the model option."""

    @property
    def kernels(self) -> str:
        """The model option for the compiled CPU kernels (``model.kernels``): ``auto`` (where they build),
        ``on`` (fail if they cannot be built) or ``off``; :meth:`select_backend` reads it."""
        return self.config.get("kernels", "off")

    @property
    def backend(self) -> str:
        """The backend the stages run on: ``kernels``, ``compact`` or ``static``."""
        return backend_of(self.descriptor)

    @torch.jit.ignore
    def select_backend(self, device: torch.device | str | None = None, kernels: str | None = None) -> str:
        """Choose the backend for ``device`` (default: where the parameters are) from the ``kernels``
        option (given here, it replaces the model's), swap it in and return its name."""
        if kernels is not None:
            self.config["kernels"] = check_kernels_option(kernels)
        device = torch.device(device) if device is not None else self.descriptor.davg.device
        name = choose_backend(self.kernels, device)
        self.use_backend(name, device)
        return name

    @torch.jit.ignore
    def use_backend(self, name: str, device: torch.device | str | None = None):
        """Swap in backend ``name``: the classes of the descriptor (and energy fitting) change, their
        parameters and buffers stay the same tensors."""
        check_device(name, device if device is not None else self.descriptor.davg.device)
        if name == "kernels":
            from dpfit.model.kernels import load_library

            load_library(required=True)
        descriptor_class, fitting_class = backend_classes(name)
        self.descriptor.__class__ = descriptor_class
        if isinstance(self.fitting, EnergyFitting):
            self.fitting.__class__ = fitting_class
        return self
