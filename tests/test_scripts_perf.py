"""The performance scripts run end to end (their numbers are benchmarks, not tested here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_benchmark_writes_every_measurement(water_fixture, tmp_path):
    out = tmp_path / "bench.json"
    _run(["scripts/benchmark.py", "--frames", "2", "--warmup", "1", "--threads", "1", "--json", str(out)])
    res = json.loads(out.read_text())
    for key in ("neighbor_list", "inference_float64", "inference_float32", "train_float64", "train_float32"):
        assert res[key]["frames_per_s"] > 0, key
    train = res["train_float64"]
    assert train["gflop_per_step"] > 0.5  # the water step is ~2.6 GFLOP
    assert train["x_flop_limit"] > 1.0  # no step beats the machine's matmul rate


def test_profile_step_prints_backward_nodes(water_fixture):
    out = _run(["scripts/profile_step.py", "--steps", "1", "--threads", "1", "--backward", "--rows", "5"])
    assert "median step" in out
    assert "Backward" in out or "CppNode<dpfit::" in out  # (the op library's nodes: CppNode<dpfit::<op>>)
