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

import numpy as np
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


# ----------------------------------------------------------------------------------------------------------------
# issue 25: trust nothing you load, lose nothing you write. One case per item (each failed before it).
# ----------------------------------------------------------------------------------------------------------------

class _Payload:
    """What a planted checkpoint carries: unpickling it runs code (here: creates a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def _safe_load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)  # the tests' own files: plain data


def _demo(part: str = "train") -> Path:
    from dpfit.data.demo import default_cache_dir, make_demo_dataset

    make_demo_dataset(default_cache_dir())
    return default_cache_dir() / part


def _copy_system(tmp_path: Path, name: str = "sys") -> Path:
    dst = tmp_path / name
    shutil.copytree(_demo() / "Cu16Ni16", dst)
    return dst


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder``: (content, mtime) by relative path."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


class Ctx:
    """What a case gets: the finished tiny run, a fresh folder, pytest's capture and monkeypatch."""

    def __init__(self, trained: Path, tmp_path: Path, capsys, monkeypatch, caplog) -> None:
        self.trained, self.tmp, self.capsys, self.monkeypatch, self.caplog = trained, tmp_path, capsys, monkeypatch, caplog

    def cli(self, module: str, args: list[str]) -> tuple[int, str, str]:
        return _cli(module, args, self.capsys, self.monkeypatch)

    def copy_run(self, name: str = "run") -> Path:
        run = self.tmp / name
        shutil.copytree(self.trained, run)
        return run


# -------------------------------------------------------------------------------------------------- item 1
def case_payload_never_runs(c: Ctx) -> None:
    """A checkpoint carrying code, given to every command and option that reads one: refused with one line
    naming the file and the type; the code never runs. A TorchScript archive is recognised before loading."""
    from dpfit.calculators import DPCalculator
    from dpfit.errors import CheckpointError

    marker = c.tmp / "MARKER"
    ckpt = _safe_load(c.trained / "checkpoints" / "last.ckpt")
    ckpt["hyper_parameters"]["planted"] = _Payload(marker)
    evil = c.tmp / "evil.ckpt"
    torch.save(ckpt, evil)
    val = _demo("val")
    commands = [("test", [f"ckpt_path={evil}", f"systems=[{val}]", "kernels=off"]),
                *[("freeze", [f"ckpt_path={evil}", f"output={c.tmp / f'out-{fmt}.pth'}", f"format={fmt}"])
                  for fmt in ("dpfit", "lammps", "deepmd")],
                ("train", [*SMALL, f"ckpt_init={evil}", f"hydra.run.dir={c.tmp / 'init'}"]),
                ("train", [*SMALL, f"ckpt_path={evil}", f"hydra.run.dir={c.tmp / 'resume'}"])]
    for module, args in commands:
        rc, out, err = c.cli(module, [*args, f"hydra.run.dir={c.tmp / 'x'}"] if module != "train" else args)
        line = _one_error_line(out, err)
        assert rc == 1 and str(evil) in line and "builtins.exec" in line, (module, args, line)
    # the newest readable checkpoint search, with last.ckpt truncated and the payload planted beside it
    run = c.copy_run()
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    shutil.copy(evil, run / "checkpoints" / "step0000009.ckpt")
    rc, out, err = c.cli("train", [f"ckpt_path={run}", "trainer.max_steps=6"])
    line = _one_error_line(out, err)
    assert rc == 1 and "last.ckpt cannot be read" in line and "step0000004.ckpt (step 4)" in line, line
    with pytest.raises(CheckpointError, match="builtins.exec"):
        DPCalculator(str(evil))
    # a TorchScript archive (a frozen model) as a checkpoint: its code is never loaded
    frozen = c.tmp / "frozen.pth"
    rc, out, err = c.cli("freeze", [f"ckpt_path={c.trained / 'checkpoints' / 'last.ckpt'}", f"output={frozen}",
                                    f"hydra.run.dir={c.tmp / 'x'}"])
    assert rc == 0, err[-2000:]
    c.monkeypatch.setattr(torch.jit, "load", lambda *a, **k: marker.write_text("torch.jit.load ran"))
    for module, args in (("test", [f"ckpt_path={frozen}", f"systems=[{val}]"]),
                         ("freeze", [f"ckpt_path={frozen}", f"output={c.tmp / 'again.pth'}"])):
        rc, out, err = c.cli(module, [*args, f"hydra.run.dir={c.tmp / 'x'}"])
        line = _one_error_line(out, err)
        assert rc == 1 and "TorchScript archive" in line and str(frozen) in line, line
    assert not marker.exists()


