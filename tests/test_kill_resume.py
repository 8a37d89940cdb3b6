"""A training process killed with SIGKILL resumes with ``ckpt_path=last`` to the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra_utils import FAST, REPO

STEPS = 30


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HYDRA_FULL_ERROR="1")


def _args(run: Path) -> list[str]:
    keys = {a.split("=")[0]: a for a in FAST}
    for k, v in {"trainer.max_steps": STEPS, "trainer.val_check_interval": 5, "trainer.log_every_n_steps": 1,
                 "callbacks.model_checkpoint.every_n_train_steps": 1,  # a checkpoint every step
                 "data.epoch_length": 7}.items():  # epochs of 7 batches: the kill lands mid-epoch
        keys[k] = f"{k}={v}"
    return [sys.executable, str(REPO / "train.py"), *keys.values(), f"hydra.run.dir={run}"]


def _run(args: list[str], cwd: Path) -> None:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _state(ckpt: Path) -> tuple[int, dict]:
    c = torch.load(ckpt, map_location="cpu", weights_only=False)
    return c["global_step"], c["state_dict"]


@pytest.mark.slow
def test_sigkill_then_resume_last_matches_uninterrupted_run(tmp_path):
    full, run = tmp_path / "full", tmp_path / "run"
    _run(_args(full), tmp_path)

    proc = subprocess.Popen(_args(run), cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = run / "checkpoints"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            lcurve = run / "lcurve.out"  # the row of step 5 (after step 1's) follows the step-5 checkpoints
            if lcurve.is_file() and len(lcurve.read_text().splitlines()) >= 3:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at, _ = _state(ckpts / "last.ckpt")
    assert 5 <= killed_at < STEPS
    rows_before = [r for r in (run / "lcurve.out").read_text().splitlines() if not r.startswith("#")]
    assert rows_before

    _run([*_args(run), "ckpt_path=last"], tmp_path)

    step_full, w_full = _state(full / "checkpoints" / "last.ckpt")
    step_res, w_res = _state(ckpts / "last.ckpt")
    assert step_full == step_res == STEPS
    assert w_full.keys() == w_res.keys()
    for k in w_full:
        torch.testing.assert_close(w_res[k], w_full[k], rtol=1e-12, atol=1e-12, msg=k)

    # it resumed (rather than starting over): only the steps after the checkpoint were trained again
    csv = (run / "csv" / "metrics.csv").read_text().splitlines()
    header = csv[0].split(",")
    trained = {int(r.split(",")[header.index("step")]) for r in csv[1:]
               if r.split(",")[header.index("train/loss")]}
    assert min(trained) >= killed_at and max(trained) == STEPS - 1
    assert (run / "csv" / "metrics.1.csv").is_file()  # the killed run's rows are kept
    # lcurve.out: one header, the killed run's rows kept, the resumed rows appended
    lcurve = (run / "lcurve.out").read_text().splitlines()
    assert sum(r.startswith("#") for r in lcurve) == 1
    rows = [r for r in lcurve if not r.startswith("#")]
    assert rows[: len(rows_before)] == rows_before
    assert int(rows[-1].split()[0]) == STEPS
    full_rows = [r for r in (full / "lcurve.out").read_text().splitlines() if not r.startswith("#")]
    assert [r.split()[0] for r in full_rows] == ["1", "5", "10", "15", "20", "25", "30"]
    assert rows[-1].split()[0] == full_rows[-1].split()[0]
    assert [r.split()[0] for r in rows] == [r.split()[0] for r in full_rows]  # every step once, none twice
