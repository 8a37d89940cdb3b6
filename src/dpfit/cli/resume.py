"""Resume from the run folder alone (DeePMD-kit's ``dp train --restart``).

``python train.py ckpt_path=<run folder or one of its checkpoints>`` (or ``hydra.run.dir=<run> ckpt_path=last``)
continues the run with the config it stored (``<run>/config.yaml``, written with absolute paths): nothing
of the original command line needs repeating. Command-line overrides may change what changes neither the
model nor the data (:data:`FREE`: ``trainer.max_steps``, logging, callbacks, ...); an override that would
change anything else (and differs from the run's value) is refused with one line before Hydra writes
anything, so a refused resume leaves the run folder as it was (``.hydra/`` included: a resume into the
run's own folder never rewrites it, ``hydra.output_subdir=null``).

The decision is made twice with the same code: in ``train.py``'s entry before Hydra starts
(:func:`prepare_argv`), and in :func:`dpfit.cli.train.train` on the composed config (:func:`resume_config`),
which also covers programmatic use.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dpfit.errors import ConfigError

log = logging.getLogger("dpfit.train")

STORED_CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"

#: keys (and key prefixes) a resume may change: none changes the model or the data
FREE = (
    "trainer.max_steps", "trainer.val_check_interval", "trainer.log_every_n_steps", "trainer.limit_val_batches",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.devices", "trainer.accelerator",
    "trainer.num_nodes", "trainer.check_val_every_n_epoch", "callbacks", "logger", "summary", "verbose",
    "nonfinite_loss", "kernels", "keep_freed_memory", "optimized_metric", "task_name", "data.num_workers",
    "data.pin_memory", "data.max_open_files", "data.neighbor_cache_mb", "data.check_data", "data.numb_btch",
    "data.val_batch_size",
)
#: keys that always come from this command (where the run is, what to resume), never from the stored config
THIS_COMMAND = ("ckpt_path", "paths.output_dir", "paths.root_dir", "hydra")

_NULL = ("", "null", "None", "none")


def _is_free(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in FREE)


def _this_command(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in THIS_COMMAND)


# ---------------------------------------------------------------------------------------------- the run folder
def run_folder_of(ckpt_path: str | None, run_dir: str | Path | None) -> Path | None:
    """The dpfit run folder a ``ckpt_path`` value resumes, if any: ``last`` (with the run folder given as
    ``hydra.run.dir``), the folder itself (or its ``checkpoints/``), or a checkpoint inside it. None for a
    checkpoint outside any run folder (it resumes with the command line's config, as before)."""
    if ckpt_path is None or str(ckpt_path) in _NULL:
        return None
    if str(ckpt_path) == "last":
        return Path(run_dir).absolute() if run_dir else None
    path = Path(os.path.expanduser(str(ckpt_path))).absolute()
    if path.is_dir():
        if path.name == CHECKPOINTS and (path.parent / STORED_CONFIG).is_file():
            return path.parent
        return path
    if path.parent.name == CHECKPOINTS and (path.parent.parent / STORED_CONFIG).is_file():
        return path.parent.parent
    if path.name.startswith("hpc_ckpt_") and (path.parent / STORED_CONFIG).is_file():
        return path.parent  # Lightning's SLURM requeue checkpoint, in the run folder itself
    return None


def _flag(arg: str) -> bool:
    return arg.startswith("-")


def _value_of(argv: list[str], key: str) -> str | None:
    found = None
    for a in argv:
        if not _flag(a) and a.lstrip("+").split("=", 1)[0] == key and "=" in a:
            found = a.split("=", 1)[1]
    return found


# ---------------------------------------------------------------------------------------------- the stored config
def _escape(node: Any) -> Any:
    """A value read back from config.yaml as the literal it was (``${...}`` is not an interpolation there)."""
    if isinstance(node, dict):
        return {k: _escape(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_escape(v) for v in node]
    if isinstance(node, str) and "${" in node:
        return node.replace("\\", "\\\\").replace("${", "\\${")
    return node


def load_stored_config(run: Path) -> DictConfig:
    """``<run>/config.yaml``: the config the run trained with (resolved, absolute paths), taken literally."""
    import yaml

    path = run / STORED_CONFIG
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot be read as the run's config ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a dpfit run config")
    return OmegaConf.create(_escape(data))


#: config keys holding paths the user gives (relative ones are taken from the directory train.py ran in)
PATH_KEYS = ("data.train_systems", "data.val_systems", "data.test_systems", "data.stat_file", "data.cache_dir",
             "paths.data_root", "paths.log_dir", "ckpt_init", "ckpt_path", "deepmd_input")


def _absolute(value: Any, base: Path) -> Any:
    if isinstance(value, dict):
        return {k: _absolute(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if not isinstance(value, str) or not value or value in ("last", "???"):
        return value
    file, sep, group = value.partition("#")  # data.h5#/group
    path = Path(os.path.expanduser(file))
    if not path.is_absolute():
        path = base / path
    return os.path.normpath(str(path)) + sep + group


def stored_config_text(cfg: DictConfig, cwd: str | Path) -> str:
    """The resolved config as written to ``<run>/config.yaml``: relative paths made absolute (against ``cwd``,
    where train.py ran), so ``ckpt_path=<run>`` resumes it from any directory."""
    import yaml

    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("hydra", None)
    base = Path(cwd)
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(leaf) is not None:
            node[leaf] = _absolute(node[leaf], base)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120)


# ---------------------------------------------------------------------------------------------- comparing
def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every leaf (lists are leaves) of a plain container."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (a == b and type(a) is type(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _show(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_show(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_show(x)}" for k, x in v.items()) + "}"
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


_ABSENT = object()


@dataclass
class Changes:
    """What the command line changes relative to the run's stored config."""

    allowed: dict[str, Any] = field(default_factory=dict)  # key -> new value (_ABSENT: deleted)
    refused: list[str] = field(default_factory=list)  # "key=new (the run's: old)"


def compare(base: Any, new: Any, stored: Any, resolved_new: DictConfig | None = None) -> Changes:
    """Keys the command line set (``new`` differs from the defaults ``base``, unresolved) whose value differs
    from the run's ``stored`` one: allowed (free keys) or refused. Interpolations the command line left as
    they were (``schedule.num_steps: ${trainer.max_steps}``) follow the stored values."""
    base_l, new_l, stored_l = _leaves(base), _leaves(new), _leaves(stored)
    out = Changes()
    for key in sorted(set(base_l) | set(new_l)):
        if _this_command(key):
            continue
        b, n = base_l.get(key, _ABSENT), new_l.get(key, _ABSENT)
        if b is not _ABSENT and n is not _ABSENT and _same(b, n):
            continue  # not set by this command line
        if n is not _ABSENT and resolved_new is not None:
            try:
                n = OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(resolved_new, key)}),
                                           resolve=True)["v"] if isinstance(n, str) and "${" in n else n
            except Exception:  # noqa: BLE001 - an interpolation of Hydra's runtime: compared as written
                pass
        s = stored_l.get(key, _ABSENT)
        if n is not _ABSENT and s is not _ABSENT and _same(n, s):
            continue  # the run's own value, repeated
        if key == "data.sel" and isinstance(n, str) and n.startswith("auto"):
            continue  # sel=auto: a resume keeps the run's counted sel
        if _is_free(key):
            out.allowed[key] = n
            continue
        shown = f"~{key}" if n is _ABSENT else f"{key}={_show(n)}"
        shown += " (not in the run's config)" if s is _ABSENT else f" (the run's: {_show(s)})"
        out.refused.append(shown)
    return out


