"""Checks of a composed training config before anything is built, each naming the key to change.

Keys filled by interpolation (``model.descriptor.sel: ${data.sel}``, ``data.rcut: ${model.descriptor.rcut}``)
are reported under the key the value comes from, the one a user sets.
"""

from __future__ import annotations

import math
import numbers

from omegaconf import DictConfig, ListConfig, OmegaConf

from dpfit.errors import ConfigError

PRECISIONS = ("float64", "float32")


def source_key(cfg: DictConfig, key: str) -> str:
    """The key a value is set at: follows plain interpolations (``${data.sel}`` -> ``data.sel``)."""
    for _ in range(10):
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
        if not isinstance(parent, DictConfig) or leaf not in parent:
            return key
        raw = parent._get_node(leaf)._value()
        if not (isinstance(raw, str) and raw.startswith("${") and raw.endswith("}") and raw.count("${") == 1):
            return key
        target = raw[2:-1]
        if not target or ":" in target or target.startswith("."):  # a resolver or a relative key
            return key
        key = target
    return key


def _get(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)


def _fail(cfg: DictConfig, key: str, value, problem: str) -> None:
    shown = OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
    raise ConfigError(f"{source_key(cfg, key)}={_show(shown)}: {problem}")


def _show(value) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return "null" if value is None else str(value)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _positive_number(cfg, key: str, *, allow_zero: bool = False) -> float | None:
    v = _get(cfg, key)
    if v is None:
        return None
    if not _is_number(v):
        _fail(cfg, key, v, "must be a number")
    if v < 0 or (v == 0 and not allow_zero):
        _fail(cfg, key, v, "must be " + ("zero or positive" if allow_zero else "positive"))
    return float(v)


def _int(cfg, key: str, minimum: int, what: str) -> int | None:
    v = _get(cfg, key)
    if v is None:
        return None
    if not _is_int(v):
        _fail(cfg, key, v, f"must be a whole number ({what})")
    if v < minimum:
        _fail(cfg, key, v, f"must be {minimum} or more ({what})")
    return int(v)


def _int_list(cfg, key: str, what: str, minimum: int = 1) -> list[int] | None:
    v = _get(cfg, key)
    if v is None or isinstance(v, str):
        return None  # strings (e.g. sel: auto) are resolved and checked where they are read
    if not isinstance(v, (ListConfig, list)) or not all(_is_int(x) for x in v):
        _fail(cfg, key, v, f"must be a list of whole numbers ({what})")
    if len(v) == 0:
        _fail(cfg, key, v, f"is empty ({what})")
    if any(x < minimum for x in v):
        _fail(cfg, key, v, f"every entry must be {minimum} or more ({what})")
    return [int(x) for x in v]


