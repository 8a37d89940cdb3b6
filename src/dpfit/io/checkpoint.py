"""Read checkpoints without running code from them, and load a trained model from a dpfit (Lightning) or
DeePMD-kit checkpoint.

:func:`load_checkpoint` is the one place a checkpoint file is unpickled: with ``weights_only=True`` and
an explicit allowlist (:data:`SAFE_GLOBALS`) of the plain types dpfit's, Lightning's and DeePMD-kit's
checkpoints may hold beyond tensors and containers. A TorchScript archive (a frozen model) is recognised
from its zip listing before anything is unpickled. A file that needs any other type (a pickled callable,
a class with its own reconstruction: what a planted payload needs) is refused with one line naming the
file and the type; nothing from it runs.
"""

from __future__ import annotations

import pathlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpfit.errors import CheckpointError
from dpfit.io.deepmd_checkpoint import is_deepmd_checkpoint, model_from_deepmd_state
from dpfit.model import EnergyModel, build_model, convert

#: key of the model config inside a dpfit checkpoint (Lightning's hyper_parameters)
MODEL_CONFIG_KEY = "model_config"
#: key of the training data's smallest neighbour distance (Å) in a dpfit checkpoint (for ``dp --pt compress``)
MIN_NBOR_DIST_KEY = "min_nbor_dist"


def _numpy_scalar_globals() -> list:
    """numpy's scalar constructor and dtypes: a float or int logged as a numpy scalar (a callback's state)
    pickles through them; they build numbers, nothing else."""
    scalar = np.float64(0.0).__reduce__()[0]  # numpy._core.multiarray.scalar (numpy.core... in numpy 1)
    kinds = [np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_]
    return [scalar, np.dtype, *{type(np.dtype(k)) for k in kinds}]


#: types a dpfit, Lightning or DeePMD-kit checkpoint may hold besides tensors, dicts, lists, tuples, sets,
#: strings and numbers (which ``weights_only=True`` reads by default): numpy scalars and dtypes, and paths
#: (Lightning callbacks keep folder names). Each only builds a value; none can call anything else.
SAFE_GLOBALS: list = [*_numpy_scalar_globals(), pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath,
                      pathlib.PureWindowsPath]


def safe_globals():
    """Context manager allowlisting :data:`SAFE_GLOBALS` for ``torch.load(..., weights_only=True)`` (also
    around Lightning's own loading of ``ckpt_path``)."""
    return torch.serialization.safe_globals(SAFE_GLOBALS)


def is_torchscript_archive(path: str | Path) -> bool:
    """True for a TorchScript archive (``torch.jit.save``'s zip: ``<name>/constants.pkl``, ``<name>/code/``);
    read from the zip listing only."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that needs more than data to load (it would run code): refused, nothing from it ran."""


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint that cannot be read (truncated, corrupt, not a torch file, an I/O error); ``reason``: why."""

    def __init__(self, path: Path, exc: BaseException) -> None:
        self.reason = _reason(exc)
        super().__init__(f"{path}: cannot be read as a torch checkpoint ({self.reason})")


def load_checkpoint(path: str | Path, mmap: bool = False) -> Any:
    """The object a checkpoint file holds, read safely (see the module docstring); on CPU.

    Raises :class:`CheckpointError` (one line naming the file): ``FileNotFoundError``-like "checkpoint not
    found", :class:`UnsafeCheckpointError` naming the type it would need, or
    :class:`UnreadableCheckpointError` with the reason."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if is_torchscript_archive(path):
        raise UnsafeCheckpointError(
            f"{path}: a TorchScript archive (a frozen model such as freeze.py's output), not a checkpoint; it is not "
            "loaded (its code would run): give the training checkpoint (.ckpt) or a DeePMD-kit model.ckpt.pt")
    try:
        with safe_globals():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower() and "weightsunpickler" not in str(exc).lower():
            raise UnreadableCheckpointError(path, exc) from exc
        raise UnsafeCheckpointError(
            f"{path}: needs {_unsafe_types(path, exc)} to load, which a checkpoint never holds (loading it could run "
            "code): refused, nothing from it was run") from None
    except RuntimeError as exc:
        if mmap and "mmap" in str(exc):  # a legacy (non-zip) torch file: read without a memory map
            return load_checkpoint(path, mmap=False)
        raise UnreadableCheckpointError(path, exc) from exc
    except Exception as exc:  # noqa: BLE001 - truncated zip, EOF, I/O error: unreadable
        raise UnreadableCheckpointError(path, exc) from exc


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _unsafe_types(path: Path, exc: BaseException) -> str:
    """The types (module.name) the file's pickle refers to that are not allowed, from its opcodes only."""
    names: list[str] = []
    try:
        allowed = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
        names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in allowed]
    except Exception:  # noqa: BLE001 - not a zip checkpoint: take the name from the message
        pass
    if not names:
        import re

        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        names = [found.group(1)] if found else []
    return ", ".join(f"`{n}`" for n in names[:4]) if names else "a type outside tensors and plain data"


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


def is_dpfit_checkpoint(ckpt: object) -> bool:
    return isinstance(ckpt, dict) and isinstance(ckpt.get("hyper_parameters"), dict) \
        and MODEL_CONFIG_KEY in ckpt["hyper_parameters"] and isinstance(ckpt.get("state_dict"), dict)


def model_from_checkpoint(ckpt: object, path: str | Path, precision: str | None = None) -> EnergyModel:
    """The model of a loaded dpfit or DeePMD-kit checkpoint ``ckpt`` (read from ``path``, for messages)."""
    if is_deepmd_checkpoint(ckpt):
        return model_from_deepmd_state(ckpt["model"], precision=precision, source=str(path))
    if is_dpfit_checkpoint(ckpt):
        return model_from_dpfit_checkpoint(ckpt, precision=precision)
    raise CheckpointError(f"{path}: neither a dpfit nor a DeePMD-kit checkpoint")


def load_model(path: str | Path, precision: str | None = None, impl: str | None = None) -> EnergyModel:
    """Any supported checkpoint -> its model in eval mode (float64 unless ``precision``), as the
    implementation ``impl`` (``fast`` or ``reference``; None: the checkpoint's ``model.impl``). The fast
    model computes with PyTorch until its backend is selected for a device
    (:meth:`~dpfit.model.EnergyModel.select_backend`)."""
    model = model_from_checkpoint(load_checkpoint(path), path, precision=precision)
    return (convert(model, impl) if impl else model).eval()


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, file too large, quota); the previous file is intact."""

    def __init__(self, path: Path, exc: OSError) -> None:
        self.path, self.errno = Path(path), exc.errno
        self.reason = (exc.strerror or str(exc) or type(exc).__name__).lower()
        super().__init__(f"cannot write {path}: {self.reason}")


def write_checkpoint(obj: Any, path: str | Path) -> Path:
    """``torch.save`` into a temporary file beside ``path``, then renamed over it: a write that fails (disk
    full, file too large, quota) or is killed leaves the previous ``path`` as it was, and no partial file;
    the failure is a :class:`CheckpointWriteError` naming ``path``."""
    import io
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(buffer.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise CheckpointWriteError(path, exc) from exc
    return path
