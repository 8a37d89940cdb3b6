"""DeePMD-kit ``input.json`` -> a dpfit Hydra experiment preset (``configs/experiment/<name>.yaml``).

    experiment, unsupported = convert_input(json.load(open("input.json")), base_dir="path/of/input.json/folder")

Every key is either translated or listed in ``unsupported`` (as ``section.sub.key``, or ``key=value``
for a value dpfit cannot reproduce); ``_comment*`` keys are ignored. Keys a file leaves out take
DeePMD-kit's defaults (written explicitly where dpfit's defaults differ), so the preset trains the model
DeePMD-kit would. System paths are resolved against ``base_dir`` (the json's folder, as DeePMD-kit does)
and written absolute, or as ``${paths.data_root}/...`` for those under ``data_root``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: DeePMD-kit 3.x defaults of the keys translated here (deepmd/utils/argcheck.py)
DESCRIPTOR_DEFAULTS = {
    "rcut": 6.0, "rcut_smth": 0.5, "neuron": [10, 20, 40], "axis_neuron": 4, "resnet_dt": False,
    "type_one_side": False, "exclude_types": [], "set_davg_zero": False,
}
FITTING_DEFAULTS = {"neuron": [120, 120, 120], "resnet_dt": True, "numb_fparam": 0, "numb_aparam": 0}
LOSS_DEFAULTS = {
    "start_pref_e": 0.02, "limit_pref_e": 1.0, "start_pref_f": 1000.0, "limit_pref_f": 1.0,
    "start_pref_v": 0.0, "limit_pref_v": 0.0, "start_pref_ae": 0.0, "limit_pref_ae": 0.0,
    "start_pref_pf": 0.0, "limit_pref_pf": 0.0, "relative_f": None,
}
#: DeePMD-kit 3.x defaults of a ``property`` fitting's and loss's keys (``property_name`` has none)
PROPERTY_FITTING_DEFAULTS = {"neuron": [120, 120, 120], "resnet_dt": True, "numb_fparam": 0, "numb_aparam": 0,
                             "task_dim": 1, "intensive": False, "distinguish_types": True}
PROPERTY_LOSS_DEFAULTS = {"loss_func": "smooth_mae", "metric": ["mae"], "beta": 1.0}
LR_DEFAULTS = {"start_lr": 1e-3, "stop_lr": 1e-8, "decay_steps": 5000}
TRAINING_DEFAULTS = {"disp_freq": 1000, "save_freq": 1000}
PRECISIONS = ("float64", "float32")

#: the DeePMD-kit model, descriptor, fitting and loss types dpfit implements. Any other type is refused
#: (exit 2): translated, it would train a different model than the input describes.
IMPLEMENTED_TYPES = {
    "model.type": ("standard",),
    "model.descriptor.type": ("se_e2_a", "se_a"),
    "model.fitting_net.type": ("ener", "property"),
    "loss.type": ("ener", "property"),
}
#: the type a section has when the input leaves ``type`` out (DeePMD-kit's defaults)
DEFAULT_TYPES = {"model.type": "standard", "model.descriptor.type": None, "model.fitting_net.type": "ener",
                 "loss.type": "ener"}


class UnimplementedTypeError(ValueError):
    """An input.json asks for a model, descriptor, fitting or loss type dpfit does not implement."""

    exit_code = 2


def unimplemented_types(input_json: dict) -> list[str]:
    """``section.type=value (dpfit implements ...)`` for each type of :data:`IMPLEMENTED_TYPES` not implemented."""
    found = []
    for key, implemented in IMPLEMENTED_TYPES.items():
        node: Any = input_json
        for part in key.split(".")[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        value = node.get("type", DEFAULT_TYPES[key])
        if value is not None and value not in implemented:
            found.append(f"{key}={value!r} (dpfit implements {', '.join(implemented)})")
    return found


def literal(text: str) -> str:
    """``text`` as an OmegaConf value that reads back as itself: ``${...}`` in it is not an interpolation."""
    import re

    return re.sub(r"(\\*)\$\{", lambda m: "\\" * (2 * len(m.group(1)) + 1) + "${", text)


class _Interpolation(str):
    """A string the translation writes as an interpolation on purpose (``${paths.data_root}/...``)."""


def _literal_strings(value: Any) -> Any:
    if isinstance(value, _Interpolation):
        return str(value)
    if isinstance(value, str):
        return literal(value)
    if isinstance(value, list):
        return [_literal_strings(v) for v in value]
    if isinstance(value, dict):
        return {k: _literal_strings(v) for k, v in value.items()}
    return value


#: keys accepted only at the listed values (the behaviour dpfit implements); anything else is unsupported
ACCEPTED_VALUES = {
    **{key: types for key, types in IMPLEMENTED_TYPES.items() if key != "model.descriptor.type"},
    "model.data_stat_protect": (0.01,),
    "model.descriptor.activation_function": ("tanh",),
    "model.descriptor.trainable": (True,),
    "model.descriptor.env_protection": (0.0, 0),
    "model.fitting_net.activation_function": ("tanh",),
    "model.fitting_net.trainable": (True,),
    "model.fitting_net.rcond": (None,),
    "model.fitting_net.atom_ener": ([],),
    "model.fitting_net.use_aparam_as_mask": (False,),
    "model.fitting_net.dim_case_embd": (0,),
    "model.fitting_net.default_fparam": (None,),
    "model.pair_exclude_types": ([],),
    "model.atom_exclude_types": ([],),
    "learning_rate.type": ("exp",),
    "learning_rate.decay_rate": (None,),
    "loss.enable_atom_ener_coeff": (False,),
    "loss.start_pref_gf": (0, 0.0),
    "loss.limit_pref_gf": (0, 0.0),
    "loss.numb_generalized_coord": (0,),
    "loss.use_huber": (False,),
    "training.validation_data.auto_prob": ("prob_sys_size",),
    "training.validation_data.auto_prob_style": ("prob_sys_size",),
    "training.validation_data.sys_probs": (None,),
    "training.disp_training": (True,),
    "training.time_training": (True,),
    "training.profiling": (False,),
    "training.enable_profiler": (False,),
    "training.tensorboard": (False,),
    "training.change_bias_after_training": (False,),
    "training.opt_type": ("Adam",),
    "training.gradient_max_norm": (None, 0, 0.0),
    "training.mixed_precision": (None,),
}


def _is_comment(key: str) -> bool:
    return key.startswith("_comment")


def _setter(values: dict, key: str, cast=lambda x: x):
    """A handler storing ``cast(value)`` under ``key``."""
    return lambda v: values.__setitem__(key, cast(v))


def _accepted(path: str, value: Any) -> bool:
    allowed = ACCEPTED_VALUES.get(path, ())
    return any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed)


class _Converter:
    def __init__(self, base_dir: str | Path, data_root: str | Path | None) -> None:
        self.base_dir = Path(base_dir)
        self.data_root = None if data_root is None else self._resolve(data_root)
        self.out: dict[str, Any] = {}
        self.unsupported: list[str] = []
        self.warmup_ratio: float | None = None
        self.property = False  # a property fitting (model=se_e2_a_property loss=property)

    # ------------------------------------------------------------------ helpers
    def _resolve(self, path: str | Path) -> Path:
        path = Path(os.path.expanduser(str(path)))
        if not path.is_absolute():
            path = self.base_dir / path
        return Path(os.path.normpath(os.path.abspath(path)))

    def system_path(self, path: str) -> str:
        resolved = self._resolve(path)
        if self.data_root is not None:
            try:
                rel = resolved.relative_to(self.data_root)
            except ValueError:
                pass
            else:
                root = "${paths.data_root}"
                return _Interpolation(root if str(rel) == "." else f"{root}/{literal(rel.as_posix())}")
        return str(resolved)

    def systems(self, value) -> list[str]:
        return [self.system_path(v) for v in ([value] if isinstance(value, str) else list(value))]

    def put(self, dotted: str, value: Any) -> None:
        value = _literal_strings(value)  # text from the json is taken literally (never an interpolation)
        node = self.out
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    def reject(self, path: str, value: Any = None, show_value: bool = False) -> None:
        self.unsupported.append(f"{path}={value!r}" if show_value else path)

    def walk(self, section: dict, prefix: str, handlers: dict, skip: tuple = ()) -> None:
        """Apply ``handlers[key](value)`` to each key; unknown keys are checked against ACCEPTED_VALUES."""
        for key, value in section.items():
            path = f"{prefix}.{key}"
            if _is_comment(key) or key in skip:
                continue
            if key in handlers:
                handlers[key](value)
            elif path in ACCEPTED_VALUES:
                if not _accepted(path, value):
                    self.reject(path, value, show_value=True)
            else:
                self.reject(path)

    # ------------------------------------------------------------------ sections
    def model(self, model: dict) -> None:
        self.walk(model, "model", {
            "type_map": lambda v: self.put("data.type_map", [str(x) for x in v]),
            "data_stat_nbatch": lambda v: self.put("data.data_stat_nbatch", int(v)),
            "descriptor": lambda v: None,  # below, the descriptor first (it sets the precision)
            "fitting_net": lambda v: None,
        })
        if "type_map" not in model:
            self.reject("model.type_map (missing)")
        if "descriptor" in model:
            self.descriptor(dict(model["descriptor"] or {}))
        else:
            self.reject("model.descriptor (missing)")
        self.fitting(dict(model.get("fitting_net") or {}))

    def _precision(self, path: str, value: str, fallback: str | None) -> str | None:
        value = "float64" if value == "default" else value
        if value not in PRECISIONS:
            self.reject(path, value, show_value=True)
            return fallback
        return value

    def descriptor(self, desc: dict) -> None:
        dtype = desc.get("type", "se_e2_a")
        if dtype not in IMPLEMENTED_TYPES["model.descriptor.type"]:
            self.reject("model.descriptor.type", dtype, show_value=True)
            return
        values = {**DESCRIPTOR_DEFAULTS}
        precision = {"value": None}

        def sel(v):
            if isinstance(v, str) and (v == "auto" or v.startswith("auto:")):
                self.put("data.sel", v)  # counted from the training data when training starts
            elif isinstance(v, (list, tuple)):
                self.put("data.sel", [int(s) for s in v])
            else:
                self.reject("model.descriptor.sel", v, show_value=True)

        def keep(key, cast=lambda x: x):
            return _setter(values, key, cast)

        handlers = {
            "sel": sel,
            "rcut": keep("rcut", float), "rcut_smth": keep("rcut_smth", float),
            "neuron": keep("neuron", lambda v: [int(x) for x in v]),
            "axis_neuron": keep("axis_neuron", int), "n_axis_neuron": keep("axis_neuron", int),
            "resnet_dt": keep("resnet_dt", bool), "type_one_side": keep("type_one_side", bool),
            "exclude_types": keep("exclude_types", lambda v: [list(map(int, p)) for p in v]),
            "set_davg_zero": keep("set_davg_zero", bool),
            "seed": keep("seed"),
            "precision": lambda v: precision.__setitem__("value", self._precision("model.descriptor.precision", v, None)),
        }
        self.walk(desc, "model.descriptor", handlers, skip=("type",))
        if "sel" not in desc:
            self.put("data.sel", "auto")  # DeePMD-kit's default
        for key, value in values.items():
            self.put(f"model.descriptor.{key}", value)
        self.put("model.precision", precision["value"] or "float64")

    def choose(self, group: str, option: str) -> None:
        """Select a config group option (a ``defaults`` entry of the preset)."""
        self.out.setdefault("defaults", []).append({f"override /{group}": option})

    def fitting(self, fit: dict) -> None:
        if fit.get("type", "ener") == "property":
            self.choose("model", "se_e2_a_property")
            self.choose("loss", "property")
        values = {**(PROPERTY_FITTING_DEFAULTS if self.property else FITTING_DEFAULTS)}

        def keep(key, cast=lambda x: x):
            return _setter(values, key, cast)

        def precision(v):
            p = self._precision("model.fitting_net.precision", v, None)
            current = self.out.get("model", {}).get("precision", "float64")
            if p is not None and p != current:
                self.reject("model.fitting_net.precision", v, show_value=True)  # one precision for the whole model

        handlers = {
            "neuron": keep("neuron", lambda v: [int(x) for x in v]),
            "n_neuron": keep("neuron", lambda v: [int(x) for x in v]),
            "resnet_dt": keep("resnet_dt", bool),
            "numb_fparam": keep("numb_fparam", int), "numb_aparam": keep("numb_aparam", int),
            "seed": keep("seed"),
            "precision": precision,
        }
        if self.property:
            handlers.update({
                "property_name": keep("property_name", str), "task_dim": keep("task_dim", int),
                "intensive": keep("intensive", bool), "distinguish_types": keep("distinguish_types", bool),
            })
            if "property_name" not in fit:
                self.reject("model.fitting_net.property_name (missing)")
        self.walk(fit, "model.fitting_net", handlers, skip=("type",) if self.property else ())
        for key, value in values.items():
            self.put(f"model.fitting_net.{key}", value)

    def learning_rate(self, lr: dict) -> None:
        values = {**LR_DEFAULTS}
        self.put("scale_by_worker", "linear")  # DeePMD-kit's default

        def keep(key, cast):
            return _setter(values, key, cast)

        def scale(v):
            if v in ("linear", "sqrt", "none"):
                self.put("scale_by_worker", v)
            else:
                self.reject("learning_rate.scale_by_worker", v, show_value=True)

        self.walk(lr, "learning_rate", {
            "start_lr": keep("start_lr", float), "stop_lr": keep("stop_lr", float),
            "decay_steps": keep("decay_steps", int), "scale_by_worker": scale,
            "warmup_steps": lambda v: self.put("schedule.warmup_steps", int(v)),
            "warmup_start_factor": lambda v: self.put("schedule.warmup_start_factor", float(v)),
            "warmup_ratio": self._warmup_ratio,
        })
        for key, value in values.items():
            self.put(f"schedule.{key}", value)

    def _warmup_ratio(self, ratio) -> None:
        self.warmup_ratio = float(ratio)

    def loss(self, loss: dict) -> None:
        if self.property or loss.get("type") == "property":
            self.property_loss(loss)
            return
        values = {**LOSS_DEFAULTS}
        handlers = {k: _setter(values, k, float) for k in LOSS_DEFAULTS if k != "relative_f"}
        handlers["relative_f"] = lambda v: values.__setitem__("relative_f", None if v is None else float(v))
        self.walk(loss, "loss", handlers)
        for key, value in values.items():
            self.put(f"loss.{key}", value)
        # dpfit's relative-energy term does not exist in DeePMD-kit: off
        self.put("loss.start_pref_de", 0.0)
        self.put("loss.limit_pref_de", 0.0)

    def property_loss(self, loss: dict) -> None:
        """DeePMD-kit's ``property`` loss (also for a property fitting whose input has no loss section)."""
        if loss.get("type", "property") != "property" or not self.property:
            self.reject("loss.type", loss.get("type", "ener"), show_value=True)  # loss and fitting disagree
            return
        values = {**PROPERTY_LOSS_DEFAULTS}
        self.walk(loss, "loss", {
            "loss_func": _setter(values, "loss_func", str), "beta": _setter(values, "beta", float),
            "metric": _setter(values, "metric", lambda v: [str(x) for x in v]),
        }, skip=("type",))
        for key, value in values.items():
            self.put(f"loss.{key}", value)
        self.put("loss.pref", 1.0)  # DeePMD-kit fits the frame label only
        self.put("loss.pref_atomic", 0.0)

    def training(self, tr: dict) -> None:
        def data(section: str, value: dict, val: bool) -> None:
            prefix = f"training.{section}"
            batch_key = "data.val_batch_size" if val else "data.batch_size"

            def batch(v):
                if isinstance(v, (list, tuple)):
                    self.reject(f"{prefix}.batch_size", v, show_value=True)  # one batch size per system
                else:
                    self.put(batch_key, v)

            handlers = {
                "systems": lambda v: self.put("data.val_systems" if val else "data.train_systems", self.systems(v)),
                "batch_size": batch,
            }
            if val:
                handlers["numb_btch"] = lambda v: self.put("data.numb_btch", int(v))
                handlers["numb_batch"] = handlers["numb_btch"]
            else:
                handlers["auto_prob"] = lambda v: self.put("data.auto_prob", str(v))
                handlers["auto_prob_style"] = handlers["auto_prob"]
                handlers["sys_probs"] = lambda v: self.put("data.sys_probs", None if v is None else [float(x) for x in v])
                handlers["sys_weights"] = handlers["sys_probs"]
                handlers["sys_prob"] = handlers["sys_probs"]
            self.walk(value, prefix, handlers)
            if "batch_size" not in value:
                self.put(batch_key, "auto")
            if val and "numb_btch" not in value and "numb_batch" not in value:
                self.put("data.numb_btch", 1)

        def steps(v):
            self.put("trainer.max_steps", int(v))

        self.put("trainer.val_check_interval", TRAINING_DEFAULTS["disp_freq"])
        self.put("callbacks.lcurve.disp_freq", TRAINING_DEFAULTS["disp_freq"])
        self.put("callbacks.model_checkpoint.every_n_train_steps", TRAINING_DEFAULTS["save_freq"])
        self.walk(tr, "training", {
            "training_data": lambda v: data("training_data", v, val=False),
            "validation_data": lambda v: data("validation_data", v, val=True),
            "numb_steps": steps, "stop_batch": steps,
            "seed": lambda v: self.put("seed", v),
            "disp_freq": lambda v: (self.put("trainer.val_check_interval", int(v)),  # DeePMD validates at each row
                                    self.put("callbacks.lcurve.disp_freq", int(v))),
            "save_freq": lambda v: self.put("callbacks.model_checkpoint.every_n_train_steps", int(v)),
            "disp_file": lambda v: self.put("callbacks.lcurve.filename", str(v)),
            "warmup_steps": lambda v: self.put("schedule.warmup_steps", int(v)),
            "warmup_ratio": self._warmup_ratio,
            "warmup_start_factor": lambda v: self.put("schedule.warmup_start_factor", float(v)),
            "save_ckpt": lambda v: None if v == "model.ckpt" else self.reject("training.save_ckpt", v, True),
        })
        if "training_data" not in tr:
            self.reject("training.training_data (missing)")