def validate_train_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the key of the first wrong value of a training config."""
    try:
        _validate(cfg)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - an interpolation that fails to resolve, etc.
        from omegaconf.errors import OmegaConfBaseException

        if isinstance(exc, OmegaConfBaseException):
            from dpfit.cli.errors import missing_value_message

            missing = missing_value_message(str(exc))
            if missing:
                raise ConfigError(missing) from exc
            key = getattr(exc, "full_key", None) or "config"
            raise ConfigError(f"{key}: {str(exc).strip().splitlines()[0]}") from exc
        raise


def _validate_property(cfg: DictConfig) -> None:
    """The keys of a property fitting (``model.fitting_net.type: property``)."""
    if _get(cfg, "model.fitting_net.type") != "property":
        return
    name = _get(cfg, "model.fitting_net.property_name")
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-." for c in name):
        _fail(cfg, "model.fitting_net.property_name", name, "must name the label file <property_name>.npy "
              "(letters, digits, _ - .)")
    _int(cfg, "model.fitting_net.task_dim", 1, "values per frame")
    for key in ("model.fitting_net.intensive", "model.fitting_net.distinguish_types"):
        v = _get(cfg, key)
        if v is not None and not isinstance(v, bool):
            _fail(cfg, key, v, "must be true or false")
    atom_sum = _get(cfg, "model.fitting_net.atom_sum")
    if atom_sum is not None:
        if not _is_number(atom_sum):
            _fail(cfg, "model.fitting_net.atom_sum", atom_sum, "must be a number (each frame's sum of the atomic "
                  "values) or null")
        if _get(cfg, "model.fitting_net.intensive"):
            _fail(cfg, "model.fitting_net.atom_sum", atom_sum, "fixes a sum of atomic values: it needs "
                  "model.fitting_net.intensive=false")


def _validate(cfg: DictConfig) -> None:
    _check_train_extras(cfg)
    model = "model" in cfg and cfg.model is not None
    if model:
        type_map = _get(cfg, "model.type_map")
        if isinstance(type_map, (ListConfig, list)):
            names = [str(t) for t in type_map]
            if not names:
                _fail(cfg, "model.type_map", type_map, "is empty: name the elements, e.g. [O,H]")
            dup = sorted({t for t in names if names.count(t) > 1})
            if dup:
                _fail(cfg, "model.type_map", type_map, f"names {dup} more than once")
        precision = _get(cfg, "model.precision")
        if precision is not None and str(precision) not in PRECISIONS:
            _fail(cfg, "model.precision", precision, f"unsupported precision; choose {' or '.join(PRECISIONS)}")
        rcut = _positive_number(cfg, "model.descriptor.rcut")
        rcut_smth = _positive_number(cfg, "model.descriptor.rcut_smth", allow_zero=True)
        if rcut is not None and rcut_smth is not None and rcut_smth >= rcut:
            _fail(cfg, "model.descriptor.rcut_smth", rcut_smth, f"must be smaller than model.descriptor.rcut ({rcut})")
        sel = _int_list(cfg, "model.descriptor.sel", "neighbor slots per type within rcut")
        if sel is not None and isinstance(type_map, (ListConfig, list)) and len(sel) != len(type_map):
            _fail(cfg, "model.descriptor.sel", sel, f"has {len(sel)} entries for the {len(type_map)} types "
                  f"of the type map {list(type_map)}")
        neuron = _int_list(cfg, "model.descriptor.neuron", "embedding net widths")
        axis = _int(cfg, "model.descriptor.axis_neuron", 1, "columns of the embedding kept")
        if neuron and axis is not None and axis > neuron[-1]:
            _fail(cfg, "model.descriptor.axis_neuron", axis, f"exceeds the last embedding width "
                  f"model.descriptor.neuron[-1]={neuron[-1]}")
        _int_list(cfg, "model.fitting_net.neuron", "fitting net widths")
        _validate_property(cfg)
        _int(cfg, "model.fitting_net.numb_fparam", 0, "frame parameters")
        _int(cfg, "model.fitting_net.numb_aparam", 0, "atomic parameters")
        for key in ("model.descriptor.type_one_side", "model.descriptor.resnet_dt", "model.fitting_net.resnet_dt"):
            v = _get(cfg, key)
            if v is not None and not isinstance(v, bool):
                _fail(cfg, key, v, "must be true or false")
        excl = _get(cfg, "model.descriptor.exclude_types")
        if excl is not None and isinstance(type_map, (ListConfig, list)):
            ok = isinstance(excl, (ListConfig, list)) and all(
                isinstance(p, (ListConfig, list)) and len(p) == 2 and all(_is_int(t) and 0 <= t < len(type_map) for t in p)
                for p in excl)
            if not ok:
                _fail(cfg, "model.descriptor.exclude_types", excl,
                      f"must be pairs of type indices 0..{len(type_map) - 1}, e.g. [[0,1]]")

    max_steps = _get(cfg, "trainer.max_steps")
    if max_steps is not None:
        if not _is_int(max_steps):
            _fail(cfg, "trainer.max_steps", max_steps, "must be a whole number of training steps")
        if max_steps <= 0:
            _fail(cfg, "trainer.max_steps", max_steps, "must be positive (the number of training steps, numb_steps)")
    if "schedule" in cfg and cfg.schedule is not None:
        start = _positive_number(cfg, "schedule.start_lr")
        stop = _positive_number(cfg, "schedule.stop_lr")
        if start is not None and stop is not None and stop > start:
            _fail(cfg, "schedule.stop_lr", stop, f"is above schedule.start_lr={start}: the rate would rise "
                  "during training; set stop_lr below start_lr")
        decay = _get(cfg, "schedule.decay_steps")
        if decay is not None and (not _is_int(decay) or decay <= 0):
            _fail(cfg, "schedule.decay_steps", decay, "must be a positive whole number of steps")
        _int(cfg, "schedule.warmup_steps", 0, "steps of linear warmup")
        num = _get(cfg, "schedule.num_steps")
        if num is not None and source_key(cfg, "schedule.num_steps") != "trainer.max_steps" and (
                not _is_int(num) or num <= 0):
            _fail(cfg, "schedule.num_steps", num, "must be a positive whole number of steps")


def _check_train_extras(cfg: DictConfig) -> None:
    """Data and callback keys checked before anything is read."""
    for key in ("data.batch_size", "data.val_batch_size"):
        v = _get(cfg, key)
        if v is None:
            continue
        text = str(v).strip()
        ok = (_is_int(v) and v >= 1) or (isinstance(v, str) and (text.isdigit() and int(text) >= 1 or text == "auto"
                                                                 or text.startswith("auto:") and text[5:].isdigit()
                                                                 and int(text[5:]) > 0))
        if not ok:
            _fail(cfg, key, v, "must be a whole number of frames (1 or more), auto or auto:N (N atoms per batch)")
    fraction = _get(cfg, "data.val_fraction")
    if fraction is not None and (not _is_number(fraction) or not 0 <= float(fraction) < 1):
        _fail(cfg, "data.val_fraction", fraction, "must be at least 0 and below 1 (the share of each training "
              "system held out for validation; 1 would leave no training frames, 0 validates nothing)")
    for key in ("callbacks.lcurve.filename", "callbacks.lcurve_plot.filename", "callbacks.lcurve_plot.png"):
        v = _get(cfg, key)
        if v is None:
            continue
        parts = str(v).replace("\\", "/").split("/")
        if not str(v) or str(v).startswith(("/", "~")) or ".." in parts or ":" in parts[0]:
            _fail(cfg, key, v, "must be a file name inside the run folder (e.g. lcurve.out): a run writes only "
                  "into its own folder")


def _choice(cfg, key: str, options: tuple, what: str = "") -> None:
    v = _get(cfg, key)
    if v is not None and str(v) not in options:
        _fail(cfg, key, v, f"{what or 'unsupported value'}; choose {', '.join(options)}")


def _device(cfg, key: str = "device") -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` that this machine has."""
    import re

    v = _get(cfg, key)
    if v is None or str(v) in ("auto", "cpu"):
        return
    m = re.fullmatch(r"cuda(?::(\d+))?", str(v))
    if m is None:
        _fail(cfg, key, v, "choose auto, cpu, cuda or cuda:N")
    import torch

    if not torch.cuda.is_available():
        _fail(cfg, key, v, "CUDA is not available on this machine: use device=cpu (or auto)")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        _fail(cfg, key, v, f"this machine has {torch.cuda.device_count()} CUDA device(s)")


