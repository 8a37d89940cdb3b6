"""Safe resume: a checkpoint is read (and found readable) before anything in the run folder changes, and
its model must mean the same as the config's: every setting that changes what the weights mean is compared.
"""

from __future__ import annotations

import re
from pathlib import Path

from dpfit.errors import CheckpointError
from dpfit.io.checkpoint import MODEL_CONFIG_KEY, UnreadableCheckpointError, load_checkpoint

#: every setting that changes the meaning of the weights, as its dotted key in the model config
MEANING = (
    "type_map", "precision",
    "descriptor.sel", "descriptor.rcut", "descriptor.rcut_smth", "descriptor.neuron", "descriptor.axis_neuron",
    "descriptor.resnet_dt", "descriptor.type_one_side", "descriptor.exclude_types", "descriptor.set_davg_zero",
    "fitting_net.neuron", "fitting_net.resnet_dt", "fitting_net.numb_fparam", "fitting_net.numb_aparam",
    "fitting_net.type", "fitting_net.property_name", "fitting_net.task_dim", "fitting_net.intensive",
    "fitting_net.atom_sum",
)
#: where the user sets a model setting when the model config takes it from the data group
USER_KEY = {"type_map": "data.type_map", "descriptor.sel": "data.sel"}
#: the model's defaults, for a checkpoint or config that leaves a setting out
DEFAULTS = {"precision": "float64", "descriptor.rcut_smth": 0.5, "descriptor.resnet_dt": False,
            "descriptor.type_one_side": True, "descriptor.exclude_types": [], "descriptor.set_davg_zero": False,
            "fitting_net.resnet_dt": True, "fitting_net.numb_fparam": 0, "fitting_net.numb_aparam": 0,
            "fitting_net.type": "ener"}


def _step_of(path: Path) -> int:
    m = re.search(r"(\d+)", path.stem)
    return int(m.group(1)) if m else -1


def _readable(path: Path) -> dict | None:
    """The training checkpoint at ``path`` if it reads safely (nothing in it runs), else None."""
    try:
        ckpt = load_checkpoint(path, mmap=True)
    except CheckpointError:  # missing, unreadable, or refused as unsafe
        return None
    return ckpt if isinstance(ckpt, dict) and "state_dict" in ckpt else None


def newest_readable(folder: Path, exclude: Path | None = None) -> tuple[Path, int] | None:
    """The readable checkpoint of ``folder`` with the highest step (``global_step`` inside), if any."""
    best: tuple[Path, int] | None = None
    for path in sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
        if exclude is not None and path.resolve() == exclude.resolve():
            continue
        ckpt = _readable(path)
        if ckpt is None:
            continue
        step = int(ckpt.get("global_step", _step_of(path)))
        if best is None or step > best[1]:
            best = (path, step)
    return best


def read_checkpoint(path: str | Path) -> dict:
    """Load a dpfit checkpoint to resume (safely); a truncated or corrupt one names the newest readable one
    beside it, one that would run code is refused."""
    path = Path(path)
    try:
        ckpt = load_checkpoint(path, mmap=True)
    except UnreadableCheckpointError as exc:
        other = newest_readable(path.parent, exclude=path)
        hint = (f"the newest readable checkpoint beside it is {other[0]} (step {other[1]}): resume with "
                f"ckpt_path={other[0]}" if other else "no other readable checkpoint is beside it")
        raise CheckpointError(f"{path} cannot be read (truncated or corrupt: {exc.reason}); {hint}") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a dpfit training checkpoint (no state_dict); a DeePMD-kit or "
                              "other model starts a new run with ckpt_init=<path>")
    return ckpt


def _pick(config: dict, keys: tuple[str, ...]):
    node = config
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node


def _normal(label: str, value):
    if value is None:
        value = DEFAULTS.get(label)
    if isinstance(value, (list, tuple)):
        return [_normal("", v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value) if label.endswith(("rcut", "rcut_smth")) else value
    return value


def model_mismatches(saved: dict, config: dict) -> list[tuple[str, object, object]]:
    """(label, checkpoint value, config value) of each weight-meaning setting that differs."""
    out = []
    for label in MEANING:
        keys = tuple(label.split("."))
        a, b = _normal(label, _pick(saved, keys)), _normal(label, _pick(config, keys))
        if isinstance(b, str) and b.startswith("auto") and label == "descriptor.sel":
            continue  # sel: auto is resolved from the data; the resolved value is checked where it is made
        if a != b:
            out.append((label, a, b))
    return out


def show(v) -> str:
    if isinstance(v, list):
        return "[" + ",".join(show(x) for x in v) + "]"
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def check_resume(ckpt: dict, path: str | Path, model_config: dict) -> None:
    """Refuse to resume ``path`` with a config whose model differs in meaning; one line naming each difference."""
    saved = (ckpt.get("hyper_parameters") or {}).get(MODEL_CONFIG_KEY)
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: no model config in the checkpoint (not written by dpfit train.py); start "
                              f"a new run from its weights with ckpt_init={path}")
    diffs = model_mismatches(saved, model_config)
    if not diffs:
        return
    parts = [f"{USER_KEY.get(label, 'model.' + label)}={show(b)} (checkpoint: {show(a)})" for label, a, b in diffs]
    raise CheckpointError(
        f"ckpt_path={path} was trained with a different model: {'; '.join(parts)}. Resume with the checkpoint's "
        f"values, or start a new run from its weights with ckpt_init={path} (a deliberate change)")