# -------------------------------------------------------------------------------------------------- item 2
def case_resume_from_the_run_folder_alone(c: Ctx) -> None:
    """``train.py ckpt_path=<run>``: the run's stored config (relative data paths stored absolute), from another
    directory, with a free override (trainer.max_steps); the run's .hydra/ is left as its first command wrote it."""
    (c.tmp / "work").mkdir()
    shutil.copytree(_demo(), c.tmp / "work" / "data")
    c.monkeypatch.chdir(c.tmp / "work")
    run = c.tmp / "run"
    args = [*SMALL, "data=deepmd", "data.train_systems=[data/Cu16Ni16]", "data.type_map=[Cu,Ni]", "data.sel=[72,72]",
            "data.val_systems=[data/Cu8Ni24]", "trainer.max_steps=2", f"hydra.run.dir={run}"]
    rc, out, err = c.cli("train", args)
    assert rc == 0, err[-2000:]
    hydra_files = _snapshot(run / ".hydra")
    c.monkeypatch.chdir(c.tmp)  # elsewhere: the relative paths were stored absolute
    rc, out, err = c.cli("train", [f"ckpt_path={run}", "trainer.max_steps=4"])
    assert rc == 0, err[-3000:]
    ckpt = _safe_load(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4
    assert ckpt["hyper_parameters"]["model_config"]["descriptor"]["neuron"] == [4, 8]  # the run's, not the defaults
    assert _snapshot(run / ".hydra") == hydra_files and not (run / "INCOMPLETE").exists()


def case_refused_resume_changes_nothing(c: Ctx) -> None:
    """An override that changes the model or the data is refused with one line (exit 2) before anything in the
    run folder changes (.hydra/ and train.log included)."""
    run = c.tmp / "run"
    rc, out, err = c.cli("train", [*SMALL, "trainer.max_steps=2", f"hydra.run.dir={run}"])
    assert rc == 0, err[-2000:]
    before = _snapshot(run)
    assert ".hydra/config.yaml" in before and "train.log" in before
    for extra in (["model.precision=float32"], ["data.type_map=[Ni,Cu]", "trainer.max_steps=3"], ["seed=3"]):
        rc, out, err = c.cli("train", [f"ckpt_path={run}", *extra])
        line = _one_error_line(out, err)
        assert rc == 2 and f"ckpt_path={run}" in line and "ckpt_init=" in line, line
        assert _snapshot(run) == before, extra
    rc, out, err = c.cli("train", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "model.precision=float32"])
    assert rc == 2 and "model.precision=float32 (the run's: float64)" in _one_error_line(out, err)
    assert _snapshot(run) == before


def case_extending_beyond_the_schedule_says_the_rate(c: Ctx) -> None:
    """Resuming a finished run to more steps says the learning rate the added steps train at and how to
    restart the schedule."""
    run = c.copy_run()
    with c.caplog.at_level("WARNING", logger="dpfit.train"):
        train(compose_train([f"ckpt_path={run}", "trainer.max_steps=6"], run))
    text = " ".join(r.getMessage() for r in c.caplog.records)
    assert "beyond this run's learning-rate schedule (schedule.num_steps=4" in text, text
    assert "steps 5-6 train at lr=3.51e-08" in text and "ckpt_init=" in text and "schedule.start_lr" in text, text
    assert _safe_load(run / "checkpoints" / "last.ckpt")["global_step"] == 6


