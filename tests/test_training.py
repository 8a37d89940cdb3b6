"""Training: losses by hand, prefactor and learning-rate schedules, batching rules, train runs, resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hydra_utils import FAST, SHARED, compose_train

from dpfit.cli.train import train
from dpfit.data.sampler import SystemView, resolve_batch_size, system_probabilities
from dpfit.training.loss import EnergyLoss
from dpfit.training.schedule import ExponentialDecay


# ----------------------------------------------------------------------------- losses
def _batch(nf=3, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    pred = {"energy": r(nf), "force": r(nf, n, 3), "virial": r(nf, 9), "atom_energy": r(nf, n)}
    batch = {"energy": r(nf), "force": r(nf, n, 3), "virial": r(nf, 9), "atom_ener": r(nf, n),
             "atom_pref": r(nf, n).abs(), "natoms": n}
    for k in ("energy", "force", "virial", "atom_ener", "atom_pref"):
        batch[f"find_{k}"] = 1.0
    return pred, batch


def _only(term: str, **kw) -> EnergyLoss:
    args = {f"{p}_pref_{t}": 0.0 for t in ("e", "f", "v", "ae", "de", "pf") for p in ("start", "limit")}
    args[f"start_pref_{term}"] = args[f"limit_pref_{term}"] = 1.0
    return EnergyLoss(**args, **kw)


def test_each_loss_term_matches_hand_computation():
    pred, b = _batch()
    p, n = {k: v.numpy() for k, v in pred.items()}, 4
    lab = {k: (v.numpy() if torch.is_tensor(v) else v) for k, v in b.items()}
    de = p["energy"] - lab["energy"]
    pairs = [(a, c) for a in range(3) for c in range(a + 1, 3)]
    fnorm = np.linalg.norm(lab["force"], axis=-1, keepdims=True)
    expected = {
        "e": np.mean(de**2) / n,
        "f": np.mean((p["force"] - lab["force"]) ** 2),
        "v": np.mean((p["virial"] - lab["virial"]) ** 2) / n,
        "ae": np.mean((p["atom_energy"] - lab["atom_ener"]) ** 2),
        "de": np.mean([(de[a] - de[c]) ** 2 for a, c in pairs]) / n,
        "pf": np.mean(lab["atom_pref"][..., None] * (p["force"] - lab["force"]) ** 2),
    }
    for term, value in expected.items():
        total, logs = _only(term)(pred, b, lr_ratio=0.3)
        assert float(total) == pytest.approx(value, rel=1e-12), term
    nu = 0.7
    total, _ = _only("f", relative_f=nu)(pred, b, lr_ratio=1.0)
    rel = (p["force"] - lab["force"]) / (fnorm + nu)
    assert float(total) == pytest.approx(np.mean(rel**2), rel=1e-12)


def test_relative_energy_ignores_constant_offset_and_needs_two_frames():
    pred, b = _batch()
    loss = _only("de")
    base, _ = loss(pred, b, 1.0)
    b2 = dict(b, energy=b["energy"] + 123.0)
    shifted, _ = loss(pred, b2, 1.0)
    assert float(shifted) == pytest.approx(float(base), rel=1e-10)
    pred1 = {k: v[:1] for k, v in pred.items()}
    b1 = {k: (v[:1] if torch.is_tensor(v) else v) for k, v in b.items()}
    with pytest.raises(ValueError, match="at least 2 frames"):
        loss(pred1, b1, 1.0)


def test_missing_label_drops_term_and_combination_sums():
    pred, b = _batch()
    loss = EnergyLoss(start_pref_e=2.0, limit_pref_e=1.0, start_pref_f=10.0, limit_pref_f=1.0,
                      start_pref_v=3.0, limit_pref_v=1.0)
    lr_ratio = 0.25
    total, logs = loss(pred, b, lr_ratio)
    pe, pf, pv = 1 + (2 - 1) * lr_ratio, 1 + (10 - 1) * lr_ratio, 1 + (3 - 1) * lr_ratio
    assert logs["pref_e"] == pytest.approx(pe) and logs["pref_f"] == pytest.approx(pf)
    hand = pe * logs["l2_e"] + pf * logs["l2_f"] + pv * logs["l2_v"]
    assert float(total) == pytest.approx(float(hand), rel=1e-12)
    total_nov, logs_nov = loss(pred, dict(b, find_virial=0.0), lr_ratio)
    assert "l2_v" not in logs_nov
    assert float(total_nov) == pytest.approx(float(hand - pv * logs["l2_v"]), rel=1e-12)


def test_all_zero_prefactors_refused():
    with pytest.raises(ValueError, match="every loss prefactor is zero"):
        EnergyLoss(start_pref_e=0, limit_pref_e=0, start_pref_f=0, limit_pref_f=0)


# ----------------------------------------------------------------------------- schedules
def test_learning_rate_matches_deepmd_water_run():
    s = ExponentialDecay(start_lr=1e-3, stop_lr=3.51e-8, decay_steps=100, num_steps=3000)
    assert s.decay_rate == pytest.approx((3.51e-8 / 1e-3) ** (100 / 3000))
    assert s.decay_rate == pytest.approx(0.7104, abs=1e-4)
    # DeePMD's lcurve row for step s shows lr(s - 1)
    assert s.lr(249) == pytest.approx(5.0e-4, rel=0.02)
    assert s.lr(999) == pytest.approx(4.6e-5, rel=0.02)
    assert s.lr(2999) == pytest.approx(4.9e-8, rel=0.02)
    assert s.lr(10**7) == pytest.approx(3.51e-8)
    assert s.lr(0) == 1e-3 and s.lr(99) == 1e-3 and s.lr(100) == pytest.approx(1e-3 * s.decay_rate)


def test_decay_steps_reset_and_warmup():
    assert ExponentialDecay(decay_steps=5000, num_steps=3000).decay_steps == 100
    assert ExponentialDecay(decay_steps=5000, num_steps=500).decay_steps == 6
    assert ExponentialDecay(decay_steps=5000, num_steps=1000).decay_steps == 11
    assert ExponentialDecay(decay_steps=50, num_steps=1000).decay_steps == 50
    w = ExponentialDecay(start_lr=1e-3, stop_lr=1e-5, decay_steps=10, num_steps=110, warmup_steps=10,
                         warmup_start_factor=0.1)
    assert w.lr(0) == pytest.approx(1e-4) and w.lr(5) == pytest.approx(5.5e-4)
    assert w.lr(10) == pytest.approx(1e-3) and w.lr(20) == pytest.approx(1e-3 * w.decay_rate)


def test_prefactor_follows_learning_rate():
    s = ExponentialDecay(start_lr=1e-3, stop_lr=1e-6, decay_steps=10, num_steps=100)
    loss = EnergyLoss(start_pref_e=0.02, limit_pref_e=1.0, start_pref_f=1000.0, limit_pref_f=1.0)
    pred, b = _batch()
    for t in (0, 15, 55, 99):
        _, logs = loss(pred, b, s(t))
        lr = s.lr(t)
        assert logs["pref_f"] == pytest.approx(1.0 + (1000.0 - 1.0) * lr / 1e-3)
        assert logs["pref_e"] == pytest.approx(1.0 + (0.02 - 1.0) * lr / 1e-3)


# ----------------------------------------------------------------------------- batching rules
def test_batch_size_rules():
    assert resolve_batch_size("auto", 192) == 1
    assert resolve_batch_size("auto", 10) == 4
    assert resolve_batch_size("auto:100", 30) == 4
    assert resolve_batch_size(3, 1000) == 3
    with pytest.raises(ValueError):
        resolve_batch_size("many", 3)


class _Sys:
    def __init__(self, n):
        self.nframes = n


def test_system_probabilities():
    views = [SystemView(_Sys(n), np.arange(n), 2) for n in (10, 30, 20, 40)]
    np.testing.assert_allclose(system_probabilities(views, "prob_sys_size"), np.array([5, 15, 10, 20]) / 50)
    np.testing.assert_allclose(system_probabilities(views, "prob_uniform"), [0.25] * 4)
    p = system_probabilities(views, "prob_sys_size;0:2:0.7;2:4:0.3")
    np.testing.assert_allclose(p, [0.7 * 5 / 20, 0.7 * 15 / 20, 0.3 * 10 / 30, 0.3 * 20 / 30])
    np.testing.assert_allclose(system_probabilities(views, sys_probs=[1, 1, 2, 0]), [0.25, 0.25, 0.5, 0])


# ----------------------------------------------------------------------------- runs
@pytest.mark.parametrize("loss", ["ener", "relative_force", "atom_pref", "relative_energy", "virial"])
def test_train_each_loss_on_demo(tmp_path, loss):
    cfg = compose_train([f"loss={loss}", *FAST], tmp_path)
    value = train(cfg)
    assert value is not None and math.isfinite(value)
    assert (tmp_path / "lcurve.out").read_text().startswith("#")
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "config.yaml").is_file()


def test_relative_energy_with_single_frame_batches_refused(tmp_path):
    cfg = compose_train(["loss=relative_energy", "data.batch_size=1", *FAST], tmp_path)
    with pytest.raises(ValueError, match="2\\+ frames"):
        train(cfg)


def test_water_experiment_runs(tmp_path):
    if not (SHARED / "data" / "water").is_dir():
        pytest.skip("../shared/data/water not available")
    cfg = compose_train(["experiment=water_se_e2_a", f"paths.data_root={SHARED / 'data' / 'water'}",
                         "trainer.max_steps=20", "trainer.val_check_interval=10", "data.data_stat_nbatch=2",
                         "~callbacks.progress_bar"], tmp_path)
    assert cfg.model.descriptor.sel == [46, 92] and cfg.schedule.decay_steps == 5000
    value = train(cfg)
    assert math.isfinite(value)
    rows = [r for r in (tmp_path / "lcurve.out").read_text().splitlines() if not r.startswith("#")]
    assert [int(r.split()[0]) for r in rows] == [1, 10, 20]  # step 1 too, as DeePMD-kit 3.2 writes


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_resume_reaches_same_weights(tmp_path):
    common = [*FAST, "trainer.val_check_interval=2", "callbacks.model_checkpoint.every_n_train_steps=3"]
    full = compose_train([*common, "trainer.max_steps=6", "schedule.num_steps=6"], tmp_path / "full")
    train(full)
    first = compose_train([*common, "trainer.max_steps=3", "schedule.num_steps=6"], tmp_path / "a")
    train(first)
    resumed = compose_train([*common, "trainer.max_steps=6", "schedule.num_steps=6",
                             f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}"], tmp_path / "b")
    train(resumed)
    w_full = _weights(tmp_path / "full" / "checkpoints" / "last.ckpt")
    w_res = _weights(tmp_path / "b" / "checkpoints" / "last.ckpt")
    assert w_full.keys() == w_res.keys()
    for k in w_full:
        torch.testing.assert_close(w_res[k], w_full[k], rtol=1e-12, atol=1e-14, msg=k)
    # statistics were restored, not recomputed, and training moved the weights
    w_a = _weights(tmp_path / "a" / "checkpoints" / "last.ckpt")
    assert torch.equal(w_a["model.descriptor.davg"], w_res["model.descriptor.davg"])
    assert not torch.equal(w_a["model.fitting.nets.0.layers.0.matrix"], w_res["model.fitting.nets.0.layers.0.matrix"])


def test_too_small_sel_is_reported_before_training(tmp_path, caplog):
    cfg = compose_train(["data.sel=[20,20]", *FAST, "trainer.max_steps=1"], tmp_path)
    with caplog.at_level("WARNING", logger="dpfit.training.module"):
        train(cfg)
    messages = [r.getMessage() for r in caplog.records if "beyond sel" in r.getMessage()]
    assert messages and "sel=[20, 20]" in messages[0] and "consider data.sel=" in messages[0]


def test_step_values_logged_only_when_loggers_write(tmp_path, monkeypatch):
    """The per-step training values go through ``self.log`` only on the steps Lightning's loggers write
    (every ``trainer.log_every_n_steps``); they still reach the CSV log at those steps."""
    import lightning

    calls = []
    original = lightning.LightningModule.log

    def counting(self, name, *args, **kwargs):
        calls.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(lightning.LightningModule, "log", counting)
    cfg = compose_train([*FAST, "trainer.max_steps=10", "trainer.val_check_interval=10", "trainer.log_every_n_steps=5",
                         "logger=csv"], tmp_path)
    train(cfg)
    assert calls.count("train/loss") == 2
    logged = sorted(tmp_path.rglob("metrics.csv"))
    assert logged, "no CSV log"
    header, *rows = logged[0].read_text().splitlines()
    column = header.split(",").index("train/loss")
    assert sum(1 for r in rows if r.split(",")[column]) == 2
