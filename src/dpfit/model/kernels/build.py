"""Building and loading the compiled CPU kernels (``torch.utils.cpp_extension``), and choosing them.

A model chooses them with its ``kernels`` option (config ``model.kernels``: ``auto``, ``on`` or
``off``). A process-wide override wins over every model's option: the environment variable
``DPFIT_KERNELS`` or :func:`set_compiled_kernels` (for benchmarks and scripts).

The first use builds them with the system's C++ compiler (g++, the Python headers and ``ninja``,
``pip install dpfit[kernels]``), which takes minutes; a message says so before the build starts. The
result is cached under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) in a folder
keyed by the sources, the torch and Python versions and the instruction set PyTorch dispatches to
here (AVX512, AVX2 or none): another virtual environment with the same torch reuses it, a source
change or a torch upgrade rebuilds it, and a cache shared between nodes never hands a node code it
cannot run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
import time
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
#: the first build, said before it starts (measured with g++ 12: 314 CPU-seconds, 1.7 GB per compiler;
#: 10.3 min wall on 2 cores shared with other jobs)
BUILD_TIME = "about 3 minutes on 2 free cores, 10 on a busy machine"

_override: str | None = None  # DPFIT_KERNELS or set_compiled_kernels(); None: each model's option
_extension: ModuleType | None = None
_failure: str | None = None
_warned = False


def check_mode(mode: str, what: str = "kernels") -> str:
    if mode not in MODES:
        raise ValueError(f"{what}={mode!r}: choose one of {', '.join(MODES)}")
    return mode


def compiled_kernels_mode() -> str | None:
    """The process-wide override in effect (``DPFIT_KERNELS`` or :func:`set_compiled_kernels`), or None."""
    return _override


def _cache_dir(name: str, flags: list[str]) -> Path:
    """The build folder: TORCH_EXTENSIONS_DIR / <name>_<hash of sources, flags, torch, Python, machine>."""
    key = hashlib.sha256()
    for path in SOURCES:
        key.update(path.read_bytes())
    key.update(" ".join([*flags, torch.__version__, sys.implementation.cache_tag, os.uname().machine]).encode())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / f"{name}_{key.hexdigest()[:12]}"


def _import(name: str, library: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build() -> ModuleType:
    capability = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", "-ffast-math", "-fopenmp", *_ISA_FLAGS.get(capability, [])]
    version = torch.__version__.split("+")[0].replace(".", "_")
    name = f"dpfit_cpu_kernels_{capability.lower()}_torch{version}"
    folder = _cache_dir(name, flags)
    library, done = folder / f"{name}.so", folder / "complete"
    if done.is_file() and library.is_file():  # built before, by this or another environment
        return _import(name, library)
    from torch.utils.cpp_extension import load

    if (folder / "lock").exists():  # torch's lock file: another build is under way, or one was killed
        log.warning("waiting for another process building the compiled CPU kernels in %s; if none is running, "
                    "delete %s (a killed build leaves it)", folder, folder / "lock")
    log.warning("building the compiled CPU kernels (once; %s) in %s; model.kernels=off skips them", BUILD_TIME,
                folder)
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    module = load(name=name, sources=[str(p) for p in SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                  build_directory=str(folder), verbose=False)
    done.write_text(f"{torch.__version__} {capability}\n")
    log.warning("compiled CPU kernels built in %.0f s", time.perf_counter() - start)
    return module


def _load(mode: str) -> ModuleType | None:
    """The extension, built or loaded once per process (the outcome is remembered); None if that failed
    in ``auto`` mode (with one warning per process), a RuntimeError in ``on`` mode."""
    global _extension, _failure, _warned
    if _extension is None and _failure is None:
        try:
            _extension = _build()
            log.info("compiled CPU kernels loaded (%s)", torch.backends.cpu.get_cpu_capability())
        except Exception as exc:  # a missing compiler, headers or ninja: the PyTorch path remains
            lines = str(exc).strip().splitlines()
            _failure = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
    if _extension is None:
        if mode == "on":
            raise RuntimeError(f"kernels=on, but the compiled kernels could not be built ({_failure}); "
                               "install a C++ compiler and ninja (pip install dpfit[kernels]), or set "
                               "model.kernels=auto or off")
        if not _warned:
            _warned = True
            log.warning("compiled CPU kernels unavailable (%s); using the PyTorch path", _failure)
    return _extension


def compiled_kernels(mode: str) -> ModuleType | None:
    """The extension module holding every compiled kernel, for a model whose option is ``mode``
    (the process override wins): None when off or (``auto``) unavailable; built on first call."""
    mode = _override or mode
    if mode == "off":
        return None
    return _load(mode)


def loaded_kernels() -> ModuleType | None:
    """The extension if this process has loaded it already (never builds it; None under an ``off``
    override): for code outside a model that may use it, such as the data pipeline's index facts."""
    return None if _override == "off" else _extension


def kernels_available() -> bool:
    """Whether the compiled kernels can be used here (builds them on first call; never raises)."""
    return _load("auto") is not None


def set_compiled_kernels(mode: str | None) -> bool:
    """Override every model's ``kernels`` option in this process: ``on`` (build now, raise if that
    fails), ``auto`` (build now, fall back to PyTorch with a warning), ``off``; None removes the
    override. Returns whether the override makes the kernels run."""
    global _override
    _override = None if mode is None else check_mode(mode)
    return mode is not None and mode != "off" and _load(mode) is not None


_env_mode = os.environ.get("DPFIT_KERNELS", "").strip().lower()
_override = check_mode(_env_mode, "DPFIT_KERNELS") if _env_mode else None