def validate_test_config(cfg: DictConfig) -> None:
    """``test.py``'s options, checked as ``train.py``'s are: one line naming the key, exit 2."""
    from dpfit.model.backends import KERNEL_MODES

    _choice(cfg, "precision", PRECISIONS, "unsupported precision")
    _choice(cfg, "impl", ("fast", "reference"), "unknown model implementation")
    _choice(cfg, "kernels", KERNEL_MODES, "unknown kernels mode")
    _device(cfg)
    _int(cfg, "batch_size", 1, "frames per model call")
    for key in ("plots", "verbose"):
        v = _get(cfg, key)
        if v is not None and not isinstance(v, bool):
            _fail(cfg, key, v, "must be true or false")


def validate_freeze_config(cfg: DictConfig) -> None:
    """``freeze.py``'s options, checked as ``train.py``'s are: one line naming the key, exit 2."""
    from dpfit.io.freeze_formats import FORMATS

    _choice(cfg, "precision", PRECISIONS, "unsupported precision")
    from dpfit.model.backends import KERNEL_MODES

    _choice(cfg, "format", FORMATS, "unknown format")
    _choice(cfg, "kernels", KERNEL_MODES, "unknown kernels mode")
    _positive_number(cfg, "min_nbor_dist")
    _positive_number(cfg, "compression.step")
    extrapolate = _positive_number(cfg, "compression.extrapolate")
    if extrapolate is not None and extrapolate <= 1:
        _fail(cfg, "compression.extrapolate", extrapolate, "must be more than 1 (the tables reach distances down to "
              "min_nbor_dist / extrapolate)")
    _int(cfg, "compression.frames", 0, "random frames the compressed model is checked on")
    for key in ("overwrite", "verbose", "compress"):
        v = _get(cfg, key)
        if v is not None and not isinstance(v, bool):
            _fail(cfg, key, v, "must be true or false")