def case_interrupted_before_the_first_checkpoint_continues(c: Ctx) -> None:
    """Ctrl-C (and, with its lock left behind, kill -9) before the first checkpoint: the advice printed and
    written to INCOMPLETE works."""
    import signal as signal_module

    from dpfit.training.module import DeepPotentialModule

    run = c.tmp / "run"
    args = [*SMALL, "trainer.max_steps=4", "callbacks.model_checkpoint.every_n_train_steps=1000",
            "callbacks.lcurve.disp_freq=1", f"hydra.run.dir={run}"]
    real = DeepPotentialModule.on_train_batch_end

    def interrupt(self, outputs, batch, batch_idx):
        real(self, outputs, batch, batch_idx)
        if self.global_step == 2:
            raise KeyboardInterrupt

    c.monkeypatch.setattr(DeepPotentialModule, "on_train_batch_end", interrupt)
    sigint = signal_module.getsignal(signal_module.SIGINT)
    try:
        rc, out, err = c.cli("train", args)
    finally:
        signal_module.signal(signal_module.SIGINT, sigint)  # Lightning ignores Ctrl-C once it has seen one
    c.monkeypatch.undo()
    line = _one_error_line(out, err)
    assert rc == 130 and "interrupted (Ctrl-C) at step 2" in line, line
    assert not any((run / "checkpoints").glob("*.ckpt")) and "2" in (run / "lcurve.out").read_text()
    advice = (run / "INCOMPLETE").read_text()
    import re
    import socket

    command = re.search(r"`python train.py (.*?)`", advice).group(1).split()
    assert command == [f"ckpt_path={run}"] and command[0] in line
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))  # as kill -9 leaves it
    rc, out, err = c.cli("train", command)
    assert rc == 0, err[-3000:]
    assert _safe_load(run / "checkpoints" / "last.ckpt")["global_step"] == 4 and not (run / "INCOMPLETE").exists()
    assert (run / "lcurve.out.superseded").is_file()  # the first attempt's rows, kept


# -------------------------------------------------------------------------------------------------- item 3
def case_final_numbers_are_honest(c: Ctx) -> None:
    """The end-of-run table says on how many frames it was computed, the last step validates every validation
    frame (periodic validations see 2 batches here), and lcurve.out has a row at step 1."""
    import csv

    c.capsys.readouterr()
    train(compose_train([*SMALL, "summary=true"], c.tmp))
    out = c.capsys.readouterr().out
    total = sum(int(np.load(p).shape[0]) for p in _demo("val").glob("*/set.*/energy.npy"))
    assert "Validation errors at step 4 (the last step)" in out and f"on all {total} validation frames" in out, out
    rows = [r.split() for r in (c.tmp / "lcurve.out").read_text().splitlines() if not r.startswith("#")]
    assert rows[0][0] == "1" and all(np.isfinite(float(x)) for x in rows[0])
    with open(c.tmp / "csv" / "metrics.csv") as fh:
        val = [r for r in csv.DictReader(fh) if r.get("val/rmse_f")]
    assert [int(r["step"]) for r in val] == [1, 2, 4]  # one row per validated step


# -------------------------------------------------------------------------------------------------- item 4
def _input_json(tmp: Path, **changes) -> Path:
    data = {"model": {"type_map": ["Cu", "Ni"], "descriptor": {"type": "se_e2_a", "sel": [72, 72], "rcut": 6.0,
                                                                "neuron": [4, 8], "axis_neuron": 4},
                      "fitting_net": {"neuron": [8, 8]}},
            "learning_rate": {"start_lr": 1e-3, "stop_lr": 1e-5},
            "loss": {"type": "ener"},
            "training": {"training_data": {"systems": [str(_demo() / "Cu16Ni16")]}, "numb_steps": 2}}
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp / "input.json"
    path.write_text(json.dumps(data))
    return path