def refusal(ckpt_arg: str, run: Path, refused: list[str]) -> ConfigError:
    ckpt = run / CHECKPOINTS / "last.ckpt"
    return ConfigError(
        f"ckpt_path={ckpt_arg} resumes the run in {run} with its own config ({run / STORED_CONFIG}); these "
        f"overrides would change its model, data or training: {'; '.join(refused)}. Resume without them (only "
        f"trainer.max_steps, logging, callbacks and other settings that change neither model nor data may "
        f"change), or start a new run from its weights with ckpt_init={ckpt}")


def _apply(stored: DictConfig, allowed: dict[str, Any]) -> DictConfig:
    data = OmegaConf.to_container(stored, resolve=False)
    for key, value in allowed.items():
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            if not isinstance(node.get(p), dict):
                if value is _ABSENT:
                    node = None
                    break
                node[p] = {}
            node = node[p]
        if node is None:
            continue
        if value is _ABSENT:
            node.pop(leaf, None)
        else:
            node[leaf] = _escape(value)
    _prune(data, allowed)
    return OmegaConf.create(data)


def _prune(data: dict, allowed: dict[str, Any]) -> None:
    """Drop groups emptied by deletions (``logger=wandb`` removes the csv logger's keys)."""
    for key in allowed:
        parts = key.split(".")
        for depth in range(len(parts) - 1, 0, -1):
            node = data
            for p in parts[:depth - 1]:
                node = node.get(p) if isinstance(node, dict) else None
            if isinstance(node, dict) and node.get(parts[depth - 1]) == {}:
                node.pop(parts[depth - 1])


