"""DeePMD-kit users' entry points into ``train.py``: ``deepmd_input=input.json`` and ``data.sel=auto``.

``python train.py deepmd_input=input.json [overrides]`` (or ``dpfit-train input.json``): the json is
translated exactly as ``scripts/import_deepmd_input.py`` does (:func:`dpfit.io.deepmd_input.convert_input`),
each key it cannot translate is printed as ``unsupported: <key>``, and the translation becomes Hydra
overrides placed before the user's own, so every override on the command line applies on top. The json
is only read; a copy is kept in the run folder (``deepmd_input.json``).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from dpfit.errors import ConfigError

log = logging.getLogger("dpfit.train")

ARG = "deepmd_input"


# ---------------------------------------------------------------------------------------------- deepmd_input=
def _value(v: Any) -> str:
    """``v`` in Hydra's override grammar."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_value(x)}" for k, x in v.items()) + "}"
    return _quoted(str(v))


def _quoted(text: str) -> str:
    """``text`` as a quoted Hydra override value that Hydra reads back unchanged (backslashes before a quote
    or the end doubled, quotes escaped); ``${`` in it stays as the translation wrote it."""
    import re

    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
    return "'" + text.replace("'", "\\'") + "'"


def _flatten(node: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            items += _flatten(v, key + ".")
        else:
            items.append((key, v))
    return items


def preset_overrides(preset: dict) -> list[str]:
    """A :func:`convert_input` preset as Hydra command-line overrides (group choices, then ``++key=value``)."""
    out = []
    for entry in preset.get("defaults", []):
        for group, option in entry.items():
            out.append(f"{group.removeprefix('override /')}={option}")
    for key, value in _flatten({k: v for k, v in preset.items() if k != "defaults"}):
        out.append(f"++{key}={_value(value)}")
    return out


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _find_input(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the json named by ``deepmd_input=`` or given as a lone ``*.json`` argument, the other arguments)."""
    found, rest = None, []
    for arg in argv:
        if arg.startswith(f"{ARG}=") or arg.startswith(f"+{ARG}=") or arg.startswith(f"++{ARG}="):
            found = arg.split("=", 1)[1]
        elif arg.endswith(".json") and "=" not in arg and not arg.startswith("-"):
            found = arg
        else:
            rest.append(arg)
    return found, rest


def expand_deepmd_input(argv: list[str]) -> list[str]:
    """Command-line arguments with ``deepmd_input=<json>`` replaced by its translation (the user's
    overrides last, so they win; a translated key the user also sets is left out). Prints the
    ``unsupported: <key>`` report on stderr. Exits with a one-line ``error:`` if the json is unreadable."""
    from dpfit.io.deepmd_input import UnimplementedTypeError, convert_input, literal

    name, rest = _find_input(argv)
    if name is None:
        return list(argv)
    path = Path(name).expanduser()
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        sys.exit(f"error: {ARG}={name}: cannot be read as a DeePMD-kit input.json ({exc})")
    if not isinstance(data, dict):
        sys.exit(f"error: {ARG}={name}: a DeePMD-kit input.json holds an object with model/training sections")
    try:
        preset, unsupported = convert_input(data, base_dir=path.resolve().parent)
    except UnimplementedTypeError as exc:  # refused: it would train a different model
        sys.stderr.write(f"error: {ARG}={name}: {exc}\n")
        raise SystemExit(exc.exit_code) from None
    for key in unsupported:
        print(f"unsupported: {key}", file=sys.stderr)
    user = {_key(a) for a in rest if "=" in a and not a.startswith("-")}
    translated = [o for o in preset_overrides(preset) if _key(o) not in user]
    return [*translated, f"++{ARG}={_value(literal(str(path.resolve())))}", *rest]


def keep_input_copy(cfg: DictConfig, out: Path) -> None:
    """Copy the DeePMD-kit input the run was translated from into the run folder (never touching it)."""
    source = cfg.get(ARG)
    if source and Path(source).is_file() and not (out / "deepmd_input.json").exists():
        shutil.copyfile(source, out / "deepmd_input.json")


# ---------------------------------------------------------------------------------------------- sel=auto
def _checkpoint_sel(path: str) -> list[int] | None:
    from dpfit.io.checkpoint import MODEL_CONFIG_KEY, load_checkpoint

    try:
        ckpt = load_checkpoint(path, mmap=True)  # safely; an unreadable or unsafe file is reported by the resume
        return [int(s) for s in ckpt["hyper_parameters"][MODEL_CONFIG_KEY]["descriptor"]["sel"]]
    except Exception:  # noqa: BLE001 - unreadable here: the resume reports it
        return None


def resolve_auto_sel(cfg: DictConfig, resume_from: str | None = None) -> list[int] | None:
    """Replace ``data.sel=auto`` / ``auto:R`` in ``cfg`` by counts per type (None when sel is a list).

    A resumed run takes the checkpoint's sel, a fine-tuned one (``ckpt_init``) its initial model's; otherwise
    the training systems are counted as DeePMD-kit's neighbor-stat does and rounded as its ``sel: "auto"``
    (count * R, up to a multiple of 4)."""
    from dpfit.data.neighbor_stat import auto_sel, describe, neighbor_stat, parse_auto_sel

    sel = OmegaConf.select(cfg, "data.sel", throw_on_missing=False)
    ratio = parse_auto_sel(sel) if isinstance(sel, str) else None
    if ratio is None:
        return None
    found = _checkpoint_sel(resume_from) if resume_from else None
    init = cfg.get("ckpt_init")
    if found is not None:
        log.info("data.sel=%s: sel=%s from the checkpoint %s (not recounted)", sel, found, resume_from)
    elif init:  # fine-tuning keeps the architecture of the model it starts from (as DeePMD-kit's finetune)
        from hydra.utils import to_absolute_path

        from dpfit.io.checkpoint import load_model

        found = [int(s) for s in load_model(to_absolute_path(init)).sel]
        log.info("data.sel=%s: sel=%s from ckpt_init=%s", sel, found, init)
    else:
        from dpfit.data.system import load_systems

        paths = OmegaConf.select(cfg, "data.train_systems", throw_on_missing=False)
        if not paths:
            raise ConfigError(f"data.sel={sel} counts neighbours in data.train_systems, which is empty: "
                             "give data.train_systems or a list data.sel=[...]")
        paths = [paths] if isinstance(paths, str) else list(paths)
        type_map = OmegaConf.select(cfg, "data.type_map", throw_on_missing=False)
        type_map = list(type_map) if type_map else None
        rcut = float(OmegaConf.select(cfg, "data.rcut"))
        systems = load_systems(paths, type_map)
        ntypes = len(type_map) if type_map else max(int(s.atype.max()) + 1 for s in systems)
        stat = neighbor_stat(systems, rcut, ntypes)
        found = auto_sel(stat.max_nbor, ratio)
        log.info(describe(stat, rcut, type_map, found, ratio))
    with open_dict(cfg):
        cfg.data.sel = found
        if isinstance(OmegaConf.select(cfg, "model.descriptor.sel"), str):
            cfg.model.descriptor.sel = found
    return found