def case_unimplemented_deepmd_types_are_refused(c: Ctx) -> None:
    """deepmd_input= with a descriptor, fitting or loss type dpfit does not implement: exit 2, one line."""
    for key, value in (("model__descriptor__type", "se_atten"), ("model__fitting_net__type", "dipole"),
                       ("loss__type", "ener_spin")):
        path = _input_json(c.tmp, **{key: value})
        rc, out, err = c.cli("train", [f"deepmd_input={path}", "kernels=off", "~callbacks.progress_bar",
                                       f"hydra.run.dir={c.tmp / 'run'}"])
        line = _one_error_line(out, err)
        assert rc == 2 and f"{key.replace('__', '.')}={value!r}" in line and str(path) in line, line
        assert not (c.tmp / "run").exists()
        from dpfit.io.deepmd_input import UnimplementedTypeError, convert_input

        with pytest.raises(UnimplementedTypeError):  # the preset script refuses it too
            convert_input(json.loads(path.read_text()))


def case_transposed_force_and_coord_are_named(c: Ctx) -> None:
    """force.npy stored (3N, nframes) is refused like (nframes, 3, N); a transposed coord.npy names coord.npy."""
    from dpfit.data.system import DataError, Needs, load_systems

    needs = Needs(frozenset({"energy", "force"}))
    for name in ("force", "coord"):
        sys_dir = _copy_system(c.tmp, f"{name}_t")
        file = sys_dir / "set.000" / f"{name}.npy"
        np.save(file, np.load(file).T.copy())
        with pytest.raises(DataError, match=rf"{name}\.npy: shape \(96, 75\) looks transposed"):
            load_systems([sys_dir], ["Cu", "Ni"], needs)


def case_nonfinite_statistics_stop_before_the_first_step(c: Ctx) -> None:
    """Atoms on top of each other (the distance check off): non-finite davg/dstd stop the run before its first
    step, naming the system."""
    sys_dir = _copy_system(c.tmp, "dup")
    file = sys_dir / "set.000" / "coord.npy"
    coord = np.load(file)
    coord[:, 3:6] = coord[:, 0:3]
    np.save(file, coord)
    rc, out, err = c.cli("train", [*SMALL, "data=deepmd", f"data.train_systems=[{sys_dir}]", "data.type_map=[Cu,Ni]",
                                   "data.sel=[72,72]", "data.min_distance=0", f"hydra.run.dir={c.tmp / 'run'}"])
    line = _one_error_line(out, err)
    assert rc == 1 and str(sys_dir) in line and "statistics davg, dstd are not finite" in line, line
    assert not (c.tmp / "run" / "checkpoints").exists() and "step 0" in (c.tmp / "run" / "INCOMPLETE").read_text()


def case_skip_mode_never_exits_0_when_most_batches_were_skipped(c: Ctx) -> None:
    """nonfinite_loss=skip that skipped most of the run's batches ends with exit 1, not 0."""
    import dpfit.training.loss as loss_module

    fn, labels, relative = loss_module.TERMS["f"]

    def always_nan(pred, batch, nu=None):
        value, rmse = fn(pred, batch, nu)
        return (value * float("nan"), rmse) if pred["energy"].requires_grad else (value, rmse)

    c.monkeypatch.setitem(loss_module.TERMS, "f", (always_nan, labels, relative))
    rc, out, err = c.cli("train", [*SMALL, "nonfinite_loss=skip", f"hydra.run.dir={c.tmp / 'run'}"])
    line = _one_error_line(out, err)
    assert rc == 1 and "4 of the 4 training steps of this run were skipped" in line, line


def case_stat_file_is_safe_and_keyed_by_content(c: Ctx) -> None:
    """data.stat_file never replaces a file that is not a dpfit statistics file; the cache key follows the
    data's content, not only its path."""
    from dpfit.data.datamodule import DeepmdDataModule

    other = c.tmp / "energy.npy"
    np.save(other, np.arange(3.0))
    before = other.read_bytes()
    rc, out, err = c.cli("train", [*SMALL, f"data.stat_file={other}", f"hydra.run.dir={c.tmp / 'run'}"])
    line = _one_error_line(out, err)
    assert rc == 2 and f"data.stat_file={other}" in line and "never replaced" in line, line
    assert other.read_bytes() == before
    sys_dir = _copy_system(c.tmp, "data")

    def identity():
        dm = DeepmdDataModule(train_systems=[str(sys_dir)], type_map=["Cu", "Ni"], sel=[72, 72], batch_size=2,
                              data_stat_nbatch=2)
        dm.setup("fit")
        return dm.stat_identity()

    first = identity()
    file = sys_dir / "set.000" / "energy.npy"
    np.save(file, np.load(file) + 1.0)  # the same files, other energies
    assert identity() != first


