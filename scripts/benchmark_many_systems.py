"""Start-up, memory and step rate of training on many one-frame systems against the same frames in 3 systems.

    python scripts/benchmark_many_systems.py --systems 10000               # ulimit -n 1024, 200 steps
    python scripts/benchmark_many_systems.py --systems 500 --steps 30 --json many.json

The frames are the shared water frames (../shared/data/water, 192 atoms), repeated to fill ``--systems``
one-frame deepmd/npy systems, and the same frames stored as 3 systems. Each layout is trained by
``python train.py experiment=water_se_e2_a`` in a subprocess whose open-file limit is ``--nofile``
(resource.setrlimit). Reported per layout: seconds from the process start to the first training step
(``first_step_s``; Python, Hydra, indexing, the check of every frame and the statistics included), the
peak resident memory (``peak_rss_mb``) and the training steps per second after ``--warmup`` steps.
Run with OMP_NUM_THREADS=1 for repeatable step rates; the machine's other load affects every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WATER = REPO.parent / "shared" / "data" / "water"

#: runs inside the training subprocess: limits open files, notes when each training step ends
DRIVER = r"""
import json, os, resource, sys, time
START = time.time()
nofile = int(os.environ["BENCH_NOFILE"])
resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
from dpfit.training.module import DeepPotentialModule
stamps = []
_step = DeepPotentialModule.training_step
def training_step(self, batch, batch_idx):
    out = _step(self, batch, batch_idx)
    stamps.append(time.time() - START)
    return out
DeepPotentialModule.training_step = training_step
sys.argv = ["train.py", *sys.argv[1:]]
from dpfit.cli.train import main
try:
    main()
finally:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    json.dump({"stamps": stamps, "peak_rss_mb": peak}, open(os.environ["BENCH_OUT"], "w"))
"""


def water_frames(root: Path = WATER) -> list[dict]:
    """Every frame of the shared water systems as arrays (coord, box, energy, force)."""
    frames = []
    for system in sorted(root.glob("data_*")):
        for s in sorted(system.glob("set.*")):
            arrays = {k: np.load(s / f"{k}.npy") for k in ("coord", "box", "energy", "force")}
            for i in range(len(arrays["coord"])):
                frames.append({k: v[i: i + 1] for k, v in arrays.items()})
    return frames


def write_system(path: Path, frames: list[dict], type_raw: str) -> None:
    (path / "set.000").mkdir(parents=True, exist_ok=True)
    (path / "type.raw").write_text(type_raw)
    (path / "type_map.raw").write_text("O\nH\n")
    for key in ("coord", "box", "energy", "force"):
        np.save(path / "set.000" / f"{key}.npy", np.concatenate([f[key] for f in frames]))


def make_layouts(out: Path, n: int) -> tuple[Path, Path]:
    """``out/many``: n one-frame systems; ``out/three``: the same n frames in 3 systems (kept if present)."""
    many, three = out / f"many{n}", out / f"three{n}"
    type_raw = (WATER / "data_0" / "type.raw").read_text()
    frames = water_frames()
    picked = [frames[k % len(frames)] for k in range(n)]
    if not (many / "done").exists():
        for k, frame in enumerate(picked):
            write_system(many / f"sys{k:06d}", [frame], type_raw)
        (many / "done").write_text("")
    if not (three / "done").exists():
        for k, part in enumerate(np.array_split(np.arange(n), 3)):
            write_system(three / f"sys{k}", [picked[i] for i in part], type_raw)
        (three / "done").write_text("")
    return many, three


def train(data: Path, run: Path, steps: int, nofile: int, extra: list[str]) -> dict:
    record = run.with_suffix(".json")
    env = {**os.environ, "BENCH_NOFILE": str(nofile), "BENCH_OUT": str(record)}
    args = ["experiment=water_se_e2_a", f"data.train_systems=[{data}]", "data.val_systems=null",
            f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=1",
            "callbacks.model_checkpoint.every_n_train_steps=100000", "~callbacks.progress_bar",
            "~callbacks.lcurve_plot", "summary=false", f"hydra.run.dir={run}", *extra]
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"training on {data} failed:\n{proc.stderr[-3000:]}")
    rec = json.loads(record.read_text())
    return {"stamps": rec["stamps"], "peak_rss_mb": rec["peak_rss_mb"], "wall_s": wall}


def summarise(name: str, nsys: int, rec: dict, warmup: int) -> dict:
    stamps = rec["stamps"]
    rate = (len(stamps) - warmup - 1) / (stamps[-1] - stamps[warmup]) if len(stamps) > warmup + 1 else float("nan")
    return {"layout": name, "systems": nsys, "first_step_s": round(stamps[0], 1), "steps_per_s": round(rate, 2),
            "peak_rss_mb": round(rec["peak_rss_mb"]), "wall_s": round(rec["wall_s"], 1)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", type=int, default=10000, help="one-frame systems (default 10000)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the step rate (default 20)")
    parser.add_argument("--nofile", type=int, default=1024, help="open-file limit of the runs (default 1024)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "dpfit-many-systems"),
                        help="folder for the generated data and runs")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("extra", nargs="*", help="further train.py overrides, e.g. kernels=off")
    args = parser.parse_args(argv)
    out = Path(args.out)
    t = time.time()
    many, three = make_layouts(out, args.systems)
    print(f"data written in {time.time() - t:.0f} s under {out}", flush=True)
    rows = []
    for name, data, nsys in (("one frame per system", many, args.systems), ("3 systems", three, 3)):
        rec = train(data, out / f"run-{data.name}-{int(time.time())}", args.steps, args.nofile, args.extra)
        rows.append(summarise(name, nsys, rec, args.warmup))
        print(json.dumps(rows[-1]), flush=True)
    ratio = rows[0]["steps_per_s"] / rows[1]["steps_per_s"]
    print("\n| layout | systems | first step (s) | steps/s | peak RSS (MB) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['systems']} | {r['first_step_s']} | {r['steps_per_s']} | {r['peak_rss_mb']} |")
    print(f"step rate, many / 3 systems: {ratio:.2f} (ulimit -n {args.nofile}, {os.cpu_count()} cores, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ratio": ratio, "nofile": args.nofile}, indent=1))
    return rows


if __name__ == "__main__":
    main()