def _reroot(node: Any, old: str, new: str) -> Any:
    """Paths under the stored run folder moved to the folder this run writes to."""
    if isinstance(node, dict):
        return {k: _reroot(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_reroot(v, old, new) for v in node]
    if isinstance(node, str) and (node == old or node.startswith(old.rstrip("/") + "/")):
        return new + node[len(old):]
    return node


def _compose_defaults() -> DictConfig:
    """The training config with no overrides (Hydra's compose API, inside or outside a running app)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dpfit.cli.config_dir import CONFIG_DIR

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train")


def _container(cfg: DictConfig) -> dict:
    data = OmegaConf.to_container(cfg, resolve=False)
    data.pop("hydra", None)
    return data


def resume_config(cfg: DictConfig, run: Path, ckpt_arg: str) -> DictConfig:
    """The config a resume of ``run`` trains with: the stored one, with this command line's changes of free
    keys; :class:`ConfigError` (one line) for any other change. ``cfg``: the composed config of this command
    (defaults + its overrides)."""
    stored = load_stored_config(run)
    changes = compare(_container(_compose_defaults()), _container(cfg), OmegaConf.to_container(stored), cfg)
    if changes.refused:
        raise refusal(ckpt_arg, run, changes.refused)
    if changes.allowed:
        log.info("resuming %s with its stored config; changed: %s", run,
                 ", ".join(f"{k}={'(removed)' if v is _ABSENT else _show(v)}" for k, v in changes.allowed.items()))
    effective = OmegaConf.to_container(_apply(stored, changes.allowed), resolve=False)
    old_out = str(OmegaConf.select(stored, "paths.output_dir", default="") or "")
    new_out = str(OmegaConf.select(cfg, "paths.output_dir"))
    if old_out and os.path.normpath(old_out) != os.path.normpath(new_out):
        effective = _reroot(effective, old_out, new_out)  # resuming into another folder: write there
    effective.setdefault("paths", {})
    effective["paths"]["output_dir"] = new_out
    effective["ckpt_path"] = ckpt_arg
    return OmegaConf.create(effective)


# ---------------------------------------------------------------------------------------------- before Hydra
def prepare_argv(argv: list[str]) -> list[str]:
    """``train.py``'s arguments for a resume from a run folder: its folder as ``hydra.run.dir`` (when not
    given), no new ``.hydra/`` in it, and the overrides checked against its stored config before Hydra
    starts (exit 2 with one line when refused: nothing in the folder has changed)."""
    if any(a in ("-m", "--multirun") for a in argv):
        return argv
    ckpt_arg = _value_of(argv, "ckpt_path")
    run_dir = _value_of(argv, "hydra.run.dir")
    run = run_folder_of(ckpt_arg, run_dir)
    if run is None or not (run / STORED_CONFIG).is_file():
        return argv
    out = list(argv)
    # the run folder itself, `last` or its newest checkpoint continue in place; an older checkpoint without
    # hydra.run.dir branches into a new folder (its later checkpoints stay as they are)
    in_place = str(ckpt_arg) == "last" or Path(str(ckpt_arg)).is_dir() or Path(str(ckpt_arg)).name.startswith(
        ("last", "hpc_ckpt_"))
    same = Path(run_dir).absolute() == run if run_dir is not None else in_place
    if run_dir is None and in_place:
        from dpfit.cli.deepmd import _quoted
        from dpfit.io.deepmd_input import literal

        out.append(f"hydra.run.dir={_quoted(literal(str(run)))}")
    if same and _value_of(argv, "hydra.output_subdir") is None:
        out.append("hydra.output_subdir=null")  # the run's .hydra/ stays as its first command wrote it
    task = [a for a in argv if not _flag(a) and not a.lstrip("+~").startswith("hydra.")]
    try:
        from hydra import compose, initialize_config_dir

        from dpfit.cli.config_dir import CONFIG_DIR

        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            new = compose(config_name="train", overrides=task)
            base = compose(config_name="train")
        stored = load_stored_config(run)
    except Exception:  # noqa: BLE001 - a bad override or stored config: reported by the run itself
        return out
    changes = compare(_container(base), _container(new), OmegaConf.to_container(stored))
    if changes.refused:
        import sys

        exc = refusal(str(ckpt_arg), run, changes.refused)
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(exc.exit_code)
    return out
