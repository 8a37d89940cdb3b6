"""data.sel=auto: neighbour counts of the training data (as DeePMD-kit's neighbor-stat) and its sel rounding."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_random_frame
from hydra_utils import FAST, compose_train
from omegaconf import OmegaConf

from dpfit.cli.deepmd import resolve_auto_sel
from dpfit.data.neighbor_stat import auto_sel, neighbor_stat, parse_auto_sel, wrap_up_4
from dpfit.data.system import load_systems
from dpfit.neighbor_stat import main as neighbor_stat_main

RCUT = 4.0


def _write_system(folder: Path, frames: list, type_map=("A", "B")) -> Path:
    """A deepmd/npy system of frames (coord, atype, box) sharing atype."""
    (folder / "set.000").mkdir(parents=True)
    atype = frames[0][1]
    (folder / "type.raw").write_text("\n".join(map(str, atype)) + "\n")
    (folder / "type_map.raw").write_text("\n".join(type_map) + "\n")
    np.save(folder / "set.000" / "coord.npy", np.stack([c.reshape(-1) for c, _, _ in frames]))
    if frames[0][2] is not None:
        np.save(folder / "set.000" / "box.npy", np.stack([b.reshape(-1) for _, _, b in frames]))
    else:
        (folder / "nopbc").write_text("")
    np.save(folder / "set.000" / "energy.npy", np.zeros(len(frames)))
    np.save(folder / "set.000" / "force.npy", np.zeros((len(frames), len(atype) * 3)))
    return folder


def _brute_force_most(frames: list, rcut: float, ntypes: int) -> np.ndarray:
    """Most neighbours per type: every atom, every periodic image in a 7^3 block (self at zero shift excluded)."""
    most = np.zeros(ntypes, dtype=int)
    for coord, atype, box in frames:
        shifts = [np.zeros(3)] if box is None else [np.array(s) @ box for s in itertools.product(range(-3, 4), repeat=3)]
        for i in range(len(coord)):
            counts = np.zeros(ntypes, dtype=int)
            for s in shifts:
                d = np.linalg.norm(coord + s - coord[i], axis=-1)
                for j in np.nonzero(d < rcut)[0]:
                    if not (j == i and not np.any(s)):
                        counts[atype[j]] += 1
            most = np.maximum(most, counts)
    return most


@pytest.fixture(scope="module")
def systems(tmp_path_factory) -> tuple[Path, list]:
    """Two periodic systems (small triclinic cells: atoms see their own images) and one non-periodic."""
    root = tmp_path_factory.mktemp("nstat")
    all_frames = []
    for k, (natoms, periodic) in enumerate([(6, True), (9, True), (7, False)]):
        frames = [make_random_frame(seed=10 * k + f, natoms=natoms, periodic=periodic, min_dist=1.0) for f in range(3)]
        atype = frames[0][1]
        frames = [(c, atype, b) for c, _, b in frames]
        _write_system(root / f"sys{k}", frames)
        all_frames += frames
    return root, all_frames


def test_counts_match_brute_force(systems):
    root, frames = systems
    stat = neighbor_stat(load_systems([root], ["A", "B"]), RCUT, 2)
    expected = _brute_force_most(frames, RCUT, 2)
    assert stat.max_nbor == expected.tolist()
    assert expected.max() > 5  # more than any system holds of one type: periodic images are counted
    assert stat.nframes == 9
    dmin = min(np.min(np.where(np.eye(len(c), dtype=bool), np.inf,
                               np.linalg.norm(c[:, None] - c[None], axis=-1))) for c, _, b in frames if b is None)
    assert stat.min_dist <= dmin + 1e-12


def test_deepmd_rounding():
    assert parse_auto_sel("auto") == 1.1 and parse_auto_sel("auto:1.25") == 1.25 and parse_auto_sel([4, 4]) is None
    # int(n * ratio), rounded up to a multiple of 4 (DeePMD-kit's wrap_up_4)
    assert [wrap_up_4(x) for x in (0, 1, 4, 4.9, 5, 8.0)] == [0, 4, 4, 4, 8, 8]
    assert auto_sel([38, 72], 1.1) == [44, 80]  # DeePMD-kit's water example (neighbor-stat gives [38, 72])
    assert auto_sel([40, 41], 1.0) == [40, 44]
    for bad in ("automatic", "auto:x", "auto:-1", "auto:1:2"):
        with pytest.raises(ValueError, match="data.sel"):
            parse_auto_sel(bad)


def test_auto_sel_in_the_config_and_from_a_checkpoint(systems, tmp_path, caplog):
    root, frames = systems
    cfg = compose_train(["data=deepmd", f"data.train_systems=[{root}]", "data.type_map=[A,B]", "data.sel=auto:1.5",
                         f"model.descriptor.rcut={RCUT}", "model.descriptor.rcut_smth=1.0"], tmp_path)
    with caplog.at_level("INFO", logger="dpfit.train"):
        sel = resolve_auto_sel(cfg)
    expected = auto_sel(_brute_force_most(frames, RCUT, 2).tolist(), 1.5)
    assert sel == expected and list(cfg.data.sel) == expected and list(cfg.model.descriptor.sel) == expected
    assert f"-> {expected}" in caplog.text  # printed
    # a resume takes the checkpoint's sel without counting
    ckpt = tmp_path / "fake.ckpt"
    torch.save({"hyper_parameters": {"model_config": {"descriptor": {"sel": [12, 16]}}}}, ckpt)
    cfg2 = compose_train(["data=deepmd", "data.train_systems=[/does/not/exist]", "data.type_map=[A,B]"], tmp_path)
    assert cfg2.data.sel == "auto"  # the default of data=deepmd
    assert resolve_auto_sel(cfg2, str(ckpt)) == [12, 16] and list(cfg2.model.descriptor.sel) == [12, 16]


def test_neighbor_stat_command(systems, capsys):
    root, frames = systems
    assert neighbor_stat_main([f"systems=[{root}]", f"rcut={RCUT}", "type_map=[A,B]"]) == 0
    out = capsys.readouterr().out
    expected = _brute_force_most(frames, RCUT, 2).tolist()
    assert f"at most {expected[0]} A, {expected[1]} B" in out
    assert out.strip().endswith(f"data.sel=[{','.join(map(str, auto_sel(expected)))}]")
    assert neighbor_stat_main(["system=[x]"]) == 2
    assert "error: system=[x]" in capsys.readouterr().err


def test_train_with_sel_auto_stores_it(systems, tmp_path):
    """A short run with the default sel (auto): config.yaml and the checkpoint hold the counted sel."""
    from dpfit.cli.train import train

    root, frames = systems
    cfg = compose_train(["data=deepmd", f"data.train_systems=[{root}]", "data.type_map=[A,B]", "kernels=off",
                         f"model.descriptor.rcut={RCUT}", "model.descriptor.rcut_smth=1.0", *FAST], tmp_path)
    train(cfg)
    expected = auto_sel(_brute_force_most(frames, RCUT, 2).tolist())
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert list(saved.data.sel) == expected and list(saved.model.descriptor.sel) == expected
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["model_config"]["descriptor"]["sel"] == expected


def test_auto_sel_counts_the_water_data_and_fine_tuning_keeps_the_initial_models(shared_dir, water_fixture, tmp_path):
    water = shared_dir / "data" / "water"
    cfg = compose_train(["data=deepmd", f"data.train_systems=[{water / 'data_0'}]", "data.type_map=[O,H]"], tmp_path)
    counted = resolve_auto_sel(cfg)
    stat = neighbor_stat(load_systems([water / "data_0"], ["O", "H"]), 6.0, 2)
    assert counted == auto_sel(stat.max_nbor) and stat.max_nbor[0] < stat.max_nbor[1]
    cfg = compose_train(["data=deepmd", f"data.train_systems=[{water / 'data_0'}]", "data.type_map=[O,H]",
                         f"ckpt_init={water_fixture / 'model.ckpt.pt'}"], tmp_path)
    assert resolve_auto_sel(cfg) == [46, 92]  # the DeePMD-kit model's sel, not a recount
