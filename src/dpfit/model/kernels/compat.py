"""Today's kernel-choice API on top of the op library (a shim while the model is restructured; the
model's backends will be chosen once, when it is built or loaded).

A model chooses the kernels with its ``kernels`` option (config ``model.kernels``: ``auto``, ``on`` or
``off``). A process-wide override wins over every model's option: the environment variable
``DPFIT_KERNELS`` or :func:`set_compiled_kernels` (for benchmarks and scripts).
"""

from __future__ import annotations

import os

from dpfit.model.kernels.library import library_path, load_library

MODES = ("off", "auto", "on")

_override: str | None = None  # DPFIT_KERNELS or set_compiled_kernels(); None: each model's option


def check_mode(mode: str, what: str = "kernels") -> str:
    if mode not in MODES:
        raise ValueError(f"{what}={mode!r}: choose one of {', '.join(MODES)}")
    return mode


def compiled_kernels_mode() -> str | None:
    """The process-wide override in effect (``DPFIT_KERNELS`` or :func:`set_compiled_kernels`), or None."""
    return _override


def compiled_kernels(mode: str) -> str | None:
    """The op library's path for a model whose option is ``mode`` (the process override wins): None
    when off or (``auto``) unavailable; loaded (built) on first call, a RuntimeError for ``on`` if it
    cannot be."""
    mode = _override or mode
    if mode == "off":
        return None
    return load_library(required=mode == "on")


def loaded_kernels() -> str | None:
    """The op library if this process has loaded it already (never loads it; None under an ``off``
    override)."""
    return None if _override == "off" else library_path()


def kernels_available() -> bool:
    """Whether the op library can be used here (loads it on first call; never raises)."""
    return load_library(required=False) is not None


def set_compiled_kernels(mode: str | None) -> bool:
    """Override every model's ``kernels`` option in this process: ``on`` (load now, raise if that
    fails), ``auto`` (load now, fall back to PyTorch with a warning), ``off``; None removes the
    override. Returns whether the override makes the kernels run."""
    global _override
    _override = None if mode is None else check_mode(mode)
    return mode is not None and mode != "off" and load_library(required=mode == "on") is not None


_env_mode = os.environ.get("DPFIT_KERNELS", "").strip().lower()
_override = check_mode(_env_mode, "DPFIT_KERNELS") if _env_mode else None
