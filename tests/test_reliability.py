"""Runs that never lie and never lose work: one-line errors, safe resume, run folders, preemption, NaN guards.

The table runs ``train.py`` / ``test.py`` / ``freeze.py``'s real entry points in this process (Hydra
included) and checks the single ``error: ...`` line and the exit code; SIGTERM is sent to a real training
subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra_utils import FAST, REPO, compose_train

from dpfit.cli.errors import did_you_mean
from dpfit.cli.run_folder import LOCK, run_folder_lock
from dpfit.cli.train import train
from dpfit.errors import NonFiniteLossError, RunFolderError

SMALL = [*FAST, "kernels=off", "trainer.max_steps=4", "trainer.val_check_interval=2",
         "callbacks.model_checkpoint.every_n_train_steps=2"]


def _cli(module: str, args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """Run ``python <module>.py args`` in this process: (exit code, stdout, stderr)."""
    import importlib

    main = importlib.import_module(f"dpfit.cli.{module}").main
    monkeypatch.setattr(sys, "argv", [f"{module}.py", *args])
    GlobalHydra.instance().clear()
    capsys.readouterr()
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        GlobalHydra.instance().clear()
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(out: str, err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err + out and "HYDRA_FULL_ERROR" not in err, err[-3000:]
    assert err.rstrip().splitlines()[-1] == lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run: checkpoints at steps 2 and 4 and last.ckpt (step 4)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(compose_train(SMALL, run))
    GlobalHydra.instance().clear()
    return run


# ----------------------------------------------------------------------------------------------------------------
# the table: bad input -> one-line message -> exit code
# ----------------------------------------------------------------------------------------------------------------

CONFIG_CASES = [
    # (overrides, expected text in the error line, text that must not be there, exit code)
    (["trainer.max_step=3"], "did you mean `max_steps`", None, 2),
    (["data.batchsize=3"], "did you mean `batch_size`", None, 2),
    (["trainr=cpu"], "did you mean `trainer`", None, 2),
    (["model=se_e2_b"], "did you mean `se_e2_a`", None, 2),
    (["loss=enr"], "did you mean `ener`", None, 2),
    (["trainer.max_steps=="], "cannot parse the override", None, 2),
    (["model.descriptor.rcut=five"], "model.descriptor.rcut=five: must be a number", "data", 2),
    (["schedule.decay_steps=0"], "schedule.decay_steps=0", None, 2),
    (["model.precision=float16"], "model.precision=float16: unsupported precision", None, 2),
    (["trainer.max_steps=0"], "trainer.max_steps=0: must be positive", "num_steps", 2),
    (["schedule.stop_lr=1e-2", "schedule.start_lr=1e-4"], "schedule.stop_lr=0.01: is above schedule.start_lr", None, 2),
    (["data.sel=[0,0]"], "data.sel=[0,0]", None, 2),
    (["data.sel=[8]"], "data.sel=[8]: has 1 entries for the 2 types", None, 2),
    (["model.descriptor.rcut_smth=7.0"], "model.descriptor.rcut_smth=7.0: must be smaller", None, 2),
    (["data=deepmd", "data.train_systems=[x]", "data.type_map=[O,H]", "data.sel=???"],
     "data.sel is not set", None, 2),
    (["ckpt_path=no/such.ckpt"], "ckpt_path=no/such.ckpt: no such checkpoint", None, 1),
    (["nonfinite_loss=ignore"], "nonfinite_loss=ignore: choose one of stop, skip, off", None, 2),
]


@pytest.mark.parametrize(("overrides", "expected", "absent", "code"), CONFIG_CASES,
                         ids=[" ".join(c[0]) for c in CONFIG_CASES])
def test_config_errors_are_one_line(overrides, expected, absent, code, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    rc, out, err = _cli("train", [*SMALL, f"hydra.run.dir={run}", *overrides], capsys, monkeypatch)
    line = _one_error_line(out, err)
    assert expected in line, line
    if absent:
        assert absent not in line.split(":", 2)[1], line
    assert rc == code
    assert not (run / "checkpoints").exists()  # refused before anything was built


def test_verbose_shows_the_traceback(tmp_path, capsys, monkeypatch):
    rc, out, err = _cli("train", [*SMALL, f"hydra.run.dir={tmp_path / 'run'}", "trainer.max_steps=0", "verbose=true"],
                        capsys, monkeypatch)
    assert rc == 2 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("error: trainer.max_steps=0")


def test_did_you_mean():
    assert did_you_mean("max_step", ["max_steps", "devices"]) == " (did you mean `max_steps`?)"
    assert did_you_mean("xyz", ["max_steps"]) == ""


def _resume_args(run: Path, *extra: str) -> list[str]:
    return [*SMALL, f"hydra.run.dir={run}", *extra]


@pytest.mark.parametrize(("extra", "expected"), [
    (["data.type_map=[Ni,Cu]"], ["data.type_map=[Ni,Cu] (the run's: [Cu,Ni])"]),
    (["model.descriptor.rcut=5.0", "model.precision=float32", "data.sel=[60,72]"],
     ["model.precision=float32 (the run's: float64)", "model.descriptor.rcut=5.0 (the run's: 6.0)",
      "data.sel=[60,72] (the run's: [72,72])"]),
    (["model.descriptor.type_one_side=false", "model.descriptor.exclude_types=[[0,1]]",
      "model.fitting_net.numb_fparam=1", "model.fitting_net.neuron=[16,8]", "model.descriptor.rcut_smth=0.6"],
     ["model.descriptor.type_one_side=false (the run's: true)", "model.descriptor.rcut_smth=0.6 (the run's: 0.5)",
      "model.descriptor.exclude_types=[[0,1]] (the run's: [])", "model.fitting_net.numb_fparam=1 (the run's: 0)",
      "model.fitting_net.neuron=[16,8] (the run's: [16,16])"]),
])
def test_resume_with_a_different_model_is_refused(extra, expected, trained, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = (run / "config.yaml").read_text()
    rc, out, err = _cli("train", _resume_args(run, "ckpt_path=last", "trainer.max_steps=6", *extra), capsys, monkeypatch)
    line = _one_error_line(out, err)
    assert rc == 2 and all(e in line for e in expected) and "ckpt_init=" in line, line
    assert (run / "config.yaml").read_text() == before and (run / "csv" / "metrics.csv").is_file()


def test_truncated_last_checkpoint_names_the_newest_readable(trained, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    (run / "checkpoints" / "step0000004.ckpt").write_bytes(b"garbage")  # the newest step file is bad too
    rc, out, err = _cli("train", _resume_args(run, "ckpt_path=last", "trainer.max_steps=6"), capsys, monkeypatch)
    line = _one_error_line(out, err)
    assert rc == 1 and "last.ckpt cannot be read" in line and "step0000002.ckpt (step 2)" in line, line
    assert (run / "csv" / "metrics.csv").is_file() and not (run / "csv" / "metrics.1.csv").exists()  # nothing renamed


def test_fresh_run_into_a_run_folder_is_refused(trained, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    lcurve = (run / "lcurve.out").read_text()
    for args in (["seed=7"], ["ckpt_init=" + str(run / "checkpoints" / "last.ckpt")]):
        rc, out, err = _cli("train", _resume_args(run, *args), capsys, monkeypatch)
        line = _one_error_line(out, err)
        assert rc == 1 and "already holds a run" in line and "ckpt_path=last" in line, line
    assert (run / "lcurve.out").read_text() == lcurve
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
        p.name for p in (trained / "checkpoints").iterdir())


def test_resume_from_another_folder_into_a_run_folder_is_refused(trained, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(trained, other)
    cfg = compose_train([*SMALL, "trainer.max_steps=6", f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}"], other)
    with pytest.raises(RunFolderError, match="already holds a run"):
        train(cfg)


def test_unwritable_run_folder_is_named(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc, out, err = _cli("train", [*SMALL, f"hydra.run.dir={blocker / 'run'}"], capsys, monkeypatch)
    line = _one_error_line(out, err)
    assert rc == 1 and str(blocker) in line, line


def test_run_folder_whose_log_cannot_be_written_is_named(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    (run / "train.log").mkdir(parents=True)  # Hydra's log file cannot be opened (as in a read-only folder)
    rc, out, err = _cli("train", [*SMALL, f"hydra.run.dir={run}"], capsys, monkeypatch)
    line = _one_error_line(out, err)
    assert rc == 1 and f"cannot write {run / 'train.log'}" in line and "hydra.run.dir" in line, line


def test_a_run_that_failed_before_its_first_step_can_be_rerun(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    rc, out, err = _cli("train", [*SMALL, f"hydra.run.dir={run}", "loss=relative_energy", "data.batch_size=1"],
                        capsys, monkeypatch)
    assert rc == 1 and "2+ frames" in _one_error_line(out, err)
    assert (run / "INCOMPLETE").is_file()
    rc, out, err = _cli("train", [*SMALL, f"hydra.run.dir={run}"], capsys, monkeypatch)
    assert rc == 0, err[-2000:]
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "INCOMPLETE").exists()


def test_test_and_freeze_errors_are_one_line(trained, tmp_path, capsys, monkeypatch):
    cases = [
        ("test", [f"ckpt_path={tmp_path / 'none.ckpt'}", "systems=[x]"], "none.ckpt: checkpoint not found", 1),
        ("test", [f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}", f"systems=[{tmp_path / 'nodata'}]", "kernels=off"],
         "nodata", 1),
        ("test", ["ckpt_pth=x", "systems=[x]"], "did you mean `ckpt_path`", 2),
        ("freeze", [f"ckpt_path={tmp_path / 'none.ckpt'}"], "none.ckpt: checkpoint not found", 1),
        ("freeze", [f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}", "precison=float32"],
         "did you mean `precision`", 2),
    ]
    for module, args, expected, code in cases:
        rc, out, err = _cli(module, [*args, f"hydra.run.dir={tmp_path / 'out'}"], capsys, monkeypatch)
        line = _one_error_line(out, err)
        assert rc == code and expected in line, (module, args, line)


# ----------------------------------------------------------------------------------------------------------------
# lock, numerical guards
# ----------------------------------------------------------------------------------------------------------------

def test_lock_refuses_a_second_run_and_is_released(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    with run_folder_lock(run) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(RunFolderError, match=f"in use by process {os.getpid()}"), run_folder_lock(run):
            pass
        rc, out, err = _cli("train", [*SMALL, f"hydra.run.dir={run}"], capsys, monkeypatch)
        assert rc == 1 and "is in use by process" in _one_error_line(out, err)
    assert not (run / LOCK).exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    import socket

    (run / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    train(compose_train(SMALL, run))
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / LOCK).exists()
    assert not (run / "INCOMPLETE").exists()


@pytest.fixture
def nan_force_term(monkeypatch):
    """The force term turns NaN from step 2 on (as a diverging run or a bad frame would make it)."""
    import dpfit.training.loss as loss_module

    fn, labels, relative = loss_module.TERMS["f"]
    calls = {"n": 0}

    def nan_after_two(pred, batch, nu=None):
        training = torch.is_grad_enabled() and pred["energy"].requires_grad  # (validations are not counted)
        calls["n"] += training
        value, rmse = fn(pred, batch, nu)
        return (value * float("nan"), rmse) if calls["n"] > 2 and training else (value, rmse)

    monkeypatch.setitem(loss_module.TERMS, "f", (nan_after_two, labels, relative))


def test_nonfinite_loss_stops_naming_step_system_frames_and_term(tmp_path, capsys, monkeypatch, nan_force_term):
    run = tmp_path / "run"
    rc, out, err = _cli("train", [*SMALL, f"hydra.run.dir={run}", "trainer.val_check_interval=100"], capsys, monkeypatch)
    line = _one_error_line(out, err)
    assert rc == 1 and "non-finite loss term(s) f at step 2, system " in line and "frames [" in line, line
    assert "Cu" in line and "nonfinite_loss=skip" in line
    assert "non-finite" in (run / "INCOMPLETE").read_text() and not (run / LOCK).exists()


def test_nonfinite_loss_skip_mode_counts_and_logs(tmp_path, caplog, nan_force_term):
    cfg = compose_train([*SMALL, "nonfinite_loss=skip", "trainer.val_check_interval=100", "summary=false"], tmp_path)
    with caplog.at_level("WARNING", logger="dpfit.training.module"):
        train(cfg)
    skipped = [r.getMessage() for r in caplog.records if "batch skipped" in r.getMessage()]
    assert len(skipped) == 2 and "at step 2" in skipped[0] and "(1 so far)" in skipped[0] and "(2 so far)" in skipped[1]
    # a skipped batch counts as a step but changes no weight
    step2, w2 = _state(tmp_path / "checkpoints" / "step0000002.ckpt")
    step4, w4 = _state(tmp_path / "checkpoints" / "last.ckpt")
    assert (step2, step4) == (2, 4)
    for k in w2:
        assert torch.equal(w2[k], w4[k]), k


def test_nonfinite_error_is_an_expected_error():
    assert issubclass(NonFiniteLossError, FloatingPointError)


# ----------------------------------------------------------------------------------------------------------------
# preemption: SIGTERM to a real training process
# ----------------------------------------------------------------------------------------------------------------

STEPS = 60


def _preempt_args() -> list[str]:
    return [*SMALL, f"trainer.max_steps={STEPS}", "trainer.val_check_interval=5", "trainer.log_every_n_steps=1",
            "callbacks.model_checkpoint.every_n_train_steps=1000", "data.epoch_length=7"]


def _state(ckpt: Path) -> tuple[int, dict]:
    c = torch.load(ckpt, map_location="cpu", weights_only=False)
    return c["global_step"], c["state_dict"]


def test_sigterm_saves_the_current_step_exits_143_and_resumes_exactly(tmp_path):
    run, full = tmp_path / "run", tmp_path / "full"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *_preempt_args(), f"hydra.run.dir={run}"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            lcurve = run / "lcurve.out"  # rows at steps 1 and 5: training is under way (no checkpoint before 1000)
            if lcurve.is_file() and len(lcurve.read_text().splitlines()) >= 3:
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.01)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    stopped_at, _ = _state(run / "checkpoints" / "last.ckpt")
    assert 5 <= stopped_at < STEPS
    line = err.rstrip().splitlines()[-1]
    assert line.startswith(f"error: stopped by SIGTERM at step {stopped_at}") and f"ckpt_path={run}`" in line, line
    assert "stopped by SIGTERM" in (run / "INCOMPLETE").read_text()
    assert not (run / LOCK).exists()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]  # saved at the stop, not periodically

    train(compose_train(_preempt_args(), full))
    train(compose_train([f"ckpt_path={run}"], run))  # the advice: the run folder alone, no override repeated
    step_full, w_full = _state(full / "checkpoints" / "last.ckpt")
    step_res, w_res = _state(run / "checkpoints" / "last.ckpt")
    assert step_full == step_res == STEPS
    for k in w_full:
        torch.testing.assert_close(w_res[k], w_full[k], rtol=1e-12, atol=1e-12, msg=k)
    assert not (run / "INCOMPLETE").exists()  # the resumed run finished
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "last.ckpt"  # no last-v1.ckpt
