"""Building and loading the compiled kernels (``torch.utils.cpp_extension``, cached per CPU capability).

The mode starts from the environment variable ``DPFIT_KERNELS`` (``off`` when unset). The build
takes about 30 s the first time on 2 cores and needs a C++ compiler (g++), the Python headers and
ninja; the result is cached under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``)
and rebuilt when the source changes. The instruction set PyTorch dispatches to on this machine
(AVX512, AVX2 or none) and the torch version are named in the extension, so a cache shared between
different nodes never hands a node code it cannot run, and a torch upgrade rebuilds it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

MODES = ("off", "auto", "on")
SOURCES = [Path(__file__).with_name(name) for name in ("embedding_net.cpp", "slot_contraction.cpp", "environment.cpp",
                                                      "fitting_net.cpp", "descriptor_product.cpp")]
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}

_mode = "off"
_extension: ModuleType | None = None
_failure: str | None = None


def compiled_kernels_mode() -> str:
    """The mode in effect: the last :func:`set_compiled_kernels`, else ``DPFIT_KERNELS``, else ``off``."""
    return _mode


def _build() -> ModuleType:
    from torch.utils.cpp_extension import load

    capability = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", "-ffast-math", "-fopenmp", *_ISA_FLAGS.get(capability, [])]
    # the name keys the cache: one build per instruction set and torch version (a build against other
    # torch headers must never be loaded)
    version = torch.__version__.split("+")[0].replace(".", "_")
    return load(name=f"dpfit_cpu_kernels_{capability.lower()}_torch{version}", sources=[str(p) for p in SOURCES],
                extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)


def _load() -> ModuleType | None:
    """Build or load the extension once per process (the outcome is remembered); None if that failed
    in ``auto`` mode, a RuntimeError in ``on`` mode."""
    global _extension, _failure
    if _extension is None and _failure is None:
        try:
            _extension = _build()
            log.info("compiled CPU kernels loaded (%s)", torch.backends.cpu.get_cpu_capability())
        except Exception as exc:  # a missing compiler, headers or ninja: the PyTorch path remains
            lines = str(exc).strip().splitlines()
            _failure = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
            if _mode == "auto":
                log.warning("compiled CPU kernels unavailable (%s); using the PyTorch path", _failure)
    if _extension is None and _mode == "on":
        raise RuntimeError(f"kernels=on, but the compiled kernels could not be built ({_failure}); "
                           "install a C++ compiler and ninja, or set kernels=auto or off")
    return _extension


def set_compiled_kernels(mode: str) -> bool:
    """Use the compiled kernels in this process: ``on`` (build them now, raise if that fails), ``auto``
    (build them now, fall back to PyTorch with a warning if that fails) or ``off``. Returns whether they
    are in use."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"kernels={mode!r}: choose one of {', '.join(MODES)}")
    _mode = mode
    return mode != "off" and _load() is not None


def embedding_extension() -> ModuleType | None:
    """The embedding-net extension when the compiled kernels are in use (built on first call), else None."""
    if _mode == "off":
        return None
    return _load()


_env_mode = os.environ.get("DPFIT_KERNELS", "off").strip().lower() or "off"
if _env_mode not in MODES:
    raise ValueError(f"DPFIT_KERNELS={_env_mode!r}: choose one of {', '.join(MODES)}")
_mode = _env_mode
