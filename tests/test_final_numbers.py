"""Final numbers are final: validation at the last step, the end-of-run table and metrics.csv name it,
lcurve.out rows every disp_freq steps, resumes without duplicated rows, named validation sets."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
from hydra_utils import FAST, compose_train

from dpfit.cli.deepmd import _value
from dpfit.cli.train import train

pytestmark = pytest.mark.usefixtures("single_torch_thread")

QUICK = [*FAST, "kernels=off", "trainer.log_every_n_steps=1"]


def _csv(run: Path) -> list[dict]:
    with open(run / "csv" / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def _lcurve(run: Path) -> tuple[list[str], list[list[float]]]:
    lines = (run / "lcurve.out").read_text().splitlines()
    header = lines[0].lstrip("#").split()
    return header, [[float(x) for x in r.split()] for r in lines[1:]]


def _val_rows(rows: list[dict], key: str = "val/rmse_f") -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def test_last_step_is_validated_and_named_in_table_csv_and_lcurve(tmp_path, capsys):
    """max_steps=5 with validation every 3 steps: validated at 1 (DeePMD-kit's first lcurve row), 3 and 5 (the
    last); lcurve rows every 2 steps plus the validations, validation columns nan where none ran."""
    cfg = compose_train([*QUICK, "trainer.max_steps=5", "trainer.val_check_interval=3", "callbacks.lcurve.disp_freq=2"],
                        tmp_path)
    value = train(cfg)
    out = capsys.readouterr().out
    assert "Validation errors at step 5 (the last step)" in out
    val = _val_rows(_csv(tmp_path))
    assert sorted(val) == [1, 3, 5]
    assert value == pytest.approx(val[5], rel=1e-6)
    table_rmse_f = re.search(r"force \[eV/Å\]\s*│\s*(\S+)", out).group(1)
    assert table_rmse_f == f"{val[5]:.4e}"  # the table is metrics.csv's row of step 5
    header, rows = _lcurve(tmp_path)
    assert header[:8] == ["step", "rmse_val", "rmse_trn", "rmse_e_val", "rmse_e_trn", "rmse_f_val", "rmse_f_trn", "lr"]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5]
    f_val = {int(r[0]): r[header.index("rmse_f_val")] for r in rows}
    assert math.isnan(f_val[2]) and math.isnan(f_val[4])
    assert all(f_val[k] == pytest.approx(val[k], rel=1e-2) for k in (1, 3, 5))
    assert all(math.isfinite(r[header.index("rmse_f_trn")]) and r[header.index("lr")] > 0 for r in rows)
    assert (tmp_path / "lcurve.png").is_file()


def test_resume_appends_lcurve_without_duplicated_steps(tmp_path):
    """A run killed after its step-4 checkpoint, with rows up to step 6 written: resuming from step 4 writes
    steps 5 and 6 once; the rows they replace are kept in lcurve.out.superseded."""
    common = [*QUICK, "trainer.val_check_interval=3", "callbacks.lcurve.disp_freq=1",
              "callbacks.model_checkpoint.every_n_train_steps=2", "schedule.num_steps=6"]
    train(compose_train([*common, "trainer.max_steps=6"], tmp_path))
    _, first = _lcurve(tmp_path)
    assert [int(r[0]) for r in first] == [1, 2, 3, 4, 5, 6]
    first_lines = (tmp_path / "lcurve.out").read_text().splitlines()
    ckpt = tmp_path / "checkpoints" / "step0000004.ckpt"
    train(compose_train([*common, "trainer.max_steps=6", f"ckpt_path={ckpt}"], tmp_path))
    text = (tmp_path / "lcurve.out").read_text()
    assert text.count("#") == 1
    _, rows = _lcurve(tmp_path)
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5, 6]
    lines = text.splitlines()
    assert lines[:5] == first_lines[:5]  # header and steps 1-4 kept
    superseded = (tmp_path / "lcurve.out.superseded").read_text().splitlines()
    assert superseded == first_lines[5:]  # the killed run's steps 5 and 6, kept aside
    # the resumed steps are the same training (same weights, same batches): the same numbers
    assert lines[5:] == first_lines[5:]


@pytest.fixture(scope="module")
def demo_val() -> Path:
    from dpfit.data.demo import default_cache_dir, make_demo_dataset

    make_demo_dataset(default_cache_dir(), nframes=90)
    return default_cache_dir() / "val"


def test_named_validation_sets_are_logged_by_name(tmp_path, demo_val, capsys):
    sets = {"cu_rich": [str(demo_val / "Cu24Ni8")], "mixed": [str(demo_val / "Cu16Ni16"), str(demo_val / "Cu8Ni24")]}
    cfg = compose_train([*QUICK, "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1.0",
                         f"data.val_systems={_value(sets)}", "optimized_metric=val/mixed/rmse_f"], tmp_path)
    value = train(cfg)
    rows = _csv(tmp_path)
    total, cu, mixed = (_val_rows(rows, f"val/{k}rmse_f")[2] for k in ("", "cu_rich/", "mixed/"))
    assert value == pytest.approx(mixed, rel=1e-6)  # optimized_metric names a set
    assert {"val/cu_rich/rmse_e", "val/mixed/mae_f"} <= set(rows[0])
    # the total is frame-weighted: 15 validation frames of 32 atoms per composition
    assert total**2 == pytest.approx((1 * cu**2 + 2 * mixed**2) / 3, rel=1e-5)
    header, lrows = _lcurve(tmp_path)
    assert header[8:] == ["rmse_e_val_cu_rich", "rmse_f_val_cu_rich", "rmse_e_val_mixed", "rmse_f_val_mixed"]
    assert lrows[-1][header.index("rmse_f_val_mixed")] == pytest.approx(mixed, rel=1e-2)
    out = capsys.readouterr().out
    assert re.search(r"mixed\s*│\s*force \[eV/Å\]\s*│\s*" + re.escape(f"{mixed:.4e}"), out)
    assert re.search(r"all\s*│\s*force \[eV/Å\]\s*│\s*" + re.escape(f"{total:.4e}"), out)


def test_a_list_of_validation_systems_still_works_and_bad_names_are_refused(tmp_path, demo_val):
    from dpfit.data.datamodule import DeepmdDataModule

    dm = DeepmdDataModule(train_systems=[str(demo_val)], val_systems=[str(demo_val / "Cu24Ni8")],
                          type_map=["Cu", "Ni"], sel=[8, 8])
    assert dm.val_set_names == []
    with pytest.raises(ValueError, match="set name 'a/b'"):
        DeepmdDataModule(train_systems=[str(demo_val)], val_systems={"a/b": [str(demo_val)]}, type_map=["Cu", "Ni"])