#: DeePMD-kit 1.x kept these in ``training``; 2.x moved them into ``training.training_data``
_V1_DATA_KEYS = ("systems", "set_prefix", "batch_size", "sys_prob", "sys_probs", "auto_prob", "sys_weights",
                 "auto_prob_style")


def _from_v1(input_json: dict) -> dict:
    """A 1.x input in the 2.x layout, as DeePMD-kit reads it (a copy; the caller's dict is not changed):
    training.systems/batch_size/... -> training.training_data, ``numb_test`` dropped (no effect since 2.0),
    ``learning_rate.decay_rate`` -> the ``stop_lr`` it reaches at the last step."""
    import copy
    import math

    data = copy.deepcopy(input_json)
    training = data.get("training")
    if not isinstance(training, dict):
        return data
    if "systems" in training and "training_data" not in training:
        training["training_data"] = {k: training.pop(k) for k in _V1_DATA_KEYS if k in training}
        training.pop("numb_test", None)
        if training["training_data"].get("set_prefix", "set") == "set":
            training["training_data"].pop("set_prefix", None)
    lr = data.get("learning_rate")
    steps = training.get("numb_steps", training.get("stop_batch"))
    if isinstance(lr, dict) and lr.get("decay_rate") is not None and "stop_lr" not in lr and steps:
        start = lr.get("start_lr", LR_DEFAULTS["start_lr"])
        decay_steps = lr.get("decay_steps", LR_DEFAULTS["decay_steps"])
        lr["stop_lr"] = math.exp(math.log(lr.pop("decay_rate")) * steps / decay_steps) * start
    return data


