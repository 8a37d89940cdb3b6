"""Optional callbacks (parity plots and per-element errors, EMA of the weights, early stopping) and
learning-rate scaling with the number of workers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import lightning as L
import pytest
import torch
from hydra_utils import FAST, compose_train

from dpfit.cli.train import build, train
from dpfit.training.dashboard import ValidationPlots


def _fast(**changes) -> list[str]:
    """FAST with some keys replaced (Hydra refuses a key given twice)."""
    keys = {a.split("=")[0]: a for a in FAST}
    keys.update({k: f"{k}={v}" for k, v in changes.items()})
    return list(keys.values())


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


# ----------------------------------------------------------------------------- dashboard
def test_per_element_force_rmse_and_parity_plot_by_hand(tmp_path):
    logged = {}
    module = SimpleNamespace(model=SimpleNamespace(type_map=["Cu", "Ni"]),
                             log=lambda name, value, **kw: logged.__setitem__(name, value))
    trainer = SimpleNamespace(sanity_checking=False, world_size=1, is_global_zero=True, global_step=7,
                              default_root_dir=str(tmp_path), loggers=[])
    cb = ValidationPlots()
    cb.on_validation_epoch_start(trainer, module)
    g = torch.Generator().manual_seed(0)
    errors = {0: [], 1: []}
    for b in range(3):
        atype = torch.tensor([[0, 1, 1, 0, 1]] * 2)
        label = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
        pred = label + 0.1 * (b + 1) * torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
        batch = {"natoms": 5, "atype": atype, "force": label, "energy": torch.randn(2, generator=g),
                 "find_energy": 1.0, "find_force": 1.0}
        cb.on_validation_batch_end(trainer, module, {"force": pred, "energy": batch["energy"] + 0.5}, batch, b)
        for t in (0, 1):
            errors[t].append((pred - label)[atype == t].reshape(-1))
    cb.on_validation_epoch_end(trainer, module)
    for t, name in enumerate(["Cu", "Ni"]):
        expected = float(torch.cat(errors[t]).pow(2).mean().sqrt())
        assert logged[f"val/rmse_f_{name}"] == pytest.approx(expected, rel=1e-12)
    assert (tmp_path / "plots" / "parity_0000007.png").stat().st_size > 10_000


def test_dashboard_run_writes_plots_and_element_errors(tmp_path):
    cfg = compose_train(["callbacks=dashboard", *FAST], tmp_path)
    train(cfg)
    assert (tmp_path / "plots" / "parity_0000003.png").is_file()
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/rmse_f_Cu", "val/rmse_f_Ni", "val/rmse_f"} <= set(header)


def test_callback_options_combine(tmp_path):
    cfg = compose_train(["callbacks=[ema,early_stopping,dashboard]"], tmp_path)
    assert {"model_checkpoint", "lcurve", "ema", "early_stopping", "validation_plots"} <= set(cfg.callbacks)
    assert cfg.callbacks.early_stopping.monitor == "val/rmse_f"


# ----------------------------------------------------------------------------- EMA
class WeightProbe(L.Callback):
    """Keeps the raw weights after every optimizer step (class attribute: read back by the test)."""

    steps: ClassVar[list[dict]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        WeightProbe.steps.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def test_ema_weights_are_validated_and_saved(tmp_path):
    WeightProbe.steps = []
    decay = 0.5
    cfg = compose_train(["callbacks=ema", f"callbacks.ema.decay={decay}",
                         "+callbacks.probe._target_=test_callbacks_scale.WeightProbe",
                         *_fast(**{"trainer.max_steps": 4, "trainer.val_check_interval": 2,
                                   "callbacks.model_checkpoint.every_n_train_steps": 2})], tmp_path)
    train(cfg)
    raw = WeightProbe.steps
    assert len(raw) == 4
    ema = {n: w.clone() for n, w in raw[0].items()}  # the first update copies
    for step in raw[1:]:
        ema = {n: decay * ema[n] + (1 - decay) * step[n] for n in ema}
    ckpt = _ckpt(tmp_path / "checkpoints" / "last.ckpt")  # written at step 4, before the end of training
    for n in ema:
        torch.testing.assert_close(ckpt["state_dict"][n], ema[n], rtol=1e-12, atol=1e-15, msg=n)
        torch.testing.assert_close(ckpt["current_model_state"][n], raw[-1][n], rtol=0, atol=0, msg=n)
    assert any(not torch.equal(ema[n], raw[-1][n]) for n in ema)
    # data statistics are copied, not averaged
    davg = "model.descriptor.davg"
    assert torch.equal(ckpt["state_dict"][davg], ckpt["current_model_state"][davg])


def test_ema_resume_matches_uninterrupted_run(tmp_path):
    common = ["callbacks=ema", "callbacks.ema.decay=0.7", "schedule.num_steps=4",
              *_fast(**{"trainer.val_check_interval": 2, "callbacks.model_checkpoint.every_n_train_steps": 2})]
    train(compose_train([*common, "trainer.max_steps=4"], tmp_path / "full"))
    train(compose_train([*common, "trainer.max_steps=2"], tmp_path / "a"))
    resume = f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}"
    train(compose_train([*common, "trainer.max_steps=4", resume], tmp_path / "b"))
    full = _ckpt(tmp_path / "full" / "checkpoints" / "last.ckpt")
    res = _ckpt(tmp_path / "b" / "checkpoints" / "last.ckpt")
    for key in ("state_dict", "current_model_state"):
        for n, w in full[key].items():
            if torch.is_tensor(w) and w.is_floating_point():
                torch.testing.assert_close(res[key][n], w, rtol=1e-12, atol=1e-14, msg=f"{key} {n}")


# ----------------------------------------------------------------------------- early stopping
def test_early_stopping_on_force_rmse(tmp_path):
    # min_delta this large: no validation after the first counts as an improvement
    cfg = compose_train(["callbacks=early_stopping", "callbacks.early_stopping.patience=1",
                         "callbacks.early_stopping.min_delta=1e9",
                         *_fast(**{"trainer.max_steps": 20, "trainer.val_check_interval": 2})], tmp_path)
    train(cfg)  # validations at step 1 (lcurve.out's first row) and 2: the second does not improve
    assert _ckpt(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2
    rows = [r for r in (tmp_path / "lcurve.out").read_text().splitlines() if not r.startswith("#")]
    assert [int(r.split()[0]) for r in rows] == [1, 2]


# ----------------------------------------------------------------------------- scale_by_worker
@pytest.mark.parametrize(("mode", "factor"), [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_scale_by_worker(tmp_path, mode, factor):
    cfg = compose_train([*FAST, f"scale_by_worker={mode}", "schedule.start_lr=0.002"], tmp_path)
    _, module, _ = build(cfg)
    module.trainer = SimpleNamespace(world_size=4)
    opt = module.configure_optimizers()["optimizer"]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.002 * factor)
    module.trainer = SimpleNamespace(world_size=1)
    assert module.configure_optimizers()["optimizer"].param_groups[0]["lr"] == pytest.approx(0.002)


def test_step_timer_counts_fetch_and_excludes_validation(monkeypatch, tmp_path):
    """Steps are timed end to end (batch fetch included), validation time is taken out."""
    import time
    from types import SimpleNamespace

    from dpfit.training.callbacks import StepTimer

    clock = iter([0.0, 1.0, 3.0, 3.5, 13.5, 15.5]).__next__
    monkeypatch.setattr(time, "perf_counter", clock)
    timer = StepTimer(skip=0)
    trainer = SimpleNamespace(global_step=1, default_root_dir=str(tmp_path), is_global_zero=True)
    timer.on_train_batch_end(trainer, None, None, None, 0)  # t=0: first end, nothing timed
    timer.on_train_batch_end(trainer, None, None, None, 1)  # t=1: a 1 s step
    timer.on_validation_start(trainer, None)  # t=3
    timer.on_validation_end(trainer, None)  # t=3.5: 0.5 s of validation
    timer.on_train_batch_end(trainer, None, None, None, 2)  # t=13.5: 12.5 s, less 0.5 s validation
    timer.on_train_batch_end(trainer, None, None, None, 3)  # t=15.5: a 2 s step
    assert timer.count == 3
    assert abs(timer.total - (1.0 + 12.0 + 2.0)) < 1e-12


# ----------------------------------------------------------------------------- data loader workers
@pytest.mark.parametrize(("device", "devices", "cores", "expect"), [
    ("cpu", 1, 16, (0, False)),    # a CPU run: the model's threads use the cores
    ("cuda", 1, 16, (4, True)),    # one GPU: up to 4 workers, pinned memory
    ("cuda", 4, 8, (1, True)),     # 4 GPU processes share 8 cores: 2 each, one kept for the process
    ("cuda", 8, 8, (0, True)),
])
def test_auto_loader_workers(monkeypatch, device, devices, cores, expect):
    from dpfit.data.datamodule import DeepmdDataModule

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    dm = DeepmdDataModule(train_systems=["x"], type_map=["O", "H"])
    assert dm.loader_settings() == (0, False)  # no trainer
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), num_devices=devices)
    assert dm.loader_settings() == expect
    dm = DeepmdDataModule(train_systems=["x"], type_map=["O", "H"], num_workers=2, pin_memory=False)
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), num_devices=devices)
    assert dm.loader_settings() == (2, False)  # explicit values win


@pytest.mark.parametrize(("key", "value"), [("num_workers", -1), ("num_workers", "many"), ("pin_memory", "yes")])
def test_bad_loader_settings_are_refused(key, value):
    from dpfit.data.datamodule import DeepmdDataModule

    with pytest.raises(ValueError, match=f"data.{key}"):
        DeepmdDataModule(train_systems=["x"], type_map=["O", "H"], **{key: value})
