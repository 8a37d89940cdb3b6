"""Data-parallel training: rank batches, gradient averaging, synced validation, one run folder, lr scaling.

The end-to-end check runs ``python train.py trainer=ddp_cpu trainer.devices=2`` (2 gloo processes) and
the same config in one process with ``trainer.accumulate_grad_batches=2``: rank r of step t trains on
batch 2t + r, which is micro-batch 2t + r of the single process, so the global batch of every step is
the same. DDP sums the ranks' gradients and divides by 2; Lightning divides each micro-batch loss by 2
before backward: the gradients at each optimizer step must agree to round-off. A probe callback
(``GradientProbe``, imported by the subprocesses from this file) records per rank the frames and loss
of every batch, the gradients before every optimizer step, the data statistics and the validation
metrics.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra.types import RunMode
from hydra.utils import instantiate
from hydra_utils import FAST, REPO, compose_train
from lightning.pytorch.strategies import DDPStrategy

import dpfit.cli.train as cli_train
from dpfit.data.sampler import EvalBatchSampler


# ----------------------------------------------------------------------------- helpers
class GradientProbe(L.Callback):
    """Writes ``<folder>/probe_rank<r>.pt``: batches (system, frames, loss), gradients at each optimizer step,
    the model's buffers (data statistics) at the start, the lr and the validation metrics."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.rec: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.rec = {
            "world": trainer.world_size,
            "buffers": {n: b.detach().cpu().clone() for n, b in pl_module.model.named_buffers()},
            "lr": [g["lr"] for g in trainer.optimizers[0].param_groups],
            "batches": [], "grads": [], "val": [],
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Lightning hands back the loss divided by accumulate_grad_batches (a power of 2 here: exact)
        loss = float(outputs["loss"]) * trainer.accumulate_grad_batches
        self.rec["batches"].append((int(batch["system"]), tuple(batch["frame_index"].tolist()), loss))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.rec["grads"].append({n: p.grad.detach().cpu().clone() for n, p in pl_module.named_parameters()
                                  if p.grad is not None})

    def on_validation_end(self, trainer, pl_module) -> None:
        self.rec["val"].append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})

    def on_train_end(self, trainer, pl_module) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.rec, self.folder / f"probe_rank{trainer.global_rank}.pt")


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HYDRA_FULL_ERROR="1",
                PYTHONPATH=os.pathsep.join(p for p in (str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p),
                WANDB_MODE="offline", WANDB_DISABLE_CODE="true", WANDB_DISABLE_GIT="true", WANDB_SILENT="true")


