"""``dp test`` equivalent: per-system and weighted-average errors of a checkpoint, detail files, parity plots.

    python test.py ckpt_path=model.ckpt.pt systems=[data/sys_a,data/sys_b] detail_file=out/detail

Relative paths are resolved against the directory the command was run in (``hydra.job.chdir`` is false).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, ListConfig

from dpfit.cli.config_dir import CONFIG_DIR
from dpfit.cli.errors import one_line_errors, run_cli
from dpfit.cli.validate import validate_test_config
from dpfit.data.system import DataError, load_systems
from dpfit.inference.evaluate import (
    error_metrics,
    evaluate_system,
    format_metrics,
    weighted_average,
    write_detail_files,
)
from dpfit.inference.property import (
    evaluate_property_system,
    format_property_metrics,
    property_error_metrics,
    property_needs,
    property_parity_plots,
    write_property_detail_files,
)
from dpfit.io.checkpoint import load_model
from dpfit.model import PropertyModel

RULE = "# ----------------------------------------------- "


def _abspath(path) -> Path:
    """Absolute, normalised path; relative ones are taken from the directory the command was run in."""
    return Path(os.path.normpath(to_absolute_path(str(path))))


def _device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _paths(value) -> list[str]:
    if isinstance(value, (str, Path)):
        return [str(value)]
    if isinstance(value, (list, tuple, ListConfig)):
        return [str(v) for v in value]
    raise DataError(f"systems must be a path or a list of paths, got {value!r}")


def _write_plots(results: list[dict], type_map: list[str], prefix: Path | None, out_dir: Path | None) -> list[Path]:
    """``plots=true``: parity.png in the run folder (all panels), and one parity plot per quantity plus
    per-element force-error histograms next to the detail files (or in the run folder without detail_file)."""
    from dpfit.inference.plots import error_histograms, parity_plots, parity_summary

    paths: list[Path] = []
    if out_dir is not None:
        paths += parity_summary(results, out_dir / "parity.png")
    base = prefix if prefix is not None else (out_dir / "test" if out_dir is not None else None)
    if base is not None:
        paths += parity_plots(results, base)
        paths += error_histograms(results, base, type_map)
    return paths


def run(cfg: DictConfig, out_dir: Path | None = None) -> dict:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.systems``; print the tables, write details; return the metrics."""
    ckpt = _abspath(cfg.ckpt_path)
    model = load_model(ckpt, precision=cfg.get("precision"), impl=cfg.get("impl"))
    device = _device(cfg.get("device", "auto"))
    model.to(device)
    model.select_backend(device, cfg.get("kernels"))  # (kernels None: the checkpoint's model.kernels)
    detail = cfg.get("detail_file")
    prefix = _abspath(detail) if detail else None
    if prefix is not None:
        prefix.parent.mkdir(parents=True, exist_ok=True)
    print(f"# model: {ckpt} ({str(model.dtype).replace('torch.', '')}, {device})")
    if isinstance(model, PropertyModel):
        return _run_property(cfg, model, ckpt, device, prefix, out_dir)
    systems = load_systems([_abspath(p) for p in _paths(cfg.systems)], type_map=model.type_map)

    def evaluate(system) -> dict:
        result = evaluate_system(model, system, batch_size=int(cfg.batch_size), device=device)
        result["atype"] = system.atype  # (per-element plots)
        return result

    summary = {"ckpt_path": str(ckpt), "systems": []}
    results = _tables(systems, evaluate, lambda r: error_metrics(r, r["natoms"]), format_metrics,
                      write_detail_files, prefix, summary)
    if prefix is not None:
        print(f"# detail files: {prefix}.{{e,e_peratom,f,v,v_peratom}}.out")
    _write_summary(out_dir, summary)
    if cfg.get("plots"):
        for path in _write_plots(results, model.type_map, prefix, out_dir):
            print(f"# plot: {path}")
    return summary


def _run_property(cfg: DictConfig, model: PropertyModel, ckpt: Path, device: torch.device, prefix: Path | None,
                  out_dir: Path | None) -> dict:
    """:func:`run` for a property model: ``dp test``'s property table per system and weighted."""
    systems = load_systems([_abspath(p) for p in _paths(cfg.systems)], type_map=model.type_map,
                           needs=property_needs(model))
    kind = "intensive" if model.intensive else "extensive"
    print(f"# property: {model.property_name} (task_dim {model.task_dim}, {kind})")
    summary = {"ckpt_path": str(ckpt), "property_name": model.property_name, "systems": []}
    results = _tables(systems,
                      lambda system: evaluate_property_system(model, system, batch_size=int(cfg.batch_size),
                                                              device=device),
                      property_error_metrics, format_property_metrics, write_property_detail_files, prefix, summary)
    if prefix is not None:
        print(f"# detail files: {prefix}.property.out" + (", .aproperty.out" if any("atom_property" in r
                                                                                      for r in results) else ""))
    _write_summary(out_dir, summary)
    if cfg.get("plots"):
        base = prefix if prefix is not None else (out_dir / "test" if out_dir is not None else None)
        for path in property_parity_plots(results, base) if base is not None else []:
            print(f"# plot: {path}")
    return summary


def _tables(systems: list, evaluate: Callable, metrics: Callable, format_lines: Callable, write_detail: Callable,
            prefix: Path | None, summary: dict) -> list[dict]:
    """``dp test``'s table for each system and, for several, their weighted average; the detail files; the
    numbers into ``summary``. Returns each system's evaluation."""
    errors, results = [], []
    for k, system in enumerate(systems):
        result = evaluate(system)
        err = metrics(result)
        print("# ---------------output of dp test--------------- ")
        print(f"# testing system : {system.name}")
        print(f"# number of test data : {result['nframes']:d} ")
        for line in format_lines(err):
            print(line)
        print(RULE)
        if prefix is not None:
            write_detail(prefix, result, append=k > 0)
        errors.append(err)
        results.append(result)
        summary["systems"].append({"name": system.name, "natoms": result["natoms"], "nframes": result["nframes"],
                                   **{key: value for key, (value, _) in err.items()}})
    average = weighted_average(errors)
    summary["average"] = average
    if len(systems) > 1:
        print("# ----------weighted average of errors----------- ")
        print(f"# number of systems : {len(systems)}")
        for line in format_lines(average):
            print(line)
        print(RULE)
    return results


def _write_summary(out_dir: Path | None, summary: dict) -> None:
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="test")
@one_line_errors
def _hydra_main(cfg: DictConfig) -> None:
    validate_test_config(cfg)  # precision, device, impl, kernels: one line naming the key, exit 2
    run(cfg, out_dir=Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    """``test.py`` / ``dpfit-test``: expected errors end in one ``error: ...`` line (dpfit.cli.errors)."""
    run_cli(_hydra_main)


if __name__ == "__main__":
    main()
