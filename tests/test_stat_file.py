"""``data.stat_file``: the data statistics are computed once and read back by a restart or a sweep."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from conftest import tiny_config
from test_many_systems import write_tiny_systems

import dpfit.training.module as module_mod
from dpfit.data.datamodule import DeepmdDataModule
from dpfit.training.loss import EnergyLoss
from dpfit.training.module import DeepPotentialModule
from dpfit.training.schedule import ExponentialDecay


def _module(dm: DeepmdDataModule, **descriptor) -> DeepPotentialModule:
    config = tiny_config(**descriptor)
    config["type_map"] = ["O", "H"]
    module = DeepPotentialModule(model=config, loss=EnergyLoss(), schedule=ExponentialDecay(num_steps=10))
    module._trainer = SimpleNamespace(datamodule=dm, is_global_zero=True, world_size=1)
    return module


def test_stat_file_is_written_once_and_read_back(tmp_path, monkeypatch):
    write_tiny_systems(tmp_path / "data", 6)
    stat_file = tmp_path / "stats" / "stat.npz"
    dm = DeepmdDataModule(train_systems=[str(tmp_path / "data")], type_map=["O", "H"], rcut=4.0, sel=[12, 14],
                          batch_size=2, stat_file=str(stat_file))
    dm.setup("fit")
    calls = []
    real = module_mod.compute_statistics
    monkeypatch.setattr(module_mod, "compute_statistics", lambda *a, **k: (calls.append(1), real(*a, **k)))

    first = _module(dm)
    first.on_fit_start()
    assert len(calls) == 1 and stat_file.is_file()
    assert first.model.descriptor.dstd[0, 0, 0] != 1.0  # computed, not the defaults

    second = _module(dm)  # a restart: same data and descriptor
    assert not torch.equal(second.model.descriptor.davg, first.model.descriptor.davg)
    second.on_fit_start()
    assert len(calls) == 1  # read, not recomputed
    for name, buf in first.model.named_buffers():
        assert torch.equal(buf, dict(second.model.named_buffers())[name]), name

    other = _module(dm, rcut_smth=0.5)  # a sweep point with another descriptor: its own entry
    other.on_fit_start()
    assert len(calls) == 2
    with np.load(stat_file) as stored:
        keys = {k.split("/")[0] for k in stored.files if "/" in k}  # (and the file's dpfit_statistics mark)
    assert len(keys) == 2
    again = _module(dm)
    again.on_fit_start()
    assert len(calls) == 2  # the first entry is still there