def _train(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _fast(**changes) -> list[str]:
    """FAST with some keys replaced (Hydra refuses a key given twice)."""
    keys = {a.split("=")[0]: a for a in FAST}
    keys.update({k: f"{k}={v}" for k, v in changes.items()})
    return list(keys.values())


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_ddp_equals_gradient_accumulation_and_writes_one_run_folder(tmp_path):
    common = _fast(**{"trainer.max_steps": 2, "trainer.limit_val_batches": 1.0}) + [
        "data.numb_btch=3",  # 9 validation batches: 5 on rank 0, 4 on rank 1
        "callbacks=dashboard",  # per-element errors and plots from the frames of all ranks
        "+callbacks.probe._target_=test_ddp.GradientProbe",
    ]
    common = [a for a in common if not a.startswith("trainer.val_check_interval=")]
    # the default run folder outputs/<date>/<time> under cwd
    _train(["trainer=ddp_cpu", "trainer.devices=2", *common, "trainer.val_check_interval=2",
            f"+callbacks.probe.folder={tmp_path / 'p_ddp'}"], cwd=tmp_path / "ddp")
    # Lightning's val_check_interval counts batches, not optimizer steps: 4 batches = 2 steps here
    _train(["trainer=cpu", "trainer.accumulate_grad_batches=2", *common, "trainer.val_check_interval=4",
            f"+callbacks.probe.folder={tmp_path / 'p_one'}", f"hydra.run.dir={tmp_path / 'one'}"], cwd=tmp_path)

    # exactly one run folder, written once
    runs = [p for p in (tmp_path / "ddp" / "outputs").rglob("*") if p.is_dir() and (p / ".hydra").is_dir()]
    assert len(runs) == 1, runs
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["outputs"]
    run = runs[0]
    for name in ("config.yaml", "lcurve.out", "checkpoints/last.ckpt", "csv/metrics.csv", ".hydra/config.yaml",
                 "plots/parity_0000002.png"):
        assert (run / name).is_file(), name
    assert (run / "train.log").read_text().count("data statistics computed") == 1  # both ranks log here
    lcurve = (run / "lcurve.out").read_text().splitlines()
    assert sum(r.startswith("#") for r in lcurve) == 1 and len(lcurve) == 3  # steps 1 and 2

    r0, r1 = (torch.load(tmp_path / "p_ddp" / f"probe_rank{r}.pt", weights_only=False) for r in (0, 1))
    one = torch.load(tmp_path / "p_one" / "probe_rank0.pt", weights_only=False)
    assert r0["world"] == r1["world"] == 2 and one["world"] == 1

    # statistics: computed once (rank 0) and broadcast, equal to the single process's
    for name, value in one["buffers"].items():
        assert torch.equal(r0["buffers"][name], value) and torch.equal(r1["buffers"][name], value), name
    assert r0["lr"] == r1["lr"] == one["lr"]  # scale_by_worker=none

    # rank r, step t trains on the single process's micro-batch 2t + r: different frames per rank
    assert len(one["batches"]) == 4 and len(r0["batches"]) == len(r1["batches"]) == 2
    for t in range(2):
        for r, rec in enumerate((r0, r1)):
            system, frames, loss = rec["batches"][t]
            system1, frames1, loss1 = one["batches"][2 * t + r]
            assert (system, frames) == (system1, frames1)
            assert loss == pytest.approx(loss1, rel=1e-10)
        assert r0["batches"][t][:2] != r1["batches"][t][:2]

    # gradients: DDP's average over ranks == accumulation over the same global batch
    assert len(r0["grads"]) == len(r1["grads"]) == len(one["grads"]) == 2
    for t in range(2):
        assert r0["grads"][t].keys() == one["grads"][t].keys()
        for name, g in one["grads"][t].items():
            torch.testing.assert_close(r0["grads"][t][name], r1["grads"][t][name], rtol=0, atol=0, msg=name)
            torch.testing.assert_close(r0["grads"][t][name], g, rtol=1e-10, atol=1e-13, msg=name)
        assert any(g.abs().max() > 0 for g in one["grads"][t].values())

    # validation (steps 1 and 2): every frame once over the ranks, metrics synced (same on both ranks, same as
    # one process)
    assert len(r0["val"]) == len(r1["val"]) == len(one["val"]) == 2
    for v0, v1, v in zip(r0["val"], r1["val"], one["val"]):
        assert v0 == v1
        assert {"val/loss", "val/rmse_e", "val/rmse_f", "val/mae_f", "val/rmse_f_Cu", "val/rmse_f_Ni"} <= v.keys()
        assert v.keys() == v0.keys()
        for k in v:
            assert v0[k] == pytest.approx(v[k], rel=1e-5), k


# ----------------------------------------------------------------------------- batches and frames
def _steps(dm, world: int, accumulate: int, nsteps: int) -> list[list[tuple]]:
    """The batches of each optimizer step over all ranks, iterating like Lightning (epochs restart the
    sampler at the trainer's step)."""
    per_step: list[list[tuple]] = [[] for _ in range(nsteps)]
    for rank in range(world):
        trainer = SimpleNamespace(global_rank=rank, world_size=world, accumulate_grad_batches=accumulate,
                                  global_step=0)
        dm.trainer = trainer
        sampler = dm.train_dataloader().batch_sampler
        micro = 0
        while trainer.global_step < nsteps:
            for batch in sampler:
                per_step[trainer.global_step].append(tuple(batch))
                micro += 1
                if micro % accumulate == 0:
                    trainer.global_step += 1
                    if trainer.global_step == nsteps:
                        break
    dm.trainer = None
    return [sorted(s) for s in per_step]


def test_rank_batches_make_the_same_global_batches_as_accumulation(tmp_path):
    cfg = compose_train([*FAST, "data.epoch_length=5"], tmp_path)  # short epochs: restarts mid-run
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    nsteps = 7
    ddp2 = _steps(dm, world=2, accumulate=1, nsteps=nsteps)
    assert all(len(s) == 2 for s in ddp2)
    assert ddp2 == _steps(dm, world=1, accumulate=2, nsteps=nsteps)
    ddp2_acc2 = _steps(dm, world=2, accumulate=2, nsteps=nsteps)
    assert ddp2_acc2 == _steps(dm, world=1, accumulate=4, nsteps=nsteps)
    assert ddp2_acc2 == _steps(dm, world=4, accumulate=1, nsteps=nsteps)
    # consecutive batch numbers: different frames across ranks and steps
    flat = [b for s in ddp2 for b in s]
    assert len(set(flat)) > len(flat) // 2


def test_validation_frames_split_over_ranks_once():
    views = [SimpleNamespace(indices=list(range(n)), batch_size=b) for n, b in ((7, 2), (5, 1), (3, 3))]
    whole = list(EvalBatchSampler(views))
    for world in (2, 3, 4):
        parts = [list(EvalBatchSampler(views, None, r, world)) for r in range(world)]
        assert sorted(b for p in parts for b in p) == sorted(whole)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


# ----------------------------------------------------------------------------- configs and launch guards
@pytest.mark.parametrize("option", ["default", "cpu", "gpu", "ddp", "ddp_cpu"])
def test_trainers_plan_their_own_distributed_batches(tmp_path, option):
    cfg = compose_train([f"trainer={option}"], tmp_path)
    assert cfg.trainer.use_distributed_sampler is False


def test_ddp_cpu_trainer(tmp_path):
    cfg = compose_train(["trainer=ddp_cpu", *FAST], tmp_path)
    _, _, trainer = cli_train.build(cfg)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.strategy._process_group_backend == "gloo"
    assert trainer.num_devices == 2 and trainer.world_size == 2
    assert trainer._accelerator_connector.use_distributed_sampler is False
    assert cfg.trainer.strategy.find_unused_parameters  # a batch without some element leaves its net unused


def test_launches_that_would_split_the_run_folder_are_refused(tmp_path, monkeypatch):
    cfg = compose_train(["trainer=ddp_cpu", *FAST], tmp_path)
    _, _, trainer = cli_train.build(cfg)
    # a local multirun: Lightning would re-run the whole sweep in each extra process
    monkeypatch.setattr(cli_train, "_hydra_state", lambda: (RunMode.MULTIRUN, []))
    with pytest.raises(ValueError, match="local multirun"):
        cli_train._check_launch(cfg, trainer)
    # a single run started by Lightning itself: fine
    monkeypatch.setattr(cli_train, "_hydra_state", lambda: (RunMode.RUN, []))
    cli_train._check_launch(cfg, trainer)
    # torchrun / srun: every process composed its own folder
    monkeypatch.setenv("LOCAL_RANK", "0")  # Lightning: processes started externally
    _, _, trainer = cli_train.build(cfg)
    assert trainer.strategy.cluster_environment.creates_processes_externally
    with pytest.raises(ValueError, match="hydra.run.dir"):
        cli_train._check_launch(cfg, trainer)
    monkeypatch.setattr(cli_train, "_hydra_state", lambda: (RunMode.RUN, [f"hydra.run.dir={tmp_path}"]))
    cli_train._check_launch(cfg, trainer)
    # ckpt_path=last needs the run folder
    monkeypatch.delenv("LOCAL_RANK")
    cfg.ckpt_path = "last"
    monkeypatch.setattr(cli_train, "_hydra_state", lambda: (RunMode.RUN, []))
    with pytest.raises(ValueError, match="ckpt_path=last"):
        cli_train._check_launch(cfg, trainer)


def test_torchrun_without_run_folder_is_stopped_before_hydra(monkeypatch):
    env = {"TORCHELASTIC_RUN_ID": "x", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)  # what torchrun sets
    assert cli_train.external_world_size() == 2
    with pytest.raises(SystemExit, match="hydra.run.dir"):
        cli_train.refuse_split_run_folder(["trainer=ddp_cpu"])
    cli_train.refuse_split_run_folder(["trainer=ddp_cpu", "hydra.run.dir=outputs/x"])
    cli_train.refuse_split_run_folder(["-m", "trainer=ddp_cpu"])
    monkeypatch.setenv("WORLD_SIZE", "1")
    cli_train.refuse_split_run_folder(["trainer=ddp_cpu"])


@pytest.mark.slow
def test_torchrun_shares_one_run_folder(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file():
        pytest.skip("torchrun not installed beside python")
    run = tmp_path / "run"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(REPO / "train.py"),
                           "trainer=ddp_cpu", "trainer.devices=2", *FAST, f"hydra.run.dir={run}"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "lcurve.out").is_file()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
