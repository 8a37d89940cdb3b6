"""Multiruns: an Optuna sweep of the loss prefactors (trials share a W&B group), a plain grid (a folder per run)."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra_utils import FAST, REPO

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")

ENV = {"WANDB_MODE": "offline", "WANDB_DISABLE_CODE": "true", "WANDB_DISABLE_GIT": "true", "WANDB_SILENT": "true",
       "WANDB_CONSOLE": "off", "WANDB_X_DISABLE_STATS": "true", "WANDB_X_DISABLE_MACHINE_INFO": "true"}


def _multirun(args: list[str], cwd: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1", **ENV)
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "-m", *args, *FAST], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _last_val(run: Path, key: str) -> float:
    rows = [r for r in csv.DictReader(open(run / "csv" / "metrics.csv")) if r.get(key)]
    return float(rows[-1][key])


def test_optuna_sweep_runs_trials_and_reports_the_best(tmp_path):
    sweep = tmp_path / "sweep"
    _multirun(["hparams_search=loss_prefactors", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}",
               "logger=[csv,wandb]"], tmp_path)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"loss.start_pref_f", "loss.start_pref_e", "loss.relative_f",
                                           "schedule.start_lr"}
    values, sampled = [], []
    for trial in ("0", "1"):
        run = sweep / trial
        assert (run / "lcurve.out").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        sampled.append((cfg["loss"]["start_pref_f"], cfg["schedule"]["start_lr"]))
        assert 10 <= cfg["loss"]["start_pref_f"] <= 10000 and 1e-4 <= cfg["schedule"]["start_lr"] <= 1e-2
        values.append(_last_val(run, "val/rmse_f"))
    assert sampled[0] != sampled[1]
    assert all(math.isfinite(v) for v in values)
    assert results["best_value"] == pytest.approx(min(values), rel=1e-6)

    # the trials' W&B runs share one group: the sweep folder
    from test_wandb import wandb_run

    groups = {wandb_run(next((sweep / t / "wandb").glob("offline-run-*")))["group"] for t in ("0", "1")}
    assert groups == {f"{tmp_path.name}/sweep"}


def test_grid_multirun_gives_each_run_its_folder(tmp_path):
    sweep = tmp_path / "grid"
    _multirun(["loss=ener,relative_force", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    relative = []
    for trial in ("0", "1"):
        run = sweep / trial
        for name in ("config.yaml", "lcurve.out", "checkpoints/last.ckpt", "csv/metrics.csv"):
            assert (run / name).is_file(), (trial, name)
        relative.append(yaml.safe_load((run / "config.yaml").read_text())["loss"]["relative_f"])
    assert relative == [None, 1.0]
    assert not (tmp_path / "outputs").exists()


def test_slurm_launcher_takes_nodes_and_gpus_from_the_trainer(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from dpfit.cli.config_dir import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer=ddp",
                                 "trainer.num_nodes=2", "trainer.devices=4"])
    GlobalHydra.instance().clear()
    launcher = instantiate(cfg.hydra.launcher)  # submits nothing until launch()
    assert type(launcher).__name__ == "SlurmLauncher"
    params = launcher.params
    assert (params["nodes"], params["gpus_per_node"], params["tasks_per_node"]) == (2, 4, 4)
    assert params["partition"] == "gpu"
