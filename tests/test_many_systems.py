"""Thousands of systems: opening holds no file per system, frames go through a bounded LRU of open files,
symbolic links are followed, and the statistics sample is bounded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpfit.data.datamodule import DeepmdDataModule
from dpfit.data.system import find_systems, load_systems

REPO = Path(__file__).resolve().parents[1]


def write_tiny_systems(root: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` one-frame water-molecule systems (O, H, H in a 5 Å box), with energy and forces."""
    rng = np.random.default_rng(seed)
    base = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    box = (np.eye(3) * 5.0).reshape(1, 9)
    paths = []
    for k in range(n):
        path = root / f"sys{k:05d}"
        (path / "set.000").mkdir(parents=True)
        (path / "type.raw").write_text("0\n1\n1\n")
        (path / "type_map.raw").write_text("O\nH\n")
        coord = base + rng.uniform(0, 5.0, size=3) + rng.normal(scale=0.05, size=(3, 3))
        np.save(path / "set.000" / "coord.npy", coord.reshape(1, 9))
        np.save(path / "set.000" / "box.npy", box)
        np.save(path / "set.000" / "energy.npy", np.array([-14.0 + rng.normal(scale=0.1)]))
        np.save(path / "set.000" / "force.npy", rng.normal(scale=0.5, size=(1, 9)))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("many")
    write_tiny_systems(root / "data", 2000)
    return root / "data"


TRAIN_3_STEPS = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
sys.argv = ["train.py", *sys.argv[1:]]
from dpfit.cli.train import main
main()
"""


def test_2000_systems_train_under_ulimit_256(many, tmp_path):
    """2,000 one-frame systems train 3 steps with at most 256 open files (each system has 4 .npy files)."""
    out = tmp_path / "run"
    args = ["data=deepmd", f"data.train_systems=[{many}]", "data.type_map=[O,H]", "data.sel=[4,8]",
            "model.descriptor.rcut=3.0", "model.descriptor.rcut_smth=0.5", "model.descriptor.neuron=[4,8]",
            "model.descriptor.axis_neuron=4", "model.fitting_net.neuron=[8,8]", "kernels=off",
            "data.data_stat_max_frames=200", "trainer.max_steps=3", "trainer.val_check_interval=3",
            "trainer.limit_val_batches=2", "~callbacks.progress_bar", "~callbacks.lcurve_plot",
            "trainer.enable_model_summary=false", f"hydra.run.dir={out}"]
    proc = subprocess.run([sys.executable, "-c", TRAIN_3_STEPS, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in (out / "lcurve.out").read_text().splitlines() if r.strip() and not r.startswith("#")]
    assert rows and rows[-1].split()[0] == "3"
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert "2000 training systems" in proc.stderr + proc.stdout or "1800 training systems" in proc.stderr + proc.stdout


def test_symlinked_systems_are_found_once(tmp_path):
    real = tmp_path / "real"
    write_tiny_systems(real, 3)
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(real, target_is_directory=True)
    (root / "one").symlink_to(real / "sys00001", target_is_directory=True)
    (real / "loop").symlink_to(root, target_is_directory=True)  # a cycle must not recurse forever
    found = find_systems(root)
    # every real system once, through the links (sys00001 is reached twice: counted once)
    assert sorted(p.resolve().name for p in found) == ["sys00000", "sys00001", "sys00002"]
    assert all(p.is_relative_to(root) for p in found)
    assert len(load_systems([root], ["O", "H"])) == 3


def test_statistics_sample_is_bounded_and_covers_compositions(tmp_path):
    water = write_tiny_systems(tmp_path / "w", 30)
    # a second composition: OH (2 atoms), only 3 systems of it
    for k in range(3):
        path = tmp_path / "oh" / f"oh{k}"
        (path / "set.000").mkdir(parents=True)
        (path / "type.raw").write_text("0 1\n")
        np.save(path / "set.000" / "coord.npy", np.array([[1.0, 1.0, 1.0, 1.97, 1.0, 1.0 + 0.1 * k]]))
        np.save(path / "set.000" / "box.npy", (np.eye(3) * 5.0).reshape(1, 9))
        np.save(path / "set.000" / "energy.npy", np.array([-8.0]))
    dm = DeepmdDataModule(train_systems=[str(tmp_path / "w"), str(tmp_path / "oh")], type_map=["O", "H"],
                          rcut=3.0, sel=[4, 8], batch_size=1, val_fraction=0.0, data_stat_nbatch=10,
                          data_stat_max_frames=5)
    dm.setup("fit")
    assert len(dm.train_views) == 33 and len(water) == 30
    plan = dm.stat_plan()
    assert sum(len(f) for _, f in plan) == 5
    natoms = {dm.train_views[s].system.natoms for s, _ in plan}
    assert natoms == {2, 3}  # both compositions in the sample
    assert plan == dm.stat_plan()  # seeded
    batches = dm.stat_batches()
    assert len(batches) == 5


def test_one_frame_systems_validate_whole_systems(tmp_path):
    write_tiny_systems(tmp_path / "d", 20)
    dm = DeepmdDataModule(train_systems=[str(tmp_path / "d")], type_map=["O", "H"], rcut=3.0, sel=[4, 8],
                          batch_size=1, val_fraction=0.1)
    dm.setup("fit")
    train = {v.system.name for v in dm.train_views}
    val = {v.system.name for v in dm.val_views}
    assert len(val) == 2 and len(train) == 18 and not train & val