def convert_input(input_json: dict, base_dir: str | Path = ".", data_root: str | Path | None = None
                  ) -> tuple[dict, list[str]]:
    """Translate a DeePMD-kit ``input.json`` (loaded dict) into a dpfit experiment preset.

    ``base_dir``: the json's folder, against which relative system paths are resolved (written absolute).
    ``data_root`` (optional, relative to ``base_dir`` or absolute): systems under it are written as
    ``${paths.data_root}/<rest>``, so the preset runs with ``paths.data_root=<where the data is>``.
    Returns ``(preset, unsupported)``: the preset as a plain dict (``defaults`` first, selecting
    ``override /data: deepmd``), and every key (``section.key`` or ``section.key=value``) it could not
    translate, in file order.
    """
    input_json = _from_v1(input_json)
    refused = unimplemented_types(input_json)
    if refused:
        raise UnimplementedTypeError(f"{'; '.join(refused)}: not implemented by dpfit, which would train a "
                                     "different model than the input describes")
    conv = _Converter(base_dir, data_root)
    conv.out["defaults"] = [{"override /data": "deepmd"}]
    model = input_json.get("model")
    fitting = model.get("fitting_net") if isinstance(model, dict) else None
    conv.property = isinstance(fitting, dict) and fitting.get("type") == "property"  # (whatever the key order)
    sections = {
        "model": conv.model,
        "learning_rate": conv.learning_rate,
        "loss": conv.loss,
        "training": conv.training,
    }
    for key, value in input_json.items():
        if _is_comment(key):
            continue
        if key in sections:
            if not isinstance(value, dict):
                conv.reject(key, value, show_value=True)
                continue
            sections[key](value)
        elif key == "nvnmd" and not (value or {}).get("enable", False):
            continue
        else:
            conv.reject(key)
    for key in ("learning_rate", "loss"):
        if key not in input_json:
            sections[key]({})  # DeePMD-kit's defaults
    if conv.warmup_ratio is not None:
        steps = conv.out.get("trainer", {}).get("max_steps")
        if steps is None:
            conv.reject("warmup_ratio (numb_steps missing)")
        elif "warmup_steps" not in conv.out.get("schedule", {}):
            conv.put("schedule.warmup_steps", int(conv.warmup_ratio * steps))
    return _ordered(conv.out), conv.unsupported


_ORDER = ("defaults", "seed", "scale_by_worker", "data", "model", "loss", "schedule", "trainer", "callbacks")


def _ordered(out: dict) -> dict:
    return {k: out[k] for k in _ORDER if k in out} | {k: v for k, v in out.items() if k not in _ORDER}


def to_yaml(preset: dict, source: str | None = None) -> str:
    """The preset as a Hydra experiment file (``# @package _global_`` header; lists of scalars inline)."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def _list(dumper, data):
        flow = all(not isinstance(x, (dict, list, tuple)) for x in data) or all(
            isinstance(x, (list, tuple)) and all(not isinstance(y, (dict, list, tuple)) for y in x) for x in data
        )
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow and len(data) > 0)

    _Dumper.add_representer(list, _list)
    head = ["# @package _global_"]
    if source:
        head.append(f"# imported from {source} by scripts/import_deepmd_input.py")
    body = yaml.dump(preset, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
    return "\n".join(head) + "\n" + body