def case_test_and_freeze_options_are_validated(c: Ctx) -> None:
    """test.py and freeze.py check their options as train.py does: one line naming the key, exit 2."""
    ckpt = c.trained / "checkpoints" / "last.ckpt"
    cases = [("test", [f"ckpt_path={ckpt}", f"systems=[{_demo('val')}]", "precision=float16"], "precision=float16"),
             ("freeze", [f"ckpt_path={ckpt}", f"output={c.tmp / 'm.pth'}", "precision=float16"], "precision=float16"),
             ("test", [f"ckpt_path={ckpt}", f"systems=[{_demo('val')}]", "impl=slow"], "impl=slow")]
    if not torch.cuda.is_available():
        cases.append(("test", [f"ckpt_path={ckpt}", f"systems=[{_demo('val')}]", "device=cuda"],
                      "device=cuda: CUDA is not available"))
    for module, args, expected in cases:
        rc, out, err = c.cli(module, [*args, f"hydra.run.dir={c.tmp / 'x'}"])
        line = _one_error_line(out, err)
        assert rc == 2 and expected in line, (module, line)
    assert not (c.tmp / "m.pth").exists()


def case_a_failed_write_keeps_the_previous_checkpoint(c: Ctx) -> None:
    """A checkpoint that cannot be written (here: the file-size limit, EFBIG; a full disk is the same path):
    one line naming the file, the previous checkpoint intact, INCOMPLETE saying how to continue, which works."""
    import resource
    import signal as signal_module

    from dpfit.training.module import DeepPotentialModule

    run = c.tmp / "run"
    real = DeepPotentialModule.on_train_batch_end
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    size = (c.trained / "checkpoints" / "step0000002.ckpt").stat().st_size

    def shrink_the_disk(self, outputs, batch, batch_idx):
        real(self, outputs, batch, batch_idx)
        if self.global_step == 3:  # after the step-2 checkpoint: files may no longer grow past half of one
            resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, limits[1]))

    c.monkeypatch.setattr(DeepPotentialModule, "on_train_batch_end", shrink_the_disk)
    xfsz = signal_module.signal(signal_module.SIGXFSZ, signal_module.SIG_IGN)
    try:
        rc, out, err = c.cli("train", [*SMALL, f"hydra.run.dir={run}"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal_module.signal(signal_module.SIGXFSZ, xfsz)
    c.monkeypatch.undo()
    line = _one_error_line(out, err)
    assert rc == 1 and f"cannot write {run / 'checkpoints' / 'step0000004.ckpt'}: file too large" in line, line
    assert "(step 2) is intact" in line and f"ckpt_path={run}`" in line, line
    assert _safe_load(run / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert not list((run / "checkpoints").glob(".*partial"))
    assert f"ckpt_path={run}`" in (run / "INCOMPLETE").read_text()
    rc, out, err = c.cli("train", [f"ckpt_path={run}"])
    assert rc == 0, err[-3000:]
    assert _safe_load(run / "checkpoints" / "last.ckpt")["global_step"] == 4


# -------------------------------------------------------------------------------------------------- item 5
def case_weak_cases_have_one_line(c: Ctx) -> None:
    """batch_size / val_batch_size named apart, val_fraction=1, ckpt_init with another architecture naming the
    key, an unlabelled extxyz validation set, an lcurve.out outside the run folder, freeze.py writing over its
    own checkpoint or a folder."""
    import ase.io
    from ase.build import bulk

    ckpt = c.trained / "checkpoints" / "last.ckpt"
    before = ckpt.read_bytes()
    xyz = c.tmp / "val.xyz"
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    atoms.symbols[::2] = "Ni"
    ase.io.write(xyz, [atoms, atoms], format="extxyz")
    no_neuron = [a for a in SMALL if not a.startswith("model.descriptor.neuron")]
    cases = [
        ("train", [*SMALL, "data.val_batch_size=0"], "data.val_batch_size=0", 2),
        ("train", [*SMALL, "data.batch_size=auto:x"], "data.batch_size=auto:x", 2),
        ("train", [*SMALL, "data.val_fraction=1.0", "data.val_systems=null"], "data.val_fraction=1.0", 2),
        ("train", [*no_neuron, "model.descriptor.neuron=[8,16]", f"ckpt_init={ckpt}"],
         "model.descriptor.neuron=[8,16] (ckpt_init: [4,8])", 1),
        ("train", [*SMALL, f"data.val_systems=[{xyz}]"], f"{xyz}: a validation system without labels", 1),
        ("train", [*SMALL, "callbacks.lcurve.filename=../lcurve.out"], "callbacks.lcurve.filename=../lcurve.out", 2),
        ("freeze", [f"ckpt_path={ckpt}", f"output={ckpt}", "overwrite=true"], "is the checkpoint being read", 1),
        ("freeze", [f"ckpt_path={ckpt}", f"output={c.tmp}", "overwrite=true"], "is a folder", 1),
    ]
    for k, (module, args, expected, code) in enumerate(cases):
        rc, out, err = c.cli(module, [*args, f"hydra.run.dir={c.tmp / f'run{k}'}"])
        line = _one_error_line(out, err)
        assert rc == code and expected in line, (args, line)
    assert ckpt.read_bytes() == before and not (c.tmp / "lcurve.out").exists()


def case_weak_cases_that_now_work(c: Ctx) -> None:
    """An empty or garbage lock file (a process killed while taking it), val_fraction=0 (no validation, said
    so), trainer.enable_progress_bar=false, ${...} in an input.json's strings (taken literally)."""
    from dpfit.cli.deepmd import expand_deepmd_input

    for k, text in enumerate(("", "garbage")):
        run = c.tmp / f"locked{k}"
        run.mkdir()
        (run / LOCK).write_text(text)
        os.utime(run / LOCK, (time.time() - 60, time.time() - 60))
        with run_folder_lock(run):
            pass
        assert not (run / LOCK).exists()
    c.capsys.readouterr()
    train(compose_train([*SMALL, "data=deepmd", f"data.train_systems=[{_copy_system(c.tmp)}]", "data.type_map=[Cu,Ni]",
                         "data.sel=[72,72]", "data.val_fraction=0"], c.tmp / "noval"))
    assert "no validation frames" in c.capsys.readouterr().out
    bar = [a for a in SMALL if a != "~callbacks.progress_bar"]
    rc, out, err = c.cli("train", [*bar, "trainer.enable_progress_bar=false", f"hydra.run.dir={c.tmp / 'nobar'}"])
    assert rc == 0, err[-2000:]
    literal = c.tmp / "sys_${oc.env:HOME}"  # a folder whose name looks like an interpolation
    shutil.copytree(_demo() / "Cu16Ni16", literal)
    path = _input_json(c.tmp, training__training_data__systems=[str(literal)])
    overrides = [a for a in expand_deepmd_input([f"deepmd_input={path}"]) if not a.startswith("hydra.")]
    cfg = compose_train(overrides, c.tmp / "literal")
    from omegaconf import OmegaConf

    assert OmegaConf.to_container(cfg.data, resolve=True)["train_systems"] == [str(literal)]


def case_sigterm_before_training(c: Ctx) -> None:
    """SIGTERM before training starts (here: while the data is read): one line, exit 143, INCOMPLETE with the
    way to continue, the lock released; the advice works."""
    run = c.tmp / "run"
    script = ("import os, signal, sys\n"
              "import dpfit.data.datamodule as dm\n"
              "real = dm.DeepmdDataModule.setup\n"
              "def setup(self, stage=None):\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    return real(self, stage)\n"
              "dm.DeepmdDataModule.setup = setup\n"
              "from dpfit.cli.train import main\n"
              "sys.argv = ['train.py', *sys.argv[1:]]\n"
              "main()\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-c", script, *SMALL, f"hydra.run.dir={run}"], cwd=c.tmp, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, proc.stderr[-3000:]
    line = proc.stderr.rstrip().splitlines()[-1]
    assert line.startswith("error: stopped by SIGTERM before training started") and f"ckpt_path={run}`" in line, line
    assert f"ckpt_path={run}`" in (run / "INCOMPLETE").read_text() and not (run / LOCK).exists()
    rc, out, err = c.cli("train", [f"ckpt_path={run}"])
    assert rc == 0, err[-3000:]


# -------------------------------------------------------------------------------------------------- item 6
def case_min_nbor_dist_reaches_the_deepmd_checkpoint(c: Ctx) -> None:
    """The training data's smallest interatomic distance is computed when the run starts, stored in the
    checkpoint and written by freeze.py format=deepmd, so dp --pt compress needs nothing else."""
    from ase import Atoms

    stored = _safe_load(c.trained / "checkpoints" / "last.ckpt")["min_nbor_dist"]
    expected = np.inf
    for sys_dir in sorted(_demo().glob("*")):
        types = np.loadtxt(sys_dir / "type.raw", dtype=int)
        for coord, box in zip(np.load(sys_dir / "set.000" / "coord.npy"), np.load(sys_dir / "set.000" / "box.npy")):
            atoms = Atoms(numbers=types + 1, positions=coord.reshape(-1, 3), cell=box.reshape(3, 3), pbc=True)
            d = atoms.get_all_distances(mic=True)
            expected = min(expected, d[~np.eye(len(atoms), dtype=bool)].min())
    assert stored == pytest.approx(expected, rel=1e-12)
    out = c.tmp / "model.ckpt.pt"
    rc, _, err = c.cli("freeze", [f"ckpt_path={c.trained / 'checkpoints' / 'last.ckpt'}", f"output={out}",
                                  "format=deepmd", f"hydra.run.dir={c.tmp / 'x'}"])
    assert rc == 0, err[-2000:]
    assert float(_safe_load(out)["model"]["model.Default.min_nbor_dist"]) == pytest.approx(expected, rel=1e-12)


ISSUE25 = [
    ("1-payload-and-torchscript-never-run", case_payload_never_runs),
    ("2-resume-from-the-run-folder-alone", case_resume_from_the_run_folder_alone),
    ("2-refused-resume-changes-nothing", case_refused_resume_changes_nothing),
    ("2-beyond-the-schedule", case_extending_beyond_the_schedule_says_the_rate),
    ("2-interrupted-before-the-first-checkpoint", case_interrupted_before_the_first_checkpoint_continues),
    ("3-final-numbers", case_final_numbers_are_honest),
    ("4-unimplemented-deepmd-types", case_unimplemented_deepmd_types_are_refused),
    ("4-transposed-force-and-coord", case_transposed_force_and_coord_are_named),
    ("4-nonfinite-statistics", case_nonfinite_statistics_stop_before_the_first_step),
    ("4-skip-mode-mostly-skipped", case_skip_mode_never_exits_0_when_most_batches_were_skipped),
    ("4-stat-file", case_stat_file_is_safe_and_keyed_by_content),
    ("4-test-freeze-options", case_test_and_freeze_options_are_validated),
    ("4-failed-write", case_a_failed_write_keeps_the_previous_checkpoint),
    ("5-weak-cases-one-line", case_weak_cases_have_one_line),
    ("5-weak-cases-that-work", case_weak_cases_that_now_work),
    ("5-sigterm-before-training", case_sigterm_before_training),
    ("6-min-nbor-dist", case_min_nbor_dist_reaches_the_deepmd_checkpoint),
]


@pytest.mark.parametrize("case", [c for _, c in ISSUE25], ids=[name for name, _ in ISSUE25])
def test_issue25(case, trained, tmp_path, capsys, monkeypatch, caplog):
    case(Ctx(trained, tmp_path, capsys, monkeypatch, caplog))
