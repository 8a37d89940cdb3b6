"""W&B (offline): metrics history, config and parameter count, parity plots, run id kept across a resume."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra_utils import FAST, REPO, compose_train

from dpfit.cli.train import build, checkpoint_wandb_id
from dpfit.training.module import WANDB_RUN_ID_KEY

pytest.importorskip("wandb")

ENV = {"WANDB_MODE": "offline", "WANDB_DISABLE_CODE": "true", "WANDB_DISABLE_GIT": "true", "WANDB_SILENT": "true",
       "WANDB_CONSOLE": "off", "WANDB_X_DISABLE_STATS": "true", "WANDB_X_DISABLE_MACHINE_INFO": "true"}


def wandb_records(path: Path):
    """The protobuf records of an offline run's ``run-<id>.wandb`` file (W&B's LevelDB-style log:
    a 7-byte file header, 32 KiB blocks of records with (crc32, length, type) headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, payload = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
        pos += 7
        if kind == 0:
            break
        payload += data[pos: pos + length]
        pos += length
        if kind in (1, 4):  # full record, or last fragment
            record = pb.Record()
            record.ParseFromString(payload)
            payload = b""
            yield record


def wandb_run(run_dir: Path) -> dict:
    """id, group, history keys (with every logged value), config of one offline run folder."""
    out = {"history": {}, "config": {}, "id": None, "group": None, "resumed": False}
    (wandb_file,) = run_dir.glob("run-*.wandb")
    for r in wandb_records(wandb_file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["id"], out["group"], out["resumed"] = r.run.run_id, r.run.run_group, r.run.resumed
        elif kind == "history":
            for item in r.history.item:
                key = item.key or "/".join(item.nested_key)
                out["history"].setdefault(key, []).append(json.loads(item.value_json))
        elif kind == "config":
            for item in r.config.update:
                out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def _train(args: list[str], cwd: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1", **ENV)
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _fast(**changes) -> list[str]:
    keys = {a.split("=")[0]: a for a in FAST}
    keys.update({k: f"{k}={v}" for k, v in changes.items()})
    return list(keys.values())


@pytest.mark.slow
def test_offline_run_holds_history_config_plots_and_resumes_the_same_run(tmp_path):
    run = tmp_path / "run"
    args = ["logger=wandb", "callbacks=dashboard", "trainer.log_every_n_steps=1",
            *_fast(**{"trainer.max_steps": 4, "trainer.val_check_interval": 2}), f"hydra.run.dir={run}"]
    _train(args, tmp_path)

    (offline,) = (run / "wandb").glob("offline-run-*")
    first = wandb_run(offline)
    history = first["history"]
    # every loss term with its prefactor, lr, train and validation errors, per-element force RMSE, plots
    for key in ("train/loss", "train/l2_e", "train/l2_f", "train/pref_e", "train/pref_f", "train/rmse_e",
                "train/rmse_f", "lr", "val/loss", "val/rmse_e", "val/mae_e", "val/rmse_f", "val/mae_f",
                "val/rmse_f_Cu", "val/rmse_f_Ni", "trainer/global_step"):
        assert key in history, key
    assert len(history["train/loss"]) == 4 and len(history["val/rmse_f"]) == 3  # validated at steps 1, 2, 4
    assert history["train/pref_f"][0] == pytest.approx(1000.0)
    assert history["val/parity/_type"] == ["images/separated"] * 3  # wandb.Image lists
    images = [f for files in history["val/parity/filenames"] for f in files]
    assert len(images) == 3 and all((offline / "files" / f).is_file() for f in images)
    assert sorted(p.name for p in (run / "plots").iterdir()) == [f"parity_000000{k}.png" for k in (1, 2, 4)]
    # the resolved config and the parameter count
    config = first["config"]
    assert config["n_params"] > 0
    assert config["loss"]["start_pref_f"] == 1000.0
    assert config["model"]["fitting_net"]["neuron"] == [16, 16]
    assert first["group"] == ""  # a single run: no sweep group

    # the checkpoint carries the run id; resuming continues that run
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt[WANDB_RUN_ID_KEY] == first["id"]
    _train([*args[:-1], "trainer.max_steps=6", "ckpt_path=last", f"hydra.run.dir={run}"], tmp_path)
    offline_runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2
    second = wandb_run(next(p for p in offline_runs if p != offline))
    assert second["id"] == first["id"]
    assert second["history"]["trainer/global_step"][-1] >= 5


def test_resume_id_reaches_the_wandb_logger(tmp_path):
    ckpt = tmp_path / "a.ckpt"
    torch.save({"state_dict": {}, WANDB_RUN_ID_KEY: "abc123"}, ckpt)
    assert checkpoint_wandb_id(str(ckpt)) == "abc123"
    torch.save({"state_dict": {}}, ckpt)
    assert checkpoint_wandb_id(str(ckpt)) is None
    assert checkpoint_wandb_id(str(tmp_path / "absent.ckpt")) is None

    cfg = compose_train(["logger=many", *FAST], tmp_path)
    _, _, trainer = build(cfg, wandb_id="abc123")
    (wandb_logger,) = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
    assert wandb_logger._wandb_init["id"] == "abc123" and wandb_logger._wandb_init["resume"] == "allow"
    assert wandb_logger._experiment is None  # nothing started by building
    _, _, trainer = build(cfg)
    (wandb_logger,) = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
    assert wandb_logger._wandb_init.get("id") is None
